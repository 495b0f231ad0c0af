"""TensorBoard and MLflow trackers: what a run sends them, and resume continuing the MLflow run."""

import json

import pytest

from lowlabel.api import fit
from lowlabel.config import load_config
from lowlabel.engine.loggers import flat_numbers
from lowlabel.engine.trainer import Trainer

from .conftest import tiny_config


def test_flat_numbers_keeps_finite_numeric_leaves():
    assert flat_numbers({"miou": 0.5, "per_class_iou": {"a": 0.1, "b": None}, "n": 3, "ok": True, "name": "x", "bad": float("nan")}) == {
        "miou": 0.5, "per_class_iou/a": 0.1, "n": 3.0}


def test_tensorboard_event_files_hold_losses_validation_and_overlays(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = tiny_config(tiny_dataset, tmp_path, "supervised", "none", iterations=4)
    raw["log"] = {"tensorboard": True}
    run = fit(load_config(raw=raw), progress=False)
    acc = EventAccumulator(str(run.run_dir / "tensorboard")).Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "val/miou"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/miou")] == [2, 4]
    assert any(t.startswith("val_overlay/") for t in tags["images"])


def test_mlflow_gets_params_metrics_and_the_best_checkpoint_and_resume_continues_the_run(tiny_dataset, tmp_path, monkeypatch):
    """Against a local SQLite store (MLflow's file store is deprecated); artifacts go to ./mlartifacts."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = tiny_config(tiny_dataset, tmp_path / "runs", "supervised", "none", iterations=4)
    raw["log"] = {"mlflow": uri}
    Trainer(load_config(raw=raw), progress=False).fit(stop_at=2)
    run_dir = tmp_path / "runs" / raw["name"]
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    fit(resume=run_dir, progress=False)
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"] == run_id  # the same MLflow run, continued
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "supervised" and run.data.params["train.iterations"] == "4"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert "val/miou" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} >= {"best.pt", "summary.json"}
