"""Weak labels simulated from dense masks, stored in the folder format, and what they cost.

A weak label map is uint8 [H, W]: a class id on annotated pixels, 255 elsewhere — exactly like
the real scribbles of ``acdc-scribbles`` (``scribbles/<id>.png``), so simulated and real weak
labels are read by the same code.

- ``point``: one random pixel per class present in the image (SeSAM's point protocol), drawn
  away from region borders where possible (inside the class eroded by 2 px).
- ``scribble``: a thin stroke along the skeleton of each region of each class (regions below
  ``min_region`` pixels are skipped), thickened to ``width`` pixels and kept inside the region.
- ``coarse``: each region eroded by ``erode`` pixels, its outline simplified to a polygon
  (tolerance ``tolerance`` px) and re-filled, small regions dropped: unlabeled gaps remain
  between regions and at boundaries, as in Cityscapes' coarse annotations.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as fill_polygon
from skimage.measure import approximate_polygon, find_contours
from skimage.morphology import skeletonize

from .dataset import IGNORE_INDEX, DatasetInfo, label_files, label_path, read_ids, read_label, write_label

KINDS = ("point", "scribble", "coarse")
FOLDERS = {"point": "points", "scribble": "scribbles", "coarse": "coarse"}

# Annotation time per image (Cityscapes), as cited in SeSAM sec. 4 / 4.2: fine 90 min (100 images
# = 150 h), coarse 7 min (11.6 h), scribble 2.2 min (3.6 h), point 45 s (1.2 h).
COST_SECONDS = {"fine": 90 * 60, "coarse": 7 * 60, "scribble": 2.2 * 60, "point": 45}


def annotation_hours(kind: str, images: int) -> float:
    """Annotation time in hours for ``images`` images labeled with ``kind``."""
    if kind not in COST_SECONDS:
        raise ValueError(f"unknown annotation kind {kind!r}; choose from {sorted(COST_SECONDS)}")
    return COST_SECONDS[kind] * images / 3600


def _regions(mask: np.ndarray, num_classes: int):
    for c in range(num_classes):
        lab, n = ndimage.label(mask == c)
        for k in range(1, n + 1):
            yield c, lab == k


def simulate(mask: np.ndarray, kind: str, num_classes: int, rng: np.random.Generator, *, width: int = 3, min_region: int = 64, erode: int = 5, tolerance: float = 4.0) -> np.ndarray:
    """A weak label map (class id on annotated pixels, 255 elsewhere) from a dense mask."""
    if kind not in KINDS:
        raise ValueError(f"unknown weak label kind {kind!r}; choose from {KINDS}")
    out = np.full(mask.shape, IGNORE_INDEX, np.uint8)
    if kind == "point":
        for c in range(num_classes):
            m = mask == c
            if not m.any():
                continue
            inner = ndimage.binary_erosion(m, iterations=2)
            rc = np.argwhere(inner if inner.any() else m)
            y, x = rc[rng.integers(len(rc))]
            out[y, x] = c
        return out
    for c, region in _regions(mask, num_classes):
        if region.sum() < min_region:
            continue
        if kind == "scribble":
            stroke = skeletonize(region)
            if width > 1:
                stroke = ndimage.binary_dilation(stroke, iterations=width // 2) & region
            out[stroke] = c
        else:
            core = ndimage.binary_erosion(region, iterations=erode)
            if core.sum() < min_region // 4:
                continue
            filled = np.zeros_like(core)
            for contour in find_contours(np.pad(core, 1).astype(float), 0.5):
                poly = approximate_polygon(contour - 1, tolerance=tolerance)
                rr, cc = fill_polygon(poly[:, 0], poly[:, 1], shape=core.shape)
                filled[rr, cc] ^= True  # even-odd fill keeps holes open
            out[filled & region] = c
    return out


def derive_dataset(root: str | os.PathLike, out: str | os.PathLike, ids, *, weak: dict, note: str, confidence: dict | None = None) -> Path:
    """Make ``out`` a folder dataset built on ``root`` whose images ``ids`` carry new weak labels
    only (``weak``: name -> folder, written by the caller): ``images/``, ``splits/`` and the
    source's own weak label folders are linked, and ``masks/`` links the dense masks of the
    *other* images (val, test) one file at a time, never those of ``ids``, so a run on ``out``
    cannot read a dense mask of them. ``confidence``: weak label name -> folder of per-pixel
    confidence PNGs (0-255). Used by ``weaken`` and ``refine``; idempotent."""
    root, out = Path(root), Path(out)
    info = DatasetInfo.load(root)
    out.mkdir(parents=True, exist_ok=True)
    for name in ["images", "splits", *{str(f).rstrip("/") for f in info.weak_labels.values()}]:
        src, dst = root / name, out / name
        if src.exists() and not dst.exists():
            dst.symlink_to(src.resolve(), target_is_directory=True)
    masks = out / "masks"
    if masks.is_symlink():  # made by an earlier lowlabel, which linked every dense mask
        masks.unlink()
    masks.mkdir(exist_ok=True)
    hidden = set(ids)
    for src in label_files(root / "masks"):
        dst = masks / src.name
        if src.stem in hidden:
            dst.unlink(missing_ok=True)
        elif not dst.exists():
            dst.symlink_to(src.resolve())
    meta = json.loads((root / "dataset.json").read_text())
    meta["weak_labels"] = {**meta.get("weak_labels", {}), **weak}
    if confidence:
        meta["weak_confidence"] = {**meta.get("weak_confidence", {}), **confidence}
    if note not in meta.get("notes", ""):
        meta["notes"] = (meta.get("notes", "") + " " + note).strip()
    tmp = out / f".dataset.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "dataset.json")
    return out


def weaken_dataset(root: str | os.PathLike, kind: str, out: str | os.PathLike, *, seed: int = 0, split: str = "train", progress=None, **kwargs) -> Path:
    """Write a folder dataset at ``out`` (see :func:`derive_dataset`) whose images of ``split``
    carry simulated weak labels only (``weak_labels: {<folder>: <folder>/}``), no dense masks.
    Resumable: existing weak label files are kept. Seeded per image id."""
    root, out = Path(root), Path(out)
    info = DatasetInfo.load(root)
    if info.task != "semantic":
        raise ValueError(f"{root}: weak labels are simulated from semantic masks; task is {info.task!r}")
    ids = read_ids(root / "splits" / f"{split}.txt")
    folder = FOLDERS[kind]
    (out / folder).mkdir(parents=True, exist_ok=True)
    derive_dataset(root, out, ids, weak={folder: f"{folder}/"},
                   note=f"Weak labels '{folder}/' simulated by `lowlabel weaken --kind {kind} --seed {seed}` from the dense masks of split '{split}', whose dense masks are left out of masks/.")
    for n, sid in enumerate(ids):
        dest = out / folder / f"{sid}.png"
        if not dest.exists():
            rng = np.random.default_rng([seed, zlib.crc32(sid.encode())])  # per image, independent of order
            write_label(dest, simulate(read_label(label_path(root / "masks", sid)), kind, info.num_classes, rng, **kwargs), info.palette)
        if progress:
            progress(n + 1, len(ids))
    return out
