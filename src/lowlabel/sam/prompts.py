"""Prompts from (coarse) masks, and the choice among a promptable segmenter's candidate masks.

Coordinates: points are (x, y) = (column, row) in original image pixels, float; masks are
bool [H, W]. Every sampler takes an explicit ``numpy.random.Generator``.

Samplers (SeSAM Table 4 and S4M sec. 4.2):

- ``skeleton``: SeSAM's skeleton-aware probabilistic grid sampling. A probability over the
  mask from the normalised Euclidean distance field (distance to the nearest background pixel
  over its maximum), with the topological skeleton set to the highest value; the mask's bounding
  box (s1 x s2, S = s1 s2) is cut into a ceil(s1 / sqrt(S/K)) x ceil(s2 / sqrt(S/K)) grid (eq. 2);
  K cells that contain mask pixels are drawn at random and one point is drawn in each in
  proportion to the probability. With fewer non-empty cells than K, the rest are drawn from the
  whole mask. K = 5 (SeSAM sec. 4).
- ``probability``: S4M eq. 3, points drawn in proportion to the normalised per-pixel mask
  probability (the teacher's soft mask) inside the mask.
- ``topk``: the K highest-confidence pixels (the "high confidence" baseline). Without a
  probability map, the distance field stands in for confidence.
- ``center``: distance-transform maxima, taken greedily with a minimum spacing.
- ``boundary``: uniform over the inner boundary band (distance <= 2 px).
- ``random``: uniform over the mask.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

SAMPLERS = ("skeleton", "probability", "topk", "center", "boundary", "random")
SELECTIONS = ("coverage", "score", "random", "smallest")


def instances(mask: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """SeSAM eq. 1: a class mask split into its connected components (8-connectivity),
    largest first; components below ``min_pixels`` are dropped."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    return [lab == (i + 1) for i in order if sizes[i] >= min_pixels]


def distance_field(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest background pixel (image borders
    count as background), normalised to [0, 1]."""
    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return d / d.max() if d.max() > 0 else d


def _draw_idx(weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` indices without replacement, in proportion to ``weights`` (uniform if all zero)."""
    if len(weights) == 0 or k <= 0:
        return np.zeros(0, dtype=int)
    w = np.clip(weights.astype(np.float64), 0, None)
    n = int((w > 0).sum())
    if n == 0:
        w, n = np.ones(len(w)), len(w)
    return rng.choice(len(w), size=min(k, n), replace=False, p=w / w.sum())


def _draw(coords: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return coords[_draw_idx(weights, k, rng)]


def _xy(rc: np.ndarray) -> np.ndarray:
    """(row, col) pixel indices -> (x, y) pixel-centre coordinates."""
    return rc[:, ::-1].astype(np.float32) + 0.5 if len(rc) else np.zeros((0, 2), np.float32)


def skeleton_probability(mask: np.ndarray) -> np.ndarray:
    p = distance_field(mask)
    p[skeletonize(mask)] = 1.0
    return p * mask


def sample_points(mask: np.ndarray, k: int, sampler: str, rng: np.random.Generator, prob: np.ndarray | None = None) -> np.ndarray:
    """K points (x, y) inside ``mask`` by ``sampler``; fewer when the mask has fewer pixels."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    mask = mask.astype(bool)
    rc = np.argwhere(mask)
    if len(rc) == 0 or k <= 0:
        return np.zeros((0, 2), np.float32)
    if sampler == "random":
        return _xy(_draw(rc, np.ones(len(rc)), k, rng))
    if sampler == "probability":
        if prob is None:
            raise ValueError("the 'probability' sampler needs a probability map")
        return _xy(_draw(rc, prob[mask], k, rng))
    if sampler == "topk":
        conf = prob[mask] if prob is not None else distance_field(mask)[mask]
        order = np.lexsort((rng.random(len(rc)), -conf))  # ties broken at random
        return _xy(rc[order[:k]])
    if sampler == "boundary":
        d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        band = np.argwhere(mask & (d <= 2))
        return _xy(_draw(band, np.ones(len(band)), k, rng))
    if sampler == "center":
        d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        spacing = max(2.0, math.sqrt(mask.sum() / max(k, 1)) / 2)
        picked: list[np.ndarray] = []
        order = np.argsort(-d[mask], kind="stable")
        for i in order:
            p = rc[i]
            if all(np.hypot(*(p - q)) >= spacing for q in picked):
                picked.append(p)
                if len(picked) == k:
                    break
        return _xy(np.array(picked))
    # skeleton-aware grid sampling (SeSAM sec. 3.2, eq. 2)
    p = skeleton_probability(mask)
    r0, c0 = rc.min(0)
    r1, c1 = rc.max(0) + 1
    s1, s2 = r1 - r0, c1 - c0
    cell = math.sqrt(s1 * s2 / k)
    g1, g2 = math.ceil(s1 / cell), math.ceil(s2 / cell)
    cell_of = ((rc[:, 0] - r0) * g1 // s1) * g2 + (rc[:, 1] - c0) * g2 // s2
    weights = p[mask]  # same order as rc (row-major)
    nonempty = np.unique(cell_of)
    picked = []
    for c in rng.choice(nonempty, size=min(k, len(nonempty)), replace=False):
        idx = np.flatnonzero(cell_of == c)
        picked.append(idx[_draw_idx(weights[idx], 1, rng)[0]])
    if len(picked) < k:  # fewer non-empty cells than K: the rest from the whole mask
        rest = np.setdiff1d(np.arange(len(rc)), picked)
        picked += list(rest[_draw_idx(weights[rest], k - len(picked), rng)])
    pts = rc[np.array(picked, dtype=int)]
    return _xy(pts)


def coverage_compatibility(candidates: np.ndarray, weak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SeSAM: r_i = |S_i n W| / |W| (coverage) and p_i = |S_i n W| / |S_i| (compatibility) for
    candidates [n, H, W] and a weak mask W [H, W]."""
    weak = weak.astype(bool)
    inter = (candidates & weak).reshape(len(candidates), -1).sum(1).astype(np.float64)
    area = candidates.reshape(len(candidates), -1).sum(1).astype(np.float64)
    r = inter / max(weak.sum(), 1)
    p = np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)
    return r, p


def select_mask(candidates: np.ndarray, scores: np.ndarray, rule: str, rng: np.random.Generator, weak: np.ndarray | None = None, tau1: float = 0.3, tau2: float = 0.7) -> int:
    """Index of the chosen candidate.

    ``coverage`` (SeSAM): among candidates with r >= tau1 and p >= tau2 the highest p; if none
    qualifies, the highest p overall. ``score``: highest predicted score. ``random``.
    ``smallest``: the smallest non-empty area (used to turn points/scribbles into a first coarse
    mask, SeSAM sec. 3.2)."""
    if rule not in SELECTIONS:
        raise ValueError(f"unknown selection rule {rule!r}; choose from {SELECTIONS}")
    n = len(candidates)
    if rule == "score":
        return int(np.argmax(scores))
    if rule == "random":
        return int(rng.integers(n))
    if rule == "smallest":
        area = candidates.reshape(n, -1).sum(1).astype(float)
        area[area == 0] = np.inf
        return int(np.argmin(area)) if np.isfinite(area).any() else 0
    if weak is None:
        raise ValueError("the 'coverage' rule needs the weak mask")
    r, p = coverage_compatibility(candidates, weak)
    ok = (r >= tau1) & (p >= tau2)
    if ok.any():
        return int(np.flatnonzero(ok)[np.argmax(p[ok])])
    return int(np.argmax(p))
