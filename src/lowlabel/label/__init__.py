"""The labeling loop: what to label next (:func:`suggest`) and whether it pays (:func:`simulate`).

    from lowlabel.label import suggest
    s = suggest("runs/acdc-1case", budget=2, strategy="hybrid", group_by=r"^(patient\\d+)_", out="next.txt")
    s.picks        # ['patient012', 'patient047']: the cases to label next, best first

Nothing is imported (no torch) until a function is used.
"""

from __future__ import annotations

STRATEGIES = ("random", "entropy", "margin", "balanced-entropy", "balanced-margin", "bald", "coreset", "hybrid")

__all__ = ["STRATEGIES", "Suggestion", "simulate", "suggest"]


def __getattr__(name):
    if name in ("suggest", "Suggestion"):
        from . import suggester as _s

        return getattr(_s, name)
    if name == "simulate":
        from .replay import simulate

        return simulate
    raise AttributeError(f"module 'lowlabel.label' has no attribute {name!r}")
