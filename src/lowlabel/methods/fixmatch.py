"""FixMatch for segmentation (Sohn et al. 2020; the segmentation recipe of UniMatch's code base).

Pseudo-labels from the weak view; cross-entropy on a strong view with CutMix, kept where the
confidence reaches the threshold. Total = (L_x + L_s) / 2 as in UniMatch's ``fixmatch.py``.
"""

from __future__ import annotations

from pydantic import Field

from ..augment.transforms import mix
from .base import (
    LossParams,
    Method,
    pseudo_label_metrics,
    StepOutput,
    masked_pseudo_loss,
    mix_partner,
    pseudo_labels,
    supervised_loss,
    weak_view_predictions,
)


class FixMatchParams(LossParams):
    threshold: float = Field(0.95, ge=0, le=1)  # FixMatch sec. 3.2 / UniMatch configs: tau = 0.95
    weight_u: float = 1.0  # lambda_u = 1 (FixMatch); the total is then halved as in UniMatch's code


class FixMatch(Method):
    Params = FixMatchParams
    uses_unlabeled = True
    n_strong = 1
    default_teacher = "self"

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        pred_x, pred_w = weak_view_predictions(student, teacher, labeled["image"], unlabeled["image"])
        _, conf, pseudo = pseudo_labels(pred_w)
        valid = unlabeled["valid"]
        box = unlabeled["cutmix"][:, 0]
        img_s = mix(box, unlabeled["strong"][:, 0], mix_partner(unlabeled["strong"][:, 0]))
        pseudo_m = mix(box, pseudo, mix_partner(pseudo))
        conf_m = mix(box, conf, mix_partner(conf))
        valid_m = mix(box, valid, mix_partner(valid))
        loss_x = supervised_loss(pred_x, labeled["mask"], self.p.labeled_loss, labeled.get("weight"))
        loss_s = masked_pseudo_loss(student(img_s), pseudo_m, conf_m, valid_m, self.p.threshold, self.p.unlabeled_loss)
        terms = {"x": loss_x / 2.0, "s": self.p.weight_u * loss_s / 2.0}
        return StepOutput(
            {"loss": terms["x"] + terms["s"], "loss_x": loss_x.detach(), "loss_s": loss_s.detach()},
            pseudo_label_metrics(pseudo, conf, valid, self.p.threshold, unlabeled.get("gt")),
            terms,
        )
