"""Typed configuration: the pydantic models are the schema and hold the defaults.

A YAML file is complete and flat; it may name one ``base:`` file (one level only) whose values
it overrides section by section. ``--set a.b=value`` overrides apply last (``value`` is parsed
as YAML, so ``--set optim.lr=0.01`` gives a float and ``--set data.labeled=1/8`` a string).
Relative paths in a file are resolved against the current directory first, then against the
file's own folder.
"""

from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    root: str = Field(description="folder dataset (dataset.json, images/, masks/, splits/)")
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str | None = "test"
    labeled: str = Field("1", description="labeled part of the train split: a fraction ('1/8', '0.125'; '1' = all), a count (46), or a labeled.txt path")
    unlabeled: str | None = Field(None, description="unlabeled.txt path; default: the rest of the train split")
    split_seed: int = 0
    weak: str | None = Field(None, description="train on these weak labels instead of masks/ (a name in dataset.json's weak_labels, e.g. 'scribbles', 'refined')")
    weak_confidence: Literal["none", "weight", "ignore"] = Field("none", description="with weak labels that have confidence maps (refine's): per-pixel loss weight, or ignore pixels below min_confidence")
    min_confidence: float = Field(0.5, ge=0.0, le=1.0, description="data.weak_confidence=ignore: pixels below this confidence are ignored")
    bands: list[int] | None = Field(None, description="1-based raster bands in the order the network sees them, e.g. [3, 2, 1] (read by rasterio, the geo extra); one band is seen as grey, three as RGB, any other number as that many channels (set model.in_channels to it; put the RGB bands first: photometric augmentation treats the first three as colour); None: the image as PIL reads it, in RGB")
    value_range: tuple[float, float] | None = Field(None, description="with bands: the (low, high) raw values mapped to 0..255 for 16-bit / float rasters; None: each image's 2-98 percentiles")
    crop: int = 256
    window: bool = Field(False, description="read each training image through a random window of ceil(crop / scale[0]) pixels (the largest extent one crop can cover) instead of decoding it whole: rasters (GeoTIFF, COG, JPEG 2000, VRT) read only that window; for huge images. Not with resize or base_size")
    scale: tuple[float, float] = (0.5, 2.0)  # UniMatch: random rescale ratio range
    base_size: int | None = Field(None, description="long side before rescale; None keeps the image size")
    resize: bool = Field(False, description="resize each image whole to crop x crop instead of rescale + crop (UniMatch's medical recipe)")
    rotate: Literal["none", "medical"] = Field("none", description="'medical': random rot90 + flip or a rotation of up to 20 degrees (UniMatch's ACDC recipe), instead of the horizontal flip")
    case_pattern: str | None = Field(None, description="a regular expression whose first group names an image's case (ACDC: '^(patient\\d+)_'): the run's supervision line (printed header, summary.json) counts cases as well as images")
    unlabeled_gt: bool = Field(False, description="load the dense masks of unlabeled (and, with data.weak, weakly labeled) images to log pseudo-label accuracy (never used in losses)")
    labeled_batch: int = Field(4, ge=1)
    unlabeled_batch: int = Field(4, ge=1)
    workers: int = Field(0, ge=0)

    @field_validator("labeled", mode="before")
    @classmethod
    def _labeled(cls, v):
        """A count or fraction written as a YAML number (``labeled: 46``, ``0.125``) is read as
        the string form; anything else must be a count, a fraction or a ``.txt`` file."""
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError(f"give a count (46), a fraction ('1/8', 0.125) or a labeled.txt path, got {v!r}")
        text = str(v).strip()
        if text.endswith(".txt"):
            return text
        try:
            num = float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{text!r} is not a count (46), a fraction ('1/8', 0.125) or a labeled.txt path") from None
        if num <= 0 or (num > 1 and num != int(num)):
            raise ValueError(f"{text!r}: a fraction must be in (0, 1], a count a whole number >= 1")
        return text

    @field_validator("case_pattern")
    @classmethod
    def _case_pattern(cls, v):
        if v is None:
            return v
        import re

        try:
            pat = re.compile(v)
        except re.error as err:
            raise ValueError(f"{v!r} is not a regular expression ({err})") from None
        if pat.groups < 1:
            raise ValueError(f"{v!r} needs a group naming the case, e.g. '^(patient\\d+)_'")
        return v

    @field_validator("bands")
    @classmethod
    def _bands(cls, v):
        if v is not None and (not v or any(b < 1 for b in v)):
            raise ValueError(f"give band numbers counted from 1, e.g. [3, 2, 1] or [1, 2, 3, 4], got {v}")
        return v

    @field_validator("crop")
    @classmethod
    def _crop(cls, v):
        if v < 32 or v % 32:
            raise ValueError(f"crop must be a positive multiple of 32, got {v}")
        return v


class ModelConfig(_Strict):
    arch: str = "deeplabv3plus"
    encoder: str = "resnet18"
    pretrained: str | None = Field(None, description="local weights file (never downloaded)")
    width: int = Field(16, ge=1)  # only for the own archs: 'tiny' and 'unet2d' (first level's channels)
    in_channels: int = Field(3, ge=1, le=64, description="3: RGB; 1: grey data (the network sees the mean of the channels); any other number: multi-band rasters, one channel per band of data.bands (e.g. 4 for RGB + NIR)")
    options: dict[str, Any] = Field(default_factory=dict, description="the architecture's own settings (arch ssr-sam: lowlabel.models.ssr_sam.SSRSAMOptions; maskrcnn: lowlabel.models.instance.InstanceOptions)")


class MethodConfig(_Strict):
    name: str = "supervised"
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own hyper-parameters; defaults follow its paper")


class TeacherConfig(_Strict):
    kind: Literal["none", "ema", "self", "epoch_momentum"] = "none"
    decay: float = Field(0.999, ge=0.0, le=1.0)  # EMA decay (Mean Teacher / FixMatch-style teachers)
    bn_batches: int = Field(10, ge=1, description="training batches that recompute an averaged network's BatchNorm statistics")


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.005, gt=0.0)  # UniMatch (Pascal): 0.001 x 16 / batch; CPU configs set their own
    head_lr_mult: float = 10.0  # UniMatch: decoder/head at 10x the backbone rate
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    power: float = 0.9  # poly exponent (DeepLab, UniMatch)
    warmup_iters: int = 0
    warmup_ratio: float = 0.1  # lr starts at warmup_ratio * lr and rises linearly
    grad_clip: float | None = None


class TrainConfig(_Strict):
    iterations: int | None = Field(2000, ge=1, description="total optimiser steps (None: epochs x iterations per epoch)")
    epochs: int | None = Field(None, ge=1)
    val_every: int = Field(200, ge=0, description="validate every N steps and at the end (0: never; the final model is the run's model)")
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="numeric precision of the training step: auto = bf16 where the device runs it natively (a CPU with amx_bf16 / avx512_bf16, a CUDA GPU with bf16), else fp32; fp16 (with a GradScaler) on CUDA only. Losses, thresholded confidences, BN statistics and teacher averages stay fp32 (lowlabel.precision)")
    channels_last: bool | Literal["auto"] = Field("auto", description="channels_last memory format for the model and its batches (training, evaluation, prediction); auto: where the model class says it pays (the convolutional segmenters)")
    amp: bool | Literal["auto"] | None = Field(None, description="replaced by train.precision; 'auto' (the old default) is accepted and ignored")
    sync_bn: bool = Field(False, description="under torchrun: synchronised BatchNorm, statistics over the global batch (UniMatch trains so; torch's SyncBatchNorm on CUDA, lowlabel.engine.syncbn on the CPU with gloo); without it each process keeps its own")
    find_unused_parameters: bool | Literal["auto"] = Field("auto", description="DistributedDataParallel's find_unused_parameters; auto: what the method declares (ddp_find_unused_parameters; True unless it uses every parameter every step)")
    seed: int = 0
    deterministic: bool = False
    select: Literal["miou", "dice_mean", "ap", "ap50"] = Field("miou", description="validation metric that picks the best checkpoint (miou / dice_mean: semantic runs; ap / ap50: instance runs, where the default miou means ap)")
    grad_norm_every: int = Field(0, ge=0, description="every N steps, log the encoder gradient norm of each weighted loss term (0: off)")
    reference: str | None = Field(None, description="a labeled-only run directory (method supervised) of the same dataset, labeled set and validation split, or auto (train that run first, as <name>-labeled-only): every validation says whether this run is above its best validation score, and summary.json whether semi-supervision helped and which model to keep (lowlabel.engine.reference)")
    reference_iterations: int | None = Field(None, ge=1, description="with train.reference auto: the labeled-only run's iterations (default: train.iterations)")

    @field_validator("amp")
    @classmethod
    def _amp_moved(cls, v):
        if isinstance(v, bool):
            raise ValueError(f"train.amp was replaced by train.precision (auto | fp32 | bf16 | fp16): for amp: {str(v).lower()} set "
                             + ("precision: fp16 (CUDA's float16 autocast, as amp: true was) or auto" if v else "precision: fp32"))
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.iterations is None and self.epochs is None:
            raise ValueError("set train.iterations or train.epochs")
        return self


class EvalConfig(_Strict):
    tile: int = Field(512, ge=32)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    weighting: Literal["gaussian", "uniform"] = "gaussian"
    batch_size: int = Field(4, ge=1)
    max_images: int | None = Field(None, ge=1)
    resize: int | None = Field(None, description="predict on each image resized whole to this size, scores resized back (set it to data.crop when data.resize is on)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="numeric precision of evaluation and prediction: auto = train.precision when that is set, else the device's fast precision (see train.precision); scores are stitched in fp32")


class LogConfig(_Strict):
    tensorboard: bool = Field(False, description="write TensorBoard event files under <run_dir>/tensorboard (losses, lr, pseudo-label accuracy, validation scores, prediction overlays); needs lowlabel[log]")
    mlflow: str | None = Field(None, description="MLflow tracking URI (e.g. file:///path/mlruns or http://host:5000): params, metrics, best checkpoint; needs lowlabel[log]")
    mlflow_experiment: str = "lowlabel"
    images: int = Field(2, ge=0, description="validation images whose prediction overlays go to TensorBoard at each validation")


class Config(_Strict):
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _channels_match_bands(self):
        """Beyond grey and RGB, the network takes exactly the bands the data selects."""
        n, c = (len(self.data.bands) if self.data.bands else None), self.model.in_channels
        if n is not None and n not in (1, 3) and c != n:
            raise ValueError(f"data.bands selects {n} bands: set model.in_channels: {n} (the network sees every selected band)")
        if c not in (1, 3) and n != c:
            raise ValueError(f"model.in_channels: {c} takes {c} raster bands: list them in data.bands (e.g. {list(range(1, c + 1))})")
        if c not in (1, 3) and (self.method.name in ("sesam", "sesam_ssl", "ssr_sam", "ssr_sam_labeled") or self.model.arch == "ssr-sam"):
            raise ValueError(f"{self.method.name} / {self.model.arch} run SAM, which takes RGB: use model.in_channels 1 or 3 (data.bands with 1 or 3 bands)")
        return self

    @model_validator(mode="after")
    def _cached_embeddings_need_repeated_views(self):
        """SSR-SAM's embedding cache looks up inputs it has seen: only deterministic views repeat."""
        if self.model.arch == "ssr-sam" and self.model.options.get("cache_embeddings") and (not self.data.resize or self.data.rotate != "none"):
            raise ValueError("model.options.cache_embeddings looks up inputs already encoded: set data.resize: true and data.rotate: none "
                             "(each image, or each patch pre-cut at the encoder's size, seen whole; only a flip varies), since random "
                             "rescales, crops and rotations never repeat an input")
        return self

    @model_validator(mode="after")
    def _s4m_has_a_teacher(self):
        """S4M's teacher is the burn-in's student or model.pretrained; a run with neither would
        pseudo-label with random weights, one whose burn-in fills it would never use them."""
        if self.method.name == "s4m":
            burn_in = int(self.method.params.get("burn_in", 0) or 0)
            if not burn_in and not self.model.pretrained:
                raise ValueError("method s4m with burn_in: 0 starts its teacher from model.pretrained, and none is given: the teacher "
                                 "would be random and its pseudo-instances noise; set method.params.burn_in (labeled-only iterations) "
                                 "or model.pretrained (e.g. a supervised run's best.pt)")
            if burn_in >= self.train.iterations:
                raise ValueError(f"method s4m: burn_in {burn_in} >= train.iterations {self.train.iterations}, so the run never uses its "
                                 "unlabeled images; lower burn_in or train longer")
        return self

    @model_validator(mode="after")
    def _eval_like_training(self):
        """A model trained on whole resized images is evaluated on whole resized images."""
        if self.data.resize and self.eval.resize is None:
            self.eval.resize = self.data.crop
        return self


def merge_raw(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k == "method" and isinstance(v, dict) and v.get("name", out.get(k, {}).get("name")) != out.get(k, {}).get("name"):
            out[k] = copy.deepcopy(v)  # another method: the base's parameters do not apply
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = merge_raw(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a mapping")
    return raw


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value.strip() else None
        if isinstance(parsed, (int, float)) and "/" in value:
            parsed = value
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = parsed
    return raw


def _resolve_paths(raw: dict, folder: Path) -> dict:
    """``data.root`` and split-file paths relative to the config file's folder, where they exist
    there and not relative to the current directory."""
    data = raw.get("data") or {}
    for key in ("root", "unlabeled", "labeled"):
        v = data.get(key)
        if not isinstance(v, str) or Path(v).is_absolute() or (key != "root" and not v.endswith(".txt")):
            continue
        if not Path(v).exists() and (folder / v).exists():
            data[key] = str((folder / v).resolve())
    return raw


def load_raw(path: str | Path) -> dict:
    """A config file as a dict, its ``base:`` merged in (one level)."""
    path = Path(path)
    raw = _resolve_paths(_read_yaml(path), path.parent)
    base = raw.pop("base", None)
    if base:
        bpath = Path(base) if Path(base).is_absolute() else path.parent / base
        braw = _resolve_paths(_read_yaml(bpath), bpath.parent)
        if "base" in braw:
            raise ValueError(f"{bpath}: a base config may not have a base of its own (one level only)")
        raw = merge_raw(braw, raw)
    return raw


def config_error(err: ValidationError, source: str | Path | None = None, prefix: str = "") -> ConfigError:
    """A pydantic error as one line per problem: ``<file>: <key>: <problem> (got <value>)``."""
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        parts.append(f"{key}: {msg}{shown}" if key else f"{msg}{shown}")
    return ConfigError(f"{source}: " * bool(source) + "; ".join(parts))


def task_of(cfg: Config) -> str:
    """``"instance"`` for an instance model (``model.arch: maskrcnn``), else ``"semantic"``."""
    from .models.instance import INSTANCE_ARCHS

    return "instance" if cfg.model.arch in INSTANCE_ARCHS else "semantic"


def resolve_method_params(cfg: Config) -> Config:
    """Validate ``method.params`` against the method's own schema and fill in its defaults."""
    from .methods import get_method_class

    try:
        cls = get_method_class(cfg.method.name, task_of(cfg))
    except ValueError as err:
        raise ConfigError(f"method.name: {err}") from None
    try:
        params = cls.Params(**cfg.method.params)
    except ValidationError as err:
        raise config_error(err, prefix="method.params") from None
    cfg.method.params = params.model_dump()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), raw: dict | None = None) -> Config:
    """Load, merge, override and validate a config (method parameters included)."""
    if raw is None:
        if path is None:
            raise ValueError("give a config path or a raw dict")
        raw = load_raw(path)
    raw = apply_overrides(raw, overrides)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise config_error(err, path) from None
    return resolve_method_params(cfg)


def eval_precision(cfg: Config | None) -> str:
    """The precision evaluation and prediction ask for: ``eval.precision``, or with ``auto`` the
    training's ``train.precision`` (so an fp32 protocol is fp32 throughout)."""
    if cfg is None:
        return "auto"
    return cfg.eval.precision if cfg.eval.precision != "auto" else cfg.train.precision


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
