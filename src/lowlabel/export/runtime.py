"""Running an exported file: :class:`ExportedModel` (a callable for tiled inference) and
:class:`ExportedRun` (prediction like a run's, from the file and its metadata alone).

``ExportedModel(path)`` maps float [B, C, h, w] in [0, 1] to float32 logits [B, K, h, w], as
lowlabel's networks do, so :func:`lowlabel.eval.inference.sliding_window` tiles over it. An ONNX
file runs in onnxruntime (CPU; CUDA where onnxruntime-gpu offers it and ``device`` asks for it), a
TorchScript file in ``torch.jit.load``. Beyond the graph it does two things: images smaller than
the network's stride are padded outside the graph as :meth:`Segmenter.forward` pads them
(``replicate`` where reflection cannot reach), and a graph of one image a call (SSR-SAM) is run
image by image.

``ExportedRun(path)`` is a :class:`lowlabel.engine.run.Predictor`: the same ``predict`` and
``predict_folder`` code as a run's (tiling, label PNGs, overlays, GeoTIFF output), with the
classes, palette and tiling settings of the metadata.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import EvalConfig
from ..engine.run import Predictor
from ..errors import ExportError
from ..utils import resolve_device
from .common import EXPORT_FORMAT, FORMATS, jit_load, metadata_path, onnx_session, sha256_file


def looks_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or claims to be) an exported model rather than a checkpoint: an
    ``.onnx`` file, a file with an export's metadata beside it, or a TorchScript archive."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".onnx" or metadata_path(path).is_file():
        return True
    try:
        with zipfile.ZipFile(path) as z:  # torch.jit.save's archive has code/; torch.save's has none
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_metadata(path: str | os.PathLike, *, check_sha: bool = True) -> dict:
    """The metadata of an exported file, or an :class:`ExportError` naming what is wrong (no
    ``<file>.json`` beside it, not JSON, not lowlabel's, written for another file)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(path, "exported model not found")
    mp = metadata_path(path)
    if not mp.is_file():
        raise ExportError(path, f"no metadata beside it ({mp.name}: classes, palette, input convention); "
                                "re-export with `lowlabel export RUN --format onnx|torchscript --out FILE`, which writes both")
    try:
        meta = json.loads(mp.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(mp, f"unreadable metadata ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(mp, f"not lowlabel export metadata (format {got!r}, expected {EXPORT_FORMAT!r})")
    missing = [k for k in ("model_format", "classes", "palette", "input", "eval") if k not in meta]
    if missing:
        raise ExportError(mp, f"metadata lacks {', '.join(missing)}")
    if meta["model_format"] not in FORMATS:
        raise ExportError(mp, f"unknown model_format {meta['model_format']!r}")
    if check_sha and meta.get("file_sha256") and sha256_file(path) != meta["file_sha256"]:
        raise ExportError(path, f"does not match its metadata ({mp.name} was written for another file: SHA-256 differs)")
    return meta


class ExportedModel:
    """An exported file as a model: ``model(images)`` with images float [B, C, h, w] in [0, 1]
    returns float32 logits [B, K, h, w] (see the module docstring).

    Attributes: ``metadata``, ``in_channels`` (the channels it takes), ``num_classes``, ``device``
    (where its outputs are: the CPU for ONNX)."""

    def __init__(self, path: str | os.PathLike, metadata: dict | None = None, *, threads: int | None = None, device: str = "cpu"):
        self.path = Path(path)
        self.metadata = meta = metadata if metadata is not None else read_metadata(self.path)
        inp = meta["input"]
        self.format = meta["model_format"]
        self.in_channels = int(inp["channels"])
        self.num_classes = len(meta["classes"])
        self.batch = inp.get("batch", "dynamic")
        self.min_size, self.max_size = int(inp.get("min_size") or 1), inp.get("max_size")
        self.size_divisor = int(inp.get("size_divisor") or 1)
        if self.format == "onnx":
            self.session = onnx_session(self.path, threads, device)
            self.input_name = self.session.get_inputs()[0].name
            self.device = torch.device("cpu")
        else:
            if threads:
                torch.set_num_threads(int(threads))
            self.device = torch.device(device)
            try:
                self.module = jit_load(self.path, self.device)
            except RuntimeError as err:
                raise ExportError(self.path, f"not a TorchScript file torch.jit.load reads ({str(err).strip().splitlines()[0][:160]})") from None

    def _graph(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == "onnx":
            out = self.session.run(None, {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
            return torch.from_numpy(np.ascontiguousarray(out))
        with torch.no_grad():
            return self.module(x.to(self.device, torch.float32))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"{self.path.name} takes float images [B, {self.in_channels}, H, W] in [0, 1], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if self.max_size and max(h, w) > int(self.max_size):
            raise ValueError(f"input {h}x{w} exceeds {self.path.name}'s {self.max_size}x{self.max_size}; predict larger images tile by tile "
                             f"(eval.tile <= {self.max_size})")
        k = self.size_divisor
        if min(h, w) < self.min_size and k > 1:  # as Segmenter.forward: to the stride, replicate where reflection cannot reach
            ph, pw = (-h) % k, (-w) % k
            x = F.pad(images.float(), (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
            return self(x)[..., :h, :w]
        if self.batch != "dynamic" and images.shape[0] != int(self.batch):
            n = int(self.batch)
            return torch.cat([self._graph(images[i : i + n]) for i in range(0, images.shape[0], n)])
        return self._graph(images)


class ExportedRun(Predictor):
    """Prediction from an exported file and its metadata, no run directory: ``classes``,
    ``palette``, ``eval_cfg`` (tile, overlap, weighting, batch size, resize) and the raster
    options come from the metadata; ``model`` is the :class:`ExportedModel`; it runs in fp32
    (``precision`` None). ``predict`` and ``predict_folder`` are a run's own
    (:class:`~lowlabel.engine.run.Predictor`)."""

    task = "semantic"

    def __init__(self, path: str | os.PathLike, *, device: str = "auto", threads: int | None = None):
        self.path = Path(path)
        self.metadata = meta = read_metadata(self.path)
        # ONNX: onnxruntime's CUDA provider where the device is CUDA and onnxruntime-gpu offers it; the
        # outputs (and the stitching) are on the CPU either way
        self.model = ExportedModel(self.path, meta, threads=threads, device=str(resolve_device(device)))
        self.device = self.model.device
        self.classes, self.palette = list(meta["classes"]), [tuple(c) for c in meta["palette"]]
        self.eval_cfg = EvalConfig(**{k: v for k, v in meta["eval"].items() if k in EvalConfig.model_fields})
        self.precision = None
        self.config, self.run_dir, self.data_root = None, None, None
        data = meta.get("data") or {}
        self._raster = (data.get("bands"), tuple(data["value_range"]) if data.get("value_range") else None)

    def raster_options(self) -> tuple:
        """(bands, value_range) of the training data, from the metadata."""
        return self._raster


def load_exported(path: str | os.PathLike, *, device: str = "auto", threads: int | None = None) -> ExportedRun:
    """An :class:`ExportedRun` of an exported file (``.onnx`` or TorchScript) and its metadata."""
    return ExportedRun(path, device=device, threads=threads)
