"""The one training loop.

Run directory layout::

    <out_dir>/<name>/
      config.yaml               the resolved config
      splits/labeled.txt        the ids actually used
      splits/unlabeled.txt
      metrics.jsonl             one JSON line per logged step and per validation
      checkpoints/last.pt       full state for exact resume (written atomically)
      checkpoints/best.pt       the evaluated model at the best validation score (train.select)
      summary.json              final numbers

Distributed training: launched with ``torchrun``, each process trains on its shard of each
epoch (:class:`~lowlabel.engine.data.Stream`: global batch k is the same images for any number of
processes) under ``torch.nn.parallel.DistributedDataParallel``. DDP wraps :class:`TrainingStep`,
a module whose ``forward`` is the method's training step, so methods keep calling
``encode``/``decode`` directly and DDP's hooks still see every parameter of the student and of
the method's own modules (the teacher is outside it and takes no gradients). Gradients are
averaged in DDP's buckets, overlapped with the backward pass. ``train.sync_bn`` converts the
student's BatchNorm to synchronised BatchNorm (statistics over the global batch, as UniMatch
trains; :mod:`lowlabel.engine.syncbn`, which also runs on the CPU with gloo);
without it each process keeps its own statistics and DDP broadcasts rank 0's buffers every step.
Rank 0 writes the run directory and checkpoints; every rank reads them on resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, dump_config, task_of
from ..data.dataset import DatasetError
from ..errors import CheckpointError, ConfigError, DivergenceError, RunExistsError
from ..data.validate import require_valid, supervision_of
from ..eval.inference import for_eval, sliding_window
from ..eval.metrics import Scores
from ..methods import RunContext, StepContext, build_method, get_method_class
from ..models import build_model
from ..precision import Precision, legacy_precision, resolve_precision
from ..utils import atomic_torch_save, atomic_write_json, atomic_write_text, console, progress_bar, remove_orphan_temps, resolve_device
from .data import Stream, build_sets, resolve_split
from .loggers import Trackers
from .optim import build_optimizer, set_lr
from .syncbn import convert_sync_batchnorm, plain_batchnorm
from .teachers import Teacher

CHECKPOINT_FORMAT = "lowlabel-checkpoint-1"


def read_checkpoint(path: str | Path) -> dict:
    """A lowlabel checkpoint's state, or a :class:`CheckpointError` naming the file and why it is
    not one (missing, empty, truncated, not a PyTorch file, pickled objects, another format).
    Loads with ``weights_only=True``: no code in a checkpoint ever runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        why = "it holds pickled objects, which lowlabel does not load" if "Weights only load failed" in str(err) else "not a PyTorch checkpoint file"
        raise CheckpointError(path, f"not a lowlabel checkpoint: {why}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise CheckpointError(path, f"unreadable checkpoint (truncated or not a PyTorch file: {first})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(path, f"not a lowlabel checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT!r})")
    return state


def model_spec(cfg: Config, num_classes: int) -> dict:
    return {"arch": cfg.model.arch, "encoder": cfg.model.encoder, "width": cfg.model.width, "in_channels": cfg.model.in_channels, "num_classes": num_classes,
            # the architecture's settings, less the weight files it loaded (the checkpoint holds those weights)
            **({"options": {k: v for k, v in cfg.model.options.items() if k != "mspg_weights"}} if cfg.model.options else {})}


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def rng_state() -> dict:
    """All global RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate_model(model, dataset, *, num_classes: int, eval_cfg, device, progress: bool = False, rank: int = 0, world: int = 1,
                   precision: Precision | None = None) -> Scores:
    """Confusion matrices (the split's and, when the ids name volumes, each volume's) of
    ``model`` over a labeled FolderDataset, by sliding-window inference (on images resized whole
    when ``eval_cfg.resize`` is set) in ``precision`` (default: ``eval_cfg.precision`` resolved
    for ``device``). Under DDP each rank scores its share of the images and the matrices are
    summed."""
    was = model.training
    model.eval()
    if precision is None:
        precision = resolve_precision(eval_cfg.precision, device, model=model, setting="eval.precision")
    predictor = for_eval(model, eval_cfg)
    scores = Scores.for_ids(num_classes, dataset.ids)
    n = len(dataset) if eval_cfg.max_images is None else min(len(dataset), eval_cfg.max_images)
    mine = list(range(rank, n, world))
    with progress_bar("evaluating", len(mine), enabled=progress and rank == 0, transient=True) as adv:
        for i in mine:
            raw = dataset.load(i)
            pred = sliding_window(
                predictor, raw["image"], num_classes, tile=eval_cfg.tile, overlap=eval_cfg.overlap,
                weighting=eval_cfg.weighting, batch_size=eval_cfg.batch_size, device=device, precision=precision,
            )
            scores.update(pred.labels, raw["mask"], raw["id"])
            adv()
    if world > 1:
        for t in scores.tensors():
            m = t.to(device)
            dist.all_reduce(m)
            t.copy_(m.cpu())
    model.train(was)
    return scores


class Trainer:
    """Builds everything a config names and runs (or resumes) the loop. Use :func:`lowlabel.fit`."""

    def __init__(self, cfg: Config, *, run_dir: str | Path | None = None, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.distributed = maybe_init_distributed(self.device)
        self.rank, self.world = dist_info()
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.out_dir) / cfg.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        if not resume and (self.ckpt_dir / "last.pt").exists():
            raise RunExistsError(
                f"{self.run_dir} already holds a run; resume it with `lowlabel fit --resume {self.run_dir}` "
                f"or choose another name (--set name=...)"
            )
        d = cfg.data  # every split the run touches, pixels included, before anything is written
        self.info = require_valid(
            d.root, splits=[s for s in (d.train_split, d.val_split, d.test_split) if s],
            extra_split_files=[f for f in (d.labeled, d.unlabeled) if f and f.endswith(".txt")], read_pixels=True,
            bands=d.bands, value_range=d.value_range,
        )
        if self.info.task not in ("semantic", "instance"):
            raise DatasetError(cfg.data.root, f"task {self.info.task!r} cannot be trained by `fit`")
        self.task = task_of(cfg)
        if self.info.task == "instance" and self.task != "instance":
            if self.is_main:
                console().print(f"[yellow]note[/]: {self.info.name} is an instance dataset; {cfg.model.arch} trains it as foreground/background "
                                "semantic segmentation (model.arch: maskrcnn trains instances)")
        if self.task == "instance" and self.info.task != "instance":
            raise ConfigError(f"model.arch {cfg.model.arch!r} is an instance model; {cfg.data.root} is a {self.info.task} dataset (instances/ maps needed)")
        if self.task == "instance" and self.info.num_classes != 1:
            raise DatasetError(cfg.data.root, f"instance training supports one class for now (instances/ maps carry no class); this dataset has {self.info.num_classes}")
        self.select = "ap" if self.task == "instance" and cfg.train.select == "miou" else cfg.train.select
        if (self.select in ("ap", "ap50")) != (self.task == "instance"):
            raise ConfigError(f"train.select {cfg.train.select!r} is a metric of the {'instance' if self.select in ('ap', 'ap50') else 'semantic'} task; this is a {self.task} run")
        self.num_classes = self.info.num_classes
        mcls = get_method_class(cfg.method.name, self.task)
        if mcls.needs_weak and not cfg.data.weak:
            raise ConfigError(f"method {cfg.method.name!r} trains on weak labels: set data.weak (this dataset has {sorted(self.info.weak_labels) or 'none'})")
        seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # what the run trains on (weak or dense labels, unlabeled images), with one-line errors for bad combinations
        lab_ids, unl_ids = resolve_split(cfg.data)
        self.supervision = supervision_of(self.info, lab_ids, unl_ids if mcls.uses_unlabeled else [], cfg.data.weak, cfg.data.case_pattern)
        self.labeled_set, self.unlabeled_set = build_sets(cfg.data, mcls.n_strong, cfg.train.seed, mcls.uses_unlabeled,
                                                          labeled_strong=mcls.labeled_strong, coords=mcls.needs_coords)
        pin = self.device.type == "cuda"
        self.lab_stream = Stream(self.labeled_set, cfg.data.labeled_batch, seed=cfg.train.seed, workers=cfg.data.workers, rank=self.rank, world=self.world, pin=pin)
        self.unl_stream = (
            Stream(self.unlabeled_set, cfg.data.unlabeled_batch, seed=cfg.train.seed + 1, workers=cfg.data.workers, rank=self.rank, world=self.world, pin=pin)
            if self.unlabeled_set is not None else None
        )
        self.iters_per_epoch = (self.unl_stream or self.lab_stream).batches_per_epoch
        self.total = cfg.train.iterations or cfg.train.epochs * self.iters_per_epoch
        self.total_epochs = math.ceil(self.total / self.iters_per_epoch)

        self.student = build_model(cfg.model.arch, cfg.model.encoder, self.num_classes, cfg.model.pretrained, cfg.model.width, cfg.model.in_channels, cfg.model.options).to(self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device, channels_last=cfg.train.channels_last, model=self.student, setting="train.precision")
        self.precision.prepare(self.student)  # before the teacher copies it
        side = getattr(self.student, "img_size", None)  # a fixed-size encoder (SSR-SAM's): crops and eval windows must fit it
        window = ("eval.resize", cfg.eval.resize) if cfg.eval.resize else ("eval.tile", cfg.eval.tile)  # with eval.resize the model sees that size
        for key, value in (("data.crop", cfg.data.crop), window):
            if side and value > side:
                raise ConfigError(f"{key}={value} exceeds the {cfg.model.arch} encoder's input side {side} (model.options.img_size): set {key} <= {side}")
        if cfg.train.sync_bn:  # same parameters and buffers, so checkpoints load either way
            self.student = convert_sync_batchnorm(self.student, self.device)
        self.method = build_method(cfg.method.name, cfg.method.params, num_classes=self.num_classes, model=self.student, task=self.task).to(self.device)
        kind = cfg.teacher.kind
        self.teacher = Teacher(kind, self.student, cfg.teacher.decay, warmup=not cfg.model.pretrained)  # trained weights: no EMA warm-up
        if cfg.train.sync_bn and not self.teacher.is_student:
            self.teacher.model = plain_batchnorm(self.teacher.model)
        if mcls.needs_run:
            self.method.attach(RunContext(self.labeled_set, self.run_dir, self.device, cfg.eval, cfg.train.seed, kind))
        self.optimizer = build_optimizer(cfg.optim, self.student, self.method)
        self.scaler = self._scaler()
        self.step_module = TrainingStep(self.student, self.method, self.teacher)
        if self.world > 1:  # DDP broadcasts rank 0's weights and buffers at construction
            unused = cfg.train.find_unused_parameters
            self.find_unused = getattr(mcls, "ddp_find_unused_parameters", True) if unused == "auto" else bool(unused)
            self.step_module = torch.nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=self.find_unused,
            )
            if not self.teacher.is_student:
                self.teacher.model.load_state_dict(self.student.state_dict())
        self.val_set = None
        if cfg.data.val_split:
            from ..data.dataset import FolderDataset

            self.val_set = FolderDataset(cfg.data.root, cfg.data.val_split, labeled=True, info=self.info, bands=cfg.data.bands, value_range=cfg.data.value_range)
        self.iteration = 0
        # training wall time (validation included) of the iterations since ``_timed_from``: carried
        # in last.pt so a resumed run's summary covers every segment (older checkpoints lack it)
        self.trained_seconds, self._timed_from, self._t_start = 0.0, 0, None
        self.best = {"value": -1.0, "iteration": None, "metrics": None}
        self._evaluated = None  # (iteration, network) of the last evaluation_model()
        if resume:
            if self.is_main:
                remove_orphan_temps(self.run_dir, self.ckpt_dir, self.run_dir / "splits")
            self._load(self.ckpt_dir / "last.pt")
        elif self.is_main:
            self._prepare_run_dir()
        self.trackers = self._trackers()
        self.reference = None
        if cfg.train.reference and self.val_set is not None and cfg.train.val_every:
            from .reference import Reference

            self.reference = Reference.load(cfg.train.reference, select=self.select, dataset=self.info.name, labeled_ids=list(self.labeled_set.ids),
                                            val_split=cfg.data.val_split)
        elif cfg.train.reference:
            raise ConfigError(f"train.reference={cfg.train.reference}: the comparison is made at each validation; "
                              "set data.val_split and train.val_every > 0")
        # validation: eval.precision, or with auto the training's precision (lowlabel.config.eval_precision)
        self.eval_precision = resolve_precision(cfg.eval.precision if cfg.eval.precision != "auto" else self.precision.name, self.device,
                                                channels_last=self.precision.channels_last, setting="eval.precision")

    def _trackers(self) -> Trackers:
        """TensorBoard / MLflow (``log``) on rank 0; a resumed run continues its MLflow run."""
        if not self.is_main or not (self.cfg.log.tensorboard or self.cfg.log.mlflow):
            return Trackers(self.cfg, self.run_dir, enabled=False)
        meta_path = self.run_dir / "run.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        tr = Trackers(self.cfg, self.run_dir, mlflow_run_id=meta.get("mlflow_run_id") if self.cfg.log.mlflow == meta.get("mlflow_uri") else None)
        if tr.mlflow_run_id and tr.mlflow_run_id != meta.get("mlflow_run_id"):
            atomic_write_json(meta_path, {**meta, "mlflow_uri": self.cfg.log.mlflow, "mlflow_run_id": tr.mlflow_run_id})
        return tr

    def _overlays(self) -> list[tuple[str, np.ndarray]]:
        """The evaluated model's prediction blended over the first ``log.images`` validation images
        (TensorBoard's images; nothing when TensorBoard is off)."""
        if self.trackers.tb is None or self.val_set is None or self.task != "semantic" or not self.cfg.log.images:
            return []
        from ..data.dataset import as_rgb

        pal = np.array([list(c) for c in self.info.palette] + [[0, 0, 0]] * 256, dtype=np.float32)[:256]
        out = []
        predictor = for_eval(self.eval_model(), self.cfg.eval)
        for i in range(min(self.cfg.log.images, len(self.val_set))):
            raw = self.val_set.load(i)
            e = self.cfg.eval
            pred = sliding_window(predictor, raw["image"], self.num_classes, tile=e.tile, overlap=e.overlap, weighting=e.weighting,
                                  batch_size=e.batch_size, device=self.device, precision=self.eval_precision)
            img = as_rgb(raw["image"])  # uint8 [H, W, C] as the dataset reads it
            out.append((str(raw["id"]), (img * 0.5 + pal[pred.labels] * 0.5).clip(0, 255).astype(np.uint8)))
        return out

    def _scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op)."""
        return torch.amp.GradScaler("cuda", enabled=self.precision.name == "fp16")

    # ----------------------------------------------------------------- files
    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
        atomic_write_text(self.run_dir / "splits" / "labeled.txt", "".join(f"{i}\n" for i in self.labeled_set.ids))
        if self.unlabeled_set is not None:
            atomic_write_text(self.run_dir / "splits" / "unlabeled.txt", "".join(f"{i}\n" for i in self.unlabeled_set.ids))
        atomic_write_json(self.run_dir / "run.json", {
            "format": CHECKPOINT_FORMAT, "name": self.cfg.name, "dataset": self.info.name,
            "classes": list(self.info.classes), "palette": [list(c) for c in self.info.palette],
            "model": model_spec(self.cfg, self.num_classes), "method": self.cfg.method.name,
            "precision": self.precision.record(), "world_size": self.world,
            **({"sync_bn": self.cfg.train.sync_bn, "find_unused_parameters": self.find_unused} if self.world > 1 else {}),
        })
        (self.run_dir / "metrics.jsonl").write_text("")

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _dataset_meta(self) -> dict:
        return {"name": self.info.name, "root": str(self.cfg.data.root), "classes": list(self.info.classes), "palette": [list(c) for c in self.info.palette]}

    def bn_batches(self) -> list[torch.Tensor]:
        """``teacher.bn_batches`` training image batches (labeled + weak unlabeled views) from
        this iteration on, for recomputing an averaged network's BatchNorm statistics. Streams
        are pure functions of the batch index, so this draws nothing from the training streams
        and resuming stays exact."""
        n = self.cfg.teacher.bn_batches
        lab = self.lab_stream.batches(self.iteration)
        unl = self.unl_stream.batches(self.iteration) if self.unl_stream else None
        out = []
        for _ in range(n):
            imgs = [next(lab)["image"]] + ([next(unl)["image"]] if unl is not None else [])
            out.append(torch.cat(imgs).to(self.device))
        return out

    def eval_model(self):
        """The network evaluated and saved as the run's model (cached for this iteration)."""
        if not self.teacher.evaluates:
            return self.student
        if self._evaluated is None or self._evaluated[0] != self.iteration:
            bn = self.bn_batches() if self.teacher.kind == "ema" else None
            self._evaluated = (self.iteration, self.teacher.evaluation_model(bn))
        return self._evaluated[1]

    def _save(self, name: str) -> None:
        if not self.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "model_spec": model_spec(self.cfg, self.num_classes),
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "precision": self.precision.record(),
            "rng": rng_state(),
            "best": dict(self.best),
            "config": self.cfg.model_dump(mode="json"),
            "dataset": self._dataset_meta(),
            "evaluated": "teacher" if self.teacher.evaluates else "student",
            "trained_seconds": self._seconds(), "timed_from": self._timed_from,
        }
        atomic_torch_save(state, self.ckpt_dir / name)

    def _seconds(self) -> float:
        """Training wall time of iterations ``_timed_from`` .. now, over all segments of the run."""
        return round(self.trained_seconds if self._t_start is None else time.time() - self._t_start, 3)

    def _save_best(self, metrics: dict) -> None:
        if not self.is_main:
            return
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "iteration": self.iteration, "model_spec": model_spec(self.cfg, self.num_classes),
            "weights": self.eval_model().state_dict(), "metrics": metrics,
            "config": self.cfg.model_dump(mode="json"), "dataset": self._dataset_meta(),
        }, self.ckpt_dir / "best.pt")

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(path, "no checkpoint to resume from")
        state = read_checkpoint(path)
        check_compatible(state, model_spec(self.cfg, self.num_classes), path)
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._resume_precision(state, path)
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        if "trained_seconds" in state:
            self.trained_seconds, self._timed_from = float(state["trained_seconds"]), int(state["timed_from"])
        else:  # an older checkpoint carries no time: count from here
            self._timed_from = self.iteration
        if self.total < self.iteration:
            raise ConfigError(f"{path}: train.iterations={self.total} is below the {self.iteration} iterations this run has trained; a resume can only extend it")
        self.best = state["best"]
        if "miou" in self.best:  # checkpoints of lowlabel < 0.2 selected on mIoU
            self.best = {"value": self.best["miou"], "iteration": self.best["iteration"], "metrics": None}
        if self.is_main:  # drop history written after the checkpoint
            log = self.run_dir / "metrics.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            keep = [ln for ln in lines if json.loads(ln).get("iteration", 0) <= self.iteration]
            atomic_write_text(log, "".join(ln + "\n" for ln in keep))

    def _resume_precision(self, state: dict, path: Path) -> None:
        """A resumed run keeps the precision it trained in: with ``train.precision: auto`` the
        checkpoint's (a checkpoint from before ``train.precision``: fp16 on CUDA with amp, else
        fp32); an explicit setting that differs wins, with a note."""
        saved = state.get("precision")
        name = saved["name"] if saved else legacy_precision(self.device.type, (state.get("config") or {}).get("train", {}).get("amp", "auto"))
        if name == self.precision.name:
            return
        con = console()
        if self.cfg.train.precision != "auto":
            if self.is_main:
                con.print(f"[yellow]note[/]: {path} trained in {name}; resuming in {self.precision.name} as train.precision asks")
            return
        try:
            resolved = resolve_precision(name, self.device, channels_last=self.cfg.train.channels_last, model=self.student, setting="train.precision")
        except ConfigError as err:  # e.g. an fp16 run resumed on a CPU
            if self.is_main:
                con.print(f"[yellow]note[/]: {path} trained in {name}, which this device cannot run ({err}); resuming in {self.precision.name}")
            return
        self.precision = dataclasses.replace(resolved, requested="auto", reason=f"resumed: {path.name} trained in {name}")
        self.precision.prepare(self.student)
        self.scaler = self._scaler()
        if self.is_main:
            meta = json.loads((self.run_dir / "run.json").read_text()) if (self.run_dir / "run.json").is_file() else {}
            atomic_write_json(self.run_dir / "run.json", {**meta, "precision": self.precision.record()})

    # ------------------------------------------------------------------ loop
    def _to_device(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        nb = self.device.type == "cuda"
        return {k: (self.precision.images(v.to(self.device, non_blocking=nb)) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _ctx(self) -> StepContext:
        return StepContext(self.iteration, self.total, self.iteration // self.iters_per_epoch, self.total_epochs, self.num_classes)

    def validate(self) -> dict | None:
        if self.val_set is None:
            return None
        if self.task == "instance":  # every rank scores the whole split (no gather of instances)
            from ..eval.instances import evaluate_instances

            return evaluate_instances(self.eval_model(), self.val_set, eval_cfg=self.cfg.eval, device=self.device, precision=self.eval_precision)
        scores = evaluate_model(self.eval_model(), self.val_set, num_classes=self.num_classes, eval_cfg=self.cfg.eval, device=self.device, rank=self.rank, world=self.world,
                                precision=self.eval_precision)
        return scores.summary(self.info.classes)

    def grad_norms(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The L2 norm of each weighted loss term's gradient on the encoder's parameters
        (``gn_<term>``): which term drives the shared features, e.g. when a run collapses."""
        params = [p for p in self.student.encoder.parameters() if p.requires_grad]
        out = {}
        for name, t in terms.items():
            if not t.requires_grad:
                continue
            grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
            out[f"gn_{name}"] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + 0.0))
        return out

    def step(self, lab: dict, unl: dict | None) -> dict:
        cfg = self.cfg
        lr = set_lr(self.optimizer, cfg.optim, self.iteration, self.total)
        self.student.train()
        self.method.train()
        with self.precision.autocast():
            out = self.step_module(lab, unl, self._ctx())
        loss = out.losses["loss"]
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"loss is {loss.detach().item()} at iteration {self.iteration} ({ {k: float(v.detach()) for k, v in out.losses.items()} }); "
                "lower optim.lr or check the labels"
            )
        every = cfg.train.grad_norm_every
        norms = self.grad_norms(out.terms) if every and (self.iteration + 1) % every == 0 and out.terms else {}  # logged with step iteration + 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # under DDP: gradients averaged over the ranks here
        if cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.teacher.after_step(self.student)
        rec = {k: float(v.detach()) for k, v in out.losses.items()}
        rec.update(out.metrics)
        rec.update(norms)
        rec["lr"] = lr
        return rec

    def fit(self, stop_at: int | None = None) -> dict:
        """Train to the end (or until iteration ``stop_at``, saving a checkpoint there, as an
        interrupted run would have) and return the summary."""
        cfg = self.cfg
        end = self.total if stop_at is None else min(stop_at, self.total)
        lab_it = self.lab_stream.batches(self.iteration)
        unl_it = self.unl_stream.batches(self.iteration) if self.unl_stream else None
        con = console()
        if self.is_main and self.iteration == 0:
            sup = cfg.data.weak or cfg.data.case_pattern  # weak runs (and runs counting cases) name their supervision
            con.print(
                f"[bold]{cfg.name}[/]: {cfg.method.name} on {self.info.name} — "
                + (self.supervision.line() if sup else f"{len(self.labeled_set)} labeled"
                   + (f", {len(self.unlabeled_set)} unlabeled" if self.unlabeled_set is not None else ""))
                + f"; {self.student.arch}/{self.student.encoder_name}; {self.total} iterations on {self.device}"
                + (f" x {self.world} processes" if self.world > 1 else "")
                + f"; precision {self.precision.describe()}"
            )
        self._t_start = time.time() - self.trained_seconds
        start_iter = self.iteration
        last_val = None
        running: dict[str, float] = {}
        with progress_bar(cfg.name, self.total, enabled=self.progress) as adv:
            adv(self.iteration)
            while self.iteration < end:
                lab = self._to_device(next(lab_it))
                unl = self._to_device(next(unl_it)) if unl_it is not None else None
                rec = self.step(lab, unl)
                self.iteration += 1
                for k, v in rec.items():
                    running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
                epoch_end = self.iteration % self.iters_per_epoch == 0
                if epoch_end or self.iteration == self.total:  # a last, partial epoch is averaged too
                    bn = self.bn_batches() if self.teacher.kind == "epoch_momentum" else None
                    self.teacher.after_epoch(self.student, bn)
                if epoch_end:
                    self.method.on_epoch_end(self.iteration // self.iters_per_epoch - 1, self._ctx())
                if self.iteration % cfg.train.log_every == 0 or self.iteration == self.total:
                    self._log({"iteration": self.iteration, "time": self._seconds(), **{k: round(v, 6) for k, v in rec.items()}})
                    self.trackers.train(self.iteration, rec)
                shown = "AP" if self.task == "instance" else "mIoU"
                info = f"loss {running['loss']:.3f} lr {rec['lr']:.2e}" + (f" val {shown} {100 * last_val:.1f}" if last_val is not None else "")
                if self.select not in ("miou", "ap") and self.best["metrics"]:
                    info += f" best val {self.select} {100 * self.best['value']:.1f}"
                if self.reference is not None and self.best["metrics"]:
                    info += f" ({self.reference.line(self.best['value'])})"
                adv(1, info=info)
                if cfg.train.val_every and (self.iteration % cfg.train.val_every == 0 or self.iteration == self.total):
                    metrics = self.validate()
                    if metrics is not None:
                        last_val = metrics.get("ap" if self.task == "instance" else "miou") or 0.0
                        score = metrics.get(self.select) or 0.0
                        self._log({"iteration": self.iteration, "val": metrics,
                                   **({"vs_reference": round(score - self.reference.best, 6)} if self.reference is not None else {})})
                        if self.trackers.active:
                            self.trackers.validation(self.iteration, metrics, self._overlays())
                        if score > self.best["value"]:
                            self.best = {"value": score, "iteration": self.iteration, "metrics": metrics}
                            self._save_best(metrics)
                if self.iteration % cfg.train.checkpoint_every == 0 or self.iteration in (self.total, end):
                    self._save("last.pt")
        elapsed = self.trained_seconds = self._seconds()
        self._t_start = None
        timed = max(1, self.iteration - self._timed_from)
        if self.val_set is None or not cfg.train.val_every:  # no validation: the final model is the "best"
            self._save_best({})
        summary = {
            "iterations": self.total, "trained_iterations": self.iteration - start_iter,
            "seconds": round(elapsed, 2), "timed_iterations": timed, "seconds_per_iteration": round(elapsed / timed, 4),
            "select": self.select, "best_val": self.best["value"] if self.best["value"] >= 0 else None,
            "best_val_miou": (self.best["metrics"] or {}).get("miou", self.best["value"] if self.select == "miou" and self.best["value"] >= 0 else None),
            "best_val_ap": (self.best["metrics"] or {}).get("ap") if self.task == "instance" else None,
            "best_val_dice_mean": (self.best["metrics"] or {}).get("dice_mean"),
            "best_iteration": self.best["iteration"],
            "last_val_miou": None if self.task == "instance" else last_val, **({"last_val_ap": last_val} if self.task == "instance" else {}), "device": str(self.device), "world_size": self.world,
            "precision": self.precision.name, "channels_last": self.precision.channels_last,
            "supervision": self.supervision.record(),
            **({"reference": self.reference.record(self.best["value"])} if self.reference is not None else {}),
        }
        if self.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
            self.trackers.close(finished=self.iteration >= self.total)
            from rich.table import Table

            t = Table(title=f"{cfg.name}: done")
            t.add_column("")
            t.add_column("", justify="right")
            for k, v in summary.items():
                if k != "reference":
                    t.add_row(k, f"{v:.4f}" if isinstance(v, float) else v["text"] if k == "supervision" else str(v))
            con.print(t)
            if self.reference is not None:
                from rich.markup import escape

                con.print(("[bold green]" if summary["reference"]["helped"] else "[bold yellow]") + escape(summary["reference"]["message"]) + "[/]", highlight=False)
        if self.distributed and self.iteration >= self.total:  # the group this trainer opened: close it, or gloo's
            dist.barrier()  # threads may abort the process at exit ("terminate called without an active exception")
            dist.destroy_process_group()
            self.distributed = False
        return summary


class TrainingStep(torch.nn.Module):
    """The method's training step as a module (the student and the method's own modules are its
    submodules, the teacher is not): what DDP wraps, so its forward hooks run around the step."""

    def __init__(self, student: torch.nn.Module, method: torch.nn.Module, teacher: Teacher):
        super().__init__()
        self.student, self.method = student, method
        self.__dict__["teacher"] = teacher  # not a submodule: no gradients, not synchronised

    def forward(self, labeled: dict, unlabeled: dict | None, ctx: StepContext):
        return self.method.training_step(self.student, self.teacher, labeled, unlabeled, ctx)


def check_compatible(state: dict, spec: dict, path) -> None:
    """Clear errors for a checkpoint of another architecture or class count."""
    have = state["model_spec"]
    if have["num_classes"] != spec["num_classes"]:
        raise CheckpointError(path, f"checkpoint has {have['num_classes']} classes, the dataset/config {spec['num_classes']}")
    for k in ("arch", "encoder"):
        if have[k] != spec[k]:
            raise CheckpointError(path, f"checkpoint is {have['arch']}/{have['encoder']}, the config asks for {spec['arch']}/{spec['encoder']}")
