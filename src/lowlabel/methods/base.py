"""The method seam.

A method is an ``nn.Module`` holding only its *extra* trainable parts (a region classifier, a
projection head, ...; none for the baselines). Each training step the engine calls::

    out = method.training_step(student, teacher, labeled, unlabeled, ctx)

and back-propagates ``out.losses["loss"]`` (the weighted total; the other entries are the named
terms, logged as they are). The engine owns everything else: loaders, optimiser (it adds
``method.parameters()`` to it), schedule, teacher updates, AMP, DDP, checkpoints (it saves
``method.state_dict()``), evaluation.

Batches are dicts (see :mod:`lowlabel.data.dataset`): labeled ``image`` [B,3,S,S], ``mask``
[B,S,S], ``valid`` [B,S,S]; unlabeled ``image`` (the weak view), ``strong`` [B,n,3,S,S],
``cutmix`` [B,n,S,S], ``valid``. Unlabeled batches carry no mask.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..data.dataset import IGNORE_INDEX


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossParams(MethodParams):
    """The loss choice of the baselines (a recipe option, not a paper's). Defaults: cross-entropy,
    as in UniMatch's natural-image code; UniMatch's medical code (ACDC) uses ``ce_dice`` on
    labeled pixels and ``dice`` on pseudo-labels."""

    labeled_loss: Literal["ce", "ce_dice"] = "ce"  # ce_dice: (CE + Dice) / 2
    unlabeled_loss: Literal["ce", "dice"] = "ce"  # dice: Dice on softmax, low-confidence pixels ignored


@dataclass
class RunContext:
    """What the engine hands a method that needs the run's data (``needs_run``)."""

    labeled_set: Any  # the labeled FolderDataset (weak labels as ``mask`` with data.weak)
    run_dir: Path
    device: torch.device
    eval_cfg: Any
    seed: int
    teacher_kind: str


@dataclass
class StepContext:
    """What a method may know about the run at this step."""

    iteration: int  # 0-based index of this optimiser step
    total_iterations: int
    epoch: int  # 0-based; an epoch is a pass over the unlabeled set (labeled set without one)
    total_epochs: int
    num_classes: int
    ignore_index: int = IGNORE_INDEX

    @property
    def progress(self) -> float:
        return self.iteration / max(1, self.total_iterations)


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # must hold "loss", the total to back-propagate
    metrics: dict[str, float] = field(default_factory=dict)
    # the weighted terms (with their graphs) whose sum is "loss": the engine logs the gradient
    # norm of each on the encoder when ``train.grad_norm_every`` asks for it
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module, abc.ABC):
    """Base class of the methods. Subclasses set ``Params`` (their hyper-parameters, defaults
    from the paper) and implement :meth:`training_step`."""

    Params: ClassVar[type[MethodParams]] = MethodParams
    uses_unlabeled: ClassVar[bool] = False
    n_strong: ClassVar[int] = 0  # strong views each unlabeled sample needs
    default_teacher: ClassVar[str] = "none"
    needs_weak: ClassVar[bool] = False  # trains on weak labels only (data.weak must be set)
    labeled_strong: ClassVar[int] = 0  # strong views each labeled sample needs
    needs_coords: ClassVar[bool] = False  # labeled samples carry src_y / src_x (source-coordinate maps)
    needs_run: ClassVar[bool] = False  # the engine calls attach(RunContext) before training

    def __init__(self, params: MethodParams | dict | None = None, *, num_classes: int, model=None):
        super().__init__()
        self.p = params if isinstance(params, MethodParams) else self.Params(**(params or {}))
        self.num_classes = num_classes

    @abc.abstractmethod
    def training_step(self, student, teacher, labeled: dict, unlabeled: dict | None, ctx: StepContext) -> StepOutput:
        """One step's losses. ``teacher`` is an :class:`lowlabel.engine.teachers.Teacher` or None."""

    def attach(self, run: "RunContext") -> None:
        """Called once by the engine before training when ``needs_run``: the run's labeled data,
        folder and device, for methods that keep per-image state (SeSAM's SAM labels)."""

    def on_epoch_end(self, epoch: int, ctx: StepContext) -> None:
        """Called by the engine after each epoch (after the teacher's epoch update)."""


def dice_loss(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss of the medical semi-supervised benchmarks (SSL4MIS / UniMatch medical):
    for each class c, ``1 - (2 sum p_c y_c + s) / (sum p_c^2 + sum y_c^2 + s)`` over the kept
    pixels of the whole batch, with p the softmax and y the one-hot target; the mean over all
    classes (background included). ``keep`` bool [B, H, W] selects the pixels (labeled ones, or
    confident pseudo-labels)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float()
    k = keep.unsqueeze(1).float()
    inter = (probs * onehot * k).sum((0, 2, 3))
    denom = (probs.square() * k).sum((0, 2, 3)) + (onehot * k).sum((0, 2, 3))
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def supervised_loss(logits: torch.Tensor, mask: torch.Tensor, kind: str = "ce", weight: torch.Tensor | None = None) -> torch.Tensor:
    """Loss over labeled pixels (``IGNORE_INDEX`` skipped); 0 when none is labeled. ``kind``:
    ``ce`` (cross-entropy) or ``ce_dice`` ((CE + Dice) / 2, UniMatch's medical code).
    ``weight``: per-pixel weights in 0..255 (the confidence of refined labels,
    ``data.weak_confidence: weight``): the CE becomes the weighted mean over labeled pixels and
    Dice skips zero-weight pixels."""
    keep = mask != IGNORE_INDEX
    if weight is not None:
        keep = keep & (weight > 0)
    if not keep.any():
        return logits.sum() * 0.0
    if weight is None:
        ce = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX)
    else:
        w = weight.float() / 255.0 * keep.float()
        ce = (F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="none") * w).sum() / w.sum()
    if kind == "ce":
        return ce
    if kind == "ce_dice":
        return (ce + dice_loss(logits, mask, keep)) / 2
    raise ValueError(f"unknown labeled loss {kind!r}; choose 'ce' or 'ce_dice'")


def masked_pseudo_loss(logits: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor, threshold: float, kind: str = "ce") -> torch.Tensor:
    """UniMatch's unlabeled loss against hard pseudo-labels, kept where the confidence reaches
    ``threshold`` and the pixel is valid (not padding). ``ce``: per-pixel CE *divided by the
    number of valid pixels* (not of kept ones), so that few confident pixels give a small loss
    (the natural-image code); ``dice``: :func:`dice_loss` over the kept pixels (the medical
    code's ``ignore=(conf < thresh)``)."""
    keep = (conf >= threshold) & valid
    if kind == "dice":
        return dice_loss(logits, pseudo, keep)
    if kind != "ce":
        raise ValueError(f"unknown unlabeled loss {kind!r}; choose 'ce' or 'dice'")
    ce = F.cross_entropy(logits, pseudo.clamp_max(logits.shape[1] - 1), reduction="none")
    return (ce * keep).sum() / valid.sum().clamp_min(1)


def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, confidence, hard label) of detached logits."""
    probs = logits.detach().float().softmax(1)
    conf, label = probs.max(1)
    return probs, conf, label


def weak_view_predictions(student, teacher, labeled_images: torch.Tensor, weak_images: torch.Tensor):
    """Logits of the labeled batch (with grad) and of the unlabeled weak view (detached).

    When the teacher *is* the student (``teacher.kind == 'self'``), both come from one joint
    forward in train mode, as in the official FixMatch/UniMatch segmentation code; otherwise the
    weak view goes through the teacher (eval mode, no grad)."""
    if teacher is None or teacher.is_student:
        logits = student(torch.cat([labeled_images, weak_images]))
        pred_x, pred_w = logits.split([labeled_images.shape[0], weak_images.shape[0]])
        return pred_x, pred_w.detach()
    return student(labeled_images), teacher.predict(weak_images)


def mix_partner(t: torch.Tensor) -> torch.Tensor:
    """The CutMix source for each sample: the next sample of the same batch (roll by one)."""
    return t.roll(1, dims=0)


def accuracy_of(pseudo: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None) -> float | None:
    """Accuracy of pseudo-labels against the true mask where it is known (and ``keep`` holds).
    Used for logging pseudo-label quality when unlabeled ground truth is available."""
    if mask is None:
        return None
    m = mask != IGNORE_INDEX
    if keep is not None:
        m = m & keep
    n = int(m.sum())
    return float((pseudo[m] == mask[m]).float().mean()) if n else None


def class_mean_iou(pseudo: torch.Tensor, gt: torch.Tensor | None, keep: torch.Tensor) -> float | None:
    """IoU of pseudo-labels and the truth per class over the batch's kept pixels, averaged over
    the classes either shows: unlike pixel accuracy, not carried by a dominant class (a
    background of 95 % of the pixels gives 95 % accuracy to labels without any foreground)."""
    if gt is None:
        return None
    m = keep & (gt != IGNORE_INDEX)
    if not m.any():
        return None
    p, g = pseudo[m], gt[m]
    ious = [((p == c) & (g == c)).sum() / ((p == c) | (g == c)).sum() for c in torch.unique(torch.cat([p, g]))]
    return float(torch.stack(ious).float().mean())


def pseudo_label_metrics(pseudo: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor, threshold: float, gt: torch.Tensor | None) -> dict:
    """``mask_ratio`` (share of valid pixels above the threshold) and, when the unlabeled
    images' true masks were loaded for diagnostics, the accuracy of the kept pseudo-labels
    (``acc_threshold``) and of all of them (``acc_all``), and their class-mean IoU
    (``miou_threshold``, ``miou_all``)."""
    keep = (conf >= threshold) & valid
    out = {"mask_ratio": float(keep.sum() / valid.sum().clamp_min(1))}
    for name, m in (("threshold", keep), ("all", valid)):
        for kind, fn in (("acc", accuracy_of), ("miou", class_mean_iou)):
            v = fn(pseudo, gt, m)
            if v is not None:
                out[f"{kind}_{name}"] = v
    return out
