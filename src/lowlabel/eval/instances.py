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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.tiling import TileGrid


@dataclass
class Instances:
    """Instances of one image: ``masks`` bool [N, H, W], ``scores`` float [N], ``labels`` int [N]."""

    masks: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, h: int, w: int) -> "Instances":
        return cls(np.zeros((0, h, w), bool), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def id_map(self) -> np.ndarray:
        """uint16 [H, W]: instance k (1-based, by descending score) where its mask is; where
        masks overlap the higher-scoring instance wins."""
        h, w = self.masks.shape[1:]
        out = np.zeros((h, w), np.uint16)
        order = np.argsort(-self.scores, kind="stable")
        for rank in range(len(order) - 1, -1, -1):  # lowest score first, overwritten by higher ones
            out[self.masks[order[rank]]] = rank + 1
        return out


def from_id_map(ids: np.ndarray, labels: dict | None = None) -> Instances:
    """Ground-truth instances of an id map (0 = background), score 1."""
    ids = np.asarray(ids)
    u = np.unique(ids)
    u = u[u > 0]
    masks = ids[None] == u[:, None, None] if len(u) else np.zeros((0,) + ids.shape, bool)
    lab = np.array([labels.get(int(i), 0) if labels else 0 for i in u], np.int64)
    return Instances(masks, np.ones(len(u), np.float32), lab)


def overlap_over_smaller(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[Na, Nb] |a ∩ b| / min(|a|, |b|) of two stacks of boolean masks."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    small = np.minimum(fa.sum(1)[:, None], fb.sum(1)[None, :])
    return inter / np.maximum(small, 1)


def mask_nms(inst: Instances, thresh: float = 0.5) -> Instances:
    """Keep instances by descending score, dropping any whose overlap over the smaller mask with a
    kept one exceeds ``thresh``."""
    order = np.argsort(-inst.scores, kind="stable")
    keep: list[int] = []
    for i in order:
        if keep and overlap_over_smaller(inst.masks[i : i + 1], inst.masks[keep]).max() > thresh:
            continue
        keep.append(int(i))
    return Instances(inst.masks[keep], inst.scores[keep], inst.labels[keep])


def merge_tiles(h: int, w: int, tiles: list[tuple[tuple[int, int, int, int], Instances]], merge_iou: float = 0.5) -> Instances:
    """Merge per-tile instances (``((y0, x0, th, tw), instances in tile coordinates)``) into one
    image of ``h`` x ``w`` (see the module docstring)."""
    whole, cut = [], []
    for (y0, x0, th, tw), inst in tiles:
        for k in range(len(inst)):
            m = inst.masks[k]
            touches = ((y0 > 0 and m[0].any()) or (x0 > 0 and m[:, 0].any())
                       or (y0 + th < h and m[-1].any()) or (x0 + tw < w and m[:, -1].any()))
            full = np.zeros((h, w), bool)
            full[y0 : y0 + th, x0 : x0 + tw] = m
            (cut if touches else whole).append((full, float(inst.scores[k]), int(inst.labels[k])))
    if whole and cut:
        wm = np.stack([x[0] for x in whole])
        ov = overlap_over_smaller(np.stack([x[0] for x in cut]), wm).max(1)
        cut = [c for c, o in zip(cut, ov) if o <= merge_iou]
    items = whole + cut
    if not items:
        return Instances.empty(h, w)
    merged = Instances(np.stack([x[0] for x in items]), np.array([x[1] for x in items], np.float32), np.array([x[2] for x in items], np.int64))
    return mask_nms(merged, merge_iou)


@torch.no_grad()
def predict_instances(model, image, *, tile: int = 512, overlap: float | int = 0.25, score_threshold: float = 0.5,
                      mask_threshold: float = 0.5, min_size: int = 5, device="cpu", merge_iou: float = 0.5) -> Instances:
    """Instances of one image (uint8 [H, W, 3] array or float [3, H, W] tensor in [0, 1]) by an
    instance model, tiled when the image exceeds ``tile``: masks are the model's mask
    probabilities above ``mask_threshold``, kept with score >= ``score_threshold`` and at least
    ``min_size`` pixels."""
    x = torch.from_numpy(np.array(image[..., :3], copy=True)).permute(2, 0, 1).float().div(255) if isinstance(image, np.ndarray) else image.float()
    h, w = x.shape[1:]
    grid = TileGrid(h, w, tile, overlap)
    tiles = []
    for (y0, x0, th, tw) in grid:
        det = model(x[:, y0 : y0 + th, x0 : x0 + tw].unsqueeze(0).to(device))[0]
        masks = (det["masks"] > mask_threshold).cpu().numpy()
        scores = det["scores"].cpu().numpy()
        keep = (scores >= score_threshold) & (masks.reshape(len(masks), th * tw).sum(1) >= min_size)
        tiles.append(((y0, x0, th, tw), Instances(masks[keep], scores[keep].astype(np.float32), det["labels"].cpu().numpy()[keep])))
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
        h, w = t.masks.shape[1:] if len(t) else p.masks.shape[1:]
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for k in range(len(t)):
            r = rle(t.masks[k])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(t.labels[k]) + 1, "segmentation": r,
                         "area": float(t.masks[k].sum()), "bbox": list(mask_utils.toBbox(r)), "iscrowd": 0})
        for k in range(len(p)):
            dets.append({"image_id": i + 1, "category_id": int(p.labels[k]) + 1, "segmentation": rle(p.masks[k]), "score": float(p.scores[k])})
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


def evaluate_instances(model, dataset, *, eval_cfg, device, score_threshold: float = 0.5, progress: bool = False) -> dict:
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
            preds.append(predict_instances(model, raw["image"], tile=eval_cfg.tile, overlap=eval_cfg.overlap, score_threshold=0.0, device=device))
            truths.append(from_id_map(raw["instances"]))
            adv()
    model.train(was)
    out = mask_ap(preds, truths)
    confident = [Instances(p.masks[p.scores >= score_threshold], p.scores[p.scores >= score_threshold], p.labels[p.scores >= score_threshold]) for p in preds]
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
        r = mask_utils.encode(np.asfortranarray(inst.masks[k].astype(np.uint8)))
        r["counts"] = r["counts"].decode("ascii")
        out.append({"image_id": image_id, "category_id": int(inst.labels[k]) + 1, "segmentation": r,
                    "bbox": [float(v) for v in mask_utils.toBbox(r)], "area": int(inst.masks[k].sum()), "score": round(float(inst.scores[k]), 5)})
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
