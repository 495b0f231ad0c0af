"""The Python API behind the CLI: ``lowlabel.fit(config) -> Run``."""

from __future__ import annotations

from pathlib import Path

from .config import Config, load_config
from .engine.run import Run
from .engine.trainer import Trainer


def fit(config: Config | str | Path | None = None, *, resume: str | Path | None = None, progress: bool = True) -> Run:
    """Train a config (a :class:`Config` or a YAML path) and return the :class:`Run`.

    ``resume=RUN_DIR`` continues a stopped run from ``RUN_DIR/checkpoints/last.pt`` with the
    run's own saved config (``config`` may then be omitted); the result is the same as an
    uninterrupted run.
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml")
        trainer = Trainer(cfg, run_dir=run_dir, resume=True, progress=progress)
    else:
        if config is None:
            raise ValueError("give a config or resume=RUN_DIR")
        cfg = config if isinstance(config, Config) else load_config(config)
        trainer = Trainer(cfg, progress=progress)
    trainer.fit()
    return Run.load(trainer.run_dir, device=str(trainer.device))
