"""``lowlabel suggest``: which unlabeled images (or whole cases) to label next.

A trained run scores every image of a pool; the images (or, with ``group_by``, the cases) are
ranked by the strategy and the budget — a count, or annotation minutes under the cost model of
:data:`lowlabel.data.weak.COST_SECONDS` — takes them in rank order. Outputs, beside ``out``
(e.g. ``next.txt``):

- ``next.txt``: the units to label next, best first, one id a line (``next.images.txt`` with
  the image ids of the picked cases when grouping);
- ``next.csv``: every pool unit: rank, id, picked, skipped, score and each term of the score
  (``next.images.csv``: the same per image when grouping). ``score`` is what the strategy ranks
  by: the uncertainty (``hybrid``: its first step's, and the rank is the k-center order among
  the ``candidate`` units, with each one's ``distance``), the k-center distance at the time of
  the pick (``coreset``), a uniform draw (``random``);
- ``next.png``: an overview: per pick (a case: its highest-scoring image), the image, the
  predicted mask and the uncertainty map;
- ``next.heatmaps/<image id>.png``: each picked image's uncertainty heat map beside its
  prediction, titled with its score: why it was picked;
- ``next.state.json``: the skipped ids (``skip``), remembered between calls: a skipped unit goes
  to the end of the queue.

Strategies (:data:`lowlabel.label.STRATEGIES`; the sources are cited in
:mod:`lowlabel.label.strategies`): ``random`` (seeded), ``entropy``, ``margin``,
``balanced-entropy``, ``balanced-margin`` (class weights inverse to the labeled set's class
frequencies), ``bald`` (mutual information over MC-dropout samples, or over flips where the model
has no dropout), ``coreset`` (k-center greedy on the encoder's pooled features) and ``hybrid``
(the most uncertain units, then k-center among them). Instance runs take ``random`` and
``coreset`` (the others read per-pixel class probabilities).

Every image score is the mean of its pixel scores (:func:`lowlabel.label.strategies.image_score`);
a case's is the mean (or ``aggregate="max"``) of its images'.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import (
    DatasetInfo,
    FolderDataset,
    index_images,
    read_ids,
    read_label,
)
from ..data.weak import COST_SECONDS
from ..errors import ConfigError, DatasetError
from ..utils import atomic_write_json, atomic_write_text, progress_bar
from . import (
    STRATEGIES,  # the names live in the package, where the CLI reads them without importing torch
)
from . import strategies as S
from .tiles import open_unit, spread, tile_pool

UNCERTAINTIES = ("entropy", "margin", "balanced-entropy", "balanced-margin", "bald")  # per-pixel strategies (hybrid's first step)
INSTANCE_STRATEGIES = ("random", "coreset")
BALD_SOURCES = ("auto", "dropout", "flips")
# --cost names: the plural of the weak-label folders, or the kinds of COST_SECONDS
COST_KINDS = {"points": "point", "point": "point", "scribbles": "scribble", "scribble": "scribble", "coarse": "coarse", "fine": "fine"}
FLIPS = ((), (-1,), (-2,), (-2, -1))  # test-time views: identity, horizontal, vertical, both
HEATMAP_LIMIT = 200  # at most this many heat maps per call (a huge budget would write thousands)
OVERVIEW_ROWS = 16


@dataclass
class Suggestion:
    """What ``suggest`` chose. ``picks``: unit ids to label next, best first (cases when grouping,
    else image ids); ``images``: the image ids of the picks, in pick order; ``queue``: every pool
    unit in rank order (skipped ones last); ``rows`` / ``image_rows``: the CSV rows (dicts);
    ``message``: a sentence for the user (e.g. that everything is labeled); ``files``: what was
    written; ``info``: settings that were resolved (the BALD source, class weights, budget)."""

    strategy: str
    picks: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    queue: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    image_rows: list[dict] = field(default_factory=list)
    message: str = ""
    files: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs
def _as_run(run, device: str = "auto", precision: str | None = None):
    from ..engine.run import Run

    return run if isinstance(run, Run) else Run.load(run, device=device, precision=precision)


def _run_dataset_name(run) -> str | None:
    meta = Path(run.run_dir) / "run.json" if run.run_dir else None
    if meta is not None and meta.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(meta.read_text()).get("dataset")
    if run.config is not None and (Path(run.config.data.root) / "dataset.json").is_file():
        with contextlib.suppress(DatasetError):
            return DatasetInfo.load(run.config.data.root).name
    return None


def dataset_of(run, data=None) -> DatasetInfo:
    """The folder dataset a suggestion reads: ``data``, else the run's own (``data.root``). It
    must be the run's: the same classes, and the same dataset name where the run recorded one."""
    if data is not None:
        root = Path(data)
    else:
        cands = [Path(p) for p in ((run.config.data.root if run.config else None), run.data_root) if p]
        root = next((p for p in cands if (p / "dataset.json").is_file()), None)
        if root is None:
            raise DatasetError(cands[0] if cands else None, "the run's dataset folder is not here; give the dataset folder (--data DATASET)")
    info = DatasetInfo.load(root)
    if tuple(info.classes) != tuple(run.classes):
        raise DatasetError(root, f"classes {list(info.classes)} are not the run's {list(run.classes)}: the run was trained on another dataset")
    name = _run_dataset_name(run)
    if name is not None and info.name != name:
        raise DatasetError(root, f"dataset {info.name!r} is not the one the run was trained on ({name!r}); suggest on the run's own dataset")
    return info


def _ids_of(spec, root: Path, what: str) -> tuple[list[str], str]:
    """(ids, source) of a list given as ids, a file of ids, or the name of a split file."""
    if isinstance(spec, (list, tuple)):
        return [str(i) for i in spec], f"{len(spec)} ids"
    p = Path(str(spec))
    if p.is_file():
        return read_ids(p), str(p)
    split = root / "splits" / f"{spec}.txt"
    if split.is_file():
        return read_ids(split), str(split)
    raise DatasetError(p, f"{what}: neither an id file nor a split of {root} (no {split.name} in {root / 'splits'})")


def labeled_ids(run, info: DatasetInfo, labeled=None) -> tuple[list[str], str]:
    """The ids labeled now: ``labeled`` (ids or a file), else the ids the run trained on
    (``<run>/splits/labeled.txt``), else its config's ``data.labeled``."""
    if labeled is not None:
        return _ids_of(labeled, info.root, "labeled")
    if run.run_dir and (Path(run.run_dir) / "splits" / "labeled.txt").is_file():
        p = Path(run.run_dir) / "splits" / "labeled.txt"
        return read_ids(p), str(p)
    if run.config is not None:
        from ..engine.data import resolve_split

        cfg = run.config.data.model_copy(update={"root": str(info.root)})
        return resolve_split(cfg)[0], f"data.labeled={run.config.data.labeled}"
    raise ConfigError("labeled: this run records no labeled set (no config): give the labeled ids (--labeled FILE)")


def _split_names(run) -> tuple[str, list[str]]:
    d = run.config.data if run.config else None
    train = d.train_split if d else "train"
    held = [s for s in ((d.val_split, d.test_split) if d else ("val", "test")) if s]
    return train, held


def _dedupe(ids) -> list[str]:
    return list(dict.fromkeys(ids))


def _groups(ids: Sequence[str], group_by: str | None, strict: bool = True) -> dict[str, str]:
    """image id -> unit id: the image itself, or with ``group_by`` (a regular expression searched
    in the id) its first group (the whole match when the pattern has no group). An id the
    pattern does not match is an error (``strict``), or its own unit."""
    if not group_by:
        return {i: i for i in ids}
    try:
        pat = re.compile(group_by)
    except re.error as err:
        raise ConfigError(f"group_by {group_by!r}: not a regular expression ({err})") from None
    out, unmatched = {}, []
    for i in ids:
        m = pat.search(i)
        if not m or not (m.group(1) if pat.groups else m.group(0)):
            unmatched.append(i)
            out[i] = i
            continue
        out[i] = m.group(1) if pat.groups else m.group(0)
    if unmatched and strict:
        raise ConfigError(f"group_by {group_by!r} does not match {len(unmatched)} id(s), e.g. {unmatched[:3]}; every id must belong to a case "
                          r"(ACDC: '^(patient\d+)_')")
    return out


# ----------------------------------------------------------------------------- model passes
class _Flipped(nn.Module):
    """``model`` on flipped input, its logits flipped back (a test-time view)."""

    def __init__(self, model: nn.Module, dims: tuple[int, ...]):
        super().__init__()
        self.net, self.dims = model, tuple(dims)
        self.in_channels = getattr(model, "in_channels", 3)

    def forward(self, x):
        return self.net(x.flip(self.dims)).flip(self.dims) if self.dims else self.net(x)


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The model's dropout layers that drop something (p > 0)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


@contextlib.contextmanager
def _mc_dropout(model: nn.Module):
    """Dropout layers in train mode (sampling), everything else (BatchNorm) in eval mode."""
    mods = dropout_layers(model)
    for m in mods:
        m.train()
    try:
        yield
    finally:
        for m in mods:
            m.eval()


def _seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


class Scorer:
    """Pixel maps and image scores of one strategy with one run.

    ``pixel_maps(sid, path)`` returns (score map [H, W], {term: map}, mean probabilities
    [C, H, W]); the first term is the score. ``features(path)`` returns the encoder's pooled
    feature vector (the deepest level, averaged over its positions)."""

    def __init__(self, run, strategy: str, *, weights=None, mc_samples: int = 8, bald_source: str = "auto", seed: int = 0):
        self.run, self.strategy, self.weights = run, strategy, weights
        self.mc_samples, self.seed = int(mc_samples), seed
        self.source = None
        if strategy == "bald":
            has = bool(dropout_layers(run.model))
            if bald_source == "dropout" and not has:
                raise ConfigError(f"bald_source dropout: this run's {type(run.model).__name__} has no dropout layer (p > 0); use flips (or auto)")
            self.source = "dropout" if (bald_source == "dropout" or (bald_source == "auto" and has)) else "flips"
            if self.source == "dropout" and self.mc_samples < 2:
                raise ConfigError(f"mc_samples {mc_samples}: BALD needs at least 2 dropout samples")

    def _probs(self, reader, model) -> torch.Tensor:
        from ..eval.inference import for_eval, sliding_window

        e, run = self.run.eval_cfg, self.run
        return sliding_window(for_eval(model, e), reader, run.num_classes, tile=e.tile, overlap=e.overlap, weighting=e.weighting,
                              batch_size=e.batch_size, device=run.device, return_probs=True, precision=run.precision).probs

    def pixel_maps(self, sid: str, path: Path) -> tuple[torch.Tensor, dict, torch.Tensor]:
        reader = open_unit(path, *self.run.raster_options())
        s = self.strategy
        if s == "bald":
            acc = S.MutualInformation()
            if self.source == "flips":
                for dims in FLIPS:
                    acc.add(self._probs(reader, _Flipped(self.run.model, dims)))
            else:
                devices = [self.run.device] if self.run.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices), _mc_dropout(self.run.model):
                    for t in range(self.mc_samples):
                        torch.manual_seed(_seed(self.seed, sid, t))
                        acc.add(self._probs(reader, self.run.model))
            mi, pred, exp = acc.maps()
            return mi, {"mutual_information": mi, "predictive_entropy": pred, "expected_entropy": exp}, acc.mean_probs()
        probs = self._probs(reader, self.run.model)
        if s == "margin":
            m = S.pixel_margin(probs)
            return m, {"margin": m}, probs
        if s == "balanced-entropy":
            m = S.weighted_entropy(probs, self.weights)
            return m, {"balanced_entropy": m, "entropy": S.pixel_entropy(probs)}, probs
        if s == "balanced-margin":
            m = S.weighted_margin(probs, self.weights)
            return m, {"balanced_margin": m, "margin": S.pixel_margin(probs)}, probs
        m = S.pixel_entropy(probs)  # entropy (and the explanation maps of random / coreset)
        return m, {"entropy": m}, probs

    @torch.no_grad()
    def features(self, path: Path) -> np.ndarray:
        run = self.run
        model = run.model
        reader = open_unit(path, *run.raster_options())
        img = reader.read(0, 0, reader.height, reader.width)
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float().div_(255).to(run.device)
        H, W = x.shape[-2:]
        e = run.eval_cfg
        if e.resize:  # the model sees whole resized images
            size = (e.resize, e.resize)
        else:  # the whole image, shrunk to one tile at most
            f = min(1.0, e.tile / max(H, W))
            size = (max(1, round(H * f)), max(1, round(W * f)))
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        k = int(getattr(model, "size_divisor", 32))
        ph, pw = (-x.shape[-2]) % k, (-x.shape[-1]) % k
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(x.shape[-2:]) > max(ph, pw) else "replicate")
        with run.precision.autocast():
            if getattr(model, "task", "semantic") == "instance":
                deepest = list(model.features(x).values())[-1]
            else:
                deepest = model.encode(run.precision.images(x))[-1]
        return deepest.float().mean((2, 3))[0].cpu().numpy().astype(np.float64)


def labeled_class_counts(info: DatasetInfo, ids: Sequence[str], weak: str | None = None) -> np.ndarray:
    """Pixels per class in the training targets of ``ids`` (dense masks, or the weak labels
    ``weak`` a run trains on; 255 = ignore left out)."""
    ds = FolderDataset(info.root, list(ids), labeled=True, weak=weak, info=info)
    counts = np.zeros(info.num_classes, np.int64)
    for sid in ids:
        _, path, _ = ds.label_file(sid)
        if not path.is_file():
            raise DatasetError(path, f"labeled image {sid} has no label file (the class-balanced strategies count its classes)")
        arr = read_label(path)
        counts += np.bincount(arr.ravel(), minlength=256)[: info.num_classes]
    return counts


# ----------------------------------------------------------------------------- the call
def _budget_seconds(cost: str | None, minutes: float | None, hours: float | None) -> tuple[str | None, float | None]:
    if minutes is not None and hours is not None:
        raise ConfigError("give minutes or hours, not both")
    t = minutes * 60 if minutes is not None else (hours * 3600 if hours is not None else None)
    if t is not None and cost is None:
        raise ConfigError("a time budget needs the kind of labels it buys: cost points | scribbles | coarse | fine")
    kind = None
    if cost is not None:
        if cost not in COST_KINDS:
            raise ConfigError(f"cost {cost!r}: choose from points, scribbles, coarse, fine")
        kind = COST_KINDS[cost]
    if t is not None and not t > 0:
        raise ConfigError(f"time budget {t / 60:g} min: must be positive")
    return kind, t


def state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".state.json")


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise DatasetError(path, f"unreadable suggestion state ({err}); delete it to forget the skipped ids") from None
    if not isinstance(state, dict) or not isinstance(state.get("skipped", []), list):
        raise DatasetError(path, "not a suggestion state (a JSON object with a 'skipped' list); delete it to forget the skipped ids")
    return state


def suggest(run, pool=None, budget: int | None = None, strategy: str = "entropy", *, out: str | Path | None = None, data=None,
            labeled=None, group_by: str | bool | None = None, aggregate: str = "mean", cost: str | None = None, minutes: float | None = None,
            hours: float | None = None, seed: int = 0, skip: Sequence[str] = (), candidates: float = 4.0, mc_samples: int = 8,
            bald_source: str = "auto", uncertainty: str = "entropy", heatmaps: bool = True, device: str = "auto",
            precision: str | None = None, progress: bool = False, tile: int | None = None, tile_gap: int = 1) -> Suggestion:
    """Rank the ``pool`` and pick what to label next.

    Args:
        run: a :class:`~lowlabel.engine.run.Run`, a run directory or a checkpoint.
        pool: ids, an id file, or a split name; default: the train split minus the labeled set.
        budget: how many units (images, or cases with ``group_by``) to pick; or give ``cost``
            and ``minutes`` / ``hours``: the units whose annotation time (images x
            ``COST_SECONDS[cost]``) fits, taken in rank order (one that does not fit is passed
            over; a later, smaller one may still fit).
        strategy: one of :data:`STRATEGIES`.
        out: the pick list to write (``next.txt``; the CSV, overview, heat maps and state go
            beside it); None writes nothing (and remembers no skips).
        data: the dataset folder (default: the run's).
        labeled: the ids labeled now (ids or a file; default: the run's labeled set).
        group_by: a regular expression whose first group names an image's case
            (``r"^(patient\\d+)_"`` for ACDC); the budget then counts cases. Default: the run's
            ``data.case_pattern`` where it has one; ``False``: images, whatever the run says.
        aggregate: a case's score from its images': ``mean`` or ``max``.
        seed: the ``random`` strategy's draw, and MC dropout's masks.
        skip: unit ids to move to the end of the queue, remembered in ``<out>.state.json``.
        candidates: ``hybrid``: keep ``candidates`` x the budget's units of the most uncertain.
        mc_samples: ``bald`` with dropout: stochastic passes T.
        bald_source: ``dropout`` (MC dropout), ``flips`` (four flipped views) or ``auto``
            (dropout where the model has dropout layers).
        uncertainty: ``hybrid``'s first step (one of :data:`UNCERTAINTIES`).
        heatmaps: write the overview and the per-image heat maps.
        tile: windows of ``tile`` x ``tile`` pixels of the pool images are the units (ids
            ``<image>@<x0>,<y0>,<w>,<h>``), blank and near-duplicate windows left out
            (:mod:`lowlabel.label.tiles`); for mosaics and slides too large to label whole.
        tile_gap: with ``tile``: a window within this many grid steps of one ranked ahead of it
            in the same image goes behind the others (spatial diversity; 0: off).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if aggregate not in S.AGGREGATES:
        raise ConfigError(f"aggregate {aggregate!r}: choose from {', '.join(S.AGGREGATES)}")
    if bald_source not in BALD_SOURCES:
        raise ConfigError(f"bald_source {bald_source!r}: choose from {', '.join(BALD_SOURCES)}")
    if uncertainty not in UNCERTAINTIES:
        raise ConfigError(f"uncertainty {uncertainty!r} (hybrid's first step): choose from {', '.join(UNCERTAINTIES)}")
    if strategy == "hybrid" and not candidates >= 1:
        raise ConfigError(f"candidates {candidates}: the hybrid strategy keeps at least the budget's units (>= 1)")
    kind, seconds = _budget_seconds(cost, minutes, hours)
    if budget is not None and seconds is not None:
        raise ConfigError("give a budget in units (budget) or in time (minutes / hours with cost), not both")
    if budget is None and seconds is None:
        raise ConfigError("give a budget: a count (--budget N) or annotation time (--cost KIND --minutes M)")
    if budget is not None and (isinstance(budget, bool) or int(budget) != budget or budget < 1):
        raise ConfigError(f"budget {budget!r}: give a whole number of images (or cases) >= 1")

    run = _as_run(run, device, precision)
    task = getattr(run, "task", "semantic")
    if task == "instance" and strategy not in INSTANCE_STRATEGIES:
        raise ConfigError(f"strategy {strategy}: reads per-pixel class probabilities, which an instance run does not give; "
                          f"an instance run takes {' or '.join(INSTANCE_STRATEGIES)}")
    info = dataset_of(run, data)
    root = info.root
    lab_ids, lab_source = labeled_ids(run, info, labeled)
    lab_ids = _dedupe(lab_ids)
    train_split, held_splits = _split_names(run)
    if pool is None:
        train = read_ids(root / "splits" / f"{train_split}.txt")
        have = set(lab_ids)
        pool_ids, pool_source = [i for i in _dedupe(train) if i not in have], f"the {train_split} split minus the labeled set"
    else:
        pool_ids, pool_source = _ids_of(pool, root, "pool")
        pool_ids = _dedupe(pool_ids)
    result = Suggestion(strategy=strategy, info={"pool": pool_source, "labeled": lab_source, "dataset": info.name})

    # bad input: the pool must be unlabeled training images that exist
    images = index_images(root)
    missing = [i for i in pool_ids if i not in images]
    if missing:
        raise DatasetError(pool_source if pool is not None else root / "images", f"{len(missing)} pool id(s) have no image in {root / 'images'}, e.g. {missing[:3]}")
    for split in held_splits:
        f = root / "splits" / f"{split}.txt"
        if f.is_file():
            clash = sorted(set(pool_ids) & set(read_ids(f)))
            if clash:
                raise DatasetError(pool_source, f"{len(clash)} pool id(s) are in the {split} split ({f.name}), e.g. {clash[:3]}: "
                                                "labeling evaluation images would train on them; leave them out of the pool")
    have = set(lab_ids)
    done = [i for i in pool_ids if i in have]
    if not pool_ids or len(done) == len(pool_ids):
        result.message = (f"everything is labeled: all {len(pool_ids)} image(s) of the pool ({pool_source}) are in the labeled set; nothing to suggest"
                          if pool_ids else f"everything is labeled: the pool ({pool_source}) is empty; nothing to suggest")
        return result
    if done:
        raise DatasetError(pool_source, f"{len(done)} pool id(s) are labeled already ({lab_source}), e.g. {done[:3]}: take them out of the pool "
                                        "(the default pool is the train split minus the labeled set)")

    # units: images, or cases (group_by; by default the run's data.case_pattern; False: images)
    if group_by is None and run.config is not None and run.config.data.case_pattern:
        group_by = run.config.data.case_pattern
        result.info["group_by_from"] = "data.case_pattern"
    tiles = None
    if tile is not None:  # windows are the units (lowlabel.label.tiles)
        if group_by and "group_by_from" not in result.info:
            raise ConfigError("tile and group_by: windows are the units, cases group whole images: choose one")
        result.info.pop("group_by_from", None)
        group_by = False
        if isinstance(tile_gap, bool) or int(tile_gap) != tile_gap or tile_gap < 0:
            raise ConfigError(f"tile_gap {tile_gap!r}: a whole number of windows >= 0 (0: neighbours may be picked together)")
        tiles, counts = tile_pool(pool_ids, images, tile, *run.raster_options())
        result.info["tiles"] = {"side": int(tile), "gap": int(tile_gap), **counts}
        if not tiles:
            raise DatasetError(pool_source, f"the pool's {counts['windows']} window(s) of {tile} px are all blank or near-duplicates: nothing to suggest")
        pool_ids, images = list(tiles), {**images, **tiles}
    unit_of = _groups(pool_ids, group_by or None)
    units: dict[str, list[str]] = {}
    for i in pool_ids:
        units.setdefault(unit_of[i], []).append(i)
    names = sorted(units)
    what = "cases" if group_by else "windows" if tiles else "images"
    if budget is not None and budget > len(names):
        raise ConfigError(f"budget {budget}: larger than the pool, which holds {len(names)} {what} ({pool_source})")
    unit_cost = {u: len(units[u]) * COST_SECONDS[kind] for u in names} if kind else None
    if seconds is not None:
        total = sum(unit_cost.values())
        if seconds > total:
            raise ConfigError(f"time budget {seconds / 60:g} min: larger than the pool, whose {len(names)} {what} take {total / 60:g} min of "
                              f"{kind} labels; label them all")
        cheapest = min(unit_cost.values())
        if seconds < cheapest:
            raise ConfigError(f"time budget {seconds / 60:g} min buys no {what[:-1]}: the cheapest takes {cheapest / 60:g} min of {kind} labels "
                              f"({COST_SECONDS[kind] / 60:g} min an image)")

    # skipped units: remembered beside the output
    spath = state_path(out) if out is not None else None
    state = _read_state(spath) if spath else {}
    skipped = list(dict.fromkeys(state.get("skipped", [])))
    for s in skip:
        u = s if s in units else unit_of.get(s)
        if u is None:
            raise ConfigError(f"skip {s!r}: not an id of the pool ({pool_source})")
        if u not in skipped:
            skipped.append(u)
    skipped_set = {u for u in skipped if u in units}

    # scores
    if strategy == "hybrid":
        pixel_strategy = uncertainty
    elif strategy in UNCERTAINTIES:
        pixel_strategy = strategy
    else:
        pixel_strategy = None
    weights = None
    if pixel_strategy and pixel_strategy.startswith("balanced"):
        counts = labeled_class_counts(info, lab_ids, run.config.data.weak if run.config else None)
        weights = S.class_weights(counts)
        result.info["class_pixels"] = {c: int(n) for c, n in zip(info.classes, counts)}
        result.info["class_weights"] = {c: round(float(w), 4) for c, w in zip(info.classes, weights)}
    scorer = Scorer(run, pixel_strategy or "entropy", weights=weights, mc_samples=mc_samples, bald_source=bald_source, seed=seed)
    if scorer.source:
        result.info["bald_source"] = scorer.source
    need_features = strategy in ("coreset", "hybrid")
    if need_features and task != "instance" and not hasattr(run.model, "encode"):
        raise ConfigError(f"strategy {strategy}: needs the model's encoder features; {type(run.model).__name__} has no encode()")
    img_terms: dict[str, dict] = {}
    feats: dict[str, np.ndarray] = {}
    todo = pool_ids if (pixel_strategy or need_features) else []
    with progress_bar(f"scoring ({strategy})", len(todo) + (len(lab_ids) if need_features else 0), enabled=progress) as adv:
        for sid in todo:
            if pixel_strategy:
                _, terms, _ = scorer.pixel_maps(sid, images[sid])
                img_terms[sid] = {k: S.image_score(v) for k, v in terms.items()}
            if need_features:
                feats[sid] = scorer.features(images[sid])
            adv()
        centers = None
        if need_features:
            lab_feats = {}
            for sid in lab_ids:
                if sid not in images:
                    raise DatasetError(root / "images", f"labeled id {sid} has no image")
                lab_feats[sid] = scorer.features(images[sid])
                adv()
            lab_units = _groups(lab_ids, group_by, strict=False)  # labeled ids outside the pattern: each its own unit
            by_unit: dict[str, list] = {}
            for sid, u in lab_units.items():
                by_unit.setdefault(u, []).append(lab_feats[sid])
            centers = np.stack([np.mean(v, 0) for v in by_unit.values()]) if by_unit else None

    # unit scores and terms
    term_names = list(next(iter(img_terms.values())).keys()) if img_terms else []
    unit_terms = {u: {t: S.aggregate([img_terms[i][t] for i in units[u]], aggregate) for t in term_names} for u in names}
    unit_feat = {u: np.mean([feats[i] for i in units[u]], 0) for u in names} if need_features else {}

    rng_scores = None
    if strategy == "random":
        rng_scores = dict(zip(names, np.random.default_rng(seed).random(len(names)).tolist()))

    def rank(subset: list[str], count_hint: int) -> tuple[list[str], dict]:
        """(order, extra per-unit columns) of ``subset`` under the strategy."""
        extra: dict[str, dict] = {u: {} for u in subset}
        if not subset:
            return [], extra
        if strategy == "random":
            sc = [rng_scores[u] for u in subset]
            order = [subset[k] for k in S.order_by_score(sc, subset)]
            for u in subset:
                extra[u]["score"] = rng_scores[u]
            return order, extra
        if strategy == "coreset":
            idx, dist = S.k_center_greedy(np.stack([unit_feat[u] for u in subset]), centers)
            order = [subset[k] for k in idx]
            for u, d in zip(order, dist):
                extra[u].update(score=d, distance=d)
            return order, extra
        unc = [unit_terms[u][term_names[0]] for u in subset]
        if strategy == "hybrid":
            m = S.candidate_count(max(1, count_hint), candidates, len(subset))
            idx, dist = S.hybrid_order(unc, np.stack([unit_feat[u] for u in subset]), subset, centers, m)
            order = [subset[k] for k in idx]
            for u, d in zip(order, dist):
                extra[u].update(score=unit_terms[u][term_names[0]], candidate=int(d is not None), distance=d)
            return order, extra
        order = [subset[k] for k in S.order_by_score(unc, subset)]
        for u in subset:
            extra[u]["score"] = unit_terms[u][term_names[0]]
        return order, extra

    fresh = [u for u in names if u not in skipped_set]
    if budget is not None:
        hint = budget
    else:  # how many units the time buys, taking the cheapest first (an upper bound for hybrid's candidates)
        hint, acc = 0, 0.0
        for c in sorted(unit_cost.values()):
            if acc + c > seconds:
                break
            acc, hint = acc + c, hint + 1
    order_a, extra_a = rank(fresh, hint)
    order_b, extra_b = rank([u for u in names if u in skipped_set], hint)
    moved: set[str] = set()
    if tiles:  # spatial diversity: neighbours of a window ranked ahead go behind the rest
        order_a, moved_a = spread(order_a, tiles, int(tile_gap), int(tile))
        order_b, moved_b = spread(order_b, tiles, int(tile_gap), int(tile))
        moved = moved_a | moved_b
    queue = order_a + order_b
    extra = {**extra_a, **extra_b}

    # the budget takes units in queue order
    picks, spent = [], 0.0
    for u in queue:
        if budget is not None:
            if len(picks) == budget:
                break
            picks.append(u)
        else:
            if spent + unit_cost[u] <= seconds + 1e-9:
                picks.append(u)
                spent += unit_cost[u]
    picked = set(picks)
    result.picks, result.queue = picks, queue
    result.images = [i for u in picks for i in sorted(units[u])]
    result.info.update({"budget": budget, "cost": kind, "budget_minutes": None if seconds is None else seconds / 60,
                        "spent_minutes": None if kind is None else sum(unit_cost[u] for u in picks) / 60,
                        "group_by": group_by or None, "aggregate": aggregate if group_by else None, "units": len(names), "skipped": sorted(skipped_set)})
    if strategy == "hybrid":
        result.info["uncertainty"] = uncertainty

    for r, u in enumerate(queue, start=1):
        row = {"rank": r, "id": u, "picked": int(u in picked), "skipped": int(u in skipped_set)}
        if group_by:
            row["images"] = len(units[u])
            if term_names:
                row["top_image"] = max(units[u], key=lambda i: (img_terms[i][term_names[0]], i))
        if tiles:
            t = tiles[u]
            row.update(image=t.image, x=t.x, y=t.y, w=t.w, h=t.h, near_pick=int(u in moved))
        if kind:
            row["minutes"] = unit_cost[u] / 60
        row["score"] = extra[u].get("score")
        for k, v in extra[u].items():
            if k != "score":
                row[k] = v
        for t in term_names:
            if t not in row:
                row[t] = unit_terms[u][t]
        result.rows.append(row)
    if group_by:
        for r in result.rows:
            for i in sorted(units[r["id"]]):
                result.image_rows.append({"id": i, "case": r["id"], "case_rank": r["rank"], "picked": r["picked"], **img_terms.get(i, {})})
    picked_what = f"{len(picks)} {what}" + (f" ({len(result.images)} images)" if group_by else "")
    how = {"bald": f" (mutual information over {'MC dropout' if scorer.source == 'dropout' else 'flipped views'})",
           "hybrid": f" ({uncertainty}, then k-center)"}.get(strategy, "")
    result.message = (f"{picked_what} to label next by {strategy}{how}" + (f", {result.info['spent_minutes']:g} of {seconds / 60:g} min of {kind} labels" if seconds else "")
                      + (f"; {len(skipped_set)} skipped at the end of the queue" if skipped_set else ""))
    if out is not None:
        result.files = _write(result, Path(out), run, info, images, units, scorer, spath, state, skipped, heatmaps, progress)
    return result


# ----------------------------------------------------------------------------- outputs
def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _csv_text(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in cols})
    return buf.getvalue()


def _write(result: Suggestion, out: Path, run, info, images, units, scorer, spath, state, skipped, heatmaps, progress) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {"picks": atomic_write_text(out, "".join(f"{u}\n" for u in result.picks))}
    base = out.with_name(out.stem)
    files["csv"] = atomic_write_text(Path(f"{base}.csv"), _csv_text(result.rows))
    if result.info.get("group_by"):
        files["images"] = atomic_write_text(Path(f"{base}.images.txt"), "".join(f"{i}\n" for i in result.images))
        files["images_csv"] = atomic_write_text(Path(f"{base}.images.csv"), _csv_text(result.image_rows))
    if heatmaps and result.picks and getattr(run, "task", "semantic") != "instance":  # the maps read class probabilities
        from .plots import write_explanations

        files.update(write_explanations(result, base, run, info, images, units, scorer, limit=HEATMAP_LIMIT, rows=OVERVIEW_ROWS, progress=progress))
    state = {**state, "skipped": skipped, "strategy": result.strategy, "picks": result.picks,
             "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": str(run.run_dir) if run.run_dir else None,
             "pool": result.info.get("pool")}
    files["state"] = atomic_write_json(spath, state)
    return {k: str(v) for k, v in files.items()}
