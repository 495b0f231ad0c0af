"""Methods: loss logic only. Names map to classes through one plain dict."""

from __future__ import annotations

from .base import Method, MethodParams, RunContext, StepContext, StepOutput
from .derprop import DerProp
from .fixmatch import FixMatch
from .regionmatch import RegionMatch
from .sesam import SeSAM
from .supervised import PartialCE, Supervised
from .unimatch import UniMatch

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "pce": PartialCE,
    "fixmatch": FixMatch,
    "unimatch": UniMatch,
    "regionmatch": RegionMatch,
    "derprop": DerProp,
    "sesam": SeSAM,
}


def get_method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}") from None


def build_method(name: str, params: dict | None, *, num_classes: int, model=None) -> Method:
    return get_method_class(name)(params, num_classes=num_classes, model=model)


__all__ = ["METHODS", "Method", "MethodParams", "RunContext", "StepContext", "StepOutput", "build_method", "get_method_class"]
