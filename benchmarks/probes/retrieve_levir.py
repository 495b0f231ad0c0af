"""Zero-shot exemplar retrieval (``lowlabel retrieve``) on levir-cd-samples, scored by IoU.

``Run.retrieve`` (what ``lowlabel retrieve`` runs) on ``../shared/datasets/levir-cd-samples``: each
"after" image (B) with a non-empty change mask is the exemplar in turn, its changed-building mask
the exemplar region; every other B image with a change mask is a query, scored by IoU of the
retrieved pixels against its change mask. Reported: the mean query IoU per exemplar and over all,
beside two references that need no model: the IoU of retrieving every pixel (= the share of
changed pixels) and of retrieving none (0).

Finding (results/retrieve-levir/): with the only SSR-SAM run there is, dubai-aerial-ssr-sam-cpu's
from-scratch labeled-only retrieval model (1/4, seed 0), retrieval does not transfer: mean IoU
4.6 %, below the 16.9 % of retrieving every pixel. It checks the code path, not SSR-SAM's
zero-shot ability, which rests on SAM's pretraining.

    python benchmarks/probes/retrieve_levir.py RUN [--out benchmarks/results/retrieve-levir]

RUN: an SSR-SAM run (``model.arch: ssr-sam``). LEVIR-CD's change masks mark new buildings, so
the exemplar region shows buildings and so do unchanged buildings elsewhere in a query: a
perfect building retriever is not a perfect change retriever, and IoU against change masks
understates it. The labels are what the dataset has.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "datasets" / "levir-cd-samples"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO / "src"))
    from lowlabel import load_run
    from lowlabel.data.dataset import read_label

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "retrieve-levir"))
    args = ap.parse_args(argv)
    run = load_run(args.run)
    ids = [i for i in (DATA / "ids.txt").read_text().split() if read_label(DATA / "label" / f"{i}.png").any()]
    rows = []
    for ex in ids:
        queries = [q for q in ids if q != ex]
        masks = run.retrieve(DATA / "B" / f"{ex}.png", DATA / "label" / f"{ex}.png", [DATA / "B" / f"{q}.png" for q in queries])
        gts = [read_label(DATA / "label" / f"{q}.png") > 0 for q in queries]
        rows.append({"exemplar": ex, "mean_iou": round(float(np.mean([iou(m, g) for m, g in zip(masks, gts)])), 4),
                     "retrieved_share": round(float(np.mean([m.mean() for m in masks])), 4)})
        print(json.dumps(rows[-1]), flush=True)
    every = float(np.mean([(read_label(DATA / "label" / f"{q}.png") > 0).mean() for q in ids]))
    res = {"benchmark": "zero-shot exemplar retrieval on levir-cd-samples (B images, change masks)", "run": str(args.run),
           "model": f"{run.model.arch}/{run.model.encoder_name}", "exemplars": len(rows), "queries_per_exemplar": len(ids) - 1,
           "mean_iou": round(float(np.mean([r["mean_iou"] for r in rows])), 4), "iou_retrieve_every_pixel": round(every, 4),
           "rows": rows, "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/probes/retrieve_levir.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Zero-shot exemplar retrieval on levir-cd-samples", "", f"Run `{args.run}` ({res['model']}); {res['machine']}, {res['date']}. "
          f"Command: `{res['command']}`. Each of {len(rows)} B images with changes is the exemplar (its change mask the region), the "
          f"other {len(ids) - 1} the queries; IoU of the retrieved pixels against each query's change mask.", "",
          f"**Mean IoU: {100 * res['mean_iou']:.1f} %** (retrieving every pixel: {100 * every:.1f} %; retrieving none: 0 %).", "",
          "| exemplar | mean query IoU (%) | retrieved share (%) |", "|---|---|---|"]
    md += [f"| {r['exemplar']} | {100 * r['mean_iou']:.1f} | {100 * r['retrieved_share']:.1f} |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
