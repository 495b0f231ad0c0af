"""End to end on a real dataset: ../shared/datasets/isbi2012-em (split, load, augment, a tiny
model's forward pass and training steps, evaluate, predict)."""

import numpy as np

from lowlabel.api import fit
from lowlabel.augment.transforms import LabeledTransform, UnlabeledTransform
from lowlabel.config import load_config
from lowlabel.data.dataset import FolderDataset, collate
from lowlabel.data.splits import make_split
from lowlabel.data.validate import validate_dataset
from lowlabel.models import build_model


def test_isbi_end_to_end(shared_datasets, tmp_path):
    root = shared_datasets / "isbi2012-em"
    assert validate_dataset(root).ok
    labeled, unlabeled = make_split(root, fraction="1/4", seed=0)
    assert len(labeled) == 5 and len(unlabeled) == 15
    lab = FolderDataset(root, labeled, transform=LabeledTransform(128))
    unl = FolderDataset(root, unlabeled, labeled=False, transform=UnlabeledTransform(128, n_strong=2))
    s = lab[0]
    assert s["image"].shape == (3, 128, 128) and set(np.unique(s["mask"].numpy())) <= {0, 1, 255}
    assert (s["image"][0] == s["image"][1]).all()  # grey slices expanded to 3 channels
    batch = collate([lab[0], lab[1]])
    assert collate([unl[0], unl[1]])["strong"].shape == (2, 2, 3, 128, 128)
    model = build_model("tiny", num_classes=2, width=8)
    assert model(batch["image"]).shape == (2, 2, 128, 128)

    raw = {
        "name": "isbi", "out_dir": str(tmp_path),
        "data": {"root": str(root), "labeled": "1/4", "crop": 128, "labeled_batch": 2, "unlabeled_batch": 2},
        "model": {"arch": "tiny", "width": 8}, "method": {"name": "unimatch"},
        "optim": {"name": "adamw", "lr": 0.003, "head_lr_mult": 1.0},
        "train": {"iterations": 30, "val_every": 30, "checkpoint_every": 30},
        "eval": {"tile": 256, "max_images": 2},
    }
    run = fit(load_config(raw=raw), progress=False)
    m = run.evaluate(split="test")
    assert m["images"] == 5 and m["miou"] is not None
    # 30 steps from scratch already beat predicting the majority class everywhere
    assert m["pixel_accuracy"] > 0.7
    out = run.predict_folder(root / "images" / "slice00.png", tmp_path / "pred")
    assert out[0].exists() and (tmp_path / "pred" / "overlays" / "slice00.jpg").exists()
