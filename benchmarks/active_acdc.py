"""active-acdc-cpu: do cases chosen by `lowlabel suggest` beat randomly chosen ones at the same
label count? (issue 40, item 4)

The loop, on the public semi-supervised ACDC split (70 training patients):
  1. start: labeled-only training on 1 labeled patient (ssl-labeled-1.txt, patient 99), with the
     recipe of benchmarks/protocols/acdc-cpu-1500.yaml's `supervised` row (2D UNet from scratch,
     128², 1,500 iterations, ce + Dice; read from that file, so the recipe is the same);
  2. each strategy of `lowlabel suggest` picks 2 more patients (`group_by ^(patient\\d+)_`, both
     frames of a patient are one case, a case's score is the mean of its slices'), from the
     69 other training patients, with the start model;
  3. labeled-only training again on the 3 patients (same recipe, same training seed 0);
  4. test Dice per volume (ssl-test, 20 patients, mean over foreground classes).
  Rows: every strategy, `random` with 3 seeded draws (the reference a strategy must beat), the
  public 3-patient split (ssl-labeled-3: patients 99, 38, 50) trained the same way, and the
  start model. Then (--phase unimatch) the strategy with the best *validation* Dice and the 3
  random draws once more with UniMatch (acdc-cpu-1500's `unimatch` row) on the same picks: do
  the gains of choosing and of semi-supervision add up?
  Steps 2-4 are `lowlabel.label.simulate` (what `lowlabel suggest --simulate` runs on a user's
  data); this script adds the start and reference trainings, the report and the plot.

Done when (issue 40): a suggested row >= the mean of the random rows + 3 Dice points; otherwise
results.md shows, per strategy, the cases it chose, their scores, and the per-class Dice.

Cost, measured (`python benchmarks/active_acdc.py --measure`, one torch thread, fp32, on the 2-core
AMD EPYC VM shared with other sessions, load ~1.2, 2026-12-03; not a full cell): 0.85 s per
training step (median of 17 steps after 3 warm-up), 0.039 s per slice of prediction (the entropy
suggestion, validation and test), 0.016 s per slice of pooled features. One 1,500-iteration
labeled-only cell is therefore about 24 min (1,500 x 0.85 s + 15 validations of 210 slices + the
test's 380 slices); acdc-cpu-1500's two recorded labeled-only cells took 33 and 43 min, on the same
kind of VM under more contention, so plan 25-45 min a cell. A suggestion over the 1,280 pool
slices takes ~1 min (entropy, margin, balanced-*: one pass a slice), ~1.5 min (coreset, hybrid:
+ features), ~7 min (bald: 8 dropout passes); a 60-slice bald probe with 2 passes took 25 s.
Phase `strategies`: 7 strategies + 3 random draws + start + reference = 12 labeled-only cells,
about 5-9 h on one thread; phase `unimatch`: 4 cells of ~85-125 min (acdc-cpu-1500's records).
Not run in the session that wrote this script.

Run (resumable: finished runs are reused, an interrupted one resumed):
    python benchmarks/active_acdc.py                  # phases start, strategies, report
    python benchmarks/active_acdc.py --phase unimatch # then UniMatch on the best strategy's and random's picks
    python benchmarks/active_acdc.py --measure        # the timing probe of the header (a few minutes)
Results: benchmarks/results/active-acdc-cpu/ (results.json, results.md, score_vs_labels.png,
loop/<arm>/round1/picks.csv with every case's score, runs/).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "benchmarks" / "protocols" / "acdc-cpu-1500.yaml"
OUT = REPO / "benchmarks" / "results" / "active-acdc-cpu"
SPLITS = "../shared/datasets/acdc-scribbles/splits"
STRATEGIES = ["entropy", "margin", "balanced-entropy", "balanced-margin", "bald", "coreset", "hybrid"]
RANDOM_SEEDS = [0, 1, 2]
BUDGET = 2  # patients added to the 1 labeled one
GROUP_BY = r"^(patient\d+)_"
SEED = 0  # training seed of every cell


def recipe(method: str = "supervised") -> dict:
    """acdc-cpu-1500's config with its ``method`` row merged in."""
    from lowlabel.bench import load_protocol
    from lowlabel.config import merge_raw

    proto = load_protocol(PROTOCOL)
    over = copy.deepcopy(proto["methods"][method])
    for k in ("fractions", "seeds"):
        over.pop(k, None)
    raw = merge_raw(proto["config"], over)
    raw["train"] = {**raw["train"], "seed": SEED}
    raw["data"] = {**raw["data"], "split_seed": SEED}
    return raw


def train(name: str, labeled: str, method: str = "supervised", iterations: int | None = None):
    from lowlabel import fit
    from lowlabel.config import load_config
    from lowlabel.engine.run import Run

    raw = recipe(method)
    raw.update(name=name, out_dir=str(OUT / "runs"))
    raw["data"] = {**raw["data"], "labeled": labeled}
    if iterations:
        raw["train"] = {**raw["train"], "iterations": iterations}
    cfg = load_config(raw=raw)
    run_dir = Path(cfg.out_dir) / cfg.name
    if (run_dir / "summary.json").is_file():
        return Run.load(run_dir)
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return fit(resume=run_dir)
    return fit(cfg)


def evaluate(run) -> dict:
    path = Path(run.run_dir) / "test.json"
    if path.is_file():
        return json.loads(path.read_text())
    from lowlabel.utils import atomic_write_json

    scores = run.evaluate(split="ssl-test")
    rec = {k: scores.get(k) for k in ("dice_mean", "miou", "per_class_dice", "per_class_iou")}
    summary = json.loads((Path(run.run_dir) / "summary.json").read_text())
    rec["summary"] = {k: summary.get(k) for k in ("best_val_dice_mean", "best_iteration", "iterations", "seconds")}
    atomic_write_json(path, rec)
    return rec


def phase_strategies(start):
    from lowlabel.label import simulate

    return simulate(start, budget=BUDGET, strategies=STRATEGIES, out=OUT / "loop", random_seeds=RANDOM_SEEDS, split="ssl-test",
                    group_by=GROUP_BY, aggregate="mean", progress=True)


def phase_unimatch(start):
    from lowlabel.label import simulate

    loop = json.loads((OUT / "loop" / "simulate.json").read_text())
    arms = [a for a in loop["arms"] if a["strategy"] != "random"]
    best = max(arms, key=lambda a: a["summary"].get("best_val_dice_mean") or -1)  # chosen on validation, not on test
    raw = recipe("unimatch")
    overrides = [f"method={json.dumps(raw['method'])}", "data.unlabeled_gt=true"]
    return simulate(start, budget=BUDGET, strategies=[best["strategy"]], out=OUT / "loop-unimatch", random_seeds=RANDOM_SEEDS, split="ssl-test",
                    group_by=GROUP_BY, aggregate="mean", overrides=overrides, progress=True)


def report(start_rec: dict, ref_rec: dict) -> dict:
    from lowlabel.utils import atomic_write_json, atomic_write_text

    rows = [{"row": "start (1 case)", "cases": 1, "dice": start_rec["dice_mean"], "per_class_dice": start_rec["per_class_dice"], "picks": []},
            {"row": "public split (ssl-labeled-3)", "cases": 3, "dice": ref_rec["dice_mean"], "per_class_dice": ref_rec["per_class_dice"],
             "picks": ["patient038", "patient050"]}]
    verdicts = []
    for folder, label in (("loop", "labeled-only"), ("loop-unimatch", "UniMatch")):
        path = OUT / folder / "simulate.json"
        if not path.is_file():
            continue
        sim = json.loads(path.read_text())
        rand = [a["score"] for a in sim["arms"] if a["strategy"] == "random"]
        mean = statistics.fmean(rand)
        for a in sim["arms"]:
            case_scores = _case_scores(OUT / folder / a["arm"] / "round1" / "picks.csv", a["picks"])
            rows.append({"row": f"{a['arm']} ({label})", "cases": 3, "dice": a["score"], "per_class_dice": a["test"].get("per_class_dice"),
                         "picks": a["picks"], "pick_scores": case_scores, "val_dice": a["summary"].get("best_val_dice_mean"),
                         "gain_over_random_mean": a["score"] - mean})
        best = max((a for a in sim["arms"] if a["strategy"] != "random"), key=lambda a: a["score"])
        verdicts.append({"training": label, "random_mean": mean, "random_std": statistics.stdev(rand) if len(rand) > 1 else 0.0,
                         "best_strategy": best["strategy"], "best_dice": best["score"], "meets_plus_3": best["score"] >= mean + 0.03})
    res = {"protocol": "active-acdc-cpu", "budget_cases": BUDGET, "group_by": GROUP_BY, "rows": rows, "verdicts": verdicts}
    atomic_write_json(OUT / "results.json", res)
    atomic_write_text(OUT / "results.md", _markdown(res))
    _plot(res)
    return res


def _case_scores(csv_path: Path, picks: list[str]) -> dict:
    import csv

    if not csv_path.is_file():
        return {}
    with open(csv_path) as f:
        return {r["id"]: float(r["score"]) for r in csv.DictReader(f) if r["id"] in picks and r.get("score")}


def _markdown(res: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["# active-acdc-cpu: suggested vs random cases (test Dice per volume, %)", "",
             "| row | cases | test Dice | gain over random mean | val Dice | picks (score) | per-class Dice |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        picks = ", ".join(f"{p} ({r.get('pick_scores', {}).get(p, float('nan')):.3g})" if r.get("pick_scores") else p for p in r["picks"])
        per = ", ".join(f"{k} {pct(v)}" for k, v in (r.get("per_class_dice") or {}).items())
        gain = r.get("gain_over_random_mean")
        lines.append(f"| {r['row']} | {r['cases']} | {pct(r['dice'])} | {'-' if gain is None else f'{100 * gain:+.1f}'} | {pct(r.get('val_dice'))} | {picks} | {per} |")
    lines += [""]
    for v in res["verdicts"]:
        lines.append(f"- {v['training']}: random {pct(v['random_mean'])} ± {pct(v['random_std'])}; best strategy {v['best_strategy']} "
                     f"{pct(v['best_dice'])}: {'meets' if v['meets_plus_3'] else 'misses'} the +3 Dice bar of issue 40.")
    return "\n".join(lines) + "\n"


def _plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    start = next(r for r in res["rows"] if r["cases"] == 1)["dice"]
    rand = [r["dice"] for r in res["rows"] if r["row"].startswith("random") and "labeled-only" in r["row"]]
    for r in res["rows"]:
        if r["cases"] == 3 and not r["row"].startswith(("random", "public")) and "labeled-only" in r["row"]:
            ax.plot([1, 3], [100 * start, 100 * r["dice"]], "o-", lw=1, label=r["row"].split(" ")[0])
    if rand:
        ax.errorbar([3.05], [100 * statistics.fmean(rand)], yerr=[100 * (statistics.stdev(rand) if len(rand) > 1 else 0)], fmt="ks", capsize=4,
                    label=f"random (mean ± std of {len(rand)})")
    ref = next(r for r in res["rows"] if r["row"].startswith("public"))
    ax.plot([2.95], [100 * ref["dice"]], "k^", label="public 3-case split")
    ax.set_xticks([1, 3])
    ax.set_xlabel("labeled cases (patients)")
    ax.set_ylabel("test Dice per volume (%)")
    ax.set_title("active-acdc-cpu: labeled-only, 1 -> 3 cases")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "score_vs_labels.png", dpi=110)
    plt.close(fig)


def measure(steps: int = 20, slices: int = 40) -> dict:
    """The header's numbers: seconds per training step of the recipe (after 3 warm-up steps),
    and seconds per slice of the entropy suggestion (prediction) and of the pooled features."""
    import shutil

    import torch

    from lowlabel.data.dataset import read_ids
    from lowlabel.label import suggest

    torch.set_num_threads(1)
    tmp = OUT / "measure"
    shutil.rmtree(tmp, ignore_errors=True)
    from lowlabel import fit
    from lowlabel.config import load_config

    raw = recipe()
    raw.update(name="measure", out_dir=str(tmp))
    raw["data"] = {**raw["data"], "labeled": f"{SPLITS}/ssl-labeled-1.txt"}
    raw["train"] = {**raw["train"], "iterations": steps, "val_every": 0, "checkpoint_every": steps, "log_every": 1, "grad_norm_every": 0}
    t0 = time.time()
    run = fit(load_config(raw=raw), progress=False)
    records = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
    times = [(r["iteration"], r["time"]) for r in records if "time" in r and "val" not in r]
    step = statistics.median([(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(times[3:]) if b[0] > a[0]])
    fit_s = time.time() - t0
    pool = read_ids(REPO / SPLITS / "ssl-train.txt")
    lab = set(read_ids(REPO / SPLITS / "ssl-labeled-1.txt"))
    pool = [i for i in pool if i not in lab][:slices]
    t1 = time.time()
    suggest(run, pool, 1, "entropy", heatmaps=False)
    per_slice = (time.time() - t1) / len(pool)
    t2 = time.time()
    suggest(run, pool, 1, "coreset", heatmaps=False)
    per_feat = (time.time() - t2) / (len(pool) + len(lab))  # coreset also encodes the labeled slices
    n_pool, n_val, n_test = 1312 - len(lab), 210, 380
    cell = step * 1500 + per_slice * (15 * n_val + n_test)
    out = {"threads": 1, "step_seconds": round(step, 3), "seconds_per_slice_prediction": round(per_slice, 4),
           "seconds_per_slice_features": round(per_feat, 4), "pool_slices": n_pool,
           "suggest_entropy_minutes": round(per_slice * n_pool / 60, 1), "cell_minutes": round(cell / 60, 1),
           "probe_fit_seconds": round(fit_s, 1), "steps_timed": steps, "slices_timed": len(pool), "machine_cpus": os.cpu_count()}
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", default="all", choices=["all", "start", "strategies", "unimatch", "report"])
    p.add_argument("--measure", action="store_true", help="time one step and one slice (the header's numbers) and exit")
    args = p.parse_args(argv)
    os.chdir(REPO)  # the protocol's data.root is relative to the repository
    if args.measure:
        print(json.dumps(measure(), indent=2))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    start = train("start__ssl-labeled-1__s0", f"{SPLITS}/ssl-labeled-1.txt")
    start_rec = evaluate(start)
    if args.phase in ("all", "strategies"):
        phase_strategies(start)
    if args.phase == "unimatch":
        phase_unimatch(start)
    ref = train("reference__ssl-labeled-3__s0", f"{SPLITS}/ssl-labeled-3.txt") if args.phase in ("all", "strategies", "report", "unimatch") else None
    if ref is not None:
        res = report(start_rec, evaluate(ref))
        print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
