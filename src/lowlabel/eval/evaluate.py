"""Scoring predictions (a folder of PNG or GeoTIFF label maps, or a model) against a dataset split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.dataset import DatasetError, FolderDataset, check_label_grid, label_path, read_label
from .metrics import Scores


def evaluate_folder(pred_dir: str | Path, data_root: str | Path, split: str = "test") -> dict:
    """mIoU etc. of ``pred_dir/<id>.png`` (or the ``<id>.tif`` GeoTIFF that ``predict`` writes for
    a raster) against ``data_root``'s masks for the ids of ``split``. Every id of the split needs a
    prediction; sizes must match. A GeoTIFF prediction's 255 (nodata: not predicted) pixels are
    left out of the scores and counted in ``unpredicted_pixels`` where the mask labels them."""
    pred_dir = Path(pred_dir)
    ds = FolderDataset(data_root, split, labeled=True)
    missing = [i for i in ds.ids if not label_path(pred_dir, i).is_file()]
    if missing:
        raise DatasetError(pred_dir, f"{len(missing)} prediction(s) missing for split {split!r}, e.g. {', '.join(missing[:5])}")
    cm = Scores.for_ids(ds.info.num_classes, ds.ids)
    unpredicted = 0
    for i, sid in enumerate(ds.ids):
        gt_path, pred_path = label_path(ds.root / "masks", sid), label_path(pred_dir, sid)
        gt, pred = read_label(gt_path), _read_prediction(pred_path)
        if pred.shape != gt.shape:
            raise DatasetError(pred_path, f"size {pred.shape[::-1]} differs from the mask's {gt.shape[::-1]}")
        check_label_grid(pred_path, gt_path)
        nodata = (pred == 255) if pred_path.suffix.lower() != ".png" else np.zeros(pred.shape, bool)
        if (pred[~nodata] >= ds.info.num_classes).any():
            raise DatasetError(pred_path, f"holds class ids >= {ds.info.num_classes}")
        unpredicted += int((nodata & (gt != 255)).sum())
        cm.update(np.where(nodata, 0, pred), np.where(nodata, 255, gt), sid)
    out = cm.summary(ds.info.classes)
    out.update({"images": len(ds), "split": split, "dataset": ds.info.name, "unpredicted_pixels": unpredicted})
    return out


def _read_prediction(path: Path):
    """A prediction's class ids: a PNG label map, or band 1 ("class") of the GeoTIFF that
    ``predict`` writes (band 2, with ``--confidence``, is the confidence)."""
    from ..data.raster import have_rasterio

    if path.suffix.lower() in (".tif", ".tiff") and have_rasterio():
        import rasterio

        with rasterio.open(path) as ds:
            if ds.count > 1 and ds.descriptions[0] != "class":
                raise DatasetError(path, f"{ds.count} bands and none described as 'class': not a lowlabel prediction")
            if ds.count > 1:
                return ds.read(1)
    return read_label(path)


def metrics_table(summary: dict, title: str = "evaluation"):
    """A rich table of per-class IoU and Dice, mIoU, mean foreground Dice and pixel accuracy
    (``-`` for absent classes), and the count of labeled pixels left unpredicted where any."""
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
    if summary.get("unpredicted_pixels"):  # labeled pixels a GeoTIFF prediction left as nodata
        t.add_row("[yellow]not predicted (px, left out)", f"[yellow]{summary['unpredicted_pixels']:,}", *([""] if dice else []))
    return t

