"""DistributedDataParallel on CPU with gloo: torchrun with 2 processes against 1 process with
twice the batch, an interrupted 2-process run resumed, UniMatch and a seed method under DDP, and
2 "nodes" of one process each on localhost."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lowlabel.api import fit
from lowlabel.config import load_config

from .conftest import make_dataset, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], *, nproc: int = 2, extra: list[str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    launcher = extra or ["--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "lowlabel.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def ddp_config(data: Path, out: Path, batch: int, iterations: int = 3, method: str = "supervised", teacher: str = "none") -> dict:
    raw = tiny_config(data, out, method, teacher, iterations=iterations)
    raw["data"].update(labeled="1" if method == "supervised" else "4", labeled_batch=batch, unlabeled_batch=batch)
    raw["optim"].update(schedule="constant", momentum=0.9)
    raw["train"].update(val_every=0, checkpoint_every=2, sync_bn=True, precision="fp32")
    return raw


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    """With SyncBN and the shared stream (global batch k is the same images for any number of
    processes), 2 processes of batch 2 follow 1 process of batch 4, step for step."""
    data = make_dataset(tmp_path / "d", n=12)
    one = ddp_config(data, tmp_path / "one", batch=4)
    fit(load_config(raw=one), progress=False)
    two = ddp_config(data, tmp_path / "two", batch=2)
    torchrun(["fit", "-c", str(write_config(two, tmp_path / "two.yaml")), "--quiet"])
    a, b = weights(tmp_path / "one" / one["name"]), weights(tmp_path / "two" / two["name"])
    assert b["iteration"] == 3
    for k, v in a["student"].items():
        if v.is_floating_point():
            assert torch.allclose(v, b["student"][k], atol=2e-5, rtol=1e-4), (k, float((v - b["student"][k]).abs().max()))
    meta = json.loads((tmp_path / "two" / two["name"] / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["sync_bn"] is True and meta["find_unused_parameters"] is False


def test_interrupted_two_process_run_resumes_identically(tmp_path):
    data = make_dataset(tmp_path / "d", n=12)
    full = ddp_config(data, tmp_path / "full", batch=2, iterations=4)
    torchrun(["fit", "-c", str(write_config(full, tmp_path / "full.yaml")), "--quiet"])
    part = ddp_config(data, tmp_path / "part", batch=2, iterations=2)
    torchrun(["fit", "-c", str(write_config(part, tmp_path / "part.yaml")), "--quiet"])
    run_dir = tmp_path / "part" / part["name"]
    torchrun(["fit", "--resume", str(run_dir), "--set", "train.iterations=4", "--quiet"])
    a, b = weights(tmp_path / "full" / full["name"]), weights(run_dir)
    assert a["iteration"] == b["iteration"] == 4
    for k, v in a["student"].items():
        assert torch.equal(v, b["student"][k]), k


@pytest.mark.parametrize("method,teacher", [("unimatch", "self"), ("derprop", "epoch_momentum")])
def test_semi_supervised_methods_train_under_ddp(tmp_path, method, teacher):
    data = make_dataset(tmp_path / "d", n=12)
    raw = ddp_config(data, tmp_path / "r", batch=2, iterations=3, method=method, teacher=teacher)
    raw["log"] = {"tensorboard": True}
    torchrun(["fit", "-c", str(write_config(raw, tmp_path / "c.yaml")), "--quiet"])
    run_dir = tmp_path / "r" / raw["name"]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
    state = weights(run_dir)
    assert state["iteration"] == 3 and all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2


def test_two_nodes_of_one_process_on_localhost(tmp_path):
    data = make_dataset(tmp_path / "d", n=12)
    raw = ddp_config(data, tmp_path / "r", batch=2, iterations=2)
    cfg = write_config(raw, tmp_path / "c.yaml")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "lowlabel.cli", "fit", "-c", str(cfg), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    meta = json.loads((tmp_path / "r" / raw["name"] / "run.json").read_text())
    assert meta["world_size"] == 2 and weights(tmp_path / "r" / raw["name"])["iteration"] == 2


def test_predict_under_torchrun_shards_files_and_writes_what_one_process_writes(tmp_path):
    data = make_dataset(tmp_path / "d", n=7)
    raw = tiny_config(data, tmp_path / "r", "supervised", "none", iterations=2)
    run = fit(load_config(raw=raw), progress=False)
    one, two = tmp_path / "one", tmp_path / "two"
    run.predict_folder(data / "images", one)
    res = torchrun(["predict", str(run.run_dir), str(data / "images"), "--out", str(two)])
    assert res.stdout.count("prediction(s)") == 2  # each process wrote its share
    files_one = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    files_two = sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert files_one == files_two and len(files_one) == 14  # 7 label maps + 7 overlays, none twice
    for f in files_one:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
