"""Teachers: a config choice, not a script.

- ``none`` / ``self``: the student itself (UniMatch v1, FixMatch); ``predict`` runs it in eval
  mode without gradients, and methods may instead use a joint train-mode forward
  (``is_student`` tells them).
- ``ema``: an exponential moving average of the student after every step (Mean Teacher), with
  the usual warm-up ``decay_t = min(decay, 1 - 1 / (t + 1))`` so early teachers are not stuck
  at the random initialisation. Buffers (BN statistics) are copied.
- ``epoch_momentum``: DerProp eq. 6, Theta_m <- (Theta_m + Theta_b) / 2 once per epoch.

EMA and momentum teachers are also the networks that are evaluated and saved as the run's
model (DerProp: "used for evaluation"; Mean Teacher practice).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Teacher:
    KINDS = ("none", "self", "ema", "epoch_momentum")

    def __init__(self, kind: str, student: nn.Module, decay: float = 0.999):
        if kind not in self.KINDS:
            raise ValueError(f"unknown teacher kind {kind!r}; choose from {self.KINDS}")
        if not 0 <= decay < 1:
            raise ValueError(f"teacher decay must lie in [0, 1), got {decay}")
        self.kind, self.decay = kind, decay
        self.is_student = kind in ("none", "self")
        self.updates = 0
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
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``images`` in eval mode, detached."""
        was = self.model.training
        self.model.eval()
        try:
            return self.model(images).detach()
        finally:
            self.model.train(was)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        if self.kind != "ema":
            return
        d = min(self.decay, 1.0 - 1.0 / (self.updates + 1))
        for pt, ps in zip(self.model.parameters(), student.parameters()):
            pt.mul_(d).add_(ps.detach(), alpha=1.0 - d)
        for bt, bs in zip(self.model.buffers(), student.buffers()):
            bt.copy_(bs)
        self.updates += 1

    @torch.no_grad()
    def after_epoch(self, student: nn.Module) -> None:
        if self.kind != "epoch_momentum":
            return
        for pt, ps in zip(self.model.parameters(), student.parameters()):
            pt.add_(ps.detach()).mul_(0.5)  # DerProp eq. 6
        for bt, bs in zip(self.model.buffers(), student.buffers()):
            if bt.dtype.is_floating_point:
                bt.add_(bs).mul_(0.5)
            else:
                bt.copy_(bs)
        self.updates += 1

    def state_dict(self) -> dict | None:
        if self.is_student:
            return None
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict | None) -> None:
        if self.is_student or state is None:
            return
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
