"""Time per image of encoding (``embed``) vs decoding (``segment``) of every promptable backend.

On this CPU. SAM-family backends use random weights of the real architecture: the cost of a
forward pass does not depend on the weights. The image is a real dubai-aerial tile.

Finding (results/sam-speed/): on 2 cores the image encoder is the cost. A 509 x 544 tile embeds
in 32 s with SAM ViT-B, 4.3 s with MobileSAM, 1.5 s with the classical backend; 16 prompts decode
in 4.0-4.4 s with every SAM-family model (0.39 s classical).

    python benchmarks/probes/sam_speed.py [--backends classical mobilesam sam:vit_b sam2:sam2.1_hiera_t] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.data.dataset import read_image  # noqa: E402
from lowlabel.sam import Prompts, build_segmenter  # noqa: E402

IMAGE = REPO.parent / "shared" / "datasets" / "dubai-aerial" / "images" / "tile2_part001.jpg"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["classical", "mobilesam", "sam:vit_b", "sam2:sam2.1_hiera_t", "sam:vit_l", "sam:vit_h"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sam-speed"))
    args = ap.parse_args(argv)
    img = read_image(IMAGE)
    rng = np.random.default_rng(0)
    h, w = img.shape[:2]
    prompts = {n: Prompts(points=np.stack([rng.uniform([0, 0], [w, h], (5, 2)) for _ in range(n)])) for n in (1, 16)}
    rows = []
    for spec in args.backends:
        backend, _, model_type = spec.partition(":")
        t0 = time.time()
        seg = build_segmenter(backend, model_type=model_type or None)
        build = time.time() - t0
        enc, dec1, dec16 = [], [], []
        for _ in range(args.repeats):
            t = time.time()
            emb = seg.embed(img)
            enc.append(time.time() - t)
            t = time.time()
            seg.segment(emb, prompts[1])
            dec1.append(time.time() - t)
            t = time.time()
            seg.segment(emb, prompts[16])
            dec16.append(time.time() - t)
        row = {"backend": seg.name, "build_seconds": round(build, 2), "embed_seconds": round(statistics.median(enc), 3),
               "segment_1_prompt_seconds": round(statistics.median(dec1), 4), "segment_16_prompts_seconds": round(statistics.median(dec16), 4),
               "parameters": sum(p.numel() for p in seg.sam.parameters()) if hasattr(seg, "sam") else (sum(p.numel() for p in seg.predictor.model.parameters()) if hasattr(seg, "predictor") else 0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del seg
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"benchmark": "promptable segmenters: encode vs decode on CPU", "image": f"{IMAGE.name} ({w}x{h})", "rows": rows,
           "torch_threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": "python benchmarks/probes/sam_speed.py " + " ".join(argv or sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Promptable segmenters on CPU: encode vs decode", "", f"{res['image']}, {res['machine']}, {res['torch_threads']} torch threads, {res['date']}; "
          f"load average at the end {tuple(round(x, 2) for x in res['load_average_at_end'])}. Median of {args.repeats}; random weights for SAM models.", "",
          "| backend | parameters | embed (s) | segment, 1 prompt (s) | segment, 16 prompts (s) |", "|---|---|---|---|---|"]
    md += [f"| {r['backend']} | {r['parameters'] / 1e6:.1f}M | {r['embed_seconds']} | {r['segment_1_prompt_seconds']} | {r['segment_16_prompts_seconds']} |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
