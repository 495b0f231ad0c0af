"""Add-ons: a paper's own terms over a weak-to-strong base (the method seam, DESIGN.md).

An add-on method (RegionMatch, DerProp) holds a base, :class:`~lowlabel.methods.fixmatch.FixMatch`
or :class:`~lowlabel.methods.unimatch.UniMatch`, chosen by ``method.params.base``, and runs the
code that the ``fixmatch`` / ``unimatch`` methods run::

    step = self.base.views(student, teacher, labeled, unlabeled)  # views, pseudo-labels (step.plain)
    out = self.base.output(step, targets)                         # targets: step.plain or the add-on's
    # ... then the add-on adds its terms to out.terms / out.losses and sets out.losses["loss"]

Parameters shared with the bases (the base's own schema validates them): ``threshold``,
``labeled_loss`` / ``unlabeled_loss`` (:class:`~lowlabel.methods.base.LossParams`: ``ce``,
``ce_dice`` / ``ce``, ``dice``), and ``base_params`` for the rest of the base's parameters
(FixMatch: ``weight_u``; UniMatch: ``weight_x``, ``weight_s``, ``weight_fp``, ``fp_dropout``,
``strong_views``).

The loader always makes two strong views (``n_strong = 2``, the most a base needs: the engine
reads it from the class, before the parameters are known); FixMatch forwards the first only. The
second view's draws come after the first's, so a FixMatch-based add-on sees the strong images of
a ``fixmatch`` run, with CutMix boxes drawn from the same distribution but not the same draws.

The add-on's own modules are initialised on a fork of the global random state, so the base's own
random draws (initial weights, dropout) are those of the base method's run with the same seed.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from .base import Method, SelectionParams, StepOutput, WeakToStrong
from .fixmatch import FixMatch
from .unimatch import UniMatch

BASES: dict[str, type[WeakToStrong]] = {"fixmatch": FixMatch, "unimatch": UniMatch}
SHARED = ("threshold", "labeled_loss", "unlabeled_loss", "selection", "selection_momentum", "unlabeled_ramp")  # set on the add-on, passed to its base


class AddOnParams(SelectionParams):
    base: Literal["fixmatch", "unimatch"] = "unimatch"  # each add-on sets its paper's base as the default
    # threshold (the base's confidence threshold, 0.95), selection, selection_momentum, unlabeled_ramp: the base's (SelectionParams)
    base_params: dict[str, Any] = Field(default_factory=dict)  # the base's other parameters (weights, fp_dropout, strong_views)

    def base_config(self) -> dict:
        return {**{k: getattr(self, k) for k in SHARED}, **self.base_params}

    @model_validator(mode="after")
    def _valid_base(self):
        shared = set(SHARED) & set(self.base_params)
        if shared:
            raise ValueError(f"base_params: set {sorted(shared)} as the method's own parameters, not in base_params")
        BASES[self.base].Params(**self.base_config())  # unknown or invalid base parameters fail here
        return self


class AddOn(Method):
    """A method = ``self.base`` (a :class:`WeakToStrong`) + the terms of :meth:`training_step`."""

    Params: ClassVar[type[AddOnParams]] = AddOnParams
    uses_unlabeled = True
    n_strong = 2

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        self.base = BASES[self.p.base](self.p.base_config(), num_classes=num_classes, model=model)

    def build_modules(self, model) -> None:
        """Create the add-on's trainable modules (called once from ``__init__`` on a forked RNG)."""

    def _init_modules(self, model) -> None:
        with torch.random.fork_rng(devices=[]):
            self.build_modules(model)

    @staticmethod
    def finish(out: StepOutput, terms: dict[str, torch.Tensor], logged: dict[str, torch.Tensor], metrics: dict) -> StepOutput:
        """The base's output plus the add-on's weighted ``terms`` (with graphs), its unweighted
        ``logged`` losses and ``metrics``; the total is recomputed as the sum of all terms (the
        base's first, so that with no add-on term it is the base's total exactly)."""
        out.terms.update(terms)
        out.losses.update(logged)
        out.losses["loss"] = sum(out.terms.values())
        out.metrics.update(metrics)
        return out


def autocast_off(device: torch.device):
    """A region where autocast is off: similarity and affinity matrices, region pooling and
    their losses are computed in float32 on ``.float()`` features (the bf16 precision setting)."""
    return torch.autocast(device_type=device.type, enabled=False)

