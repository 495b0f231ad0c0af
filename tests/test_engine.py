import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from lowlabel.api import fit
from lowlabel.config import load_config
from lowlabel.engine.optim import lr_factor
from lowlabel.engine.trainer import Trainer
from lowlabel.config import OptimConfig

from .conftest import REPO, make_dataset, tiny_config


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


@pytest.mark.parametrize("method,teacher", [
    ("unimatch", "self"), ("regionmatch", "self"), ("derprop", "epoch_momentum"),
    ("fixmatch", "ema"),  # the SeSAM-style student-teacher (FixMatch with an EMA teacher)
])
def test_resume_mid_epoch_gives_the_same_weights(tmp_path, method, teacher):
    data = make_dataset(tmp_path / "d", n=12)  # 8 unlabeled images: 4 batches an epoch, the stop falls inside one
    raw = tiny_config(data, tmp_path / "a", method, teacher, iterations=7)
    fit(load_config(raw=raw), progress=False)
    full = _weights(tmp_path / "a" / raw["name"])

    raw_b = tiny_config(data, tmp_path / "b", method, teacher, iterations=7)
    tr = Trainer(load_config(raw=raw_b), progress=False)
    assert tr.iters_per_epoch == 4
    tr.fit(stop_at=2)  # stopped, as a killed run would be, after the checkpoint at iteration 2
    run_dir = tmp_path / "b" / raw_b["name"]
    assert _weights(run_dir)["iteration"] == 2
    fit(resume=run_dir, progress=False)
    resumed = _weights(run_dir)
    assert resumed["iteration"] == 7
    for k, v in full["student"].items():
        assert torch.equal(v, resumed["student"][k]), k
    if (full["teacher"] or {}).get("model"):
        for k, v in full["teacher"]["model"].items():
            assert torch.equal(v, resumed["teacher"]["model"][k]), k
    for name in ("summary.json",):
        a, b = (json.loads((d / raw["name"] / name).read_text()) for d in (tmp_path / "a", tmp_path / "b"))
        assert a["best_val"] == b["best_val"] and a["best_iteration"] == b["best_iteration"]
    iters = [json.loads(l)["iteration"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "val" not in l]
    assert iters == [1, 2, 3, 4, 5, 6, 7]  # history is not duplicated by the resume


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_resumed_run_times_every_segment(tmp_path, old_checkpoint):
    """A resumed run's summary and log clock carry the time of the segments before the resume
    (read from last.pt); a checkpoint without that time is timed from the resume on, and says so."""
    data = make_dataset(tmp_path / "d", n=8)
    raw = tiny_config(data, tmp_path / "r", "supervised", "none", iterations=5)
    Trainer(load_config(raw=raw), progress=False).fit(stop_at=2)
    run_dir = tmp_path / "r" / raw["name"]
    state = _weights(run_dir)
    assert state["timed_from"] == 0 and state["trained_seconds"] > 0
    if old_checkpoint:
        del state["trained_seconds"], state["timed_from"]
    else:
        state["trained_seconds"] = 1000.0  # as if the first segment had taken 1,000 s
    torch.save(state, run_dir / "checkpoints" / "last.pt")
    fit(resume=run_dir, progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    times = [json.loads(l)["time"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "val" not in l]
    if old_checkpoint:
        assert summary["timed_iterations"] == 3 and summary["seconds"] < 1000
    else:
        assert summary["timed_iterations"] == 5 and summary["seconds"] >= 1000
        assert times[:2] == sorted(times[:2]) and min(times[2:]) >= 1000  # the clock goes on from the checkpoint


def test_run_directory_contents_and_run_api(tiny_dataset, tmp_path):
    raw = tiny_config(tiny_dataset, tmp_path, "supervised", "none", iterations=4)
    run = fit(load_config(raw=raw), progress=False)
    d = run.run_dir
    for f in ("config.yaml", "splits/labeled.txt", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt", "summary.json", "run.json"):
        assert (d / f).exists(), f
    assert len((d / "splits" / "labeled.txt").read_text().split()) == 2
    m = run.evaluate(split="test")
    assert 0 <= m["miou"] <= 1 and m["images"] == 1
    pred = run.predict(tiny_dataset / "images" / "img00.png")
    assert pred.labels.shape == (48, 64)
    out = run.predict_folder(tiny_dataset / "images", tmp_path / "pred")
    assert len(out) == 6 and (tmp_path / "pred" / "overlays" / "img00.jpg").exists()
    # an existing run is not overwritten
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(load_config(raw=raw), progress=False)


def test_clear_errors(tiny_dataset, tmp_path):
    raw = tiny_config(tiny_dataset, tmp_path, "supervised", "none", iterations=2)
    run = fit(load_config(raw=raw), progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        load_config(raw={**raw, "method": {"name": "nope"}})
    with pytest.raises(ValueError, match="unknown model arch"):
        Trainer(load_config(raw={**raw, "name": "x", "model": {"arch": "nope"}}), progress=False)
    # checkpoint of another architecture / class count
    raw2 = {**raw, "model": {"arch": "unet", "encoder": "resnet18"}}
    cfg2 = load_config(raw=raw2)
    with pytest.raises(ValueError, match="checkpoint is tiny"):
        Trainer(cfg2, run_dir=run.run_dir, resume=True, progress=False)
    other = make_dataset(tmp_path / "four", classes=("a", "b", "c", "d"))
    cfg3 = load_config(raw={**raw, "data": {**raw["data"], "root": str(other)}})
    with pytest.raises(ValueError, match="3 classes"):
        Trainer(cfg3, run_dir=run.run_dir, resume=True, progress=False)
    with pytest.raises(ValueError, match="4 classes"):
        run.evaluate(other)


def test_schedules():
    poly = OptimConfig(schedule="poly", power=1.0)
    assert lr_factor(poly, 0, 100) == 1.0 and lr_factor(poly, 50, 100) == pytest.approx(0.5)
    cos = OptimConfig(schedule="cosine", warmup_iters=10, warmup_ratio=0.0)
    assert lr_factor(cos, 0, 110) == 0.0 and lr_factor(cos, 5, 110) == pytest.approx(0.5)
    assert lr_factor(cos, 10, 110) == pytest.approx(1.0) and lr_factor(cos, 110, 110) == pytest.approx(0.0)


def test_two_process_ddp_on_gloo(tiny_dataset, tmp_path):
    raw = tiny_config(tiny_dataset, tmp_path, "fixmatch", "self", iterations=3)
    raw["data"]["labeled"] = "2"
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    script = tmp_path / "ddp_check.py"
    script.write_text(textwrap.dedent(f"""
        import hashlib, os, torch
        from lowlabel.config import load_config
        from lowlabel.engine.trainer import Trainer
        tr = Trainer(load_config({str(cfg_path)!r}), progress=False)
        tr.fit()
        h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in tr.student.parameters())).hexdigest()
        open(os.path.join({str(tmp_path)!r}, f"rank{{tr.rank}}.txt"), "w").write(f"{{tr.world}} {{h}}")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (tmp_path / "rank0.txt").read_text().split(), (tmp_path / "rank1.txt").read_text().split()
    assert a[0] == b[0] == "2"
    assert a[1] == b[1]  # gradients were averaged: both ranks hold the same weights
    assert (tmp_path / raw["name"] / "checkpoints" / "last.pt").exists()
