"""``train.reference``: a semi-supervised run held against a labeled-only run of the same data,
at every validation and in the summary; a reference that cannot compare is a one-line error."""

import json

import pytest

from lowlabel.api import fit
from lowlabel.config import load_config
from lowlabel.errors import ConfigError

from .conftest import tiny_config


def _fit(root, out, method="supervised", **extra):
    raw = tiny_config(root, out, method=method, iterations=4, **extra)
    raw["data"]["val_split"] = "val"
    fit(load_config(raw=raw), progress=False)
    return out / raw["name"]


def test_a_semi_supervised_run_says_at_each_validation_and_at_the_end_whether_it_beat_its_reference(tiny_dataset, tmp_path, capsys):
    ref = _fit(tiny_dataset, tmp_path / "runs")
    ref_best = max(json.loads(ln)["val"]["miou"] for ln in (ref / "metrics.jsonl").read_text().splitlines() if "val" in json.loads(ln))
    run = _fit(tiny_dataset, tmp_path / "runs", method="fixmatch", train={"reference": str(ref)}, data={"unlabeled_gt": True})
    vals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val" in json.loads(ln)]
    assert len(vals) == 2
    for v in vals:  # each validation: this score minus the reference's best
        assert v["vs_reference"] == pytest.approx(v["val"]["miou"] - ref_best, abs=1e-6)
    rec = json.loads((run / "summary.json").read_text())["reference"]
    best = max(v["val"]["miou"] for v in vals)
    assert rec["reference_best_val"] == pytest.approx(ref_best) and rec["best_val"] == pytest.approx(best)
    assert rec["helped"] == (best > ref_best) and rec["delta"] == pytest.approx(best - ref_best)
    said = "semi-supervision helped here" if rec["helped"] else "semi-supervision did not help here"
    assert rec["message"].startswith(said) and said in capsys.readouterr().out
    assert rec["keep"] == ("best.pt" if rec["helped"] else str(ref / "checkpoints" / "best.pt"))


def test_a_reference_that_cannot_compare_is_a_one_line_error(tiny_dataset, tmp_path):
    ssl = _fit(tiny_dataset, tmp_path / "runs", method="fixmatch")
    with pytest.raises(ConfigError, match="a labeled-only run is needed"):
        _fit(tiny_dataset, tmp_path / "r2", method="fixmatch", train={"reference": str(ssl)})
    with pytest.raises(ConfigError, match="not a lowlabel run directory"):
        _fit(tiny_dataset, tmp_path / "r3", method="fixmatch", train={"reference": str(tmp_path)})
    ref = _fit(tiny_dataset, tmp_path / "r4")
    with pytest.raises(ConfigError, match="labeled set differs"):
        _fit(tiny_dataset, tmp_path / "r5", method="fixmatch", train={"reference": str(ref)}, data={"labeled": "3"})
    with pytest.raises(ConfigError, match="at each validation"):
        _fit(tiny_dataset, tmp_path / "r6", method="fixmatch", train={"reference": str(ref), "val_every": 0})


def test_reference_auto_trains_the_labeled_only_run_first(tiny_dataset, tmp_path):
    import yaml

    run = _fit(tiny_dataset, tmp_path / "runs", method="fixmatch", train={"reference": "auto", "reference_iterations": 2})
    ref = tmp_path / "runs" / f"{run.name}-labeled-only"
    ref_cfg = yaml.safe_load((ref / "config.yaml").read_text())
    assert ref_cfg["method"]["name"] == "supervised" and ref_cfg["teacher"]["kind"] == "none" and ref_cfg["train"]["iterations"] == 2
    assert (ref / "splits" / "labeled.txt").read_text() == (run / "splits" / "labeled.txt").read_text()
    rec = json.loads((run / "summary.json").read_text())["reference"]
    assert rec["run"] == str(ref) and rec["method"] == "supervised"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["reference"] == str(ref)  # the run names what it was held against
    with pytest.raises(ConfigError, match="labeled-only itself"):
        _fit(tiny_dataset, tmp_path / "r2", train={"reference": "auto"})
