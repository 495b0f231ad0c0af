"""Segmentation metrics from a confusion matrix.

Convention for absent classes: a class that appears neither in the ground truth nor in the
prediction of everything seen (TP + FP + FN = 0) has an *undefined* IoU. It is reported as NaN
(``None`` in JSON, ``-`` in tables) and left out of the mean — it counts neither as 0 nor as 1.
A class present in the ground truth but never predicted has IoU 0, and one predicted but absent
from the ground truth also has IoU 0 (all its pixels are false positives); both count.
Pixels whose ground truth is the ignore index are not counted at all.

Dice (F1) per class is 2 TP / (2 TP + FP + FN), with the same convention for absent classes.
Two ways to average it over a split (:class:`Scores`):

- *pooled*: from the confusion matrix of every pixel of the split;
- *per volume*, as the medical benchmarks (SSL4MIS, UniMatch's ACDC numbers) compute it: the 2D
  slices of one volume (ids ``<volume>_slice_<k>``) are stacked, Dice is computed per volume
  and class, then averaged over volumes (a class absent from a volume's truth and prediction
  is left out of that volume's mean).

``dice_mean`` is the mean over the *foreground* classes — every class except one named
``background`` (or ``bg``) — per volume when the split's ids name volumes, pooled otherwise;
``dice_by`` says which.
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

    def dice(self) -> np.ndarray:
        """Per-class Dice, NaN where the class is absent from both prediction and ground truth."""
        m = self.matrix.double()
        tp = m.diag()
        denom = m.sum(0) + m.sum(1)
        return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, float("nan"))).numpy()

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


BACKGROUND_NAMES = ("background", "bg")


def foreground(class_names: Sequence[str]) -> list[int]:
    """Indices of the classes that count in the mean foreground Dice."""
    fg = [i for i, n in enumerate(class_names) if n.lower() not in BACKGROUND_NAMES]
    return fg or list(range(len(class_names)))


def volume_of(sample_id: str) -> str | None:
    """The volume a 2D slice belongs to: the id's part before ``_slice_`` (None if it has none)."""
    head, sep, _ = str(sample_id).rpartition("_slice_")
    return head if sep else None


def _nanmean(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


class Scores:
    """The confusion matrix of a split plus one per volume (when the ids name volumes).

    ``volumes``: the volume names to track (all ids of the split, so that every process of a
    distributed evaluation holds the same list); pass None for plain 2D datasets."""

    def __init__(self, num_classes: int, volumes: Sequence[str] | None = None):
        self.total = ConfusionMatrix(num_classes)
        self.volumes = sorted(set(volumes)) if volumes else []
        self._index = {v: i for i, v in enumerate(self.volumes)}
        self.per_volume = torch.zeros(len(self.volumes), num_classes, num_classes, dtype=torch.int64)

    @classmethod
    def for_ids(cls, num_classes: int, ids: Sequence[str]) -> "Scores":
        vols = [volume_of(i) for i in ids]
        return cls(num_classes, vols if vols and all(v is not None for v in vols) else None)

    def update(self, pred, target, sample_id: str | None = None) -> "Scores":
        before = self.total.matrix.clone() if self.volumes else None
        self.total.update(pred, target)
        if self.volumes:
            v = volume_of(sample_id) if sample_id is not None else None
            if v not in self._index:
                raise ValueError(f"sample {sample_id!r} belongs to no tracked volume")
            self.per_volume[self._index[v]] += self.total.matrix - before
        return self

    def tensors(self) -> list[torch.Tensor]:
        """The counts to sum across processes (in place)."""
        return [self.total.matrix, self.per_volume]

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """mIoU, pixel accuracy, per-class IoU (as :meth:`ConfusionMatrix.summary`), and Dice:
        ``per_class_dice`` / ``dice_mean`` (per volume when there are volumes, else pooled),
        ``per_class_dice_pooled`` / ``dice_mean_pooled``, ``dice_by``, ``volumes``."""
        names = list(class_names) if class_names else [str(i) for i in range(self.total.num_classes)]
        out = self.total.summary(names)
        fg = foreground(names)
        pooled = self.total.dice()
        out["per_class_dice_pooled"] = {n: _clean(float(v)) for n, v in zip(names, pooled)}
        out["dice_mean_pooled"] = _clean(_nanmean(pooled[fg]))
        if self.volumes:
            cm = ConfusionMatrix(self.total.num_classes)
            per_vol = []
            for m in self.per_volume:
                if int(m.sum()) == 0:
                    continue  # a volume none of whose slices was scored (max_images)
                cm.matrix = m
                per_vol.append(cm.dice())
            per_class = np.array([_nanmean(c) for c in np.array(per_vol).T]) if per_vol else pooled * np.nan
            out["per_class_dice"] = {n: _clean(float(v)) for n, v in zip(names, per_class)}
            out["dice_mean"] = _clean(_nanmean(per_class[fg]))
            out["dice_by"], out["volumes"] = "volume", len(per_vol)
        else:
            out["per_class_dice"], out["dice_mean"] = out["per_class_dice_pooled"], out["dice_mean_pooled"]
            out["dice_by"], out["volumes"] = "pooled", 0
        return out


def _flat(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).long()
    return torch.from_numpy(np.asarray(x).astype(np.int64).reshape(-1))


def _clean(v: float):
    return None if v is None or math.isnan(v) else round(float(v), 6)
