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

import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.dataset import IGNORE_INDEX
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


class SeSAM(Method):
    Params = SeSAMParams
    uses_unlabeled = False
    labeled_strong = 1
    needs_coords = True
    needs_weak = True
    needs_run = True
    default_teacher = "ema"

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
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
        if run.teacher_kind != "ema":
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

    # ------------------------------------------------------------------ the step
    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        x, weak, valid = labeled["image"], labeled["mask"], labeled["valid"]
        x_s = labeled["strong"][:, 0]
        refreshed = 0
        for sid in labeled["id"]:
            n = self.seen.get(sid, 0)
            if n % p.resample_every == 0 or sid not in self.bank:
                self.refresh(sid, teacher, ctx.iteration)
                refreshed += 1
            self.seen[sid] = n + 1
        sam = self.gather(labeled["id"], labeled["src_y"], labeled["src_x"])
        sam_only = torch.where(weak != IGNORE_INDEX, IGNORE_INDEX, sam)  # weak labels take precedence
        conf, pseudo = teacher.predict(x).float().softmax(1).max(1)
        logits = student(torch.cat([x, x_s]))
        pred_w, pred_s = logits.split([x.shape[0], x_s.shape[0]])
        loss_coarse = supervised_loss(pred_w, weak, "ce", labeled.get("weight"))
        loss_sam = supervised_loss(pred_w, sam_only, "ce")
        keep = (conf >= p.theta1) & (weak == IGNORE_INDEX) & (sam == IGNORE_INDEX) & valid
        loss_pseudo = (F.cross_entropy(pred_s, pseudo, reduction="none") * keep).sum() / valid.sum().clamp_min(1)
        terms = {"coarse": loss_coarse, "sam": p.lambda_sam * loss_sam, "pseudo": p.lambda_pseudo * loss_pseudo}
        n_valid = valid.sum().clamp_min(1)
        metrics = {
            "sam_ratio": float(((sam_only != IGNORE_INDEX) & valid).sum() / n_valid),
            "weak_ratio": float(((weak != IGNORE_INDEX) & valid).sum() / n_valid),
            "pseudo_ratio": float(keep.sum() / n_valid),
            "bank_images": len(self.bank),
            "refreshed": refreshed,
        }
        if "gt" in labeled:  # diagnostics only (data.unlabeled_gt): the dense masks never reach a loss
            gt = labeled["gt"]
            for name, m, lab in (("acc_sam", sam_only != IGNORE_INDEX, sam_only), ("acc_pseudo", keep, pseudo)):
                m = m & valid & (gt != IGNORE_INDEX)
                if m.any():
                    metrics[name] = float((lab[m] == gt[m]).float().mean())
        return StepOutput(
            {"loss": sum(terms.values()), "loss_coarse": loss_coarse.detach(), "loss_sam": loss_sam.detach(), "loss_pseudo": loss_pseudo.detach()},
            metrics, terms,
        )
