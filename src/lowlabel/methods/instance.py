"""Methods of the instance task (``model.arch: maskrcnn`` on an instance dataset).

``s4m`` is S4M's teacher-student training with its SAM refinement (PR) and copy-paste (ARP);
see :class:`S4M`. Structural distillation (SD, ``sd: true``) is a loss of teacher training: of
``supervised`` (the teacher row), and of ``s4m``'s burn-in; see :func:`structural_distillation`.
``supervised`` trains the instance model on the labeled images' instance maps: each crop's
instances (at least ``min_size`` pixels — a crop keeps slivers of the objects it cuts) become
Mask R-CNN targets, and the loss is the sum of Mask R-CNN's terms (RPN objectness and box,
classification, box regression, mask BCE).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..models.instance import instance_targets
from .base import Method, MethodParams, StepOutput


class InstanceParams(MethodParams):
    min_size: int = Field(5, ge=1)  # pixels an instance needs to be a target (S4M sec. 5.1's size threshold of 5)
    sd: bool = False  # SD: structural distillation from SAM's decoder features in teacher training (S4M sec. 4.1)
    sd_weight: float = Field(1.0, gt=0)  # lambda of L_SD (the paper does not give it; our choice)
    sd_points: int = Field(16, ge=1)  # random query points per image, each prompted alone (the paper does not give it; our choice)
    sd_stage: Literal["teacher", "student", "both"] = "teacher"  # s4m: SD in burn-in, after it, or both (Table 5; teacher-only is best)
    backend: Literal["classical", "sam", "mobilesam", "sam2"] = "classical"  # PR's promptable segmenter and SD's meta-teacher (the paper: SAM 2 Hiera-L)
    checkpoint: str | None = None  # local weights of a neural backend (or LOWLABEL_SAM_CHECKPOINT)
    model_type: str | None = None
    allow_random_weights: bool = False  # a neural backend without a checkpoint: for timing and tests only


def batch_targets(batch: dict, min_size: int) -> list[dict]:
    """Mask R-CNN targets of each sample of a batch with ``instances`` (long [B, H, W])."""
    return [instance_targets(m, min_size=min_size) for m in batch["instances"]]


def summed(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([v for v in losses.values()]).sum()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float [3, H, W] in [0, 1] -> uint8 [H, W, 3], what a promptable segmenter embeds."""
    return (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()


def self_similarity_rows(feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (flat positions, long [N]) of the cosine self-similarity matrix of ``feats``
    [C, h, w]: float [N, h * w], each row the similarity of one query position to every position."""
    f = F.normalize(feats.flatten(1), dim=0)
    return f[:, idx].T @ f


def structural_distillation(teacher_feats: torch.Tensor, sam_feats: torch.Tensor, idx: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """S4M's SD loss (sec. 4.1, eqs. 1-2) on one image: the teacher's feature map [C, H', W'] is
    interpolated (bilinear) to SAM's decoder-feature grid [rows, cols]; query i's row of the
    teacher's cosine self-similarity matrix is matched, by the Huber function, to the same row of
    the self-similarity of SAM's decoder features obtained with query i's point as the prompt
    (``sam_feats`` [N, C', rows, cols], one map per query); the mean over queries and positions.
    Huber's delta (1, torch's default) is not given in the paper."""
    t = F.interpolate(teacher_feats[None], size=sam_feats.shape[-2:], mode="bilinear", align_corners=False)[0]
    s_t = self_similarity_rows(t, idx)
    s_s = torch.stack([self_similarity_rows(sam_feats[i], idx[i:i + 1])[0] for i in range(len(idx))]).to(s_t)
    return F.huber_loss(s_t, s_s, delta=delta)


class InstanceMethod(Method):
    """What the instance methods share: Mask R-CNN's labeled loss, the promptable segmenter
    (PR's and SD's) built at attach, and SD on the labeled images."""

    Params = InstanceParams
    task = "instance"
    needs_run = True

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        self.segmenter = None
        self.seed = 0

    def needs_segmenter(self) -> bool:
        return self.p.sd

    def attach(self, run) -> None:
        from ..errors import ConfigError

        p = self.p
        self.seed = run.seed
        if p.sd and p.backend == "classical":
            raise ConfigError("method.params.sd (structural distillation) distils SAM's mask-decoder features: the classical backend has none; "
                              "set method.params.backend to sam, mobilesam or sam2 with a checkpoint")
        if self.needs_segmenter():
            from ..sam import build_segmenter

            self.segmenter = build_segmenter(p.backend, checkpoint=p.checkpoint, model_type=p.model_type, device=str(run.device))
            if self.segmenter.weights_id.startswith("random") and not p.allow_random_weights:
                raise ConfigError(f"method.params.backend={p.backend!r} has no checkpoint (method.params.checkpoint or LOWLABEL_SAM_CHECKPOINT): "
                                  "its masks would be random; give one, or set method.params.allow_random_weights=true to test the pipeline")

    def sd_loss(self, images: torch.Tensor, feats: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """SD on a batch: ``feats`` [B, C, H', W'] is the network's stride-4 FPN level over the
        images [B, 3, H, W] (Mask R-CNN's analogue of Mask2Former's per-pixel features); per image,
        ``sd_points`` points drawn uniformly over it each prompt SAM alone."""
        from ..sam import Prompts

        losses = []
        h, w = images.shape[-2:]
        for i in range(len(images)):
            emb = self.segmenter.embed(to_uint8(images[i]))
            pts = (rng.random((self.p.sd_points, 2)) * [w, h]).astype(np.float32)  # (x, y)
            sam = self.segmenter.decoder_features(emb, Prompts(points=pts[:, None, :]))
            rows, cols = sam.shape[-2:]
            r = np.minimum((pts[:, 1] * rows / h).astype(int), rows - 1)
            c = np.minimum((pts[:, 0] * cols / w).astype(int), cols - 1)
            losses.append(structural_distillation(feats[i], sam.to(feats.device), torch.as_tensor(r * cols + c, device=feats.device)))
        return torch.stack(losses).mean()

    def labeled_loss(self, student, labeled: dict, ctx, sd: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Mask R-CNN's summed losses on the labeled batch, their parts, and (``sd``) L_SD on the
        features of the same forward pass."""
        images = labeled["image"]
        feats = [] if sd else None
        parts = student.losses(images, batch_targets(labeled, self.p.min_size), features=feats)
        loss = summed(parts)
        if not sd:
            return loss, parts, None
        h, w = images.shape[-2:]
        level = feats[0]["0"][:, :, : -(-h // 4), : -(-w // 4)]  # the batch is padded bottom-right to a multiple of 32
        return loss, parts, self.sd_loss(images, level, np.random.default_rng([self.seed, ctx.iteration, 1]))


class InstanceSupervised(InstanceMethod):
    """Labeled-only instance training: the "teacher" row of S4M's tables (its burn-in stage),
    with S4M's structural distillation when ``sd`` (the whole run is teacher training)."""

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        loss_x, parts, sd = self.labeled_loss(student, labeled, ctx, self.p.sd)
        logs = {"loss_x": loss_x.detach(), **{k: v.detach() for k, v in parts.items()}}
        terms = {"x": loss_x}
        if sd is not None:
            terms["sd"] = self.p.sd_weight * sd
            logs["loss_sd"] = sd.detach()
        return StepOutput({"loss": sum(terms.values()), **logs}, terms=terms)


class S4MParams(InstanceParams):
    threshold: float = Field(0.7, ge=0, le=1)  # class confidence of kept pseudo-instances (S4M sec. 5.1)
    mask_threshold: float = Field(0.5, gt=0, lt=1)  # mask probability -> binary pseudo-mask (Mask R-CNN's own 0.5)
    weight_u: float = Field(2.0, ge=0)  # unsupervised loss weight (S4M sec. 5.1)
    burn_in: int = Field(0, ge=0)  # labeled-only iterations, then teacher := student (S4M class docstring); 0: the teacher starts from model.pretrained
    refine: bool = False  # PR: SAM refines each pseudo-mask from points sampled by its probabilities (sec. 4.2)
    points: int = Field(5, ge=1)  # points per pseudo-instance for PR (the paper's number is not given; our choice)
    arp: bool = False  # ARP: bidirectional copy-paste of (refined) pseudo-instances between image pairs (sec. 4.3)
    # Mask R-CNN terms of the unlabeled loss; None: all (the paper's: Mask2Former's whole loss). Deviation, for the
    # dsb2018 probe: [objectness, classifier] leaves the pseudo-instances' boxes and masks out (Unbiased Teacher's choice)
    unlabeled_terms: list[Literal["objectness", "rpn_box_reg", "classifier", "box_reg", "mask"]] | None = Field(None, min_length=1)
    # Weight of background samples (regions, anchors) in the unlabeled loss's classifier and objectness terms. 1: Mask
    # R-CNN's, under which every nucleus the teacher missed is a full-weight negative. 0.1: the weight of the paper's own
    # loss, Mask2Former's, for its "no object" class (GuidedDistillation's NO_OBJECT_WEIGHT); see the class docstring.
    background_weight: float = Field(1.0, gt=0, le=1)


def pair_partner(n: int) -> torch.Tensor:
    """ARP's pairs within a batch: (0, 1), (2, 3), ...; an odd last sample is its own partner
    (and is left unmixed)."""
    idx = torch.arange(n)
    partner = idx + 1 - 2 * (idx % 2)
    partner[partner >= n] = idx[partner >= n]
    return partner


def copy_paste(images: torch.Tensor, ids: torch.Tensor, partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S4M eq. 4: each image receives its partner's instances, ``x_i' = M_j * x_j + (1 - M_j) *
    x_i`` with ``M_j`` the union of the partner's instance masks; the id maps follow (the
    partner's ids are offset so they stay distinct; the image's own instances lose the pixels
    covered, and a fully covered one disappears)."""
    m = (ids[partner] > 0)
    offset = ids.flatten(1).max(1).values.view(-1, 1, 1) + 1
    new_ids = torch.where(m, ids[partner] + offset, ids)
    same = partner == torch.arange(len(partner), device=partner.device)
    new_ids[same] = ids[same]
    m = m & ~same.view(-1, 1, 1)
    new_images = torch.where(m.unsqueeze(1), images[partner], images)
    return new_images, new_ids


class S4M(InstanceMethod):
    """S4M (``../shared/papers/s4m-semi-supervised-instance-segmentation-with-sam.md``) on Mask R-CNN.

    Teacher-student base (sec. 3, GuidedDistillation): an EMA teacher (decay 0.9996, the paper's)
    predicts on the weak view of each unlabeled image; detections with class confidence >= 0.7
    and >= 5 pixels are its pseudo-instances; the student learns them on the strong (photometric)
    view with weight 2 on top of its labeled loss. Burn-in: ``burn_in`` labeled-only iterations,
    after which the teacher is copied from the student, or (``burn_in: 0``) a teacher initialised
    from ``model.pretrained``, e.g. a labeled-only run's ``best.pt`` (one of the two is required:
    the config refuses a random teacher). Deviation: GuidedDistillation's burn-in also trains the
    student on its own, on labeled and unlabeled data, before the main stage; here the student
    starts as the teacher's copy. The teacher gets no EMA warm-up (:mod:`lowlabel.engine.teachers`):
    from the hand-over (or from ``model.pretrained``) on, each update is 0.9996 x the teacher +
    0.0004 x the student, so over a few hundred steps it stays close to the trained model (before
    commit 322a7c6 the warm-up ``decay_t = min(0.9996, 1 - 1 / (t + 1))`` ran on, and at iteration t
    after a burn-in of B the teacher weighed the burn-in's student by only about B / t).

    PR (sec. 4.2, eq. 3): for each pseudo-instance, ``points`` points drawn with probability
    proportional to its mask probability (before the threshold) prompt the promptable segmenter
    (a :mod:`lowlabel.sam` backend, the weak view embedded once per step); SAM's mask replaces
    the pseudo-mask when it keeps at least ``min_size`` pixels. Of SAM's three multimask
    outputs the one with the highest predicted IoU is taken (the paper does not say). PR is only
    as good as the backend: the weight-free ``classical`` one turns near-perfect nucleus
    pseudo-masks (IoU 0.96) into IoU 0.49 ones (``benchmarks/probes/s4m_pr_probe.py``).

    ARP (sec. 4.3, eq. 4): the (refined) pseudo-instances of paired images are pasted into each
    other, labels alike. Deviation: the photometric strong augmentation is applied by the loader
    to each image before the paste, not to the pasted image (each pasted region keeps its own
    image's colour perturbation).

    SD (sec. 4.1, :func:`structural_distillation`), ``sd: true``: the labeled loss of teacher
    training gains ``sd_weight`` x L_SD, from SAM's decoder features (a neural backend). Teacher
    training is the burn-in here (``sd_stage: teacher``, the paper's best, Table 5), or a
    ``supervised`` run with ``sd`` whose checkpoint is ``model.pretrained`` (``burn_in: 0``);
    ``student`` / ``both`` add it after the burn-in too. All detection terms of Mask R-CNN (box
    regression included) enter the unsupervised loss, as Mask2Former's whole loss does in the
    paper; ``unlabeled_terms`` keeps a subset (a deviation: ``[objectness, classifier]`` learns
    where the pseudo-instances are, not their boxes and masks, as Unbiased Teacher leaves
    pseudo-boxes out of box regression; on dsb2018 the full loss compounds the teacher's loose
    outlines: benchmarks/README.md, "S4M from a trained teacher").

    ``background_weight`` (default 1, Mask R-CNN's loss as it is): the paper's Mask2Former weighs
    its "no object" class 0.1 in the classification loss, so a query on an object that the teacher
    missed costs the student a tenth of a matched one. Mask R-CNN has no such class; its background
    regions and anchors take that role at full weight, and the missed nuclei become full-weight
    negatives (the warm probe's suppression). ``background_weight: 0.1`` gives the unlabeled
    loss's classifier and objectness terms Mask2Former's weighting
    (:func:`lowlabel.models.instance.background_weighted`); the labeled loss keeps Mask R-CNN's.
    """

    Params = S4MParams
    uses_unlabeled = True
    n_strong = 1
    default_teacher = "ema"

    def needs_segmenter(self) -> bool:
        return self.p.refine or self.p.sd

    def attach(self, run) -> None:
        from ..errors import ConfigError

        if run.teacher_kind != "ema":
            raise ConfigError(f"method s4m pseudo-labels with an EMA teacher (the paper's, decay 0.9996): set teacher.kind=ema, not {run.teacher_kind!r}")
        if self.p.sd and self.p.sd_stage == "teacher" and not self.p.burn_in:
            raise ConfigError("method.params.sd with sd_stage: teacher distils in teacher training, and with burn_in: 0 this run has none: "
                              "set burn_in > 0, or train the teacher with sd in a supervised run and give its checkpoint as model.pretrained")
        super().attach(run)

    @torch.no_grad()
    def pseudo_instances(self, teacher_model, weak: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        """Id maps (long [B, H, W]) of the teacher's kept pseudo-instances on the weak views, the
        more confident instance winning where masks overlap; and counts for the log. ``rng``
        draws PR's points (seeded by the iteration, so a resumed run draws the same)."""
        from ..sam.prompts import sample_points
        from ..sam.refine import segment_point_sets

        p = self.p
        was = teacher_model.training
        teacher_model.eval()
        dets = teacher_model.detect(weak, score_threshold=p.threshold)
        teacher_model.train(was)
        b, _, h, w = weak.shape
        ids = torch.zeros(b, h, w, dtype=torch.long, device=weak.device)
        kept = refined = 0
        for i, d in enumerate(dets):
            keep = d["scores"] >= p.threshold
            probs, scores = d["masks"][keep], d["scores"][keep]
            masks = probs > p.mask_threshold
            big = masks.flatten(1).sum(1) >= p.min_size
            probs, scores, masks = probs[big], scores[big], masks[big]
            if p.refine and len(masks):
                emb = self.segmenter.embed(to_uint8(weak[i]))
                pr = probs.cpu().numpy()
                sets = [sample_points(m > 0, p.points, "probability", rng, prob=m) for m in pr]
                ok = [k for k, s in enumerate(sets) if len(s)]
                if ok:
                    seg = segment_point_sets(self.segmenter, emb, [sets[k] for k in ok])
                    best = seg.scores.argmax(1)
                    for j, k in enumerate(ok):
                        new = torch.from_numpy(seg.masks[j, best[j]]).to(masks.device)
                        if int(new.sum()) >= p.min_size:
                            masks[k] = new
                            refined += 1
            for k in torch.argsort(scores).tolist():  # low scores first, overwritten by higher ones
                ids[i][masks[k]] = k + 1
            kept += len(masks)
        return ids, {"pseudo_instances": kept / max(b, 1), "refined": refined / max(kept, 1)}

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        burn = unlabeled is None or ctx.iteration < p.burn_in
        sd_now = p.sd and (p.sd_stage == "both" or (p.sd_stage == "teacher") == burn)
        loss_x, _, sd = self.labeled_loss(student, labeled, ctx, sd_now)
        terms = {"x": loss_x}
        logs = {"loss_x": loss_x.detach()}
        if p.sd:
            logs["loss_sd"] = sd.detach() if sd is not None else loss_x.detach() * 0
            if sd is not None:
                terms["sd"] = p.sd_weight * sd
        if burn:
            return StepOutput({"loss": sum(terms.values()), **logs, "loss_u": loss_x.detach() * 0}, terms=terms)
        if p.burn_in and ctx.iteration == p.burn_in:  # end of burn-in: the teacher starts from the student
            teacher.start_from(student)  # and averages on at the full decay (no warm-up)
        ids, metrics = self.pseudo_instances(teacher.model, unlabeled["image"], np.random.default_rng([self.seed, ctx.iteration]))
        strong = unlabeled["strong"][:, 0]
        if p.arp:
            strong, ids = copy_paste(strong, ids, pair_partner(len(ids)).to(ids.device))
        targets = [instance_targets(m, min_size=p.min_size) for m in ids]
        parts = student.losses(strong, targets, background_weight=p.background_weight)
        if p.unlabeled_terms is not None:
            parts = {k: v for k, v in parts.items() if k.removeprefix("loss_") in p.unlabeled_terms}
        loss_u = summed(parts)
        terms["u"] = p.weight_u * loss_u
        return StepOutput({"loss": sum(terms.values()), **logs, "loss_u": loss_u.detach()}, metrics, terms=terms)
