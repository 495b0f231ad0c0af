"""Prediction at scale from files on disk: read + predict + write, time and peak memory, 1 MP to 1 GP.

Finding (results/predict-scale/): ``predict`` streams. A 1-gigapixel GeoTIFF took 2,222 s (37 min)
on 2 CPU cores at 1.9 GB peak resident memory, 1.43x the 1-megapixel run's, at 0.93x the 16 MP
run's seconds per megapixel.

Each mosaic is made of real ``dubai-aerial`` tiles (training images repeated in a grid) and
written once, band of rows by band of rows, as a tiled (512 x 512), DEFLATE-compressed RGB
GeoTIFF with a CRS (UTM 40N, Dubai's zone) and a 0.5 m transform. Then, in a fresh process per
size (so its peak resident memory is its own), ``Run.predict_folder`` — what ``lowlabel
predict`` runs — reads it window by window (:class:`lowlabel.data.raster.RasterReader`), predicts
it tile by tile (``sliding_window``) and streams finished rows into a georeferenced label map
(:class:`lowlabel.data.raster.GeoTiffSink`), then lays that out as a Cloud Optimized GeoTIFF.
The measured time covers all of it: the input check, reading and decompressing, the network,
stitching, writing and the COG layout. The output's size, CRS and transform are checked against
the input's. The model is DeepLabV3+/ResNet-18: with ``--checkpoint``, a trained run (the
committed table used ``benchmarks/probes/predict_scale_model.yaml``, so that the label maps written have
a real prediction's structure and compressed size); without, random weights (a forward pass costs
the same, but the near-constant label map compresses to nothing).

    python benchmarks/probes/predict_scale.py [--checkpoint RUN] [--sizes 1 16 256 1024] [--tile 512] [--out benchmarks/results/predict-scale]

``--source raw`` is the earlier in-memory variant (raw uint8 file, labels to a raw file), kept
for comparison with ``results/predict-scale/raw-reader``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "datasets" / "dubai-aerial"
CRS = "EPSG:32640"  # WGS 84 / UTM zone 40N (Dubai)
ORIGIN = (300000.0, 2800000.0)  # upper-left corner, metres
PIXEL = 0.5  # metres


def _tiles() -> list[np.ndarray]:
    sys.path.insert(0, str(REPO / "src"))
    from lowlabel.data.dataset import read_image

    tiles = [read_image(p) for p in sorted((DATA / "images").glob("tile2_*.jpg"))]
    th, tw = min(t.shape[0] for t in tiles), min(t.shape[1] for t in tiles)
    return [t[:th, :tw] for t in tiles]


def _bands(megapixels: float):
    """(height, width, iterator of (row0, uint8 [h, W, 3] bands)) of a square mosaic of real tiles."""
    tiles = _tiles()
    th, tw = tiles[0].shape[:2]
    side = int(math.sqrt(megapixels * 1e6))
    cols = math.ceil(side / tw)

    def gen():
        for r in range(math.ceil(side / th)):
            band = np.concatenate([tiles[(r * cols + c) % len(tiles)] for c in range(cols)], 1)[:, :side]
            yield r * th, np.ascontiguousarray(band[: min(th, side - r * th)])

    return side, side, gen()


def make_geotiff(path: Path, megapixels: float) -> tuple[int, int]:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    height, width, bands = _bands(megapixels)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 3, "dtype": "uint8", "crs": CRS,
               "transform": from_origin(*ORIGIN, PIXEL, PIXEL), "tiled": True, "blockxsize": 512, "blockysize": 512,
               "compress": "deflate", "photometric": "RGB", "BIGTIFF": "IF_SAFER"}
    with rasterio.open(path, "w", **profile) as ds:
        for y0, band in bands:
            ds.write(np.moveaxis(band, 2, 0), window=Window(0, y0, width, band.shape[0]))
    return height, width


def make_raw(path: Path, megapixels: float) -> tuple[int, int]:
    height, width, bands = _bands(megapixels)
    with open(path, "wb") as f:
        for _, band in bands:
            f.write(band.tobytes())
    return height, width


class RawReader:
    """Windows of a raw H x W x 3 uint8 file, read row segment by row segment."""

    def __init__(self, path: Path, height: int, width: int):
        self.path, self.height, self.width = path, height, width
        self.f = open(path, "rb")

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        out = np.empty((h, w, 3), np.uint8)
        for r in range(h):
            self.f.seek(((y0 + r) * self.width + x0) * 3)
            out[r] = np.frombuffer(self.f.read(w * 3), np.uint8).reshape(w, 3)
        return out


def _run(checkpoint: str | None, tile: int):
    """The trained run (``--checkpoint``), or DeepLabV3+/ResNet-18 with random weights, tiled as asked."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from lowlabel.config import EvalConfig
    from lowlabel.engine.run import Run
    from lowlabel.models import build_model

    if checkpoint:
        run = Run.load(checkpoint, device="cpu")
    else:
        torch.manual_seed(0)
        meta = json.loads((DATA / "dataset.json").read_text())
        run = Run(build_model("deeplabv3plus", "resnet18", num_classes=5), meta["classes"], meta["palette"])
    run.eval_cfg = EvalConfig(tile=tile, overlap=0.25, batch_size=4)
    return run


def run_geotiff(src: str, tile: int, checkpoint: str | None, queue) -> None:
    """One ``predict_folder`` on ``src`` in this process; reports time, peak RSS and the check."""
    import rasterio
    import torch

    run = _run(checkpoint, tile)
    out = Path(src).parent / "pred"
    t0 = time.time()
    (written,) = run.predict_folder(src, out)
    seconds = time.time() - t0
    with rasterio.open(src) as a, rasterio.open(written) as b:
        same_grid = (a.crs == b.crs and a.transform == b.transform and (a.height, a.width) == (b.height, b.width))
        labels = b.read(1, out_shape=(max(1, b.height // 64), max(1, b.width // 64)))  # decimated: from the COG's overviews
    queue.put({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "same_grid": same_grid,
               "labels_in_range": bool((labels < 5).all()), "output_mb": Path(written).stat().st_size / 2**20, "threads": torch.get_num_threads()})


def run_raw(src: str, height: int, width: int, tile: int, checkpoint: str | None, queue) -> None:
    import torch

    run = _run(checkpoint, tile)
    reader = RawReader(Path(src), height, width)
    lab_path = Path(src).with_suffix(".labels")
    t0 = time.time()
    with open(lab_path, "wb") as out:
        run.predict(reader, sink=lambda y, lab, c: out.write(lab.tobytes()))
    seconds = time.time() - t0
    queue.put({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "same_grid": lab_path.stat().st_size == height * width, "labels_in_range": True, "output_mb": lab_path.stat().st_size / 2**20,
               "threads": torch.get_num_threads()})


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.5))
    mp_ = [r["megapixels"] for r in rows]
    a.plot(mp_, [r["seconds"] for r in rows], "o-")
    a.set_ylabel("seconds")
    a.set_title("read + predict + write time")
    b.plot(mp_, [r["seconds_per_megapixel"] for r in rows], "o-", color="C2")
    b.set_ylabel("seconds per megapixel")
    b.set_ylim(0, max(r["seconds_per_megapixel"] for r in rows) * 1.3)
    b.set_title("cost per pixel")
    c.plot(mp_, [r["peak_rss_mb"] for r in rows], "o-", color="C3")
    c.set_ylabel("peak RSS (MB)")
    c.set_ylim(0, max(r["peak_rss_mb"] for r in rows) * 1.3)
    c.set_title("peak memory")
    for ax in (a, b, c):
        ax.set_xscale("log")
        ax.set_xlabel("megapixels")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 16, 256, 1024], help="megapixels")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--source", choices=["geotiff", "raw"], default="geotiff")
    ap.add_argument("--checkpoint", help="a run directory or checkpoint whose model predicts (default: DeepLabV3+/ResNet-18, random weights; "
                    "benchmarks/probes/predict_scale_model.yaml trains the one the committed table used)")
    ap.add_argument("--work", default="/tmp/lowlabel-predict-scale", help="scratch folder for the mosaics and predictions")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predict-scale"))
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    rows = []
    for mpx in args.sizes:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.time()
        if args.source == "geotiff":
            src = work / f"mosaic_{mpx:g}mp.tif"
            h, w = make_geotiff(src, mpx)
            target, targs = run_geotiff, (str(src), args.tile, args.checkpoint)
        else:
            src = work / f"mosaic_{mpx:g}mp.raw"
            h, w = make_raw(src, mpx)
            target, targs = run_raw, (str(src), h, w, args.tile, args.checkpoint)
        made = time.time() - t0
        q = ctx.Queue()
        p = ctx.Process(target=target, args=(*targs, q))
        p.start()
        res = q.get()
        p.join()
        if not (res["same_grid"] and res["labels_in_range"]):
            raise SystemExit(f"{mpx} MP: the output does not match the input's grid or holds labels out of range: {res}")
        row = {"megapixels": round(h * w / 1e6, 2), "height": h, "width": w, "input_mb": round(src.stat().st_size / 2**20, 1),
               "output_mb": round(res["output_mb"], 1), "seconds": round(res["seconds"], 1),
               "megapixels_per_second": round(h * w / 1e6 / res["seconds"], 3), "seconds_per_megapixel": round(res["seconds"] / (h * w / 1e6), 3),
               "peak_rss_mb": round(res["peak_rss_mb"], 1), "torch_threads": res["threads"], "mosaic_written_s": round(made, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    first, last = rows[0], rows[-1]
    ref = next((r for r in rows if r["megapixels"] >= 16), first)
    ratios = {"peak_rss_largest_over_smallest": round(last["peak_rss_mb"] / first["peak_rss_mb"], 3),
              "seconds_per_mp_largest_over_16mp": round(last["seconds_per_megapixel"] / ref["seconds_per_megapixel"], 3)}
    result = {
        "benchmark": "prediction at scale from files on disk (read + predict + write)" if args.source == "geotiff" else "sliding-window prediction at scale (raw file)",
        "source": args.source,
        "model": "deeplabv3plus/resnet18, 5 classes, " + (f"trained weights ({args.checkpoint})" if args.checkpoint else "random weights"), "tile": args.tile, "overlap": 0.25, "batch_size": 4,
        "input": "tiled 512x512 DEFLATE RGB GeoTIFF of repeated dubai-aerial tiles, EPSG:32640, 0.5 m" if args.source == "geotiff" else "raw uint8 RGB",
        "rows": rows, "ratios": ratios, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "command": "python benchmarks/probes/predict_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# {result['benchmark'][0].upper() + result['benchmark'][1:]}", "",
          f"{result['model']}, tile {args.tile}, overlap 0.25, batch 4, {rows[0]['torch_threads']} torch threads; "
          f"input: {result['input']}. {result['machine']}, {result['date']}. Command: `{result['command']}`.", "",
          "| megapixels | size | input (MB) | output (MB) | seconds | MP/s | s/MP | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['megapixels']} | {r['width']}x{r['height']} | {r['input_mb']} | {r['output_mb']} | {r['seconds']} | {r['megapixels_per_second']} | "
           f"{r['seconds_per_megapixel']} | {r['peak_rss_mb']} |" for r in rows]
    md += ["", f"Peak RSS of the largest over the smallest: {ratios['peak_rss_largest_over_smallest']}x. "
           f"Seconds per megapixel of the largest over {ref['megapixels']} MP: {ratios['seconds_per_mp_largest_over_16mp']}x."]
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plot(rows, out / "scale.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
