"""UniMatch (Yang et al., CVPR 2023): two strong image-level views with CutMix plus one
feature-level perturbation of the weak view.

Loss (UniMatch's ``unimatch.py``, natural-image and medical code alike): (L_x + 0.25 L_s1 +
0.25 L_s2 + 0.5 L_fp) / 2, i.e. weights 0.5 (labeled), 0.125 and 0.125 (the two strong views)
and 0.25 (feature perturbation); the unlabeled half is split equally between the image-level
pair and the feature-level term. Loss kinds (``labeled_loss``, ``unlabeled_loss``): CE as in the
natural-image code, or (CE + Dice) / 2 and Dice with low-confidence pixels ignored as in the
medical (ACDC) code. Feature perturbation: channel dropout (``Dropout2d``, p = 0.5) on the encoder
features fed to the decoder, on the weak view, as ``decode(dropout(encode(x)))``.

A base of the method seam (:class:`~lowlabel.methods.base.WeakToStrong`): RegionMatch and
DerProp run this code with ``method.params.base: unimatch`` and add their terms.

Deviation (stated): UniMatch draws CutMix partners from a second unlabeled loader; lowlabel mixes
each sample with the next one of the same batch (``mix_partner``), which saves a loader and a
forward pass. With an unlabeled batch of 1 the mix is therefore a no-op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import (
    BaseStep,
    SelectionParams,
    WeakToStrong,
    kept_pseudo_loss,
    run_net,
)


class UniMatchParams(SelectionParams):
    # threshold: UniMatch configs (pascal/cityscapes/acdc) conf_thresh 0.95; selection, unlabeled_ramp: SelectionParams
    fp_dropout: float = Field(0.5, ge=0, lt=1)  # UniMatch sec. 3.2: nn.Dropout2d(0.5)
    weight_x: float = 0.5  # UniMatch code: (loss_x + ...) / 2
    weight_s: float = 0.125  # each strong view: 0.25 / 2
    weight_fp: float = 0.25  # feature perturbation: 0.5 / 2
    # 1 = a probe, not UniMatch: FixMatch's one CutMix strong view plus the feature-perturbation term
    # (the second strong view is still augmented by the loader but never forwarded)
    strong_views: int = Field(2, ge=1, le=2)


class UniMatch(WeakToStrong):
    Params = UniMatchParams
    n_strong = 2

    @property
    def labeled_weight(self) -> float:
        return self.p.weight_x

    def perturbed_decode(self, student, feats, size):
        """decode(dropout(encode(x))): channel dropout on every encoder level, except a first level
        that is the input image itself (smp encoders and ``tiny`` pass it through; ``unet2d``'s
        first level is its first conv block, dropped as in UniMatch's medical UNet)."""
        skip = 1 if getattr(student, "features_include_input", True) else 0
        return student.decode([F.dropout2d(f, self.p.fp_dropout, training=True) if i >= skip else f for i, f in enumerate(feats)], size)

    def views(self, student, teacher, labeled, unlabeled) -> BaseStep:
        x, u_w = labeled["image"], unlabeled["image"]
        b = x.shape[0]
        if teacher is None or teacher.is_student:
            # one joint forward of labeled + weak, with the perturbed branch (UniMatch's need_fp)
            both = run_net(student, torch.cat([x, u_w]))
            fp = self.perturbed_decode(student, both.features, x.shape[-2:])[b:]
            out_x, out_w = both.split([b, u_w.shape[0]])
            out_w = out_w.detach()
        else:
            out_x = run_net(student, x)
            out_w = teacher.predict(u_w, forward=run_net)
            fp = self.perturbed_decode(student, student.encode(u_w), u_w.shape[-2:])
        plain = self.pseudo_targets(out_w.logits, unlabeled["valid"])
        return BaseStep(labeled, unlabeled, out_x, out_w, self._strong_views(student, unlabeled, self.p.strong_views), plain, fp)

    def base_terms(self, step, targets, labeled=None):
        valid = step.valid
        kind = self.p.unlabeled_loss
        losses_s = [kept_pseudo_loss(v.out.logits, v.mix(targets.pseudo), v.mix(targets.loss_mask), v.mix(valid), kind) for v in step.strong]
        terms_x, logged_x = self.labeled_term(step) if labeled is None else labeled
        loss_fp = kept_pseudo_loss(step.fp, targets.pseudo, targets.loss_mask, valid, kind)
        terms = {**terms_x, "s": self._ramp * self.p.weight_s * sum(losses_s), "fp": self._ramp * self.p.weight_fp * loss_fp}
        logged = {**logged_x, "loss_s": (sum(losses_s) / len(losses_s)).detach(), "loss_fp": loss_fp.detach()}
        return terms, logged
