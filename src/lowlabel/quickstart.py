"""``lowlabel quickstart``: the whole job on the bundled sample, from scratch, on CPU.

Trains UniMatch on 2 labeled + 6 unlabeled aerial images (Dubai), evaluates on the 2 test
images, writes predictions and colour overlays and a plot of the training curves.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import load_config
from .sample_data import sample_path


def quickstart_config(out: str | Path, iterations: int | None = None, method: str = "unimatch"):
    raw = {
        "name": f"quickstart-{method}",
        "out_dir": str(Path(out) / "runs"),
        "data": {
            "root": str(sample_path()), "labeled": "2", "split_seed": 0, "crop": 192,
            "labeled_batch": 4, "unlabeled_batch": 4, "scale": [0.5, 1.5],
        },
        "model": {"arch": "tiny", "width": 24},
        "method": {"name": method},
        "teacher": {"kind": "self"},
        "optim": {"name": "adamw", "lr": 0.003, "head_lr_mult": 1.0, "weight_decay": 0.01, "schedule": "cosine", "warmup_iters": 20},
        # channels_last off: the README's quickstart numbers were measured in the contiguous layout, and
        # channels_last changes the order of float sums (so the scores); it is not measured to pay for this net
        "train": {"iterations": iterations or 500, "val_every": 50, "checkpoint_every": 50, "log_every": 5, "channels_last": False},
        "eval": {"tile": 384, "overlap": 0.25},
    }
    return load_config(raw=raw)


def quickstart(out: str | Path = "lowlabel-quickstart", iterations: int | None = None, method: str = "unimatch") -> dict:
    from .api import fit
    from .eval.evaluate import metrics_table
    from .eval.plots import plot_history
    from .utils import atomic_write_json, console

    con = console()
    out = Path(out)
    cfg = quickstart_config(out, iterations, method)
    run_dir = Path(cfg.out_dir) / cfg.name
    t0 = time.time()
    con.print(f"[bold]lowlabel quickstart[/]: {method} from scratch on the bundled sample ({sample_path()})")
    if (run_dir / "checkpoints" / "last.pt").exists():
        con.print(f"resuming the run in {run_dir}")
        run = fit(resume=run_dir)
    else:
        run = fit(cfg)
    metrics = run.evaluate(split="test")
    con.print(metrics_table(metrics, f"test split of the sample ({metrics['images']} images)"))
    pred_dir = out / "predictions"
    test_images = sample_path() / "images"
    ids = (sample_path() / "splits" / "test.txt").read_text().split()
    for i in ids:
        run.predict_folder(next(test_images.glob(f"{i}.*")), pred_dir)
    curves = plot_history(run.run_dir, out / "curves.png")
    summary = {"method": method, "test": metrics, "seconds": round(time.time() - t0, 1), "run_dir": str(run.run_dir)}
    atomic_write_json(out / "quickstart.json", summary)
    con.print(
        f"\n[bold]done in {summary['seconds']:.0f} s[/]. Test mIoU {100 * (metrics['miou'] or 0):.1f}%.\n"
        f"  run (checkpoints, config, metrics.jsonl): {run.run_dir}\n"
        f"  predictions (label PNGs) and overlays:    {pred_dir} , {pred_dir / 'overlays'}\n"
        f"  training curves:                          {curves}\n"
        f"  metrics:                                  {out / 'quickstart.json'}"
    )
    return summary
