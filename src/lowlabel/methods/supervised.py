"""Labeled only: the "supervised" row of every paper's table."""

from __future__ import annotations

from .base import Method, StepOutput, supervised_loss


class Supervised(Method):
    uses_unlabeled = False

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        loss = supervised_loss(student(labeled["image"]), labeled["mask"])
        return StepOutput({"loss": loss, "loss_x": loss.detach()})
