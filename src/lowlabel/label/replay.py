"""``lowlabel suggest --simulate``: does a strategy beat random picks on *your* data?

It replays labels you already have but held out of training: starting from a trained run (its
labeled set, its config), each arm runs the loop ``rounds`` times — suggest ``budget`` units with
its strategy, add their held-out labels to the labeled set, retrain (``lowlabel.fit``, the run's
own config with the new labeled list; ``iterations`` may shorten it) — and the retrained model is
scored on the evaluation split. The ``random`` arms (one per seed) pick at the same budget, so
the gain of a strategy is its score minus the mean of the random arms at the same number of
labeled units. Every arm trains with the run's training seed: what differs is the labeled set.

Layout of ``out`` (resumable: a finished run is reused, an interrupted one resumed)::

    out/<arm>/round<r>/picks.txt, picks.csv ...   what the arm suggested in round r
    out/<arm>/round<r>/labeled.txt                 the labeled set it trained on
    out/runs/<arm>-r<r>/                           the retrained run
    out/simulate.json, out/simulate.md             the scores and gains

The pool's images must have their labels (the training target the run uses: ``masks/``, or
the weak label folder of ``data.weak``): a simulation labels them by reading those files.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from ..config import apply_overrides
from ..data.dataset import FolderDataset, read_ids
from ..errors import ConfigError, DatasetError
from ..utils import atomic_write_json, atomic_write_text


def _metric(scores: dict) -> tuple[str, float | None]:
    """Dice per volume (foreground mean) where the evaluation gives it, else mIoU; instance runs: AP."""
    for key in ("dice_mean", "miou", "ap"):
        if scores.get(key) is not None:
            return key, float(scores[key])
    return "miou", None


def _summary(path: Path) -> dict:
    """The retrained run's validation choice and time (its summary.json), where it wrote one."""
    import json

    if not path.is_file():
        return {}
    rec = json.loads(path.read_text())
    return {k: rec.get(k) for k in ("best_val_miou", "best_val_dice_mean", "best_iteration", "iterations", "seconds")}


def _train(cfg_raw: dict, progress: bool):
    from ..api import fit
    from ..config import load_config
    from ..engine.run import Run

    cfg = load_config(raw=cfg_raw)
    run_dir = Path(cfg.out_dir) / cfg.name
    want = set(read_ids(cfg.data.labeled))
    if (run_dir / "splits" / "labeled.txt").is_file() and set(read_ids(run_dir / "splits" / "labeled.txt")) != want:
        raise ConfigError(f"{run_dir}: this simulation run trained on another labeled set than the picks now give; "
                          "delete the simulation folder (or give another --out) to start over")
    if (run_dir / "summary.json").is_file():
        return Run.load(run_dir)
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return fit(resume=run_dir, progress=progress)
    return fit(cfg, progress=progress)


def simulate(run, budget: int | None = None, strategies: Sequence[str] | str = ("entropy",), *, out: str | Path, pool=None,
             rounds: int = 1, random_seeds: Sequence[int] = (0, 1, 2), iterations: int | None = None, split: str | None = None,
             overrides: Sequence[str] = (), data=None, progress: bool = False, **suggest_args) -> dict:
    """Replay held-out labels: each strategy and ``len(random_seeds)`` random arms run ``rounds``
    rounds of suggest -> label -> retrain; returns (and writes to ``out/simulate.json``) every
    arm's score per round and each strategy's gain over the random mean.

    Args:
        run: the trained starting point (a :class:`~lowlabel.engine.run.Run` or its directory);
            it must have its config (a run directory or a lowlabel checkpoint has).
        budget, pool, and ``suggest_args`` (``group_by``, ``cost`` + ``minutes``, ``aggregate``,
            ``candidates``, ``mc_samples`` ...): as :func:`lowlabel.label.suggest`, per round.
        strategies: the strategies to test (``random`` is always the reference).
        random_seeds: one random arm per seed (its draw; the training seed stays the run's).
        iterations: ``train.iterations`` of the retraining (default: the run's config).
        split: the evaluation split (default: the config's ``data.test_split``).
        overrides: further ``key=value`` changes of the retraining config (e.g. another method).
    """
    from ..engine.run import Run
    from .suggester import _as_run, dataset_of, labeled_ids, suggest

    strategies = [strategies] if isinstance(strategies, str) else list(strategies)
    strategies = [s for s in strategies if s != "random"]
    if not strategies:
        raise ConfigError("strategies: name at least one strategy to compare with random")
    if not random_seeds:
        raise ConfigError("random_seeds: at least one random arm is the reference")
    if int(rounds) < 1:
        raise ConfigError(f"rounds {rounds}: at least 1")
    run = _as_run(run, suggest_args.pop("device", "auto"), suggest_args.pop("precision", None))
    if run.config is None:
        raise ConfigError("simulate retrains with the run's config; this checkpoint carries none")
    for key in ("skip", "labeled", "seed", "heatmaps", "strategy"):
        if key in suggest_args:
            raise ConfigError(f"simulate sets {key} itself")
    if suggest_args.get("tile") is not None:
        raise ConfigError("simulate replays whole images' labels (a retraining adds images to the labeled set); windows (tile) cannot be replayed")
    suggest_args.pop("tile", None)
    suggest_args.pop("tile_gap", None)
    info = dataset_of(run, data)
    split = split or run.config.data.test_split
    if not split:
        raise ConfigError("simulate scores each arm on an evaluation split: give split (the config has no data.test_split)")
    out = Path(out)
    start_ids, _ = labeled_ids(run, info)
    base_raw = run.config.model_dump(mode="json")
    base_raw["data"]["root"] = str(info.root)

    # every pool image must have its held-out label
    from .suggester import _ids_of

    if pool is not None:
        pool_ids = _ids_of(pool, info.root, "pool")[0]
    else:
        have = set(start_ids)
        pool_ids = [i for i in read_ids(info.root / "splits" / f"{run.config.data.train_split}.txt") if i not in have]
    ds = FolderDataset(info.root, [], labeled=True, weak=run.config.data.weak, info=info)
    lacking = [i for i in pool_ids if not ds.label_file(i)[1].is_file()]
    if lacking:
        where = ds.label_file(lacking[0])[1].parent
        raise DatasetError(where, f"simulate replays held-out labels, but {len(lacking)} pool image(s) have none here, e.g. {lacking[:3]}")

    base_metric = _metric(run.evaluate(split=split))
    arms = [(s, s, 0) for s in strategies] + [(f"random-s{k}", "random", k) for k in random_seeds]
    records: list[dict] = []
    for arm, strategy, seed in arms:
        model, labeled = run, list(start_ids)
        for r in range(1, int(rounds) + 1):
            folder = out / arm / f"round{r}"
            remaining = None if pool is None else [i for i in pool_ids if i not in set(labeled)]
            lab_file = folder / "labeled-before.txt"
            atomic_write_text(lab_file, "".join(f"{i}\n" for i in labeled))
            sug = suggest(model, pool=remaining, budget=budget, strategy=strategy, out=folder / "picks.txt", data=info.root, labeled=lab_file,
                          seed=seed, heatmaps=False, progress=progress, **suggest_args)
            if not sug.picks:
                raise ConfigError(f"{arm}, round {r}: nothing left to pick ({sug.message}); fewer rounds or a smaller budget")
            labeled = labeled + [i for i in sug.images if i not in set(labeled)]
            new_file = atomic_write_text(folder / "labeled.txt", "".join(f"{i}\n" for i in labeled))
            raw = {**base_raw, "name": f"{arm}-r{r}", "out_dir": str(out / "runs")}
            raw["data"] = {**base_raw["data"], "labeled": str(new_file.resolve()), "unlabeled": None}
            if iterations is not None:
                raw["train"] = {**base_raw["train"], "iterations": int(iterations), "epochs": None}
            raw = apply_overrides(raw, list(overrides))
            model = _train(raw, progress)
            if not isinstance(model, Run):
                model = Run.load(model)
            scores = model.evaluate(split=split)
            key, value = _metric(scores)
            summary = Path(model.run_dir) / "summary.json"
            records.append({"arm": arm, "strategy": strategy, "seed": seed, "round": r, "picks": sug.picks, "labeled_images": len(labeled),
                            "metric": key, "score": value, "run_dir": str(model.run_dir),
                            "test": {k: scores.get(k) for k in ("miou", "dice_mean", "per_class_dice", "per_class_iou", "ap") if k in scores},
                            "summary": _summary(summary)})
    report = _report(records, strategies, base_metric, len(start_ids), split, budget, suggest_args, rounds)
    atomic_write_json(out / "simulate.json", report)
    atomic_write_text(out / "simulate.md", markdown(report))
    return report


def _report(records, strategies, base_metric, start_images, split, budget, suggest_args, rounds) -> dict:
    rows = []
    for r in range(1, int(rounds) + 1):
        rand = [x["score"] for x in records if x["round"] == r and x["strategy"] == "random" and x["score"] is not None]
        mean = statistics.fmean(rand) if rand else None
        sd = statistics.stdev(rand) if len(rand) > 1 else 0.0 if rand else None
        for s in strategies:
            rec = next(x for x in records if x["round"] == r and x["arm"] == s)
            rows.append({"round": r, "strategy": s, "score": rec["score"], "random_mean": mean, "random_std": sd,
                         "gain": None if rec["score"] is None or mean is None else rec["score"] - mean,
                         "labeled_images": rec["labeled_images"], "picks": rec["picks"]})
    return {"split": split, "metric": base_metric[0], "start": {"score": base_metric[1], "labeled_images": start_images},
            "budget": budget, "settings": {k: v for k, v in suggest_args.items()}, "rounds": int(rounds), "arms": records, "gains": rows}


def markdown(report: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    m = report["metric"]
    lines = [f"# suggest --simulate: {m} on {report['split']}", "",
             f"Start: {report['start']['labeled_images']} labeled images, {m} {pct(report['start']['score'])}.", "",
             "| round | strategy | labeled images | score | random mean ± std | gain | picks |", "|---|---|---|---|---|---|---|"]
    for g in report["gains"]:
        gain = "-" if g["gain"] is None else f"{100 * g['gain']:+.2f}"
        lines.append(f"| {g['round']} | {g['strategy']} | {g['labeled_images']} | {pct(g['score'])} | {pct(g['random_mean'])} ± {pct(g['random_std'])} | "
                     f"{gain} | {', '.join(g['picks'])} |")
    lines += ["", "| arm | round | score | picks |", "|---|---|---|---|"]
    for a in report["arms"]:
        lines.append(f"| {a['arm']} | {a['round']} | {pct(a['score'])} | {', '.join(a['picks'])} |")
    return "\n".join(lines) + "\n"
