"""What ``lowlabel annotate`` reads from and writes into a folder dataset, without any web code.

Every request names an image by its id; :meth:`AnnotationStore.resolve` looks the id up in the
dataset's own index (``images/``, filtered to the queue) and returns the canonical id, so no path
is ever built from request text. Writes go to fixed folders inside the dataset (``masks/``, the
weak-label folder ``annotated/``, ``splits/``), each checked to resolve inside the dataset folder:

- a corrected dense mask: ``masks/<id>.png`` (8-bit class index, 255 = ignore, the dataset's
  palette), written to a temporary file in the same folder and renamed over the old one
  (``os.replace``), so a reader sees the old file or the new one, never a part. The first time an
  existing mask file is replaced, its bytes are kept in ``annotate/replaced/masks/<id>.png``;
- its id, once, in ``splits/corrected.txt`` (``fit`` reads it: ``data.labeled=<that file>``);
- a weak label map (points, scribbles drawn without a segmenter): ``annotated/<id>.png`` in the
  weak-label format (class index on annotated pixels, 255 elsewhere), ``dataset.json``'s
  ``weak_labels`` gaining ``"annotated": "annotated/"``, the id in ``splits/corrected-weak.txt``;
- one entry per save in ``splits/corrected.log.json`` (who, when, what, clicks, strokes, seconds).

Saves are serialised by one lock, so concurrent saves of the same id install complete files in
turn and the last one wins.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.dataset import IGNORE_INDEX, DatasetInfo, index_images, label_path, read_ids, read_image, read_label
from ..errors import DatasetError, LowlabelError

CORRECTED = "corrected"  # splits/corrected.txt: ids whose dense mask was saved here
CORRECTED_WEAK = "corrected-weak"  # splits/corrected-weak.txt: ids whose weak label map was saved here
WEAK_NAME = "annotated"  # dataset.json weak_labels name (and folder) of weak labels drawn here
LOG_NAME = "corrected.log.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class RequestError(LowlabelError):
    """A request the store refuses; ``status`` is the HTTP status the app answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Item:
    id: str
    image: Path


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def default_queue(root: Path, run_dir: Path | None = None) -> tuple[list[str], str]:
    """(ids, where they came from) when no queue file is given: the dataset's
    ``splits/unlabeled.txt``, else the run's ``splits/unlabeled.txt``, else the train split."""
    candidates = [root / "splits" / "unlabeled.txt"]
    if run_dir is not None:
        candidates.append(Path(run_dir) / "splits" / "unlabeled.txt")
    candidates.append(root / "splits" / "train.txt")
    for c in candidates:
        if c.is_file():
            return read_ids(c), str(c)
    raise DatasetError(root / "splits", "no unlabeled.txt or train.txt to take a queue from: give --queue FILE")


def queue_ids(queue: str | os.PathLike) -> list[str]:
    """The ids of a queue file. ``suggest --group-by`` writes case ids to ``next.txt`` and their
    images to ``next.images.txt`` beside it: that file is used when it exists. ``suggest --tile``
    writes windows (``IMAGE@X,Y,W,H``): the page edits whole masks, so each window's image is
    queued once, in the order of its first window."""
    from ..label.tiles import parse_tile_id

    queue = Path(queue)
    images = queue.with_name(queue.stem + ".images.txt")
    ids = read_ids(images if images.is_file() else queue)
    return list(dict.fromkeys((parse_tile_id(i) or (i,))[0] for i in ids))


class AnnotationStore:
    """A folder dataset seen through a queue of ids.

    Args:
        root: the dataset folder (semantic task).
        queue: ids to review, in order; each must have an image in ``images/`` and none may be
            in the validation or test split (a corrected list trains, so it must name training
            images only).
        user: who saves (recorded in the log).
    """

    def __init__(self, root: str | os.PathLike, queue: list[str], *, user: str = "unknown"):
        self.root = Path(root)
        self.info = DatasetInfo.load(self.root)
        if self.info.task != "semantic":
            raise DatasetError(self.root / "dataset.json", f"annotate edits semantic masks; this dataset's task is {self.info.task!r}")
        images = index_images(self.root)
        seen, ids = set(), []
        for i in queue:
            if i not in seen:
                seen.add(i)
                ids.append(i)
        missing = [i for i in ids if i not in images]
        if missing:
            raise DatasetError(self.root / "images", f"{len(missing)} queue id(s) have no image, e.g. {', '.join(missing[:5])}")
        held_out = []
        for split in ("val", "test"):
            f = self.root / "splits" / f"{split}.txt"
            if f.is_file():
                held_out += [i for i in read_ids(f) if i in seen]
        if held_out:
            raise DatasetError(self.root / "splits", f"{len(held_out)} queue id(s) are in the val or test split, e.g. {', '.join(held_out[:5])}: "
                                                     "corrected labels train, so the queue may name training images only")
        if not ids:
            raise DatasetError(self.root, "the queue is empty")
        self.items = {i: Item(i, images[i]) for i in ids}
        self.order = ids
        self.user = user
        self._lock = threading.Lock()
        for folder in (self.root / "masks", self.root / "splits", self.root / WEAK_NAME, self.root / "annotate"):
            if folder.exists() and not _inside(folder, self.root):
                raise DatasetError(folder, "resolves outside the dataset folder (a link?): annotate writes only inside the dataset")

    # -- reading -----------------------------------------------------------------------------
    def resolve(self, sid: str) -> str:
        """The queue's own id for ``sid``; 404 for anything that is not one of them."""
        if not isinstance(sid, str) or sid not in self.items:
            raise RequestError(404, "unknown id")
        return self.items[sid].id

    def image(self, sid: str) -> np.ndarray:
        return read_image(self.items[self.resolve(sid)].image)

    def size(self, sid: str) -> tuple[int, int]:
        """(height, width) without decoding the pixels."""
        with Image.open(self.items[self.resolve(sid)].image) as img:
            return img.height, img.width

    def corrected(self, weak: bool = False) -> list[str]:
        f = self.root / "splits" / f"{CORRECTED_WEAK if weak else CORRECTED}.txt"
        return read_ids(f) if f.is_file() else []

    def label_sources(self, sid: str) -> dict[str, Path]:
        """Existing label maps of an image: ``mask`` (masks/, the corrected one once saved) and
        one per weak-label folder of dataset.json (``weak:<name>``)."""
        sid = self.resolve(sid)
        out = {}
        m = label_path(self.root / "masks", sid)
        if m.is_file():
            out["mask"] = m
        for name, folder in sorted(self.info.weak_labels.items()):
            p = label_path(self.root / str(folder).rstrip("/"), sid)
            if p.is_file():
                out[f"weak:{name}"] = p
        return out

    def read_source(self, sid: str, source: str) -> np.ndarray:
        sources = self.label_sources(sid)
        if source not in sources:
            raise RequestError(404, f"no label source {source!r} for this id")
        arr = read_label(sources[source])
        if arr.shape != self.size(sid):
            raise RequestError(409, f"{sources[source].name}: its size does not match the image")
        return arr

    # -- checking ----------------------------------------------------------------------------
    def decode_label_png(self, sid: str, body: bytes) -> np.ndarray:
        """A posted label map: a PNG (checked by its signature, then by PIL), 8-bit grey or
        palette, of the image's size, holding class ids or 255 only. The size is checked from the
        header before the pixels are decoded."""
        h, w = self.size(sid)
        if not body.startswith(PNG_MAGIC):
            raise RequestError(415, "the body is not a PNG")
        try:
            img = Image.open(io.BytesIO(body), formats=["PNG"])
            if (img.height, img.width) != (h, w):
                raise RequestError(422, f"mask is {img.width}x{img.height}, the image is {w}x{h}")
            if img.mode not in ("L", "P"):
                raise RequestError(422, f"mask PNG mode {img.mode}: give an 8-bit grey or palette PNG of class ids")
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise RequestError(415, f"unreadable PNG ({err})") from None
        arr = np.asarray(img, dtype=np.uint8)
        bad = (arr >= self.info.num_classes) & (arr != IGNORE_INDEX)
        if bad.any():
            values = sorted(int(v) for v in np.unique(arr[bad]))[:8]
            raise RequestError(422, f"class ids {values} outside 0..{self.info.num_classes - 1} (and {IGNORE_INDEX} = unlabeled)")
        return arr

    # -- writing -----------------------------------------------------------------------------
    def _write_png(self, folder: Path, sid: str, labels: np.ndarray) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if not _inside(folder, self.root):
            raise RequestError(500, f"{folder.name}/ resolves outside the dataset folder")
        dest = folder / f"{sid}.png"
        other = [p for p in (folder / f"{sid}.tif", folder / f"{sid}.tiff") if p.exists()]
        if other:
            raise RequestError(409, f"{other[0].name}: this id's labels are a GeoTIFF; annotate writes PNG label maps only")
        if dest.is_file() and not dest.is_symlink():
            keep = self.root / "annotate" / "replaced" / folder.name / f"{sid}.png"
            if not keep.exists():
                keep.parent.mkdir(parents=True, exist_ok=True)
                if not _inside(keep.parent, self.root):
                    raise RequestError(500, "annotate/ resolves outside the dataset folder")
                shutil.copyfile(dest, keep)
        arr = np.ascontiguousarray(labels, dtype=np.uint8)
        img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())  # indices kept, colours from the palette
        flat = [v for c in self.info.palette for v in c]
        img.putpalette(flat + [0] * (768 - len(flat)))
        # a temp name of its own per write (data.dataset.write_label's is per process, which two
        # threads of this server would share)
        tmp = folder / f".{sid}.png.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as fh:
                img.save(fh, format="PNG")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)  # a link (a derived dataset's) is replaced, its target untouched
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _append_id(self, split: str, sid: str) -> Path:
        path = self.root / "splits" / f"{split}.txt"
        ids = read_ids(path) if path.is_file() else []
        if sid not in ids:
            text = path.read_text() if path.is_file() else ""
            if text and not text.endswith("\n"):
                text += "\n"
            self._atomic_text(path, text + f"{sid}\n")
        return path

    def _atomic_text(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not _inside(path.parent, self.root):
            raise RequestError(500, f"{path.parent.name}/ resolves outside the dataset folder")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _register_weak(self) -> None:
        meta_path = self.root / "dataset.json"
        meta = json.loads(meta_path.read_text())
        weak = dict(meta.get("weak_labels") or {})
        if weak.get(WEAK_NAME) != f"{WEAK_NAME}/":
            weak[WEAK_NAME] = f"{WEAK_NAME}/"
            meta["weak_labels"] = weak
            self._atomic_text(meta_path, json.dumps(meta, indent=2) + "\n")
            self.info = DatasetInfo.load(self.root)

    def log(self) -> list[dict]:
        path = self.root / "splits" / LOG_NAME
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text()).get("saves", []))
        except (ValueError, AttributeError):
            raise DatasetError(path, "does not parse as annotate's JSON log") from None

    def save(self, sid: str, labels: np.ndarray, *, weak: bool = False, clicks: int = 0, strokes: int = 0, seconds: float = 0.0,
             segmenter: str | None = None) -> dict:
        """Write a checked label map (see the module's docstring); returns the log entry."""
        sid = self.resolve(sid)
        if labels.shape != self.size(sid):
            raise RequestError(422, "mask size does not match the image")
        with self._lock:
            if weak:
                dest = self._write_png(self.root / WEAK_NAME, sid, labels)
                self._register_weak()
                split = self._append_id(CORRECTED_WEAK, sid)
            else:
                dest = self._write_png(self.root / "masks", sid, labels)
                split = self._append_id(CORRECTED, sid)
            counts = np.bincount(labels.ravel(), minlength=256)
            entry = {
                "id": sid, "kind": "weak" if weak else "mask", "file": str(dest.relative_to(self.root)), "split": str(split.relative_to(self.root)),
                "user": self.user, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "clicks": int(clicks), "strokes": int(strokes),
                "seconds": round(float(seconds), 2), "segmenter": segmenter,
                "labeled_pixels": int(labels.size - counts[IGNORE_INDEX]),
            }
            saves = self.log() + [entry]
            self._atomic_text(self.root / "splits" / LOG_NAME, json.dumps({"saves": saves}, indent=1) + "\n")
        return entry
