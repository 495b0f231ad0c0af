"""SeSAM's training step time against FixMatch's, on the same machine in one run.

SeSAM's Table 6: 0.81 vs 0.24 s per iteration, 3.4x, with SAM in the loop.

Finding (results/sesam-speed/): SeSAM's mean step is 0.83x FixMatch's with MobileSAM (random
weights: 2.34 against 2.81 s) and 0.84x with the classical backend, because an image's SAM labels
are refreshed the first time it is seen and every 4th time after, from the embedding cache (goal
<= 1.3x: met).

Both train the ACDC protocol's UNet on ACDC's real scribbles (128 x 128 slices, batch 8; FixMatch
with 8 more unlabeled slices a step, SeSAM pseudo-labels its own 8). SeSAM recomputes an image's
SAM labels the first time it sees it and every M = 4th time after. The embedding cache and the
SAM labels are filled by a first pass over the same schedule (reported as the one-off cost per
image), then a fresh run with the same seed is timed in the steady state of a run: every image
embedded once, holding SAM labels, and at a uniformly random phase of its M sightings (so one in
M images of a batch is refreshed, as after the first epoch of training). Neural backends have random weights of the real architecture (the cost of a
forward pass does not depend on the weights); with them the scribbles are prompted as they are
(``weak_kind: coarse``): growing scribbles with random masks paints noise whose speckle, not the
method, would set the number of prompts.

    python benchmarks/probes/sesam_speed.py [--backends classical mobilesam sam:vit_b] [--steps 16]
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.config import load_config  # noqa: E402
from lowlabel.engine.trainer import Trainer  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "acdc-scribbles"


def config(method: str, out: Path, params: dict, batch: int, steps: int) -> dict:
    return {
        "name": method, "out_dir": str(out),
        "data": {"root": str(DATA), "train_split": "ssl-train", "val_split": None, "test_split": None, "weak": "scribbles",
                 "labeled": "1" if method == "sesam" else str(DATA / "splits" / "ssl-labeled-3.txt"),
                 "crop": 128, "resize": True, "rotate": "medical", "labeled_batch": batch, "unlabeled_batch": batch},
        "model": {"arch": "unet2d", "width": 16, "in_channels": 1},
        "method": {"name": method, "params": params},
        "teacher": {"kind": "ema" if method == "sesam" else "self"},
        "optim": {"name": "sgd", "lr": 0.01, "head_lr_mult": 1.0},
        "train": {"iterations": steps, "val_every": 0, "checkpoint_every": steps, "log_every": 1},
    }


def step_times(raw: dict, steps: int, prepare=None) -> tuple[list[float], Trainer]:
    tr = Trainer(load_config(raw=raw), progress=False)
    if prepare is not None:
        prepare(tr)
    lab_it = tr.lab_stream.batches(0)
    unl_it = tr.unl_stream.batches(0) if tr.unl_stream else None
    times, tr.refreshed_per_step = [], []  # images whose SAM labels each step recomputed
    for _ in range(steps):
        lab = tr._to_device(next(lab_it))
        unl = tr._to_device(next(unl_it)) if unl_it is not None else None
        t0 = time.perf_counter()
        rec = tr.step(lab, unl)
        tr.refreshed_per_step.append(rec.get("refreshed", 0))
        tr.iteration += 1
        times.append(time.perf_counter() - t0)
    return times, tr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["classical", "mobilesam", "sam:vit_b"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sesam-speed"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times, _ = step_times(config("fixmatch", tmp / "f", {}, args.batch, args.steps), args.steps)
        fix = statistics.median(times[1:])
        rows.append({"method": "fixmatch", "backend": "-", "median_step_s": round(fix, 4), "ratio_to_fixmatch": 1.0})
        print(f"fixmatch: {fix:.3f} s/step", flush=True)
        for spec in args.backends:
            backend, _, model_type = spec.partition(":")
            params = {"backend": backend, "model_type": model_type or None, "allow_random_weights": backend != "classical",
                      "cache": str(tmp / f"cache-{backend}-{model_type}"),
                      # random weights make the scribble-growing step's masks noise, whose speckle would set the
                      # number of prompts; prompting the scribbles as they are gives the count real weights give
                      "weak_kind": "coarse" if backend != "classical" else "auto"}
            _, warm = step_times(config("sesam", tmp / f"w-{spec}", params, args.batch, args.steps), args.steps)  # fills the cache
            embeds = warm.method.cache.misses
            embed_times = []
            for i in range(3):  # the one-off cost of an image's embedding, timed alone
                image = warm.labeled_set.load(i)["image"]
                t0 = time.perf_counter()
                warm.method.segmenter.embed(image)
                embed_times.append(time.perf_counter() - t0)
            phase = np.random.default_rng(0)

            def steady(tr, warm=warm):
                tr.method.bank = dict(warm.method.bank)
                tr.method.seen = {sid: int(phase.integers(1, 5)) for sid in warm.method.bank}

            times, tr = step_times(config("sesam", tmp / f"s-{spec}", params, args.batch, args.steps), args.steps, steady)
            embed_cost = statistics.median(embed_times)
            assert tr.method.cache.misses == 0, "the timed pass must find every embedding in the cache"
            refreshed = tr.refreshed_per_step[1:]
            refresh = [t for t, r in zip(times[1:], refreshed) if r]
            plain = [t for t, r in zip(times[1:], refreshed) if not r]
            med = statistics.median(times[1:])
            row = {
                "method": "sesam", "backend": spec, "median_step_s": round(med, 4), "mean_step_s": round(statistics.mean(times[1:]), 4),
                "refresh_step_s": round(statistics.median(refresh), 4) if refresh else None, "plain_step_s": round(statistics.median(plain), 4) if plain else None,
                "ratio_to_fixmatch": round(statistics.mean(times[1:]) / fix, 2),
                "embedded_images": embeds, "embed_s_per_image": round(embed_cost, 2),
                "refreshed_per_step": round(statistics.mean(refreshed), 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{platform.node()} {platform.machine()} ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(), "command": "python benchmarks/probes/sesam_speed.py " + " ".join(argv or sys.argv[1:]),
        "batch": args.batch, "steps": args.steps, "note": "ratio_to_fixmatch: SeSAM's mean step (refresh steps included) over FixMatch's median step",
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| method | backend | s/step (median) | s/step (mean) | steps with a refresh | other steps | images refreshed / step | x FixMatch | one-off embed s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['backend']} | {r['median_step_s']:.3f} | {r.get('mean_step_s', r['median_step_s']):.3f} | {r.get('refresh_step_s') or '-'} | "
                     f"{r.get('plain_step_s') or '-'} | {r.get('refreshed_per_step', '-')} | {r['ratio_to_fixmatch']:.2f} | {r.get('embed_s_per_image', '-')} |")
    (out / "results.md").write_text(f"# SeSAM vs FixMatch step time\n\n{meta['machine']}, {meta['torch_threads']} threads, {meta['date']}; `{meta['command']}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
