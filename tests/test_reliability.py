"""Every bad input a user can make ends as one line naming the file or key and the problem, exit
status 2, and nothing written (issue 15's table: one test row per case)."""

import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lowlabel.cli import main
from lowlabel.data.dataset import DatasetError, FolderDataset, collate
from lowlabel.errors import CheckpointError

from .conftest import tiny_config


def _config(data, tmp_path, **sets) -> tuple[str, object]:
    raw = tiny_config(data, tmp_path / "runs", "supervised", "none", iterations=2)
    for key, value in sets.items():
        section, name = key.split("__")
        raw[section][name] = value
    path = tmp_path / "c.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return str(path), tmp_path / "runs" / raw["name"]


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _wrong_size(d):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(d / "masks" / "img01.png")
    return "img01.png"


def _class_out_of_range(d):
    Image.fromarray(np.full((48, 64), 7, np.uint8)).save(d / "masks" / "img01.png")
    return "img01.png"


def _rgb_mask(d):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(d / "masks" / "img01.png")
    return "img01.png"


def _truncated_image(d):
    p = d / "images" / "img01.png"
    p.write_bytes(p.read_bytes()[:200])
    return "img01.png"


def _zero_byte_image(d):
    (d / "images" / "img01.png").write_bytes(b"")
    return "img01.png"


def _corrupt_val_image(d):  # img04 is the val split
    (d / "images" / "img04.png").write_bytes(b"not a png")
    return "img04.png"


def _corrupt_test_image(d):  # img05 is the test split
    p = d / "images" / "img05.png"
    p.write_bytes(p.read_bytes()[:100])
    return "img05.png"


@pytest.mark.parametrize("damage", [_wrong_size, _class_out_of_range, _rgb_mask, _truncated_image, _zero_byte_image, _corrupt_val_image, _corrupt_test_image])
@pytest.mark.parametrize("workers", [0, 1])
def test_fit_refuses_bad_data_before_writing(tiny_dataset, tmp_path, capsys, damage, workers):
    name = damage(tiny_dataset)
    cfg, run_dir = _config(tiny_dataset, tmp_path, data__workers=workers)
    assert main(["fit", "-c", cfg, "--quiet"]) == 2
    _one_line_error(capsys, name)
    assert not run_dir.exists()


def test_verdicts_are_cached_and_invalidated(tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWLABEL_CACHE", str(tmp_path / "cache"))
    from lowlabel.data import validate

    reads = []
    real = validate.read_image
    monkeypatch.setattr(validate, "read_image", lambda p, *a: reads.append(p) or real(p, *a))
    validate.require_valid(tiny_dataset, splits=["train", "val"], read_pixels=True)
    assert len(reads) == 5  # train (4) + val (1): the test image is not touched
    validate.require_valid(tiny_dataset, splits=["train", "val"], read_pixels=True)
    assert len(reads) == 5  # second run: every verdict cached
    _class_out_of_range(tiny_dataset)  # the mask changes: its image is checked again and fails
    with pytest.raises(DatasetError, match="img01.png"):
        validate.require_valid(tiny_dataset, splits=["train", "val"], read_pixels=True)
    assert len(reads) == 6


def test_dataset_errors_keep_their_type_across_workers(tiny_dataset):
    err = pickle.loads(pickle.dumps(DatasetError("a.png", "broken")))
    assert type(err) is DatasetError and err.path == "a.png" and err.problem == "broken"
    assert str(pickle.loads(pickle.dumps(CheckpointError("b.pt", "empty")))) == "b.pt: empty"
    (tiny_dataset / "images" / "img01.png").write_bytes(b"")
    ds = FolderDataset(tiny_dataset, "train", labeled=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate)
    with pytest.raises(DatasetError) as caught:
        next(iter(loader))
    assert str(caught.value).endswith("img01.png: unreadable or truncated image (cannot identify image file " + repr(str(tiny_dataset / "images" / "img01.png")) + ")")
    assert "\n" not in str(caught.value)


def _random_bytes(p):
    p.write_bytes(np.random.default_rng(0).bytes(4096))


def _png_renamed(p):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(p, format="PNG")


def _truncated(p, src):
    p.write_bytes(src.read_bytes()[:1000])


def _pickled_module(p):
    torch.save(torch.nn.Linear(2, 2), p)


def _empty(p):
    p.write_bytes(b"")


def _other_format(p):
    torch.save({"state_dict": {}}, p)


@pytest.mark.parametrize("make,why", [
    (_random_bytes, "not a lowlabel checkpoint"), (_png_renamed, "not a lowlabel checkpoint"),
    (_truncated, "unreadable checkpoint"), (_pickled_module, "pickled objects"), (_empty, "empty file"),
    (_other_format, "format None"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_bad_checkpoints_are_named(tiny_dataset, tmp_path, capsys, make, why, command, trained_run):
    bad = tmp_path / "model.pt"
    make(bad, trained_run / "checkpoints" / "last.pt") if make is _truncated else make(bad)
    args = ["predict", str(bad), str(tiny_dataset / "images"), "--out", str(tmp_path / "pred")] if command == "predict" else ["evaluate", str(bad), "--data", str(tiny_dataset)]
    assert main(args) == 2
    _one_line_error(capsys, "model.pt", why)
    assert not (tmp_path / "pred").exists()


@pytest.fixture
def trained_run(tiny_dataset, tmp_path, capsys):
    cfg, run_dir = _config(tiny_dataset, tmp_path)
    assert main(["fit", "-c", cfg, "--quiet"]) == 0
    capsys.readouterr()
    return run_dir


def test_fit_into_an_existing_run(tiny_dataset, tmp_path, capsys, trained_run):
    cfg, _ = _config(tiny_dataset, tmp_path)
    assert main(["fit", "-c", cfg, "--quiet"]) == 2
    _one_line_error(capsys, str(trained_run), "--resume")  # --debug shows the traceback instead:
    with pytest.raises(FileExistsError):
        main(["--debug", "fit", "-c", cfg, "--quiet"])


def test_divergence_is_one_line(tiny_dataset, tmp_path, capsys):
    cfg, _ = _config(tiny_dataset, tmp_path, optim__lr=1e30, train__iterations=6)
    assert main(["fit", "-c", cfg, "--quiet"]) == 2
    _one_line_error(capsys, "loss is", "optim.lr")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device(tiny_dataset, tmp_path, capsys):
    cfg, run_dir = _config(tiny_dataset, tmp_path, train__device="cuda")
    assert main(["fit", "-c", cfg, "--quiet"]) == 2
    _one_line_error(capsys, "train.device", "CUDA is not available")
    assert not run_dir.exists()


def test_evaluate_predictions_without_data(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    assert main(["evaluate", str(tmp_path / "pred")]) == 2
    _one_line_error(capsys, "pred", "--data")


@pytest.mark.parametrize("key,value,needle", [
    ("data__labeled_batch", 0, "data.labeled_batch"), ("train__iterations", 0, "train.iterations"),
    ("train__checkpoint_every", 0, "train.checkpoint_every"), ("train__log_every", 0, "train.log_every"),
    ("data__labeled", 46, "data.labeled"), ("data__labeled", "1/0", "data.labeled"), ("data__labeled", "2.5", "data.labeled"),
    ("optim__lr", -1.0, "optim.lr"), ("eval__overlap", 1.0, "eval.overlap"),
])
def test_bad_config_values_name_their_key(tiny_dataset, tmp_path, capsys, key, value, needle):
    cfg, run_dir = _config(tiny_dataset, tmp_path, **{key: value})
    assert main(["fit", "-c", cfg, "--quiet"]) == 2
    _one_line_error(capsys, needle)
    assert not run_dir.exists()


def test_labeled_count_as_a_yaml_number(tiny_dataset, tmp_path, capsys):
    cfg, run_dir = _config(tiny_dataset, tmp_path, data__labeled=3)
    assert main(["fit", "-c", cfg, "--quiet"]) == 0
    assert len((run_dir / "splits" / "labeled.txt").read_text().split()) == 3


@pytest.mark.parametrize("split", ["val", "test"])
def test_labeled_list_with_evaluation_ids(tiny_dataset, tmp_path, capsys, split):
    ids = (tiny_dataset / "splits" / f"{split}.txt").read_text().split()
    lst = tmp_path / "labeled.txt"
    lst.write_text("img00\n" + "".join(f"{i}\n" for i in ids))
    cfg, run_dir = _config(tiny_dataset, tmp_path, data__labeled=str(lst))
    assert main(["fit", "-c", cfg, "--quiet"]) == 2
    _one_line_error(capsys, "labeled.txt", f"{split}.txt")
    assert not run_dir.exists()


def test_resume_extends_the_budget_and_refuses_other_changes(tiny_dataset, tmp_path, capsys, trained_run):
    import json

    other, _ = _config(tiny_dataset, tmp_path / "other", model__width=8, optim__lr=0.1)
    assert main(["fit", "--resume", str(trained_run), "-c", other, "--quiet"]) == 2
    _one_line_error(capsys, "model.width (4 -> 8)", "optim.lr (0.01 -> 0.1)")
    assert main(["fit", "--resume", str(trained_run), "--set", "data.crop=64", "--quiet"]) == 2
    _one_line_error(capsys, "data.crop")
    assert main(["fit", "--resume", str(trained_run), "--set", "train.iterations=1", "--quiet"]) == 2
    _one_line_error(capsys, "train.iterations=1", "extend")
    assert torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 2  # untouched
    assert main(["fit", "--resume", str(trained_run), "--set", "train.iterations=4", "--quiet"]) == 0
    assert torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 4
    assert json.loads((trained_run / "run.json").read_text())["resumes"] == [{"iteration": 2, "changed": {"train.iterations": [2, 4]}}]
    assert "iterations: 4" in (trained_run / "config.yaml").read_text()


def test_orphan_temp_files_are_removed_on_resume(tiny_dataset, tmp_path, trained_run):
    dead = 2**22 + 12345  # above the default pid_max of 2**22: never a running process
    orphan = trained_run / "checkpoints" / f".last.pt.{dead}.tmp"
    orphan.write_bytes(b"x" * 100)
    assert main(["fit", "--resume", str(trained_run), "--set", "train.iterations=3", "--quiet"]) == 0
    assert not orphan.exists()


def test_refine_rerun_with_other_settings(tiny_dataset, tmp_path, capsys):
    assert main(["weaken", str(tiny_dataset), "--kind", "coarse", "--out", str(tmp_path / "w"), "--quiet"]) == 0
    out = tmp_path / "r"
    base = ["refine", str(tmp_path / "w"), "--weak", "coarse", "--out", str(out), "--limit", "2"]
    assert main(base) == 0
    before = (out / "refined" / "img00.png").read_bytes()
    capsys.readouterr()
    assert main(base + ["--selection", "score"]) == 2
    _one_line_error(capsys, str(out), "selection", "--overwrite")
    assert (out / "refined" / "img00.png").read_bytes() == before
    assert main(base + ["--selection", "score", "--overwrite"]) == 0
    import json

    assert json.loads((out / "manifest.json").read_text())["settings"]["selection"] == "score"


@pytest.mark.parametrize("damage", [_truncated_image, _zero_byte_image])
def test_predict_checks_every_input_before_writing(tiny_dataset, tmp_path, capsys, trained_run, damage):
    name = damage(tiny_dataset)
    assert main(["predict", str(trained_run), str(tiny_dataset / "images"), "--out", str(tmp_path / "pred")]) == 2
    _one_line_error(capsys, name)
    assert not (tmp_path / "pred").exists()


def test_kill_9_and_resume_is_exact(tmp_path):
    """A UniMatch run killed with SIGKILL at a random moment (maybe while writing a checkpoint)
    resumes to the same weights as the run never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import make_dataset

    data = make_dataset(tmp_path / "d", n=12)
    raw = tiny_config(data, tmp_path / "runs", "unimatch", "self", iterations=20)
    raw["train"].update(checkpoint_every=1, val_every=5)
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**raw, "name": name}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lowlabel.cli", "fit", "--quiet", "-c"]
    subprocess.run(cmd + [str(tmp_path / "a.yaml")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + [str(tmp_path / "b.yaml")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "b" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["iteration"]
    assert 1 <= killed_at < 20
    r = subprocess.run([sys.executable, "-m", "lowlabel.cli", "fit", "--quiet", "--resume", str(tmp_path / "runs" / "b")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "runs" / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert b["iteration"] == 20
    for k, v in a["student"].items():
        assert torch.equal(v, b["student"][k]), (k, killed_at)
    assert not list((tmp_path / "runs" / "b").rglob("*.tmp"))


def test_weaken_refuses_bad_masks_before_writing(tiny_dataset, tmp_path, capsys):
    _class_out_of_range(tiny_dataset)
    assert main(["weaken", str(tiny_dataset), "--kind", "point", "--out", str(tmp_path / "w"), "--quiet"]) == 2
    _one_line_error(capsys, "img01.png", "class ids")
    assert not (tmp_path / "w").exists()
