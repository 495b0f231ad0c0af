"""Segmentation metrics from a confusion matrix.

Convention for absent classes: a class that appears neither in the ground truth nor in the
prediction of everything seen (TP + FP + FN = 0) has an *undefined* IoU. It is reported as NaN
(``None`` in JSON, ``-`` in tables) and left out of the mean — it counts neither as 0 nor as 1.
A class present in the ground truth but never predicted has IoU 0, and one predicted but absent
from the ground truth also has IoU 0 (all its pixels are false positives); both count.
Pixels whose ground truth is the ignore index are not counted at all.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..data.dataset import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a [C, C] confusion matrix, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, target) -> "ConfusionMatrix":
        pred = _flat(pred)
        target = _flat(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels, target {target.numel()}")
        keep = target != self.ignore_index
        pred, target = pred[keep].cpu(), target[keep].cpu()
        if target.numel() and (target.max() >= self.num_classes or target.min() < 0):
            raise ValueError(f"target holds class ids outside 0..{self.num_classes - 1}")
        if pred.numel() and (pred.max() >= self.num_classes or pred.min() < 0):
            raise ValueError(f"prediction holds class ids outside 0..{self.num_classes - 1}")
        idx = target * self.num_classes + pred
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self.matrix += other.matrix
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU, NaN where the class is absent from both prediction and ground truth."""
        m = self.matrix.double()
        tp = m.diag()
        denom = m.sum(0) + m.sum(1) - tp
        iou = torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))
        return iou.numpy()

    def miou(self) -> float:
        iou = self.iou()
        valid = ~np.isnan(iou)
        return float(iou[valid].mean()) if valid.any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float(self.matrix.diag().sum()) / total if total else float("nan")

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-ready dict: miou, pixel_accuracy, per_class_iou {name: value or None}."""
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        iou = self.iou()
        return {
            "miou": _clean(self.miou()),
            "pixel_accuracy": _clean(self.pixel_accuracy()),
            "per_class_iou": {n: _clean(float(v)) for n, v in zip(names, iou)},
            "pixels": int(self.matrix.sum()),
        }


def _flat(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).long()
    return torch.from_numpy(np.asarray(x).astype(np.int64).reshape(-1))


def _clean(v: float):
    return None if v is None or math.isnan(v) else round(float(v), 6)
