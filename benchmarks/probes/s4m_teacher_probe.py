"""How good are the pseudo-instances an S4M teacher hands the student?

Finding (results/s4m-teacher-probe/): they find nuclei but miss many and draw them loosely.
dsb2018-cpu's labeled-only model at S4M's tau 0.7 keeps 4.25 pseudo-instances per crop of 7.05
nuclei, precision 0.64 (0.27 at IoU 0.75), recall 0.39, with half the nucleus pixels background in
the pseudo-label; merged clumps are rare (0.035). After 300 warm teacher-student iterations its
teacher's precision at IoU 0.75 is 0.067 (dsb2018-warm-cpu).

Takes a trained instance run (its evaluated model: the EMA teacher of an ``s4m`` run, the model
of a ``supervised`` one) and the top-left ``--crop`` px of the first ``--images`` train images
that the run did not label (its unlabeled pool, whose true instances dsb2018 has). Each crop goes
through :meth:`lowlabel.methods.instance.S4M.pseudo_instances` as in training (class confidence
>= each ``--threshold``, >= 5 px, no PR), and the kept pseudo-instances are matched to the true
nuclei of >= 5 px at IoU >= 0.5 (a match at IoU > 0.5 is unique). Reported per threshold:
pseudo-instances and true nuclei per crop, precision, recall, and the share of true-nucleus pixels
that the pseudo-label calls background (what the unlabeled loss then teaches the student to
suppress). How well the kept ones are drawn: ``precision_75``, the share that match a true nucleus
at IoU > 0.75 (what AP75 asks of a prediction), and ``merged``, the share that hold most of the
pixels (> 50 %) of two or more true nuclei (a clump taught as one nucleus).

    python benchmarks/probes/s4m_teacher_probe.py RUN [--images 40] [--threshold 0.5 0.7 0.9]
    python benchmarks/probes/s4m_teacher_probe.py RUN/checkpoints/last.pt --student   # a training checkpoint's student
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lowlabel.engine.run import Run
from lowlabel.engine.trainer import read_checkpoint
from lowlabel.methods.instance import S4M
from s4m_pr_probe import train_crops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--threshold", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--student", action="store_true", help="RUN is a training checkpoint (a run's last.pt): probe its student's weights "
                    "(at the end of an s4m burn-in: the weights the teacher starts from)")
    args = ap.parse_args()
    run = Run.load(args.run, device="cpu")
    if run.task != "instance":
        ap.error(f"{args.run} is not an instance run")
    if args.student:
        state = read_checkpoint(args.run)
        if "student" not in state:
            ap.error(f"{args.run} is not a training checkpoint (no student weights)")
        run.model.load_state_dict(state["student"])
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent.parent
    root = Path(run.data_root)
    labeled = set((run_dir / "splits" / "labeled.txt").read_text().split())
    pool = [s for s in (root / "splits" / "train.txt").read_text().split() if s not in labeled][: args.images]
    crops = list(train_crops(root, pool, args.crop))
    methods = {t: S4M({"threshold": t}, num_classes=run.num_classes) for t in args.threshold}
    stats = {t: {"kept": 0, "correct": 0, "correct_75": 0, "merged": 0, "true": 0, "found": 0, "true_px": 0, "background_px": 0} for t in args.threshold}
    for _, image, ids in crops:
        truth = [ids == k for k in np.unique(ids) if k and (ids == k).sum() >= 5]
        weak = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
        for t, method in methods.items():
            pseudo = method.pseudo_instances(run.model, weak, np.random.default_rng(0))[0][0].numpy()
            kept = [pseudo == k for k in np.unique(pseudo) if k]
            inter = np.array([[(p & g).sum() for g in truth] for p in kept], dtype=float).reshape(len(kept), len(truth))
            areas_p = np.array([p.sum() for p in kept], dtype=float).reshape(-1, 1)
            areas_g = np.array([g.sum() for g in truth], dtype=float).reshape(1, -1)
            m = inter / np.maximum(areas_p + areas_g - inter, 1)  # IoU of each kept pseudo-instance with each nucleus
            s = stats[t]
            s["kept"] += len(kept)
            s["correct"] += int((m.max(1, initial=0) > 0.5).sum())
            s["correct_75"] += int((m.max(1, initial=0) > 0.75).sum())
            s["merged"] += int(((inter > 0.5 * areas_g).sum(1) >= 2).sum())
            s["true"] += len(truth)
            s["found"] += int((m.max(0, initial=0) > 0.5).sum())
            nuclei = ids > 0
            s["true_px"] += int(nuclei.sum())
            s["background_px"] += int((nuclei & (pseudo == 0)).sum())
    for t, s in stats.items():
        print(json.dumps({
            "run": run_dir.name, "weights": "student" if args.student else "evaluated", "threshold": t, "crops": len(crops),
            "pseudo_per_crop": round(s["kept"] / len(crops), 2), "true_per_crop": round(s["true"] / len(crops), 2),
            "precision": round(s["correct"] / max(s["kept"], 1), 3),
            "precision_75": round(s["correct_75"] / max(s["kept"], 1), 3), "merged": round(s["merged"] / max(s["kept"], 1), 3), "recall": round(s["found"] / max(s["true"], 1), 3),
            "nucleus_pixels_as_background": round(s["background_px"] / max(s["true_px"], 1), 3),
        }))


if __name__ == "__main__":
    main()
