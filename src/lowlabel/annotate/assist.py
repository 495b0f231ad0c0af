"""The two helpers the page calls on: the promptable segmenter (one of :mod:`lowlabel.sam`'s
backends, its image embeddings read through :class:`lowlabel.sam.cache.EmbeddingCache`) and,
with ``--run``, the run's prediction and uncertainty of each image.

Both hold a few recent results in memory, so the clicks on one image after the first encode cost
one prompt decode each.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import ConfigError


class _Recent:
    """A small least-recently-used dict."""

    def __init__(self, size: int):
        self.size, self.data = size, OrderedDict()

    def get(self, key):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key, value):
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


def default_cache_dir() -> Path:
    """``$LOWLABEL_CACHE/embeddings`` (default ``~/.cache/lowlabel/embeddings``)."""
    return Path(os.environ.get("LOWLABEL_CACHE") or Path.home() / ".cache" / "lowlabel") / "embeddings"


class Assistant:
    """Masks from clicks and boxes on one image at a time.

    Args:
        backend: ``classical``, ``sam``, ``mobilesam`` or ``sam2`` (:func:`lowlabel.sam.build_segmenter`).
        checkpoint, model_type, device, precision: passed to the backend.
        cache: embedding cache folder; None: no disk cache (memory only).
        allow_random_weights: run a neural backend without a checkpoint (its masks are noise).
    """

    def __init__(self, backend: str = "classical", *, checkpoint=None, model_type: str | None = None, device: str = "cpu",
                 precision: str = "auto", cache: str | os.PathLike | None = None, allow_random_weights: bool = False, segmenter=None):
        if segmenter is None:
            from ..sam import build_segmenter

            segmenter = build_segmenter(backend, checkpoint=checkpoint, model_type=model_type, device=device, precision=precision)
        if segmenter.weights_id.startswith("random") and not allow_random_weights:
            raise ConfigError(f"annotate --segmenter {backend}: no checkpoint (--checkpoint or LOWLABEL_SAM_CHECKPOINT), so its weights would be "
                              "random and its masks meaningless; give a checkpoint (`lowlabel weights list`), use --segmenter classical, "
                              "or --allow-random-weights to try the page")
        self.segmenter = segmenter
        from ..sam.cache import EmbeddingCache

        self.cache = EmbeddingCache(cache) if cache else None
        self._recent = _Recent(4)
        self._lock = threading.Lock()  # one encode or decode at a time: the backends are not thread-safe

    @property
    def name(self) -> str:
        return self.segmenter.name

    @property
    def random_weights(self) -> bool:
        return self.segmenter.weights_id.startswith("random")

    def embedding(self, key: str, image: np.ndarray):
        """The image's embedding (memory, then the disk cache, then the encoder); ``key`` names
        the image in memory (its id)."""
        with self._lock:
            hit = self._recent.get(key)
            if hit is not None and hit[0] == image.shape:
                return hit[1]
            emb = self.cache.get_or_embed(image, self.segmenter) if self.cache else self.segmenter.embed(image)
            self._recent.put(key, (image.shape, emb))
            return emb

    def segment(self, key: str, image: np.ndarray, points: list[tuple[float, float, int]], box: list[float] | None) -> tuple[np.ndarray, float, float]:
        """(mask bool [H, W], score, seconds of the decode) for one object: ``points`` (x, y,
        1 positive / 0 negative) in image pixels, ``box`` XYXY or None. One positive click alone
        is ambiguous: the best-scored of the backend's three granularities is taken; with more
        prompts the backend's single mask."""
        from ..sam.base import Prompts

        emb = self.embedding(key, image)
        t0 = time.perf_counter()
        pts = np.array([[p[0], p[1]] for p in points], np.float32).reshape(1, -1, 2) if points else None
        lbl = np.array([[int(p[2]) for p in points]], np.int64) if points else None
        boxes = np.array([box], np.float32) if box is not None else None
        if pts is None and boxes is None:
            h, w = image.shape[:2]
            return np.zeros((h, w), bool), 0.0, 0.0
        multimask = box is None and len(points) == 1
        with self._lock:
            out = self.segmenter.segment(emb, Prompts(points=pts, labels=lbl, boxes=boxes), multimask=multimask)
        k = int(np.argmax(out.scores[0]))
        return np.asarray(out.masks[0, k], bool), float(out.scores[0, k]), time.perf_counter() - t0


class Predictions:
    """A run's predicted label map and uncertainty (pixel entropy / log C, 0..1) per image."""

    def __init__(self, run: str | os.PathLike, *, device: str = "auto", classes: tuple[str, ...] | None = None):
        from ..engine.run import Run

        self.run = Run.load(run, device=device)
        if classes is not None and tuple(self.run.classes) != tuple(classes):
            raise ConfigError(f"--run {run}: its classes {list(self.run.classes)} are not the dataset's {list(classes)}")
        if getattr(self.run, "task", "semantic") != "semantic":
            raise ConfigError(f"--run {run}: an instance run; annotate shows semantic predictions")
        self._recent = _Recent(4)
        self._lock = threading.Lock()

    def get(self, key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(labels uint8 [H, W], uncertainty uint8 [H, W]: 255 = the entropy of a uniform guess)."""
        with self._lock:
            hit = self._recent.get(key)
            if hit is not None:
                return hit
            pred = self.run.predict(path, return_probs=True)
            p = pred.probs.float().clamp_min(1e-12)
            ent = -(p * p.log()).sum(0)
            c = max(self.run.num_classes, 2)
            unc = (ent / math.log(c)).clamp(0, 1).mul(255).round().byte().numpy()
            out = (np.asarray(pred.labels, np.uint8), unc)
            self._recent.put(key, out)
            return out
