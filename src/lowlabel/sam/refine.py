"""Weak labels -> dense labels with a promptable segmenter (SeSAM sec. 3.2, S4M sec. 4.2).

For each class of the weak label map, its mask is split into instances (connected components,
SeSAM eq. 1); K points are sampled in each instance; the segmenter returns three candidate
masks; one is chosen (SeSAM's coverage/compatibility rule by default) and painted with the class.
Points and scribbles are first grown into a coarse mask by prompting with the weak pixels
themselves and keeping the *smallest* candidate (SeSAM sec. 3.2, "Types of weak supervision").
A teacher's probability map [C, H, W] is a weak label too: its argmax where the probability
reaches ``prob_threshold``, with S4M's probability sampler available.

Output: labels uint8 [H, W] (255 where nothing was decided) and confidence float32 [H, W]: 1 on
annotated pixels, the chosen candidate's score on pixels added by the segmenter, 0 elsewhere.
Where two instances claim a pixel, the higher score wins; annotated pixels always keep their
label.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import IGNORE_INDEX, DatasetInfo, label_path, read_ids, read_image, read_label, write_label
from ..data.weak import derive_dataset
from ..errors import ConfigError
from ..eval.metrics import ConfusionMatrix
from ..utils import remove_orphan_temps
from .base import PromptableSegmenter, Prompts, Segments
from .prompts import instances, sample_points, select_mask

WEAK_KINDS = ("coarse", "scribble", "point", "probs")
REFINED = "refined"  # the weak label name (and folder) of refine's dense labels


@dataclass
class RefineSettings:
    weak_kind: str = "coarse"  # coarse | scribble | point | probs
    sampler: str = "skeleton"  # see lowlabel.sam.prompts.SAMPLERS
    selection: str = "coverage"  # see lowlabel.sam.prompts.SELECTIONS
    points: int = 5  # K (SeSAM sec. 4)
    tau1: float = 0.3  # coverage threshold r (SeSAM)
    tau2: float = 0.7  # compatibility threshold p (SeSAM)
    min_instance: int = 1
    prob_threshold: float = 0.9

    def __post_init__(self):
        if self.weak_kind not in WEAK_KINDS:
            raise ValueError(f"unknown weak label kind {self.weak_kind!r}; choose from {WEAK_KINDS}")


def segment_point_sets(segmenter: PromptableSegmenter, emb, point_sets: list[np.ndarray], chunk: int = 32, multimask: bool = True):
    """``segmenter.segment`` over the point sets (positive points, one set per prompt) in chunks
    of ``chunk``: SAM's decoder copies the image embedding once per prompt (4 MB each for SAM),
    so thousands of instances at once would need tens of GB."""
    parts = [segmenter.segment(emb, _prompt_batch(point_sets[i : i + chunk]), multimask=multimask) for i in range(0, len(point_sets), chunk)]
    if len(parts) == 1:
        return parts[0]
    low = [p.low_res_logits for p in parts]
    return Segments(np.concatenate([p.masks for p in parts]), np.concatenate([p.scores for p in parts]),
                    torch.cat(low) if all(x is not None for x in low) else None)


def _prompt_batch(point_sets: list[np.ndarray]) -> Prompts:
    k = max(len(p) for p in point_sets)
    padded = [np.concatenate([p, np.repeat(p[-1:], k - len(p), 0)]) for p in point_sets]  # repeat the last point
    return Prompts(points=np.stack(padded), labels=np.ones((len(padded), k), np.int64))


def _paint(labels, conf, masks: list[np.ndarray], classes: list[int], scores: list[float]) -> None:
    for m, c, s in zip(masks, classes, scores):
        win = m & (s > conf)
        labels[win] = c
        conf[win] = s


def refine_image(image: np.ndarray, weak: np.ndarray | None, num_classes: int, segmenter: PromptableSegmenter, settings: RefineSettings, rng: np.random.Generator, *, probs: np.ndarray | None = None, embedding=None,
                 override: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidence) of one image from its weak label map (see the module docstring).
    ``override``: the pixels whose weak label wins over the segmenter's (default: every
    annotated pixel of ``weak``; SeSAM prompts from weak labels extended by confident teacher
    pixels but lets only the original weak labels override SAM)."""
    st = settings
    emb = embedding if embedding is not None else segmenter.embed(image)
    if st.weak_kind == "probs":
        if probs is None:
            raise ValueError("weak_kind 'probs' needs a probability map [C, H, W]")
        weak = np.where(probs.max(0) >= st.prob_threshold, probs.argmax(0), IGNORE_INDEX).astype(np.uint8)
    annotated = weak != IGNORE_INDEX
    coarse = weak.copy()
    if st.weak_kind in ("point", "scribble"):  # step 1: grow sparse labels with the smallest candidate
        sets, cls, weaks = [], [], []
        for c in range(num_classes):
            for inst in instances(weak == c):
                if override is not None and not (inst & override).any():
                    continue  # only weak labels are sparse: pixels added to them (a teacher's) need no growing
                pts = sample_points(inst, st.points, "random", rng)
                sets.append(pts)
                cls.append(c)
                weaks.append(inst)
        if sets:
            seg = segment_point_sets(segmenter, emb, sets)
            grown, gconf = coarse.copy(), annotated.astype(np.float32)
            chosen = [seg.masks[i, select_mask(seg.masks[i], seg.scores[i], "smallest", rng)] for i in range(len(sets))]
            _paint(grown, gconf, chosen, cls, [0.5] * len(chosen))  # first come, first served
            grown[annotated] = weak[annotated]
            coarse = grown
    labels = np.full(weak.shape, IGNORE_INDEX, np.uint8)
    conf = np.zeros(weak.shape, np.float32)
    sets, cls, weaks = [], [], []
    for c in range(num_classes):
        for inst in instances(coarse == c, st.min_instance):
            pts = sample_points(inst, st.points, st.sampler, rng, prob=None if probs is None else probs[c])
            if len(pts):
                sets.append(pts)
                cls.append(c)
                weaks.append(inst)
    if sets:
        seg = segment_point_sets(segmenter, emb, sets)
        chosen, scores = [], []
        for i in range(len(sets)):
            j = select_mask(seg.masks[i], seg.scores[i], st.selection, rng, weak=weaks[i], tau1=st.tau1, tau2=st.tau2)
            chosen.append(seg.masks[i, j])
            scores.append(float(np.clip(seg.scores[i, j], 1e-3, 0.999)))
        _paint(labels, conf, chosen, cls, scores)
    keep = annotated if override is None else override
    labels[keep] = weak[keep]
    conf[keep] = 1.0
    return labels, conf


class LabelQuality:
    """Quality of a (partial) label map against the truth: ``coverage`` (share of the truth's
    labeled pixels that got a label), ``precision`` (accuracy on those), and ``miou`` with
    unlabeled pixels counted as wrong (an extra "unlabeled" prediction), so a sparse label map
    cannot score well by being sparse."""

    def __init__(self, num_classes: int):
        self.c = num_classes
        self.cm = ConfusionMatrix(num_classes + 1)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        p = np.where(pred == IGNORE_INDEX, self.c, pred)
        self.cm.update(p, gt)

    def summary(self) -> dict:
        m = self.cm.matrix.double()
        total = float(m.sum())
        labeled = float(m[:, : self.c].sum())
        iou = self.cm.iou()[: self.c]
        valid = ~np.isnan(iou)
        return {
            "coverage": labeled / total if total else None,
            "precision": float(m[:, : self.c].diag().sum()) / labeled if labeled else None,
            "miou": float(iou[valid].mean()) if valid.any() else None,
        }


def refine_dataset(
    root: str | os.PathLike, out: str | os.PathLike, segmenter: PromptableSegmenter, settings: RefineSettings, *,
    weak_folder: str, split: str = "train", seed: int = 0, cache=None, progress=None, limit: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Refine the weak labels in ``root/weak_folder`` for the ids of ``split`` into a folder
    dataset ``out`` that ``fit`` reads (``data.root=out``, ``data.weak=refined``): the dense labels
    in ``out/refined/<id>.png`` (255 where nothing was decided), their confidence in
    ``out/confidence/<id>.png`` (0-255; ``data.weak_confidence`` uses it as a per-pixel weight or
    an ignore threshold), ``out/manifest.json``, and images, splits and the other images' masks
    linked from ``root`` (:func:`lowlabel.data.weak.derive_dataset`: no dense mask of ``split``).
    Resumable: images whose labels and confidence exist are skipped. The manifest records the
    settings; a rerun into the same ``out`` with other settings is refused (``ConfigError``)
    unless ``overwrite``, which deletes the earlier images first. Returns the manifest."""
    root, out = Path(root), Path(out)
    info = DatasetInfo.load(root)
    ids = read_ids(root / "splits" / f"{split}.txt")[:limit]
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    recipe = {
        "backend": segmenter.name, "weights": segmenter.weights_id, "transform": segmenter.transform_id,
        "settings": asdict(settings), "seed": seed, "dataset": str(root), "weak_folder": weak_folder, "split": split,
    }
    differ = [k for k in recipe if k in manifest and json.loads(json.dumps(manifest[k])) != json.loads(json.dumps(recipe[k]))]
    if differ and manifest.get("images") and not overwrite:
        shown = ", ".join(f"{k} ({manifest[k]!r} -> {recipe[k]!r})" for k in differ)
        raise ConfigError(f"{out}: refined before with other settings: {shown}; choose another --out, or --overwrite to replace its {len(manifest['images'])} image(s)")
    if differ or overwrite:
        for sid in manifest.get("images", {}):
            for folder in (REFINED, "confidence"):
                (out / folder / f"{sid}.png").unlink(missing_ok=True)
        manifest = {}
    remove_orphan_temps(out, out / REFINED, out / "confidence")
    (out / REFINED).mkdir(parents=True, exist_ok=True)
    (out / "confidence").mkdir(parents=True, exist_ok=True)
    derive_dataset(root, out, read_ids(root / "splits" / f"{split}.txt"), weak={REFINED: f"{REFINED}/"}, confidence={REFINED: "confidence/"},
                   note=f"Dense labels '{REFINED}/' refined by `lowlabel refine` from the weak labels '{weak_folder}/' of split '{split}' (settings in manifest.json); that split's dense masks are left out of masks/.")
    manifest.update(recipe)
    manifest.setdefault("images", {})
    from ..data.dataset import index_images

    images = index_images(root)
    for n, sid in enumerate(ids):
        mfile, cfile = out / REFINED / f"{sid}.png", out / "confidence" / f"{sid}.png"
        if mfile.exists() and cfile.exists() and sid in manifest["images"]:
            if progress:
                progress(n + 1, len(ids))
            continue
        t0 = time.time()
        image = read_image(images[sid])
        weak = read_label(label_path(root / weak_folder, sid))
        emb = cache.get_or_embed(image, segmenter) if cache is not None else segmenter.embed(image)
        t1 = time.time()
        rng = np.random.default_rng([seed, zlib.crc32(sid.encode())])
        labels, conf = refine_image(image, weak, info.num_classes, segmenter, settings, rng, embedding=emb)
        write_label(mfile, labels, info.palette)
        write_label(cfile, (conf * 255).round().astype(np.uint8))
        manifest["images"][sid] = {"embed_seconds": round(t1 - t0, 3), "refine_seconds": round(time.time() - t1, 3)}
        tmp = mpath.with_name(f".manifest.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, mpath)
        if progress:
            progress(n + 1, len(ids))
    return manifest
