"""Labeled/unlabeled sets of a config and the endless, resumable batch streams of the engine.

A stream's batch ``k`` is a pure function of ``(seed, k)``: epoch ``k // batches_per_epoch``
shuffles with a generator seeded by ``(seed, epoch)``, and each sample is augmented with a
generator seeded by ``(seed, epoch, index)``. Resuming at iteration ``k`` therefore needs no
saved loader state and skips no images by reading them. Each loader owns its ``torch.Generator``:
a DataLoader iterator draws its base seed from the global torch RNG otherwise, so a resume (which
opens an iterator mid-epoch) would shift the global stream that dropout and the methods use.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..augment.transforms import LabeledTransform, UnlabeledTransform
from ..config import DataConfig
from ..data.dataset import DatasetError, FolderDataset, collate, read_ids
from ..data.splits import split_ids
from ..errors import ConfigError


def resolve_split(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(labeled ids, unlabeled ids) of a data config. Lists given as files must hold ids of the
    train split only: an id of the val or test split would train on the evaluation images."""
    root = Path(cfg.root)
    train_file = root / "splits" / f"{cfg.train_split}.txt"
    train = read_ids(train_file)
    lab = cfg.labeled.strip()
    try:
        if lab.endswith(".txt"):
            labeled = read_ids(lab)
        elif lab.isdigit() and int(lab) > 1:
            labeled, _ = split_ids(train, count=int(lab), seed=cfg.split_seed)
        else:
            labeled, _ = split_ids(train, fraction=lab, seed=cfg.split_seed)
    except ValueError as err:
        if isinstance(err, DatasetError):
            raise
        raise ConfigError(f"data.labeled={lab!r}: {err} (train split {train_file}: {len(set(train))} ids)") from None
    if not labeled:
        raise DatasetError(lab, "empty labeled set")
    if cfg.unlabeled:
        unlabeled = read_ids(cfg.unlabeled)
    else:
        chosen = set(labeled)
        unlabeled = [i for i in sorted(set(train)) if i not in chosen]
    in_train = set(train)
    for path, ids in ((lab, labeled), (cfg.unlabeled, unlabeled)):
        outside = sorted(set(ids) - in_train)
        if outside:
            where = _splits_holding(root, outside, exclude=cfg.train_split)
            raise DatasetError(path, f"{len(outside)} id(s) are not in the train split {train_file.name}"
                               + (f" but in {where}" if where else "") + f", e.g. {outside[:3]}; "
                               "a labeled or unlabeled list may only name training images")
    overlap = set(labeled) & set(unlabeled)
    if overlap:
        raise DatasetError(cfg.unlabeled, f"{len(overlap)} id(s) are both labeled and unlabeled, e.g. {sorted(overlap)[:3]}")
    return labeled, unlabeled


def _splits_holding(root: Path, ids: list[str], exclude: str) -> str:
    """Names of the split files (other than ``exclude``) that list any of ``ids``."""
    want = set(ids)
    names = [p.name for p in sorted((root / "splits").glob("*.txt")) if p.stem != exclude and want & set(read_ids(p))]
    return ", ".join(names)


def _window(cfg: DataConfig) -> int | None:
    """The side of the random source window each training sample reads (``data.window``): the
    largest extent one crop can cover after the random rescale."""
    if not cfg.window:
        return None
    if cfg.resize or cfg.base_size:
        from ..errors import ConfigError

        raise ConfigError("data.window reads a window of each image, but data.resize / data.base_size need the whole image: set one or the other")
    return math.ceil(cfg.crop / min(cfg.scale))


def build_sets(cfg: DataConfig, n_strong: int, seed: int, need_unlabeled: bool, *, labeled_strong: int = 0, coords: bool = False):
    labeled_ids, unlabeled_ids = resolve_split(cfg)
    lab = FolderDataset(cfg.root, labeled_ids, labeled=True, weak=cfg.weak, seed=seed,
                        transform=LabeledTransform(cfg.crop, tuple(cfg.scale), cfg.base_size, cfg.resize, cfg.rotate, n_strong=labeled_strong),
                        confidence=cfg.weak_confidence, min_confidence=cfg.min_confidence, bands=cfg.bands, value_range=cfg.value_range, coords=coords,
                        diagnostic_gt=cfg.unlabeled_gt, window=_window(cfg))
    missing = [i for i in labeled_ids if not lab.label_file(i)[1].is_file()]
    if missing:
        folder = lab.label_file(missing[0])[1].parent
        hint = "" if cfg.weak else f"; for weak labels set data.weak to one of {sorted(lab.info.weak_labels)}" if lab.info.weak_labels else ""
        raise DatasetError(folder, f"{len(missing)} labeled id(s) have no label file here, e.g. {', '.join(missing[:3])}{hint}")
    unl = None
    if need_unlabeled:
        if not unlabeled_ids:
            raise DatasetError(cfg.root, "this method trains on unlabeled images, but the labeled part is the whole train split; lower data.labeled")
        unl = FolderDataset(
            cfg.root, unlabeled_ids, labeled=False, info=lab.info,
            transform=UnlabeledTransform(cfg.crop, tuple(cfg.scale), cfg.base_size, n_strong=n_strong, resize=cfg.resize, rotate=cfg.rotate), seed=seed + 1,
            diagnostic_gt=cfg.unlabeled_gt, bands=cfg.bands, value_range=cfg.value_range, window=_window(cfg),
        )
    return lab, unl


class Stream:
    """Endless batches of a dataset for one rank of ``world``; epochs reshuffle.

    Ranks share one permutation per epoch, and global batch ``k`` is the same images whatever
    ``world`` is: rank ``r`` takes the ``r``-th slice of ``batch_size`` of its block of
    ``batch_size * world`` (so 2 ranks of batch b see what 1 process of batch 2b sees, and the
    ranks' shards are disjoint within an epoch)."""

    def __init__(self, dataset, batch_size: int, *, seed: int, workers: int = 0, rank: int = 0, world: int = 1, pin: bool = False):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.workers, self.rank, self.world, self.pin = workers, rank, world, pin
        n = len(dataset)
        per_rank = n // world if n >= world else 1
        # few-label sets smaller than a batch repeat within the epoch (UniMatch repeats labeled ids)
        self.per_rank = max(per_rank, batch_size)
        self.batches_per_epoch = self.per_rank // batch_size

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        n = len(self.dataset)
        rng = np.random.default_rng([self.seed, epoch])
        reps = -(-self.per_rank * self.world // n)
        perm = np.concatenate([rng.permutation(n) for _ in range(reps)])
        b, w = self.batch_size, self.world
        used = perm[: self.batches_per_epoch * b * w].reshape(self.batches_per_epoch, w, b)
        mine = used[:, self.rank].reshape(-1)  # world 1: perm[:batches * b], as before
        return [(int(i), epoch) for i in mine]

    def batches(self, start: int = 0) -> Iterator[dict]:
        """Batches from global batch index ``start`` on, forever."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        while True:
            keys = self.epoch_keys(epoch)
            sampler = [keys[b * self.batch_size : (b + 1) * self.batch_size] for b in range(offset, self.batches_per_epoch)]
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, offset]).generate_state(1)[0]))
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.workers, pin_memory=self.pin, generator=gen
            )
            yield from loader
            epoch, offset = epoch + 1, 0
