"""The Python API behind the CLI: ``lowlabel.fit(config) -> Run``."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config, dump_config, load_config, load_raw
from .engine.run import Run
from .engine.trainer import Trainer
from .errors import ConfigError
from .utils import atomic_write_json, atomic_write_text

# What a resume may change: the budget and the bookkeeping, nothing that changes the model, the
# data or the optimisation up to the checkpoint. ``name`` and ``out_dir`` are the run's own.
RESUME_MAY_CHANGE = (
    "train.iterations", "train.epochs", "train.val_every", "train.checkpoint_every", "train.log_every",
    "train.grad_norm_every", "train.device", "eval.batch_size",
    "log.tensorboard", "log.mlflow", "log.mlflow_experiment", "log.images",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "params":
            out.update(_flat(v, key + "."))
        elif isinstance(v, dict):  # method.params: compared key by key too
            out.update({f"{key}.{p}": pv for p, pv in v.items()} or {key: v})
        else:
            out[key] = v
    return out


def resume_config(run_dir: Path, config: Config | str | Path | None = None, overrides=()) -> tuple[Config, dict]:
    """The config a resumed run continues with, and what changed (``{key: [old, new]}``).

    The run's saved config, replaced by ``config`` and/or ``overrides`` where given. Only the keys
    in :data:`RESUME_MAY_CHANGE` may differ; any other difference (the full model spec, data,
    method, optimiser...) is refused with the list of differing keys."""
    saved = load_config(run_dir / "config.yaml")
    if config is None:
        new = load_config(raw=saved.model_dump(mode="json"), overrides=overrides)
    elif isinstance(config, Config):
        new = load_config(raw=config.model_dump(mode="json"), overrides=overrides)
    else:
        new = load_config(raw=load_raw(config), overrides=overrides)
    new = new.model_copy(update={"name": saved.name, "out_dir": saved.out_dir})
    old_f, new_f = _flat(saved.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    changed = {k: [old_f.get(k), new_f.get(k)] for k in sorted(set(old_f) | set(new_f)) if old_f.get(k) != new_f.get(k)}
    refused = [k for k in changed if k not in RESUME_MAY_CHANGE]
    if refused:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused[:8])
        raise ConfigError(
            f"{run_dir}: a resumed run keeps its config; these settings differ from the run's: {shown}"
            + (f" and {len(refused) - 8} more" if len(refused) > 8 else "")
            + f". A resume may change only {', '.join(RESUME_MAY_CHANGE)}; start a new run for anything else"
        )
    return new, changed


def _with_auto_reference(cfg: Config, progress: bool) -> Config:
    """``train.reference: auto``: the labeled-only run of this config (method ``supervised`` with
    its labeled loss, no teacher, the same data, model, schedule and seed; ``train.reference_iterations``
    if set), trained first as ``<name>-labeled-only`` beside the run (or reused when a finished one is
    there); the config then names its directory."""
    from .engine.reference import LABELED_ONLY_METHODS

    if cfg.method.name in LABELED_ONLY_METHODS:
        raise ConfigError(f"train.reference=auto: {cfg.method.name} is labeled-only itself; a reference is for a semi-supervised run")
    name = f"{cfg.name}-labeled-only"
    ref_dir = Path(cfg.out_dir) / name
    if not (ref_dir / "summary.json").is_file():
        params = {k: v for k, v in cfg.method.params.items() if k == "labeled_loss"}
        ref = cfg.model_copy(deep=True, update={"name": name})
        ref.method = ref.method.model_copy(update={"name": "supervised", "params": params})
        ref.teacher = ref.teacher.model_copy(update={"kind": "none"})
        ref.train = ref.train.model_copy(update={"reference": None, "iterations": cfg.train.reference_iterations or cfg.train.iterations})
        ref = Config.model_validate(ref.model_dump())
        if (ref_dir / "checkpoints" / "last.pt").is_file():
            Trainer(ref, run_dir=ref_dir, resume=True, progress=progress).fit()
        else:
            Trainer(ref, progress=progress).fit()
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"reference": str(ref_dir)})})


def fit(config: Config | str | Path | None = None, *, resume: str | Path | None = None, overrides=(), progress: bool = True) -> Run:
    """Train a config (a :class:`Config` or a YAML path) and return the :class:`Run`.

    ``resume=RUN_DIR`` continues a stopped run from ``RUN_DIR/checkpoints/last.pt`` with the
    run's own saved config; the result is the same as an uninterrupted run. ``config`` and
    ``overrides`` (``["train.iterations=4000"]``) may then extend the budget or change the
    bookkeeping (:data:`RESUME_MAY_CHANGE`); the change is recorded in ``run.json`` (``resumes``)
    and ``config.yaml``. Any other change is refused.
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg, changed = resume_config(run_dir, config, overrides)
        trainer = Trainer(cfg, run_dir=run_dir, resume=True, progress=progress)
        if changed and trainer.is_main:
            meta_path = run_dir / "run.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            meta.setdefault("resumes", []).append({"iteration": trainer.iteration, "changed": changed})
            atomic_write_json(meta_path, meta)
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    else:
        if config is None:
            raise ValueError("give a config or resume=RUN_DIR")
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        if cfg.train.reference == "auto":
            cfg = _with_auto_reference(cfg, progress)
        trainer = Trainer(cfg, progress=progress)
    trainer.fit()
    return Run.load(trainer.run_dir, device=str(trainer.device))
