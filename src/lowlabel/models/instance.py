"""The instance model: torchvision's Mask R-CNN, built from scratch for lowlabel's instance task.

S4M (and GuidedDistillation, which it builds on) use Mask2Former. lowlabel uses torchvision's
Mask R-CNN instead — a deviation from the paper, chosen by measurement on the 2-core CPU
machines these benchmarks run on (2026-11-30, 256 x 256 crops, batch 4, one thread, two other
training processes on the machine): one training step took 8.3-9.0 s with Mask R-CNN ResNet-18-FPN
and 7.1-8.2 s with ``transformers``' Mask2Former (ResNet-18-sized backbone, 100 queries, 3 + 4
layers) — the same cost, but Mask R-CNN needs no extra dependency (torchvision is already
required), and a set-prediction transformer trained from scratch on ~60 images converges far
more slowly than anchor-based detection. The semi-supervised machinery (EMA teacher, confidence
and size filters, copy-paste, SAM refinement) only needs "masks + class + score per image",
which both models give.

Deviations from torchvision's defaults, for training from scratch on small objects:
- BatchNorm (trainable) in the backbone instead of the frozen BatchNorm of ImageNet fine-tuning
  (frozen statistics of random weights make the loss explode at the first steps);
- images are not resized (the transform keeps the native resolution: nuclei are 5-40 px);
- anchors of 8-128 px on the five FPN levels instead of 32-512 (``anchor_sizes``);
- up to ``max_detections`` (default 500) instances per image instead of 100 (a DSB image holds
  up to ~380 nuclei).

``model.options`` (:class:`InstanceOptions`) set how many proposals a training step keeps and
samples; their defaults are torchvision's. On small crops they can be cut: 2026-12-01, 128 x 128
dsb2018 crops (2-23 nuclei each), batch 4, one thread, two other training processes on the
2-core machine, a step took 14.1 s with the defaults (512 sampled regions per image, 2,000
proposals after NMS), 7.8 s with 128 / 500 and 5.7 s with 64 / 300. The profile at 128 / 500
is convolution (backbone and mask head) and RoIAlign's backward. The mask head's cost grows with
the sampled positive regions (a quarter of ``roi_batch``).

Interface (the instance-task seam of ``DESIGN.md``)::

    losses = model.losses(images, targets)   # train: dict of named losses
    dets   = model.eval()(images)            # eval: per image {"masks" float[N,H,W] in [0,1],
                                             #   "labels" long[N] (0-based classes), "scores" float[N]}

Images are float [B, 3, H, W] in [0, 1]; targets hold ``boxes`` float[N, 4] (x0, y0, x1, y1),
``labels`` long[N] (0-based classes) and ``masks`` uint8[N, H, W].
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .normalization import MEAN, STD

INSTANCE_ARCHS = ("maskrcnn",)
INSTANCE_ENCODERS = ("resnet18", "resnet34", "resnet50")


class InstanceOptions(BaseModel):
    """``model.options`` of ``arch: maskrcnn`` (defaults: torchvision's)."""

    model_config = ConfigDict(extra="forbid")
    roi_batch: int = Field(512, ge=1)  # regions sampled per image for the box and mask heads (a quarter positive at most)
    rpn_post_nms_train: int = Field(2000, ge=1)  # proposals kept per image after the RPN's NMS, in training


def _native_transform(transform):
    """The detection transform without its resizing step (normalisation and batching stay)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class NativeSize(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    return NativeSize(transform.min_size, transform.max_size, transform.image_mean, transform.image_std, size_divisible=32)


def weighted_classifier_loss(class_logits: torch.Tensor, labels: list[torch.Tensor], background_weight: float) -> torch.Tensor:
    """The box head's classification loss with each background region (label 0) weighted by
    ``background_weight`` and each object region by 1, normalised by the sum of the weights:
    Mask2Former's classification loss, whose "no object" class weighs 0.1 (``NO_OBJECT_WEIGHT``),
    on Mask R-CNN's sampled regions. At 1 it is torchvision's (the plain mean)."""
    weight = class_logits.new_ones(class_logits.shape[1])
    weight[0] = background_weight
    return F.cross_entropy(class_logits, torch.cat(labels), weight=weight)


def weighted_objectness_loss(objectness: torch.Tensor, labels: list[torch.Tensor], positive: list[torch.Tensor], negative: list[torch.Tensor],
                             background_weight: float) -> torch.Tensor:
    """The RPN's objectness loss over its sampled anchors (``positive`` / ``negative``: the
    sampler's per-image masks), each negative weighted by ``background_weight``, normalised by
    the sum of the weights. At 1 it is torchvision's (the mean over the sampled anchors)."""
    pos, neg = torch.cat(positive).bool(), torch.cat(negative).bool()
    drawn = pos | neg  # the sampled anchors only (never an ignored one, label -1)
    weight = torch.where(pos[drawn], 1.0, background_weight).to(objectness.dtype)
    loss = F.binary_cross_entropy_with_logits(objectness.flatten()[drawn], torch.cat(labels)[drawn].to(objectness.dtype), reduction="none")
    return (loss * weight).sum() / weight.sum().clamp(min=1e-12)


@contextlib.contextmanager
def background_weighted(net, background_weight: float):
    """Within the block, the two classification terms of torchvision's Mask R-CNN ``net``
    (``loss_objectness``, ``loss_classifier``) weigh background samples by ``background_weight``
    (:func:`weighted_objectness_loss`, :func:`weighted_classifier_loss`); box and mask terms are
    torchvision's own. torchvision exposes no weight, so the block swaps the RPN's loss method
    (keeping its sampler's draw) and ``roi_heads.fastrcnn_loss`` (a module global), and puts both
    back on exit. Not thread-safe (the engine trains one model a process)."""
    from torchvision.models.detection import roi_heads

    rpn = net.rpn
    fastrcnn_loss, sampler = roi_heads.fastrcnn_loss, rpn.fg_bg_sampler
    rpn_loss = type(rpn).compute_loss
    drawn = []

    def recording_sampler(labels):
        drawn[:] = sampler(labels)
        return drawn[0], drawn[1]

    def objectness_loss(objectness, pred_bbox_deltas, labels, regression_targets):
        _, box = rpn_loss(rpn, objectness, pred_bbox_deltas, labels, regression_targets)
        return weighted_objectness_loss(objectness, labels, drawn[0], drawn[1], background_weight), box

    def classifier_loss(class_logits, box_regression, labels, regression_targets):
        _, box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        return weighted_classifier_loss(class_logits, labels, background_weight), box

    rpn.fg_bg_sampler, rpn.compute_loss, roi_heads.fastrcnn_loss = recording_sampler, objectness_loss, classifier_loss
    try:
        yield
    finally:
        rpn.fg_bg_sampler, roi_heads.fastrcnn_loss = sampler, fastrcnn_loss
        del rpn.compute_loss  # the class's method again


class InstanceModel(nn.Module):
    """Mask R-CNN behind lowlabel's instance interface (see the module docstring)."""

    task = "instance"
    arch = "maskrcnn"

    def __init__(self, num_classes: int, encoder: str = "resnet18", anchor_sizes=(8, 16, 32, 64, 128), max_detections: int = 500,
                 options: dict | None = None):
        super().__init__()
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        if encoder not in INSTANCE_ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r} for maskrcnn; choose from {INSTANCE_ENCODERS}")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {anchor_sizes}")
        self.num_classes, self.encoder_name = num_classes, encoder
        self.options = o = InstanceOptions(**(options or {}))
        backbone = resnet_fpn_backbone(backbone_name=encoder, weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d)
        anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        self.net = MaskRCNN(
            backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchors, image_mean=list(MEAN), image_std=list(STD),
            box_detections_per_img=max_detections, box_score_thresh=0.05, box_batch_size_per_image=o.roi_batch,
            rpn_post_nms_top_n_train=o.rpn_post_nms_train,
        )
        self.net.transform = _native_transform(self.net.transform)

    @property
    def encoder(self) -> nn.Module:
        """The backbone's ResNet (the engine logs per-term gradient norms on it)."""
        return self.net.backbone.body

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` (the ResNet) and ``head`` (FPN, RPN, box and mask heads) parameters."""
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in enc}
        return {"backbone": enc, "head": [p for p in self.parameters() if p.requires_grad and id(p) not in ids]}

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """FPN features (``"0"`` = stride 4 ... ``"pool"``) of normalised images (the train-mode
        pass of BatchNorm re-estimation; SD takes the same features from :meth:`losses`)."""
        x = (images - images.new_tensor(MEAN).view(1, 3, 1, 1)) / images.new_tensor(STD).view(1, 3, 1, 1)
        return self.net.backbone(x)

    def losses(self, images: torch.Tensor, targets: list[dict], features: list | None = None, background_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Mask R-CNN's training losses (RPN objectness and box, classifier, box, mask);
        ``targets``' labels are 0-based (background is added here). With ``features`` (a list),
        the FPN features of this same forward pass are appended to it (the batch padded
        bottom-right to a multiple of 32), for a loss on them without a second backbone pass.
        ``background_weight`` < 1 weighs background samples down in the objectness and
        classifier terms (:func:`background_weighted`)."""
        if not self.training:
            raise RuntimeError("InstanceModel.losses needs train mode")
        shifted = [{**t, "labels": t["labels"] + 1} for t in targets]
        with contextlib.ExitStack() as stack:
            if background_weight != 1.0:
                stack.enter_context(background_weighted(self.net, background_weight))
            if features is not None:
                handle = self.net.backbone.register_forward_hook(lambda mod, inp, out: features.append(out))
                stack.callback(handle.remove)
            return self.net(list(images), shifted)

    def forward(self, images: torch.Tensor) -> list[dict] | dict[str, torch.Tensor]:
        """Eval mode: the detections. Train mode: the backbone's features only — the pass that
        ``torch.optim.swa_utils.update_bn`` makes to re-estimate BatchNorm statistics (the only
        BatchNorm layers are the backbone's); training losses come from :meth:`losses`."""
        if self.training:
            return self.features(images)
        return self.detect(images)

    def detect(self, images: torch.Tensor, score_threshold: float | None = None) -> list[dict]:
        """Eval-mode detections; with ``score_threshold``, only those scoring at least it. The box
        head then drops the others before the mask head, instead of after it: the kept
        detections are the same (NMS suppresses a box only by a higher-scoring one, and the mask
        head treats each box alone), and the mask head no longer runs on hundreds of low-scoring
        boxes, most of a half-trained model's inference time (S4M's teacher keeps >= 0.7)."""
        if self.training:
            raise RuntimeError("InstanceModel.detect needs eval mode")
        heads = self.net.roi_heads
        default = heads.score_thresh
        if score_threshold is not None:  # torchvision keeps float32 scores > score_thresh: the float32 just below, to keep == too
            below = torch.nextafter(torch.tensor(float(score_threshold)), torch.tensor(-math.inf)).item()
            heads.score_thresh = max(default, below)
        try:
            out = self.net(list(images))
        finally:
            heads.score_thresh = default
        return [{"masks": d["masks"][:, 0], "labels": d["labels"] - 1, "scores": d["scores"], "boxes": d["boxes"]} for d in out]


def instance_targets(instances: torch.Tensor, *, min_size: int = 1, labels: torch.Tensor | None = None) -> dict:
    """Mask R-CNN targets of one instance-id map (long [H, W], 0 = background): one binary mask,
    its tight box and its class (0, or ``labels[id]``) per id with at least ``min_size`` pixels
    (a crop keeps slivers of instances cut at its border). Boxes are in pixel-edge coordinates
    (x0, y0, x1 + 1, y1 + 1)."""
    ids = torch.unique(instances)
    ids = ids[ids > 0]
    masks = instances.unsqueeze(0) == ids.view(-1, 1, 1)
    if len(ids):
        keep = masks.flatten(1).sum(1) >= min_size
        ids, masks = ids[keep], masks[keep]
    h, w = instances.shape
    if not len(ids):
        return {"boxes": torch.zeros(0, 4, device=instances.device), "labels": torch.zeros(0, dtype=torch.long, device=instances.device),
                "masks": torch.zeros(0, h, w, dtype=torch.uint8, device=instances.device)}
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=instances.device)
    ar_w = torch.arange(w, device=instances.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values + 1
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    cls = torch.zeros(len(ids), dtype=torch.long, device=instances.device) if labels is None else labels[ids]
    return {"boxes": boxes, "labels": cls, "masks": masks.to(torch.uint8)}


def build_instance_model(arch: str, encoder: str, num_classes: int, in_channels: int = 3, options: dict | None = None) -> InstanceModel:
    if arch not in INSTANCE_ARCHS:
        raise ValueError(f"unknown instance model arch {arch!r}; choose from {INSTANCE_ARCHS}")
    if in_channels != 3:
        raise ValueError("the instance model takes RGB input (model.in_channels: 3); grey images are read as three equal channels")
    return InstanceModel(num_classes, encoder, options=options)
