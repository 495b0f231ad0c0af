import json
import subprocess
import sys

import numpy as np
from PIL import Image

from lowlabel import __version__
from lowlabel.cli import main

from .conftest import REPO


def test_version_and_help():
    r = subprocess.run([sys.executable, "-m", "lowlabel.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout
    r = subprocess.run([sys.executable, "-m", "lowlabel.cli", "--help"], capture_output=True, text=True)
    for cmd in ("quickstart", "validate", "split", "fit", "evaluate", "predict", "config"):
        assert cmd in r.stdout


def test_config_show(capsys):
    assert main(["config", "show", "-c", str(REPO / "configs" / "camvid-fixmatch-cpu.yaml"), "--set", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "name: camvid-fixmatch-cpu" in out and "lr: 0.5" in out and "threshold: 0.95" in out


def test_validate_exit_codes(tiny_dataset, capsys):
    assert main(["validate", str(tiny_dataset), "--quiet"]) == 0
    Image.fromarray(np.full((48, 64), 9, np.uint8)).save(tiny_dataset / "masks" / "img02.png")
    assert main(["validate", str(tiny_dataset), "--quiet"]) == 1
    assert "img02.png" in capsys.readouterr().out


def test_validate_says_what_a_run_on_the_lists_trains_on(tiny_dataset, capsys):
    (tiny_dataset / "splits" / "few.txt").write_text("img00\nimg01\n")
    train = (tiny_dataset / "splits" / "train.txt").read_text().split()
    assert main(["validate", str(tiny_dataset), "--quiet", "--labeled", "few"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("a run on these lists trains on:"))
    assert "2 images" in line and f"{len([i for i in train if i not in ('img00', 'img01')])} images unlabeled" in line
    assert main(["validate", str(tiny_dataset), "--quiet", "--labeled", "few", "--weak", "scribbles"]) == 1  # no such weak labels
    assert "scribbles" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["split", str(tmp_path / "nowhere"), "--count", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written on failure


def test_evaluate_prediction_folder(tiny_dataset, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    gt = np.array(Image.open(tiny_dataset / "masks" / "img05.png"))
    Image.fromarray(np.where(gt == 255, 0, gt).astype(np.uint8)).save(pred / "img05.png")  # perfect prediction
    assert main(["evaluate", str(pred), "--data", str(tiny_dataset), "--split", "test", "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["miou"] == 1.0 and m["images"] == 1
    assert "mIoU" in capsys.readouterr().out
    (pred / "img05.png").unlink()
    assert main(["evaluate", str(pred), "--data", str(tiny_dataset), "--split", "test"]) == 2


def test_weaken_refine_weights_commands(tiny_dataset, tmp_path, capsys):
    assert main(["weaken", str(tiny_dataset), "--kind", "coarse", "--out", str(tmp_path / "w"), "--quiet"]) == 0
    assert main(["refine", str(tmp_path / "w"), "--weak", "coarse", "--out", str(tmp_path / "r"), "--limit", "1"]) == 0
    assert (tmp_path / "r" / "refined" / "img00.png").exists()
    assert main(["weights", "list"]) == 0
    assert "sam_vit_b" in capsys.readouterr().out
    assert main(["refine", str(tmp_path / "w"), "--weak", "coarse", "--out", str(tmp_path / "r2"), "--backend", "sam", "--checkpoint", str(tmp_path / "none.pth")]) == 2
