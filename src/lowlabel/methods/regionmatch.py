"""RegionMatch (pixel-region collaboration for semi-supervised segmentation of remote-sensing
images; ``../shared/papers/regionmatch.md``), on FixMatch's weak-to-strong scheme (sec. 3.1).

Pieces and equations:

- regions: connected components of each class (4-connectivity) of the ground truth (labeled)
  or of the weak view's pseudo-label (unlabeled), sec. 3.3;
- region features R_i = h(masked average pool of the decoder feature map F in region i), h a
  linear projection; region classifier f_r; L_r = mean_l L_r^l + 0.5 mean_u L_r^u with the dual
  threshold tau_low = 0.85 / tau_high = 0.95 on the region's mean confidence (eqs. 5-8);
- PRSPL: per-pixel region-view (f_r of the pixel's region) and pixel-view distributions, their
  entropies, per-image quantile thresholds with alpha_t = alpha_0 (1 - t / T), alpha_0 = 0.2,
  mask = low entropy in both views and the same argmax (eqs. 9-17);
- CIR2R: MSE between the cosine-similarity matrices of all region features of the batch in the
  weak and in the strong view (eqs. 18-19);
- PRCC: -log E_ij = ||R_i - F_j|| for the pixels j of each kept region i (eqs. 20-21);
- L = L_p + L_r + 2 L_CIR + 1 L_PR (eq. 4, sec. 4.1).

Decisions and deviations (stated):

- CutMix and region correspondence: a region is identified by its weak-view id (global across
  the batch). The strong view is mixed with the same box as the pseudo-labels, and its region-id
  map is mixed with that box too, so every pixel of the mixed image still carries the id of the
  region it came from. Strong-view region features pool each region over its *visible* pixels
  (possibly in two mixed images); regions with no visible pixel drop out of L_r^u, CIR2R and
  PRCC. Targets (weak-view pseudo-labels, region targets, S^w) are detached.
- The weak view gives the targets; the strong view receives every unlabeled loss (L_p^u,
  L_r^u, S^s in CIR2R, PRCC), as in FixMatch.
- Eqs. 13-15 set T = Quantile(H, 1 - alpha_t) with alpha_t falling to 0, so the share of kept
  pixels *grows* during training (U2PL's convention); the paper's prose says the threshold
  rises to keep fewer. lowlabel follows the equations.
- PRCC (eq. 21) sums over a region's pixels; lowlabel averages within each region
  (``prcc_reduction: mean``) so the loss does not scale with the crop size; ``sum`` is there.
  Pixel features are projected by the same h so that R_i and F_j share a space (for a linear h,
  R_i is then exactly the mean of the projected pixel features).
- Regions smaller than ``min_region_pixels`` (at label resolution; default 64, i.e. 4 feature
  pixels at stride 4) are not regions; the ``max_regions`` largest regions of a batch are kept
  (default 512) so the N x N similarity matrices stay small. Pixels outside any region have no
  region view and are never selected by PRSPL.
- With PRSPL off (ablation) the unlabeled pixel loss uses FixMatch's confidence threshold.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy import ndimage
from torch import nn

from ..augment.transforms import mix
from ..data.dataset import IGNORE_INDEX
from .base import Method, MethodParams, StepOutput, accuracy_of, mix_partner, pseudo_labels, supervised_loss


class RegionMatchParams(MethodParams):
    threshold: float = Field(0.95, ge=0, le=1)  # FixMatch tau (sec. 3.1), used when PRSPL is off
    tau_low: float = Field(0.85, ge=0, le=1)  # sec. 4.1
    tau_high: float = Field(0.95, ge=0, le=1)  # sec. 4.1
    lambda_u_region: float = 0.5  # eq. 8: lambda = 0.5
    lambda_cir: float = 2.0  # eq. 4, sec. 4.1: lambda_1 = 2
    lambda_prcc: float = 1.0  # eq. 4, sec. 4.1: lambda_2 = 1
    alpha0: float = Field(0.2, ge=0, le=1)  # sec. 4.1: alpha_0 = 20%
    dynamic_alpha: bool = True  # eq. 15 (Table 6: fixed vs dynamic)
    prspl: bool = True  # Table 4
    cir: bool = True  # Table 4
    prcc: bool = True  # Table 4
    region_labels: Literal["both", "hard", "soft"] = "both"  # Table 7
    region_labeled: bool = True  # Table 5
    region_unlabeled: bool = True  # Table 5
    proj_dim: int = 256
    min_region_pixels: int = 64
    max_regions: int = 512
    prcc_reduction: Literal["mean", "sum"] = "mean"


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


def alpha_at(alpha0: float, epoch: int, total_epochs: int, dynamic: bool = True) -> float:
    """Eq. 15: alpha_t = alpha_0 (1 - t / total epochs); fixed alpha_0 when not dynamic."""
    return alpha0 * (1 - epoch / max(total_epochs, 1)) if dynamic else alpha0


def similarity_consistency(r_weak: torch.Tensor, r_strong: torch.Tensor) -> torch.Tensor:
    """Eqs. 18-19: MSE between the cosine-similarity matrices of two sets of region features
    [n, D] in correspondence (row i = region i in both)."""
    if r_weak.shape[0] < 2:
        return r_strong.sum() * 0.0
    a, b = F.normalize(r_weak, dim=1), F.normalize(r_strong, dim=1)
    return F.mse_loss(b @ b.t(), a @ a.t())


def pixel_region_loss(pixel_emb: torch.Tensor, ids: torch.Tensor, region_emb: torch.Tensor, keep: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eqs. 20-21: -log E_ij = ||R_i - F_j||_2 for every pixel j [B, D, h, w] of each kept region
    i (``ids`` [B, h, w]); within-region mean (``mean``) or sum (``sum``, the paper's literal
    form), then the mean over kept regions."""
    d = pixel_emb.shape[1]
    flat = pixel_emb.permute(0, 2, 3, 1).reshape(-1, d)
    idx = ids.reshape(-1)
    sel = idx >= 0
    sel[sel.clone()] = keep[idx[sel]]
    if not sel.any():
        return pixel_emb.sum() * 0.0
    dist = (flat[sel] - region_emb[idx[sel]]).norm(dim=1)
    n = region_emb.shape[0]
    sums = torch.zeros(n, dtype=dist.dtype, device=dist.device).index_add(0, idx[sel], dist)
    counts = torch.bincount(idx[sel], minlength=n)[:n]
    has = counts > 0
    per_region = sums[has] / counts[has] if reduction == "mean" else sums[has]
    return per_region.mean()


# ----------------------------------------------------------------------------- the method
class RegionMatch(Method):
    Params = RegionMatchParams
    uses_unlabeled = True
    n_strong = 1
    default_teacher = "self"

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        if model is None:
            raise ValueError("regionmatch needs the model to size its projection layer (feature_channels)")
        self.proj = nn.Linear(model.feature_channels, self.p.proj_dim)  # h(.)
        self.region_classifier = nn.Linear(self.p.proj_dim, num_classes)  # f_r

    def _regions(self, labels: torch.Tensor):
        return connected_regions(labels, self.num_classes, self.p.min_region_pixels, self.p.max_regions)

    def _region_embed(self, dec: torch.Tensor, ids_full: torch.Tensor, n: int):
        """(R [n, proj], feature-resolution ids, visible feature pixels [n])."""
        ids_f = resize_ids(ids_full, dec.shape[-2:])
        pooled, counts = region_pool(dec, ids_f, n)
        return self.proj(pooled), ids_f, counts

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        x, u_w = labeled["image"], unlabeled["image"]
        b, bu = x.shape[0], u_w.shape[0]
        size = x.shape[-2:]
        # labeled + weak view (FixMatch/UniMatch: one joint forward when the teacher is the student)
        if teacher is None or teacher.is_student:
            dec = student.decode_features(student.encode(torch.cat([x, u_w])))
            logits = student.classify(dec, size)
            pred_x, pred_w = logits[:b], logits[b:].detach()
            dec_x, dec_w = dec[:b], dec[b:].detach()
        else:
            dec_x = student.decode_features(student.encode(x))
            pred_x = student.classify(dec_x, size)
            with torch.no_grad():
                tm = teacher.model
                was = tm.training
                tm.eval()
                dec_w = tm.decode_features(tm.encode(u_w))
                pred_w = tm.classify(dec_w, size)
                tm.train(was)
        q_pixel, conf, pseudo = pseudo_labels(pred_w)
        valid = unlabeled["valid"]
        pseudo_in = torch.where(valid, pseudo, torch.full_like(pseudo, IGNORE_INDEX))

        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        zero = pred_x.sum() * 0.0

        # ---- L_r^l (eq. 5): labeled regions from the ground truth
        loss_r_l = zero
        if p.region_labeled:
            ids_l, cls_l, img_l, _ = self._regions(labeled["mask"])
            if len(cls_l):
                r_l, _, cnt_l = self._region_embed(dec_x, ids_l, len(cls_l))
                ce = F.cross_entropy(self.region_classifier(r_l), cls_l, reduction="none")
                loss_r_l = per_image_mean(ce, img_l, cnt_l > 0, b)

        # ---- weak-view regions, their targets and region-view distribution (no grad: targets)
        ids_u, cls_u, img_u, _ = self._regions(pseudo_in)
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
                targets, keep_r = region_targets(mean_conf, mean_prob, p.tau_low, p.tau_high, p.region_labels)
                has_view = (ids_u >= 0) & (cnt_w > 0)[ids_u.clamp_min(0)]
                q_region = q_region_vec[ids_u.clamp_min(0)].permute(0, 3, 1, 2)
            else:
                r_w = torch.zeros(0, p.proj_dim, device=u_w.device)
                keep_r = torch.zeros(0, dtype=torch.bool, device=u_w.device)
                has_view = torch.zeros_like(valid)
                q_region = q_pixel

        # ---- pixel mask for L_p^u: PRSPL (eqs. 9-17) or FixMatch's threshold
        alpha = alpha_at(p.alpha0, ctx.epoch, ctx.total_epochs, p.dynamic_alpha)
        thr_mask = (conf >= p.threshold) & valid
        prspl = prspl_mask(q_pixel, q_region, has_view, valid, alpha) if n else torch.zeros_like(valid)
        mask = prspl if p.prspl else thr_mask

        # ---- strong view with CutMix; pseudo-labels, mask and region ids move with the box
        box = unlabeled["cutmix"][:, 0]
        img_s = mix(box, unlabeled["strong"][:, 0], mix_partner(unlabeled["strong"][:, 0]))
        dec_s = student.decode_features(student.encode(img_s))
        pred_s = student.classify(dec_s, size)
        pseudo_m = mix(box, pseudo, mix_partner(pseudo))
        mask_m = mix(box, mask, mix_partner(mask))
        valid_m = mix(box, valid, mix_partner(valid))
        ce_s = F.cross_entropy(pred_s, pseudo_m, reduction="none")
        loss_p_u = ((ce_s * mask_m).sum((1, 2)) / valid_m.sum((1, 2)).clamp_min(1)).mean()  # eq. 16
        loss_p_l = supervised_loss(pred_x, labeled["mask"])

        loss_r_u, loss_cir, loss_prcc = zero, zero, zero
        if n:
            ids_s_full = mix(box, ids_u, mix_partner(ids_u))
            r_s, ids_s, cnt_s = self._region_embed(dec_s, ids_s_full, n)
            visible = cnt_s > 0
            if p.region_unlabeled:  # eq. 7
                ce_r = soft_ce(self.region_classifier(r_s), targets)
                loss_r_u = per_image_mean(ce_r, img_u, keep_r & visible, bu)
            if p.cir:  # eqs. 18-19, over the regions seen in both views
                both = visible & (cnt_w > 0)
                loss_cir = similarity_consistency(r_w[both], r_s[both])
            if p.prcc:  # eqs. 20-21 on the kept regions I
                pix = self.proj(dec_s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                loss_prcc = pixel_region_loss(pix, ids_s, r_s, keep_r & visible, p.prcc_reduction)

        loss_p = loss_p_l + loss_p_u  # eq. 1
        loss_r = loss_r_l + p.lambda_u_region * loss_r_u  # eq. 8
        loss = loss_p + loss_r + p.lambda_cir * loss_cir + p.lambda_prcc * loss_prcc  # eq. 4
        losses = {
            "loss": loss, "loss_x": loss_p_l.detach(), "loss_u": loss_p_u.detach(), "loss_r_l": loss_r_l.detach(),
            "loss_r_u": loss_r_u.detach(), "loss_cir": loss_cir.detach(), "loss_prcc": loss_prcc.detach(),
        }
        nv = valid.sum().clamp_min(1)
        metrics.update({
            "regions": float(n), "regions_kept": float(keep_r.sum()) if n else 0.0, "alpha": alpha,
            "mask_ratio": float(mask.sum() / nv), "prspl_ratio": float(prspl.sum() / nv), "thr_ratio": float(thr_mask.sum() / nv),
        })
        gt = unlabeled.get("gt")
        if gt is not None:  # Fig. 4: pseudo-label accuracy with and without PRSPL, same predictions
            for name, m in (("acc_prspl", prspl), ("acc_threshold", thr_mask), ("acc_all", valid)):
                a = accuracy_of(pseudo, gt, m)
                if a is not None:
                    metrics[name] = a
        return StepOutput(losses, metrics)
