"""Windows over large images, lazy window readers, and stitching weights.

Coordinates: a window is ``(y0, x0, h, w)`` in pixels of the full image, rows first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Window starts covering [0, length): step ``stride``, last window aligned to the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Sliding windows of ``tile`` pixels over a ``height`` x ``width`` image.

    ``overlap`` is in pixels (an int) or a fraction of the tile (a float < 1). Windows step by
    ``tile - overlap``; the last row and column of windows are aligned to the image edge (as in
    mmsegmentation), so every pixel is covered and no window leaves the image. An image smaller
    than the tile gets a single window of its own size.
    """

    height: int
    width: int
    tile: int
    overlap: int | float = 0

    def __post_init__(self):
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.tile <= 0:
            raise ValueError(f"tile must be positive, got {self.tile}")
        if not 0 <= self.overlap_px < self.tile:
            raise ValueError(f"overlap {self.overlap} must be in [0, tile={self.tile})")

    @property
    def overlap_px(self) -> int:
        ov = self.overlap
        return int(round(ov * self.tile)) if isinstance(ov, float) and ov < 1 else int(ov)

    @property
    def stride(self) -> int:
        return self.tile - self.overlap_px

    @property
    def row_starts(self) -> list[int]:
        return _starts(self.height, self.tile, self.stride)

    @property
    def col_starts(self) -> list[int]:
        return _starts(self.width, self.tile, self.stride)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        th, tw = min(self.tile, self.height), min(self.tile, self.width)
        for y in self.row_starts:
            for x in self.col_starts:
                yield (y, x, th, tw)

    def rows(self) -> Iterator[tuple[int, list[tuple[int, int, int, int]]]]:
        """Windows grouped by row start, top to bottom."""
        th, tw = min(self.tile, self.height), min(self.tile, self.width)
        for y in self.row_starts:
            yield y, [(y, x, th, tw) for x in self.col_starts]


def window_weights(h: int, w: int, kind: str = "gaussian", sigma_scale: float = 0.125) -> torch.Tensor:
    """Stitching weights [h, w]: ``uniform`` (all ones) or ``gaussian`` (peak at the centre,
    sigma = ``sigma_scale`` * side, floored at 1e-3 so edges still count where only one window
    covers a pixel)."""
    if kind == "uniform":
        return torch.ones(h, w)
    if kind != "gaussian":
        raise ValueError(f"unknown window weighting {kind!r}; use 'uniform' or 'gaussian'")

    def g(n: int) -> torch.Tensor:
        c = (n - 1) / 2
        s = max(n * sigma_scale, 1e-6)
        return torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float32) - c) / s) ** 2)

    wt = g(h)[:, None] * g(w)[None, :]
    return (wt / wt.max()).clamp_min_(1e-3)


class WindowReader(Protocol):
    """Anything that reads windows of a (possibly huge) image: RGB, or the bands of a raster."""

    height: int
    width: int

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """uint8 [h, w, 3] (or [h, w, C] for a multi-band raster)."""


class ArrayReader:
    """Windows of an in-memory (or memory-mapped) [H, W, C] array, as ``channels`` channels: a
    grey array's band repeated, the first ``channels`` of a wider one (RGBA's alpha dropped for
    an RGB network; a multi-band network takes its ``in_channels``)."""

    def __init__(self, array: np.ndarray, channels: int = 3):
        if array.ndim == 2:
            array = array[..., None]
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2) if not isinstance(array, np.memmap) else array
        if max(array.shape[2], 3) < channels:
            raise ValueError(f"the network takes {channels} channels; the image has {array.shape[2]}")
        self.array, self.channels = array, channels
        self.height, self.width = array.shape[:2]

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        win = np.asarray(self.array[y0 : y0 + h, x0 : x0 + w])
        if win.shape[2] == 1:
            win = np.repeat(win, 3, axis=2)
        return win[..., : self.channels]


def open_reader(path: str | os.PathLike, bands=None, value_range=None) -> WindowReader:
    """A window reader for an image file.

    With rasterio (the ``geo`` extra), GeoTIFF / COG / JPEG 2000 / VRT files are read by GDAL one
    window at a time (:class:`lowlabel.data.raster.RasterReader`), compressed ones included, with
    ``bands`` and ``value_range`` as in ``data.bands`` / ``data.value_range``.
    Without it:
    Uncompressed (or memory-mappable) TIFFs are memory-mapped through ``tifffile`` when the
    ``geo`` extra is installed, so windows are read lazily and a mosaic larger than memory
    works. Other formats (JPEG, PNG) cannot be decoded by window; they are decoded once into a
    uint8 array (3 bytes per pixel).
    """
    path = Path(path)
    from .raster import RASTER_EXTENSIONS, RasterReader, have_rasterio

    if bands is not None or (path.suffix.lower() in RASTER_EXTENSIONS and have_rasterio()):
        return RasterReader(path, bands, value_range)
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            arr = tifffile.memmap(path, mode="r")
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
                arr = np.moveaxis(arr, 0, 2)
            if arr.dtype == np.uint8:
                return ArrayReader(arr)
        except (ImportError, ValueError, OSError):
            pass  # not memory-mappable (compressed, or no tifffile): decode below
    from .dataset import read_image

    return ArrayReader(read_image(path))

