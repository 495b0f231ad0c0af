"""How much of DerProp's training step does J's projection width D (method.params.proj_dim) cost?

Finding (2026-12-03, the 2-core AMD EPYC VM, one thread, beside one running regionmatch cell):
on acdc-cpu-1500's derprop_unimatch cell, 9.0 s/step at D 64, 6.6 at 32, 5.3 at 16 (medians of 6
steps each), so DerProp's default D became the features' channel count (16 on unet2d width 16), at
most 64. Output: benchmarks/results/derprop-cost/derprop_cost.json.

Method: 6-step runs per D, two rounds interleaved; the first step and the last (it holds the closing
validation) are left out. Run from the repository root: OMP_NUM_THREADS=1 python
benchmarks/probes/derprop_cost.py (~8 min).
"""
import copy
import json
import platform
import statistics
import tempfile
from datetime import date
from pathlib import Path

import torch

torch.set_num_threads(1)
OUT = Path(tempfile.mkdtemp(prefix="derprop-cost-"))
from lowlabel.bench import load_protocol, cells
from lowlabel.config import load_config
from lowlabel.api import fit
proto = load_protocol("benchmarks/protocols/acdc-cpu-1500.yaml")
base = [c for c in cells(proto) if c["cell"] == "derprop_unimatch__ssl-labeled-3__s0"][0]["raw"]
variants = {"d64": {"proj_dim": 64}, "d32": {"proj_dim": 32}, "d16": {"proj_dim": 16}}
res = {}
for rep in range(2):
    for name, over in variants.items():
        raw = copy.deepcopy(base)
        raw["method"]["params"].update(over)
        raw["name"] = f"{name}_{rep}"; raw["out_dir"] = str(OUT / "runs")
        raw["train"].update(iterations=6, log_every=1, val_every=1000, checkpoint_every=1000, grad_norm_every=1000)
        cfg = load_config(raw=raw)
        run = fit(cfg, progress=False)
        recs = [json.loads(l) for l in open(OUT / "runs" / raw["name"] / "metrics.jsonl")]
        ts = [r["time"] for r in recs if "time" in r and "val" not in r]
        d = [b - a for a, b in zip(ts, ts[1:])][1:-1]
        res.setdefault(name, []).extend(d)
        print(name, rep, [round(x, 2) for x in d], flush=True)
medians = {k: round(statistics.median(v), 2) for k, v in res.items()}
print(medians)
dest = Path("benchmarks/results/derprop-cost")
dest.mkdir(parents=True, exist_ok=True)
(dest / "derprop_cost.json").write_text(json.dumps({"date": str(date.today()), "machine": platform.processor() or platform.machine(),
    "threads": 1, "cell": "acdc-cpu-1500 derprop_unimatch__ssl-labeled-3__s0", "seconds_per_step": res, "median": medians}, indent=2) + "\n")
