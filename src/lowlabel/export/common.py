"""What the exporter and the runtime share: the formats, the metadata file's name, file hashes,
and running an exported file's raw graph (the exporter's check and :class:`ExportedModel`)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from ..errors import ExportError

FORMATS = ("onnx", "torchscript")
EXPORT_FORMAT = "lowlabel-export-1"


def metadata_path(path: str | os.PathLike) -> Path:
    """The metadata JSON of an exported file: ``<file>.json`` beside it (``model.onnx.json``)."""
    return Path(str(path) + ".json")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_session(path: Path, threads: int | None, device: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("running an .onnx model needs onnxruntime: pip install 'lowlabel[export]'") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if str(device) != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ExportError(path, f"onnxruntime cannot load it ({str(err).strip().splitlines()[0][:160]})") from None


def run_file(path: str | os.PathLike, fmt: str, images: torch.Tensor) -> torch.Tensor:
    """The raw graph of an exported file on one batch (no metadata needed; the exporter's check)."""
    if fmt == "onnx":
        sess = onnx_session(Path(path), None, "cpu")
        return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: images.float().contiguous().numpy()})[0])
    with torch.no_grad():
        return jit_load(path, "cpu")(images.float())


def jit_load(path: str | os.PathLike, device) -> torch.jit.ScriptModule:
    """``torch.jit.load`` without its deprecation notice (TorchScript is the format asked for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
        return torch.jit.load(str(path), map_location=device).eval()
