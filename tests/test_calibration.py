"""lowlabel.eval.calibration and `lowlabel calibrate`: ECE, reliability bins and per-class keep statistics."""

import json

import numpy as np
import pytest

from lowlabel import fit
from lowlabel.cli import main
from lowlabel.config import load_config
from lowlabel.eval.calibration import Calibration

from .conftest import tiny_config


def test_ece_is_zero_when_each_confidence_bin_is_as_accurate_as_it_claims():
    cal = Calibration(2, bins=10, threshold=0.95)
    # 100 pixels at confidence 0.75 (bin 7), 75 of them right; 100 at 0.25 (bin 2), 25 right
    conf = np.r_[np.full(100, 0.75), np.full(100, 0.25)].reshape(10, 20)
    target = np.zeros(200, np.int64)
    pred = np.r_[np.zeros(75), np.ones(25), np.zeros(25), np.ones(75)].astype(np.int64)
    cal.update(conf, pred.reshape(10, 20), target.reshape(10, 20))
    s = cal.summary()
    assert s["ece"] == pytest.approx(0.0, abs=1e-9)
    assert s["bins"][7]["accuracy"] == pytest.approx(0.75) and s["bins"][2]["pixels"] == 100
    assert s["kept"] == 0.0 and s["kept_accuracy"] is None  # nothing reaches 0.95


def test_an_overconfident_model_has_the_gap_as_its_ece_and_the_threshold_shows_which_classes_it_keeps():
    cal = Calibration(3, bins=10, threshold=0.9, ignore_index=255)
    # every pixel at confidence 0.95; class 0 predicted everywhere; truth: 80 background, 20 class 1, 10 ignored
    conf = np.full((11, 10), 0.95)
    pred = np.zeros((11, 10), np.int64)
    target = np.zeros((11, 10), np.int64)
    target[8:10] = 1
    target[10] = 255
    cal.update(conf, pred, target)
    s = cal.summary(["background", "thin", "absent"])
    assert s["pixels"] == 100  # the ignored row left out
    assert s["ece"] == pytest.approx(100 * abs(0.8 - 0.95))
    assert s["mce"] == pytest.approx(15.0)
    assert s["kept"] == 100.0 and s["kept_accuracy"] == pytest.approx(80.0)
    bg, thin, absent = (s["per_class"][k] for k in ("background", "thin", "absent"))
    assert bg["precision"] == pytest.approx(80.0) and bg["recall"] == 100.0 and bg["share_of_kept"] == 100.0
    assert thin["recall"] == 0.0 and thin["precision"] is None and thin["share_of_pixels"] == pytest.approx(20.0)
    assert absent["recall"] is None  # no true pixel of it


def test_calibration_refuses_bad_inputs():
    with pytest.raises(ValueError, match="threshold"):
        Calibration(2, threshold=0.0)
    cal = Calibration(2)
    with pytest.raises(ValueError, match="differ in size"):
        cal.update(np.ones((2, 2)), np.zeros((2, 2), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="class 4"):
        cal.update(np.ones((2, 2)), np.zeros((2, 2), int), np.full((2, 2), 4))


def test_calibrate_scores_a_runs_unlabeled_images_and_writes_the_diagram(tiny_dataset, tmp_path, capsys):
    raw = tiny_config(tiny_dataset, tmp_path / "runs", method="fixmatch", iterations=2)
    run_dir = fit(load_config(raw=raw), progress=False).run_dir
    out = tmp_path / "cal"
    capsys.readouterr()  # fit's summary
    assert main(["calibrate", str(run_dir), "--unlabeled", "--bins", "5", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    unl = (run_dir / "splits" / "unlabeled.txt").read_text().split()
    assert doc["split"] == f"unlabeled ({len(unl)} of {len(unl)} with masks)" and doc["images"] == len(unl)
    assert len(doc["bins"]) == 5 and sum(b["pixels"] for b in doc["bins"]) == doc["pixels"]
    assert doc["pixels"] == len(unl) * (48 * 64 - 1)  # every pixel but the ignored corner
    assert 0.0 <= doc["ece"] <= 100.0 and set(doc["per_class"]) == {"a", "b", "c"}
    assert (out / "reliability.png").stat().st_size > 1000
    assert json.loads((out / "calibration.json").read_text())["ece"] == doc["ece"]
    # a labeled split, the table, the default folder
    assert main(["calibrate", str(run_dir), "--split", "test"]) == 0
    text = capsys.readouterr().out
    assert "ECE" in text and "recall kept" in text
    assert (run_dir / "calibration-test" / "reliability.png").is_file()


def test_a_labeled_only_run_is_scored_on_the_train_images_it_did_not_train_on_and_missing_lists_are_said(tiny_dataset, tmp_path, capsys):
    run_dir = fit(load_config(raw=tiny_config(tiny_dataset, tmp_path / "runs", iterations=2)), progress=False).run_dir
    (run_dir / "splits" / "unlabeled.txt").unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["calibrate", str(run_dir), "--unlabeled", "--json"]) == 0
    labeled = (run_dir / "splits" / "labeled.txt").read_text().split()
    train = (tiny_dataset / "splits" / "train.txt").read_text().split()
    assert json.loads(capsys.readouterr().out)["images"] == len(train) - len(labeled) == 2
    (run_dir / "splits" / "labeled.txt").unlink()
    assert main(["calibrate", str(run_dir), "--unlabeled"]) == 2
    assert "splits/unlabeled.txt" in capsys.readouterr().err
