"""DerProp: derivative label propagation (``../shared/papers/derprop.md``), as an add-on over a
weak-to-strong base (``method.params.base``, default ``unimatch``: the paper follows UniMatch and
CorrMatch (Yang et al. 2023; Sun et al. 2024) for the pseudo-labels and their confidence map and
compares against UniMatch at 321^2; ``fixmatch`` is selectable). The base's own views, pseudo-labels
and terms run unchanged (:mod:`lowlabel.methods.addon`); DerProp adds:

- Projection J on per-pixel features gives vectors V [D, M], L1-normalised per pixel (sec.
  "Derivative Label Propagation"). Discrete derivatives along the channel dimension, eq. 2 (and
  the alternatives of eqs. 10-12): Delta^q V.
- Label propagation, eq. 4: L~ = L (S + Delta^1 S), S = V^T V, Delta^1 S = (Delta^1 V)^T Delta^1 V,
  on the weak view's logits L; the rectified distribution is blended with the plain one by
  eta_ep = ep / EP (eq. 5) and *replaces the base's pseudo-labels* for every unlabeled term of the
  base (both strong views and UniMatch's feature-perturbed view). Pseudo-labels come from the
  back-propagation network (the student; eq. 5's text), so the base always runs with the student as
  its pseudo-labeller, whatever ``teacher.kind``.
- Loss terms, eqs. 7-8 with lambda^CE = 0.5, lambda^KL = 0.25, lambda^Der = 0.5, eta = 0.5
  (sec. "Implementation Details"). L^CE's plain parts, CE(P_l, Y) and CE(P^s, y^), are the base's own
  terms (UniMatch: 0.5 L_x and 0.125 + 0.125 on its two strong views, i.e. lambda^CE and
  lambda^CE / 2 as eq. 7 weighs them); DerProp adds ``x_prop`` = lambda^CE CE(P~_l, Y), ``u_prop``
  = lambda^CE / 2 CE(P~^s, y^) and ``kl`` = lambda^KL KL(P~^w || P^s) on the confident pixels, and
  ``der`` = lambda^Der (L^Der_l + L^Der_s) of eq. 8 (the general L_Q^Der of eq. 9: ``der_order`` /
  ``sparsity``). With two strong views each view-level term is the mean over the views.
- Momentum network averaged per epoch (eq. 6): ``teacher: {kind: epoch_momentum}`` (the default
  teacher), which the engine evaluates and saves; before its first epoch-end average it is the
  back-propagation network itself, never the random initialisation (lowlabel.engine.teachers).
- Ablations (Table 1): ``dlp: false`` (w/o DLP: no propagation, no rectified pseudo-labels, no
  L^Der; KL against the plain pseudo-labels), ``der_loss: false`` (w/o L^Der), ``teacher.kind:
  self`` (w/o momentum); ``kl: false`` drops L^KL. With ``dlp: false, kl: false`` DerProp is its
  base exactly (tests/test_methods_addons.py), whatever the teacher (it only evaluates).

Where the propagation runs (``feature_source``; a deviation from the paper's F4). The paper
projects F4, ResNet-101 block 4 (stride 16: 21 x 21 at 321^2, large VOC objects). On a UNet at
ACDC's 128^2 that level is 8 x 8, and logits propagated there and brought back lose the heart.
Probe (benchmarks/probes/derprop_propagation_probe.py, 80 unlabeled ACDC slices in 10 batches of
8, 3.8 % foreground): perfect logits (5 x the one-hot truth) propagated by ``_rectify`` with
*ideal* features (the one-hot truth at the level's resolution) keep the class of this share of
foreground pixels (``propagation_norm`` none / similarity): stride 16 (8^2) 18.0 / 17.6 %
(myocardium 2.8 %), stride 8 (16^2) 48.0 / 47.4 %, stride 4 (32^2) 75.9 / 75.5 %, stride 2
(64^2) 90.8 / 90.8 % (myocardium 84.8 %), stride 1 (128^2, the UNet's decoder output) 100 / 100 %
with confidence 1.000. The classes survive only at the decoder's resolution, so by default
(``decoder``) J projects the decoder features (``decode_features``, what the classifier reads:
full resolution on ``unet2d``, stride 4 on DeepLabV3+) and the propagation runs at that
resolution; ``bottleneck`` is the paper's F4 (the encoder's last level). Below the logits'
resolution the logits are area-downsampled, and the propagated *probabilities* are upsampled
bilinearly (an exploratory run of the same probe: at stride 2, 82.6 % of the foreground kept
with upsampled logits against 90.8 % with upsampled probabilities: eq. 4's sums scale with a
class's area, so upsampled logits let the large class win at boundaries).

How it fits in memory (not a change of the equations): eq. 4 is computed without the M x M
matrices, as L~ = (L V^T) V + (L Delta^1 V^T) Delta^1 V (cost C x D x M instead of M^2: a 128^2
map is M = 16,384). L^Der's L1 distances between M x M matrices cannot be factored: they are
taken over the pixel pairs of a regular grid of at most ``der_pixels`` pixels (default 441 = 21^2,
the paper's F4 grid at 321^2; every 7th pixel of a 128^2 map), an unbiased estimate of the mean
over all pairs; the sparsity term ||Delta^{Q+1} V||_1 is per pixel and uses every valid pixel.

``propagation_norm`` (default ``"similarity"``, a deviation; ``"none"`` is eq. 4 as written).
Eq. 4's L~ is a *sum* over the M source pixels, so its scale, and the gradient it sends back,
grow with M. At the decoder's 128^2 that is 256 x the old 8 x 8: in one step of a random UNet on
a real ACDC batch (the probe above) the gradient norm on the encoder of the propagated labeled
term x_prop was 130.0 against 0.099 for the labeled term x (u_prop 3.5), where at the
bottleneck (8 x 8) it was 0.18. ``"similarity"`` divides target pixel j by Z_j = sum_i
|v_i|^T |v_j| over valid source pixels (the row sum of S when V >= 0; otherwise a bound of
sum_i |S_ij|), which factors like eq. 4 itself: the S part of L~ becomes a weighted average of
the source logits, whatever M; x_prop's gradient norm is then 0.24 (u_prop 0.05), and the ideal
case above is unchanged (100 % at 128^2, 90.8 % at 64^2). The Delta^1 S part stays in the
numerator only: with it in Z as well (``"row"``: Z_j = sum_i |(S + Delta^1 S)_ij|, which needs
the M x M matrices, so at most ``max_feature_pixels`` = 4096 pixels) a small class next to the
background gets a flat distribution, because Delta^1 S of adjacent one-hot classes is -1 (ideal
case at 64^2: confidence 0.65 on the foreground against 0.90, 89.0 % kept).

Interpretations and deviations (stated):

- The paper's loss text writes ``l_CE(P^s, P~^s) + l_CE(P~^s, P~^s)`` and ``KL(P^s, P~^s)``; a
  cross-entropy of P~^s with itself cannot be meant. lowlabel reads the target as the rectified
  pseudo-label of eq. 5 carried to the strong view: CE of both P^s and P~^s against its argmax, and
  KL(P~^w || P^s) against its distribution, both where its confidence >= ``threshold`` (0.95).
  CE(P~_l, Y) and CE(P~^s, y^) use the base's loss kinds (``labeled_loss``, ``unlabeled_loss``:
  ``ce_dice`` / ``dice`` on ACDC, as every ACDC row); KL stays KL.
- ||.||_1 of an M x M matrix is taken as the *mean* absolute entry over valid pixel pairs, and
  ||Delta^2 V||_1 as the mean over valid pixels of each pixel's L1 norm; sums over images become
  means over the batch. The paper's sums grow with M^2 and the batch, which would make its weights
  (0.5 / 0.25 / 0.5) depend on the crop size.
- Labels Y are resampled to the feature resolution by nearest neighbour (none at the decoder's
  full resolution); padded and ignored pixels take no part in S_GT, the propagation sums or the
  losses ("valid pixels only"). S_GT of the labeled images serves both orders (eq. 8).
- The strong view carries CutMix (as in UniMatch). Its targets V^w, pseudo-labels and confidences
  are mixed with the same box (at feature resolution for V^w), so S^s and S^GT compare the same
  pixels.
- J is Conv1x1-BN-ReLU-Conv1x1 to ``proj_dim`` channels (the paper shows J only as a block in
  Fig. 2 and gives no D). Default: the features' own channel count, at most 64 (16 on ACDC's
  ``unet2d`` width 16, whose decoder features have 16 channels; 64 on DeepLabV3+'s 256). J runs at
  full resolution on the labeled, weak and strong views (ACDC's batch: 40 maps of 128^2), so D sets
  much of DerProp's cost: derprop_unimatch on acdc-cpu-1500, one thread beside a second cell, 9.0
  s/step with D = 64 (the earlier default), 6.6 with 32, 5.3 with 16 (medians of 6 steps each,
  2026-12-03: benchmarks/probes/derprop_cost.py, benchmarks/results/derprop-cost). S = V^T V has
  rank <= D, and D = 16 is four times the classes' 4. J runs on the labeled and weak features together (one BatchNorm batch) and on each
  strong view.

The step logs, besides the losses, pseudo-label quality against the unlabeled images' diagnostic
masks (``data.unlabeled_gt``), all on valid pixels: ``acc_`` / ``miou_`` of the plain, propagated
and rectified (eq. 5) pseudo-labels, the per-class IoU ``miou_<rule>_c<k>`` (class k), and
``acc_`` / ``miou_rectified_confident`` on the pixels the unlabeled terms keep; ``mask_ratio``
(kept share of the targets used), ``plain_ratio`` (the base's threshold share) and ``eta_ep``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..augment.transforms import mix
from ..data.dataset import IGNORE_INDEX
from .addon import AddOn, AddOnParams, autocast_off
from .base import (
    NetOutput,
    Targets,
    accuracy_of,
    class_ious,
    class_mean_iou,
    kept_pseudo_loss,
    mix_partner,
    supervised_loss,
)

OPERATORS = ("eq2", "eq10", "eq11", "eq12")


class DerPropParams(AddOnParams):
    base: Literal["fixmatch", "unimatch"] = "unimatch"  # see the docstring
    # threshold (0.95: the high-confidence map of UniMatch/CorrMatch the paper follows), labeled_loss /
    # unlabeled_loss, base_params: the base's (AddOnParams)
    lambda_ce: float = 0.5  # sec. Implementation: lambda^CE = 0.5
    lambda_kl: float = 0.25  # lambda^KL = 0.25
    lambda_der: float = 0.5  # lambda^Der = 0.5
    eta: float = 0.5  # sparsity weight eta = 0.5
    der_order: int = Field(1, ge=0, le=3)  # Q of eq. 9; Q = 1 is eq. 8
    sparsity: bool = True  # eta ||Delta^{Q+1} V||_1 on/off (Table 3)
    operator: Literal["eq2", "eq10", "eq11", "eq12"] = "eq2"  # Table 4
    dlp: bool = True  # Table 1 "w/o DLP" when False (no propagation, no rectification, no L_Der)
    der_loss: bool = True  # Table 1 "w/o L_Der" when False
    kl: bool = True  # L^KL of eq. 7 (off: with dlp off too, DerProp is its base)
    # deviation (paper: F4, the backbone's block 4): the decoder's features, where ACDC's classes survive
    feature_source: Literal["decoder", "bottleneck"] = "decoder"
    proj_dim: int | None = Field(None, ge=3)  # J's D, not given in the paper; None: the features' channels, at most 64
    der_pixels: int = Field(441, ge=4)  # L^Der's pixel pairs: a grid of at most this many pixels (21^2)
    max_feature_pixels: int = 4096  # the M x M matrices of propagation_norm "row" are refused above this
    # deviation (paper, eq. 4: "none", a sum whose scale grows with M): target pixel j divided by
    # sum_i |v_i|^T |v_j| ("similarity"), or by sum_i |S + Delta^1 S|_ij ("row", M x M); see the docstring
    propagation_norm: Literal["none", "similarity", "row"] = "similarity"


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


def propagate_lowrank(logits: torch.Tensor, v: torch.Tensor, dv: torch.Tensor, valid: torch.Tensor | None = None, norm: str = "none") -> torch.Tensor:
    """Eq. 4 without forming the M x M matrices: L (S + Delta^1 S) = (L V^T) V + (L dV^T) dV for
    logits [B, C, M], V [B, D, M] and its derivative dV [B, D', M] (equal to
    ``propagate(logits, similarity(v) + similarity(dv), valid)``); invalid source pixels
    (``valid`` [B, M] False) contribute nothing.

    ``norm="similarity"`` divides target pixel j by Z_j = sum_i |v_i|^T |v_j| over valid i (|.|
    elementwise; clamped at 1e-6), also factored: Z = (sum_i |v_i|)^T |V|. Z_j is the row sum of S
    when V >= 0 and bounds sum_i |S_ij| otherwise, so the S part of L~ is a weighted average of the
    source logits and L~ no longer grows with M; the Delta^1 S part is added in the same units."""
    if norm not in ("none", "similarity"):
        raise ValueError(f"unknown low-rank propagation norm {norm!r}; choose 'none' or 'similarity'")
    w = None if valid is None else valid[:, None].to(logits.dtype)  # [B, 1, M]
    if w is not None:
        logits = logits * w
    out = (logits @ v.transpose(1, 2)) @ v + (logits @ dv.transpose(1, 2)) @ dv
    if norm == "similarity":
        a = v.abs()
        total = a.sum(-1, keepdim=True) if w is None else (a * w).sum(-1, keepdim=True)  # [B, D, 1]
        out = out / (total.transpose(1, 2) @ a).clamp_min(1e-6)  # [B, 1, M]
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
class DerProp(AddOn):
    Params = DerPropParams
    default_teacher = "epoch_momentum"

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        if model is None:
            raise ValueError("derprop needs the model to size its projection layer J")
        self._init_modules(model)

    def build_modules(self, model) -> None:
        if self.p.feature_source == "decoder":
            if not hasattr(model, "classify"):
                raise ValueError("derprop with feature_source decoder needs a model with decode_features / classify (a Segmenter)")
            cin = model.feature_channels
        else:
            cin = model.encoder.out_channels[-1]
        d = self.p.proj_dim or min(64, cin)
        self.projection = nn.Sequential(  # J
            nn.Conv2d(cin, d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
            nn.Conv2d(d, d, 1),
        )

    # -------------------------------------------------------------- pieces
    def _source(self, out: NetOutput) -> torch.Tensor:
        return out.decoded if self.p.feature_source == "decoder" else out.features[-1]

    def _embed(self, feats: torch.Tensor) -> torch.Tensor:
        """V = J(features), L1-normalised over channels: [B, D, h, w] in float32."""
        return l1_normalize(self.projection(feats.float()))

    def _rectify(self, logits: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, C, H, W] of the propagated logits, eq. 4, at V's resolution: logits
        [B, C, H, W] area-downsampled to V's size when smaller; ``valid`` [B, H, W] source pixels;
        the propagated probabilities upsampled bilinearly back (module docstring)."""
        size, fsize = logits.shape[-2:], v.shape[-2:]
        same = tuple(size) == tuple(fsize)
        lf = logits.float() if same else F.interpolate(logits.float(), size=fsize, mode="area")
        vf = valid if same else F.interpolate(valid[:, None].float(), size=fsize, mode="nearest")[:, 0] > 0.5
        flat, m = v.flatten(2), fsize[0] * fsize[1]
        if self.p.propagation_norm == "row":
            if m > self.p.max_feature_pixels:
                raise ValueError(
                    f"derprop: propagation_norm row needs {m} x {m} similarity matrices per image ({fsize[0]}x{fsize[1]} feature pixels); "
                    f"the limit is method.params.max_feature_pixels={self.p.max_feature_pixels} (about "
                    f"{2 * 4 * m**2 * v.shape[0] / 2**30:.1f} GiB for this batch): use propagation_norm none, which needs no such matrix"
                )
            sim = similarity(flat) + similarity(derivative(flat, 1, self.p.operator))
            lt = propagate(lf.flatten(2), sim, vf.flatten(1), "row")
        else:
            lt = propagate_lowrank(lf.flatten(2), flat, derivative(flat, 1, self.p.operator), vf.flatten(1), self.p.propagation_norm)
        lt = lt.view(*lf.shape)
        if same:
            return lt.log_softmax(1)
        return F.interpolate(lt.softmax(1), size=size, mode="bilinear", align_corners=False).clamp_min(1e-8).log()

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        """Every k-th pixel of a map [..., h, w] (k the smallest stride leaving <= der_pixels)."""
        h, w = t.shape[-2:]
        k = max(1, math.ceil(math.sqrt(h * w / self.p.der_pixels)))
        while math.ceil(h / k) * math.ceil(w / k) > self.p.der_pixels:
            k += 1
        return t[..., ::k, ::k]

    def _sparsity(self, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """eta ||Delta^{Q+1} V||_1: mean over valid pixels of each pixel's L1 norm."""
        if not self.p.sparsity:
            return v.sum() * 0.0
        high = derivative(v.flatten(2), self.p.der_order + 1, self.p.operator).abs().sum(1)
        vf = valid.flatten(1).to(high.dtype)
        return self.p.eta * (high * vf).sum() / vf.sum().clamp_min(1)

    def _der(self, v: torch.Tensor, targets: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """Eq. 9 for one set of images: V [B, D, h, w]; ``targets`` the Q+1 matrices over the grid
        pixels; ``valid`` [B, h, w]."""
        p = self.p
        return der_loss(self._grid(v).flatten(2), targets, self._grid(valid).flatten(1), p.der_order, p.operator, p.eta, sparsity=False) + self._sparsity(v, valid)

    def _targets_of(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Delta^q S of V's grid pixels for q = 0..Q (the unlabeled targets of eq. 9)."""
        out, d = [], self._grid(v).flatten(2)
        for q in range(self.p.der_order + 1):
            if q:
                d = derivative(d, 1, self.p.operator)
            out.append(similarity(d))
        return out

    @staticmethod
    def _resize_labels(t: torch.Tensor, size) -> torch.Tensor:
        if tuple(t.shape[-2:]) == tuple(size):
            return t
        return F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(t.dtype)

    # -------------------------------------------------------------- the step
    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        # pseudo-labels from the back-propagation network (eq. 5's text): the base's joint student pass
        step = self.base.views(student, None, labeled, unlabeled)
        plain, valid = step.plain, step.valid
        if not (p.dlp or p.kl):  # none of DerProp's terms: the base, exactly
            return self.base.output(step, plain)
        dev = labeled["image"].device
        b = labeled["image"].shape[0]
        eta_ep = min(max(ctx.epoch / max(ctx.total_epochs, 1), 0.0), 1.0)
        p_rect = v_x = v_w = None
        targets = plain
        if p.dlp:
            with autocast_off(dev):  # J, similarities and propagation in float32
                if self._source(step.x) is None:
                    raise ValueError("derprop with feature_source decoder needs a model with decode_features / classify (a Segmenter)")
                v = self._embed(torch.cat([self._source(step.x), self._source(step.weak)]))  # one BN batch, as the joint pass
                v_x, v_w = v[:b], v[b:].detach()
                with torch.no_grad():
                    p_rect = self._rectify(step.weak.logits, v_w, valid).exp()
                    p_target = blend(plain.probs, p_rect, ctx.epoch, ctx.total_epochs)  # eq. 5
                    conf, pseudo = p_target.max(1)
                targets = Targets(p_target, conf, pseudo, (conf >= p.threshold) & valid)
        out = self.base.output(step, targets)

        terms: dict[str, torch.Tensor] = {}
        logged: dict[str, torch.Tensor] = {}
        with autocast_off(dev):
            views = step.strong
            if p.kl:  # KL(P~^w || P^s) on the kept pixels, / valid pixels (mean over strong views)
                kls = []
                for view in views:
                    keep = view.mix(targets.keep)
                    kl = F.kl_div(view.out.logits.float().log_softmax(1), view.mix(targets.probs), reduction="none").sum(1)
                    kls.append((kl * keep).sum() / view.mix(valid).sum().clamp_min(1))
                loss_kl = sum(kls) / len(kls)
                terms["kl"] = p.lambda_kl * loss_kl
                logged["loss_kl"] = loss_kl.detach()
            if p.dlp:
                lab_valid = labeled["mask"] != IGNORE_INDEX
                if "valid" in labeled:
                    lab_valid = lab_valid & labeled["valid"]
                x_prop = supervised_loss(self._rectify(step.x.logits, v_x, lab_valid), labeled["mask"], p.labeled_loss, labeled.get("weight"))
                u_props, der_s = [], []
                for view in views:
                    v_s = self._embed(self._source(view.out))
                    valid_m = view.mix(valid)
                    u_props.append(kept_pseudo_loss(self._rectify(view.out.logits, v_s, valid_m), view.mix(targets.pseudo),
                                                    view.mix(targets.keep), valid_m, p.unlabeled_loss))
                    if p.der_loss:
                        fsize = v_s.shape[-2:]
                        box_f = self._resize_labels(view.box, fsize)
                        v_w_m = mix(box_f, v_w, mix_partner(v_w))
                        der_s.append(self._der(v_s, self._targets_of(v_w_m), self._resize_labels(valid_m, fsize)))
                u_prop = sum(u_props) / len(u_props)
                terms["x_prop"] = p.lambda_ce * x_prop  # eq. 7: lambda^CE CE(P~_l, Y)
                terms["u_prop"] = p.lambda_ce * u_prop / 2  # lambda^CE CE(P~^s, y^) / 2
                logged.update({"loss_x_prop": x_prop.detach(), "loss_u_prop": u_prop.detach()})
                if p.der_loss:  # eq. 8: labeled S_GT = Y^T Y, unlabeled targets from the weak view
                    fsize = v_x.shape[-2:]
                    mask_f = self._resize_labels(labeled["mask"], fsize)
                    y = F.one_hot(self._grid(mask_f).clamp_max(self.num_classes - 1), self.num_classes).flatten(1, 2).float()
                    s_gt = y @ y.transpose(1, 2)
                    l_der = self._der(v_x, [s_gt] * (p.der_order + 1), self._resize_labels(lab_valid, fsize)) + sum(der_s) / len(der_s)
                    terms["der"] = p.lambda_der * l_der
                    logged["loss_der"] = l_der.detach()
        metrics = self._metrics(plain, targets, p_rect, valid, unlabeled.get("gt"), eta_ep)
        return self.finish(out, terms, logged, metrics)

    def _metrics(self, plain: Targets, targets: Targets, p_rect, valid, gt, eta_ep: float) -> dict:
        nv = valid.sum().clamp_min(1)
        metrics = {"eta_ep": eta_ep, "mask_ratio": float(targets.keep.sum() / nv), "plain_ratio": float(plain.keep.sum() / nv)}
        if gt is None:
            return metrics
        rules = {"plain": plain.pseudo}
        if p_rect is not None:
            rules.update({"propagated": p_rect.argmax(1), "rectified": targets.pseudo})
        for name, lab in rules.items():
            a, m = accuracy_of(lab, gt, valid), class_mean_iou(lab, gt, valid)
            if a is not None:
                metrics[f"acc_{name}"] = a
            if m is not None:
                metrics[f"miou_{name}"] = m
            for c, iou in class_ious(lab, gt, valid, self.num_classes).items():
                metrics[f"miou_{name}_c{c}"] = iou
        if p_rect is not None:
            a, m = accuracy_of(targets.pseudo, gt, targets.keep), class_mean_iou(targets.pseudo, gt, targets.keep)
            if a is not None:
                metrics["acc_rectified_confident"] = a
            if m is not None:
                metrics["miou_rectified_confident"] = m
        return metrics
