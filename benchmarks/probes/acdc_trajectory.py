"""UniMatch's validation curve on ACDC (3 labeled cases) against the reference's own training log.

Finding (results/acdc-trajectory/): on a lent H100 at 256², batch 12 + 12, poly over 31.8 k
iterations, UniMatch's validation Dice is 71.2 at iteration 1000 and 78.9 at 2100 against the
reference log's 71.5 and 80: within 4.0 points of it from iteration 950 on, 16-18 points behind at
~640 and ~750. Labeled-only under the same schedule: 52.2 at 2100.

The acdc-cpu protocol trains 1000 iterations with a poly schedule over those 1000, so its
learning rate has fallen to half by iteration 500; UniMatch's medical run follows poly over
~31.8 k iterations, so at iteration 2000 its rate is still ~0.0095. To compare trajectories this
probe trains the protocol's ``unimatch`` cell (or another method's, ``--method``) with the
reference's schedule length (``train.iterations: 31800``) and stops at ``--stop`` iterations,
validating every 100 (mean foreground Dice per volume on the 10 validation patients). What still
differs from the reference with the default ``--protocol acdc-cpu``: 128 x 128 slices instead of
256 x 256, batch 8 + 8 instead of 12 + 12. ``--protocol acdc-gpu`` uses the reference's 256 x 256 and
12 + 12 (a GPU's work). Either way lowlabel validates on the 10 validation patients, where the
reference's log scores val + test.

Resumable (the run directory keeps its checkpoint): run it again with a larger ``--stop``.

    python benchmarks/probes/acdc_trajectory.py [--protocol acdc-cpu|acdc-gpu] [--method unimatch] [--stop 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# UniMatch's published log (more-scenarios/medical training-logs/3cases.log, per-volume mean
# foreground Dice on val + test), as read for the issue that set this benchmark: iteration -> Dice (%).
REFERENCE = {500: 30.8, 640: 63.0, 750: 69.0, 950: 71.5, 1000: 71.5, 1250: 77.7, 1500: 78.5, 2100: 80.0}
REFERENCE_250 = (0.4, 38.0)  # the log's range around iteration 250


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="acdc-cpu", help="acdc-cpu (128², batch 8+8) or acdc-gpu (256², batch 12+12)")
    ap.add_argument("--method", default="unimatch", help="a method (cell) of the protocol")
    ap.add_argument("--stop", type=int, default=1000, help="stop (and checkpoint) at this iteration")
    ap.add_argument("--schedule", type=int, default=31800, help="train.iterations: the length the poly schedule decays over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "acdc-trajectory"))
    args = ap.parse_args(argv)

    from lowlabel.bench import cells, git_commit, load_protocol
    from lowlabel.config import load_config
    from lowlabel.engine.trainer import Trainer

    proto = load_protocol(REPO / "benchmarks" / "protocols" / f"{args.protocol}.yaml")
    cell = next(c for c in cells(proto) if c["method"] == args.method and c["seed"] == args.seed
                and str(c["fraction"]).endswith("ssl-labeled-3.txt"))
    raw = cell["raw"]
    out = Path(args.out)
    name = f"{args.method}__schedule{args.schedule}__s{args.seed}"
    if args.protocol != "acdc-cpu":
        name = f"{args.protocol}__{name}"
    raw.update(name=name, out_dir=str(out / "runs"))
    raw["train"] = {**raw["train"], "iterations": args.schedule, "val_every": 100, "checkpoint_every": 100}
    cfg = load_config(raw=raw)
    run_dir = out / "runs" / name
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume)
    commit = git_commit()
    trainer.fit(stop_at=args.stop)

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["iteration"], r["val"]["dice_mean"], r["val"]["miou"]] for r in records if "val" in r]
    result = {
        "protocol": args.protocol, "crop": cfg.data.crop,
        "batch": [cfg.data.labeled_batch, cfg.data.unlabeled_batch], "device": trainer_device(trainer),
        "method": args.method, "schedule": args.schedule, "stopped_at": trainer.iteration, "seed": args.seed,
        "val_dice_mean": curve, "reference": REFERENCE, "reference_250": REFERENCE_250,
        "gap_at_reference_points": gaps(curve),
        "commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(out / f"{name}.png", result)
    for it, dice, _ in curve:
        print(f"{it:6d}  val Dice {100 * dice:5.1f}")
    for it, gap in result["gap_at_reference_points"].items():
        print(f"reference {REFERENCE[it]:5.1f} at {it:5d}: gap {gap:+.1f}")
    return 0


def gaps(curve: list) -> dict:
    """lowlabel minus reference (Dice points) at each reference iteration the curve spans; between
    two validations lowlabel's Dice is interpolated linearly (the reference's iterations are
    epochs x ~106, so most fall between lowlabel's checkpoints)."""
    import numpy as np

    its, dice = [c[0] for c in curve], [100 * c[1] for c in curve]
    return {it: round(float(np.interp(it, its, dice)) - ref, 1) for it, ref in REFERENCE.items() if its and its[0] <= it <= its[-1]}


def trainer_device(trainer) -> str:
    import torch

    dev = next(trainer.student.parameters()).device
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    c = result["val_dice_mean"]
    crop, (bl, bu) = result.get("crop", 128), result.get("batch", (8, 8))
    ax.plot([p[0] for p in c], [100 * p[1] for p in c], "o-",
            label=f"lowlabel {result['method']} ({crop}², batch {bl}+{bu}, poly over {result['schedule']})")
    ref = sorted(result["reference"].items(), key=lambda kv: int(kv[0]))
    ax.plot([int(k) for k, _ in ref], [v for _, v in ref], "ks--", label="UniMatch reference log (256², batch 12+12)")
    ax.vlines(250, *result["reference_250"], colors="k", linestyles=":", label="reference range at ~250")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation mean foreground Dice (%, per volume)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("ACDC, 3 labeled cases: validation trajectory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
