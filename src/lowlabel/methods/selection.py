"""Which pseudo-labelled pixels the weak-to-strong bases train on (``method.params.selection``),
and a ramp-up of their unlabeled terms (``unlabeled_ramp``): options for data where a fixed
0.95 threshold keeps too little, or the wrong classes, early in training.

- ``fixed`` (FixMatch, UniMatch; the default): a pixel is kept where its confidence reaches
  ``threshold`` (tau).
- ``flexmatch`` (Zhang et al., NeurIPS 2021, Curriculum Pseudo Labeling, eqs. 6-7 with the
  threshold warm-up): each class's learning effect sigma_c is the share of pixels predicted c
  with confidence above tau; beta_c = sigma_c / max(max_c sigma_c, share of pixels not above
  tau); the class threshold is M(beta_c) tau with the convex map M(x) = x / (2 - x).
  Deviation (stated): FlexMatch counts each unlabeled sample's latest prediction over the whole
  set; per-pixel memory over every image is too large, so sigma and the unused share are running
  means over batches (momentum ``selection_momentum``).
- ``freematch`` (Wang et al., ICLR 2023, Self-Adaptive Thresholding, eqs. 5-8): a global
  threshold tau_t, the running mean of the confidence (initial 1 / C), scaled per class by
  MaxNorm of the running mean class probabilities p~_t(c) (initial 1 / C): tau_t(c) =
  p~_t(c) / max_c p~_t(c) x tau_t, with momentum ``selection_momentum`` (the paper's 0.999). Its
  self-adaptive fairness term is not implemented.
- ``softmatch`` (Chen et al., ICLR 2023, eq. 7): every pixel is kept with a weight: 1 where the
  confidence reaches the running mean mu_t, else exp(-(conf - mu_t)^2 / (2 sigma_t^2)), with
  mu_t, sigma_t^2 running estimates of the batch confidences' mean and variance (initial 1 / C and
  1.0; momentum ``selection_momentum``, the paper's 0.999). Its uniform alignment is not
  implemented. With the CE loss the weights multiply the per-pixel terms; with the Dice loss they
  weigh each pixel's share of the Dice sums.

In the add-ons (RegionMatch, DerProp: ``method.params.selection`` is passed to their base) the
rule selects the base's own pseudo-labels and the ramp weighs the base's unlabeled terms;
DerProp's rectified pseudo-labels keep its fixed ``threshold``, and its own terms are not ramped.

Running statistics are computed over valid pixels of the weak view, once per training step, and
are buffers of the method (saved in checkpoints, so a resumed run continues them exactly).

``unlabeled_ramp`` (iterations, 0: off): the base's unlabeled terms are multiplied by the sigmoid
ramp-up exp(-5 (1 - t / T)^2) of Laine & Aila (ICLR 2017), used by Mean Teacher and UA-MT, t
the number of steps taken.

Written here: the semi-supervised toolkits that have these rules (USB, TorchSSL) implement them
for image classification inside their training loops; they are a few lines over pixel maps.
"""

from __future__ import annotations

import math

import torch
from torch import nn


RULES = ("fixed", "flexmatch", "freematch", "softmatch")


def ramp_up(step: int, length: int) -> float:
    """exp(-5 (1 - t / T)^2) for t < T, else 1 (Laine & Aila 2017); 1 when ``length`` is 0."""
    if length <= 0 or step >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / length) ** 2)


class Selection(nn.Module):
    """A selection rule with its running statistics (buffers). :meth:`select` is called once per
    training step with the weak view's probabilities."""

    def __init__(self, p, num_classes: int):
        """``p``: the method's parameters (:class:`~lowlabel.methods.base.SelectionParams`)."""
        super().__init__()
        self.rule, self.tau, self.m, self.ramp_length = p.selection, float(p.threshold), float(p.selection_momentum), int(p.unlabeled_ramp)
        c = num_classes
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if self.rule == "flexmatch":
            self.register_buffer("sigma", torch.zeros(c))  # share of valid pixels confidently predicted as each class
            self.register_buffer("unused", torch.ones(()))  # share of valid pixels not above tau
        elif self.rule == "freematch":
            self.register_buffer("tau_global", torch.full((), 1.0 / c))
            self.register_buffer("p_local", torch.full((c,), 1.0 / c))
        elif self.rule == "softmatch":
            self.register_buffer("mu", torch.full((), 1.0 / c))
            self.register_buffer("var", torch.ones(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before the selection rules (2026-12-03) has none of these buffers:
        # it resumes with a fresh rule (its runs all used the fixed threshold, which has no state)
        for name, buf in self._buffers.items():
            state_dict.setdefault(prefix + name, buf.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def ramp(self) -> float:
        """The ramp-up factor of the current step (after :meth:`select` counted it)."""
        return ramp_up(int(self.steps) - 1, self.ramp_length)

    def _ema(self, buf: torch.Tensor, value: torch.Tensor) -> None:
        buf.mul_(self.m).add_(value.to(buf.dtype), alpha=1.0 - self.m)

    def class_thresholds(self) -> torch.Tensor | None:
        """Per-class thresholds [C] of the adaptive rules (None for fixed and softmatch)."""
        if self.rule == "flexmatch":
            beta = self.sigma / torch.maximum(self.sigma.max(), self.unused).clamp_min(1e-12)
            return beta / (2.0 - beta) * self.tau
        if self.rule == "freematch":
            return self.p_local / self.p_local.max().clamp_min(1e-12) * self.tau_global
        return None

    @torch.no_grad()
    def select(self, probs: torch.Tensor, conf: torch.Tensor, pseudo: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep bool [B, H, W], weight float [B, H, W] or None) for the pseudo-labels of one step;
        updates the running statistics first (as the papers do, with the current batch)."""
        self.steps += 1
        if self.rule == "fixed":
            return (conf >= self.tau) & valid, None
        v = valid.float()
        n = v.sum().clamp_min(1.0)
        if self.rule == "flexmatch":
            above = (conf > self.tau) & valid
            counts = torch.bincount(pseudo[above].flatten(), minlength=self.sigma.numel())[: self.sigma.numel()].float()
            self._ema(self.sigma, counts / n)
            self._ema(self.unused, ((~above) & valid).sum() / n)
        elif self.rule == "freematch":
            self._ema(self.tau_global, (conf * v).sum() / n)
            self._ema(self.p_local, (probs * v[:, None]).sum((0, 2, 3)) / n)
        if self.rule in ("flexmatch", "freematch"):
            return (conf >= self.class_thresholds()[pseudo]) & valid, None
        # softmatch: truncated Gaussian weights around the running mean confidence
        mean = (conf * v).sum() / n
        var = (((conf - mean) ** 2) * v).sum() / (n - 1).clamp_min(1.0)
        self._ema(self.mu, mean)
        self._ema(self.var, var)
        weight = torch.where(conf >= self.mu, torch.ones_like(conf), torch.exp(-((conf - self.mu) ** 2) / (2 * self.var.clamp_min(1e-12))))
        return valid.clone(), weight * v

    def metrics(self, keep: torch.Tensor, weight: torch.Tensor | None, valid: torch.Tensor) -> dict:
        """What the rule did this step: the kept share (``selected_ratio``; softmatch: the mean
        weight), its thresholds (``threshold_c<k>``) or running mean (``softmatch_mu``), the ramp."""
        if self.rule == "fixed" and not self.ramp_length:
            return {}
        n = valid.sum().clamp_min(1)
        out = {"selected_ratio": float((weight if weight is not None else keep.float()).sum() / n), "unlabeled_ramp": self.ramp()}
        th = self.class_thresholds()
        if th is not None:
            out.update({f"threshold_c{k}": float(t) for k, t in enumerate(th)})
        if self.rule == "softmatch":
            out.update(softmatch_mu=float(self.mu), softmatch_var=float(self.var))
        return out
