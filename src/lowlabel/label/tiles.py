"""Windows of large images as the units of ``suggest`` (``tile=N``): for an aerial mosaic or a
whole slide, "label this 512 x 512 window next" rather than "label this image".

- Each pool image is cut into a grid of ``tile`` x ``tile`` windows (the last row and column are
  clipped to the image). A window's id is ``<image id>@<x0>,<y0>,<w>,<h>`` (pixels, x0 / y0 the
  top-left corner): the pick list names exactly what to label.
- Windows with nothing to label are left out: *blank* ones (grey-level standard deviation below
  ``BLANK_STD``: nodata borders, uniform padding) and *near-duplicates* (the same 16 x 16
  thumbnail of its first three channels, quantised to 16 levels, as a window seen earlier: tiled
  mosaics often repeat a window exactly). What was removed is counted in the suggestion's ``info``.
- Spatial diversity: neighbouring windows of one image show the same ground or tissue, so when
  the queue is ordered, a window within ``gap`` windows (Chebyshev distance on the grid) of one
  already ahead of it in the same image is moved behind every window that is not; it stays in
  the queue (as the next picks once the rest is labeled). ``gap=0`` turns this off.

Written here rather than taken from a library: the grid and the two filters are a few lines over
the project's window readers (:mod:`lowlabel.data.tiling`), which already read huge rasters one
window at a time.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.tiling import open_reader
from ..errors import ConfigError

BLANK_STD = 1.0  # grey levels (0-255): a window flatter than this holds nothing to label
THUMB = 16  # near-duplicate thumbnails: THUMB x THUMB grey, quantised to LEVELS steps
LEVELS = 16
_ID = re.compile(r"^(?P<image>.+)@(?P<x>\d+),(?P<y>\d+),(?P<w>\d+),(?P<h>\d+)$")


@dataclass(frozen=True)
class Tile:
    """One window of an image file: what a window unit's "path" is."""

    path: Path
    image: str
    x: int
    y: int
    w: int
    h: int

    @property
    def id(self) -> str:
        return f"{self.image}@{self.x},{self.y},{self.w},{self.h}"


def parse_tile_id(tid: str) -> tuple[str, int, int, int, int] | None:
    """(image id, x0, y0, w, h) of a window id, None for a plain image id."""
    m = _ID.match(tid)
    return (m["image"], int(m["x"]), int(m["y"]), int(m["w"]), int(m["h"])) if m else None


class CropReader:
    """A window of a window reader, itself a window reader (coordinates inside the window)."""

    def __init__(self, reader, tile: Tile):
        self.reader, self.tile = reader, tile
        self.height, self.width = tile.h, tile.w

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        h, w = max(0, min(h, self.height - y0)), max(0, min(w, self.width - x0))
        return self.reader.read(self.tile.y + y0, self.tile.x + x0, h, w)


def open_unit(src, bands=None, value_range=None):
    """A window reader for a unit's source: an image file, or a :class:`Tile` of one."""
    if isinstance(src, Tile):
        return CropReader(open_reader(src.path, bands, value_range), src)
    return open_reader(src, bands, value_range)


def _grey(win: np.ndarray) -> np.ndarray:
    win = np.asarray(win, dtype=np.float32)
    return win[..., :3].mean(-1) if win.ndim == 3 else win


def _thumb_key(win: np.ndarray) -> int:
    """A hash of the window's THUMB x THUMB block-mean thumbnail (each of its first 3 channels),
    quantised to LEVELS steps."""
    win = np.asarray(win, dtype=np.float32)
    win = win[..., :3] if win.ndim == 3 else win[..., None]
    h, w = win.shape[:2]
    ys = np.linspace(0, h, THUMB + 1).astype(int)
    xs = np.linspace(0, w, THUMB + 1).astype(int)
    thumb = np.array([[win[ys[i]:max(ys[i + 1], ys[i] + 1), xs[j]:max(xs[j + 1], xs[j] + 1)].mean((0, 1)) for j in range(THUMB)] for i in range(THUMB)])
    q = np.clip(thumb / 256.0 * LEVELS, 0, LEVELS - 1).astype(np.uint8)
    return zlib.crc32(q.tobytes() + bytes([h % 256, w % 256]))


def tile_pool(pool_ids: list[str], images: dict, tile: int, bands=None, value_range=None) -> tuple[dict[str, Tile], dict]:
    """The windows of the pool images, blank and near-duplicate ones left out: ({window id:
    Tile}, counts). ``images`` maps image ids to their files."""
    if isinstance(tile, bool) or int(tile) != tile or tile < 16:
        raise ConfigError(f"tile {tile!r}: give the window side in pixels, at least 16")
    tile = int(tile)
    out: dict[str, Tile] = {}
    seen: set[int] = set()
    counts = {"windows": 0, "blank": 0, "near_duplicates": 0}
    for sid in pool_ids:
        reader = open_reader(images[sid], bands, value_range)
        for y in range(0, reader.height, tile):
            for x in range(0, reader.width, tile):
                t = Tile(Path(images[sid]), sid, x, y, min(tile, reader.width - x), min(tile, reader.height - y))
                counts["windows"] += 1
                win = reader.read(y, x, t.h, t.w)
                if float(_grey(win).std()) < BLANK_STD:
                    counts["blank"] += 1
                    continue
                key = _thumb_key(win)
                if key in seen:
                    counts["near_duplicates"] += 1
                    continue
                seen.add(key)
                out[t.id] = t
    counts["kept"] = len(out)
    return out, counts


def spread(queue: list[str], tiles: dict[str, Tile], gap: int, tile: int) -> tuple[list[str], set[str]]:
    """The queue with every window that lies within ``gap`` grid steps of a window ahead of it in
    the same image moved behind the others (their order kept): (queue, moved ids)."""
    if gap <= 0:
        return list(queue), set()
    ahead: dict[str, list[tuple[int, int]]] = {}
    first, later = [], []
    for u in queue:
        t = tiles[u]
        cell = (t.x // tile, t.y // tile)
        near = any(abs(cell[0] - c[0]) <= gap and abs(cell[1] - c[1]) <= gap for c in ahead.get(t.image, ()))
        if near:
            later.append(u)
        else:
            first.append(u)
            ahead.setdefault(t.image, []).append(cell)
    return first + later, set(later)
