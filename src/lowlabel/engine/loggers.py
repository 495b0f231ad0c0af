"""Optional experiment trackers beside ``metrics.jsonl`` (which stays the source of truth):
TensorBoard event files and MLflow runs.

    log: {tensorboard: true}                    # <run_dir>/tensorboard/ event files
    log: {mlflow: file:///path/to/mlruns}       # or an http(s) tracking server
    log: {mlflow: ..., mlflow_experiment: acdc}

TensorBoard gets every logged training value (losses, lr, pseudo-label accuracy, gradient
norms) as ``train/<name>``, the numeric validation scores as ``val/<name>`` (per-class ones as
``val/<metric>/<class>``) and, at each validation, overlays of the run's prediction on the first
``log.images`` validation images. MLflow gets the flattened config as parameters, the same
metrics (names sanitised to MLflow's characters) and, at the end, ``checkpoints/best.pt`` and
``summary.json`` as artifacts; a resumed run continues its MLflow run (the id is kept in
``run.json``). Only rank 0 logs. Both packages are optional extras (``lowlabel[log]``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict as ``a/b/c`` keys (None and non-numbers left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_numbers(v, key + "/"))
        elif isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and np.isfinite(v):
            out[key] = float(v)
    return out


def flat_params(d: dict, prefix: str = "") -> dict:
    """Every leaf of a nested dict as ``a.b.c`` keys (a config as MLflow parameters)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


class Trackers:
    """The trackers a run's ``log`` config asks for (none: every call is a no-op)."""

    def __init__(self, cfg, run_dir: Path, *, enabled: bool = True, mlflow_run_id: str | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.tb = self.mlflow = None
        self.mlflow_run_id = None
        if not enabled:
            return
        log = cfg.log
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("log.tensorboard needs the tensorboard package: pip install 'lowlabel[log]'") from None
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if log.mlflow:
            try:
                import mlflow
            except ImportError:
                raise ImportError("log.mlflow needs the mlflow package: pip install 'lowlabel[log]'") from None
            mlflow.set_tracking_uri(log.mlflow)
            mlflow.set_experiment(log.mlflow_experiment)
            run = mlflow.start_run(run_id=mlflow_run_id, run_name=None if mlflow_run_id else cfg.name)
            self.mlflow, self.mlflow_run_id = mlflow, run.info.run_id
            if not mlflow_run_id:
                params = {_mlflow_key(k): str(v)[:500] for k, v in flat_params(cfg.model_dump(mode="json")).items()}
                items = sorted(params.items())
                for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
                    mlflow.log_params(dict(items[i : i + 100]))

    @property
    def active(self) -> bool:
        return self.tb is not None or self.mlflow is not None

    def train(self, iteration: int, record: dict) -> None:
        values = flat_numbers(record)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, iteration)
        if self.mlflow is not None:
            self.mlflow.log_metrics({_mlflow_key(f"train/{k}"): v for k, v in values.items()}, step=iteration)

    def validation(self, iteration: int, metrics: dict, overlays: list[tuple[str, np.ndarray]] = ()) -> None:
        values = flat_numbers(metrics)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"val/{k}", v, iteration)
            for name, img in overlays:
                self.tb.add_image(f"val_overlay/{name}", img, iteration, dataformats="HWC")
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({_mlflow_key(f"val/{k}"): v for k, v in values.items()}, step=iteration)

    def close(self, *, finished: bool) -> None:
        """Flush and close; a finished run also sends its best checkpoint and summary to MLflow."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            if finished:
                for f in (self.run_dir / "checkpoints" / "best.pt", self.run_dir / "summary.json"):
                    if f.is_file():
                        self.mlflow.log_artifact(str(f))
            self.mlflow.end_run("FINISHED" if finished else "KILLED")
            self.mlflow = None
