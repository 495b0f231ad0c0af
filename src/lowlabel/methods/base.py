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

**A paper's method is a base scheme plus its own terms.** The weak-to-strong bases (FixMatch,
UniMatch: :class:`WeakToStrong`) compute everything in two calls that an add-on
(:mod:`lowlabel.methods.addon`: RegionMatch, DerProp) makes in turn::

    step = base.views(student, teacher, labeled, unlabeled)   # every forward pass and step.plain
    out = base.output(step, targets)                           # the base's terms on these targets

``views`` runs the networks once (labeled batch, weak view, the CutMix strong views, UniMatch's
feature-perturbed weak view) and keeps what add-ons read: logits, decoder features and encoder
levels of each (:class:`NetOutput`), the CutMix boxes (:class:`StrongView`), and the base's own
pseudo-labels, confidences and kept-pixel mask (:class:`Targets`). An add-on may hand
``output`` other targets (DerProp's rectified pseudo-labels, RegionMatch's PRSPL mask), then adds
its own terms to the returned :class:`StepOutput`. With the add-on's terms off it passes
``step.plain`` and adds nothing, and its losses are the base's exactly (tests/test_methods_addons.py).

The labeled term is a seam too: :meth:`WeakToStrong.labeled_term` is the base's own (its pixel
loss on ``labeled["mask"]``, the weak labels with ``data.weak``), and ``output(step, targets,
labeled=...)`` takes another labeled side's terms in its place, the unlabeled terms unchanged
(SeSAM's weak-label side: :class:`~lowlabel.methods.sesam.SeSAMSSL`, tests/test_weak_ssl.py).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..augment.transforms import mix
from ..data.dataset import IGNORE_INDEX
from .selection import Selection


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossParams(MethodParams):
    """The loss choice of the baselines (a recipe option, not a paper's). Defaults: cross-entropy,
    as in UniMatch's natural-image code; UniMatch's medical code (ACDC) uses ``ce_dice`` on
    labeled pixels and ``dice`` on pseudo-labels."""

    labeled_loss: Literal["ce", "ce_dice"] = "ce"  # ce_dice: (CE + Dice) / 2
    unlabeled_loss: Literal["ce", "dice"] = "ce"  # dice: Dice on softmax, low-confidence pixels ignored


class SelectionParams(LossParams):
    """The pseudo-label selection of the weak-to-strong bases (shared by FixMatch, UniMatch and the
    add-ons built on them)."""

    threshold: float = Field(0.95, ge=0, le=1)  # FixMatch sec. 3.2 / UniMatch configs: tau = 0.95
    selection: Literal["fixed", "flexmatch", "freematch", "softmatch"] = "fixed"  # lowlabel.methods.selection
    selection_momentum: float = Field(0.999, ge=0, lt=1)  # FreeMatch / SoftMatch: 0.999
    unlabeled_ramp: int = Field(0, ge=0)  # iterations of the sigmoid ramp-up of the unlabeled terms (0: off)


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
    ``threshold`` and the pixel is valid (not padding): :func:`kept_pseudo_loss` with that mask."""
    return kept_pseudo_loss(logits, pseudo, (conf >= threshold) & valid, valid, kind)


def kept_pseudo_loss(logits: torch.Tensor, pseudo: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """The unlabeled loss against hard pseudo-labels on the pixels ``keep`` selects (bool
    [B, H, W], valid pixels only). ``ce``: per-pixel CE *divided by the number of valid pixels*
    (not of kept ones), so that few kept pixels give a small loss (UniMatch's natural-image
    code); ``dice``: :func:`dice_loss` over the kept pixels (the medical code's
    ``ignore=(conf < thresh)``)."""
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


def class_ious(pseudo: torch.Tensor, gt: torch.Tensor | None, keep: torch.Tensor, num_classes: int) -> dict[int, float]:
    """IoU of pseudo-labels and the truth for each class that either shows on the kept pixels
    (the terms of :func:`class_mean_iou`); empty without a truth or a kept pixel."""
    if gt is None:
        return {}
    m = keep & (gt != IGNORE_INDEX)
    if not m.any():
        return {}
    p, g = pseudo[m], gt[m]
    out = {}
    for c in range(num_classes):
        union = ((p == c) | (g == c)).sum()
        if union:
            out[c] = float(((p == c) & (g == c)).sum() / union)
    return out


# ----------------------------------------------------------------------------- weak-to-strong bases
@dataclass
class NetOutput:
    """One pass of a network: ``logits`` [B, C, H, W] and what they came from, the decoder
    features ``decoded`` (:meth:`Segmenter.decode_features`, [B, D, h, w]; None for a network
    without ``classify``) and the encoder levels ``features``."""

    logits: torch.Tensor
    decoded: torch.Tensor | None = None
    features: list[torch.Tensor] | None = None

    def split(self, sizes: list[int]) -> list[NetOutput]:
        logits = self.logits.split(sizes)
        dec = self.decoded.split(sizes) if self.decoded is not None else [None] * len(sizes)
        feats = list(zip(*[f.split(sizes) for f in self.features])) if self.features is not None else [None] * len(sizes)
        return [NetOutput(lg, d, None if f is None else list(f)) for lg, d, f in zip(logits, dec, feats)]

    def detach(self) -> NetOutput:
        return NetOutput(self.logits.detach(), None if self.decoded is None else self.decoded.detach(),
                         None if self.features is None else [f.detach() for f in self.features])


def run_net(net, images: torch.Tensor) -> NetOutput:
    """``net(images)`` as encode -> decode_features -> classify, keeping the features: the same
    operations as :meth:`Segmenter.forward` for inputs whose sides divide by ``size_divisor``
    (training crops are multiples of 32), hence the same logits. A network without ``classify``
    (SSR-SAM's retrieval model) runs ``decode(encode(x))``, its own forward."""
    size = images.shape[-2:]
    feats = net.encode(images)
    if hasattr(net, "classify"):
        dec = net.decode_features(feats)
        return NetOutput(net.classify(dec, size), dec, feats)
    return NetOutput(net.decode(feats, size), None, feats)


@dataclass
class Targets:
    """Pseudo-labels of the weak view, in its geometry: ``probs`` float32 [B, C, H, W],
    ``conf`` and ``pseudo`` [B, H, W], and ``keep`` bool [B, H, W], the valid pixels that the
    unlabeled pixel terms train on."""

    probs: torch.Tensor
    conf: torch.Tensor
    pseudo: torch.Tensor
    keep: torch.Tensor
    weight: torch.Tensor | None = None  # soft per-pixel weights (selection softmatch), else None

    @property
    def loss_mask(self) -> torch.Tensor:
        """What the unlabeled pixel losses weigh each pixel by: ``weight`` where the selection is
        soft, else ``keep``."""
        return self.keep if self.weight is None else self.weight


@dataclass
class StrongView:
    """A strong view as the student saw it: ``image`` = the strong image CutMixed with its batch
    partner inside ``box`` (bool [B, H, W]), ``out`` its forward pass (with gradients)."""

    box: torch.Tensor
    image: torch.Tensor
    out: NetOutput

    def mix(self, t: torch.Tensor) -> torch.Tensor:
        """A weak-view map (labels, confidences, masks, probabilities, features at the box's
        size) carried into this view: the partner's values inside the box."""
        return mix(self.box, t, mix_partner(t))


# the labeled side of a base's step: (weighted terms, with graphs; unweighted losses to log)
LabeledTerms = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class BaseStep:
    """Everything a base's :meth:`WeakToStrong.views` computed for one step."""

    labeled: dict
    unlabeled: dict
    x: NetOutput  # the labeled batch, with gradients
    weak: NetOutput  # the weak view, detached (the teacher's pass, or the weak half of the joint pass)
    strong: list[StrongView]  # the strong views the base forwards (FixMatch 1, UniMatch 2)
    plain: Targets  # the base's own pseudo-labels (confidence threshold)
    fp: torch.Tensor | None = None  # UniMatch: logits of the feature-perturbed weak view, with gradients

    @property
    def valid(self) -> torch.Tensor:
        return self.unlabeled["valid"]


class WeakToStrong(Method):
    """A weak-to-strong base (FixMatch, UniMatch): :meth:`views` runs the networks,
    :meth:`pseudo_targets` makes the pseudo-labels, :meth:`base_terms` the base's loss terms on
    given targets, :meth:`output` wraps them with the pseudo-label metrics. ``training_step`` is
    the three in a row; add-ons call them one by one (module docstring)."""

    uses_unlabeled = True
    default_teacher = "self"

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        self.selection = Selection(self.p, num_classes)  # fixed threshold, or an adaptive rule (lowlabel.methods.selection)
        self._ramp = 1.0  # this step's unlabeled ramp-up factor (set by pseudo_targets)

    @property
    @abc.abstractmethod
    def labeled_weight(self) -> float:
        """The weight of the labeled pixel loss in this base's total (0.5 in both bases: their
        code halves (L_x + L_u)); an add-on scales a paper's weights, given relative to a
        labeled loss of weight 1, by it."""

    @abc.abstractmethod
    def views(self, student, teacher, labeled: dict, unlabeled: dict) -> BaseStep:
        """Every forward pass of the base's step, once (:class:`BaseStep`)."""

    @abc.abstractmethod
    def base_terms(self, step: BaseStep, targets: Targets, labeled: LabeledTerms | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(weighted terms whose sum is the base's loss, the unweighted losses to log). The
        labeled term is :meth:`labeled_term`'s, or ``labeled`` when a method hands its own
        labeled side (SeSAM's weak-label terms: :class:`~lowlabel.methods.sesam.SeSAMSSL`); the
        unlabeled terms are the base's whatever the labeled side is."""

    def weigh_labeled(self, loss: torch.Tensor) -> torch.Tensor:
        """A labeled loss in this base's scale: ``labeled_weight`` x ``loss``."""
        return self.labeled_weight * loss

    def labeled_term(self, step: BaseStep) -> LabeledTerms:
        """The base's own labeled term: the pixel loss (``labeled_loss``) on ``labeled["mask"]``,
        the dense masks or, with ``data.weak``, the weak labels (partial CE / partial CE + Dice
        on the annotated pixels; 255 is ignored)."""
        labeled = step.labeled
        loss_x = supervised_loss(step.x.logits, labeled["mask"], self.p.labeled_loss, labeled.get("weight"))
        return {"x": self.weigh_labeled(loss_x)}, {"loss_x": loss_x.detach()}

    def _weak_pass(self, student, teacher, x: torch.Tensor, u_w: torch.Tensor) -> tuple[NetOutput, NetOutput]:
        """The labeled batch (with gradients) and the weak view (detached). When the teacher is
        the student (kind ``self``/``none``, or None), one joint train-mode forward of both, as
        in the official FixMatch/UniMatch segmentation code; otherwise the weak view goes
        through the teacher (eval mode, no gradients)."""
        if teacher is None or teacher.is_student:
            out_x, out_w = run_net(student, torch.cat([x, u_w])).split([x.shape[0], u_w.shape[0]])
            return out_x, out_w.detach()
        return run_net(student, x), teacher.predict(u_w, forward=run_net)

    def _strong_views(self, student, unlabeled: dict, n: int) -> list[StrongView]:
        views = []
        strong, boxes = unlabeled["strong"], unlabeled["cutmix"]
        for k in range(n):
            box = boxes[:, k]
            img = mix(box, strong[:, k], mix_partner(strong[:, k]))
            views.append(StrongView(box, img, run_net(student, img)))
        return views

    def pseudo_targets(self, weak_logits: torch.Tensor, valid: torch.Tensor) -> Targets:
        """FixMatch/UniMatch pseudo-labels: the argmax of the weak view's (float32) softmax,
        kept where its confidence reaches ``threshold`` on valid pixels (``selection: fixed``), or
        as an adaptive rule selects them (:mod:`lowlabel.methods.selection`). Called once per
        step: it advances the rule's running statistics and the unlabeled ramp-up."""
        probs, conf, pseudo = pseudo_labels(weak_logits)
        keep, weight = self.selection.select(probs, conf, pseudo, valid)
        self._ramp = self.selection.ramp()
        return Targets(probs, conf, pseudo, keep, weight)

    def output(self, step: BaseStep, targets: Targets, labeled: LabeledTerms | None = None) -> StepOutput:
        """The base's terms on ``targets`` (with ``labeled``, another labeled side's weighted
        terms and logged losses in place of :meth:`labeled_term`'s); metrics of the base's own
        pseudo-labels (``step.plain``)."""
        terms, logged = self.base_terms(step, targets, labeled)
        plain = step.plain
        metrics = pseudo_label_metrics(plain.pseudo, plain.conf, step.valid, self.p.threshold, step.unlabeled.get("gt"))
        metrics.update(self.selection.metrics(plain.keep, plain.weight, step.valid))
        return StepOutput({"loss": sum(terms.values()), **logged}, metrics, terms)

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        step = self.views(student, teacher, labeled, unlabeled)
        return self.output(step, step.plain)
