"""Labeled only: the "supervised" row of every paper's table."""

from __future__ import annotations

from typing import Literal

from .base import LossParams, Method, MethodParams, StepOutput, supervised_loss


class Supervised(Method):
    Params = LossParams  # labeled_loss: ce or ce_dice (unlabeled_loss is accepted and unused)
    uses_unlabeled = False
    ddp_find_unused_parameters = False  # every parameter of the student takes part in every step

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        loss = supervised_loss(student(labeled["image"]), labeled["mask"], self.p.labeled_loss, labeled.get("weight"))
        return StepOutput({"loss": loss, "loss_x": loss.detach()}, terms={"x": loss})


class PCEParams(MethodParams):
    labeled_loss: Literal["ce"] = "ce"  # partial cross-entropy: CE on the annotated pixels only


class PartialCE(Supervised):
    """``pce``: partial cross-entropy, the weak-supervision baseline (SeSAM's L_coarse alone):
    cross-entropy on the annotated pixels of the weak labels (points, scribbles, coarse masks;
    the unannotated pixels are 255 and ignored). It trains on ``data.weak`` only: the engine
    refuses it without weak labels, and a weak run never reads a dense training mask."""

    Params = PCEParams
    needs_weak = True
