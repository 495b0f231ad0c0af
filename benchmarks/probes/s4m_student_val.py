"""Is an S4M run's EMA teacher behind its student? Scores both weights of a training checkpoint.

Finding (printed, not stored; benchmarks/README.md, "S4M at the rate that converges"): no. The
student is as far below labeled-only as its teacher: dsb2018-lr3e-4-cpu teacher-student seed 0 at
iteration 500, student val AP 20.1, teacher 20.05, labeled-only 26.1; seed 1 at iteration 600,
21.6, 21.1 and 29.0. The gap is the student's loss, not the EMA teacher's lag.

Scores the ``student`` and the ``teacher`` weights of a training checkpoint (``last.pt``, any
iteration) on the first ``--images`` val images of the run's dataset, as the run's validation does
(``evaluate_instances``: COCO mask AP / AP50 / AP75 and the counting error). The teacher is scored
with the BatchNorm statistics it holds; the run's own validation recomputes them first, so its
logged value can differ a little. Prints one JSON line.

    python benchmarks/probes/s4m_student_val.py RUN/checkpoints/last.pt [--who student teacher] [--images 20]
"""

from __future__ import annotations

import argparse
import json

from lowlabel.data.dataset import FolderDataset
from lowlabel.data.validate import require_valid
from lowlabel.engine.run import Run
from lowlabel.engine.trainer import read_checkpoint
from lowlabel.eval.instances import evaluate_instances


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--who", nargs="+", choices=["student", "teacher"], default=["student", "teacher"])
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    state = read_checkpoint(args.checkpoint)
    if "student" not in state:
        ap.error(f"{args.checkpoint} is not a training checkpoint (no student weights): give a run's last.pt")
    if "teacher" in args.who and not state.get("teacher"):
        ap.error(f"{args.checkpoint} has no teacher (a labeled-only run): use --who student")
    run = Run.load(args.checkpoint, device="cpu")
    info = require_valid(run.data_root, splits=["val"], read_pixels=False)
    val = FolderDataset(run.data_root, "val", labeled=True, info=info)
    out = {"checkpoint": args.checkpoint, "iteration": state["iteration"]}
    for who in args.who:
        run.model.load_state_dict(state["student"] if who == "student" else state["teacher"]["model"])
        r = evaluate_instances(run.model, val, eval_cfg=run.eval_cfg.model_copy(update={"max_images": args.images}), device="cpu")
        out[who] = {k: round(r[k], 4) for k in ("ap", "ap50", "ap75", "count_mae", "predicted_instances")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
