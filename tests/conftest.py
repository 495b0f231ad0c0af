import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def make_dataset(root: Path, n: int = 6, size=(48, 64), classes=("a", "b", "c"), seed: int = 0, grey: bool = False) -> Path:
    """A tiny folder dataset: images whose colour encodes the class (so it is learnable)."""
    rng = np.random.default_rng(seed)
    h, w = size
    for d in ("images", "masks", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:02d}" for i in range(n)]
    for i in ids:
        mask = np.zeros((h, w), np.uint8)
        mask[:, w // 2 :] = 1
        mask[h // 2 :, : w // 3] = 2 % len(classes)
        mask[0, 0] = 255
        img = np.stack([mask * 80, 255 - mask * 60, mask * 30], -1).astype(np.int16) + rng.integers(-10, 10, (h, w, 3))
        img = img.clip(0, 255).astype(np.uint8)
        Image.fromarray(img[..., 0] if grey else img).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "splits" / "train.txt").write_text("\n".join(ids[: n - 2]) + "\n")
    (root / "splits" / "val.txt").write_text(ids[n - 2] + "\n")
    (root / "splits" / "test.txt").write_text(ids[n - 1] + "\n")
    (root / "dataset.json").write_text(json.dumps({"name": root.name, "task": "semantic", "classes": list(classes), "ignore_index": 255}))
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "tiny")


@pytest.fixture
def shared_datasets() -> Path:
    if not (SHARED / "isbi2012-em" / "dataset.json").exists():
        pytest.skip("../shared/datasets is not beside the repository")
    return SHARED


def tiny_config(root: Path, out: Path, method: str = "supervised", teacher: str = "self", iterations: int = 4, **extra) -> dict:
    raw = {
        "name": f"{method}-{teacher}",
        "out_dir": str(out),
        "data": {"root": str(root), "labeled": "2", "crop": 32, "labeled_batch": 2, "unlabeled_batch": 2},
        "model": {"arch": "tiny", "width": 4},
        "method": {"name": method},
        "teacher": {"kind": teacher},
        "optim": {"lr": 0.01},
        "train": {"iterations": iterations, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
        "eval": {"tile": 64},
    }
    for k, v in extra.items():
        raw[k].update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return raw


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tests keep lowlabel's caches (e.g. the dataset-check verdicts) out of the user's home."""
    monkeypatch.setenv("LOWLABEL_CACHE", str(tmp_path_factory.getbasetemp() / "lowlabel-cache"))
