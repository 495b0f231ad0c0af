"""ONNX / TorchScript export of a run's evaluated model, and prediction from the exported file.

    from lowlabel.export import export_run, load_exported
    export_run("runs/quickstart-unimatch", "onnx", "model.onnx")   # + model.onnx.json
    load_exported("model.onnx").predict_folder("images/", "pred/")  # onnxruntime, tiled

The exported graph takes images float32 [B, C, H, W] in [0, 1] (raw pixels / 255; normalisation
inside) and returns logits float32 [B, K, H, W]; see :mod:`lowlabel.export.exporter` and
docs/export.md for the input convention, the dynamic axes and what cannot be exported.
"""

from __future__ import annotations

from .common import FORMATS, metadata_path
from .exporter import NOT_EXPORTABLE, export_run
from .runtime import ExportedModel, ExportedRun, load_exported, looks_exported, read_metadata

__all__ = ["FORMATS", "NOT_EXPORTABLE", "ExportedModel", "ExportedRun", "export_run", "load_exported", "looks_exported", "metadata_path", "read_metadata"]
