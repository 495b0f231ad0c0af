"""Methods of the instance task (``model.arch: maskrcnn`` on an instance dataset).

``supervised`` trains the instance model on the labeled images' instance maps: each crop's
instances (at least ``min_size`` pixels — a crop keeps slivers of the objects it cuts) become
Mask R-CNN targets, and the loss is the sum of Mask R-CNN's terms (RPN objectness and box,
classification, box regression, mask BCE).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..models.instance import instance_targets
from .base import Method, MethodParams, StepOutput


class InstanceParams(MethodParams):
    min_size: int = Field(5, ge=1)  # pixels an instance needs to be a target (S4M sec. 5.1's size threshold of 5)


def batch_targets(batch: dict, min_size: int) -> list[dict]:
    """Mask R-CNN targets of each sample of a batch with ``instances`` (long [B, H, W])."""
    return [instance_targets(m, min_size=min_size) for m in batch["instances"]]


def summed(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([v for v in losses.values()]).sum()


class InstanceSupervised(Method):
    """Labeled-only instance training: the "teacher" row of S4M's tables (its burn-in stage)."""

    Params = InstanceParams
    task = "instance"

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        parts = student.losses(labeled["image"], batch_targets(labeled, self.p.min_size))
        loss = summed(parts)
        return StepOutput({"loss": loss, "loss_x": loss.detach(), **{k: v.detach() for k, v in parts.items()}}, terms={"x": loss})
