"""Which classes a trained ACDC run predicts, and keeps confidently, on unlabeled slices.

Per class: the predicted share of pixels against the truth's, the Dice, and the share of each true
foreground class that the pseudo-label rule keeps (confidence >= 0.95). Pixel accuracy of
pseudo-labels cannot show this: background is 96 % of ACDC's pixels.

Finding (printed, not stored; benchmarks/README.md, "Why FixMatch falls here" and "SSR-SAM from
scratch"): FixMatch's pseudo-labels lose the foreground. At the end of its acdc-cpu-1500 run it
predicts 0.2 / 0.3 / 0.3 % of the pixels as RV / myocardium / LV where the truth has 1.3 / 1.3 /
1.4 %, and keeps 5-11 % of each true heart class confidently and rightly (UniMatch 35-69 %,
labeled-only 15-42 %). SSR-SAM's acdc-ssr-sam-cpu run keeps 0 % of RV and myocardium and 38 % of
LV at tau 0.9.

    python benchmarks/probes/acdc_class_balance_probe.py RUN_OR_CHECKPOINT [...]   (run dirs of acdc-cpu-1500)

Every 6th unlabeled slice of ssl-train (ssl-labeled-3 left out), resized whole to 128² as in
training; both BatchNorm modes (eval: running statistics, as validation; train: batch statistics,
as the pseudo-labels of a self-teacher are made).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.augment.transforms import resize_whole  # noqa: E402
from lowlabel.data.dataset import FolderDataset, read_ids, to_tensors  # noqa: E402
from lowlabel.engine.run import Run  # noqa: E402

ROOT = REPO.parent / "shared" / "datasets" / "acdc-scribbles"


def main(paths: list[str]) -> None:
    labeled = set(read_ids(ROOT / "splits" / "ssl-labeled-3.txt"))
    ids = [i for i in read_ids(ROOT / "splits" / "ssl-train.txt") if i not in labeled][::6]
    ds = FolderDataset(ROOT, ids)
    samples = [resize_whole(to_tensors(ds.load(i)), 128) for i in range(len(ds))]
    X, Y = torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])
    print(f"{len(ids)} unlabeled slices; truth share (%) per class: {[round(100 * float((Y == c).float().mean()), 1) for c in range(4)]}")
    for path in paths:
        model = Run.load(path).model
        for mode in ("eval", "train"):
            model.train(mode == "train")
            with torch.no_grad():
                probs = torch.cat([model(X[i : i + 16]).softmax(1) for i in range(0, len(X), 16)])
            conf, pred = probs.max(1)
            keep = conf >= 0.95
            share = [round(100 * float((pred == c).float().mean()), 1) for c in range(4)]
            dice = [round(float(2 * ((pred == c) & (Y == c)).sum() / ((pred == c).sum() + (Y == c).sum())), 3) for c in range(1, 4)]
            kept = [round(float(((pred == c) & keep & (Y == c)).sum() / (Y == c).sum()), 3) for c in range(1, 4)]
            print(f"{path}  BN {mode}: predicted share (%) {share}; Dice RV/Myo/LV {dice}; true foreground kept as such {kept}")


if __name__ == "__main__":
    main(sys.argv[1:])
