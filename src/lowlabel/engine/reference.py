"""``train.reference``: hold a semi-supervised run against a labeled-only run of the same data.

A user who brings their own images cannot know in advance whether semi-supervision pays on them
(on several shared datasets it did not, from scratch). Given the run directory of a labeled-only
run (``method.name: supervised``, or SSR-SAM's ``ssr_sam_labeled``) on the same dataset, labeled
set and validation split, the trainer reports at every validation whether the semi-supervised
model is above the reference's best validation score (the bar a user would otherwise keep), and
the run's summary says plainly whether semi-supervision helped and which model to keep. The
reference's own files are only read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.dataset import read_ids
from ..errors import ConfigError

LABELED_ONLY_METHODS = ("supervised", "ssr_sam_labeled")


@dataclass
class Reference:
    run_dir: Path
    method: str
    select: str
    best: float  # the reference's best validation score of ``select``
    best_iteration: int
    checkpoint: Path

    @classmethod
    def load(cls, path: str | Path, *, select: str, dataset: str, labeled_ids: list[str], val_split: str | None) -> Reference:
        """The reference run at ``path`` (a run directory), checked against this run: a labeled-only
        method, the same dataset, labeled ids and validation split, and validation records of
        ``select``. Each mismatch is a one-line :class:`ConfigError`."""
        run_dir = Path(path)
        key = "train.reference"
        if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{key}={path}: not a lowlabel run directory (it needs config.yaml and metrics.jsonl)")
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        method = ((cfg.get("method") or {}).get("name")) or "supervised"
        if method not in LABELED_ONLY_METHODS:
            raise ConfigError(f"{key}={path}: a labeled-only run is needed as the reference, this one trained {method!r} "
                              f"(one of {', '.join(LABELED_ONLY_METHODS)})")
        meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        if meta.get("dataset") and meta["dataset"] != dataset:
            raise ConfigError(f"{key}={path}: trained on dataset {meta['dataset']!r}, this run on {dataset!r}")
        ref_val = (cfg.get("data") or {}).get("val_split")
        if ref_val != val_split:
            raise ConfigError(f"{key}={path}: validated on split {ref_val!r}, this run on {val_split!r}: the scores would not compare")
        lab = run_dir / "splits" / "labeled.txt"
        if lab.is_file() and set(read_ids(lab)) != set(labeled_ids):
            theirs = set(read_ids(lab))
            raise ConfigError(f"{key}={path}: its labeled set differs from this run's ({len(theirs)} vs {len(labeled_ids)} ids, "
                              f"{len(theirs ^ set(labeled_ids))} not shared): use a reference trained on the same labeled images")
        curve = []
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "val" in rec and rec["val"].get(select) is not None:
                curve.append((rec["iteration"], float(rec["val"][select])))
        if not curve:
            raise ConfigError(f"{key}={path}: its metrics.jsonl holds no validation {select!r} (train.select): "
                              "a reference needs validation scores (train.val_every > 0)")
        best_it, best = max(curve, key=lambda c: (c[1], -c[0]))
        return cls(run_dir, method, select, best, best_it, run_dir / "checkpoints" / "best.pt")

    def line(self, score: float) -> str:
        """A validation's comparison, for the progress bar and the log."""
        return f"vs labeled-only {100 * (score - self.best):+.1f}"

    def record(self, best: float | None) -> dict:
        """What summary.json says of the comparison: this run's best validation score against the
        reference's, whether semi-supervision helped, which model to keep, and a plain sentence."""
        if best is None or best < 0:
            best = None
        helped = best is not None and best > self.best
        name = f"val {self.select}"
        if best is None:
            message = "no validation score: the comparison with the labeled-only reference could not be made"
        elif helped:
            message = (f"semi-supervision helped here: best {name} {100 * best:.1f} against {100 * self.best:.1f} of the labeled-only "
                       f"reference ({100 * (best - self.best):+.1f}); this run's checkpoints/best.pt is the model to keep")
        else:
            message = (f"semi-supervision did not help here: best {name} {100 * best:.1f} against {100 * self.best:.1f} of the labeled-only "
                       f"reference ({100 * (best - self.best):+.1f}); keep the reference's model, {self.checkpoint} "
                       "(this run's best.pt is kept as it is)")
        return {"run": str(self.run_dir), "method": self.method, "select": self.select, "reference_best_val": self.best,
                "reference_best_iteration": self.best_iteration, "best_val": best, "delta": None if best is None else best - self.best,
                "helped": helped, "keep": str(self.checkpoint) if best is not None and not helped else "best.pt", "message": message}
