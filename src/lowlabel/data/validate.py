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


@dataclass(frozen=True)
class Supervision:
    """What a run trains on: ``labeled`` images carrying ``labels`` (a weak label name such as
    ``scribbles``, or ``dense masks``) and ``unlabeled`` images with nothing; with a case pattern
    the cases each part spans (``None`` without one)."""

    labels: str
    labeled: int
    unlabeled: int
    labeled_cases: int | None = None
    unlabeled_cases: int | None = None

    def line(self) -> str:
        """E.g. ``7 cases (136 images) scribbles, 63 cases (1176 images) unlabeled``."""
        def part(n: int, cases: int | None) -> str:
            images = f"{n} image{'' if n == 1 else 's'}"
            return images if cases is None else f"{cases} case{'' if cases == 1 else 's'} ({images})"

        rest = f"{part(self.unlabeled, self.unlabeled_cases)} unlabeled" if self.unlabeled else "no unlabeled images"
        return f"{part(self.labeled, self.labeled_cases)} {self.labels}, {rest}"

    def record(self) -> dict:
        return {"text": self.line(), "labels": self.labels, "labeled_images": self.labeled, "unlabeled_images": self.unlabeled,
                "labeled_cases": self.labeled_cases, "unlabeled_cases": self.unlabeled_cases}


def count_cases(ids: Sequence[str], case_pattern: str | None) -> int | None:
    """How many cases ``ids`` span: distinct first groups of ``case_pattern`` searched in each
    id (an id it does not match is a case of its own); None without a pattern."""
    if case_pattern is None:
        return None
    import re

    pat = re.compile(case_pattern)
    return len({(m.group(1) if m else sid) for sid in ids for m in [pat.search(sid)]})


def weak_folder(info: DatasetInfo, weak: str) -> Path:
    """The folder of the weak labels named ``weak``: its ``dataset.json`` entry, or a folder of
    that name (as :meth:`FolderDataset.weak_folder` reads it)."""
    return info.root / str(info.weak_labels.get(weak, weak)).rstrip("/")


def dense_labels(info: DatasetInfo) -> str:
    """What a dense labeled image of this dataset carries."""
    return "instance masks" if info.task == "instance" else "dense masks"


def supervision_problems(info: DatasetInfo, labeled: Sequence[str], unlabeled: Sequence[str], weak: str | None, *, dense_files: bool = True) -> list[Problem]:
    """The bad combinations of a weak + unlabeled run, each a one-line :class:`Problem`: ids both
    weakly labeled and unlabeled; ``weak`` naming no weak labels of the dataset; weakly labeled
    images without a weak label file (and, with dense labels and ``dense_files``, labeled
    images without a mask, or an instance map on an instance dataset)."""
    problems = []
    both = sorted(set(labeled) & set(unlabeled))
    if both:
        what = "weakly labeled" if weak else "labeled"
        problems.append(Problem(str(info.root / "splits"), f"{len(both)} id(s) are both {what} and unlabeled, e.g. {', '.join(both[:3])}: "
                                                        "data.labeled and data.unlabeled must not overlap"))
    if weak is None:
        if not dense_files:
            return problems
        folder, what = (info.root / "instances", "instance map") if info.task == "instance" else (info.root / "masks", "dense mask")
    else:
        folder, what = weak_folder(info, weak), "weak label"
        if weak not in info.weak_labels and not folder.is_dir():
            known = sorted(info.weak_labels) or "none"
            problems.append(Problem(str(info.root / "dataset.json"), f"data.weak={weak!r} names no weak labels of this dataset (weak_labels: {known})"))
            return problems
    missing = [i for i in labeled if not label_path(folder, i).is_file()]
    if missing:
        which = f"data.weak={weak!r}: {len(missing)} of {len(labeled)} weakly" if weak else f"{len(missing)} of {len(labeled)}"
        problems.append(Problem(str(folder), f"{which} labeled image(s) have no {what} file here, e.g. {', '.join(missing[:3])}"))
    return problems


def supervision_of(info: DatasetInfo, labeled: Sequence[str], unlabeled: Sequence[str], weak: str | None, case_pattern: str | None = None) -> Supervision:
    """The :class:`Supervision` of a run that trains on ``labeled`` (their weak labels ``weak``,
    or their dense masks) and ``unlabeled``; raises :class:`DatasetError` with the first of
    :func:`supervision_problems` (one line; dense label files are left to the engine's check)."""
    problems = supervision_problems(info, labeled, unlabeled, weak, dense_files=False)  # dense: the engine's own check, with its data.weak hint
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DatasetError(None, f"{problems[0]}{more}")
    return Supervision(weak or dense_labels(info), len(labeled), len(unlabeled), count_cases(labeled, case_pattern), count_cases(unlabeled, case_pattern))


@dataclass
class Report:
    info: DatasetInfo | None
    problems: list[Problem]
    checked_images: int = 0
    class_pixels: np.ndarray | None = None
    supervision: Supervision | None = None  # with ``labeled``: what a run on those lists trains on

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
    labeled: str | Path | None = None,
    unlabeled: str | Path | None = None,
    weak: str | None = None,
    train_split: str = "train",
    case_pattern: str | None = None,
) -> Report:
    """Check ``root`` and return a :class:`Report` listing every problem.

    With ``labeled`` (a list file, or a split name) the report also says what a run on it trains
    on (``report.supervision``: the labeled images, with the weak labels ``weak`` or dense masks,
    and the ``unlabeled`` list, by default the rest of ``train_split``; cases counted with
    ``case_pattern``), and lists the bad combinations (:func:`supervision_problems`).

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
    roles = {}
    for role, f in (("labeled", labeled), ("unlabeled", unlabeled)):
        if f is not None:
            roles[role] = Path(f) if str(f).endswith(".txt") else split_dir / f"{f}.txt"
            if roles[role] not in split_files:
                split_files.append(roles[role])
    if not split_files:
        problems.append(Problem(str(split_dir), "no split files (train.txt, val.txt, test.txt)"))
    listed: set[str] = set()
    lists: dict[Path, list[str]] = {}  # every split file read (the supervision below uses them)
    for sf in split_files:
        try:
            ids = read_ids(sf)
        except DatasetError as err:
            problems.append(Problem(err.path, err.problem))
            continue
        lists[sf] = ids
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

    supervision = None
    if "labeled" in roles:
        train_file = split_dir / f"{train_split}.txt"
        lab_ids = lists.get(roles["labeled"])  # an unreadable list was reported above
        if "unlabeled" in roles:
            unl_ids = lists.get(roles["unlabeled"])
        else:  # the rest of the train split (a missing one is reported below)
            train_ids = lists.get(train_file)
            if train_ids is None and train_file.is_file():
                try:
                    train_ids = read_ids(train_file)
                except DatasetError as err:
                    problems.append(Problem(err.path, err.problem))
            labeled_set = set(lab_ids or ())
            unl_ids = None if train_ids is None or lab_ids is None else [i for i in train_ids if i not in labeled_set]
        if lab_ids is not None and unl_ids is not None:
            sup_problems = supervision_problems(info, lab_ids, unl_ids, weak)
            problems += sup_problems
            if not any("names no weak labels" in p.problem for p in sup_problems):
                supervision = Supervision(weak or dense_labels(info), len(lab_ids), len(unl_ids), count_cases(lab_ids, case_pattern), count_cases(unl_ids, case_pattern))
        if "unlabeled" not in roles and not train_file.is_file():
            problems.append(Problem(str(train_file), "split file not found (the unlabeled images are the rest of it)"))

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
    return Report(info, problems, checked, class_pixels if read_pixels else None, supervision)


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
