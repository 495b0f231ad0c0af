"""``export_run``: a run's evaluated model as an ONNX or TorchScript file plus a metadata JSON.

The file computes ``images -> logits``: images float32 [B, C, H, W] in [0, 1] (raw pixels divided
by 255, RGB order; C = 3 for RGB and grey networks, a grey one averages the channels inside the
graph; a multi-band network takes its ``in_channels`` bands), logits float32 [B, K, H, W] (K =
the number of classes; softmax / argmax over dim 1). The input normalisation (mean and std) is
inside the graph. Batch, height and width are dynamic (SSR-SAM: one image a call, sides up to its
encoder's; instance models are refused, :data:`NOT_EXPORTABLE`; docs/export.md). Beside the file, ``<file>.json`` holds what prediction needs without the run
directory (:func:`metadata_path`): classes, palette, the run's tiling settings, the input
convention, opset, lowlabel and torch versions, the source checkpoint's SHA-256 and the exported
file's own.

The ONNX file is written by torch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``). It is deprecated in favour of the ``torch.export``-based one, but lowlabel's
torch range (< 2.15) has it, it needs no further package (the dynamo exporter needs
``onnxscript``), and on the 2-core CPU machines of this project it exported each of the tiny,
unet2d and DeepLabV3+ graphs in 2-3 s where the dynamo exporter took 24-32 s, with the same
outputs (probe, 2026-12-03: max |logit difference| to torch < 1.2e-7 for both).

Every export is verified before it is kept: the file is run (onnxruntime, or ``torch.jit.load``)
on a random input of a size other than the traced example's, not a multiple of the stride, and
its logits must agree with the torch model's within ``tolerance``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError, ExportError
from .common import EXPORT_FORMAT, FORMATS, metadata_path, run_file, sha256_file

DEFAULT_OPSET = 17  # onnxruntime >= 1.14 runs it; Resize, Pad (reflect) and LayerNormalization as one op
INPUT_NAME, OUTPUT_NAME = "images", "logits"

# arch -> why it cannot be exported (the error message's reason and docs/export.md's table)
NOT_EXPORTABLE = {
    "maskrcnn": (
        "maskrcnn (instance) models cannot be exported by lowlabel: an exported file computes class logits "
        "[B, K, H, W] that prediction tiles and stitches, while Mask R-CNN returns a variable number of detections "
        "(masks, labels, scores, boxes) that lowlabel tiles and merges across tile borders in Python, a path "
        "exported files do not have; predict instance runs from the run directory (lowlabel predict RUN IMAGES)"
    ),
}


def input_channels(net) -> int:
    """The channels an exported graph takes: 3 for RGB and grey networks, else ``in_channels``
    (as :func:`lowlabel.eval.inference.sliding_window` feeds them)."""
    c = int(getattr(net, "in_channels", 3) or 3)
    return 3 if c in (1, 3) else c


def export_run(run, fmt: str, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET, tolerance: float = 1e-3) -> Path:
    """Export ``run`` (a :class:`lowlabel.engine.run.Run`, a run directory or a checkpoint file: its
    best checkpoint, else its last, as :meth:`Run.load` chooses) to ``out`` in ``fmt`` (``onnx`` or
    ``torchscript``) and write ``<out>.json`` beside it. Returns ``out``.

    Raises :class:`~lowlabel.errors.ConfigError` for an unknown format,
    :class:`~lowlabel.errors.ExportError` for an architecture that cannot be exported (instance
    models) or an export whose outputs disagree with torch's, the errors of :meth:`Run.load` for
    a path that is not a run, and ImportError when ONNX export lacks onnxruntime (its
    verification) — ``pip install 'lowlabel[export]'``.
    """
    from .. import __version__
    from ..engine.run import Run
    from ..utils import atomic_write_json

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(out, "is a folder; give the file to write, e.g. model.onnx")
    if not isinstance(run, Run):
        run = Run.load(run, device="cpu", precision="fp32")
    arch = getattr(run.model, "arch", type(run.model).__name__)
    source = getattr(run, "checkpoint", None) or run.run_dir
    if arch in NOT_EXPORTABLE or getattr(run.model, "task", "semantic") != "semantic":
        raise ExportError(source, NOT_EXPORTABLE.get(arch, f"{arch} ({run.task}) models cannot be exported"))
    net = copy.deepcopy(run.model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    graph, spec = _graph(net, arch, source)
    graph.eval()  # the wrapper too: the exporter restores the module's mode afterwards, recursively
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401  (the verification below runs the file)
        except ImportError:
            raise ImportError("ONNX export verifies the file with onnxruntime: pip install 'lowlabel[export]'") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        _write(graph, fmt, tmp, spec["example"], spec["dynamic"], opset)
        diff = _verify(graph, fmt, tmp, spec["check"], tolerance, source)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    ckpt = getattr(run, "checkpoint", None)
    e = run.eval_cfg
    bands, value_range = run.raster_options()
    meta = {
        "format": EXPORT_FORMAT,
        "model_format": fmt,
        "file": out.name,
        "file_sha256": sha256_file(out),
        "task": "semantic",
        "arch": arch,
        "encoder": getattr(net, "encoder_name", None),
        "num_classes": len(run.classes),
        "classes": list(run.classes),
        "palette": [list(map(int, c)) for c in run.palette],
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "channels": spec["channels"], "range": [0.0, 1.0],
            "meaning": "raw pixels divided by 255 (RGB order; a grey network averages the three channels in the graph); "
                       "the mean/std normalisation is inside the graph",
            "batch": spec["batch"], "min_size": spec["min_size"], "max_size": spec["max_size"], "size_divisor": spec["size_divisor"],
            "network_in_channels": int(getattr(net, "in_channels", 3)),
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "layout": "NCHW", "meaning": "class logits [B, num_classes, H, W], same H, W as the input"},
        "opset": opset if fmt == "onnx" else None,
        "eval": {"tile": e.tile, "overlap": e.overlap, "weighting": e.weighting, "batch_size": e.batch_size, "resize": e.resize},
        "data": {"bands": list(bands) if bands else None, "value_range": list(value_range) if value_range else None},
        "source": {"checkpoint": str(ckpt) if ckpt else None, "sha256": sha256_file(ckpt) if ckpt and Path(ckpt).is_file() else None,
                   "run_dir": str(run.run_dir) if run.run_dir else None},
        "verified": {"input_shape": list(spec["check"]), "max_abs_logit_diff": diff, "tolerance": tolerance},
        "lowlabel_version": __version__,
        "torch_version": torch.__version__,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(metadata_path(out), meta)
    return out


def _graph(net, arch: str, source) -> tuple[torch.nn.Module, dict]:
    """(the module to trace, its shapes: traced example, dynamic axes, verification input, limits)."""
    from ..models.segmenter import Segmenter
    from ..models.ssr_sam import SSRSAM
    from .graph import RetrievalGraph, SemanticGraph

    c = input_channels(net)
    if isinstance(net, Segmenter):
        k = int(net.size_divisor)
        # batch 2 and H != W, so that neither a batch of one nor a square side is baked in; the
        # check's sides are not multiples of the stride, so the pad and crop are exercised
        return SemanticGraph(net), {"example": (2, c, 2 * k, 3 * k), "check": (1, c, k + 7, 2 * k + 3), "dynamic": (0, 2, 3), "batch": "dynamic",
                                    "min_size": k, "max_size": None, "size_divisor": k, "channels": c}
    if isinstance(net, SSRSAM):
        side = int(net.img_size)
        return RetrievalGraph(net), {"example": (1, c, side, side - 16), "check": (1, c, side - 5, side - 27), "dynamic": (2, 3), "batch": 1,
                                     "min_size": 1, "max_size": side, "size_divisor": 1, "channels": c}
    raise ExportError(source, f"{arch} ({type(net).__name__}) is not an architecture lowlabel can export (semantic segmenters and ssr-sam)")


@contextlib.contextmanager
def _quiet():
    """The tracer's warnings that do not apply: the deprecation notices of the TorchScript-based
    tracer and exporter, and TracerWarnings about Python branches on shapes (the branches of the
    exported networks do not depend on the input size; every export is verified at another size)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX export|will be removed|torch.jit.trace).*")
        yield


def _write(graph, fmt: str, path: Path, example_shape, dynamic, opset: int) -> None:
    x = torch.rand(*example_shape, generator=torch.Generator().manual_seed(0))
    names = {0: "batch", 2: "height", 3: "width"}
    with _quiet(), torch.no_grad():
        if fmt == "onnx":
            axes = {d: names[d] for d in dynamic}
            torch.onnx.export(graph, (x,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, opset_version=opset, do_constant_folding=True)
        else:
            torch.jit.save(torch.jit.trace(graph, (x,), check_trace=False), str(path))


def _verify(graph, fmt: str, path: Path, shape, tolerance: float, source) -> float:
    """Max |logit difference| between the written file and ``graph`` on a random input of
    ``shape``; an ExportError when it exceeds ``tolerance``."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = graph(x)
    got = run_file(path, fmt, x)
    if got.shape != ref.shape:
        raise ExportError(source, f"the exported {fmt} graph returned {tuple(got.shape)} for input {tuple(shape)}, torch {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    if not diff <= tolerance:
        raise ExportError(source, f"the exported {fmt} graph disagrees with torch by {diff:.3g} (> {tolerance}) on input {tuple(shape)}; not written")
    return diff
