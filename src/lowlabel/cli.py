"""``lowlabel`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from . import __version__


def _cmd_config_show(args) -> int:
    from .config import dump_config, load_config

    print(dump_config(load_config(args.config, args.set)), end="")
    return 0


def _cmd_validate(args) -> int:
    from rich.table import Table

    from .data.validate import validate_dataset
    from .utils import console, counting_progress

    con = console()
    with counting_progress(f"checking {Path(args.dataset).name}", enabled=not args.quiet, transient=True) as prog:
        report = validate_dataset(args.dataset, extra_split_files=args.split_file, progress=prog, labeled=args.labeled, unlabeled=args.unlabeled,
                                  weak=args.weak, train_split=args.train_split, case_pattern=args.case_pattern)
    if report.info is not None:
        info = report.info
        con.print(f"[bold]{info.name}[/] ({info.task}): {info.num_classes} classes, {report.checked_images} images decoded")
        if report.class_pixels is not None and report.class_pixels.sum():
            t = Table(title="label pixels per class")
            t.add_column("class", overflow="fold")
            t.add_column("share", justify="right", no_wrap=True)
            total = report.class_pixels.sum()
            for name, n in zip(list(info.classes) + ["(ignore)"], report.class_pixels):
                t.add_row(name, f"{100 * n / total:.2f}%")
            con.print(t)
    if report.supervision is not None:
        con.print(f"a run on these lists trains on: {report.supervision.line()}", markup=False, highlight=False)
    if report.ok:
        con.print("[green]OK[/]: no problems found")
        return 0
    con.print(f"[red]{len(report.problems)} problem(s)[/]:")
    for p in report.problems:
        con.print(f"  {p}", markup=False)
    return 1


def _cmd_split(args) -> int:
    from .data.splits import make_split, write_split
    from .data.validate import require_valid

    require_valid(args.dataset)
    if (args.fraction is None) == (args.count is None):
        raise SystemExit("lowlabel split: give exactly one of --fraction or --count")
    labeled, unlabeled = make_split(args.dataset, fraction=args.fraction, count=args.count, seed=args.seed, source=args.source)
    lp, up = write_split(args.out, labeled, unlabeled)
    print(f"{len(labeled)} labeled -> {lp}\n{len(unlabeled)} unlabeled -> {up}")
    return 0


def _cmd_evaluate(args) -> int:
    from .errors import ConfigError
    from .eval.evaluate import evaluate_folder, metrics_table
    from .utils import atomic_write_json, console

    target = Path(args.target)
    if target.is_dir() and not (target / "checkpoints").is_dir() and not (target / "run.json").exists():
        if not args.data:
            raise ConfigError(f"{target}: a folder of predicted label maps is scored against a dataset: give --data DATASET")
        summary = evaluate_folder(target, args.data, args.split)
    else:
        from .engine.run import Run

        run = Run.load(target, device=args.device, precision=args.precision)
        summary = run.evaluate(args.data, split=args.split, progress=True)
    if args.out:
        atomic_write_json(args.out, summary)
    if args.json:
        args.json_result = summary
        return 0
    title = f"{summary['dataset']} / {summary['split']} ({summary['images']} images)"
    if summary.get("task") == "instance":
        from .eval.instances import instance_table

        console().print(instance_table(summary, title))
    else:
        console().print(metrics_table(summary, title))
    if args.out:
        print(f"metrics -> {args.out}")
    return 0


def _cmd_calibrate(args) -> int:
    from .engine.run import Run
    from .eval.calibration import calibration_table, plot_reliability
    from .utils import atomic_write_json, console

    run = Run.load(args.target, device=args.device, precision=args.precision)
    summary = run.calibrate(args.data, split=args.split, unlabeled=args.unlabeled, bins=args.bins, threshold=args.threshold,
                            max_images=args.max_images, progress=True)
    out = Path(args.out) if args.out else run.run_dir / f"calibration-{'unlabeled' if args.unlabeled else args.split}"
    title = f"{summary['dataset']} / {summary['split']}" + ("" if args.unlabeled else f" ({summary['images']} images)")
    summary["plot"] = str(plot_reliability(summary, out / "reliability.png", title=title))
    atomic_write_json(out / "calibration.json", summary)
    if args.json:
        args.json_result = summary
        return 0
    console().print(calibration_table(summary, title))
    print(f"calibration -> {out / 'calibration.json'}")
    print(f"reliability diagram -> {summary['plot']}")
    return 0


def _cmd_fit(args) -> int:
    from .api import fit
    from .config import load_config

    from .errors import ConfigError

    if not args.config and not args.resume:
        raise ConfigError("give -c CONFIG or --resume RUN_DIR")
    if args.resume:  # the run's own config, with the changes a resume allows
        run = fit(args.config, resume=args.resume, overrides=args.set, progress=not args.quiet)
    else:
        run = fit(load_config(args.config, args.set), progress=not args.quiet)
    print(f"run directory: {run.run_dir}")
    return 0


def _cmd_predict(args) -> int:
    from .engine.run import Run
    from .export import load_exported, looks_exported

    if looks_exported(args.checkpoint):  # model.onnx / an exported TorchScript file, with its metadata JSON
        from .errors import ConfigError

        if args.precision not in (None, "auto", "fp32"):
            raise ConfigError(f"--precision {args.precision}: an exported model runs in fp32 (export it again or predict from the run directory)")
        run = load_exported(args.checkpoint, device=args.device)
    else:
        run = Run.load(args.checkpoint, device=args.device, precision=args.precision)
    written = run.predict_folder(args.images, args.out, overlays=not args.no_overlay, progress=True, confidence=args.confidence,
                                vector=args.vector, min_area=args.min_area, simplify=args.simplify)
    print(f"{len(written)} prediction(s) -> {args.out}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_run, metadata_path, read_metadata

    out = export_run(args.run, args.format, args.out, opset=args.opset)
    meta = read_metadata(out)
    inp = meta["input"]
    print(f"{meta['arch']} ({len(meta['classes'])} classes) -> {out} ({args.format}{', opset ' + str(meta['opset']) if meta['opset'] else ''}), "
          f"metadata -> {metadata_path(out)}\n"
          f"input {inp['name']}: float32 [{'B' if inp['batch'] == 'dynamic' else inp['batch']}, {inp['channels']}, H, W] in [0, 1] "
          f"(normalised inside); output {meta['output']['name']}: float32 [B, {len(meta['classes'])}, H, W]; "
          f"verified against torch: max |logit difference| {meta['verified']['max_abs_logit_diff']:.2g}")
    return 0


def _cmd_retrieve(args) -> int:
    from .engine.run import Run

    run = Run.load(args.model, device=args.device, precision=args.precision)
    masks = run.retrieve(args.exemplar, args.exemplar_mask, [Path(q) for q in args.queries] if len(args.queries) > 1 else args.queries[0], args.out,
                         overlays=not args.no_overlay)
    print(f"{len(masks)} quer{'y' if len(masks) == 1 else 'ies'} -> {args.out} (retrieved share: {', '.join(f'{100 * m.mean():.1f}%' for m in masks[:8])}{' ...' if len(masks) > 8 else ''})")
    return 0


def _cmd_quickstart(args) -> int:
    from .quickstart import quickstart

    quickstart(out=args.out, iterations=args.iterations, method=args.method)
    return 0


def _cmd_bench(args) -> int:
    from .bench import run_protocol
    from .utils import console

    res = run_protocol(args.protocol, out=args.out, only=args.only or None, in_process=args.in_process)
    results_dir = args.out or f"benchmarks/results/{res['protocol']}"
    if args.json:
        args.json_result = {"results_dir": str(results_dir), **res}
        return 0
    if res["rows"]:
        from .bench import verdict

        console().print(bench_table(res))
        if verdict(res["rows"]):
            print(verdict(res["rows"]))
    print(f"{res['cells']} cell(s) finished; results in {results_dir}")
    return 0


def bench_table(res: dict):
    """The summary of a protocol's results (``bench.aggregate``'s dict): one row per method and
    labeled fraction, its test score (mean ± std over seeds, and per seed). Method names fold
    rather than being cut when the table is narrower than them."""
    from rich.table import Table

    from .bench import _labeled_name, row_name

    rows = res["rows"]
    if all("ap_mean" in r for r in rows):
        metric, key = "test mask AP (%)", "ap"
    elif all(r.get("dice_mean") is not None for r in rows):
        metric, key = "test Dice (%)", "dice"
    else:
        metric, key = "test mIoU (%)", "test_miou"

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    t = Table(title=f"{res['protocol']}: {res['cells']} cell(s)")
    t.add_column("method", overflow="fold")
    t.add_column("labeled", overflow="fold")
    t.add_column("seeds")
    t.add_column(metric, justify="right", no_wrap=True)
    t.add_column("per seed", justify="right")
    with_ref = any("vs_labeled_only" in r for r in rows)
    if with_ref:
        t.add_column("vs labeled-only", justify="right", overflow="fold")
    for r in rows:
        d = r.get("vs_labeled_only")
        t.add_row(row_name(r), _labeled_name(r["fraction"]), ",".join(map(str, r["seeds"])),
                  f"{pct(r[key + '_mean'])} ± {pct(r[key + '_std'])}", ", ".join(pct(v) for v in r[key + "_per_seed"]),
                  *([("-" if d is None else f"{100 * d:+.1f}")] if with_ref else []))
    return t


def _cmd_weaken(args) -> int:
    from .data.validate import require_valid
    from .data.weak import weaken_dataset
    from .utils import counting_progress

    require_valid(args.dataset, splits=[args.split], read_pixels=True)  # every mask it reads, before it writes
    with counting_progress(f"weaken ({args.kind})", enabled=not args.quiet) as prog:
        out = weaken_dataset(args.dataset, args.kind, args.out, seed=args.seed, split=args.split, progress=prog)
    print(f"weak labels ({args.kind}) -> {out}; train with data.root={out} data.weak={'points' if args.kind == 'point' else args.kind + ('s' if args.kind == 'scribble' else '')}")
    return 0


def _cmd_refine(args) -> int:
    from .data.dataset import DatasetInfo
    from .data.validate import require_valid
    from .errors import ConfigError
    from .sam import build_segmenter
    from .sam.cache import EmbeddingCache
    from .sam.refine import RefineSettings, refine_dataset
    from .utils import counting_progress

    require_valid(args.dataset, splits=[args.split], read_pixels=True)
    info = DatasetInfo.load(args.dataset)
    folder = str(info.weak_labels.get(args.weak, args.weak)).rstrip("/")
    kind = args.kind or {"points": "point", "scribbles": "scribble"}.get(folder, "coarse")
    seg = build_segmenter(args.backend, checkpoint=args.checkpoint, model_type=args.model_type, device=args.device, precision=args.precision)
    if seg.weights_id.startswith("random") and not args.allow_random_weights:
        raise ConfigError(f"refine --backend {args.backend}: no checkpoint (--checkpoint or LOWLABEL_SAM_CHECKPOINT), so its weights would be "
                          "random and its masks meaningless; give a checkpoint (`lowlabel weights list`), or --allow-random-weights to test the pipeline")
    settings = RefineSettings(weak_kind=kind, sampler=args.sampler, selection=args.selection, points=args.points)
    cache = EmbeddingCache(args.cache) if args.cache else None
    with counting_progress(f"refine ({seg.name})") as prog:
        man = refine_dataset(args.dataset, args.out, seg, settings, weak_folder=folder, split=args.split, seed=args.seed, cache=cache, progress=prog, limit=args.limit, overwrite=args.overwrite)
    print(f"{len(man['images'])} image(s) refined -> {args.out}, a dataset: train on it with data.root={args.out} data.weak=refined "
          "(and data.weak_confidence=weight|ignore to use confidence/)")
    return 0


def _cmd_suggest(args) -> int:
    from .errors import ConfigError
    from .utils import console

    common = dict(pool=args.pool, budget=args.budget, data=args.data, group_by=False if args.per_image else args.group_by, aggregate=args.aggregate, cost=args.cost,
                  minutes=args.minutes, hours=args.hours, candidates=args.candidates, mc_samples=args.mc_samples, bald_source=args.bald_source,
                  uncertainty=args.uncertainty, device=args.device, precision=args.precision, progress=not args.quiet,
                  tile=args.tile, tile_gap=args.tile_gap)
    strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    if args.simulate:
        from .label import simulate
        from .label.replay import markdown

        try:
            seeds = [int(v) for v in args.random_seeds.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--random-seeds {args.random_seeds!r}: give whole numbers separated by commas (0,1,2)") from None
        report = simulate(args.run, strategies=strategies, out=args.out, rounds=args.rounds, random_seeds=seeds, iterations=args.iterations,
                          split=args.split, **common)
        if args.json:
            args.json_result = report
            return 0
        print(markdown(report), end="")
        print(f"simulation -> {Path(args.out) / 'simulate.json'}")
        return 0
    if len(strategies) != 1:
        raise ConfigError(f"--strategy {args.strategy!r}: one strategy (several are compared only with --simulate)")
    from .label import suggest

    skip = list(args.skip)
    if args.skip_file:
        from .data.dataset import read_ids

        skip += read_ids(args.skip_file)
    res = suggest(args.run, strategy=strategies[0], out=args.out, labeled=args.labeled, seed=args.seed, skip=skip,
                  heatmaps=not args.no_heatmaps, **common)
    if args.json:
        args.json_result = {"strategy": res.strategy, "message": res.message, "picks": res.picks, "images": res.images,
                            "queue": res.queue, "rows": res.rows, "files": {k: str(v) for k, v in res.files.items()}, "info": res.info}
        return 0
    if not res.picks:
        print(res.message)
        return 0
    con = console()
    con.print(f"[bold]{res.message}[/]", highlight=False)
    for r in res.rows[: len(res.picks)]:
        extra = ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k not in ("rank", "id", "picked", "skipped", "score", "images", "minutes")
                          and isinstance(v, float) and v == v)
        con.print(f"  {r['rank']:>3}. {r['id']}  score {r['score']:.4g}" + (f" ({extra})" if extra else "")
                  + (f", {r['images']} images" if "images" in r else ""), markup=False, highlight=False)
    print(f"picks -> {res.files['picks']} ({'CSV and state' if args.no_heatmaps else 'CSV, overview, heat maps and state'} beside it)")
    return 0


def _cmd_weights(args) -> int:
    import dataclasses

    from .sam.weights import CHECKPOINTS, download
    from .utils import console

    if args.weights_command == "download":
        path, digest = download(args.name, args.to)
        print(f"{path}\nsha256 {digest} (verified)")
        return 0
    if getattr(args, "json", False):
        args.json_result = [dataclasses.asdict(c) for c in CHECKPOINTS.values()]
        return 0
    console().print(weights_table(CHECKPOINTS.values()))
    return 0


def _cmd_annotate(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError("lowlabel annotate serves its page with FastAPI and uvicorn: pip install 'lowlabel[annotate]'") from None
    from .annotate import open_session
    from .annotate.app import serve
    from .errors import ConfigError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: give a port in 0..65535 (0: any free port)")
    store, assistant, predictions, where = open_session(
        args.dataset, queue=args.queue, run=args.run, segmenter=args.segmenter, checkpoint=args.checkpoint, model_type=args.model_type,
        device=args.device, cache=args.cache or "default", allow_random_weights=args.allow_random_weights, user=args.user)
    done = len(set(store.corrected()) & set(store.order))
    seg = "none (brush and points)" if assistant is None else assistant.name + (" (random weights)" if assistant.random_weights else "")

    def ready(url, server):
        print(f"lowlabel annotate: {url}\n  queue: {len(store.order)} image(s) from {where}, {done} done; segmenter: {seg}"
              f"{'; run: ' + str(args.run) if predictions is not None else ''}\n  saves into {store.root} (masks/, splits/corrected.txt); Ctrl+C stops",
              flush=True)

    serve(store, assistant, predictions, host=args.host, port=args.port, extra_hosts=tuple(args.allow_host), on_ready=ready)
    return 0


def weights_table(checkpoints):
    """The ``weights list`` table. Identifiers (name, SHA-256, URL) fold onto further lines
    where a narrow terminal has no room for them, never cut; off a terminal the console is wide
    enough that each stays on one line (:func:`lowlabel.utils.console`)."""
    from rich.table import Table

    t = Table(title="promptable segmenter checkpoints (local files only; lowlabel never downloads during training)")
    for col in ("name", "backend", "model", "size", "sha256", "url"):
        t.add_column(col, overflow="fold", no_wrap=col in ("size",))
    for c in checkpoints:
        t.add_row(c.name, c.backend, c.model_type, f"~{c.approx_mb} MB", c.sha256, c.url)
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowlabel",
        description="Label-efficient image segmentation: semi-supervised, weakly supervised and SAM-assisted training.",
    )
    p.add_argument("--version", action="version", version=f"lowlabel {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quickstart", help="train UniMatch on the bundled sample, evaluate, predict, plot (CPU, minutes)")
    q.add_argument("--out", default="lowlabel-quickstart", help="output folder (default: %(default)s)")
    q.add_argument("--iterations", type=int, default=None, help="training iterations (default: the quickstart config's)")
    q.add_argument("--method", default="unimatch")
    q.set_defaults(func=_cmd_quickstart)

    v = sub.add_parser("validate", help="check a folder dataset and report every problem")
    v.add_argument("dataset")
    v.add_argument("--split-file", action="append", default=[], help="also check this labeled/unlabeled list (repeatable)")
    v.add_argument("--labeled", help="the labeled list (file or split name) of a run: also report what the run trains on and the bad combinations")
    v.add_argument("--unlabeled", help="with --labeled: the unlabeled list (default: the rest of --train-split)")
    v.add_argument("--weak", help="with --labeled: the labeled images carry these weak labels (scribbles, points, coarse) instead of dense masks")
    v.add_argument("--train-split", default="train", help="with --labeled: the split the lists come from (default: %(default)s)")
    v.add_argument("--case-pattern", help=r"with --labeled: count cases too (the first group of this regex names a case; ACDC: '^(patient\d+)_')")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_cmd_validate)

    s = sub.add_parser("split", help="seeded labeled/unlabeled partition of the train split")
    s.add_argument("dataset")
    s.add_argument("--fraction", help="labeled fraction, e.g. 1/8 or 0.125")
    s.add_argument("--count", type=int, help="labeled count instead of a fraction")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--source", default="train", help="split to draw from (default: %(default)s)")
    s.add_argument("--out", required=True, help="folder for labeled.txt and unlabeled.txt")
    s.set_defaults(func=_cmd_split)

    f = sub.add_parser("fit", help="train from a config (or resume a run)")
    f.add_argument("-c", "--config")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    f.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_cmd_fit)

    e = sub.add_parser("evaluate", help="score a prediction folder, a run directory or a checkpoint on a dataset split")
    e.add_argument("target", help="folder of <id>.png predictions, a run directory, or a checkpoint file")
    e.add_argument("--data", help="dataset folder (default for runs: the run's own dataset)")
    e.add_argument("--split", default="test")
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="numeric precision (default: the run's eval.precision, whose auto follows its train.precision); fp16 on CUDA only")
    e.add_argument("--out", help="write the metrics as JSON here")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout instead of the table (progress goes to stderr)")
    e.set_defaults(func=_cmd_evaluate)

    ca = sub.add_parser("calibrate", help="how far a run's confidences can be trusted: reliability diagram, ECE, and what a pseudo-label threshold keeps per class")
    ca.add_argument("target", help="a run directory or a checkpoint file")
    ca.add_argument("--data", help="dataset folder (default: the run's own dataset)")
    ca.add_argument("--split", default="val", help="labeled split to score (default val)")
    ca.add_argument("--unlabeled", action="store_true", help="score the run's own unlabeled images (splits/unlabeled.txt) against their masks, where the dataset has them: the source of its pseudo-labels")
    ca.add_argument("--bins", type=int, default=15, help="equal-width confidence bins (default 15)")
    ca.add_argument("--threshold", type=float, default=0.95, help="the pseudo-label confidence threshold to report per class (default 0.95, FixMatch / UniMatch)")
    ca.add_argument("--max-images", type=int, help="score N images spread evenly over the split (every k-th)")
    ca.add_argument("--device", default="auto")
    ca.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="numeric precision (default: the run's eval.precision)")
    ca.add_argument("--out", help="folder for calibration.json and reliability.png (default RUN/calibration-<split>)")
    ca.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    ca.set_defaults(func=_cmd_calibrate)

    pr = sub.add_parser("predict", help="label masks and colour overlays for a folder of images of any size")
    pr.add_argument("checkpoint", help="a checkpoint file, a run directory, or an exported model (.onnx / TorchScript, with its metadata JSON)")
    pr.add_argument("images", help="a folder of images, or one image")
    pr.add_argument("--out", required=True)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="numeric precision (default: the run's eval.precision, whose auto follows its train.precision); fp16 on CUDA only")
    pr.add_argument("--no-overlay", action="store_true")
    pr.add_argument("--confidence", action="store_true", help="georeferenced inputs: add a confidence band (0-254, 255 = nodata) to the GeoTIFF")
    pr.add_argument("--vector", choices=["gpkg", "geojson"], help="georeferenced inputs: also write the label map's polygons per class")
    pr.add_argument("--min-area", type=float, default=0.0, help="--vector: drop polygons smaller than this (map units squared)")
    pr.add_argument("--simplify", type=float, default=0.0, help="--vector: simplify outlines with this tolerance (map units)")
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="export a run's evaluated model (best checkpoint) to ONNX or TorchScript, with a metadata JSON beside it")
    ex.add_argument("run", help="a run directory or a checkpoint file")
    ex.add_argument("--format", required=True, help="onnx or torchscript")
    ex.add_argument("--out", required=True, help="the file to write (e.g. model.onnx); its metadata goes to <out>.json")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    ex.set_defaults(func=_cmd_export)

    b = sub.add_parser("bench", help="run a benchmark protocol (resumable) and write results, tables and plots")
    b.add_argument("protocol", help="protocol YAML (see benchmarks/protocols/)")
    b.add_argument("--only", action="append", default=[], metavar="NAME", help="only this method or cell (repeatable)")
    b.add_argument("--out", help="results folder (default: benchmarks/results/<protocol name>)")
    b.add_argument("--in-process", action="store_true",
                   help="train each cell in this process, not in a fresh child process (which keeps the cells' memory apart)")
    b.add_argument("--json", action="store_true", help="print the results summary (results.json's content) as JSON on stdout; progress goes to stderr")
    b.set_defaults(func=_cmd_bench)

    r = sub.add_parser("retrieve", help="zero-shot exemplar retrieval with an SSR-SAM model: segment what a masked exemplar region shows in other images")
    r.add_argument("queries", nargs="+", help="query images, or one folder of them")
    r.add_argument("--model", required=True, help="an SSR-SAM run directory or checkpoint (model.arch ssr-sam)")
    r.add_argument("--exemplar", required=True, help="the exemplar image")
    r.add_argument("--exemplar-mask", required=True, help="its mask: non-zero (and not 255) pixels mark the region to retrieve")
    r.add_argument("--out", required=True, help="folder for <id>.png masks (1 = retrieved) and overlays/")
    r.add_argument("--device", default="auto")
    r.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="numeric precision (default: the run's eval.precision, whose auto follows its train.precision); fp16 on CUDA only")
    r.add_argument("--no-overlay", action="store_true")
    r.set_defaults(func=_cmd_retrieve)

    w = sub.add_parser("weaken", help="simulate weak labels (points, scribbles, coarse) from dense masks")
    w.add_argument("dataset")
    w.add_argument("--kind", required=True, choices=["point", "scribble", "coarse"])
    w.add_argument("--out", required=True, help="new folder dataset (images/masks linked, weak labels written)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--split", default="train")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=_cmd_weaken)

    r = sub.add_parser("refine", help="weak labels -> dense labels and confidence with a promptable segmenter")
    r.add_argument("dataset")
    r.add_argument("--weak", required=True, help="weak label folder or its dataset.json name (scribbles, points, coarse)")
    r.add_argument("--kind", choices=["point", "scribble", "coarse"], help="default: from the folder name")
    r.add_argument("--backend", default="classical", choices=["classical", "sam", "mobilesam", "sam2"])
    r.add_argument("--model-type", help="vit_b/vit_l/vit_h for sam, a SAM 2.1 config (sam2.1_hiera_t ...) for sam2")
    r.add_argument("--checkpoint", help="local weights file (or LOWLABEL_SAM_CHECKPOINT)")
    r.add_argument("--allow-random-weights", action="store_true", help="run a neural backend without a checkpoint (random weights: for testing the pipeline only)")
    r.add_argument("--sampler", default="skeleton", choices=["skeleton", "probability", "topk", "center", "boundary", "random"])
    r.add_argument("--selection", default="coverage", choices=["coverage", "score", "random", "smallest"])
    r.add_argument("--points", type=int, default=5, help="K points per instance (default 5, SeSAM)")
    r.add_argument("--split", default="train")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--cache", help="embedding cache folder (reused across runs)")
    r.add_argument("--limit", type=int, help="only the first N images")
    r.add_argument("--device", default="cpu")
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision of the SAM image encoder (auto: bf16 where the device runs it natively, else fp32); part of the embedding-cache key")
    r.add_argument("--out", required=True)
    r.add_argument("--overwrite", action="store_true", help="replace an --out refined before with other settings")
    r.set_defaults(func=_cmd_refine)

    sg = sub.add_parser("suggest", help="rank unlabeled images (or whole cases) by how much labeling them would help; write the next N to label")
    sg.add_argument("run", help="a run directory or checkpoint")
    sg.add_argument("--pool", help="split name or id file of the candidates (default: the train split minus the labeled set)")
    sg.add_argument("--budget", type=int, help="how many images (cases with --group-by) to pick")
    sg.add_argument("--strategy", default="entropy", help="random, entropy, margin, balanced-entropy, balanced-margin, bald, coreset, hybrid "
                    "(default: %(default)s; with --simulate a comma list)")
    sg.add_argument("--out", required=True, help="the pick list (e.g. next.txt; CSV, overview PNG, heat maps and state beside it); with --simulate a folder")
    sg.add_argument("--labeled", help="id file of what is labeled now (default: the run's labeled set)")
    sg.add_argument("--data", help="dataset folder (default: the run's)")
    sg.add_argument("--group-by", metavar="REGEX", help=r"label whole cases: the first group of REGEX names an id's case (ACDC: '^(patient\d+)_'); the budget counts cases "
                    "(default: the run's data.case_pattern, if it has one)")
    sg.add_argument("--tile", type=int, metavar="PX", help="windows of PX x PX pixels of the pool images are the units (ids IMAGE@X,Y,W,H): "
                    "for mosaics and slides too large to label whole; blank and near-duplicate windows are left out")
    sg.add_argument("--tile-gap", type=int, default=1, metavar="N", help="with --tile: a window within N windows of one ranked ahead of it "
                    "in the same image goes behind the others (spatial diversity; 0: off; default: %(default)s)")
    sg.add_argument("--per-image", action="store_true", help="pick images, even where the run's data.case_pattern groups them into cases")
    sg.add_argument("--aggregate", default="mean", choices=["mean", "max"], help="a case's score from its images' (default: %(default)s)")
    sg.add_argument("--cost", choices=["points", "scribbles", "coarse", "fine"], help="annotation kind whose time --minutes / --hours buys (SeSAM's per-image costs)")
    sg.add_argument("--minutes", type=float, help="time budget in minutes (with --cost), instead of --budget")
    sg.add_argument("--hours", type=float, help="time budget in hours (with --cost)")
    sg.add_argument("--seed", type=int, default=0, help="random's draw and MC dropout's masks")
    sg.add_argument("--skip", action="append", default=[], metavar="ID", help="move this id to the end of the queue, remembered in <out>.state.json (repeatable)")
    sg.add_argument("--skip-file", help="ids to skip, one a line")
    sg.add_argument("--candidates", type=float, default=4.0, help="hybrid: keep this many times the budget of the most uncertain (default: %(default)s)")
    sg.add_argument("--uncertainty", default="entropy", choices=["entropy", "margin", "balanced-entropy", "balanced-margin", "bald"], help="hybrid's first step")
    sg.add_argument("--mc-samples", type=int, default=8, help="bald with dropout: stochastic passes (default: %(default)s)")
    sg.add_argument("--bald-source", default="auto", choices=["auto", "dropout", "flips"], help="bald: MC dropout, flipped views, or dropout where the model has it")
    sg.add_argument("--no-heatmaps", action="store_true", help="no overview and heat maps")
    sg.add_argument("--simulate", action="store_true", help="replay held-out labels: suggest, add, retrain, score, against random at the same budget")
    sg.add_argument("--rounds", type=int, default=1, help="--simulate: rounds of the loop (default: %(default)s)")
    sg.add_argument("--random-seeds", default="0,1,2", help="--simulate: one random arm per seed (default: %(default)s)")
    sg.add_argument("--iterations", type=int, help="--simulate: training iterations of each retraining (default: the run's)")
    sg.add_argument("--split", help="--simulate: evaluation split (default: the run's test split)")
    sg.add_argument("--device", default="auto")
    sg.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="numeric precision (default: the run's eval.precision)")
    sg.add_argument("--quiet", action="store_true", help="no progress bars")
    sg.add_argument("--json", action="store_true", help="print the picks (ids, scores and each term of the score, files written) as JSON on stdout; "
                    "with --simulate the report; progress goes to stderr")
    sg.set_defaults(func=_cmd_suggest)

    wt = sub.add_parser("weights", help="official SAM / MobileSAM / SAM 2 checkpoints")
    wsub = wt.add_subparsers(dest="weights_command", metavar="SUBCOMMAND")
    wl = wsub.add_parser("list", help="name, URL, size, SHA-256")
    wl.add_argument("--json", action="store_true", help="print the list as JSON")
    wl.set_defaults(func=_cmd_weights)
    wd = wsub.add_parser("download", help="download and verify a checkpoint (needs internet)")
    wd.add_argument("name")
    wd.add_argument("--to", required=True)
    wd.set_defaults(func=_cmd_weights)
    wt.set_defaults(func=_cmd_weights, weights_command="list")

    an = sub.add_parser("annotate", help="a local web page to review and correct masks (clicks with a promptable segmenter, brush), saved into the dataset")
    an.add_argument("dataset", help="the folder dataset to correct (masks are written into it)")
    an.add_argument("--queue", help="ids to review, one a line (suggest's next.txt); default: splits/unlabeled.txt, the run's, or the train split")
    an.add_argument("--run", help="a run directory or checkpoint: show its predictions and uncertainty")
    an.add_argument("--segmenter", default="classical", choices=["classical", "sam", "mobilesam", "sam2", "none"],
                    help="promptable segmenter for clicks and boxes (default: %(default)s; none: brush and points only)")
    an.add_argument("--checkpoint", help="local weights of the segmenter (or LOWLABEL_SAM_CHECKPOINT)")
    an.add_argument("--model-type", help="vit_b/vit_l/vit_h for sam, a SAM 2.1 config for sam2")
    an.add_argument("--allow-random-weights", action="store_true", help="a neural segmenter without a checkpoint (random weights: to try the page only)")
    an.add_argument("--cache", help="embedding cache folder (default: $LOWLABEL_CACHE/embeddings or ~/.cache/lowlabel/embeddings)")
    an.add_argument("--device", default="cpu", help="device of the segmenter and the run (default: %(default)s)")
    an.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only; another prints a warning)")
    an.add_argument("--port", type=int, default=8765, help="port (default: %(default)s; 0: any free port)")
    an.add_argument("--allow-host", action="append", default=[], metavar="NAME", help="another host name the browser may use to reach the page (repeatable)")
    an.add_argument("--user", help="who is annotating, recorded in the log (default: the login name)")
    an.set_defaults(func=_cmd_annotate)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    cs = csub.add_parser("show", help="print the fully resolved config")
    cs.add_argument("-c", "--config", required=True)
    cs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cs.set_defaults(func=_cmd_config_show)
    c.set_defaults(func=lambda a: (c.print_help(), 0)[1])
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command. Every failure a user can fix (bad data, a bad checkpoint or config, an
    existing run, divergence, a missing device, a missing file) ends as one line on stderr and
    exit status 2; ``--debug`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .errors import LowlabelError

    try:
        if not getattr(args, "json", False):
            return int(args.func(args) or 0)
        args.json_result = None
        with _stdout_to_stderr():  # with --json, stdout carries the JSON document only
            rc = int(args.func(args) or 0)
        if args.json_result is not None:
            print(json.dumps(_finite(args.json_result), indent=2, allow_nan=False))
        return rc
    except BrokenPipeError:  # the reader of stdout stopped early (`| head`): nothing left to say
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
    except (LowlabelError, FileNotFoundError, ValueError, ConnectionError, ImportError) as err:
        if args.debug:
            raise
        msg = str(err).strip()
        print(f"lowlabel {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to stdout meanwhile to stderr: Python's ``sys.stdout`` (rich's
    consoles and progress bars write there), and file descriptor 1 (child processes, such as
    ``bench``'s cells, and native code)."""
    sys.stdout.flush()
    saved = None
    with contextlib.suppress(OSError, ValueError):
        saved = os.dup(1)
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _finite(obj):
    """``obj`` as plain JSON types, with NaN and infinities (an undefined mean) as ``null``."""
    from .utils import _json_default

    def clean(o):
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return clean(json.loads(json.dumps(obj, default=_json_default)))


if __name__ == "__main__":
    sys.exit(main())
