"""RegionMatch (pixel-region collaboration for semi-supervised segmentation of remote-sensing
images; ``../shared/papers/regionmatch.md``) as an add-on over a weak-to-strong base
(:mod:`lowlabel.methods.addon`): ``method.params.base: fixmatch`` (default: the paper's sec. 3.1,
"built upon ... weak-to-strong consistency regularization [Sohn et al., 2020]") or ``unimatch``
(the same terms over UniMatch, which the paper compares against). The base's views, pseudo-labels
and pixel terms L_p (eqs. 1-3) are the ``fixmatch`` / ``unimatch`` code's, with its loss kinds
(``labeled_loss``, ``unlabeled_loss``: ``ce_dice`` / ``dice`` on ACDC) and ``threshold``; RegionMatch
reads the views' decoder features and adds:

- regions: connected components of each class (4-connectivity) of the ground truth (labeled)
  or of the weak view's pseudo-label (unlabeled), sec. 3.3;
- region features R_i = h(masked average pool of the decoder feature map F in region i), h a
  linear projection; region classifier f_r; L_r = mean_l L_r^l + 0.5 mean_u L_r^u with the dual
  threshold tau_low = 0.85 / tau_high = 0.95 on the region's mean confidence (eqs. 5-8);
- PRSPL: per-pixel region-view (f_r of the pixel's region) and pixel-view distributions, their
  entropies, per-image quantile thresholds with alpha_t = alpha_0 (1 - t / T), alpha_0 = 0.2,
  mask = low entropy in both views and the same argmax (eqs. 9-17). The mask replaces the base's
  confidence mask in *every* unlabeled pixel term of the base (eq. 16: FixMatch's strong view;
  on UniMatch both strong views and the feature-perturbed view);
- CIR2R: MSE between the cosine-similarity matrices of all region features of the batch in the
  weak and in the strong view (eqs. 18-19);
- PRCC: -log E_ij = ||R_i - F_j|| for the pixels j of each kept region i (eqs. 20-21; the
  default measures it between normalised features, see ``prcc_distance`` below);
- L = L_p + L_r + 2 L_CIR + 1 L_PR (eq. 4, sec. 4.1) *in the base's scale*: both bases halve their
  pixel terms (FixMatch's (L_x + L_s) / 2; UniMatch's weight_x = 0.5), so the region terms are
  multiplied by the base's labeled weight (0.5) too, keeping eq. 4's ratios to L_p^l. (The code
  before issue 38 weighted L_p 1 + 1, twice lowlabel's FixMatch.) The unlabeled region terms are
  ramped up by default (``region_rampup`` below). With two strong views (UniMatch) L_r^u, CIR2R
  and PRCC are the means over the views.
- With every piece off (``prspl``, ``cir``, ``prcc``, ``region_labeled``, ``region_unlabeled``
  false) RegionMatch is its base exactly (tests/test_methods_addons.py). Ablations: Table 4
  (``prspl``, ``cir``, ``prcc``), Table 5 (``region_labeled``, ``region_unlabeled``), Table 6
  (``dynamic_alpha``), Table 7 (``region_labels``).

Decisions and deviations (stated):

- CutMix and region correspondence: a region is identified by its weak-view id (global across
  the batch). The strong view is mixed with the same box as the pseudo-labels, and its region-id
  map is mixed with that box too, so every pixel of the mixed image still carries the id of the
  region it came from. Strong-view region features pool each region over its *visible* pixels
  (possibly in two mixed images); regions with no visible pixel drop out of L_r^u, CIR2R and
  PRCC. Targets (weak-view pseudo-labels, region targets, S^w) are detached.
- The weak view gives the targets; the strong view receives every unlabeled loss (L_p^u,
  L_r^u, S^s in CIR2R, PRCC), as in FixMatch.
- L_p^u (eq. 16) is the base's: the masked CE summed over the batch and divided by its valid
  pixels (eq. 16 averages per image first; the same when the images have equal valid pixels), or
  the base's Dice with ``unlabeled_loss: dice``.
- Region pooling, similarities and PRCC run in float32 with autocast off (bf16 training).
- PRSPL's alpha schedule (``alpha_schedule``). alpha_t is the share of pixels each view's
  entropy filter drops: T = Quantile(H, 1 - alpha_t) keeps the (1 - alpha_t) lowest-entropy
  pixels of an image. The paper's text contradicts itself, so both readings are selectable:
  ``equations`` (eqs. 13-15, the default): alpha_t = alpha_0 (1 - t / T_epochs) falls from
  alpha_0 to 0, so the kept share *grows* from 1 - alpha_0 (80%) to ~100% (U2PL's convention);
  ``prose`` (sec. 4.3, "a higher threshold ... in later stages to prevent the model from fitting
  noisy data"): alpha_t = alpha_0 t / T_epochs rises from 0 to alpha_0, so the kept share
  *shrinks* from 100% to 1 - alpha_0, i.e. the same range walked the other way. With
  ``dynamic_alpha: false`` (Table 6 "fixed") alpha_t = alpha_0 throughout.
- PRCC (eq. 21) sums over a region's pixels; lowlabel averages within each region
  (``prcc_reduction: mean``) so the loss does not scale with the crop size; ``sum`` is there.
  Pixel features are projected by the same h so that R_i and F_j share a space (for a linear h,
  R_i is then exactly the mean of the projected pixel features).

Deviations for training from scratch (the paper starts from ImageNet weights at lr 0.002).
Measured on dubai-aerial with DeepLabV3+ from scratch, the paper's form collapses to the
majority class: at step 20 the encoder gradient norms were L_x 8.5, L_p^u 33, 0.5 L_r^u 66,
2 L_CIR 17, PRCC 244, and the few regions passing tau_low were whole images predicted as one
class. Each fix is an option; the paper's form stays selectable:

- ``prcc_distance: normalized`` (default; paper: ``euclidean``): eq. 20's distance is taken
  between the L2-normalised R_i and F_j, so it lies in [0, 2] and does not depend on the feature
  scale. The Euclidean distance on 256-d features is unbounded, and its cheapest minimiser is
  shrinking (or collapsing) all features.
- ``region_rampup: 0.2`` (default; paper: 0, no ramp-up): the unlabeled region terms (L_r^u,
  CIR2R, PRCC) are multiplied by w(t), which rises from 0 at the first step to 1 once
  ``ctx.progress`` reaches ``region_rampup`` (a fraction of the run's iterations). Shape
  ``sigmoid`` (default): Mean Teacher's exp(-5 (1 - t)^2), shifted and rescaled so that w(0) is
  exactly 0 and w(1) = 1; or ``linear``: w = t. L_p and L_r^l are never ramped.
- ``max_region_share: 0.8`` (default; paper: 1.0, i.e. no limit): an unlabeled (pseudo-label)
  region covering more than this share of its image's valid pixels enters none of L_r^u, CIR2R,
  PRCC. A whole image predicted as one class is a region that only tells every pixel to look
  like the majority class. It still gives PRSPL its region view. Labeled regions (ground truth,
  L_r^l) are not limited.
- ``region_pixels`` (default ``all``, the paper): with ``prspl`` a region's pixels enter the
  region losses only where the unlabeled pixel loss keeps them (PRSPL's mask, or FixMatch's
  confidence mask with PRSPL off): R^w, R^s and PRCC's pixels use only those pixels, and a region
  with none drops out. A region's quality (eq. 6), targets (eq. 7) and share use all its pixels.

The step logs, besides the losses, ``regions`` (unlabeled regions found), ``regions_kept``
(passing tau_low), ``regions_too_large`` (over ``max_region_share``), ``regions_in_loss``
(regions entering L_r^u and PRCC) with ``region_share_in_loss`` (their mean share of their
image), ``regions_in_cir`` and ``region_weight`` (w(t)); ``StepOutput.terms`` holds the
weighted terms for the engine's per-term gradient norms.

Other decisions:

- Regions smaller than ``min_region_pixels`` (at label resolution; default 64, i.e. 4 feature
  pixels at stride 4) are not regions; the ``max_regions`` largest regions of a batch are kept
  (default 512) so the N x N similarity matrices stay small. Pixels outside any region have no
  region view and are never selected by PRSPL.
- With PRSPL off (ablation) the unlabeled pixel terms use the base's confidence threshold.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy import ndimage
from torch import nn

from ..data.dataset import IGNORE_INDEX
from .addon import AddOn, AddOnParams, autocast_off
from .base import Targets, accuracy_of, class_mean_iou


class RegionMatchParams(AddOnParams):
    # sec. 3.1: "built upon the classic pseudo-labeling and weak-to-strong consistency regularization
    # framework [Sohn et al., 2020]" (FixMatch); unimatch: the same terms over UniMatch
    base: Literal["fixmatch", "unimatch"] = "fixmatch"
    # threshold (tau of eq. 3, 0.95), labeled_loss / unlabeled_loss, base_params: the base's (AddOnParams)
    tau_low: float = Field(0.85, ge=0, le=1)  # sec. 4.1
    tau_high: float = Field(0.95, ge=0, le=1)  # sec. 4.1
    lambda_u_region: float = 0.5  # eq. 8: lambda = 0.5
    lambda_cir: float = 2.0  # eq. 4, sec. 4.1: lambda_1 = 2
    lambda_prcc: float = 1.0  # eq. 4, sec. 4.1: lambda_2 = 1
    alpha0: float = Field(0.2, ge=0, le=1)  # sec. 4.1: alpha_0 = 20%
    dynamic_alpha: bool = True  # eq. 15 (Table 6: fixed vs dynamic)
    # eqs. 13-15 (kept share grows to ~all) vs sec. 4.3's prose (kept share shrinks); see docstring
    alpha_schedule: Literal["equations", "prose"] = "equations"
    prspl: bool = True  # Table 4
    cir: bool = True  # Table 4
    prcc: bool = True  # Table 4
    region_labels: Literal["both", "hard", "soft"] = "both"  # Table 7
    region_labeled: bool = True  # Table 5
    region_unlabeled: bool = True  # Table 5
    proj_dim: int = 256  # h(.): not given in the paper
    min_region_pixels: int = 64
    max_regions: int = 512
    prcc_reduction: Literal["mean", "sum"] = "mean"
    # deviation for from-scratch training (paper, eq. 20: "euclidean"): distance between
    # L2-normalised R_i and F_j, in [0, 2] whatever the feature scale
    prcc_distance: Literal["euclidean", "normalized"] = "normalized"
    # deviation for from-scratch training (paper: 0, no ramp-up): L_r^u, CIR2R and PRCC weighted by
    # w rising 0 -> 1 over this fraction of the run's iterations
    region_rampup: float = Field(0.2, ge=0, le=1)
    region_rampup_shape: Literal["sigmoid", "linear"] = "sigmoid"  # Mean Teacher's exp(-5(1-t)^2), rescaled to w(0) = 0
    # deviation for from-scratch training (paper: 1.0, no limit): unlabeled regions covering more
    # than this share of their image's valid pixels enter no region loss
    max_region_share: float = Field(0.8, gt=0, le=1)
    region_pixels: Literal["all", "prspl"] = "all"  # paper: all pixels of a region; prspl: only pixels the pixel loss keeps

    @property
    def uses_regions(self) -> bool:
        """Whether any of RegionMatch's own pieces is on (with none, the method is its base)."""
        return self.prspl or self.cir or self.prcc or self.region_labeled or self.region_unlabeled


# ----------------------------------------------------------------------------- pure pieces
def connected_regions(labels: torch.Tensor, num_classes: int, min_pixels: int = 0, max_regions: int | None = None):
    """Connected components of each class of each label map.

    Args:
        labels: long [B, H, W]; ``IGNORE_INDEX`` (and ids >= num_classes) belong to no region.
    Returns:
        ids: long [B, H, W], a batch-global region id per pixel, -1 outside regions;
        region_class: long [N]; region_image: long [N]; region_size: long [N] (pixels).
    Regions smaller than ``min_pixels`` are dropped; with ``max_regions`` only the largest are
    kept. Ids are renumbered 0..N-1 in order of (image, class, component).
    """
    lab = labels.detach().cpu().numpy()
    ids = np.full(lab.shape, -1, dtype=np.int64)
    classes, images, sizes = [], [], []
    n = 0
    for b in range(lab.shape[0]):
        for c in np.unique(lab[b]):
            if c >= num_classes or c == IGNORE_INDEX:
                continue
            comp, k = ndimage.label(lab[b] == c)
            if k == 0:
                continue
            counts = np.bincount(comp.ravel(), minlength=k + 1)[1:]
            keep = np.nonzero(counts >= max(min_pixels, 1))[0]
            remap = np.full(k + 1, -1, dtype=np.int64)
            remap[keep + 1] = np.arange(n, n + len(keep))
            region = remap[comp]
            ids[b][region >= 0] = region[region >= 0]
            classes += [int(c)] * len(keep)
            images += [b] * len(keep)
            sizes += counts[keep].tolist()
            n += len(keep)
    sizes_t = torch.tensor(sizes, dtype=torch.long)
    ids_t = torch.from_numpy(ids)
    cls_t, img_t = torch.tensor(classes, dtype=torch.long), torch.tensor(images, dtype=torch.long)
    if max_regions is not None and n > max_regions:
        top = torch.argsort(sizes_t, descending=True, stable=True)[:max_regions].sort().values
        remap = torch.full((n + 1,), -1, dtype=torch.long)
        remap[top] = torch.arange(len(top))
        ids_t = remap[ids_t]  # -1 maps through remap[-1] == -1
        cls_t, img_t, sizes_t = cls_t[top], img_t[top], sizes_t[top]
    dev = labels.device
    return ids_t.to(dev), cls_t.to(dev), img_t.to(dev), sizes_t.to(dev)


def resize_ids(ids: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of an id map [B, H, W] to ``size`` (feature resolution)."""
    if tuple(ids.shape[-2:]) == tuple(size):
        return ids
    return F.interpolate(ids[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def region_pool(values: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling: mean of ``values`` [B, D, h, w] over each region of ``ids``
    [B, h, w] (-1 = none). Returns (means [n, D], pixel counts [n]); empty regions are 0."""
    d = values.shape[1]
    flat = values.permute(0, 2, 3, 1).reshape(-1, d)
    idx = ids.reshape(-1)
    keep = idx >= 0
    sums = torch.zeros(n, d, dtype=values.dtype, device=values.device).index_add(0, idx[keep], flat[keep])
    counts = torch.bincount(idx[keep], minlength=n)[:n]
    return sums / counts.clamp_min(1)[:, None].to(values.dtype), counts


def region_targets(mean_conf: torch.Tensor, mean_prob: torch.Tensor, tau_low: float, tau_high: float, mode: str = "both"):
    """Eqs. 6-7: targets [n, C] and keep [n] for unlabeled regions from their mean confidence
    and mean probability. ``both``: one-hot of argmax(mean_prob) at or above tau_high, the soft
    mean probability in [tau_low, tau_high), dropped below tau_low. ``hard`` / ``soft``: every
    region at or above tau_low gets a hard / soft label (the ablations of Table 7)."""
    keep = mean_conf >= tau_low
    hard = F.one_hot(mean_prob.argmax(1), mean_prob.shape[1]).to(mean_prob.dtype)
    if mode == "hard":
        targets = hard
    elif mode == "soft":
        targets = mean_prob
    else:
        targets = torch.where((mean_conf >= tau_high)[:, None], hard, mean_prob)
    return targets, keep


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy with (soft) target distributions: [n]."""
    return -(targets * logits.log_softmax(-1)).sum(-1)


def per_image_mean(values: torch.Tensor, image: torch.Tensor, keep: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean over images (that have a kept value) of the mean of their kept values (eq. 8)."""
    keep = keep & torch.isfinite(values)
    if not keep.any():
        return values.sum() * 0.0
    sums = torch.zeros(batch, dtype=values.dtype, device=values.device).index_add(0, image[keep], values[keep])
    counts = torch.bincount(image[keep], minlength=batch).to(values.dtype)
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)


def prspl_mask(q_pixel: torch.Tensor, q_region: torch.Tensor, has_region: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eqs. 9-17: bool [B, H, W], True where both views are in their image's low-entropy set
    (entropy <= the (1 - alpha) quantile over the image's pixels that have a region view) and
    agree on the class. ``q_*`` are probabilities [B, C, H, W]."""
    h_p, h_r = entropy(q_pixel), entropy(q_region)
    agree = q_pixel.argmax(1) == q_region.argmax(1)
    sel = has_region & valid
    mask = torch.zeros_like(sel)
    for b in range(sel.shape[0]):
        s = sel[b]
        if not s.any():
            continue
        t_r = torch.quantile(h_r[b][s].float(), 1 - alpha)
        t_p = torch.quantile(h_p[b][s].float(), 1 - alpha)
        mask[b] = s & (h_r[b] <= t_r) & (h_p[b] <= t_p) & agree[b]
    return mask


def alpha_at(alpha0: float, epoch: int, total_epochs: int, dynamic: bool = True, schedule: str = "equations") -> float:
    """The share alpha_t of each image's pixels that PRSPL's entropy filters drop (eqs. 13-14 keep
    H <= Quantile(H, 1 - alpha_t)). ``equations`` (eq. 15): alpha_0 (1 - t / total epochs),
    falling to 0 (the kept share grows); ``prose`` (sec. 4.3): alpha_0 t / total epochs, rising
    from 0 (the kept share shrinks). Fixed alpha_0 when not ``dynamic``."""
    if not dynamic:
        return alpha0
    t = min(max(epoch / max(total_epochs, 1), 0.0), 1.0)
    if schedule == "equations":
        return alpha0 * (1 - t)
    if schedule == "prose":
        return alpha0 * t
    raise ValueError(f"unknown alpha_schedule {schedule!r}; choose 'equations' or 'prose'")


def rampup_weight(progress: float, length: float, shape: str = "sigmoid") -> float:
    """Weight of a ramped-up loss at ``progress`` (0..1 of the run) when it ramps over the first
    ``length`` of the run: 1 when ``length`` is 0; else with t = min(progress / length, 1),
    ``linear``: t; ``sigmoid``: Mean Teacher's exp(-5 (1 - t)^2), rescaled as
    (exp(-5 (1 - t)^2) - e^-5) / (1 - e^-5) so that it is exactly 0 at t = 0 and 1 at t = 1."""
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    if shape == "linear":
        return t
    if shape == "sigmoid":
        floor = np.exp(-5.0)
        return float((np.exp(-5.0 * (1.0 - t) ** 2) - floor) / (1.0 - floor))
    raise ValueError(f"unknown ramp-up shape {shape!r}; choose 'sigmoid' or 'linear'")


def similarity_consistency(r_weak: torch.Tensor, r_strong: torch.Tensor) -> torch.Tensor:
    """Eqs. 18-19: MSE between the cosine-similarity matrices of two sets of region features
    [n, D] in correspondence (row i = region i in both)."""
    if r_weak.shape[0] < 2:
        return r_strong.sum() * 0.0
    a, b = F.normalize(r_weak, dim=1), F.normalize(r_strong, dim=1)
    return F.mse_loss(b @ b.t(), a @ a.t())


def pixel_region_loss(
    pixel_emb: torch.Tensor, ids: torch.Tensor, region_emb: torch.Tensor, keep: torch.Tensor, reduction: str = "mean", distance: str = "euclidean"
) -> torch.Tensor:
    """Eqs. 20-21: -log E_ij = ||R_i - F_j||_2 for every pixel j [B, D, h, w] of each kept region
    i (``ids`` [B, h, w]); within-region mean (``mean``) or sum (``sum``, the paper's literal
    form), then the mean over kept regions. ``distance``: ``euclidean`` (eq. 20) or
    ``normalized``: ||R_i / ||R_i|| - F_j / ||F_j|| ||, in [0, 2] and unchanged when the features
    are scaled by a positive constant."""
    if distance not in ("euclidean", "normalized"):
        raise ValueError(f"unknown prcc_distance {distance!r}; choose 'euclidean' or 'normalized'")
    d = pixel_emb.shape[1]
    flat = pixel_emb.permute(0, 2, 3, 1).reshape(-1, d)
    idx = ids.reshape(-1)
    sel = idx >= 0
    sel[sel.clone()] = keep[idx[sel]]
    if not sel.any():
        return pixel_emb.sum() * 0.0
    f, r = flat[sel], region_emb[idx[sel]]
    if distance == "normalized":
        f, r = F.normalize(f, dim=1), F.normalize(r, dim=1)
    dist = (f - r).norm(dim=1)
    n = region_emb.shape[0]
    sums = torch.zeros(n, dtype=dist.dtype, device=dist.device).index_add(0, idx[sel], dist)
    counts = torch.bincount(idx[sel], minlength=n)[:n]
    has = counts > 0
    per_region = sums[has] / counts[has] if reduction == "mean" else sums[has]
    return per_region.mean()


# ----------------------------------------------------------------------------- the method
class RegionMatch(AddOn):
    Params = RegionMatchParams
    default_teacher = "self"

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        if model is None:
            raise ValueError("regionmatch needs the model to size its projection layer (feature_channels)")
        self._init_modules(model)

    def build_modules(self, model) -> None:
        self.proj = nn.Linear(model.feature_channels, self.p.proj_dim)  # h(.)
        self.region_classifier = nn.Linear(self.p.proj_dim, self.num_classes)  # f_r

    def _regions(self, labels: torch.Tensor):
        return connected_regions(labels, self.num_classes, self.p.min_region_pixels, self.p.max_regions)

    def _region_embed(self, dec: torch.Tensor, ids_full: torch.Tensor, n: int):
        """(R [n, proj], feature-resolution ids, visible feature pixels [n])."""
        ids_f = resize_ids(ids_full, dec.shape[-2:])
        pooled, counts = region_pool(dec, ids_f, n)
        return self.proj(pooled), ids_f, counts

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        step = self.base.views(student, teacher, labeled, unlabeled)
        plain = step.plain
        if not p.uses_regions:  # every piece of RegionMatch off: the base, exactly
            return self.base.output(step, plain)
        if step.x.decoded is None:
            raise ValueError("regionmatch pools decoder features: it needs a model with decode_features / classify (a Segmenter)")
        valid = step.valid
        b, bu = labeled["image"].shape[0], unlabeled["image"].shape[0]
        pseudo_in = torch.where(valid, plain.pseudo, torch.full_like(plain.pseudo, IGNORE_INDEX))
        metrics: dict[str, float] = {}
        with autocast_off(labeled["image"].device):  # region pooling, similarities, PRCC: float32
            dec_x, dec_w = step.x.decoded.float(), step.weak.decoded.float()
            zero = dec_x.sum() * 0.0

            # ---- L_r^l (eq. 5): labeled regions from the ground truth
            loss_r_l = zero
            if p.region_labeled:
                ids_l, cls_l, img_l, _ = self._regions(labeled["mask"])
                if len(cls_l):
                    r_l, _, cnt_l = self._region_embed(dec_x, ids_l, len(cls_l))
                    ce = F.cross_entropy(self.region_classifier(r_l), cls_l, reduction="none")
                    loss_r_l = per_image_mean(ce, img_l, cnt_l > 0, b)

            # ---- weak-view regions, their targets and region-view distribution (no grad: targets)
            q_pixel, conf = plain.probs, plain.conf
            ids_u, cls_u, img_u, size_u = self._regions(pseudo_in)
            n = len(cls_u)
            with torch.no_grad():
                if n:
                    r_w, _, cnt_w = self._region_embed(dec_w, ids_u, n)
                    q_region_vec = self.region_classifier(r_w).softmax(1)
                    flat_ids = ids_u.reshape(-1)
                    inside = flat_ids >= 0
                    probs_flat = q_pixel.permute(0, 2, 3, 1).reshape(-1, q_pixel.shape[1])
                    full_counts = torch.bincount(flat_ids[inside], minlength=n)[:n].clamp_min(1).float()
                    mean_prob = torch.zeros(n, q_pixel.shape[1], device=q_pixel.device).index_add(0, flat_ids[inside], probs_flat[inside]) / full_counts[:, None]
                    mean_conf = torch.zeros(n, device=q_pixel.device).index_add(0, flat_ids[inside], conf.reshape(-1)[inside]) / full_counts
                    targets_r, keep_r = region_targets(mean_conf, mean_prob, p.tau_low, p.tau_high, p.region_labels)
                    has_view = (ids_u >= 0) & (cnt_w > 0)[ids_u.clamp_min(0)]
                    q_region = q_region_vec[ids_u.clamp_min(0)].permute(0, 3, 1, 2)
                else:
                    r_w = torch.zeros(0, p.proj_dim, device=valid.device)
                    cnt_w = torch.zeros(0, dtype=torch.long, device=valid.device)
                    keep_r = torch.zeros(0, dtype=torch.bool, device=valid.device)
                    has_view = torch.zeros_like(valid)
                    q_region = q_pixel

            # ---- the pixel mask of the base's unlabeled terms: PRSPL (eqs. 9-17) or the base's threshold
            alpha = alpha_at(p.alpha0, ctx.epoch, ctx.total_epochs, p.dynamic_alpha, p.alpha_schedule)
            thr_mask = plain.keep
            prspl = prspl_mask(q_pixel, q_region, has_view, valid, alpha) if n else torch.zeros_like(valid)
            mask = prspl if p.prspl else thr_mask
        out = self.base.output(step, Targets(plain.probs, plain.conf, plain.pseudo, mask) if p.prspl else plain)

        with autocast_off(labeled["image"].device):
            # ---- unlabeled region losses on each strong view the base forwards (mean over views);
            # region ids move with the CutMix box (deviations: docstring)
            share = torch.zeros(n, device=valid.device)
            too_large = torch.zeros(n, dtype=torch.bool, device=valid.device)
            per_view = {"r_u": [], "cir": [], "prcc": [], "in_loss": [], "in_cir": [], "share_in_loss": []}
            if n:
                share = size_u.float() / valid.sum((1, 2)).clamp_min(1).float()[img_u]  # of the image's valid pixels
                too_large = share > p.max_region_share
                ids_loss = ids_u
                if p.region_pixels == "prspl":  # only the pixels the unlabeled pixel loss keeps
                    ids_loss = torch.where(mask, ids_u, torch.full_like(ids_u, -1))
                    with torch.no_grad():
                        r_w, _, cnt_w = self._region_embed(dec_w, ids_loss, n)
                for view in step.strong:
                    dec_s = view.out.decoded.float()
                    r_s, ids_s, cnt_s = self._region_embed(dec_s, view.mix(ids_loss), n)
                    eligible = (cnt_s > 0) & ~too_large  # visible in the strong view, not near-whole-image
                    in_loss = keep_r & eligible  # I of eq. 6, for L_r^u and PRCC
                    in_cir = eligible & (cnt_w > 0)  # seen in both views
                    if p.region_unlabeled:  # eq. 7
                        per_view["r_u"].append(per_image_mean(soft_ce(self.region_classifier(r_s), targets_r), img_u, in_loss, bu))
                    if p.cir:  # eqs. 18-19
                        per_view["cir"].append(similarity_consistency(r_w[in_cir], r_s[in_cir]))
                    if p.prcc:  # eqs. 20-21 on the kept regions I
                        pix = self.proj(dec_s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                        per_view["prcc"].append(pixel_region_loss(pix, ids_s, r_s, in_loss, p.prcc_reduction, p.prcc_distance))
                    n_in = int(in_loss.sum())
                    per_view["in_loss"].append(float(n_in))
                    per_view["in_cir"].append(float(in_cir.sum()))
                    per_view["share_in_loss"].append(float(share[in_loss].mean()) if n_in else 0.0)

            def view_mean(key):
                vals = per_view[key]
                return sum(vals) / len(vals) if vals else zero

            loss_r_u, loss_cir, loss_prcc = view_mean("r_u"), view_mean("cir"), view_mean("prcc")

        # eq. 4 (L_p + L_r + lambda_1 L_CIR + lambda_2 L_PR, L_r of eq. 8) in the base's scale: the
        # base weighs its labeled pixel loss by labeled_weight (0.5), so the region terms are too;
        # the unlabeled region terms ramped by w (1 with region_rampup 0, the paper)
        scale = self.base.labeled_weight
        w = rampup_weight(ctx.progress, p.region_rampup, p.region_rampup_shape)
        terms: dict[str, torch.Tensor] = {}
        if p.region_labeled:
            terms["r_l"] = scale * loss_r_l
        if p.region_unlabeled:
            terms["r_u"] = scale * w * p.lambda_u_region * loss_r_u
        if p.cir:
            terms["cir"] = scale * w * p.lambda_cir * loss_cir
        if p.prcc:
            terms["prcc"] = scale * w * p.lambda_prcc * loss_prcc
        logged = {"loss_r_l": loss_r_l.detach(), "loss_r_u": loss_r_u.detach(), "loss_cir": loss_cir.detach(), "loss_prcc": loss_prcc.detach()}
        nv = valid.sum().clamp_min(1)
        metrics.update({
            "regions": float(n), "regions_kept": float(keep_r.sum()) if n else 0.0, "alpha": alpha,
            "regions_too_large": float(too_large.sum()), "regions_in_loss": _mean(per_view["in_loss"]),
            "region_share_in_loss": _mean(per_view["share_in_loss"]), "regions_in_cir": _mean(per_view["in_cir"]),
            "region_weight": w, "mask_ratio": float(mask.sum() / nv), "prspl_ratio": float(prspl.sum() / nv),
            "thr_ratio": float(thr_mask.sum() / nv),
        })
        gt = unlabeled.get("gt")
        if gt is not None:  # Fig. 4: pseudo-label accuracy with and without PRSPL, same predictions
            for kind, fn in (("acc", accuracy_of), ("miou", class_mean_iou)):
                v = fn(plain.pseudo, gt, prspl)
                if v is not None:
                    metrics[f"{kind}_prspl"] = v
        return self.finish(out, terms, logged, metrics)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
