"""Test Dice against annotation hours for every committed ACDC row of the project (issue 42).

Reads every cell JSON under ``benchmarks/results/*/cells/`` whose dataset is ACDC
(``config.data.root`` ends in ``acdc-scribbles``), groups the cells by protocol and method, and
puts each row at its annotation time: labeled images x SeSAM's per-image cost of its label kind
(:data:`lowlabel.data.weak.COST_SECONDS`: fine 90 min, scribble 2.2 min; a model of relative cost,
not a measurement on these slices). Cells from before ``labeled_images`` was recorded count the
ids of their labeled list (``data.labeled``, e.g. ``splits/ssl-labeled-3.txt``).

Writes ``benchmarks/results/acdc-annotation-cost/``: ``cost.png`` (log hours vs Dice, one marker
per row, error bars over seeds), ``rows.json`` and ``README.md`` (the table). The rows differ in
recipe and budget (each protocol's own); the plot compares labels, not methods at equal cost.

    python benchmarks/acdc_cost.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.bench import label_kind  # noqa: E402
from lowlabel.data.dataset import read_ids  # noqa: E402
from lowlabel.data.weak import annotation_hours  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "acdc-annotation-cost"


def _labeled_count(cell: dict) -> int | None:
    if cell.get("labeled_images"):
        return int(cell["labeled_images"])
    labeled = str(((cell.get("config") or {}).get("data") or {}).get("labeled", ""))
    path = Path(labeled) if Path(labeled).is_absolute() else REPO / labeled
    return len(read_ids(path)) if labeled.endswith(".txt") and path.is_file() else None


def rows(results: Path = REPO / "benchmarks" / "results") -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for f in sorted(results.glob("*/cells/*.json")):
        cell = json.loads(f.read_text())
        data = (cell.get("config") or {}).get("data") or {}
        if not str(data.get("root", "")).rstrip("/").endswith("acdc-scribbles") or cell.get("dice_mean") is None:
            continue
        groups.setdefault((f.parent.parent.name, cell["method"]), []).append(cell)
    out = []
    for (protocol, method), cells in sorted(groups.items()):
        kind = cells[0].get("label_kind") or label_kind(((cells[0].get("config") or {}).get("data") or {}).get("weak"))
        n = _labeled_count(cells[0])
        if kind is None or n is None:
            continue
        dice = [c["dice_mean"] for c in sorted(cells, key=lambda c: c["seed"])]
        out.append({"protocol": protocol, "method": method, "label_kind": kind, "labeled_images": n,
                    "annotation_hours": annotation_hours(kind, n), "seeds": sorted(c["seed"] for c in cells),
                    "dice_mean": statistics.fmean(dice), "dice_std": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                    "dice_per_seed": dice, "iterations": cells[0].get("iterations")})
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rows.json").write_text(json.dumps(table, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = {"fine": "o", "scribble": "s", "coarse": "^", "point": "v"}
    for k, r in enumerate(table):
        ax.errorbar(r["annotation_hours"], 100 * r["dice_mean"], yerr=100 * r["dice_std"], fmt=markers.get(r["label_kind"], "o"),
                    color=plt.cm.tab20(k % 20), capsize=3, label=f"{r['protocol']} / {r['method']} ({r['labeled_images']} x {r['label_kind']})")
    ax.set_xscale("log")
    ax.set_xlabel("annotation time (h, SeSAM's per-image costs: fine 90 min, scribble 2.2 min)")
    ax.set_ylabel("test Dice per volume (%)")
    ax.set_title("ACDC: every committed row, Dice against annotation time (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(OUT / "cost.png", dpi=110)
    lines = ["# ACDC: test Dice against annotation time, every committed row", "",
             "Made by `python benchmarks/acdc_cost.py` from the committed cell JSONs. Annotation time = labeled images x SeSAM's "
             "per-image cost of the label kind (fine 90 min, scribble 2.2 min): a model of relative cost, not a measurement on "
             "these slices. Rows differ in recipe and budget (each protocol's own); see each protocol's results.md.", "",
             "![Dice against annotation hours](cost.png)", "",
             "| protocol | method | labels | annotation h | seeds | test Dice (%) | Dice per hour |", "|---|---|---|---|---|---|---|"]
    for r in sorted(table, key=lambda r: (r["annotation_hours"], -r["dice_mean"])):
        lines.append(f"| {r['protocol']} | {r['method']} | {r['labeled_images']} x {r['label_kind']} | {r['annotation_hours']:.1f} | "
                     f"{','.join(map(str, r['seeds']))} | {100 * r['dice_mean']:.1f} ± {100 * r['dice_std']:.1f} | "
                     f"{100 * r['dice_mean'] / r['annotation_hours']:.2f} |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print(f"{len(table)} rows -> {OUT}")


if __name__ == "__main__":
    main()
