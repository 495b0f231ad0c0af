"""Seeded labeled/unlabeled partitions of a dataset's train split."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from .dataset import DatasetError, read_ids


def parse_fraction(text: str | float) -> float:
    """``"1/8"``, ``"0.125"`` or ``0.125`` -> 0.125 (must lie in (0, 1])."""
    try:
        value = float(Fraction(str(text)))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"label fraction {text!r} is not a number or a ratio like 1/8") from None
    if not 0 < value <= 1:
        raise ValueError(f"label fraction {text!r} must lie in (0, 1]")
    return value


def split_ids(
    ids: Sequence[str], *, fraction: float | str | None = None, count: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Partition ``ids`` into (labeled, unlabeled), deterministic for a seed.

    The labeled count is ``round(fraction * len(ids))`` (at least 1) or ``count``. The ids are
    sorted first so that the result does not depend on the order of the split file; both lists
    come back in sorted order.
    """
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    ids = sorted(set(ids))
    if not ids:
        raise ValueError("cannot split an empty id list")
    if count is None:
        count = max(1, int(round(parse_fraction(fraction) * len(ids))))
    if not 1 <= count <= len(ids):
        raise ValueError(f"labeled count {count} must lie in 1..{len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen = set(order[:count].tolist())
    labeled = [i for k, i in enumerate(ids) if k in chosen]
    unlabeled = [i for k, i in enumerate(ids) if k not in chosen]
    return labeled, unlabeled


def write_split(out_dir: str | os.PathLike, labeled: Sequence[str], unlabeled: Sequence[str]) -> tuple[Path, Path]:
    """Write ``labeled.txt`` and ``unlabeled.txt`` atomically; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ids in (("labeled", labeled), ("unlabeled", unlabeled)):
        p = out / f"{name}.txt"
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{i}\n" for i in ids))
        os.replace(tmp, p)
        paths.append(p)
    return paths[0], paths[1]


def make_split(
    root: str | os.PathLike,
    *,
    fraction: float | str | None = None,
    count: int | None = None,
    seed: int = 0,
    source: str = "train",
) -> tuple[list[str], list[str]]:
    """Labeled/unlabeled ids drawn from ``root/splits/<source>.txt``."""
    ids = read_ids(Path(root) / "splits" / f"{source}.txt")
    if not ids:
        raise DatasetError(Path(root) / "splits" / f"{source}.txt", "empty split: nothing to partition")
    return split_ids(ids, fraction=fraction, count=count, seed=seed)
