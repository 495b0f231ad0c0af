"""Plots of a run's history (metrics.jsonl): training losses and validation mIoU."""

from __future__ import annotations

import json
from pathlib import Path


def read_history(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run."""
    train, val = [], []
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        (val if "val" in rec else train).append(rec)
    return train, val


def plot_history(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Two panels: the loss terms over iterations, and validation mIoU. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, val = read_history(run_dir)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    keys = [k for k in (train[0] if train else {}) if k.startswith("loss")]
    for k in keys:
        a.plot([r["iteration"] for r in train], [r[k] for r in train], label=k, lw=1.2)
    a.set_xlabel("iteration")
    a.set_ylabel("loss")
    a.set_title("training losses")
    if keys:
        a.legend()
    a.grid(alpha=0.3)
    if val:
        b.plot([r["iteration"] for r in val], [100 * (r["val"]["miou"] or 0) for r in val], "o-", color="C3")
    b.set_xlabel("iteration")
    b.set_ylabel("mIoU (%)")
    b.set_title("validation mIoU")
    b.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
