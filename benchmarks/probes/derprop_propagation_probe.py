"""Where DerProp's label propagation keeps ACDC's classes, and what its terms' gradients weigh
(issue 38; the numbers are quoted in lowlabel/methods/derprop.py's docstring).

    python benchmarks/probes/derprop_propagation_probe.py [--skip-gradients]

1. Ideal case, on 80 unlabeled ssl-train slices of acdc-scribbles (10 batches of 8, seed 0),
   resized whole to 128^2 as in training: perfect logits (5 x the one-hot truth) propagated by
   the method's own ``DerProp._rectify`` (eq. 4, then back to 128^2) with *ideal* features (the
   one-hot truth at the level's resolution, nearest), at strides 16, 8, 4, 2 (encoder levels of
   the UNet at 128^2) and 1 (its decoder output), for each ``propagation_norm``: the share of
   foreground pixels (right ventricle, myocardium, left ventricle) whose class survives, per class,
   and the mean confidence of the propagated distribution on them.
2. One training step of a randomly initialised UNet (width 16) on a real ACDC batch (8 labeled,
   8 unlabeled slices, the acdc-cpu-1500 recipe's losses): the gradient norm of each weighted
   term on the encoder (as ``train.grad_norm_every`` logs it), for the propagation at the
   decoder's resolution (``none``, ``similarity``) and at the bottleneck (``none``, the paper's F4).
One thread; about 3 minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from lowlabel.augment.transforms import (  # noqa: E402
    LabeledTransform,
    UnlabeledTransform,
    resize_whole,
)
from lowlabel.data.dataset import FolderDataset, collate, read_ids, to_tensors  # noqa: E402
from lowlabel.engine.teachers import Teacher  # noqa: E402
from lowlabel.methods import StepContext, build_method  # noqa: E402
from lowlabel.models import build_model  # noqa: E402

ROOT = REPO.parent / "shared" / "datasets" / "acdc-scribbles"
C = 4


def ideal(args) -> None:
    labeled = set(read_ids(ROOT / "splits" / "ssl-labeled-3.txt"))
    ids = [i for i in read_ids(ROOT / "splits" / "ssl-train.txt") if i not in labeled]
    g = torch.Generator().manual_seed(0)
    pick = [ids[i] for i in torch.randperm(len(ids), generator=g)[:80].tolist()]
    ds = FolderDataset(ROOT, pick)
    y = torch.stack([resize_whole(to_tensors(ds.load(i)), 128)["mask"] for i in range(len(ds))]).clamp_max(C - 1)
    fg = y > 0
    print(f"{len(y)} slices, foreground {100 * float(fg.float().mean()):.1f} % of pixels")
    logits = 5 * F.one_hot(y, C).permute(0, 3, 1, 2).float()
    valid = torch.ones_like(y, dtype=torch.bool)
    net = build_model("unet2d", num_classes=C, width=16, in_channels=1)
    for stride in (16, 8, 4, 2, 1):
        h = 128 // stride
        v = F.one_hot(F.interpolate(y[:, None].float(), size=(h, h), mode="nearest")[:, 0].long(), C).permute(0, 3, 1, 2).float()
        for norm in ("none", "similarity", "row"):
            if norm == "row" and h * h > 4096:
                continue
            m = build_method("derprop", {"propagation_norm": norm}, num_classes=C, model=net)
            probs = torch.cat([m._rectify(logits[i : i + 8], v[i : i + 8], valid[i : i + 8]).exp() for i in range(0, len(y), 8)])
            conf, pred = probs.max(1)
            kept = float((pred[fg] == y[fg]).float().mean())
            per = [round(100 * float((pred[y == c] == c).float().mean()), 1) for c in range(1, C)]
            print(f"stride {stride:2d} ({h:3d}^2) norm {norm:10s}: foreground kept {100 * kept:5.1f} %  RV/Myo/LV {per}  "
                  f"confidence on foreground {float(conf[fg].mean()):.3f}")


def gradients() -> None:
    lab_ids = read_ids(ROOT / "splits" / "ssl-labeled-3.txt")[:8]
    unl_ids = [i for i in read_ids(ROOT / "splits" / "ssl-train.txt") if i not in set(lab_ids)][::150][:8]
    lab = FolderDataset(ROOT, lab_ids, transform=LabeledTransform(128, resize=True, rotate="medical"))
    unl = FolderDataset(ROOT, unl_ids, transform=UnlabeledTransform(128, n_strong=2, resize=True, rotate="medical"))
    lb, ub = collate([lab[i] for i in range(len(lab))]), collate([unl[i] for i in range(len(unl))])
    for norm, source in (("none", "decoder"), ("similarity", "decoder"), ("none", "bottleneck")):
        torch.manual_seed(0)
        net = build_model("unet2d", num_classes=C, width=16, in_channels=1)
        params = {"labeled_loss": "ce_dice", "unlabeled_loss": "dice", "threshold": 0.0, "propagation_norm": norm, "feature_source": source}
        m = build_method("derprop", params, num_classes=C, model=net)
        out = m.training_step(net, Teacher("epoch_momentum", net), lb, ub, StepContext(500, 1500, 5, 10, C))
        enc = list(net.encoder.parameters())
        norms = {}
        for k, t in out.terms.items():
            grads = torch.autograd.grad(t, enc, retain_graph=True, allow_unused=True)
            norms[k] = round(float(torch.sqrt(sum((x.float() ** 2).sum() for x in grads if x is not None))), 3)
        print(f"{source:10s} norm {norm:10s}: gradient norm on the encoder per weighted term {norms}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-gradients", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ideal(a)
    if not a.skip_gradients:
        gradients()
