"""Instance predictions: tiled inference with merging across tile borders, COCO mask AP, counts.

AP is pycocotools' (``COCOeval``, ``iouType="segm"``): the mean over IoU thresholds 0.50:0.95
of the 101-point interpolated precision, AP50 and AP75, with up to ``max_dets`` detections per
image (1000 by default, not COCO's 100: a nuclei image can hold several hundred).

Tiling (images larger than the evaluation tile): the image is cut into overlapping tiles (the
:class:`~lowlabel.data.tiling.TileGrid` of the semantic task). An instance whose mask touches
a tile edge that is not the image's edge may be cut; it is kept only when no instance found
whole in another tile overlaps it (overlap over the smaller mask > ``merge_iou``). The kept
instances then go through mask non-maximum suppression (same criterion, higher score wins),
which removes the duplicates that overlapping tiles both see whole. With an overlap larger than
the objects, every object lies whole inside some tile, so nothing is cut or duplicated.
The merging is written here: pycocotools scores instances and torchvision predicts them, but
neither merges instances across tiles.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..data.tiling import TileGrid


@dataclass
class Instances:
    """Instances of one ``size`` = (H, W) image, stored sparsely: ``boxes`` int [N, 4] (y0, x0,
    y1, x1; exclusive ends) and ``crops``, each instance's bool mask inside its box; ``scores``
    float [N], ``labels`` int [N]. Memory grows with the objects' area, not with N x H x W (500
    detections on a 1388 x 1040 image would be 720 MB as full masks)."""

    boxes: np.ndarray
    crops: list
    scores: np.ndarray
    labels: np.ndarray
    size: tuple

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, h: int, w: int) -> "Instances":
        return cls(np.zeros((0, 4), np.int64), [], np.zeros(0, np.float32), np.zeros(0, np.int64), (h, w))

    @classmethod
    def from_masks(cls, masks: np.ndarray, scores, labels, offset: tuple[int, int] = (0, 0), size: tuple | None = None) -> "Instances":
        """From full masks bool [N, h, w] (empty ones dropped), placed at ``offset`` in an image
        of ``size`` (default: the masks' own)."""
        size = tuple(size or masks.shape[1:])
        boxes, crops, keep = [], [], []
        for k, m in enumerate(masks):
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            if not len(rows):
                continue
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes.append([y0 + offset[0], x0 + offset[1], y1 + offset[0], x1 + offset[1]])
            crops.append(np.ascontiguousarray(m[y0:y1, x0:x1]))
            keep.append(k)
        return cls(np.array(boxes, np.int64).reshape(-1, 4), crops, np.asarray(scores, np.float32)[keep], np.asarray(labels, np.int64)[keep], size)

    def subset(self, idx) -> "Instances":
        idx = np.asarray(idx)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        return Instances(self.boxes[idx].reshape(-1, 4), [self.crops[i] for i in idx], self.scores[idx], self.labels[idx], self.size)

    def mask(self, k: int) -> np.ndarray:
        """Instance k's full bool mask [H, W]."""
        out = np.zeros(self.size, bool)
        y0, x0, y1, x1 = self.boxes[k]
        out[y0:y1, x0:x1] = self.crops[k]
        return out

    @property
    def masks(self) -> np.ndarray:
        """All full masks, bool [N, H, W] (for small images and tests)."""
        return np.stack([self.mask(k) for k in range(len(self))]) if len(self) else np.zeros((0, *self.size), bool)

    def areas(self) -> np.ndarray:
        return np.array([int(c.sum()) for c in self.crops], np.int64)

    def id_map(self) -> np.ndarray:
        """uint16 [H, W]: instance k (1-based, by descending score) where its mask is; where
        masks overlap the higher-scoring instance wins."""
        out = np.zeros(self.size, np.uint16)
        order = np.argsort(-self.scores, kind="stable")
        for rank in range(len(order) - 1, -1, -1):  # lowest score first, overwritten by higher ones
            k = order[rank]
            y0, x0, y1, x1 = self.boxes[k]
            out[y0:y1, x0:x1][self.crops[k]] = rank + 1
        return out


def from_id_map(ids: np.ndarray, labels: dict | None = None) -> Instances:
    """Ground-truth instances of an id map (0 = background), score 1."""
    from scipy import ndimage

    ids = np.asarray(ids)
    boxes, crops, lab = [], [], []
    for i, sl in enumerate(ndimage.find_objects(ids.astype(np.int64)), start=1):
        if sl is None:
            continue
        boxes.append([sl[0].start, sl[1].start, sl[0].stop, sl[1].stop])
        crops.append(ids[sl] == i)
        lab.append(labels.get(i, 0) if labels else 0)
    return Instances(np.array(boxes, np.int64).reshape(-1, 4), crops, np.ones(len(crops), np.float32), np.array(lab, np.int64), ids.shape)


def overlap_over_smaller(a: Instances, b: Instances) -> np.ndarray:
    """[Na, Nb] |a ∩ b| / min(|a|, |b|) of two instance sets of one image (only pairs whose
    boxes intersect are computed)."""
    out = np.zeros((len(a), len(b)))
    if not len(a) or not len(b):
        return out
    area_a, area_b = a.areas(), b.areas()
    for i in range(len(a)):
        ay0, ax0, ay1, ax1 = a.boxes[i]
        y0, x0 = np.maximum(b.boxes[:, 0], ay0), np.maximum(b.boxes[:, 1], ax0)
        y1, x1 = np.minimum(b.boxes[:, 2], ay1), np.minimum(b.boxes[:, 3], ax1)
        for j in np.flatnonzero((y1 > y0) & (x1 > x0)):
            by0, bx0 = b.boxes[j, :2]
            ca = a.crops[i][y0[j] - ay0 : y1[j] - ay0, x0[j] - ax0 : x1[j] - ax0]
            cb = b.crops[j][y0[j] - by0 : y1[j] - by0, x0[j] - bx0 : x1[j] - bx0]
            out[i, j] = (ca & cb).sum() / max(min(area_a[i], area_b[j]), 1)
    return out


def mask_nms(inst: Instances, thresh: float = 0.5) -> Instances:
    """Keep instances by descending score, dropping any whose overlap over the smaller mask with a
    kept one exceeds ``thresh``."""
    order = np.argsort(-inst.scores, kind="stable")
    keep: list[int] = []
    for i in order:
        if keep and overlap_over_smaller(inst.subset([i]), inst.subset(keep)).max() > thresh:
            continue
        keep.append(int(i))
    return inst.subset(keep)


def concat(parts: list[Instances], size: tuple) -> Instances:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Instances.empty(*size)
    return Instances(np.concatenate([p.boxes for p in parts]), [c for p in parts for c in p.crops],
                     np.concatenate([p.scores for p in parts]), np.concatenate([p.labels for p in parts]), size)


def merge_tiles(h: int, w: int, tiles: list[tuple[tuple[int, int, int, int], Instances]], merge_iou: float = 0.5) -> Instances:
    """Merge per-tile instances (``((y0, x0, th, tw), instances)``, boxes already in image
    coordinates) into one image of ``h`` x ``w`` (see the module docstring)."""
    whole, cut = [], []
    for (y0, x0, th, tw), inst in tiles:
        b = inst.boxes
        touches = (((b[:, 0] == y0) & (y0 > 0)) | ((b[:, 1] == x0) & (x0 > 0))
                   | ((b[:, 2] == y0 + th) & (y0 + th < h)) | ((b[:, 3] == x0 + tw) & (x0 + tw < w)))
        whole.append(inst.subset(~touches))
        cut.append(inst.subset(touches))
    whole, cut = concat(whole, (h, w)), concat(cut, (h, w))
    if len(whole) and len(cut):
        cut = cut.subset(overlap_over_smaller(cut, whole).max(1) <= merge_iou)
    return mask_nms(concat([whole, cut], (h, w)), merge_iou)


@torch.no_grad()
def predict_instances(model, image, *, tile: int = 512, overlap: float | int = 0.25, score_threshold: float = 0.5,
                      mask_threshold: float = 0.5, min_size: int = 5, device="cpu", merge_iou: float = 0.5, precision=None) -> Instances:
    """Instances of one image (uint8 [H, W, 3] array or float [3, H, W] tensor in [0, 1]) by an
    instance model, tiled when the image exceeds ``tile``: masks are the model's mask
    probabilities above ``mask_threshold``, kept with score >= ``score_threshold`` and at least
    ``min_size`` pixels. ``precision`` (a :class:`lowlabel.precision.Precision`; None: fp32):
    the model runs under its autocast; scores and mask probabilities are compared in float32."""
    x = torch.from_numpy(np.array(image[..., :3], copy=True)).permute(2, 0, 1).float().div(255) if isinstance(image, np.ndarray) else image.float()
    h, w = x.shape[1:]
    grid = TileGrid(h, w, tile, overlap)
    tiles = []
    for (y0, x0, th, tw) in grid:
        with precision.autocast() if precision is not None else nullcontext():
            det = model.detect(x[:, y0 : y0 + th, x0 : x0 + tw].unsqueeze(0).to(device), score_threshold=score_threshold)[0]
        scores = det["scores"].float().cpu().numpy()
        keep = scores >= score_threshold
        masks = (det["masks"][torch.from_numpy(keep)].float() > mask_threshold).cpu().numpy()
        inst = Instances.from_masks(masks, scores[keep], det["labels"].cpu().numpy()[keep], offset=(y0, x0), size=(h, w))
        tiles.append(((y0, x0, th, tw), inst.subset(inst.areas() >= min_size)))
    if len(tiles) == 1:
        return tiles[0][1]
    return merge_tiles(h, w, tiles, merge_iou)


def mask_ap(predictions: list[Instances], truths: list[Instances], max_dets: int = 1000) -> dict:
    """COCO mask AP, AP50, AP75 (pycocotools) of predictions against ground truths, image by
    image; -1 entries of COCOeval (no ground truth at all) become None."""
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("mask AP needs pycocotools: pip install 'lowlabel[coco]'") from None
    import contextlib
    import io

    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} ground truths")
    images, anns, dets = [], [], []
    classes = sorted({int(c) for t in truths for c in t.labels} | {int(c) for p in predictions for c in p.labels} | {0})

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        r["counts"] = r["counts"].decode("ascii")
        return r

    for i, (p, t) in enumerate(zip(predictions, truths)):
        h, w = t.size
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for k in range(len(t)):
            r = rle(t.mask(k))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(t.labels[k]) + 1, "segmentation": r,
                         "area": float(t.crops[k].sum()), "bbox": list(mask_utils.toBbox(r)), "iscrowd": 0})
        for k in range(len(p)):
            dets.append({"image_id": i + 1, "category_id": int(p.labels[k]) + 1, "segmentation": rle(p.mask(k)), "score": float(p.scores[k])})
    n_gt = len(anns)
    out = {"ap": None, "ap50": None, "ap75": None, "instances": n_gt, "detections": len(dets)}
    if not n_gt:
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c + 1, "name": str(c)} for c in classes]}
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else COCO()
        if not dets:
            return {**out, "ap": 0.0, "ap50": 0.0, "ap75": 0.0}
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.maxDets = [max_dets // 100, max_dets // 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [None if v < 0 else float(v) for v in ev.stats[:3]]
    return {**out, "ap": s[0], "ap50": s[1], "ap75": s[2]}


def count_errors(predictions: list[Instances], truths: list[Instances]) -> dict:
    """Counting: mean absolute and mean relative error of the number of instances per image."""
    n_p = np.array([len(p) for p in predictions], float)
    n_t = np.array([len(t) for t in truths], float)
    if not len(n_t):
        return {"count_mae": None, "count_mre": None}
    return {"count_mae": float(np.abs(n_p - n_t).mean()), "count_mre": float((np.abs(n_p - n_t) / np.maximum(n_t, 1)).mean())}


def evaluate_instances(model, dataset, *, eval_cfg, device, score_threshold: float = 0.5, progress: bool = False, precision=None) -> dict:
    """Mask AP / AP50 / AP75 (all detections, ranked by score), counting errors (detections with
    score >= ``score_threshold``) and the numbers of instances of a labeled instance dataset."""
    from ..utils import progress_bar

    was = model.training
    model.eval()
    n = len(dataset) if eval_cfg.max_images is None else min(len(dataset), eval_cfg.max_images)
    preds, truths = [], []
    with progress_bar("evaluating", n, enabled=progress, transient=True) as adv:
        for i in range(n):
            raw = dataset.load(i)
            preds.append(predict_instances(model, raw["image"], tile=eval_cfg.tile, overlap=eval_cfg.overlap, score_threshold=0.0, device=device, precision=precision))
            truths.append(from_id_map(raw["instances"]))
            adv()
    model.train(was)
    out = mask_ap(preds, truths)
    confident = [p.subset(p.scores >= score_threshold) for p in preds]
    out.update(count_errors(confident, truths))
    out.update({"images": n, "predicted_instances": int(sum(len(p) for p in confident))})
    return out


def instance_colours(n: int) -> np.ndarray:
    """n distinct-looking RGB colours (golden-angle hues), uint8 [n, 3]; row k is instance k + 1."""
    import colorsys

    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0)] for k in range(n)], np.uint8).reshape(-1, 3)


def instance_overlay(image: np.ndarray, ids: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 [H, W, 3]: each instance of the id map blended in its own colour, outlined."""
    from scipy import ndimage

    out = image[..., :3].astype(np.float32).copy()
    n = int(ids.max(initial=0))
    if n:
        pal = np.concatenate([np.zeros((1, 3), np.uint8), instance_colours(n)]).astype(np.float32)
        fg = ids > 0
        out[fg] = out[fg] * (1 - alpha) + pal[ids[fg]] * alpha
        edge = fg & (ndimage.grey_erosion(ids, size=3) != ndimage.grey_dilation(ids, size=3))
        out[edge] = pal[ids[edge]]
    return out.clip(0, 255).astype(np.uint8)


def coco_results(image_id: int, inst: Instances) -> list[dict]:
    """COCO results-format entries (RLE ``segmentation``, ``bbox`` x, y, w, h, ``score``,
    ``category_id`` = class + 1) of one image's instances, in descending score order."""
    from pycocotools import mask as mask_utils

    out = []
    for k in np.argsort(-inst.scores, kind="stable"):
        r = mask_utils.encode(np.asfortranarray(inst.mask(k).astype(np.uint8)))
        r["counts"] = r["counts"].decode("ascii")
        out.append({"image_id": image_id, "category_id": int(inst.labels[k]) + 1, "segmentation": r,
                    "bbox": [float(v) for v in mask_utils.toBbox(r)], "area": int(inst.crops[k].sum()), "score": round(float(inst.scores[k]), 5)})
    return out


def instance_table(summary: dict, title: str = "evaluation"):
    """A rich table of mask AP / AP50 / AP75 and counting errors."""
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, name in (("ap", "mask AP (0.50:0.95)"), ("ap50", "AP50"), ("ap75", "AP75")):
        t.add_row(name, pct(summary.get(k)))
    t.add_section()
    t.add_row("instances (truth)", str(summary.get("instances")))
    t.add_row("predicted (score >= 0.5)", str(summary.get("predicted_instances")))
    mae = summary.get("count_mae")
    t.add_row("count error per image (mean abs)", "-" if mae is None else f"{mae:.2f}")
    return t
