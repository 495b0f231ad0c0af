"""Sliding-window prediction at scale: time and peak memory on 1, 4, 16 and 64 megapixel mosaics.

The mosaics are made of real ``dubai-aerial`` tiles (training images, repeated in a grid) and
written once as raw uint8 RGB files; windows are read from the file by row segments (never the
whole image) and finished label rows are streamed to an output file (``sliding_window``'s
``sink``), so what grows with the image is only the width of the score band. Each size runs in
its own process so its peak resident memory is its own. The model is DeepLabV3+/ResNet-18 with
random weights: the cost of a forward pass does not depend on the weights.

    python benchmarks/predict_scale.py [--sizes 1 4 16 64] [--tile 512] [--out benchmarks/results/predict-scale]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "dubai-aerial"


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


def make_mosaic(path: Path, megapixels: float) -> tuple[int, int]:
    """A square-ish mosaic of real tiles, written row band by row band."""
    sys.path.insert(0, str(REPO / "src"))
    from lowlabel.data.dataset import read_image

    tiles = [read_image(p) for p in sorted((DATA / "images").glob("tile2_*.jpg"))]
    th, tw = min(t.shape[0] for t in tiles), min(t.shape[1] for t in tiles)
    tiles = [t[:th, :tw] for t in tiles]
    side = int(math.sqrt(megapixels * 1e6))
    rows, cols = math.ceil(side / th), math.ceil(side / tw)
    height, width = side, side
    with open(path, "wb") as f:
        for r in range(rows):
            band = np.concatenate([tiles[(r * cols + c) % len(tiles)] for c in range(cols)], 1)[:, :width]
            f.write(np.ascontiguousarray(band[: max(0, min(th, height - r * th))]).tobytes())
    return height, width


def run_one(raw: str, height: int, width: int, tile: int, queue) -> None:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from lowlabel.eval.inference import sliding_window
    from lowlabel.models import build_model

    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "resnet18", num_classes=5).eval()
    reader = RawReader(Path(raw), height, width)
    out = open(Path(raw).with_suffix(".labels"), "wb")
    t0 = time.time()
    sliding_window(model, reader, 5, tile=tile, overlap=0.25, batch_size=4, sink=lambda y, lab, c: out.write(lab.tobytes()))
    seconds = time.time() - t0
    out.close()
    n = Path(raw).with_suffix(".labels").stat().st_size
    queue.put({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "labels_written": n, "threads": torch.get_num_threads()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64], help="megapixels")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--work", default="/tmp/lowlabel-predict-scale", help="scratch folder for the mosaics")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predict-scale"))
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    rows = []
    for mpx in args.sizes:
        raw = work / f"mosaic_{mpx:g}mp.raw"
        h, w = make_mosaic(raw, mpx)
        q = ctx.Queue()
        p = ctx.Process(target=run_one, args=(str(raw), h, w, args.tile, q))
        p.start()
        res = q.get()
        p.join()
        assert res["labels_written"] == h * w, "every pixel must get a label"
        row = {"megapixels": round(h * w / 1e6, 2), "height": h, "width": w, "seconds": round(res["seconds"], 2),
               "megapixels_per_second": round(h * w / 1e6 / res["seconds"], 3), "peak_rss_mb": round(res["peak_rss_mb"], 1), "torch_threads": res["threads"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        raw.unlink()
        raw.with_suffix(".labels").unlink()
    result = {
        "benchmark": "sliding-window prediction at scale", "model": "deeplabv3plus/resnet18 (random weights), 5 classes",
        "tile": args.tile, "overlap": 0.25, "rows": rows, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {mp.cpu_count()} cores", "command": "python benchmarks/predict_scale.py " + " ".join(argv or sys.argv[1:]),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Sliding-window prediction at scale", "", f"{result['model']}, tile {args.tile}, overlap 0.25, {result['machine']}, {result['date']}.", "",
          "| megapixels | size | seconds | MP/s | peak RSS (MB) |", "|---|---|---|---|---|"]
    md += [f"| {r['megapixels']} | {r['width']}x{r['height']} | {r['seconds']} | {r['megapixels_per_second']} | {r['peak_rss_mb']} |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        mp_ = [r["megapixels"] for r in rows]
        a.plot(mp_, [r["seconds"] for r in rows], "o-")
        a.set_xlabel("megapixels")
        a.set_ylabel("seconds")
        a.set_title("prediction time")
        b.plot(mp_, [r["peak_rss_mb"] for r in rows], "o-", color="C3")
        b.set_xlabel("megapixels")
        b.set_ylabel("peak RSS (MB)")
        b.set_ylim(0, max(r["peak_rss_mb"] for r in rows) * 1.2)
        b.set_title("peak memory")
        for ax in (a, b):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
