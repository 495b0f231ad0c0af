"""``lowlabel bench PROTOCOL.yaml``: every cell of a protocol, resumable, with committed results.

A protocol (YAML)::

    name: camvid-cpu
    split: test                 # evaluation split
    fractions: ["1/8"]          # labeled fractions (or counts) of the train split
    seeds: [0, 1]               # each seed sets train.seed and data.split_seed (cells run seed-major)
    config: {...}               # a complete config shared by every cell (data, model, optim, train, eval)
    methods:                    # cell name -> overrides of `config`
      supervised: {method: {name: supervised}}
      unimatch: {method: {name: unimatch}}
      full: {method: {name: supervised}, fractions: ["1"]}
      ablation: {method: {...}, seeds: [0]}
      scratch: {method: {...}, what: "SSR-SAM recipe, scratch encoder"}   # said beside the row's name in results.md
    calibration_images: 200     # optional (default 200; 0: off), see below

Each cell runs in its own process (so its peak resident memory is its own), trains, takes the
best-on-validation checkpoint, evaluates it on ``split`` and writes ``cells/<cell>.json``. A cell
whose JSON exists is skipped; one with a checkpoint but no JSON is resumed. ``results.json``,
``results.md`` (mean ± std over seeds) and the plots are rebuilt from all cell JSONs at the end.

A semantic cell whose run has unlabeled images with masks (the train images it did not train on,
for a labeled-only row; a fully annotated dataset) also scores its evaluated model's confidences on
``calibration_images`` of them, spread over the list (:meth:`lowlabel.engine.run.Run.calibrate`: ECE, and per class what the 0.95
threshold keeps): the source of its pseudo-labels at the end of training, in results.md's
"Confidence on the unlabeled images" section.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import resource
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .config import load_config, merge_raw, task_of
from .data.dataset import read_ids
from .data.weak import FOLDERS, annotation_hours
from .engine.reference import LABELED_ONLY_METHODS
from .utils import atomic_write_json, atomic_write_text, console, remove_orphan_temps


def label_kind(weak: str | None) -> str | None:
    """The annotation kind of a run's labels: ``fine`` for dense masks, ``point`` / ``scribble`` /
    ``coarse`` for the weak-label folders of those names; None for other folders (e.g. a
    ``refine`` output, whose cost is that of the labels it was refined from)."""
    if not weak:
        return "fine"
    return {folder: kind for kind, folder in FOLDERS.items()}.get(weak)


def load_protocol(path: str | Path) -> dict:
    path = Path(path)
    proto = yaml.safe_load(path.read_text())
    for key in ("name", "config", "methods", "seeds"):
        if key not in proto:
            raise ValueError(f"{path}: protocol lacks {key!r}")
    proto.setdefault("split", "test")
    proto.setdefault("fractions", [proto["config"]["data"].get("labeled", "1")])
    return proto


def cells(proto: dict) -> list[dict]:
    """Every (method, fraction, seed) cell with its complete raw config, seed-major (every
    method's first seed before any second seed), so a partial run already covers every row.
    A method may narrow ``fractions`` and ``seeds`` (e.g. one seed for an ablation)."""
    out = []
    for mname, over in proto["methods"].items():
        over = copy.deepcopy(over or {})
        fractions = over.pop("fractions", proto["fractions"])
        seeds = over.pop("seeds", proto["seeds"])
        over.pop("what", None)
        for frac in fractions:
            for seed in seeds:
                raw = merge_raw(proto["config"], over)
                raw["data"] = {**raw["data"], "labeled": str(frac), "split_seed": seed}
                raw["train"] = {**raw.get("train", {}), "seed": seed}
                fr = Path(str(frac)).stem if str(frac).endswith(".txt") else str(frac).replace("/", "-")
                name = f"{mname}__{fr}__s{seed}"
                raw["name"] = name
                out.append({"cell": name, "method": mname, "fraction": str(frac), "seed": seed, "raw": raw,
                            "calibration_images": int(proto.get("calibration_images", 200))})
    order = {s: i for i, s in enumerate(proto["seeds"])}
    return sorted(out, key=lambda c: order.get(c["seed"], len(order)))


def git_commit() -> str | None:
    """HEAD of the checkout lowlabel runs from, with ``+dirty`` when tracked source files differ.
    A copy without its git folder (a working tree sent to a GPU machine) has none; there the
    sender's ``LOWLABEL_COMMIT`` names it, or the result says null."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LOWLABEL_COMMIT")
    return head + ("+dirty" if dirty else "")


def is_pseudo_key(key: str) -> bool:
    """Training metrics that describe the pseudo-labels: their accuracy against the diagnostic
    masks of the unlabeled images (``acc_*``, class-mean IoU ``miou_*``) and the share of pixels a
    rule keeps (``*_ratio``)."""
    return key.startswith(("acc_", "miou_")) or key.endswith("_ratio")


def step_seconds(records: list[dict]) -> float | None:
    """Seconds per training step: the median over logging intervals of elapsed time / steps.
    The median leaves out the intervals that contain a validation or a checkpoint, so this is
    the training throughput, unlike wall time / iterations (``seconds_per_iteration``)."""
    pts = [(r["iteration"], r["time"]) for r in records if "time" in r and "val" not in r]
    rates = [(t1 - t0) / (i1 - i0) for (i0, t0), (i1, t1) in zip(pts, pts[1:]) if i1 > i0 and t1 > t0]
    return round(statistics.median(rates), 4) if rates else None


def _run_cell(cell: dict, out_dir: str, split: str, report) -> None:
    """Train (or resume) one cell, evaluate its best checkpoint, put the record on ``report`` (in a child process, or in this one with ``in_process``)."""
    try:
        import torch

        from .api import fit
        from .engine.run import Run

        raw = copy.deepcopy(cell["raw"])
        raw["out_dir"] = str(Path(out_dir) / "runs")
        cfg = load_config(raw=raw)
        run_dir = Path(cfg.out_dir) / cfg.name
        if (run_dir / "checkpoints" / "last.pt").exists():
            fit(resume=run_dir, progress=False)
        else:
            fit(cfg, progress=False)
        summary = json.loads((run_dir / "summary.json").read_text())
        train_seconds = summary["seconds"]  # every segment of a resumed run (of its timed_iterations, for an old checkpoint)
        run = Run.load(run_dir)
        t1 = time.time()
        test = run.evaluate(split=split)
        eval_seconds = time.time() - t1
        calibration = _unlabeled_calibration(run, run_dir, test, cell.get("calibration_images", 200))
        hist, pseudo_acc = [], {}
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for rec in records:
            if "val" in rec:  # [iteration, mIoU, Dice]; an instance run: [iteration, AP, None]
                hist.append([rec["iteration"], rec["val"].get("miou", rec["val"].get("ap")), rec["val"].get("dice_mean")])
            for k, v in rec.items():
                if is_pseudo_key(k):
                    pseudo_acc.setdefault(k, []).append([rec["iteration"], v])
        from .methods import get_method_class

        mcls = get_method_class(cfg.method.name, task_of(cfg))
        imgs_per_iter = cfg.data.labeled_batch + (cfg.data.unlabeled_batch if mcls.uses_unlabeled else 0)
        labeled_list = run_dir / "splits" / "labeled.txt"
        labeled_images = len(read_ids(labeled_list)) if labeled_list.exists() else None
        spi = summary["seconds_per_iteration"]
        step = step_seconds(records)
        report.put({
            **{k: cell[k] for k in ("cell", "method", "fraction", "seed")},
            "method_name": cfg.method.name,
            "labeled_images": labeled_images, "label_kind": label_kind(cfg.data.weak),
            "test_miou": test.get("miou"), "test_per_class_iou": test.get("per_class_iou", {}), "test_pixel_accuracy": test.get("pixel_accuracy"),
            **({f"test_{k}": test[k] for k in ("ap", "ap50", "ap75", "count_mae", "instances", "predicted_instances")} if test.get("task") == "instance" else {}),
            "dice_mean": test.get("dice_mean"), "dice_by": test.get("dice_by"), "test_per_class_dice": test.get("per_class_dice"),
            "dice_mean_pooled": test.get("dice_mean_pooled"),
            "best_val_miou": summary["best_val_miou"], "best_val_dice_mean": summary.get("best_val_dice_mean"),
            "select": summary.get("select", "miou"), "best_iteration": summary["best_iteration"],
            "iterations": summary["iterations"], "train_seconds": round(train_seconds, 1),
            "seconds_per_iteration": spi, "step_seconds": step, "images_per_iteration": imgs_per_iter,
            "images_per_second": round(imgs_per_iter / step, 3) if step else None,
            "eval_seconds": round(eval_seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **({"unlabeled_calibration": calibration} if calibration else {}),
            "val_history": hist, "pseudo_accuracy_history": pseudo_acc, "device": summary["device"], "torch_threads": torch.get_num_threads(),
            "precision": summary.get("precision"), "channels_last": summary.get("channels_last"),
            "config": cfg.model_dump(mode="json"),
        })
    except BaseException as err:  # report, do not hang the parent
        import traceback

        report.put({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})


def _unlabeled_calibration(run, run_dir: Path, test: dict, images: int) -> dict | None:
    """The evaluated model's calibration on ``images`` of the run's unlabeled images (those with
    masks; for a labeled-only run, the train images it did not train on); None for an instance
    run, a run without split lists or ``images`` 0; ``{"error": ...}`` when they cannot be scored
    (none unlabeled, no masks)."""
    from .errors import DatasetError

    if not images or test.get("task") == "instance" or not any((run_dir / "splits" / f).is_file() for f in ("unlabeled.txt", "labeled.txt")):
        return None
    t0 = time.time()
    try:
        cal = run.calibrate(unlabeled=True, max_images=images)
    except (DatasetError, FileNotFoundError, ValueError) as err:
        return {"error": str(err).splitlines()[0][:300]}
    cal.pop("checkpoint", None)
    cal["seconds"] = round(time.time() - t0, 1)
    return cal


def run_protocol(path: str | Path, out: str | Path | None = None, only: list[str] | None = None, progress: bool = True,
                 in_process: bool = False) -> dict:
    """Run the protocol's cells not done yet, each in a fresh child process (``in_process``: in
    this one), then aggregate. On the lent H100 machine, four spawned cells with
    ``OMP_NUM_THREADS=2`` ran at 6.7 s per step where the same training in-process without it ran
    at 0.16; which of the two differences caused it was not isolated."""
    proto = load_protocol(path)
    out = Path(out or Path("benchmarks") / "results" / proto["name"])
    (out / "cells").mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(out, out / "cells")  # left by a killed run's atomic writes
    con = console()
    todo = [c for c in cells(proto) if not only or c["method"] in only or c["cell"] in only]
    ctx = mp.get_context("spawn")
    for i, cell in enumerate(todo):
        dest = out / "cells" / f"{cell['cell']}.json"
        if dest.exists():
            con.print(f"[{i + 1}/{len(todo)}] {cell['cell']}: done already, skipped")
            continue
        con.print(f"[{i + 1}/{len(todo)}] {cell['cell']}: training ({cell['raw']['train'].get('iterations')} iterations)")
        commit = git_commit()  # the code the cell runs (its process imports it now)
        if in_process:
            q = queue.SimpleQueue()
            _run_cell(cell, str(out), proto["split"], q)
            res = q.get()
        else:
            q = ctx.Queue()
            p = ctx.Process(target=_run_cell, args=(cell, str(out), proto["split"], q))
            p.start()
            res = q.get()
            p.join()
        if "error" in res:
            raise RuntimeError(f"cell {cell['cell']} failed: {res['error']}\n{res['traceback']}")
        res.update({
            "protocol": proto["name"], "commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} ({mp.cpu_count()} cores)".strip(),
        })
        atomic_write_json(dest, res)
        score = f"test AP {100 * (res['test_ap'] or 0):.2f}" if "test_ap" in res else f"test mIoU {100 * (res['test_miou'] or 0):.2f}"
        con.print(f"    {score}, {res['train_seconds']:.0f} s, {res['images_per_second']} img/s, peak {res['peak_rss_mb']} MB")
    return aggregate(out, proto)


def cell_precision(rec: dict) -> str:
    """The precision a cell trained in: its record's, or for a cell from before
    ``train.precision`` the one that code used (fp16 autocast on CUDA with amp, else fp32)."""
    if rec.get("precision"):
        return rec["precision"]
    from .precision import legacy_precision

    return legacy_precision("cuda" if str(rec.get("device", "cpu")).startswith("cuda") else "cpu", (rec.get("config") or {}).get("train", {}).get("amp", "auto"))


def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(out: str | Path, proto: dict | None = None) -> dict:
    """Rebuild results.json, results.md and the plots from the cell JSONs in ``out/cells``."""
    out = Path(out)
    rows = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["fraction"]), []).append(r)
    order = list(proto["methods"]) if proto else sorted({m for m, _ in groups})
    table = []
    for (m, f), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1])):
        mi, sd = _mean_std([r["test_miou"] for r in rs])
        classes = list(rs[0]["test_per_class_iou"])
        per_class = {c: _mean_std([r["test_per_class_iou"][c] for r in rs])[0] for c in classes}
        by_seed = sorted(rs, key=lambda r: r["seed"])
        dice = {}
        if all(r.get("dice_mean") is not None for r in rs):
            dm, ds = _mean_std([r["dice_mean"] for r in rs])
            dice = {
                "dice_mean": dm, "dice_std": ds, "dice_per_seed": [r["dice_mean"] for r in by_seed], "dice_by": rs[0].get("dice_by"),
                "per_class_dice_mean": {c: _mean_std([(r.get("test_per_class_dice") or {}).get(c) for r in rs])[0] for c in classes},
            }
        ap = {}
        if all("test_ap" in r for r in rs):
            am, asd = _mean_std([r["test_ap"] for r in rs])
            ap = {"ap_mean": am, "ap_std": asd, "ap_per_seed": [r["test_ap"] for r in by_seed],
                  **{f"{k}_mean": _mean_std([r[f"test_{k}"] for r in rs])[0] for k in ("ap50", "ap75", "count_mae")}}
        what = ((proto or {}).get("methods", {}).get(m) or {}).get("what")
        table.append({
            "method": m, **({"what": what} if what else {}), "fraction": f, "seeds": sorted(r["seed"] for r in rs), "test_miou_mean": mi, "test_miou_std": sd,
            "test_miou_per_seed": [r["test_miou"] for r in by_seed],
            "per_class_iou_mean": per_class, **dice, **ap,
            "seconds_per_iteration": _mean_std([r["seconds_per_iteration"] for r in rs])[0],
            "step_seconds": _mean_std([r.get("step_seconds") for r in rs])[0],
            "torch_threads": sorted({r.get("torch_threads") for r in rs if r.get("torch_threads")}),
            "precision": sorted({cell_precision(r) for r in rs}),
            "images_per_second": _mean_std([r["images_per_second"] for r in rs])[0],
            "train_minutes": _mean_std([r["train_seconds"] / 60 for r in rs])[0],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "pseudo_labels": _late_pseudo_means(rs),
            **_calibration_means(rs),
            **_annotation(rs),
        })
    _weak_vs_fine(table, proto)
    _against_labeled_only(table, proto)
    results = {"protocol": proto["name"] if proto else out.name, "rows": table, "cells": len(rows),
               "commits": sorted({r["commit"] for r in rows if r.get("commit")}), "machines": sorted({r["machine"] for r in rows})}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown_table(results))
    if rows:
        plot_results(out, table, rows)
    return results


def _annotation(rs: list[dict]) -> dict:
    """Labeled images and their annotation time (SeSAM's per-image costs, ``data.weak.COST_SECONDS``)
    of a row, where its cells recorded them."""
    kinds = {r.get("label_kind") for r in rs}
    counts = [r.get("labeled_images") for r in rs]
    if len(kinds) != 1 or None in kinds or None in counts:
        return {}
    kind = kinds.pop()
    images = statistics.fmean(counts)
    return {"label_kind": kind, "labeled_images": images, "annotation_hours": annotation_hours(kind, 1) * images}


def _score_key(table: list[dict]) -> str:
    if all("ap_mean" in r for r in table):
        return "ap_mean"
    return "dice_mean" if all("dice_mean" in r for r in table) else "test_miou_mean"


def _weak_vs_fine(table: list[dict], proto: dict | None) -> None:
    """WvF (weak vs fine, SeSAM Table 1): each row's score over the reference row's (the
    protocol's ``reference`` method, by default a method named ``full``), same budget."""
    ref_name = (proto or {}).get("reference", "full")
    ref = next((r for r in table if r["method"] == ref_name), None)
    if not table or ref is None:
        return
    key = _score_key(table)
    for r in table:
        r["wvf"] = r[key] / ref[key] if ref[key] else None
        r["wvf_reference"] = ref_name


def labeled_only_rows(proto: dict | None) -> set[str]:
    """The protocol's labeled-only rows: ``labeled_only: NAME`` (or a list), else every method
    entry whose ``method.name`` is a labeled-only method (``supervised``, ``ssr_sam_labeled``)."""
    proto = proto or {}
    if "labeled_only" in proto:
        named = proto["labeled_only"]
        return set([named] if isinstance(named, str) else named or [])
    out = set()
    for name, over in (proto.get("methods") or {}).items():
        method = merge_raw(proto.get("config") or {}, {k: v for k, v in (over or {}).items() if k not in ("seeds", "fractions", "what")}).get("method") or {}
        if method.get("name", "supervised") in LABELED_ONLY_METHODS:
            out.add(name)
    return out


def _against_labeled_only(table: list[dict], proto: dict | None) -> None:
    """Each row that is not labeled-only gets ``vs_labeled_only``: its mean test score minus that
    of the labeled-only row with the same labeled set and label kind (the first such row in the
    protocol's order), and ``labeled_only_row``: that row's name. A gain is only claimed where it
    is positive: ``helped`` False says plainly that semi-supervision did not help there."""
    if not table:
        return
    refs = labeled_only_rows(proto)
    key = _score_key(table)
    for r in table:
        if r["method"] in refs:
            continue
        ref = next((t for t in table if t["method"] in refs and t["fraction"] == r["fraction"] and t.get("label_kind", "fine") == r.get("label_kind", "fine")), None)
        if ref is None or r.get(key) is None or ref.get(key) is None:
            continue
        r["vs_labeled_only"] = r[key] - ref[key]
        r["labeled_only_row"] = ref["method"]
        r["helped"] = r["vs_labeled_only"] > 0


def _late_pseudo_means(rs: list[dict]) -> dict[str, float]:
    """Each pseudo-label metric averaged over the second half of training, then over seeds
    (single batches are noisy; the second half is where the methods differ)."""
    out = {}
    keys = sorted({k for r in rs for k in r.get("pseudo_accuracy_history", {})})
    for k in keys:
        per_seed = []
        for r in rs:
            h = r.get("pseudo_accuracy_history", {}).get(k, [])
            late = [v for it, v in h if it > r["iterations"] / 2]
            if late:
                per_seed.append(statistics.fmean(late))
        if per_seed:
            out[k] = statistics.fmean(per_seed)
    return out


def _calibration_means(rs: list[dict]) -> dict:
    """``calibration``: the seeds' mean ECE, kept share and its accuracy, and per class the kept
    pixels' recall and precision (percent), over the cells that scored their unlabeled images."""
    cals = [r["unlabeled_calibration"] for r in rs if (r.get("unlabeled_calibration") or {}).get("ece") is not None]
    if not cals:
        return {}

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return statistics.fmean(vals) if vals else None

    out = {k: mean([c[k] for c in cals]) for k in ("ece", "kept", "kept_accuracy", "accuracy")}
    out["threshold"], out["images"], out["seeds"] = cals[0]["threshold"], cals[0]["images"], len(cals)
    out["per_class"] = {name: {k: mean([c["per_class"].get(name, {}).get(k) for c in cals]) for k in ("recall", "precision")}
                        for name in cals[0]["per_class"]}
    return {"calibration": out}


def _labeled_name(fraction: str) -> str:
    """A fraction or count as it is; a labeled.txt path by its file name."""
    return Path(fraction).stem if fraction.endswith(".txt") else fraction


def row_name(row: dict) -> str:
    """A results row's method name, with what the row is when its protocol says so (``what:``),
    e.g. ``ssr_sam (SSR-SAM recipe, scratch encoder)``."""
    return f"{row['method']} ({row['what']})" if row.get("what") else row["method"]


def verdict(rows: list[dict]) -> str:
    """One plain sentence on whether semi-supervision paid on these rows (``vs_labeled_only``)."""
    compared = [r for r in rows if "vs_labeled_only" in r]
    if not compared:
        return ""
    lost = [r for r in compared if not r["helped"]]
    if not lost:
        return "Every row is above its labeled-only row."
    names = ", ".join(f"{r['method']} {_labeled_name(r['fraction'])} ({100 * r['vs_labeled_only']:+.1f})" for r in lost)
    what = "Semi-supervision did not help here" if all(r.get("label_kind", "fine") == "fine" for r in lost) else "Not above labeled-only training here"
    return (f"{what} for {names}: the labeled-only model ({', '.join(sorted({r['labeled_only_row'] for r in lost}))}) "
            "is the better one to keep.")


def markdown_table(results: dict) -> str:
    rows = results["rows"]
    if not rows:
        return f"# {results['protocol']}\n\nNo finished cells.\n"
    classes = list(rows[0]["per_class_iou_mean"])
    with_dice = all("dice_mean" in r for r in rows)
    with_ap = all("ap_mean" in r for r in rows)
    head = ["method", "labeled", "seeds"] + (["test Dice (%)", "Dice per seed"] if with_dice else [])
    head += ["test mask AP (%)", "AP per seed", "AP50", "AP75", "count MAE"] if with_ap else ["test mIoU (%)"]
    with_cost = all("annotation_hours" in r for r in rows)
    with_wvf = all(r.get("wvf") is not None for r in rows)
    with_ref = any("vs_labeled_only" in r for r in rows)
    head += (["vs labeled-only"] if with_ref else []) + (["WvF (%)"] if with_wvf else []) + (["labels", "annotation h"] if with_cost else [])
    head += [f"{c} {'Dice' if with_dice else 'IoU'}" for c in classes] + ["s/step", "img/s", "threads", "precision", "train min", "peak MB"]
    lines = [f"# {results['protocol']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    for r in rows:
        cells_ = [row_name(r), _labeled_name(r["fraction"]), ",".join(map(str, r["seeds"]))]
        if with_ap:
            cells_ += [f"{pct(r['ap_mean'])} ± {pct(r['ap_std'])}", ", ".join(pct(v) for v in r["ap_per_seed"]), pct(r["ap50_mean"]), pct(r["ap75_mean"]),
                       f"{r['count_mae_mean']:.1f}"]
        if with_dice:
            cells_ += [f"{pct(r['dice_mean'])} ± {pct(r['dice_std'])}", ", ".join(pct(v) for v in r["dice_per_seed"])]
        if not with_ap:
            cells_ += [f"{pct(r['test_miou_mean'])} ± {pct(r['test_miou_std'])}"]
        if with_ref:
            d = r.get("vs_labeled_only")
            cells_ += ["-" if d is None else f"{100 * d:+.1f}"]
        cells_ += [pct(r["wvf"])] if with_wvf else []
        cells_ += [f"{r['labeled_images']:.0f} x {r['label_kind']}", f"{r['annotation_hours']:.1f}"] if with_cost else []
        cells_ += [pct((r["per_class_dice_mean"] if with_dice else r["per_class_iou_mean"])[c]) for c in classes]
        cells_ += [f"{r['step_seconds']:.2f}", f"{r['images_per_second']:.1f}", ",".join(map(str, r.get("torch_threads", []))), ",".join(r.get("precision") or ["fp32"]), f"{r['train_minutes']:.1f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells_) + " |")
    lines += [
        *(["", f"Dice: mean foreground Dice, {'per volume (slices of one volume stacked), averaged over volumes' if rows[0].get('dice_by') == 'volume' else 'pooled over the split'}; per-class columns are Dice."] if with_dice else []),
        *(["", "vs labeled-only: the row's mean test score minus that of the labeled-only row on the same labeled set (points). "
               + verdict(rows)] if with_ref else []),
        *(["", f"WvF: the row's score over the `{rows[0]['wvf_reference']}` row's (weak vs fine supervision, SeSAM Table 1)."] if with_wvf else []),
        *(["", "annotation h: labeled images x SeSAM's per-image annotation times (sec. 4, Cityscapes: fine 90 min, coarse 7 min, "
               "scribble 2.2 min, point 45 s) — a model of relative cost, not a measurement on these images; see cost_vs_score.png."] if with_cost else []),
        "", "s/step: seconds per training step (median over logging intervals, so validation is left out); "
        "img/s: labeled + unlabeled images per second of training steps (timings depend on the threads and on what else ran; see the cells' JSON); "
        "precision: what the training steps computed in (train.precision; fp32 for cells from before it); train min: wall time including validation.",
        "", f"Commits: {', '.join(c[:10] for c in results['commits'])}. Machines: {'; '.join(results['machines'])}.", ""]
    pseudo = [r for r in rows if r.get("pseudo_labels")]
    if pseudo:
        keys = sorted({k for r in pseudo for k in r["pseudo_labels"]}, key=lambda k: (not k.startswith("acc_"), k))
        lines += [
            "## Pseudo-labels on the unlabeled images (mean over the second half of training, %)", "",
            "`acc_*`: accuracy of the pseudo-labels a rule keeps, against the unlabeled images' true masks "
            "(loaded for diagnostics only, never trained on); `*_ratio`: share of valid pixels the rule keeps.", "",
            "| method | labeled | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys),
        ]
        for r in pseudo:
            lines.append(f"| {row_name(r)} | {_labeled_name(r['fraction'])} | " + " | ".join(pct(r["pseudo_labels"].get(k)) for k in keys) + " |")
        lines.append("")
    cal = [r for r in rows if r.get("calibration")]
    if cal:
        names = list(cal[0]["calibration"]["per_class"])

        def f(v):
            return "-" if v is None else f"{v:.1f}"

        lines += [
            "## Confidence on the unlabeled images (the evaluated model, end of training, %)", "",
            f"What the best checkpoint's confidences are worth on {cal[0]['calibration']['images']} of the run's unlabeled images "
            "(for a labeled-only row: the train images it did not train on; spread over the list), against their true masks (`lowlabel calibrate --unlabeled`): ECE (Guo et al. 2017, 15 bins), "
            f"the share of pixels at confidence >= {cal[0]['calibration']['threshold']:g} (what a fixed-threshold pseudo-label rule keeps) "
            "and its accuracy, and per class the recall of the kept pixels (of the true class-c pixels, the share kept and labeled c). "
            "A class with a recall near 0 is never taught by the unlabeled terms.", "",
            "| method | labeled | ECE | kept | kept correct | " + " | ".join(f"{n} recall" for n in names) + " |",
            "|---|---|---|---|---|" + "---|" * len(names),
        ]
        for r in cal:
            c = r["calibration"]
            lines.append(f"| {row_name(r)} | {_labeled_name(r['fraction'])} | {f(c['ece'])} | {f(c['kept'])} | {f(c['kept_accuracy'])} | "
                         + " | ".join(f(c["per_class"][n]["recall"]) for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_results(out: Path, table: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(table)), 4))
    labels = [f"{row_name(r)}\n{_labeled_name(r['fraction'])}" for r in table]
    key, name = ("ap", "test mask AP") if all("ap_mean" in r for r in table) else ("test_miou", "test mIoU")
    ax.bar(range(len(table)), [100 * r[f"{key}_mean"] for r in table], yerr=[100 * r[f"{key}_std"] for r in table], capsize=4, color=[f"C{i}" for i in range(len(table))])
    for r in table:
        for v in r[f"{key}_per_seed"]:
            ax.plot(table.index(r), 100 * (v or 0), "k.", ms=5)
    ax.set_xticks(range(len(table)), labels, fontsize=8)
    ax.set_ylabel(f"{name} (%)")
    ax.set_title(f"{name} per method (bars: mean ± std over seeds; dots: seeds)")
    fig.tight_layout()
    fig.savefig(out / "miou.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = []
    dice = all(len(p) > 2 and p[2] is not None for r in rows for p in r["val_history"])
    for r in sorted(rows, key=lambda r: (r["method"], r["fraction"], r["seed"])):
        key = (r["method"], r["fraction"])
        color = f"C{[t['method'] + t['fraction'] for t in table].index(r['method'] + r['fraction'])}"
        h = r["val_history"]  # [iteration, mIoU] or [iteration, mIoU, mean foreground Dice]
        ys = [p[2] if dice else p[1] for p in h]
        ax.plot([p[0] for p in h], [100 * (y or 0) for y in ys], "-", color=color, alpha=0.8, label=None if key in methods else f"{r['method']} {_labeled_name(r['fraction'])}")
        methods.append(key)
    metric = "mean foreground Dice" if dice else "mask AP" if all("test_ap" in r for r in rows) else "mIoU"
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"validation {metric} (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"validation {metric} during training (one line per seed)")
    fig.tight_layout()
    fig.savefig(out / "val_curves.png", dpi=110)
    plt.close(fig)
    plot_pseudo_labels(out, rows, plt)
    plot_cost(out, table, plt)


def plot_cost(out: Path, table: list[dict], plt) -> None:
    """Score against annotation time (SeSAM Fig. 4), one point per row, where the rows recorded
    their labels."""
    rows = [r for r in table if "annotation_hours" in r]
    if len(rows) < 2:
        return
    key = _score_key(rows)
    name = {"ap_mean": "test mask AP", "dice_mean": "test mean foreground Dice", "test_miou_mean": "test mIoU"}[key]
    std = key.replace("_mean", "_std")
    markers = {"fine": "s", "coarse": "D", "scribble": "^", "point": "o"}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(rows):
        ax.errorbar(r["annotation_hours"], 100 * r[key], yerr=100 * (r.get(std) or 0), fmt=markers.get(r["label_kind"], "x"), color=f"C{i}", capsize=3, ms=7,
                    label=f"{r['method']} ({r['labeled_images']:.0f} x {r['label_kind']})")
    ax.set_xscale("log")
    ax.set_xlabel("annotation time (h, SeSAM's per-image costs)")
    ax.set_ylabel(f"{name} (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs annotation cost (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "cost_vs_score.png", dpi=110)
    plt.close(fig)


def _smooth(ys: list[float], k: int = 5) -> list[float]:
    return [statistics.fmean(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]


def plot_pseudo_labels(out: Path, rows: list[dict], plt) -> None:
    """Pseudo-label accuracy (solid) and kept share (dashed) against iterations, one panel per
    method, one colour per rule, a running mean over 5 logged batches (the paper's Fig. 4 for
    RegionMatch: PRSPL vs the fixed threshold)."""
    methods = sorted({r["method"] for r in rows if r.get("pseudo_accuracy_history")})
    if not methods:
        return
    ncols = min(3, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, methods):
        colors: dict[str, str] = {}  # one colour per rule: acc_X and X_ratio share it
        for r in (r for r in rows if r["method"] == m):
            for k, h in sorted(r.get("pseudo_accuracy_history", {}).items()):
                color = colors.setdefault(k.removeprefix("acc_").removesuffix("_ratio"), f"C{len(colors)}")
                ax.plot([x for x, _ in h], _smooth([100 * y for _, y in h]), "-" if k.startswith("acc_") else "--",
                        color=color, alpha=0.8, label=f"{k} (s{r['seed']})")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for row in axes:
        row[0].set_ylabel("% (solid: accuracy, dashed: kept share)")
    fig.tight_layout()
    fig.savefig(out / "pseudo_labels.png", dpi=110)
    plt.close(fig)
