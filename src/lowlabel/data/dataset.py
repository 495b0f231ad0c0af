"""The folder dataset format: reading, checking and serving samples.

Layout (see ``../shared/datasets/README.md``)::

    <root>/dataset.json          name, task, classes, palette, ignore_index, ...
    <root>/images/<id>.<ext>     any extension PIL reads; grey images become 3 channels
    <root>/masks/<id>.png        8-bit class index per pixel, 255 = ignore
    <root>/instances/<id>.png    16-bit instance id per pixel, 0 = background
    <root>/scribbles/<id>.png    class index on scribbled pixels, 255 elsewhere
    <root>/splits/<name>.txt     one id per line

A *sample* is a plain dict: ``image`` float32[3,H,W] in [0, 1], ``mask`` int64[H,W]
(``IGNORE_INDEX`` where unknown), ``id`` str, and optionally ``instances`` int64[H,W] and ``gt``
(an unlabeled image's dense mask, for diagnostics only). Unlabeled samples have no ``mask``.
``mask`` is the training target and the only label a loss reads: with weak labels
(``weak="scribbles"``) it *is* the weak label map (255 where nothing is annotated), and the dense
mask of that image is not read at all, so weak training works with the dense masks deleted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError  # noqa: F401  (re-exported: the data layer's error)

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff")  # label maps: PNG, or a label raster (GeoTIFF) from a GIS


def label_path(folder: str | os.PathLike, sid: str) -> Path:
    """The label map of ``sid`` in ``folder``: ``<id>.png``, or ``<id>.tif`` / ``<id>.tiff`` (a
    label GeoTIFF as a GIS exports it); the PNG name when there is none (for messages)."""
    folder = Path(folder)
    for ext in LABEL_EXTENSIONS:
        if (folder / f"{sid}{ext}").is_file():
            return folder / f"{sid}{ext}"
    return folder / f"{sid}.png"


def label_files(folder: str | os.PathLike) -> list[Path]:
    """Every label map in ``folder`` (PNG and GeoTIFF), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in LABEL_EXTENSIONS) if Path(folder).is_dir() else []


def check_label_grid(label: str | os.PathLike, image: str | os.PathLike) -> None:
    """A label GeoTIFF must lie on its image's grid: where both are georeferenced, the same CRS
    and transform (pixel (i, j) of the one is pixel (i, j) of the other); the size is checked
    where the pixels are read. PNG label maps carry no grid and pass."""
    from .raster import RASTER_EXTENSIONS, have_rasterio

    label, image = Path(label), Path(image)
    if label.suffix.lower() not in (".tif", ".tiff") or image.suffix.lower() not in RASTER_EXTENSIONS or not have_rasterio():
        return
    import rasterio

    with rasterio.open(label) as lab, rasterio.open(image) as img:
        if lab.crs is None or img.crs is None:
            return
        if lab.crs != img.crs:
            raise DatasetError(label, f"CRS {lab.crs} differs from its image {image.name}'s ({img.crs}): reproject the labels onto the image's grid "
                                      f"(e.g. gdalwarp -t_srs, -tr, -te of the image)")
        if not lab.transform.almost_equals(img.transform):
            raise DatasetError(label, f"transform {tuple(round(v, 6) for v in lab.transform[:6])} differs from its image {image.name}'s "
                                      f"{tuple(round(v, 6) for v in img.transform[:6])}: the label raster is not on the image's pixel grid")
TASKS = ("semantic", "instance", "change")

# Large aerial mosaics exceed PIL's decompression-bomb guard (~89 MP); lowlabel reads them on
# purpose. Set lazily (not at import) by the readers below.
_MAX_PIXELS = 2**34




@dataclass(frozen=True)
class DatasetInfo:
    """The parsed ``dataset.json`` of a folder dataset."""

    root: Path
    name: str
    task: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    weak_labels: dict = field(default_factory=dict)
    weak_confidence: dict = field(default_factory=dict)  # weak label name -> folder of 0-255 confidence PNGs
    source: str = ""
    license: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def load(cls, root: str | os.PathLike) -> "DatasetInfo":
        root = Path(root)
        path = root / "dataset.json"
        if not root.is_dir():
            raise DatasetError(root, "dataset folder does not exist")
        if not path.is_file():
            raise DatasetError(path, "missing: every folder dataset needs a dataset.json")
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(path, f"does not parse as JSON ({err})") from None
        if not isinstance(meta, dict):
            raise DatasetError(path, "must hold a JSON object")
        classes = meta.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise DatasetError(path, "lacks 'classes': a non-empty list of class names")
        task = meta.get("task", "semantic")
        if task not in TASKS:
            raise DatasetError(path, f"unknown task {task!r}; expected one of {TASKS}")
        ignore = int(meta.get("ignore_index", IGNORE_INDEX))
        if ignore != IGNORE_INDEX:
            raise DatasetError(path, f"ignore_index must be {IGNORE_INDEX}, got {ignore}")
        if task == "semantic" and len(classes) >= IGNORE_INDEX:
            raise DatasetError(path, f"{len(classes)} classes do not fit 8-bit masks with ignore {IGNORE_INDEX}")
        palette = meta.get("palette") or default_palette(len(classes))
        if len(palette) < len(classes) or any(len(c) != 3 for c in palette):
            raise DatasetError(path, "'palette' needs one [r, g, b] per class")
        return cls(
            root=root,
            name=str(meta.get("name", root.name)),
            task=task,
            classes=tuple(classes),
            palette=tuple(tuple(int(v) for v in c) for c in palette[: len(classes)]),
            ignore_index=ignore,
            weak_labels=dict(meta.get("weak_labels") or {}),
            weak_confidence=dict(meta.get("weak_confidence") or {}),
            source=str(meta.get("source", "")),
            license=str(meta.get("license", "")),
        )


def default_palette(n: int) -> list[list[int]]:
    """A deterministic, well-separated palette (golden-ratio hues) for datasets without one."""
    import colorsys

    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
        out.append([int(r * 255), int(g * 255), int(b * 255)])
    return out


def _open(path: Path) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    try:
        img = Image.open(path)
        img.load()  # forces decoding: truncated files fail here, not later in a worker
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(path, f"unreadable or truncated image ({err})") from None
    return img


def check_image_file(path: str | os.PathLike) -> None:
    """Refuse (``DatasetError``) an image file that is empty, not an image or visibly damaged,
    without decoding its pixels: PIL's ``verify`` reads the file's structure (PNG chunk CRCs,
    so a truncated PNG fails). Commands that write one output per input run it over all inputs
    first, so a bad file found late does not leave half the outputs written."""
    path = Path(path)
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    if path.is_file() and path.stat().st_size == 0:
        raise DatasetError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(path, f"unreadable or truncated image ({err})") from None


def read_image(path: str | os.PathLike, bands: Sequence[int] | None = None, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """An image as uint8 [H, W, 3]; grey and palette images are expanded to RGB. With ``bands``
    (1-based), a raster read by rasterio: those bands in that order (uint8 [H, W, len(bands)];
    one band as three equal channels), non-uint8 data scaled from ``value_range`` (default: the
    image's 2-98 percentiles) to 0..255 (:class:`lowlabel.data.raster.RasterReader`)."""
    if bands is not None:
        from .raster import RasterReader, have_rasterio

        if not have_rasterio():
            raise ImportError("data.bands reads rasters with rasterio: pip install 'lowlabel[geo]'")
        r = RasterReader(path, bands, value_range)
        try:
            return r.read(0, 0, r.height, r.width)
        finally:
            r.close()
    img = _open(Path(path))
    if img.mode in ("I;16", "I;16B", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] to look at: the first three channels of a multi-band image (the RGB bands
    by the ``data.bands`` convention), a grey image's band repeated."""
    if image.ndim == 2:
        image = image[..., None]
    return image[..., :3] if image.shape[2] >= 3 else np.repeat(image[..., :1], 3, axis=2)


def _windowed(path: Path) -> bool:
    """Whether a window of this image can be read without decoding the rest (a TIFF, with
    rasterio installed)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    from .raster import have_rasterio

    return have_rasterio()


def read_label_window(path: str | os.PathLike, window: tuple[int, int, int, int], *, sixteen_bit: bool = False, size: tuple[int, int] | None = None) -> np.ndarray:
    """The (y0, x0, h, w) window of a label map. GDAL (rasterio) decodes a PNG row by row and
    keeps only the window's rows, so memory stays a window's; without rasterio the map is read
    whole and cropped. ``size``: the (height, width) the map must have (its image's)."""
    from .raster import have_rasterio

    y0, x0, h, w = window
    if not have_rasterio():
        arr = read_label(path, sixteen_bit=sixteen_bit)
        if size is not None and arr.shape != tuple(size):
            raise DatasetError(path, f"size {arr.shape[1]}x{arr.shape[0]} does not match its image ({size[1]}x{size[0]})")
        return arr[y0:y0 + h, x0:x0 + w]
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.windows import Window

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                if ds.count != 1:
                    raise DatasetError(path, f"label maps must be single-channel index images, got {ds.count} bands")
                if size is not None and (ds.height, ds.width) != tuple(size):
                    raise DatasetError(path, f"size {ds.width}x{ds.height} does not match its image ({size[1]}x{size[0]})")
                if np.dtype(ds.dtypes[0]).kind not in "ui":
                    raise DatasetError(path, f"label maps hold integer class ids, got {ds.dtypes[0]}")
                win = Window(x0, y0, min(w, ds.width - x0), min(h, ds.height - y0))
                arr = ds.read(1, window=win)
                if not sixteen_bit and arr.dtype != np.uint8 and arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise DatasetError(path, "8-bit label map holds values outside 0..255")
    except RasterioError as err:
        if not Path(path).exists():
            raise DatasetError(path, "file not found") from None
        raise DatasetError(path, f"unreadable or truncated label map ({str(err).splitlines()[0][:160]})") from None
    return arr if sixteen_bit else arr.astype(np.uint8, copy=False)


def read_label(path: str | os.PathLike, *, sixteen_bit: bool = False) -> np.ndarray:
    """A label map (mask, scribble or instance ids) as an integer array [H, W]: a PNG, or a
    single-band integer GeoTIFF (read by rasterio when it is installed)."""
    if Path(path).suffix.lower() in (".tif", ".tiff") and _windowed(Path(path)):
        return read_label_window(path, (0, 0, 1 << 31, 1 << 31), sixteen_bit=sixteen_bit)
    img = _open(Path(path))
    if img.mode in ("RGB", "RGBA"):
        raise DatasetError(path, f"label maps must be single-channel index images, got mode {img.mode}")
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise DatasetError(path, f"label maps must be 2-D, got shape {arr.shape}")
    if not sixteen_bit and arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(path, "8-bit label map holds values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr


def write_label(path: str | os.PathLike, labels: np.ndarray, palette: Sequence[Sequence[int]] | None = None, *, sixteen_bit: bool = False) -> None:
    """Write a label map as PNG, atomically. With a palette the PNG shows colours but keeps indices.
    ``sixteen_bit``: always a 16-bit PNG (instance id maps), whatever the largest value."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(labels)
    if sixteen_bit:
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{path}: a 16-bit label map holds values in 0..65535")
        arr = arr.astype(np.uint16)
    elif arr.dtype != np.uint8:
        arr = arr.astype(np.uint16 if arr.max(initial=0) > 255 else np.uint8)
    img = Image.fromarray(arr)
    if palette is not None and arr.dtype == np.uint8:
        flat = [v for c in palette for v in c]
        img.putpalette(flat + [0] * (768 - len(flat)))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def index_images(root: str | os.PathLike, folder: str = "images") -> dict[str, Path]:
    """Map id -> image path for every readable extension in ``root/folder``."""
    d = Path(root) / folder
    if not d.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids of a split file: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "split file not found")
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids


class FolderDataset(torch.utils.data.Dataset):
    """Samples of a folder dataset for a list of ids.

    Args:
        root: the dataset folder.
        ids: sample ids, or the name of a split file in ``splits/`` (e.g. ``"train"``).
        labeled: read ``masks/`` (and ``instances/`` for instance datasets). Unlabeled samples
            need no mask file at all.
        weak: read the labeled images' ``mask`` from this weak label folder (``"scribbles"`` or a
            name in ``dataset.json``'s ``weak_labels``) instead of ``masks/``, which is then
            never read for them.
        confidence: with ``weak`` labels that have confidence maps (``dataset.json``'s
            ``weak_confidence``, written by ``refine``): ``"weight"`` adds ``sample["weight"]``
            (0..255, a per-pixel loss weight), ``"ignore"`` sets pixels whose confidence is below
            ``min_confidence`` to 255.
        bands, value_range: read images as rasters (see :func:`read_image`).
        coords: add ``src_y`` / ``src_x``, each pixel's row and column, which the augmentations
            move with the pixels (a method maps per-image maps of the original frame with them).
        window: read each sample through a random square window of this side (clipped to the
            image; drawn from ``(seed, epoch, index)``) instead of decoding the image whole, before
            ``transform``. TIFFs are read by rasterio (when installed) and label maps by GDAL, one
            window each, so a gigapixel mosaic costs a window's memory; other formats are decoded
            whole and cropped. ``src_y`` / ``src_x`` stay in the whole image's frame.
        diagnostic_gt: for unlabeled and weakly labeled samples, load the dense mask (when the
            file exists) into ``sample["gt"]`` — used only to *measure* pseudo-label (and SAM-label)
            accuracy, never in a loss.
        transform: called on the sample dict; receives ``(sample, rng)`` when it accepts two
            arguments, with ``rng`` a ``numpy.random.Generator`` seeded from
            ``(seed, epoch, index)`` so augmentation is reproducible whatever the worker count.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str] | str,
        *,
        labeled: bool = True,
        weak: str | None = None,
        transform: Callable | None = None,
        seed: int = 0,
        info: DatasetInfo | None = None,
        diagnostic_gt: bool = False,
        confidence: str = "none",
        min_confidence: float = 0.5,
        bands: Sequence[int] | None = None,
        value_range: tuple[float, float] | None = None,
        coords: bool = False,
        window: int | None = None,
    ):
        self.info = info or DatasetInfo.load(root)
        self.root = Path(root)
        if isinstance(ids, str):
            ids = read_ids(self.root / "splits" / f"{ids}.txt")
        self.ids = list(ids)
        self.labeled = labeled
        self.weak = weak
        if weak is not None and self.info.task != "semantic":
            raise DatasetError(self.root, f"weak labels train semantic segmentation; this dataset's task is {self.info.task!r}")
        self.confidence, self.min_confidence = confidence, min_confidence
        self.bands, self.value_range = bands, value_range
        self.coords = coords
        self.window = window
        self._ranges: dict[Path, tuple[float, float] | None] = {}  # a raster's value range, computed once
        self._sizes: dict[str, tuple[int, int]] = {}  # image sizes, read once (window reads)
        self._on_grid: set[Path] = set()  # label files whose grid matches their image's (checked once)
        self.confidence_folder = None
        if confidence != "none" and labeled:
            folder = self.info.weak_confidence.get(weak) if weak else None
            if folder is None:
                raise DatasetError(self.root / "dataset.json", f"data.weak_confidence={confidence!r} needs weak labels with confidence maps "
                                   f"(weak_confidence in dataset.json, written by `lowlabel refine`); data.weak is {weak!r}")
            self.confidence_folder = self.root / str(folder).rstrip("/")
        self.diagnostic_gt = diagnostic_gt and (not labeled or weak is not None) and self.info.task == "semantic"
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._images = index_images(self.root)
        missing = [i for i in self.ids if i not in self._images]
        if missing:
            raise DatasetError(
                self.root / "images",
                f"{len(missing)} id(s) have no image, e.g. {', '.join(missing[:5])}",
            )

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def image_path(self, sample_id: str) -> Path:
        return self._images[sample_id]

    def weak_folder(self) -> str | None:
        if self.weak is None:
            return None
        return str(self.info.weak_labels.get(self.weak, self.weak)).rstrip("/")

    def label_file(self, sid: str) -> tuple[str, Path, bool]:
        """(sample key, file, 16-bit) of a labeled image's training target: the weak label map
        with ``weak``, else the mask (or the instance map of an instance dataset)."""
        if self.weak_folder():
            return ("mask", label_path(self.root / self.weak_folder(), sid), False)
        if self.info.task == "instance":
            return ("instances", label_path(self.root / "instances", sid), True)
        return ("mask", label_path(self.root / "masks", sid), False)

    def image_size(self, sid: str) -> tuple[int, int]:
        """(height, width) of an image, without decoding its pixels (read once per image)."""
        if sid in self._sizes:
            return self._sizes[sid]
        path = self._images[sid]
        if _windowed(path):
            import rasterio

            with rasterio.open(path) as ds:
                self._sizes[sid] = ds.height, ds.width
                return self._sizes[sid]
        Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
        try:
            with Image.open(path) as img:
                self._sizes[sid] = img.height, img.width
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetError(path, f"unreadable image ({err})") from None
        return self._sizes[sid]

    def _read_image(self, path: Path, window: tuple[int, int, int, int] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(image, valid): ``valid`` is False on a raster's nodata pixels (None: all valid)."""
        if not (_windowed(path) and (window is not None or self.bands is not None)):
            img = read_image(path, self.bands, self.value_range)
            return (img if window is None else img[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]), None
        from .raster import RasterReader

        r = RasterReader(path, self.bands, self.value_range or self._ranges.get(path))
        try:
            self._ranges[path] = r.value_range
            y0, x0, h, w = window or (0, 0, r.height, r.width)
            return r.read(y0, x0, h, w), (r.valid(y0, x0, h, w) if r.has_nodata else None)
        finally:
            r.close()

    def load(self, index: int, window: tuple[int, int, int, int] | None = None) -> dict:
        """The untransformed sample: uint8 image [H,W,3] and integer label maps [H,W] as numpy;
        with ``window`` = (y0, x0, h, w), that window of each."""
        sid = self.ids[index]
        ipath = self._images[sid]
        sample: dict = {"id": sid}
        sample["image"], valid = self._read_image(ipath, window)
        h, w = sample["image"].shape[:2]
        full = None if window is None else self.image_size(sid)
        labels: list[tuple[str, Path, bool]] = []
        if self.labeled:
            labels.append(self.label_file(sid))
        gt_path = label_path(self.root / "masks", sid) if self.diagnostic_gt else None
        if gt_path is not None and gt_path.exists():
            labels.append(("gt", gt_path, False))
        for key, path, sixteen in labels:
            if path not in self._on_grid:
                check_label_grid(path, ipath)
                self._on_grid.add(path)
            arr = read_label(path, sixteen_bit=sixteen) if window is None else read_label_window(path, window, sixteen_bit=sixteen, size=full)
            if arr.shape != (h, w):
                raise DatasetError(path, f"size {arr.shape[1]}x{arr.shape[0]} does not match image {ipath.name} ({w}x{h})")
            if not sixteen:
                check_class_range(arr, self.info.num_classes, path)
            if valid is not None and not sixteen:
                arr = np.where(valid, arr, IGNORE_INDEX).astype(arr.dtype)  # nodata pixels carry no label
            sample[key] = arr
        if self.confidence_folder is not None:
            cpath = self.confidence_folder / f"{sid}.png"
            conf = read_label(cpath) if window is None else read_label_window(cpath, window, size=full)
            if conf.shape != (h, w):
                raise DatasetError(cpath, f"size {conf.shape[1]}x{conf.shape[0]} does not match image {ipath.name} ({w}x{h})")
            if self.confidence == "weight":
                sample["weight"] = conf
            else:
                sample["mask"] = np.where(conf < round(self.min_confidence * 255), IGNORE_INDEX, sample["mask"]).astype(np.uint8)
        if self.coords:
            sample["src_y"], sample["src_x"] = np.indices((h, w), dtype=np.int32)
            if window is not None:
                sample["src_y"] += window[0]
                sample["src_x"] += window[1]
        if self.info.task == "instance" and "instances" in sample:
            sample["mask"] = (sample["instances"] > 0).astype(np.uint8)
        return sample

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``dataset[i]`` or ``dataset[(i, epoch)]`` (the engine's samplers pass the epoch with
        the index, so augmentation stays seeded correctly inside persistent loader workers)."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        window = None
        if self.window:
            H, W = self.image_size(self.ids[index])
            h, w = min(self.window, H), min(self.window, W)
            wrng = np.random.default_rng([self.seed, epoch, index, 1])  # apart from the transform's stream
            window = (int(wrng.integers(0, H - h + 1)), int(wrng.integers(0, W - w + 1)), h, w)
        sample = to_tensors(self.load(index, window))
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, epoch, index])
            sample = self.transform(sample, rng)
        return sample


def check_class_range(arr: np.ndarray, num_classes: int, path) -> None:
    bad = (arr >= num_classes) & (arr != IGNORE_INDEX)
    if bad.any():
        values = sorted(int(v) for v in np.unique(arr[bad]))[:8]
        raise DatasetError(
            path,
            f"class ids {values} outside 0..{num_classes - 1} (and {IGNORE_INDEX} = ignore) in {int(bad.sum())} pixels",
        )


def to_tensors(sample: dict) -> dict:
    """numpy sample -> torch sample: image float[C,H,W] in [0,1] (C = 3, or the bands of a multi-band raster), label maps int64[H,W]."""
    out = {}
    for k, v in sample.items():
        if k == "image" and isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.array(v, copy=True)).permute(2, 0, 1).float().div_(255.0)
        elif isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(v.astype(np.int64))
        else:
            out[k] = v
    return out


def collate(samples: Iterable[dict]) -> dict:
    """Stack a list of equally sized samples into a batch dict (strings become lists)."""
    samples = list(samples)
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out
