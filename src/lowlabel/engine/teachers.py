"""Teachers: a config choice, not a script.

- ``none`` / ``self``: the student itself (UniMatch v1, FixMatch); ``predict`` runs it in eval
  mode without gradients, and methods may instead use a joint train-mode forward
  (``is_student`` tells them).
- ``ema``: an exponential moving average of the student after every step (Mean Teacher), with
  the usual warm-up ``decay_t = min(decay, 1 - 1 / (t + 1))`` so early teachers are not stuck
  at the random initialisation. A teacher that starts from trained weights (``model.pretrained``,
  or a burn-in's student handed over with :meth:`Teacher.start_from`) has no warm-up: its first
  update is ``decay`` x those weights + (1 - decay) x the student, so it is not replaced by the
  student at step 1 (the warm-up's decay_0 is 0).
- ``epoch_momentum``: DerProp eq. 6, Theta_m <- (Theta_m + Theta_b) / 2 once per epoch.

EMA and momentum teachers are also the networks that are evaluated and saved as the run's
model (DerProp: "used for evaluation"; Mean Teacher practice).

BatchNorm statistics of averaged networks (choices stated). Running means and variances
belong to the weights they were measured with; averaged weights need their own. Copying the
student's statistics into averaged weights, or averaging the statistics with the weights, made
DerProp's momentum network predict one class everywhere (CamVid, 60 steps: 2.6 mIoU; the same
weights with recomputed statistics: 23.5). So:

- ``epoch_momentum``: after each average the statistics are recomputed from scratch on
  ``teacher.bn_batches`` training batches without gradients (:meth:`Teacher.recompute_bn`, i.e.
  ``torch.optim.swa_utils.update_bn``: a cumulative average over the batches), before the
  network predicts a pseudo-label or is evaluated. The first average *copies* the student, so
  the random initialisation keeps no share (eq. 6 applied from the initial weights would leave
  it 1/8 after three epochs). The engine also averages after a last, partial epoch.
  Before that first average (eq. 6 gives no Theta^m_(0)) the momentum network *is* the
  back-propagation network: whenever it predicts or is evaluated (:meth:`Teacher.network`), the
  student's current weights and BatchNorm statistics are copied into it first, so it is never
  the random initialisation (acdc-cpu-1500's DerProp cell: val Dice 0.9 % at iteration 100, the
  first epoch ending at ~155). Between epoch ends it stays the last average, as eq. 6 defines.
- ``ema``: the statistics follow the same exponential average as the weights (not a copy of
  the student's), which is what the teacher predicts pseudo-labels with at every step
  (recomputing them every step would cost ``bn_batches`` forwards a step); before evaluation
  and before the run's model is saved, a copy of the teacher gets recomputed statistics
  (:meth:`Teacher.evaluation_model`).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn


class Teacher:
    KINDS = ("none", "self", "ema", "epoch_momentum")

    def __init__(self, kind: str, student: nn.Module, decay: float = 0.999, *, warmup: bool = True):
        if kind not in self.KINDS:
            raise ValueError(f"unknown teacher kind {kind!r}; choose from {self.KINDS}")
        if not 0 <= decay < 1:
            raise ValueError(f"teacher decay must lie in [0, 1), got {decay}")
        self.kind, self.decay, self.warmup = kind, decay, warmup
        self.is_student = kind in ("none", "self")
        self.updates = 0
        self._student = student if kind == "epoch_momentum" else None  # copied in before the first average
        if self.is_student:
            self.model = student
        else:
            self.model = copy.deepcopy(student)
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

    @property
    def evaluates(self) -> bool:
        """Whether this teacher (rather than the student) is the run's evaluated model."""
        return not self.is_student

    @torch.no_grad()
    def network(self) -> nn.Module:
        """The network that predicts and is evaluated. ``epoch_momentum`` before its first
        average: the student's current weights and buffers are copied into it first (module
        docstring), never the random initialisation."""
        if self.kind == "epoch_momentum" and self.updates == 0 and self._student is not None:
            for pt, ps in zip(self.model.parameters(), self._student.parameters()):
                pt.copy_(ps.detach())
            for bt, bs in zip(self.model.buffers(), self._student.buffers()):
                bt.copy_(bs)
        return self.model

    @torch.no_grad()
    def predict(self, images: torch.Tensor, forward=None):
        """Logits of ``images`` in eval mode, detached; ``forward(net, images)`` instead of
        ``net(images)`` when a method needs more than the logits (its features)."""
        net = self.network()
        was = net.training
        net.eval()
        try:
            out = net(images) if forward is None else forward(net, images)
            return out.detach() if isinstance(out, torch.Tensor) else out
        finally:
            net.train(was)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        if self.kind != "ema":
            return
        d = min(self.decay, 1.0 - 1.0 / (self.updates + 1)) if self.warmup else self.decay
        for pt, ps in zip(self.model.parameters(), student.parameters()):
            pt.mul_(d).add_(ps.detach(), alpha=1.0 - d)
        for bt, bs in zip(self.model.buffers(), student.buffers()):
            if bt.dtype.is_floating_point:
                bt.mul_(d).add_(bs, alpha=1.0 - d)
            else:
                bt.copy_(bs)
        self.updates += 1

    @torch.no_grad()
    def start_from(self, student: nn.Module) -> None:
        """Make the teacher a copy of ``student`` (weights and buffers) and average on from there
        at the full ``decay``, without warm-up: S4M's hand-over at the end of its burn-in."""
        self.model.load_state_dict(student.state_dict())
        self.warmup = False

    @torch.no_grad()
    def after_epoch(self, student: nn.Module, bn_batches: Iterable[torch.Tensor] | None = None) -> None:
        """DerProp eq. 6 (the first time: a copy of the student), then BN statistics recomputed
        on ``bn_batches`` (image batches) when given."""
        if self.kind != "epoch_momentum":
            return
        for pt, ps in zip(self.model.parameters(), student.parameters()):
            if self.updates == 0:
                pt.copy_(ps.detach())
            else:
                pt.add_(ps.detach()).mul_(0.5)  # DerProp eq. 6
        if self.updates == 0:
            for bt, bs in zip(self.model.buffers(), student.buffers()):
                bt.copy_(bs)
        self.updates += 1
        if bn_batches is not None:
            self.recompute_bn(bn_batches)

    @torch.no_grad()
    def recompute_bn(self, batches: Iterable[torch.Tensor], model: nn.Module | None = None) -> None:
        """Reset the BatchNorm running statistics of ``model`` (default: this teacher's network)
        and estimate them afresh as the cumulative average over ``batches`` (image tensors), in
        train mode without gradients (``torch.optim.swa_utils.update_bn``)."""
        model = self.model if model is None else model
        was = model.training
        update_bn(batches, model)
        model.train(was)

    def evaluation_model(self, bn_batches: Iterable[torch.Tensor] | None = None) -> nn.Module:
        """The network to evaluate and save: the student (teacher kinds ``none``/``self``), the
        momentum network (its statistics are already recomputed), or a copy of the EMA network
        with statistics recomputed on ``bn_batches``."""
        if self.kind != "ema" or bn_batches is None:
            return self.network()
        net = copy.deepcopy(self.model)
        self.recompute_bn(bn_batches, net)
        return net.eval()

    def state_dict(self) -> dict | None:
        if self.is_student:
            return None
        return {"model": self.model.state_dict(), "updates": self.updates, "warmup": self.warmup}

    def load_state_dict(self, state: dict | None) -> None:
        if self.is_student or state is None:
            return
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self.warmup = bool(state.get("warmup", self.warmup))  # older checkpoints: as constructed
