"""How strong is SSR-SAM's prompt perturbation in a trained run?

Finding (results/dubai-aerial-ssr-sam-cpu/prompt_probe.jsonl): from scratch it is inert. The
prompt term's loss is a median 0.003-0.009 against the labeled loss's 0.60-0.70 (about 1 %), though
most classes' banks are diverse (mean pairwise cosine 0.05-0.6) and drawing 8 of 64 prompts moves
the compressed prompt by 2-174 % of its norm: the ablation's prompt-only rows are labeled-only
training in all but name.

For each class of the run's prompt bank: the mean pairwise cosine of its prompts; the effective
number of prompts the compression query attends to (exp of the attention's entropy); the relative
change of the compressed prompt when the student's k prompts are drawn with replacement (eq. 13),
averaged over draws. From the run's log: the medians of the prompt-perturbation loss and the
labeled loss, over the whole run and its second half.

    python benchmarks/probes/ssr_sam_prompt_probe.py RUN_DIR [RUN_DIR ...] [--k 8] [--draws 20]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lowlabel.engine.run import Run
from lowlabel.models.ssr_sam import sample_prompts


def probe(run_dir: Path, k: int, draws: int) -> dict:
    model = Run.load(run_dir).model
    bank, comp = model.bank.all(), model.compression
    out = {"run": run_dir.name, "classes": {}}
    with torch.no_grad():
        full, _ = comp(bank)
        change = torch.stack([(comp(sample_prompts(bank, k))[0] - full).flatten(1).norm(dim=1) for _ in range(draws)]).mean(0)
        change = change / full.flatten(1).norm(dim=1).clamp_min(1e-12)
        for c, tokens in enumerate(bank):
            if len(tokens) < 2:
                continue
            unit = torch.nn.functional.normalize(tokens.float(), dim=1)
            cos = (unit @ unit.T)[~torch.eye(len(tokens), dtype=torch.bool)]
            att, _ = comp.attention(c, tokens)
            attended = torch.exp(-(att * att.clamp_min(1e-12).log()).sum(-1)).mean()
            out["classes"][c] = {"prompts": len(tokens), "mean_cosine": round(float(cos.mean()), 3),
                                 "attended": round(float(attended), 1), "compressed_change": round(float(change[c]), 3)}
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss_x" in r]
    half = [r for r in steps if r["iteration"] >= steps[-1]["iteration"] / 2]
    for key in ("loss_x", "loss_pp", "loss_fp", "loss_s", "mask_ratio"):
        for name, rows in (("all", steps), ("second_half", half)):
            vals = [r[key] for r in rows if key in r]
            if vals:
                out[f"{key}_median_{name}"] = round(float(np.median(vals)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--k", type=int, default=8, help="prompts drawn per class (the method's prompt_samples)")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    for run in args.runs:
        print(json.dumps(probe(run, args.k, args.draws)))


if __name__ == "__main__":
    main()
