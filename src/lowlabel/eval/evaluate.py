"""Scoring predictions (a folder of PNG label maps, or a model) against a dataset split."""

from __future__ import annotations

from pathlib import Path

from ..data.dataset import DatasetError, FolderDataset, read_label
from .metrics import Scores


def evaluate_folder(pred_dir: str | Path, data_root: str | Path, split: str = "test") -> dict:
    """mIoU etc. of ``pred_dir/<id>.png`` against ``data_root``'s masks for the ids of ``split``.
    Every id of the split needs a prediction; sizes must match."""
    pred_dir = Path(pred_dir)
    ds = FolderDataset(data_root, split, labeled=True)
    missing = [i for i in ds.ids if not (pred_dir / f"{i}.png").is_file()]
    if missing:
        raise DatasetError(pred_dir, f"{len(missing)} prediction(s) missing for split {split!r}, e.g. {', '.join(missing[:5])}")
    cm = Scores.for_ids(ds.info.num_classes, ds.ids)
    for i, sid in enumerate(ds.ids):
        gt = read_label(ds.root / "masks" / f"{sid}.png")
        pred = read_label(pred_dir / f"{sid}.png")
        if pred.shape != gt.shape:
            raise DatasetError(pred_dir / f"{sid}.png", f"size {pred.shape[::-1]} differs from the mask's {gt.shape[::-1]}")
        if (pred >= ds.info.num_classes).any():
            raise DatasetError(pred_dir / f"{sid}.png", f"holds class ids >= {ds.info.num_classes}")
        cm.update(pred, gt, sid)
    out = cm.summary(ds.info.classes)
    out.update({"images": len(ds), "split": split, "dataset": ds.info.name})
    return out


def metrics_table(summary: dict, title: str = "evaluation"):
    """A rich table of per-class IoU and Dice, mIoU, mean foreground Dice and pixel accuracy
    (``-`` for absent classes)."""
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    dice = summary.get("per_class_dice") or {}
    by = summary.get("dice_by", "pooled")
    t = Table(title=title)
    t.add_column("class")
    t.add_column("IoU", justify="right")
    if dice:
        t.add_column(f"Dice ({'per volume' if by == 'volume' else 'pooled'})", justify="right")
    for name, v in summary["per_class_iou"].items():
        t.add_row(name, pct(v), *([pct(dice.get(name))] if dice else []))
    t.add_section()
    t.add_row("[bold]mIoU", f"[bold]{pct(summary['miou'])}", *([""] if dice else []))
    if dice:
        t.add_row("[bold]mean foreground Dice", "", f"[bold]{pct(summary.get('dice_mean'))}")
    t.add_row("pixel accuracy", pct(summary["pixel_accuracy"]), *([""] if dice else []))
    return t

