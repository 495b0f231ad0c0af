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
    index_images,
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
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Check ``root`` and return a :class:`Report` listing every problem.

    Checks: dataset.json parses and names classes; every split file's ids have an image; every
    image decodes (truncated files fail); every label map matches its image's size and holds
    only class ids in range or 255; no split named ``labeled`` (or given in
    ``extra_split_files``) is empty. ``read_pixels=False`` skips decoding (fast guard used by
    other commands before they start).
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
    for sf in split_files:
        try:
            ids = read_ids(sf)
        except DatasetError as err:
            problems.append(Problem(err.path, err.problem))
            continue
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
        label_dirs = []
        if info.task == "instance":
            label_dirs.append(("instances", True))
        else:
            label_dirs.append(("masks", False))
        for folder in info.weak_labels.values():
            label_dirs.append((str(folder).rstrip("/"), False))
        items = list(images.items())
        for n, (sid, ipath) in enumerate(items):
            if progress:
                progress(n, len(items))
            try:
                img = read_image(ipath)
            except DatasetError as err:
                problems.append(Problem(err.path, err.problem))
                continue
            checked += 1
            h, w = img.shape[:2]
            for folder, sixteen in label_dirs:
                lpath = root / folder / f"{sid}.png"
                if not lpath.exists():
                    continue  # labels are optional per image (unlabeled images need none)
                try:
                    arr = read_label(lpath, sixteen_bit=sixteen)
                    if arr.shape != (h, w):
                        raise DatasetError(lpath, f"size {arr.shape[1]}x{arr.shape[0]} does not match image {ipath.name} ({w}x{h})")
                    if not sixteen:
                        check_class_range(arr, info.num_classes, lpath)
                        if folder == "masks":
                            counts = np.bincount(arr.ravel(), minlength=256)
                            class_pixels[: info.num_classes] += counts[: info.num_classes]
                            class_pixels[-1] += counts[255]
                except DatasetError as err:
                    problems.append(Problem(err.path, err.problem))
        if progress:
            progress(len(items), len(items))
        for lbl_dir, _ in label_dirs:
            d = root / lbl_dir
            if d.is_dir():
                orphans = [p.name for p in sorted(d.glob("*.png")) if p.stem not in images]
                if orphans:
                    problems.append(Problem(str(d), f"{len(orphans)} label file(s) with no image: {', '.join(orphans[:5])}"))
    return Report(info, problems, checked, class_pixels if read_pixels else None)


def require_valid(root: str | Path, *, extra_split_files: Sequence[str | Path] = ()) -> DatasetInfo:
    """Fast guard for commands that read data: raise :class:`DatasetError` listing all problems."""
    report = validate_dataset(root, extra_split_files=extra_split_files, read_pixels=False)
    if not report.ok:
        lines = "\n  ".join(str(p) for p in report.problems)
        raise DatasetError(None, f"dataset {root} has {len(report.problems)} problem(s):\n  {lines}")
    return report.info
