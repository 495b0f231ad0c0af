"""UniMatch (Yang et al., CVPR 2023): two strong image-level views with CutMix plus one
feature-level perturbation of the weak view.

Loss (UniMatch's ``unimatch.py``, natural-image and medical code alike): (L_x + 0.25 L_s1 +
0.25 L_s2 + 0.5 L_fp) / 2, i.e. weights 0.5 (labeled), 0.125 and 0.125 (the two strong views)
and 0.25 (feature perturbation); the unlabeled half is split equally between the image-level
pair and the feature-level term. Loss kinds (``labeled_loss``, ``unlabeled_loss``): CE as in the
natural-image code, or (CE + Dice) / 2 and Dice with low-confidence pixels ignored as in the
medical (ACDC) code. Feature perturbation: channel dropout (``Dropout2d``, p = 0.5) on the encoder
features fed to the decoder, on the weak view, as ``decode(dropout(encode(x)))``.

Deviation (stated): UniMatch draws CutMix partners from a second unlabeled loader; lowlabel mixes
each sample with the next one of the same batch (``mix_partner``), which saves a loader and a
forward pass. With an unlabeled batch of 1 the mix is therefore a no-op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..augment.transforms import mix
from .base import (
    LossParams,
    Method,
    StepOutput,
    masked_pseudo_loss,
    mix_partner,
    pseudo_label_metrics,
    pseudo_labels,
    supervised_loss,
)


class UniMatchParams(LossParams):
    threshold: float = Field(0.95, ge=0, le=1)  # UniMatch configs (pascal/cityscapes/acdc): conf_thresh 0.95
    fp_dropout: float = Field(0.5, ge=0, lt=1)  # UniMatch sec. 3.2: nn.Dropout2d(0.5)
    weight_x: float = 0.5  # UniMatch code: (loss_x + ...) / 2
    weight_s: float = 0.125  # each strong view: 0.25 / 2
    weight_fp: float = 0.25  # feature perturbation: 0.5 / 2
    # 1 = a probe, not UniMatch: FixMatch's one CutMix strong view plus the feature-perturbation term
    # (the second strong view is still augmented by the loader but never forwarded)
    strong_views: int = Field(2, ge=1, le=2)


class UniMatch(Method):
    Params = UniMatchParams
    uses_unlabeled = True
    n_strong = 2
    default_teacher = "self"

    def perturbed_decode(self, student, feats, size):
        """decode(dropout(encode(x))): channel dropout on every encoder level, except a first level
        that is the input image itself (smp encoders and ``tiny`` pass it through; ``unet2d``'s
        first level is its first conv block, dropped as in UniMatch's medical UNet)."""
        skip = 1 if getattr(student, "features_include_input", True) else 0
        return student.decode([F.dropout2d(f, self.p.fp_dropout, training=True) if i >= skip else f for i, f in enumerate(feats)], size)

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        x, u_w = labeled["image"], unlabeled["image"]
        b = x.shape[0]
        if teacher is None or teacher.is_student:
            # one joint forward of labeled + weak, with the perturbed branch (UniMatch's need_fp)
            feats = student.encode(torch.cat([x, u_w]))
            size = x.shape[-2:]
            both = student.decode(feats, size)
            fp = self.perturbed_decode(student, feats, size)
            pred_x, pred_w = both.split([b, u_w.shape[0]])
            pred_fp = fp[b:]
            pred_w = pred_w.detach()
        else:
            pred_x = student(x)
            pred_w = teacher.predict(u_w)
            feats = student.encode(u_w)
            pred_fp = self.perturbed_decode(student, feats, u_w.shape[-2:])
        _, conf, pseudo = pseudo_labels(pred_w)
        valid = unlabeled["valid"]

        strong, boxes = unlabeled["strong"], unlabeled["cutmix"]
        losses_s = []
        for k in range(self.p.strong_views):
            box = boxes[:, k]
            img = mix(box, strong[:, k], mix_partner(strong[:, k]))
            losses_s.append(
                masked_pseudo_loss(
                    student(img),
                    mix(box, pseudo, mix_partner(pseudo)),
                    mix(box, conf, mix_partner(conf)),
                    mix(box, valid, mix_partner(valid)),
                    self.p.threshold,
                    self.p.unlabeled_loss,
                )
            )
        loss_x = supervised_loss(pred_x, labeled["mask"], self.p.labeled_loss, labeled.get("weight"))
        loss_fp = masked_pseudo_loss(pred_fp, pseudo, conf, valid, self.p.threshold, self.p.unlabeled_loss)
        terms = {"x": self.p.weight_x * loss_x, "s": self.p.weight_s * sum(losses_s), "fp": self.p.weight_fp * loss_fp}
        return StepOutput(
            {"loss": sum(terms.values()), "loss_x": loss_x.detach(), "loss_s": (sum(losses_s) / len(losses_s)).detach(), "loss_fp": loss_fp.detach()},
            pseudo_label_metrics(pseudo, conf, valid, self.p.threshold, unlabeled.get("gt")),
            terms,
        )
