"""SeSAM: weakly supervised semantic segmentation with SAM as an instance prior
(``../shared/papers/sesam-weakly-supervised-semantic-segmentation-with-sam.md``, sec. 3).

Every training image carries weak labels only (points, scribbles or coarse masks: ``data.weak``).
Three sources of supervision, each on its own pixels, with the paper's precedence (weak labels over
SAM labels over pseudo-labels):

- L_coarse: cross-entropy on the weak labels' annotated pixels (partial CE).
- L_SAM: cross-entropy on the SAM labels where no weak label is. For each image, the weak label map
  is extended with the EMA teacher's predictions of confidence >= Theta2 = 0.98 ("refined mask
  sampling"), split per class into instances (connected components, eq. 1), K = 5 points are
  sampled per instance on the skeleton + distance-transform grid (eq. 2), the promptable segmenter
  returns three candidates and the one chosen by coverage / compatibility (tau1 = 0.3,
  tau2 = 0.7) is painted with the class; point and scribble labels are first grown with the
  smallest candidate (sec. 3.2). The weak labels override SAM's. An image's SAM labels are
  recomputed every M = 4 iterations it is seen (below).
- L_pseudo: FixMatch on the same images: the teacher's predictions on the weak view, kept at
  confidence >= Theta1 = 0.96 where neither a weak nor a SAM label is, supervise the student on a
  photometrically strong view (colour jitter, grey, blur; same geometry).

L = L_coarse + lambda1 L_SAM + lambda2 L_pseudo, lambda1 = 1, lambda2 = 0.01; EMA teacher 0.999
(``teacher: {kind: ema}``).

How lowlabel computes the SAM labels (stated choices):

- **Original frame, embedded once.** SAM runs on the untransformed image, whose embedding comes
  from the embedding cache (``<run>/embeddings`` or ``cache``): computed the first time the image
  is refreshed, never per iteration. The teacher's extension is predicted on the untransformed
  image too (sliding window with the run's eval settings). The labels are kept per image in the
  original frame (``bank``, saved with the checkpoint, so a resume is exact) and mapped onto each
  augmented view through the view's source-coordinate maps (``src_y`` / ``src_x``). The paper
  prompts SAM on the weakly augmented image; embedding every augmented view would make SAM's
  encoder run every step, which is what its Table 6 measures (3.4x FixMatch's step).
- **Resampling every M = 4 iterations** is read per image: an image's SAM labels are computed
  the first time it is seen and recomputed from the current teacher every M-th time it is seen
  after that (so each image's labels follow the teacher as the paper's do, and SAM runs for one
  in M images after the first epoch); between refreshes an image keeps its last ones. (A first
  version refreshed the whole batch at every M-th global iteration: with an epoch-based sampler
  no image is seen twice within an epoch, so 3 of 4 steps of the first epoch had no SAM labels at
  all, and on ACDC's 1312 slices over 1000 iterations only ~60 % of sightings had any.)
- L_coarse and L_SAM are taken on the student's weak-view prediction, L_pseudo on the strong
  view's; the paper does not say which view carries the first two. No CutMix.
- L_pseudo is divided by the number of valid pixels (FixMatch's segmentation code).
- Connected components under ``min_instance`` = 16 pixels are not prompted (the paper prompts
  every component), and prompts are decoded in chunks of 32: a label map painted with poor SAM
  masks (random weights: measured, an ACDC slice whose grown scribbles split into ~6,800
  components, a 28 GB decoder allocation) would otherwise cost a decoder call per speckle. Weak
  labels there still count (they override SAM's). Point and scribble labels are first grown with
  SAM's smallest candidate, and only those, not the teacher's pixels.
"""

from __future__ import annotations

# Weak labels on some images, nothing on the others (issue 42): ``SeSAMLabels`` below is SeSAM's
# labeled machinery (bank, refresh schedule, the three losses), run alone by ``sesam`` and as the
# labeled side of a FixMatch / UniMatch base by ``sesam_ssl`` (:class:`SeSAMSSL`, whose docstring
# states how the two are composed and its choices). Nothing of SeSAM's is written twice.

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.dataset import IGNORE_INDEX
from .addon import AddOn, AddOnParams
from .base import Method, MethodParams, RunContext, StepOutput, supervised_loss

WEAK_KINDS = {"points": "point", "point": "point", "scribbles": "scribble", "scribble": "scribble"}


class SeSAMParams(MethodParams):
    theta1: float = Field(0.96, ge=0, le=1)  # pseudo-label threshold (FixMatch)
    theta2: float = Field(0.98, ge=0, le=1)  # teacher pixels that extend the weak masks before prompting
    points: int = Field(5, ge=1)  # K points per instance
    tau1: float = Field(0.3, ge=0, le=1)  # coverage r_i >= tau1
    tau2: float = Field(0.7, ge=0, le=1)  # compatibility p_i >= tau2
    resample_every: int = Field(4, ge=1)  # M
    lambda_sam: float = 1.0  # lambda1
    lambda_pseudo: float = 0.01  # lambda2
    backend: Literal["classical", "sam", "mobilesam", "sam2"] = "classical"
    checkpoint: str | None = None  # local weights of a neural backend (or LOWLABEL_SAM_CHECKPOINT)
    model_type: str | None = None  # vit_b / vit_l / vit_h for sam, a SAM 2.1 config for sam2
    allow_random_weights: bool = False  # a neural backend without a checkpoint: for timing and tests only
    cache: str | None = None  # embedding cache folder (default: <run dir>/embeddings)
    weak_kind: Literal["auto", "point", "scribble", "coarse"] = "auto"  # auto: from data.weak's name
    min_instance: int = Field(16, ge=1)  # components smaller than this are not prompted (a stated choice)


@dataclass
class SeSAMLosses:
    """SeSAM's three losses on a labeled batch (unweighted) and the pixel maps they read:
    ``sam_only`` the SAM labels where no weak label is; ``keep`` / ``pseudo`` the pixels and
    labels of L_pseudo (None when L_pseudo is not computed)."""

    coarse: torch.Tensor
    sam: torch.Tensor
    pseudo: torch.Tensor | None
    sam_only: torch.Tensor
    keep: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class SeSAMLabels:
    """SeSAM's labeled machinery, shared by :class:`SeSAM` (weak labels alone) and
    :class:`SeSAMSSL` (the labeled side of a weak-to-strong base): the per-image SAM labels
    (``bank``, kept in the original frame and saved with the checkpoint), their refresh schedule
    (first sighting, then every M-th; Theta2 extension by the teacher), their mapping onto views,
    and L_coarse / L_SAM / L_pseudo with the paper's precedence. A mixin of a :class:`Method`:
    its state lives in the method's own state dict (``bank.<id>``, ``seen.<id>``)."""

    # teacher kinds attach() accepts (None: any)
    teachers: ClassVar[tuple[str, ...] | None] = ("ema",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bank: dict[str, torch.Tensor] = {}  # id -> uint8 SAM labels in the original frame
        self.seen: dict[str, int] = {}  # id -> how many times the image was in a batch
        self.segmenter = self.cache = self.data = None

    # ------------------------------------------------------------------ setup and state
    def attach(self, run: RunContext) -> None:
        from ..errors import ConfigError
        from ..sam import build_segmenter
        from ..sam.cache import EmbeddingCache
        from ..sam.refine import RefineSettings

        p = self.p
        if self.teachers is not None and run.teacher_kind not in self.teachers:
            raise ConfigError(f"method sesam pseudo-labels with an EMA teacher (the paper's, decay 0.999): set teacher.kind=ema, not {run.teacher_kind!r}")
        self.segmenter = build_segmenter(p.backend, checkpoint=p.checkpoint, model_type=p.model_type, device=str(run.device))
        if self.segmenter.weights_id.startswith("random") and not p.allow_random_weights:
            raise ConfigError(f"method.params.backend={p.backend!r} has no checkpoint (method.params.checkpoint or LOWLABEL_SAM_CHECKPOINT): "
                              "its masks would be random; give one, or set method.params.allow_random_weights=true to test the pipeline")
        self.cache = EmbeddingCache(p.cache or Path(run.run_dir) / "embeddings")
        self.data, self.device, self.eval_cfg, self.seed = run.labeled_set, run.device, run.eval_cfg, run.seed
        self.index = {sid: i for i, sid in enumerate(self.data.ids)}
        kind = p.weak_kind if p.weak_kind != "auto" else WEAK_KINDS.get(str(self.data.weak), "coarse")
        self.settings = RefineSettings(weak_kind=kind, sampler="skeleton", selection="coverage", points=p.points, tau1=p.tau1, tau2=p.tau2,
                                       min_instance=p.min_instance)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for sid, labels in self.bank.items():
            destination[f"{prefix}bank.{sid}"] = labels
        for sid, n in self.seen.items():
            destination[f"{prefix}seen.{sid}"] = torch.tensor(n)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self.bank = {k[len(prefix) + 5:]: v.clone() for k, v in state_dict.items() if k.startswith(f"{prefix}bank.")}
        self.seen = {k[len(prefix) + 5:]: int(v) for k, v in state_dict.items() if k.startswith(f"{prefix}seen.")}
        own = {k: v for k, v in state_dict.items() if not k.startswith((f"{prefix}bank.", f"{prefix}seen."))}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ SAM labels
    @torch.no_grad()
    def refresh(self, sid: str, teacher, iteration: int) -> torch.Tensor:
        """Recompute one image's SAM labels (original frame) from its weak labels extended by the
        teacher's confident pixels."""
        from ..eval.inference import for_eval, sliding_window
        from ..sam.refine import refine_image

        raw = self.data.load(self.index[sid])
        image, weak = raw["image"], raw["mask"].astype(np.uint8)
        e = self.eval_cfg
        model = teacher.model
        was = model.training
        model.eval()
        try:
            pred = sliding_window(for_eval(model, e), image, self.num_classes, tile=e.tile, overlap=e.overlap, weighting=e.weighting,
                                  batch_size=e.batch_size, device=self.device, return_probs=True)
        finally:
            model.train(was)
        conf, label = pred.probs.max(0)
        extended = weak.copy()
        add = (weak == IGNORE_INDEX) & (conf.numpy() >= self.p.theta2)
        extended[add] = label.numpy()[add]
        rng = np.random.default_rng([self.seed, iteration, zlib.crc32(sid.encode())])
        emb = self.cache.get_or_embed(image, self.segmenter)
        labels, _ = refine_image(image, extended, self.num_classes, self.segmenter, self.settings, rng, embedding=emb, override=weak != IGNORE_INDEX)
        self.bank[sid] = torch.from_numpy(labels)
        return self.bank[sid]

    def refresh_batch(self, ids, teacher, iteration: int) -> int:
        """The resampling schedule (module docstring): each image of the batch gets SAM labels
        the first time it is seen and every M-th time after; returns how many were refreshed."""
        refreshed = 0
        for sid in ids:
            n = self.seen.get(sid, 0)
            if n % self.p.resample_every == 0 or sid not in self.bank:
                self.refresh(sid, teacher, iteration)
                refreshed += 1
            self.seen[sid] = n + 1
        return refreshed

    def gather(self, ids, src_y: torch.Tensor, src_x: torch.Tensor) -> torch.Tensor:
        """The SAM labels of each view: the bank's original-frame labels at the views' source
        coordinates (255 for padding and for images without SAM labels yet)."""
        out = torch.full(src_y.shape, IGNORE_INDEX, dtype=torch.long, device=src_y.device)
        for b, sid in enumerate(ids):
            labels = self.bank.get(sid)
            if labels is None:
                continue
            inside = (src_y[b] >= 0) & (src_x[b] >= 0)
            out[b][inside] = labels.to(src_y.device)[src_y[b][inside], src_x[b][inside]].long()
        return out

    # ------------------------------------------------------------------ the losses
    def sam_losses(self, pred_w: torch.Tensor, pred_s: torch.Tensor | None, teacher_logits: torch.Tensor | None, labeled: dict,
                   sam: torch.Tensor | None) -> SeSAMLosses:
        """L_coarse and L_SAM on the student's weak-view logits ``pred_w``, L_pseudo on its
        strong-view logits ``pred_s`` against the teacher's (``teacher_logits``, of the weak view)
        confident pixels where neither a weak nor a SAM label is. ``sam``: :meth:`gather`'s labels
        (None: no SAM labels, L_SAM is 0); ``pred_s`` None: L_pseudo is not computed."""
        weak, valid = labeled["mask"], labeled["valid"]
        if sam is None:
            sam = torch.full_like(weak, IGNORE_INDEX)
        sam_only = torch.where(weak != IGNORE_INDEX, IGNORE_INDEX, sam)  # weak labels take precedence
        loss_coarse = supervised_loss(pred_w, weak, "ce", labeled.get("weight"))
        loss_sam = supervised_loss(pred_w, sam_only, "ce")
        if pred_s is None:
            return SeSAMLosses(loss_coarse, loss_sam, None, sam_only)
        conf, pseudo = teacher_logits.float().softmax(1).max(1)
        keep = (conf >= self.p.theta1) & (weak == IGNORE_INDEX) & (sam == IGNORE_INDEX) & valid
        loss_pseudo = (F.cross_entropy(pred_s, pseudo, reduction="none") * keep).sum() / valid.sum().clamp_min(1)
        return SeSAMLosses(loss_coarse, loss_sam, loss_pseudo, sam_only, keep, pseudo)

    def sam_metrics(self, parts: SeSAMLosses, labeled: dict, refreshed: int) -> dict:
        """Shares of the valid pixels each source labels, the bank's size, the refreshes of this
        step, and (with the diagnostic dense masks, ``data.unlabeled_gt``) the accuracy of the SAM
        labels and of L_pseudo's labels."""
        weak, valid = labeled["mask"], labeled["valid"]
        n_valid = valid.sum().clamp_min(1)
        metrics = {
            "sam_ratio": float(((parts.sam_only != IGNORE_INDEX) & valid).sum() / n_valid),
            "weak_ratio": float(((weak != IGNORE_INDEX) & valid).sum() / n_valid),
            **({"pseudo_ratio": float(parts.keep.sum() / n_valid)} if parts.keep is not None else {}),
            "bank_images": len(self.bank),
            "refreshed": refreshed,
        }
        if "gt" in labeled:  # diagnostics only (data.unlabeled_gt): the dense masks never reach a loss
            gt = labeled["gt"]
            pairs = [("acc_sam", parts.sam_only != IGNORE_INDEX, parts.sam_only)]
            if parts.keep is not None:
                pairs.append(("acc_pseudo", parts.keep, parts.labels))
            for name, m, lab in pairs:
                m = m & valid & (gt != IGNORE_INDEX)
                if m.any():
                    metrics[name] = float((lab[m] == gt[m]).float().mean())
        return metrics


class SeSAM(SeSAMLabels, Method):
    Params = SeSAMParams
    uses_unlabeled = False
    labeled_strong = 1
    needs_coords = True
    needs_weak = True
    needs_run = True
    default_teacher = "ema"

    # ------------------------------------------------------------------ the step
    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        x = labeled["image"]
        x_s = labeled["strong"][:, 0]
        refreshed = self.refresh_batch(labeled["id"], teacher, ctx.iteration)
        sam = self.gather(labeled["id"], labeled["src_y"], labeled["src_x"])
        teacher_logits = teacher.predict(x)
        logits = student(torch.cat([x, x_s]))
        pred_w, pred_s = logits.split([x.shape[0], x_s.shape[0]])
        parts = self.sam_losses(pred_w, pred_s, teacher_logits, labeled, sam)
        terms = {"coarse": parts.coarse, "sam": p.lambda_sam * parts.sam, "pseudo": p.lambda_pseudo * parts.pseudo}
        return StepOutput(
            {"loss": sum(terms.values()), "loss_coarse": parts.coarse.detach(), "loss_sam": parts.sam.detach(), "loss_pseudo": parts.pseudo.detach()},
            self.sam_metrics(parts, labeled, refreshed), terms,
        )


# ----------------------------------------------------------------------------- SeSAM + a semi-supervised base
class SeSAMSSLParams(SeSAMParams, AddOnParams):
    """SeSAM's parameters (its labeled side, defaults from the paper) and the base's
    (:class:`~lowlabel.methods.addon.AddOnParams`: ``base``, ``threshold``, ``unlabeled_loss``,
    ``base_params``)."""

    labeled_loss: Literal["ce"] = "ce"  # L_coarse and L_SAM are cross-entropies (SeSAM sec. 3.3); the base's own labeled term is replaced


class SeSAMSSL(SeSAMLabels, AddOn):
    """``sesam_ssl``: SeSAM's labeled machinery as the labeled side of a weak-to-strong base, for
    a run with weak labels on some images (``data.labeled`` + ``data.weak``) and nothing on the
    others (``data.unlabeled``, by default the rest of the train split).

    One step is the base's step (:mod:`lowlabel.methods.addon`) whose labeled term is SeSAM's::

        refreshed = self.refresh_batch(ids, teacher, t)           # SeSAM's SAM labels, M = 4 schedule
        step = self.base.views(student, teacher, labeled, unlabeled)
        L_l = L_coarse + lambda1 L_SAM + lambda2 L_pseudo          # SeSAMLabels.sam_losses, on step.x
        out = self.base.output(step, step.plain, labeled=w(L_l))   # + the base's unlabeled terms, unchanged

    with ``w`` the base's labeled weighting (FixMatch: / 2; UniMatch: x weight_x = 0.5), i.e.
    SeSAM's weights are given relative to a labeled loss of weight 1, as an add-on's are. The
    unlabeled images get exactly the base's terms (views, pseudo-labels at ``threshold``, CutMix,
    UniMatch's feature perturbation); the weakly labeled images get exactly SeSAM's
    (:class:`SeSAMLabels`, the code the ``sesam`` method runs). Terms: ``x`` = w L_coarse (the
    partial CE on the weak labels), ``sam``, ``pseudo``, then the base's ``s`` (and ``fp``).

    With ``lambda_sam: 0`` and ``lambda_pseudo: 0`` SAM never runs and the method *is* its base
    with a partial-CE labeled term (``labeled_loss: ce`` on ``data.weak``): the same losses and
    gradients (tests/test_weak_ssl.py).

    Choices (stated):

    - L_coarse and L_SAM are taken on the base's labeled logits (``step.x``: with a student
      teacher, the joint forward of the labeled batch and the weak unlabeled views), so they cost
      no forward of their own; L_pseudo needs the labeled batch's strong (photometric) view, one
      more forward of the student.
    - The teacher is the base's (``teacher.kind``; UniMatch's and FixMatch's code use the student,
      kind ``self``, the default here). With a student teacher, L_pseudo's targets are the
      detached labeled logits of that joint train-mode forward (the base's rule for its weak
      views) and the Theta2 extension is predicted by the student in eval mode; SeSAM's paper
      uses an EMA teacher (decay 0.999) for both, which ``teacher.kind: ema`` gives (the base's
      weak views then go through it too).
    - The base's ``threshold`` (0.95) selects the unlabeled images' pseudo-labels, SeSAM's
      ``theta1`` (0.96) L_pseudo's on the weakly labeled images; ``theta2`` (0.98) extends the
      weak labels before prompting.
    """

    Params = SeSAMSSLParams
    uses_unlabeled = True
    n_strong = 2
    labeled_strong = 1
    needs_coords = True
    needs_weak = True
    needs_run = True
    default_teacher = "self"
    teachers = None  # the base's teacher, whatever its kind

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        sam_on = p.lambda_sam > 0 or p.lambda_pseudo > 0
        refreshed = self.refresh_batch(labeled["id"], teacher, ctx.iteration) if sam_on else 0
        step = self.base.views(student, teacher, labeled, unlabeled)
        sam = self.gather(labeled["id"], labeled["src_y"], labeled["src_x"]) if sam_on else None
        pred_s = teacher_logits = None
        if p.lambda_pseudo > 0:
            teacher_logits = step.x.logits.detach() if teacher is None or teacher.is_student else teacher.predict(labeled["image"])
            pred_s = student(labeled["strong"][:, 0])
        parts = self.sam_losses(step.x.logits, pred_s, teacher_logits, labeled, sam)
        w = self.base.weigh_labeled
        terms, logged = {"x": w(parts.coarse)}, {"loss_x": parts.coarse.detach()}
        if p.lambda_sam > 0:
            terms["sam"], logged["loss_sam"] = w(p.lambda_sam * parts.sam), parts.sam.detach()
        if p.lambda_pseudo > 0:
            terms["pseudo"], logged["loss_pseudo"] = w(p.lambda_pseudo * parts.pseudo), parts.pseudo.detach()
        out = self.base.output(step, step.plain, labeled=(terms, logged))
        if sam_on:
            out.metrics.update(self.sam_metrics(parts, labeled, refreshed))
        return out
