"""Methods: loss logic only. Names map to classes through one plain dict."""

from __future__ import annotations

from .base import Method, MethodParams, RunContext, StepContext, StepOutput
from .derprop import DerProp
from .fixmatch import FixMatch
from .instance import S4M, InstanceSupervised
from .regionmatch import RegionMatch
from .sesam import SeSAM, SeSAMSSL
from .ssr_sam import SSRSAMLabeledOnly, SSRSAMMethod
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
    "sesam_ssl": SeSAMSSL,
    "ssr_sam": SSRSAMMethod,
    "ssr_sam_labeled": SSRSAMLabeledOnly,
}

# the instance task's methods (instance datasets, model.arch maskrcnn)
INSTANCE_METHODS: dict[str, type[Method]] = {
    "supervised": InstanceSupervised,
    "s4m": S4M,
}


def get_method_class(name: str, task: str = "semantic") -> type[Method]:
    table = INSTANCE_METHODS if task == "instance" else METHODS
    try:
        return table[name]
    except KeyError:
        other = METHODS if task == "instance" else INSTANCE_METHODS
        hint = f" (a method of the {'semantic' if task == 'instance' else 'instance'} task)" if name in other else ""
        raise ValueError(f"unknown method {name!r} for the {task} task{hint}; choose from {sorted(table)}") from None


def build_method(name: str, params: dict | None, *, num_classes: int, model=None, task: str = "semantic") -> Method:
    return get_method_class(name, task)(params, num_classes=num_classes, model=model)


__all__ = ["INSTANCE_METHODS", "METHODS", "Method", "MethodParams", "RunContext", "StepContext", "StepOutput", "build_method", "get_method_class"]
