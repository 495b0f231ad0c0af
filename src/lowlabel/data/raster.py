"""Rasters read by window and label maps written georeferenced, through rasterio (GDAL).

:class:`RasterReader` reads any format GDAL reads (GeoTIFF, COG, JPEG 2000, VRT, ERDAS, ...)
one window at a time, never decoding the whole image: band selection and order, scaling of
uint16 / float data to uint8, and the nodata mask. :class:`GeoTiffSink` receives the rows of a
prediction as :func:`lowlabel.eval.inference.sliding_window` finishes them and writes a tiled,
compressed GeoTIFF with the source's CRS and transform, the class palette as its colour map and
255 as nodata (pixels the source marks nodata are not predicted), then lays it out as a Cloud
Optimized GeoTIFF; memory stays at one band of rows whatever the image size (GDAL's block
cache is capped: :func:`_gdal_setup`).

rasterio is the ``geo`` extra: without it, ``open_reader`` keeps its PIL / tifffile paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DatasetError

# extensions routed to GDAL (PNG / JPEG stay with PIL, which reads them as fast and needs no GDAL)
RASTER_EXTENSIONS = (".tif", ".tiff", ".jp2", ".vrt", ".img")


GDAL_CACHE_BYTES = 128 * 2**20


def _gdal_setup() -> None:
    """Before lowlabel's first raster I/O in a process:

    - whole slides and plain TIFFs have no georeferencing by design: GDAL's warning about it is
      noise;
    - GDAL keeps decoded blocks in a cache of 5 % of the RAM by default, which one window-by-window
      pass over a big raster fills (measured: +273 MB resident reading a 100 MP GeoTIFF once, so
      +1.2 GB on this 24 GB machine at 1 GP), so the cache is capped at 128 MB, more than the
      blocks one row of 512-pixel windows of an 80,000-pixel-wide mosaic needs; a user's own
      ``GDAL_CACHEMAX`` environment variable wins."""
    import warnings

    import rasterio.env
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    if "GDAL_CACHEMAX" not in os.environ and rasterio.env.get_gdal_config("GDAL_CACHEMAX") != GDAL_CACHE_BYTES:
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_BYTES)


def have_rasterio() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


class RasterReader:
    """Windows of a raster file as uint8 [h, w, C] (the :class:`WindowReader` protocol).

    ``bands``: 1-based band indexes, in the order the network sees them (default: the first
    three, or the single band repeated for grey rasters). One band is read as three equal
    channels (grey); any other number as that many channels (C = ``len(bands)``).
    ``value_range``: (lo, hi) mapped to 0..255 for non-uint8 data; default: the 2nd and 98th percentiles of a decimated read of the
    selected bands (at most ``stats_side`` pixels on the long side), the usual display stretch of
    16-bit satellite scenes. Attributes ``crs``, ``transform`` and ``georeferenced`` describe
    the grid; :meth:`valid` is False where the source marks nodata; ``tiled`` is True for a tiled
    or pyramidal file (a whole-slide image, a mosaic), georeferenced or not.
    """

    def __init__(self, path: str | os.PathLike, bands: Sequence[int] | None = None, value_range: tuple[float, float] | None = None, stats_side: int = 1024):
        import rasterio
        from rasterio.errors import RasterioIOError

        _gdal_setup()
        self.path = Path(path)
        try:
            self.ds = rasterio.open(self.path)
        except RasterioIOError as err:
            raise DatasetError(self.path, f"unreadable raster ({str(err).splitlines()[0][:160]})") from None
        ds = self.ds
        self.height, self.width = ds.height, ds.width
        if bands is None:
            bands = (1, 2, 3) if ds.count >= 3 else (1,)
        bad = [b for b in bands if not 1 <= b <= ds.count]
        if bad:
            raise DatasetError(self.path, f"band(s) {bad} out of range: the raster has {ds.count} band(s), numbered from 1")
        self.bands = tuple(int(b) for b in bands)
        dtype = np.dtype(ds.dtypes[self.bands[0] - 1])
        if dtype.kind not in "uif":
            raise DatasetError(self.path, f"unsupported data type {dtype} (expected integers or floats)")
        self.dtype = dtype
        self.crs, self.transform = ds.crs, ds.transform
        self.georeferenced = ds.crs is not None
        # a tiled or pyramidal layout (whole slides, mosaics): predictions are written as tiled TIFFs too
        self.tiled = ds.block_shapes[0][1] < ds.width or bool(ds.overviews(1))
        self.has_nodata = ds.nodata is not None or _has_mask(ds)
        if dtype == np.uint8:
            self.value_range = None
        elif value_range is not None:
            self.value_range = (float(value_range[0]), float(value_range[1]))
        else:
            self.value_range = self._percentiles(stats_side)

    def _decimated(self, side: int) -> tuple[int, int, int]:
        """The out_shape of a read of the selected bands at most ``side`` pixels on the long side."""
        f = max(1, int(np.ceil(max(self.height, self.width) / side)))
        return (len(self.bands), max(1, self.height // f), max(1, self.width // f))

    def _percentiles(self, side: int) -> tuple[float, float]:
        arr = self._read(self.ds.read, list(self.bands), out_shape=self._decimated(side), masked=True)
        vals = arr.compressed() if np.ma.isMaskedArray(arr) else arr.ravel()
        if vals.size == 0:
            raise DatasetError(self.path, "every pixel is nodata")
        lo, hi = np.percentile(vals.astype(np.float64), [2, 98])
        return float(lo), float(hi if hi > lo else lo + 1)

    def _read(self, fn, *args, **kwargs):
        from rasterio.errors import RasterioError

        try:
            return fn(*args, **kwargs)
        except RasterioError as err:
            raise DatasetError(self.path, f"unreadable raster data, truncated or damaged ({str(err).splitlines()[0][:160]})") from None

    def check(self, stats_side: int = 1024) -> None:
        """Read the first and the last block: a truncated file fails here, before any output; so
        does a raster whose every pixel is nodata (seen on a decimated read of its mask)."""
        from rasterio.windows import Window

        for y, x in ((0, 0), (self.height - 1, self.width - 1)):
            self._read(self.ds.read, list(self.bands), window=Window(x, y, 1, 1))
        if self.has_nodata and not self._read(self.ds.read_masks, list(self.bands), out_shape=self._decimated(stats_side)).any():
            raise DatasetError(self.path, "every pixel is nodata: nothing to predict")

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        from rasterio.windows import Window

        arr = self._read(self.ds.read, list(self.bands), window=Window(x0, y0, w, h))  # [bands, h, w]
        if self.value_range is not None:
            lo, hi = self.value_range
            arr = ((arr.astype(np.float32) - lo) * (255.0 / (hi - lo))).clip(0, 255).round()
        arr = np.moveaxis(arr.astype(np.uint8), 0, 2)
        return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr

    def valid(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """bool [h, w]: False where every selected band is nodata (or masked)."""
        if not self.has_nodata:
            return np.ones((h, w), bool)
        from rasterio.windows import Window

        m = self._read(self.ds.read_masks, list(self.bands), window=Window(x0, y0, w, h))
        return (m > 0).any(axis=0)  # GDAL's dataset mask: a pixel is nodata where every band is

    def close(self) -> None:
        self.ds.close()


def _has_mask(ds) -> bool:
    from rasterio.enums import MaskFlags

    return any(MaskFlags.all_valid not in flags for flags in ds.mask_flag_enums)


class GeoTiffSink:
    """Write a prediction's rows into ``path`` as they are finished: a tiled, DEFLATE-compressed
    uint8 GeoTIFF on ``reader``'s grid (CRS, transform), with the palette as colour map and 255 =
    nodata, optionally a second band of confidence (0-255). Written to a temporary name; ``close``
    lays it out as a Cloud Optimized GeoTIFF (internal overviews) under the final name, so a
    failure leaves no half-written output."""

    def __init__(self, path: str | os.PathLike, reader: RasterReader, palette: Sequence[Sequence[int]], *, confidence: bool = False, block: int = 256):
        import rasterio

        _gdal_setup()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.reader, self.confidence = reader, confidence
        profile = {
            "driver": "GTiff", "height": reader.height, "width": reader.width, "count": 2 if confidence else 1, "dtype": "uint8",
            "crs": reader.crs, "transform": reader.transform, "nodata": 255, "tiled": True, "blockxsize": block, "blockysize": block,
            "compress": "deflate", "BIGTIFF": "IF_SAFER",
        }
        self.ds = rasterio.open(self.tmp, "w", **profile)
        self.ds.write_colormap(1, {i: tuple(int(v) for v in c) + (255,) for i, c in enumerate(palette)})
        self.ds.set_band_description(1, "class")
        if confidence:
            self.ds.set_band_description(2, "confidence x 255")

    def __call__(self, y0: int, labels: np.ndarray, conf: np.ndarray) -> None:
        from rasterio.windows import Window

        h, w = labels.shape
        lab = labels.astype(np.uint8)
        valid = self.reader.valid(y0, 0, h, w)
        lab[~valid] = 255
        win = Window(0, y0, w, h)
        self.ds.write(lab, 1, window=win)
        if self.confidence:
            c = (np.asarray(conf, np.float32) * 254).round().astype(np.uint8)
            c[~valid] = 255
            self.ds.write(c, 2, window=win)

    def close(self) -> Path:
        from rasterio.shutil import copy as rio_copy

        self.ds.close()
        cog = self.path.with_name(f".{self.path.name}.cog.{os.getpid()}.tmp")
        try:
            rio_copy(self.tmp, cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256, OVERVIEW_RESAMPLING="NEAREST")
            os.replace(cog, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
            cog.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        if not self.ds.closed:
            self.ds.close()
        self.tmp.unlink(missing_ok=True)


VECTOR_DRIVERS = {"gpkg": "GPKG", "geojson": "GeoJSON"}


def polygonize(labels_path: str | os.PathLike, out: str | os.PathLike, classes: Sequence[str], *, min_area: float = 0.0, simplify: float = 0.0, batch: int = 5000) -> int:
    """Polygons of a georeferenced label raster (band 1; 255 = nodata is skipped), one feature per
    connected region of a class (4-connectivity), with ``class_id``, ``class`` and ``area`` (map
    units², before simplification), in the raster's CRS. ``min_area`` drops smaller regions;
    ``simplify`` (map units) simplifies outlines, topology preserved per polygon. The raster is
    read from disk by GDAL's polygonizer (never decoded whole) and features are written in
    batches of ``batch`` (pyogrio); GDAL keeps the polygons of the raster in memory while it
    traces them. Format from ``out``'s extension (.gpkg, .geojson); written to a temporary name
    and renamed. Returns the number of features written."""
    import pyogrio.raw
    import rasterio
    import rasterio.features
    import shapely
    from shapely.geometry import shape

    out = Path(out)
    driver = VECTOR_DRIVERS.get(out.suffix.lower().lstrip("."))
    if driver is None:
        raise ValueError(f"{out}: vector output must end in .gpkg or .geojson")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{out.suffix}")  # GDAL wants the format's extension
    n = 0
    try:
        with rasterio.open(labels_path) as ds:
            crs = ds.crs.to_wkt() if ds.crs else None
            geoms, ids, areas = [], [], []

            def flush(first: bool) -> None:
                pyogrio.raw.write(tmp, geometry=shapely.to_wkb(np.array(geoms, dtype=object)) if geoms else np.array([], dtype=object),
                              field_data=[np.array(ids, np.int32), np.array([classes[i] for i in ids], dtype=object), np.array(areas, np.float64)],
                              fields=["class_id", "class", "area"], crs=crs, geometry_type="Polygon", driver=driver, append=not first, layer="labels")
                geoms.clear(), ids.clear(), areas.clear()

            first = True
            for geom, value in rasterio.features.shapes(rasterio.band(ds, 1), connectivity=4, transform=ds.transform):
                v = int(value)
                if v == 255 or v >= len(classes):
                    continue
                poly = shape(geom)
                area = poly.area
                if area < min_area:
                    continue
                if simplify > 0:
                    poly = poly.simplify(simplify, preserve_topology=True)
                geoms.append(poly), ids.append(v), areas.append(area)
                n += 1
                if len(geoms) >= batch:
                    flush(first)
                    first = False
            if geoms or first:
                flush(first)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n
