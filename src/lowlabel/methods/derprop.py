"""DerProp: derivative label propagation (``../shared/papers/derprop.md``).

- Projection J on the high-level backbone features F4 (the encoder's last level) gives per-pixel
  vectors V [D, M], L1-normalised per pixel (sec. "Derivative Label Propagation").
- Discrete derivatives along the channel dimension, eq. 2 (and the alternatives of eqs. 10-12):
  Delta^q V; similarity matrices S = V^T V and Delta^1 S = (Delta^1 V)^T Delta^1 V at the
  feature resolution (M = h * w pixels of F4).
- Label propagation, eq. 4: L~ = L (S + Delta^1 S), with L the logits resampled to the feature
  resolution; the rectified distribution is blended with the plain one by eta_ep = ep / EP
  (eq. 5). Pseudo-labels come from the back-propagation network (the student), never from the
  momentum network.
- Losses, eqs. 7-8: L = 0.5 L_CE + 0.25 L_KL + 0.5 L_Der, eta = 0.5 (sec. "Implementation").
  L_CE = CE(P_l, Y) + CE(P~_l, Y) + [CE(P^s, y^) + CE(P~^s, y^)] / 2, high-confidence masks on
  the unlabeled terms; L_Der compares S and Delta^1 S with S_GT = Y^T Y (labeled) and with the
  weak view's S^w, Delta^1 S^w (unlabeled), plus eta ||Delta^2 V||_1. The general L_Q^Der of
  eq. 9 (Q = 0..3, with or without sparsity) is ``der_order`` / ``sparsity``.
- Momentum network averaged per epoch (eq. 6): ``teacher: {kind: epoch_momentum}``, which the
  engine evaluates and saves. The Table 1 ablations: ``dlp: false`` (w/o DLP: no propagation and
  no L_Der), ``der_loss: false`` (w/o L_Der), ``teacher.kind: self`` (w/o momentum).

Interpretations and deviations (stated):

- The paper's loss text writes ``l_CE(P^s, P~^s) + l_CE(P~^s, P~^s)`` and ``KL(P^s, P~^s)``; a
  cross-entropy of P~^s with itself cannot be meant. lowlabel reads the target as the rectified
  pseudo-label of eq. 5 carried to the strong view: CE of both P^s and P~^s against its argmax,
  and KL(P~^w || P^s) against its distribution, both where its confidence >= ``threshold``
  (0.95, as UniMatch/CorrMatch which the paper follows).
- ||.||_1 of an M x M matrix is taken as the *mean* absolute entry over valid pixel pairs, and
  ||Delta^2 V||_1 as the mean over pixels of each pixel's L1 norm; sums over images become means
  over the batch. The paper's sums grow with M^2 and the batch, which would make its weights
  (0.5 / 0.25 / 0.5) depend on the crop size.
- Labels Y are resampled to the feature resolution by nearest neighbour; ignored and padded pixels
  take no part in S_GT, the propagation sums or the losses ("valid pixels only").
- The strong view carries CutMix (as in UniMatch, which the paper builds on). Its targets V^w,
  pseudo-labels and confidences are mixed with the same box (at feature resolution for V^w), so
  S^s and S^GT compare the same pixels.
- J is Conv1x1-BN-ReLU-Conv1x1 to ``proj_dim`` (256) channels: the paper shows J only as a
  block in Fig. 2.
- ``propagation_norm`` (default ``"none"``, the paper's eq. 4): L~ = L (S + Delta^1 S) is a *sum*
  over the M feature pixels, so its magnitude, and the softmax confidence of P~, grows with M (the
  crop size and the backbone's stride). ``"row"`` divides each propagated pixel's logits by the
  sum of its weights' magnitudes over valid source pixels, sum_i |(S + Delta^1 S)_ij| (equal to the
  plain row sum where the weights are non-negative; positive for a valid pixel j, as
  S_jj = ||v_j||_2^2 > 0, and clamped at 1e-6),
  making L~ a weighted average of logits whose scale cannot exceed max |L| whatever M. It applies
  wherever propagation is used (pseudo-labels and the L~ terms of L_CE). Probe (ACDC, 128 x 128
  slices, M = 64, 80 steps): "none" did not harm the thresholded pseudo-labels, it made the 0.95
  filter stricter (kept 33 % of pixels at 96.8 % accuracy) where "row" kept all of them at
  96.2 %; at 256 x 256 (M = 256) "none" reached max |L~| 11.5 against 7.25. Hence "none" stays
  the default.

- ``unlabeled_loss`` (default ``"ce"``, the paper's): ``"dice"`` computes the two pseudo-label
  terms (plain and propagated) as the Dice loss of UniMatch's medical code over the kept pixels,
  a recipe option for class-imbalanced data: on ACDC (96 % background pixels) the CE terms taught
  background (pseudo-label accuracy 0.96 = the background share; student test Dice 5.9). The KL
  term stays. Not yet measured on acdc-cpu.

Memory: S and Delta^1 S are B x M x M each (float32, with gradients and the L_Der differences
about 8 such matrices): for F4 at stride 16, a 512 crop gives M = 1024 and about 8 * 4 MB * B.
``max_feature_pixels`` (default 4096, e.g. a 1024 crop at stride 16) refuses larger settings
with a clear error instead of running out of memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..augment.transforms import mix
from ..data.dataset import IGNORE_INDEX
from .base import Method, MethodParams, StepOutput, accuracy_of, dice_loss, mix_partner, supervised_loss

OPERATORS = ("eq2", "eq10", "eq11", "eq12")


class DerPropParams(MethodParams):
    threshold: float = Field(0.95, ge=0, le=1)  # high-confidence mask (UniMatch/CorrMatch convention the paper follows)
    lambda_ce: float = 0.5  # sec. Implementation: lambda^CE = 0.5
    lambda_kl: float = 0.25  # lambda^KL = 0.25
    lambda_der: float = 0.5  # lambda^Der = 0.5
    eta: float = 0.5  # sparsity weight eta = 0.5
    der_order: int = Field(1, ge=0, le=3)  # Q of eq. 9; Q = 1 is eq. 8
    sparsity: bool = True  # eta ||Delta^{Q+1} V||_1 on/off (Table 3)
    operator: Literal["eq2", "eq10", "eq11", "eq12"] = "eq2"  # Table 4
    dlp: bool = True  # Table 1 "w/o DLP" when False (no propagation, no L_Der)
    der_loss: bool = True  # Table 1 "w/o L_Der" when False
    proj_dim: int = 256
    max_feature_pixels: int = 4096
    # eq. 4 as written ("none": L~ = L (S + Delta^1 S), scale grows with M) or a weighted average
    # ("row": divided by sum_i |S + Delta^1 S|_ij over valid pixels; scale independent of M). A deviation
    # when "row"; see the module docstring.
    propagation_norm: Literal["none", "row"] = "none"
    labeled_loss: Literal["ce", "ce_dice"] = "ce"  # recipe option shared with the baselines (ACDC: ce_dice)
    # recipe option (a deviation when "dice"): the pseudo-label terms ce_u and ce_u_prop as the Dice loss of
    # UniMatch's medical code over the kept pixels; CE on 96 %-background ACDC slices teaches background
    unlabeled_loss: Literal["ce", "dice"] = "ce"


# ----------------------------------------------------------------------------- pure pieces
def derivative(v: torch.Tensor, order: int = 1, operator: str = "eq2", dim: int = 1) -> torch.Tensor:
    """The ``order``-th discrete derivative of ``v`` along ``dim`` (the channel dimension).

    eq2:  d(i) = v(i+1) - v(i)                 (length D - 1 per order)
    eq10: d(i) = (v(i+2) - v(i)) / 2           (D - 2)
    eq11: d(i) = v(i+1) + v(i)                 (D - 1)
    eq12: d(i) = v(i+1) + v(i-1) - 2 v(i)      (D - 2, interior elements)
    """
    if operator not in OPERATORS:
        raise ValueError(f"unknown derivative operator {operator!r}; choose from {OPERATORS}")
    for _ in range(order):
        n = v.shape[dim]

        def s(a, b):
            return v.narrow(dim, a, n - b)

        if operator == "eq2":
            v = s(1, 1) - s(0, 1)
        elif operator == "eq10":
            v = (s(2, 2) - s(0, 2)) / 2
        elif operator == "eq11":
            v = s(1, 1) + s(0, 1)
        else:
            v = s(2, 2) + s(0, 2) - 2 * s(1, 2)
    return v


def similarity(v: torch.Tensor) -> torch.Tensor:
    """S = V^T V for V [B, D, M] -> [B, M, M]."""
    return v.transpose(1, 2) @ v


def l1_normalize(v: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return v / v.abs().sum(dim, keepdim=True).clamp_min(1e-6)


def propagate(logits: torch.Tensor, sim: torch.Tensor, valid: torch.Tensor | None = None, norm: str = "none") -> torch.Tensor:
    """Eqs. 1 / 4: L~ = L S for logits [B, C, M] and a similarity [B, M, M] (target pixel j gets
    sum_i L[:, i] S[i, j]); invalid source pixels (``valid`` [B, M] False) contribute nothing.

    ``norm="row"`` divides target j by sum_i |S[i, j]| over valid i (clamped to >= 1e-6): a weighted
    average of the source logits, so |L~| <= max |L| whatever M (a deviation from eq. 4, whose sum
    grows with M)."""
    if norm not in ("none", "row"):
        raise ValueError(f"unknown propagation norm {norm!r}; choose 'none' or 'row'")
    w = None if valid is None else valid[:, None].to(logits.dtype)  # [B, 1, M]
    if w is not None:
        logits = logits * w
    out = logits @ sim
    if norm == "row":
        mag = sim.abs()
        weight = (w @ mag) if w is not None else mag.sum(1, keepdim=True)  # [B, 1, M]
        out = out / weight.clamp_min(1e-6)
    return out


def blend(p_plain: torch.Tensor, p_rect: torch.Tensor, epoch: int, total_epochs: int) -> torch.Tensor:
    """Eq. 5: (1 - eta_ep) P + eta_ep P~ with eta_ep = ep / EP."""
    eta = min(max(epoch / max(total_epochs, 1), 0.0), 1.0)
    return (1 - eta) * p_plain + eta * p_rect


def pair_l1(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean |a - b| over valid pixel pairs (``valid`` [B, M]) of [B, M, M] matrices."""
    pairs = (valid[:, :, None] & valid[:, None, :]).to(a.dtype)
    return ((a - b).abs() * pairs).sum() / pairs.sum().clamp_min(1)


def der_loss(v: torch.Tensor, targets: list[torch.Tensor], valid: torch.Tensor, order: int, operator: str, eta: float, sparsity: bool) -> torch.Tensor:
    """Eq. 9 for one set of images: sum_{q=0..Q} ||Delta^q S - T_q||_1 + eta ||Delta^{Q+1} V||_1.
    ``v`` [B, D, M] (L1-normalised), ``targets`` the Q+1 target matrices [B, M, M]."""
    loss = v.sum() * 0.0
    d = v
    for q in range(order + 1):
        if q:
            d = derivative(d, 1, operator)
        loss = loss + pair_l1(similarity(d), targets[q], valid)
    if sparsity:
        high = derivative(d, 1, operator)
        per_pixel = high.abs().sum(1)  # [B, M]
        loss = loss + eta * (per_pixel * valid).sum() / valid.sum().clamp_min(1)
    return loss


# ----------------------------------------------------------------------------- the method
class DerProp(Method):
    Params = DerPropParams
    uses_unlabeled = True
    n_strong = 1
    default_teacher = "epoch_momentum"

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        if model is None:
            raise ValueError("derprop needs the model to size its projection layer J")
        cin = model.encoder.out_channels[-1]
        self.projection = nn.Sequential(  # J
            nn.Conv2d(cin, self.p.proj_dim, 1, bias=False), nn.BatchNorm2d(self.p.proj_dim), nn.ReLU(inplace=True),
            nn.Conv2d(self.p.proj_dim, self.p.proj_dim, 1),
        )

    def _forward(self, student, images):
        """(full-resolution logits, V [B, D, M] L1-normalised, feature size (h, w))."""
        feats = student.encode(images)
        logits = student.decode(feats, images.shape[-2:])
        high = feats[-1]
        h, w = high.shape[-2:]
        if h * w > self.p.max_feature_pixels:
            raise ValueError(
                f"derprop: {h}x{w} = {h * w} feature pixels make {h * w}x{h * w} similarity matrices per image; "
                f"the limit is method.params.max_feature_pixels={self.p.max_feature_pixels} (lower data.crop or raise the limit "
                f"if memory allows: about {8 * 4 * (h * w) ** 2 * images.shape[0] / 2**30:.1f} GiB for this batch)"
            )
        v = l1_normalize(self.projection(high).flatten(2))
        return logits, v, (h, w)

    def _rectify(self, logits, v, fsize, valid_f):
        """Propagated logits at full resolution: upsample(L_f (S + Delta^1 S)), divided per pixel by
        its weights' sum when ``propagation_norm == "row"``."""
        lf = F.interpolate(logits, size=fsize, mode="bilinear", align_corners=False).flatten(2)
        sim = similarity(v) + similarity(derivative(v, 1, self.p.operator))
        lt = propagate(lf, sim, valid_f, self.p.propagation_norm).view(*lf.shape[:2], *fsize)
        return F.interpolate(lt, size=logits.shape[-2:], mode="bilinear", align_corners=False)

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        x, u_w = labeled["image"], unlabeled["image"]
        b = x.shape[0]
        use_dlp = p.dlp
        # labeled + weak view through the back-propagation network (pseudo-labels come from it, eq. 5 text)
        logits, v, fsize = self._forward(student, torch.cat([x, u_w]))
        pred_x, pred_w = logits[:b], logits[b:].detach()
        v_x, v_w = v[:b], v[b:].detach()

        def small(t, mode="nearest"):
            return F.interpolate(t[:, None].float(), size=fsize, mode=mode)[:, 0]

        mask_f = small(labeled["mask"]).long()
        valid_xf = (mask_f != IGNORE_INDEX).flatten(1)
        valid = unlabeled["valid"]
        valid_wf = small(valid) > 0.5
        valid_wf = valid_wf.flatten(1)

        p_plain = pred_w.float().softmax(1)
        if use_dlp:
            p_rect = self._rectify(pred_w, v_w, fsize, valid_wf).float().softmax(1)
            p_target = blend(p_plain, p_rect, ctx.epoch, ctx.total_epochs)
        else:
            p_rect, p_target = p_plain, p_plain
        conf, pseudo = p_target.max(1)

        # strong view with CutMix: targets move with the box
        box = unlabeled["cutmix"][:, 0]
        img_s = mix(box, unlabeled["strong"][:, 0], mix_partner(unlabeled["strong"][:, 0]))
        pred_s, v_s, _ = self._forward(student, img_s)
        pseudo_m = mix(box, pseudo, mix_partner(pseudo))
        conf_m = mix(box, conf, mix_partner(conf))
        valid_m = mix(box, valid, mix_partner(valid))
        target_m = mix(box, p_target, mix_partner(p_target))
        keep = ((conf_m >= p.threshold) & valid_m).float()
        denom = valid_m.sum().clamp_min(1)

        ce_l = supervised_loss(pred_x, labeled["mask"], p.labeled_loss, labeled.get("weight"))
        def pseudo_loss(logits):
            if p.unlabeled_loss == "dice":
                return dice_loss(logits, pseudo_m, keep > 0)
            return (F.cross_entropy(logits, pseudo_m, reduction="none") * keep).sum() / denom

        ce_u = pseudo_loss(pred_s)
        kl = (F.kl_div(pred_s.float().log_softmax(1), target_m, reduction="none").sum(1) * keep).sum() / denom
        zero = ce_l * 0.0
        ce_l_prop, ce_u_prop, l_der = zero, zero, zero
        if use_dlp:
            valid_sf = (small(valid_m) > 0.5).flatten(1)
            ce_l_prop = supervised_loss(self._rectify(pred_x, v_x, fsize, valid_xf), labeled["mask"], p.labeled_loss, labeled.get("weight"))
            ce_u_prop = pseudo_loss(self._rectify(pred_s, v_s, fsize, valid_sf))
            if p.der_loss:
                y = F.one_hot(mask_f.clamp_max(self.num_classes - 1), self.num_classes).flatten(1, 2).float()  # [B, M, C]
                s_gt_l = y @ y.transpose(1, 2)
                l_der_l = der_loss(v_x, [s_gt_l] * (p.der_order + 1), valid_xf, p.der_order, p.operator, p.eta, p.sparsity)
                box_f = small(box) > 0.5
                v_w_m = mix(box_f.flatten(1), v_w, mix_partner(v_w))  # [B, M] box over [B, D, M]
                targets, d = [], v_w_m
                for q in range(p.der_order + 1):
                    if q:
                        d = derivative(d, 1, p.operator)
                    targets.append(similarity(d))
                l_der_u = der_loss(v_s, targets, valid_sf, p.der_order, p.operator, p.eta, p.sparsity)
                l_der = l_der_l + l_der_u  # eq. 8
        terms = {  # eq. 7: lambda_CE (ce_l + ce_l_prop + (ce_u + ce_u_prop) / 2) + lambda_KL kl + lambda_Der l_der
            "x": p.lambda_ce * (ce_l + ce_l_prop), "u": p.lambda_ce * (ce_u + ce_u_prop) / 2,
            "kl": p.lambda_kl * kl, "der": p.lambda_der * l_der,
        }
        losses = {
            "loss": sum(terms.values()), "loss_x": ce_l.detach(), "loss_x_prop": ce_l_prop.detach(), "loss_u": ce_u.detach(),
            "loss_u_prop": ce_u_prop.detach(), "loss_kl": kl.detach(), "loss_der": l_der.detach(),
        }
        metrics = {"mask_ratio": float(((conf >= p.threshold) & valid).sum() / valid.sum().clamp_min(1)), "eta_ep": min(ctx.epoch / max(ctx.total_epochs, 1), 1.0)}
        gt = unlabeled.get("gt")
        if gt is not None:  # rectified vs plain pseudo-labels on the same predictions
            plain_lab = p_plain.argmax(1)
            for name, lab in (("acc_plain", plain_lab), ("acc_propagated", p_rect.argmax(1)), ("acc_rectified", pseudo)):
                a = accuracy_of(lab, gt, valid)
                if a is not None:
                    metrics[name] = a
            a = accuracy_of(pseudo, gt, (conf >= p.threshold) & valid)
            if a is not None:
                metrics["acc_rectified_confident"] = a
        return StepOutput(losses, metrics, terms)
