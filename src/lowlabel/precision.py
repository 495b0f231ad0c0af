"""Numeric precision of training, evaluation, prediction and SAM encoding.

One setting, ``auto | fp32 | bf16 | fp16``, is resolved once per device into a
:class:`Precision` that says what runs (autocast dtype, channels_last memory format) and why::

    prec = resolve_precision("auto", device, model=net)   # e.g. bf16 + channels_last on a CPU with AMX
    prec.prepare(net)                                       # weights in channels_last where it pays
    with prec.autocast():
        logits = net(prec.images(x))                        # convolutions and matmuls in bf16

``auto`` picks bf16 where the device runs it natively — a CPU with ``amx_bf16`` or
``avx512_bf16`` (read from the CPU flags), a CUDA device with bf16 — else fp32. fp16 (with a
GradScaler in training) is CUDA-only and never chosen by ``auto``. On a CPU without those units
bf16 is emulated: on this project's AMD EPYC (Zen 3, AVX2) machines a UNet training step ran
11-26x *slower* in bf16 than in fp32 (benchmarks/results/cpu-precision), so ``auto`` keeps fp32
there and an explicit ``bf16`` prints a warning.

What stays in fp32 (autocast's own rules, plus lowlabel's):
- weights, optimiser state, EMA / momentum teacher averages and BatchNorm running statistics are
  never cast (autocast casts operation inputs, not parameters or buffers);
- :class:`~lowlabel.models.segmenter.Segmenter` returns float32 logits, so losses, softmax
  confidences compared against thresholds and stitched prediction scores are float32;
- similarity / affinity matrices of DerProp and RegionMatch are computed on float32 features with
  autocast off (``lowlabel.methods.addon.autocast_off``).

channels_last: a model class says whether it pays (``channels_last_pays``: the convolutional
segmenters do; the ViT of SSR-SAM and torchvision's Mask R-CNN do not claim it). ``auto`` follows
that, ``True`` / ``False`` force it.

Written here rather than taken from a library: torch gives ``torch.autocast`` and memory formats
but no policy that reads the CPU's units, records the choice, and keeps one setting across
training, evaluation, prediction and SAM encoding.
"""

from __future__ import annotations

import platform
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # units that execute bf16 dot products natively


@lru_cache(maxsize=1)
def cpu_bf16_units() -> tuple[str, ...]:
    """The CPU's native bf16 units among :data:`CPU_BF16_FLAGS` (Linux: ``/proc/cpuinfo``
    flags; elsewhere none are claimed, so ``auto`` stays fp32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for records and warnings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` fp32 / bf16 / fp16 on ``device_type``, ``channels_last``
    memory format or not, what was ``requested`` and the ``reason`` for the choice."""

    name: str
    device_type: str
    channels_last: bool
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        """Whether autocast runs (bf16 or fp16)."""
        return self.name != "fp32"

    def autocast(self):
        """The autocast context of this precision (nothing for fp32)."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D float batch in channels_last when this precision uses it, else ``x`` itself."""
        if self.channels_last and x.dim() == 4 and x.is_floating_point():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with its 4-D weights in channels_last (in place) when this precision uses it."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def describe(self) -> str:
        what = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler"}[self.name]
        return what + (" + channels_last" if self.channels_last else "") + f" ({self.reason})"

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, rec: dict) -> "Precision":
        return cls(**{k: rec[k] for k in ("name", "device_type", "channels_last", "requested", "reason")})


def _device_type(device) -> str:
    return torch.device(device).type if not isinstance(device, torch.device) else device.type


def _auto(device_type: str) -> tuple[str, str]:
    if device_type == "cpu":
        units = cpu_bf16_units()
        if units:
            return "bf16", f"auto: the CPU has {' and '.join(units)}"
        return "fp32", f"auto: the CPU ({cpu_name()}) has no {' / '.join(CPU_BF16_FLAGS)}, so bf16 would be emulated and slower"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name()} supports bf16"
        return "fp32", f"auto: {torch.cuda.get_device_name()} has no bf16 (fp16 stays available: precision fp16)"
    return "fp32", f"auto: fp32 on {device_type}"


def resolve_precision(requested: str, device, *, channels_last: bool | str = "auto", model: torch.nn.Module | None = None,
                      setting: str = "precision") -> Precision:
    """Resolve ``requested`` (``auto | fp32 | bf16 | fp16``) for ``device``.

    ``channels_last``: ``auto`` follows ``model.channels_last_pays`` (False without a model),
    True / False force it. ``setting`` names the config key in errors (e.g. ``train.precision``).
    Raises :class:`ConfigError` for fp16 off CUDA and for bf16 on a GPU without it."""
    if requested not in PRECISIONS:
        raise ConfigError(f"{setting}: {requested!r} is not one of {', '.join(PRECISIONS)}")
    dt = _device_type(device)
    if requested == "auto":
        name, reason = _auto(dt)
    elif requested == "fp16":
        if dt != "cuda":
            raise ConfigError(f"{setting}: fp16 runs on CUDA only (with a GradScaler); on {dt} use bf16 or fp32 (or auto)")
        name, reason = "fp16", "requested"
    elif requested == "bf16":
        if dt == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{setting}: {torch.cuda.get_device_name()} has no bf16; use fp16 or fp32")
        name = "bf16"
        reason = "requested"
        if dt == "cpu" and not cpu_bf16_units():
            reason = f"requested; emulated on this CPU ({cpu_name()}: no {' / '.join(CPU_BF16_FLAGS)}), expect it slower than fp32"
    else:
        name, reason = "fp32", "requested"
    if channels_last == "auto":
        cl = bool(getattr(model, "channels_last_pays", False))
    elif isinstance(channels_last, bool):
        cl = channels_last
    else:
        raise ConfigError(f"channels_last: give auto, true or false, got {channels_last!r}")
    return Precision(name, dt, cl, requested, reason)


def legacy_precision(device_type: str, amp) -> str:
    """The precision a checkpoint of lowlabel before ``train.precision`` trained in: fp16 autocast
    on CUDA with ``train.amp`` on or ``auto``, fp32 everywhere else."""
    return "fp16" if device_type == "cuda" and amp in (True, "auto") else "fp32"


def autocast_tag(device_type: str) -> bytes:
    """What precision the current autocast state computes in on ``device_type`` (``b"fp32"``,
    ``b"bf16"``, ``b"fp16"``): part of in-memory cache keys, so a value computed under one
    precision is never served to another."""
    if not torch.is_autocast_enabled(device_type):
        return b"fp32"
    return {torch.bfloat16: b"bf16", torch.float16: b"fp16"}.get(torch.get_autocast_dtype(device_type), b"fp32")
