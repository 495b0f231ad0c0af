"""Labeled only: the "supervised" row of every paper's table."""

from __future__ import annotations

from .base import LossParams, Method, StepOutput, supervised_loss


class Supervised(Method):
    Params = LossParams  # labeled_loss: ce or ce_dice (unlabeled_loss is accepted and unused)
    uses_unlabeled = False

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        loss = supervised_loss(student(labeled["image"]), labeled["mask"], self.p.labeled_loss)
        return StepOutput({"loss": loss, "loss_x": loss.detach()}, terms={"x": loss})
