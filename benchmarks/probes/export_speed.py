"""How fast does an exported ONNX model predict on this CPU in onnxruntime, against the same model in torch fp32?

Finding (2026-12-03, 2-core AMD EPYC shared with other jobs): on one thread onnxruntime predicted
1.76x (UNet2D, 128², batch 16: 22.1 img/s) and 1.46x (DeepLabV3+/ResNet-18, 256², batch 8: 5.6
img/s) as many images per second as torch fp32; 2.3-3.8x on two threads of the busy machine.
Logits within 1.3e-7. Output: benchmarks/results/export-speed/ (README.md, results.json).

Run: python benchmarks/probes/export_speed.py [--threads 1 2] [--reps 5] [--bf16] [--out benchmarks/results/export-speed]

Two networks as lowlabel predicts with them, random weights (speed does not depend on them),
inputs cut from the bundled sample's test images:
- ``unet2d``: UNet2D width 16, grey (in_channels 1), 4 classes (acdc-cpu-1500's network), 128²,
  batch 16;
- ``deeplabv3plus-r18``: DeepLabV3+/ResNet-18, RGB, 5 classes (dubai-aerial's), 256², batch 8.
Each is exported with :func:`lowlabel.export.export_run` (which checks the file against torch),
then, per thread count, three variants run interleaved in one process, round-robin with the
order rotated every round, after one warm-up call each: torch fp32 (``torch.no_grad``,
contiguous), torch fp32 channels_last (what ``eval.precision: auto`` runs on this CPU for
convolutional networks), and the ONNX file in onnxruntime (CPU provider, ``intra_op_num_threads``
= the thread count). Reported: the median seconds of a call, images/s and megapixels/s.
torch bf16 is left out by default: this machine's AMD EPYC has no bf16 units (no amx_bf16 /
avx512_bf16), so bf16 is emulated; benchmarks/results/cpu-precision measured inference of these
two networks at 0.015-0.14x fp32's speed. ``--bf16`` adds one timed bf16 autocast call (its first,
so it includes any warm-up) per network and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lowlabel.precision import cpu_name

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())

NETWORKS = {
    "unet2d": {"arch": "unet2d", "encoder": "resnet18", "classes": 4, "in_channels": 1, "side": 128, "batch": 16},
    "deeplabv3plus-r18": {"arch": "deeplabv3plus", "encoder": "resnet18", "classes": 5, "in_channels": 3, "side": 256, "batch": 8},
}


def batch_of(side: int, n: int, channels: int) -> torch.Tensor:
    """n crops of side x side from the sample's test images (float [n, 3, side, side] in [0, 1];
    a grey network averages the channels in its graph, so it is fed three too)."""
    from PIL import Image

    from lowlabel.sample_data import sample_path

    root = sample_path()
    ids = (root / "splits" / "test.txt").read_text().split()
    imgs = [np.array(Image.open(next((root / "images").glob(f"{i}.*"))).convert("RGB")) for i in ids]
    rng = np.random.default_rng(0)
    crops = []
    for k in range(n):
        im = imgs[k % len(imgs)]
        y, x = rng.integers(0, im.shape[0] - side), rng.integers(0, im.shape[1] - side)
        crops.append(im[y : y + side, x : x + side])
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255)
    return x if channels in (1, 3) else x[:, :1].expand(-1, channels, -1, -1)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5, help="timed calls per variant (after one warm-up)")
    ap.add_argument("--bf16", action="store_true", help="also one timed torch bf16 autocast call per network and thread count")
    ap.add_argument("--only", choices=sorted(NETWORKS), action="append", help="only this network (repeatable)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/export-speed"))
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from lowlabel import __version__
    from lowlabel.engine.run import Run
    from lowlabel.export import ExportedModel, export_run
    from lowlabel.models import build_model

    started = time.time()
    load_start = os.getloadavg()
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()} ({os.cpu_count()} logical CPUs), {platform.machine()}",
        "command": "python benchmarks/probes/export_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"lowlabel": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__},
        "timed": f"median of {args.reps} calls per variant after one warm-up each, variants interleaved round-robin (order rotated every round)",
        "load_average_at_start": [round(v, 2) for v in load_start],
        "networks": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="lowlabel-export-speed-"))
    for name in args.only or NETWORKS:
        spec = NETWORKS[name]
        torch.manual_seed(0)
        net = build_model(spec["arch"], spec["encoder"], spec["classes"], in_channels=spec["in_channels"]).eval()
        run = Run(net, [f"c{k}" for k in range(spec["classes"])], [(k, k, k) for k in range(spec["classes"])], precision="fp32")
        t0 = time.perf_counter()
        path = export_run(run, "onnx", tmp / f"{name}.onnx")
        export_s = time.perf_counter() - t0
        x = batch_of(spec["side"], spec["batch"], spec["in_channels"])
        plain = net.to(memory_format=torch.contiguous_format)
        import copy

        cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        entry = {**spec, "export_s": round(export_s, 2), "threads": {}}
        for threads in args.threads:
            torch.set_num_threads(threads)
            onnx_model = ExportedModel(path, threads=threads)
            with torch.no_grad():
                ref = plain(x)
                diff = float((onnx_model(x) - ref).abs().max())
            variants = {
                "torch-fp32": lambda: plain(x),
                "torch-fp32-channels_last": lambda: cl(x_cl),
                "onnxruntime-fp32": lambda: onnx_model(x),
            }
            times = {k: [] for k in variants}
            with torch.no_grad():
                for fn in variants.values():
                    fn()  # warm-up
                keys = list(variants)
                for r in range(args.reps):
                    for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                        times[k].append(timed(variants[k]))
                if args.bf16:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        times["torch-bf16 (first call)"] = [timed(lambda: plain(x))]
            mp = spec["batch"] * spec["side"] ** 2 / 1e6
            cell = {"max_abs_logit_diff_onnx_vs_torch": diff}
            base = statistics.median(times["torch-fp32"])
            for k, ts in times.items():
                med = statistics.median(ts)
                cell[k] = {"median_s": round(med, 4), "all_s": [round(t, 4) for t in ts], "images_per_s": round(spec["batch"] / med, 2),
                           "megapixels_per_s": round(mp / med, 3), "speedup_vs_torch_fp32": round(base / med, 3)}
            entry["threads"][str(threads)] = cell
            print(f"{name} threads={threads}: " + ", ".join(f"{k} {v['images_per_s']} img/s ({v['speedup_vs_torch_fp32']}x)"
                                                             for k, v in cell.items() if isinstance(v, dict)), flush=True)
        res["networks"][name] = entry
    res["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    res["wall_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"results -> {out / 'results.json'} ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
