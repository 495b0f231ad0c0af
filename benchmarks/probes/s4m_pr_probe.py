"""Does S4M's pseudo-label refinement (PR) keep a near-perfect pseudo-mask good?

Finding (results/s4m-pr-probe/classical.jsonl, ``--images 30``: 223 nuclei): not with the
weight-free classical backend. Soft masks at IoU 0.962 (thresholded at 0.5) come out of PR at mean
IoU 0.485; 24 % fall under 0.3 and 19 % grow past 3x the nucleus's area. So dsb2018-cpu's
``s4m_pr_arp`` row measures this stand-in, not S4M's PR, which needs SAM's weights; hence the
protocol's ``s4m_arp`` row (ARP without PR).

From each of the first ``--images`` dsb2018 train images (top-left ``--crop`` px), every true
nucleus of at least 5 px becomes a near-perfect soft pseudo-mask: its mask blurred (Gaussian,
sigma 1.5), scaled to a peak of 1, floored at 0.01 inside the nucleus's box (padded 2 px) and 0
outside. PR then runs as :class:`lowlabel.methods.instance.S4M` runs it: ``--points`` points
drawn with probability proportional to the soft mask, one point set per nucleus, the backend's
best-scoring mask. Reported: the IoU with the true nucleus of the soft mask thresholded at 0.5
(what PR starts from) and of the refined mask, the share of refined masks under IoU 0.3, and the
refined / true area ratio.

    python benchmarks/probes/s4m_pr_probe.py [--backend classical] [--checkpoint FILE] [--images 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from lowlabel.sam import build_segmenter
from lowlabel.sam.prompts import sample_points
from lowlabel.sam.refine import segment_point_sets


def soft_mask(nucleus: np.ndarray) -> np.ndarray:
    blur = ndimage.gaussian_filter(nucleus.astype(float), 1.5)
    rows, cols = np.where(nucleus)
    box = np.zeros_like(nucleus)
    box[max(rows.min() - 2, 0): rows.max() + 3, max(cols.min() - 2, 0): cols.max() + 3] = True
    return np.where(box, np.clip(blur / blur.max(), 0.01, 1.0), 0.0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def train_crops(root: Path, ids: list[str], crop: int):
    """(id, RGB uint8 crop, instance-id crop) of the top-left ``crop`` px of each listed image."""
    for sid in ids:
        image = np.array(Image.open(next((root / "images").glob(f"{sid}.*"))).convert("RGB"))[:crop, :crop]
        yield sid, image, np.array(Image.open(root / "instances" / f"{sid}.png")).astype(np.int64)[:crop, :crop]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/datasets/dsb2018-nuclei")
    ap.add_argument("--backend", default="classical")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--points", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = Path(args.root)
    seg = build_segmenter(args.backend, checkpoint=args.checkpoint)
    if seg.weights_id.startswith("random"):
        ap.error(f"--backend {args.backend} needs --checkpoint: with random weights its masks say nothing about PR")
    rng = np.random.default_rng(args.seed)
    before, after, ratio = [], [], []
    for _, image, ids in train_crops(root, (root / "splits" / "train.txt").read_text().split()[: args.images], args.crop):
        truth = [ids == k for k in np.unique(ids) if k and (ids == k).sum() >= 5]
        if not truth:
            continue
        soft = [soft_mask(t) for t in truth]
        out = segment_point_sets(seg, seg.embed(image), [sample_points(s > 0, args.points, "probability", rng, prob=s) for s in soft])
        best = out.scores.argmax(1)
        for j, t in enumerate(truth):
            refined = out.masks[j, best[j]]
            before.append(iou(soft[j] > 0.5, t))
            after.append(iou(refined, t))
            ratio.append(float(refined.sum() / t.sum()))
    after_a = np.array(after)
    print(json.dumps({
        "backend": args.backend, "weights": seg.weights_id, "nuclei": len(after), "points": args.points,
        "iou_before_mean": round(float(np.mean(before)), 3), "iou_after_mean": round(float(after_a.mean()), 3),
        "iou_after_median": round(float(np.median(after_a)), 3), "share_after_iou_below_0.3": round(float((after_a < 0.3).mean()), 3),
        "area_ratio_median": round(float(np.median(ratio)), 2), "share_area_over_3x": round(float((np.array(ratio) > 3).mean()), 3),
    }))


if __name__ == "__main__":
    main()
