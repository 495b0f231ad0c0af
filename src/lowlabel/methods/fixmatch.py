"""FixMatch for segmentation (Sohn et al. 2020; the segmentation recipe of UniMatch's code base).

Pseudo-labels from the weak view; cross-entropy on a strong view with CutMix, kept where the
confidence reaches the threshold. Total = (L_x + L_s) / 2 as in UniMatch's ``fixmatch.py``.
Loss kinds (``labeled_loss``, ``unlabeled_loss``): CE, or (CE + Dice) / 2 and Dice as in
UniMatch's medical (ACDC) code.

A base of the method seam (:class:`~lowlabel.methods.base.WeakToStrong`): RegionMatch runs this
code with ``method.params.base: fixmatch`` and adds its terms.
"""

from __future__ import annotations

from .base import BaseStep, SelectionParams, WeakToStrong, kept_pseudo_loss


class FixMatchParams(SelectionParams):
    # threshold (tau = 0.95, FixMatch sec. 3.2), selection, unlabeled_ramp: SelectionParams
    weight_u: float = 1.0  # lambda_u = 1 (FixMatch); the total is then halved as in UniMatch's code

class FixMatch(WeakToStrong):
    Params = FixMatchParams
    n_strong = 1

    @property
    def labeled_weight(self) -> float:
        return 0.5

    def views(self, student, teacher, labeled, unlabeled) -> BaseStep:
        out_x, out_w = self._weak_pass(student, teacher, labeled["image"], unlabeled["image"])
        plain = self.pseudo_targets(out_w.logits, unlabeled["valid"])
        return BaseStep(labeled, unlabeled, out_x, out_w, self._strong_views(student, unlabeled, 1), plain)

    def weigh_labeled(self, loss):
        return loss / 2.0  # (L_x + L_s) / 2

    def base_terms(self, step, targets, labeled=None):
        terms_x, logged_x = self.labeled_term(step) if labeled is None else labeled
        valid = step.valid
        v = step.strong[0]
        loss_s = kept_pseudo_loss(v.out.logits, v.mix(targets.pseudo), v.mix(targets.loss_mask), v.mix(valid), self.p.unlabeled_loss)
        terms = {**terms_x, "s": self._ramp * self.p.weight_u * loss_s / 2.0}
        return terms, {**logged_x, "loss_s": loss_s.detach()}
