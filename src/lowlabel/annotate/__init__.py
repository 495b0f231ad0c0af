"""``lowlabel annotate``: a local web page to review and correct labels, saved into the dataset.

    from lowlabel.annotate import open_session
    store, assistant, predictions, origin = open_session("mydata", queue="next.txt", segmenter="classical")

:func:`open_session` checks the dataset and builds the pieces; :func:`lowlabel.annotate.app.serve`
runs the page (FastAPI + uvicorn, the ``annotate`` extra). Nothing heavy is imported until used.
See ``docs/annotate.md``.
"""

from __future__ import annotations

import getpass
import os

SEGMENTERS = ("classical", "sam", "mobilesam", "sam2", "none")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def open_session(dataset: str | os.PathLike, *, queue: str | os.PathLike | None = None, run: str | os.PathLike | None = None,
                 segmenter: str = "classical", checkpoint=None, model_type: str | None = None, device: str = "cpu",
                 cache: str | os.PathLike | None = "default", allow_random_weights: bool = False, user: str | None = None):
    """(store, assistant or None, predictions or None, where the queue came from).

    ``queue``: a file of ids (``suggest``'s ``next.txt``; its ``next.images.txt`` when there is
    one); default: the dataset's ``splits/unlabeled.txt``, else the run's, else the train split.
    ``segmenter``: a :mod:`lowlabel.sam` backend, or ``none`` (brush and points only).
    ``cache``: embedding cache folder ("default": ``$LOWLABEL_CACHE/embeddings``; None: none)."""
    from pathlib import Path

    from ..data.validate import require_valid
    from .store import AnnotationStore, default_queue, queue_ids

    if segmenter not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {segmenter!r}; choose from {SEGMENTERS}")
    root = Path(dataset)
    require_valid(root)  # dataset.json, split ids with images (pixels are checked when an image opens)
    if queue is not None:
        ids, where = queue_ids(queue), str(queue)
    else:
        ids, where = default_queue(root, Path(run) if run else None)
    store = AnnotationStore(root, ids, user=user or _user())
    assistant = None
    if segmenter != "none":
        from .assist import Assistant, default_cache_dir

        assistant = Assistant(segmenter, checkpoint=checkpoint, model_type=model_type, device=device,
                              cache=default_cache_dir() if cache == "default" else cache, allow_random_weights=allow_random_weights)
    predictions = None
    if run is not None:
        from .assist import Predictions

        predictions = Predictions(run, device=device, classes=store.info.classes)
    return store, assistant, predictions, where


__all__ = ["SEGMENTERS", "open_session"]
