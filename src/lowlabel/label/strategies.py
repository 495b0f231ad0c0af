"""What makes an image worth labeling: pixel scores, their reduction to an image score, and the
selection rules of ``lowlabel suggest``. Pure functions of probabilities and features, no I/O.

Pixel scores (higher = more worth labeling), each a map [H, W] from softmax probabilities
``probs`` float [C, H, W]:

- :func:`pixel_entropy`: Shannon entropy ``-sum_c p_c log p_c`` (nats), the uncertainty sampling
  of Settles (2009, "Active Learning Literature Survey", sec. 3.1) applied per pixel.
- :func:`pixel_margin`: ``1 - (p_(1) - p_(2))``, one minus the gap between the two most probable
  classes (margin sampling, Scheffer et al. 2001, "Active Hidden Markov Models for Information
  Extraction"), so that higher means more uncertain like the others.
- :func:`weighted_entropy` / :func:`weighted_margin`: the class-balanced forms, with the class
  weights of :func:`class_weights` (see there for the exact definition).
- :func:`mutual_information`: BALD (Houlsby et al. 2011, "Bayesian Active Learning for
  Classification and Preference Learning"; with MC dropout as the posterior, Gal, Islam &
  Ghahramani 2017, "Deep Bayesian Active Learning with Image Data"): the entropy of the mean
  prediction minus the mean entropy of the T sampled predictions.

**The one reduction from pixels to an image** (:func:`image_score`): the mean of the pixel score
over the image's pixels. A mean does not favour large images (every image's score is in the
range of its pixel score) and an image scores high when much of it is uncertain, not when one
boundary is. Where whole cases are labeled (``group_by``), a case's score is the mean (default)
or the max of its images' scores (:func:`aggregate`).

Selection over units (images or cases):

- :func:`k_center_greedy`: the greedy 2-approximation of the k-center problem that Sener &
  Savarese (ICLR 2018, "Active Learning for Convolutional Neural Networks: A Core-Set
  Approach", Algorithm 1) use: repeatedly take the unit farthest (Euclidean) from every
  labeled and already chosen unit.
- :func:`hybrid_order`: uncertainty first, then diversity: the ``m`` most uncertain units are
  the candidates, and k-center greedy orders them. This is the two-step scheme of Suggestive
  Annotation (Yang et al., MICCAI 2017: uncertainty top-K, then representativeness), close in
  spirit to BADGE (Ash et al., ICLR 2020) but not BADGE: BADGE runs k-means++ seeding once in a
  space of last-layer gradient embeddings under the predicted label, whose norm carries the
  uncertainty and whose direction the diversity; here uncertainty is a hard filter and
  diversity is measured on the encoder's pooled features, so it needs no per-pixel gradients
  (which for segmentation would be [H*W*D*C] per image).
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-12

# Pseudo-count of the class frequencies in class_weights: 1 % of the labeled pixels, spread evenly
# over the classes, so that a class the labeled set lacks has a finite (and the largest) weight.
SMOOTHING = 0.01


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy per pixel (nats): probs [C, H, W] (or [..., C, H, W]) -> [H, W]."""
    p = probs.float().clamp_min(0)
    return -(p * p.clamp_min(EPS).log()).sum(-3)


def pixel_margin(probs: torch.Tensor) -> torch.Tensor:
    """``1 - (p_(1) - p_(2))`` per pixel: 0 where one class is certain, 1 where the top two tie.
    One class only: 0 everywhere."""
    p = probs.float()
    if p.shape[-3] < 2:
        return torch.zeros(p.shape[:-3] + p.shape[-2:])
    top = p.topk(2, dim=-3).values
    return 1.0 - (top[..., 0, :, :] - top[..., 1, :, :])


def class_weights(counts, smoothing: float = SMOOTHING) -> np.ndarray:
    """Class weights inverse to the labeled set's class frequencies.

    With ``n_c`` labeled pixels of class ``c`` (``counts``, ignore pixels excluded), ``N`` their
    sum and ``C`` the number of classes, the smoothed frequency is
    ``f_c = (n_c + smoothing * N / C) / (N * (1 + smoothing))`` (sums to 1) and the weight is
    ``w_c = 1 / (C * f_c)``: 1 for every class when the classes are equally frequent, larger for
    rarer classes, largest (``(1 + smoothing) / smoothing`` = 101 by default) for a class absent
    from the labeled set. This is inverse-frequency class balancing (as median-frequency
    balancing, Eigen & Fergus, ICCV 2015, but normalised to the uniform case rather than the
    median); without labeled pixels every weight is 1.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or not len(n):
        raise ValueError(f"counts must be a non-empty 1-D array of per-class pixel counts, got shape {n.shape}")
    if (n < 0).any():
        raise ValueError("class pixel counts must be non-negative")
    C, N = len(n), float(n.sum())
    if N <= 0:
        return np.ones(C)
    f = (n + smoothing * N / C) / (N * (1 + smoothing))
    return 1.0 / (C * f)


def weighted_entropy(probs: torch.Tensor, weights) -> torch.Tensor:
    """Class-balanced entropy per pixel: ``-sum_c w_c p_c log p_c`` (the weighted entropy of
    Guiasu, 1971, "Weighted entropy", with the weights of :func:`class_weights`). A pixel whose
    probability mass lies partly on a rare class counts that part ``w_c`` times."""
    p = probs.float().clamp_min(0)
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32).view(-1, 1, 1)
    if w.shape[0] != p.shape[-3]:
        raise ValueError(f"{w.shape[0]} class weights for {p.shape[-3]} classes")
    return -(w * p * p.clamp_min(EPS).log()).sum(-3)


def weighted_margin(probs: torch.Tensor, weights) -> torch.Tensor:
    """Class-balanced margin per pixel: ``max(w_(1), w_(2)) * (1 - (p_(1) - p_(2)))``, the margin
    scaled by the weight of the rarer of the two classes the pixel hesitates between."""
    p = probs.float()
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    if w.shape[0] != p.shape[-3]:
        raise ValueError(f"{w.shape[0]} class weights for {p.shape[-3]} classes")
    if p.shape[-3] < 2:
        return torch.zeros(p.shape[-2:])
    top = p.topk(2, dim=-3)
    gap = top.values[0] - top.values[1]
    return torch.maximum(w[top.indices[0]], w[top.indices[1]]) * (1.0 - gap)


class MutualInformation:
    """BALD's mutual information accumulated over T stochastic predictions, one at a time (so
    memory holds two maps, not T): ``add(probs)`` for each sample [C, H, W], then
    :meth:`maps` gives (mutual information, predictive entropy, expected entropy), each [H, W],
    with ``MI = H[mean_t p_t] - mean_t H[p_t]`` (>= 0: Jensen)."""

    def __init__(self):
        self.sum_p: torch.Tensor | None = None
        self.sum_h: torch.Tensor | None = None
        self.count = 0

    def add(self, probs: torch.Tensor) -> None:
        p = probs.float()
        h = pixel_entropy(p)
        self.sum_p = p.clone() if self.sum_p is None else self.sum_p.add_(p)
        self.sum_h = h if self.sum_h is None else self.sum_h.add_(h)
        self.count += 1

    def mean_probs(self) -> torch.Tensor:
        if not self.count:
            raise ValueError("no predictions added")
        return self.sum_p / self.count

    def maps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        predictive = pixel_entropy(self.mean_probs())
        expected = self.sum_h / self.count
        return (predictive - expected).clamp_min(0), predictive, expected


def mutual_information(samples: torch.Tensor) -> torch.Tensor:
    """BALD per pixel from T predictions ``samples`` [T, C, H, W] -> [H, W]."""
    acc = MutualInformation()
    for s in samples:
        acc.add(s)
    return acc.maps()[0]


def image_score(pixel_map: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """The image score of a pixel score map: its mean over the (valid) pixels."""
    m = pixel_map.float()
    if valid is not None:
        m = m[valid.bool()]
    return float(m.mean()) if m.numel() else 0.0


AGGREGATES = ("mean", "max")


def aggregate(values, how: str = "mean") -> float:
    """A case's score from its images' scores: ``mean`` (a case scores high when it is uncertain
    throughout) or ``max`` (when its most uncertain image is)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no scores to aggregate")
    if how == "mean":
        return sum(vals) / len(vals)
    if how == "max":
        return max(vals)
    raise ValueError(f"unknown aggregate {how!r}; choose from {AGGREGATES}")


def order_by_score(scores, names) -> list[int]:
    """Indices by descending score, ties broken by name (so the order never depends on the
    order the pool was listed in)."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), str(names[i])))


def k_center_greedy(features: np.ndarray, centers: np.ndarray | None = None, count: int | None = None) -> tuple[list[int], list[float]]:
    """Sener & Savarese's greedy k-center: ``count`` (default: all) indices of ``features``
    [N, D], each the row farthest (Euclidean) from ``centers`` [M, D] and the rows already
    taken, and each one's distance at the time it was taken. Ties go to the lower index. With
    no centers the first pick is the row farthest from the mean of ``features``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    n = len(x)
    count = n if count is None else min(int(count), n)
    if n == 0 or count <= 0:
        return [], []
    c = np.zeros((0, x.shape[1])) if centers is None else np.asarray(centers, dtype=np.float64).reshape(-1, x.shape[1])
    if len(c):
        # min over centers of the distance, a block of centers at a time (memory N x block)
        best = np.full(n, np.inf)
        for i in range(0, len(c), 1024):
            d = _distances(x, c[i:i + 1024])
            best = np.minimum(best, d.min(1))
    else:
        best = np.full(n, np.inf)
    order, dist = [], []
    taken = np.zeros(n, bool)
    for _ in range(count):
        if np.isinf(best).all():  # no centers yet: farthest from the pool's mean
            cand = np.where(~taken, np.linalg.norm(x - x.mean(0), axis=1), -np.inf)
            i = int(np.argmax(cand))
            dist.append(float(cand[i]))
        else:
            cand = np.where(taken, -np.inf, best)
            i = int(np.argmax(cand))
            dist.append(float(cand[i]))
        order.append(i)
        taken[i] = True
        best = np.minimum(best, np.linalg.norm(x - x[i], axis=1))
    return order, dist


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0))


def hybrid_order(uncertainty, features: np.ndarray, names, centers: np.ndarray | None, candidates: int) -> tuple[list[int], list[float | None]]:
    """Uncertainty first, then diversity: the ``candidates`` most uncertain units, in k-center
    greedy order (from ``centers``, the labeled units), then the other units by descending
    uncertainty. Returns the order and each unit's k-center distance (None outside the
    candidates)."""
    by_u = order_by_score(uncertainty, names)
    m = max(1, min(int(candidates), len(by_u)))
    top = by_u[:m]
    sub, dist = k_center_greedy(np.asarray(features)[top], centers)
    order = [top[k] for k in sub] + by_u[m:]
    return order, dist + [None] * (len(by_u) - m)


def candidate_count(budget_units: int, factor: float, total: int) -> int:
    """How many of the most uncertain units the hybrid strategy keeps: ``factor`` times the
    units the budget buys (at least that many), at most all."""
    return max(budget_units, min(total, math.ceil(factor * budget_units)))
