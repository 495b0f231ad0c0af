"""Check a folder dataset before training and report every problem found (not only the first)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .dataset import (
    DatasetError,
    DatasetInfo,
    check_class_range,
    check_label_grid,
    index_images,
    label_files,
    label_path,
    read_ids,
    read_image,
    read_label,
)


@dataclass(frozen=True)
class Problem:
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Report:
    info: DatasetInfo | None
    problems: list[Problem]
    checked_images: int = 0
    class_pixels: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_dataset(
    root: str | Path,
    *,
    splits: Sequence[str] | None = None,
    extra_split_files: Sequence[str | Path] = (),
    read_pixels: bool = True,
    only_listed: bool = False,
    cache: bool = False,
    bands: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Check ``root`` and return a :class:`Report` listing every problem.

    Checks: dataset.json parses and names classes; every split file's ids have an image; every
    image decodes (truncated files fail); every label map matches its image's size and holds
    only class ids in range or 255; no split named ``labeled`` (or given in
    ``extra_split_files``) is empty. ``read_pixels=False`` skips decoding. ``only_listed``
    decodes only the images the checked split files list (what a command will touch);
    ``cache`` skips images whose files (image and labels) have the size and modification time
    they had when they last passed (see :func:`_verdict_cache`).
    """
    root = Path(root)
    problems: list[Problem] = []
    try:
        info = DatasetInfo.load(root)
    except DatasetError as err:
        return Report(None, [Problem(err.path or str(root), err.problem)])

    images = index_images(root)
    if not images:
        problems.append(Problem(str(root / "images"), "no images found"))
    split_dir = root / "splits"
    split_files = [split_dir / f"{s}.txt" for s in splits] if splits else sorted(split_dir.glob("*.txt"))
    split_files += [Path(p) for p in extra_split_files]
    if not split_files:
        problems.append(Problem(str(split_dir), "no split files (train.txt, val.txt, test.txt)"))
    listed: set[str] = set()
    for sf in split_files:
        try:
            ids = read_ids(sf)
        except DatasetError as err:
            problems.append(Problem(err.path, err.problem))
            continue
        listed.update(ids)
        if not ids:
            what = "labeled set" if sf.stem == "labeled" else "split"
            problems.append(Problem(str(sf), f"empty {what}: no ids"))
        missing = [i for i in ids if i not in images]
        if missing:
            problems.append(Problem(str(sf), f"{len(missing)} id(s) with no image in images/: {', '.join(missing[:5])}"))
        dup = len(ids) - len(set(ids))
        if dup:
            problems.append(Problem(str(sf), f"{dup} duplicated id(s)"))

    class_pixels = np.zeros(info.num_classes + 1, dtype=np.int64)  # last bin: ignore
    checked = 0
    if read_pixels:
        label_dirs = []  # (folder, 16-bit)
        if info.task == "instance":
            label_dirs.append(("instances", True))
        else:
            label_dirs.append(("masks", False))
        for folder in info.weak_labels.values():
            label_dirs.append((str(folder).rstrip("/"), False))
        confidence_dirs = {str(f).rstrip("/") for f in info.weak_confidence.values()}  # 0..255: sizes only
        label_dirs += [(f, False) for f in sorted(confidence_dirs)]
        items = list(images.items())
        if only_listed:
            items = [(i, p) for i, p in items if i in listed]
        passed, save = _verdict_cache(root, info.num_classes) if cache else ({}, None)
        for n, (sid, ipath) in enumerate(items):
            if progress:
                progress(n, len(items))
            sig = _signature(ipath, [label_path(root / folder, sid) for folder, _ in label_dirs]) if cache else None
            if sig is not None and passed.get(sid) == sig:
                checked += 1
                continue
            n_problems = len(problems)
            try:
                img = read_image(ipath, bands, value_range)
            except DatasetError as err:
                problems.append(Problem(err.path, err.problem))
                continue
            checked += 1  # counted as checked once decoded; label problems are listed below
            h, w = img.shape[:2]
            for folder, sixteen in label_dirs:
                lpath = label_path(root / folder, sid)
                if not lpath.exists():
                    continue  # labels are optional per image (unlabeled images need none)
                try:
                    check_label_grid(lpath, ipath)
                    arr = read_label(lpath, sixteen_bit=sixteen)
                    if arr.shape != (h, w):
                        raise DatasetError(lpath, f"size {arr.shape[1]}x{arr.shape[0]} does not match image {ipath.name} ({w}x{h})")
                    if not sixteen and folder not in confidence_dirs:
                        check_class_range(arr, info.num_classes, lpath)
                        if folder == "masks":
                            counts = np.bincount(arr.ravel(), minlength=256)
                            class_pixels[: info.num_classes] += counts[: info.num_classes]
                            class_pixels[-1] += counts[255]
                except DatasetError as err:
                    problems.append(Problem(err.path, err.problem))
            if cache and len(problems) == n_problems:
                passed[sid] = sig
        if progress:
            progress(len(items), len(items))
        if save is not None:
            save(passed)
        for lbl_dir, _ in label_dirs:
            d = root / lbl_dir
            if d.is_dir():
                orphans = [p.name for p in label_files(d) if p.stem not in images]
                if orphans:
                    problems.append(Problem(str(d), f"{len(orphans)} label file(s) with no image: {', '.join(orphans[:5])}"))
    return Report(info, problems, checked, class_pixels if read_pixels else None)


def _signature(image: Path, labels: Sequence[Path]) -> str:
    """Size and modification time of an image and of the label files it has."""
    parts = []
    for p in (image, *labels):
        try:
            st = p.stat()
        except FileNotFoundError:
            parts.append("-")
            continue
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _verdict_cache(root: Path, num_classes: int):
    """(ids that passed -> their files' signature, save function) for a dataset folder, kept in
    ``$LOWLABEL_CACHE`` (default ``~/.cache/lowlabel``)/checked/. Only passes are cached, so a
    problem is reported on every run until it is fixed. An unwritable cache folder is skipped."""
    import contextlib
    import hashlib
    import json
    import os

    base = Path(os.environ.get("LOWLABEL_CACHE") or Path.home() / ".cache" / "lowlabel")
    key = hashlib.sha1(f"{root.resolve()}|{num_classes}".encode()).hexdigest()[:16]
    path = base / "checked" / f"{key}.json"
    try:
        passed = json.loads(path.read_text())["passed"]
    except (OSError, ValueError, KeyError, TypeError):
        passed = {}

    def save(verdicts: dict) -> None:
        from ..utils import atomic_write_json

        with contextlib.suppress(OSError):  # a read-only home: the check still ran, only its memory is lost
            atomic_write_json(path, {"root": str(root.resolve()), "num_classes": num_classes, "passed": verdicts})

    return passed, save


def require_valid(root: str | Path, *, splits: Sequence[str] | None = None, extra_split_files: Sequence[str | Path] = (), read_pixels: bool = False,
                  bands: Sequence[int] | None = None, value_range: tuple[float, float] | None = None) -> DatasetInfo:
    """The guard a command runs before it writes anything: raise :class:`DatasetError` listing
    every problem. ``read_pixels`` decodes every image (and its labels) that the named
    ``splits`` and ``extra_split_files`` list, with verdicts cached by file size and time."""
    report = validate_dataset(root, splits=splits, extra_split_files=extra_split_files, read_pixels=read_pixels, only_listed=read_pixels, cache=read_pixels,
                              bands=bands, value_range=value_range)
    if not report.ok:
        if len(report.problems) == 1:
            raise DatasetError(None, f"dataset {root}: {report.problems[0]}")
        lines = "\n  ".join(str(p) for p in report.problems[:20])
        more = f"\n  ... and {len(report.problems) - 20} more (lowlabel validate {root})" if len(report.problems) > 20 else ""
        raise DatasetError(None, f"dataset {root} has {len(report.problems)} problems:\n  {lines}{more}")
    return report.info
