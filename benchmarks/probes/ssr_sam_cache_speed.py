"""SSR-SAM's training step with the frozen encoder's embeddings cached vs encoded on the fly.

Finding (results/ssr-sam-cache/): with SAM ViT-B at 1024² on 2 cores the cache makes a step
14.7x cheaper (about 10 s against 137-157 s); with MobileSAM 1.9x, where the step is bound by the
mask decoder, not the encoder.

One step of ``ssr_sam`` (``lowlabel.methods.ssr_sam``: the labeled loss, the feature, image and
prompt perturbation terms) and its backward pass, on random images at the encoder's 1024² (the
paper's aerial patch size), 2 labeled + 2 unlabeled images, 5 classes, MSPG ViT-B/16, with the
randomly initialised SAM ViT-B and MobileSAM (TinyViT) image encoders (no weights exist on these
machines; a forward pass costs the same whatever the weights). Uncached: every step encodes the
4 weak views and the 2 x 2 CutMixed colour strong views. Cached (``model.options.cache_embeddings``):
the step after a first one that filled the cache, so every encoder input and MSPG prompt is a hit
and the image perturbation is the embedding CutMix. The uncached step is the median of
``--steps`` steps; so is the cached one.

    python benchmarks/probes/ssr_sam_cache_speed.py [--encoders vit_b vit_t] [--steps 2] [--out benchmarks/results/ssr-sam-cache]
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

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))


def batch(size: int, classes: int, seed: int) -> tuple[dict, dict]:
    import numpy as np

    from lowlabel.augment.transforms import cutmix_box

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    mask = torch.randint(0, classes, (2, size // 64, size // 64), generator=g).repeat_interleave(64, 1).repeat_interleave(64, 2)
    labeled = {"image": torch.rand(2, 3, size, size, generator=g), "mask": mask}
    unlabeled = {"image": torch.rand(2, 3, size, size, generator=g), "strong": torch.rand(2, 2, 3, size, size, generator=g),
                 "cutmix": torch.stack([torch.stack([cutmix_box(size, size, rng, 1.0) for _ in range(2)]) for _ in range(2)]),
                 "valid": torch.ones(2, size, size, dtype=torch.bool)}
    return labeled, unlabeled


def step_seconds(encoder: str, cached: bool, steps: int, size: int = 1024, classes: int = 5) -> tuple[list[float], float]:
    from lowlabel.methods.base import StepContext
    from lowlabel.methods.ssr_sam import SSRSAMMethod
    from lowlabel.models import build_model

    torch.manual_seed(0)
    model = build_model("ssr-sam", encoder, classes, options={"mspg": "vit_b_16", "cache_embeddings": cached}).train()
    method = SSRSAMMethod(num_classes=classes, model=model)
    ctx = StepContext(iteration=0, total_iterations=10, epoch=0, total_epochs=1, num_classes=classes)
    labeled, unlabeled = batch(size, classes, 0)

    def one() -> float:
        t0 = time.perf_counter()
        out = method.training_step(model, None, labeled, unlabeled, ctx)
        out.losses["loss"].backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    warm = one() if cached else None  # the step that fills the cache (misses only)
    times = [one() for _ in range(steps)]
    return times, warm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", nargs="+", default=["vit_b", "vit_t"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ssr-sam-cache"))
    args = ap.parse_args(argv)
    rows = []
    for enc in args.encoders:
        unc, _ = step_seconds(enc, False, args.steps)
        cac, warm = step_seconds(enc, True, args.steps)
        row = {"encoder": enc, "uncached_step_s": [round(t, 2) for t in unc], "cached_step_s": [round(t, 2) for t in cac], "cache_fill_step_s": round(warm, 2),
               "ratio": round(statistics.median(unc) / statistics.median(cac), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"benchmark": "SSR-SAM training step, embedding cache vs on-the-fly encoding", "image_size": 1024, "labeled_batch": 2, "unlabeled_batch": 2,
           "classes": 5, "mspg": "vit_b_16", "weights": "random (no SAM weights on this machine)", "rows": rows, "torch_threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/probes/ssr_sam_cache_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# SSR-SAM: a training step with cached vs on-the-fly embeddings", "",
          f"One `ssr_sam` step (forward + backward: labeled loss, feature, image and prompt perturbation terms) at 1024², 2 labeled + 2 "
          f"unlabeled images, 5 classes, MSPG ViT-B/16, random weights; {res['machine']}, {res['torch_threads']} torch threads, {res['date']}. "
          f"Command: `{res['command']}`. Cached: the steps after the one that filled the cache (all hits; the image term is then the "
          "embedding CutMix, see lowlabel.methods.ssr_sam).", "",
          "| image encoder | on-the-fly step (s) | cached step (s) | cache-filling step (s) | ratio |", "|---|---|---|---|---|"]
    md += [f"| {r['encoder']} | {', '.join(map(str, r['uncached_step_s']))} | {', '.join(map(str, r['cached_step_s']))} | {r['cache_fill_step_s']} | "
           f"{r['ratio']}x |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
