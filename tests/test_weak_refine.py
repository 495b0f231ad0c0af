import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lowlabel.api import fit
from lowlabel.config import load_config
from lowlabel.data.dataset import DatasetError, FolderDataset, read_label
from lowlabel.data.weak import annotation_hours, simulate, weaken_dataset
from lowlabel.sam import build_segmenter
from lowlabel.sam.cache import EmbeddingCache
from lowlabel.engine.trainer import Trainer
from lowlabel.errors import ConfigError
from lowlabel.sam.refine import LabelQuality, RefineSettings, refine_dataset, refine_image

from .conftest import tiny_config


def _mask():
    m = np.zeros((80, 100), np.uint8)
    m[:, 50:] = 1
    m[20:60, 10:40] = 2
    m[0:5, 0:5] = 255
    return m


def test_simulated_points_scribbles_coarse():
    m = _mask()
    rng = np.random.default_rng(0)
    pts = simulate(m, "point", 3, rng)
    assert sorted(np.unique(pts).tolist()) == [0, 1, 2, 255] and (pts != 255).sum() == 3  # one point per class
    sc = simulate(m, "scribble", 3, np.random.default_rng(0))
    lab = sc != 255
    assert 0 < lab.mean() < 0.2 and (sc[lab] == m[lab]).all()  # thin, and always the right class
    co = simulate(m, "coarse", 3, np.random.default_rng(0))
    lab = co != 255
    assert 0.3 < lab.mean() < 0.9 and (co[lab] == m[lab]).all()  # gaps at the boundaries
    border = np.zeros_like(m, bool)
    border[:, 47:53] = True
    assert (co[border] == 255).all()
    with pytest.raises(ValueError):
        simulate(m, "polygon", 3, rng)


def test_annotation_cost_model():
    assert annotation_hours("fine", 100) == pytest.approx(150)  # SeSAM sec. 4.2: 100 fine images = 150 h
    assert annotation_hours("coarse", 100) == pytest.approx(11.67, abs=0.1)
    assert annotation_hours("scribble", 100) == pytest.approx(3.67, abs=0.1)
    assert annotation_hours("point", 100) == pytest.approx(1.25, abs=0.1)


def test_weaken_dataset_reads_like_real_scribbles(tiny_dataset, tmp_path):
    out = weaken_dataset(tiny_dataset, "scribble", tmp_path / "weak", seed=1, min_region=4)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["weak_labels"] == {"scribbles": "scribbles/"}
    train = (tiny_dataset / "splits" / "train.txt").read_text().split()
    # the weakened split has no dense masks in the new dataset; val and test keep theirs
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == ["img04", "img05"]
    ds = FolderDataset(out, "train", weak="scribbles")
    s = ds[0]
    dense = torch.from_numpy(np.array(Image.open(tiny_dataset / "masks" / f"{train[0]}.png"))).long()
    lab = s["mask"] != 255  # the training target is the scribble map itself
    assert lab.any() and lab.float().mean() < 0.5 and (s["mask"][lab] == dense[lab]).all()
    before = (out / "scribbles" / "img00.png").stat().st_mtime
    weaken_dataset(tiny_dataset, "scribble", tmp_path / "weak", seed=1, min_region=4)  # resumable: kept
    assert (out / "scribbles" / "img00.png").stat().st_mtime == before
    assert (tiny_dataset / "masks" / "img00.png").exists()  # source untouched


def test_real_acdc_scribbles_read_like_simulated(shared_datasets):
    ds = FolderDataset(shared_datasets / "acdc-scribbles", "train", weak="scribbles")
    s = ds[0]
    lab = s["mask"] != 255
    assert lab.any() and lab.float().mean() < 0.2
    assert (s["mask"][lab] < 4).all()


def _with_scribbles(src, dst):
    """A copy of a dataset with simulated scribbles beside its dense masks (as acdc-scribbles)."""
    shutil.copytree(src, dst)
    for p in sorted((dst / "masks").glob("*.png")):
        weak = simulate(np.array(Image.open(p)), "scribble", 3, np.random.default_rng(0), min_region=4)
        (dst / "scribbles").mkdir(exist_ok=True)
        Image.fromarray(weak).save(dst / "scribbles" / p.name)
    meta = json.loads((dst / "dataset.json").read_text())
    (dst / "dataset.json").write_text(json.dumps({**meta, "weak_labels": {"scribbles": "scribbles/"}}))
    return dst


@pytest.mark.parametrize("method,teacher", [("pce", "none"), ("fixmatch", "ema"), ("sesam", "ema")])
def test_weak_runs_never_read_dense_train_masks(tiny_dataset, tmp_path, method, teacher):
    """The leak test: training with weak labels gives the same steps with every train mask
    deleted, and not the steps of training on the dense masks."""
    with_masks = _with_scribbles(tiny_dataset, tmp_path / "with")
    without = tmp_path / "without"
    shutil.copytree(with_masks, without)
    for i in (without / "splits" / "train.txt").read_text().split():
        (without / "masks" / f"{i}.png").unlink()
    runs = {}
    for name, root, weak in (("with", with_masks, "scribbles"), ("without", without, "scribbles"), ("dense", with_masks, None)):
        raw = tiny_config(root, tmp_path / f"runs-{name}", method, teacher, iterations=3, data={"weak": weak})
        if weak is None:
            raw["method"]["name"] = "supervised" if method in ("pce", "sesam") else method
        fit(load_config(raw=raw), progress=False)
        runs[name] = [json.loads(l) for l in (tmp_path / f"runs-{name}" / raw["name"] / "metrics.jsonl").read_text().splitlines() if '"val"' not in l]
    assert [r["loss"] for r in runs["with"]] == [r["loss"] for r in runs["without"]]
    assert [r["loss"] for r in runs["with"]] != [r["loss"] for r in runs["dense"]]


def test_weak_config_errors(tiny_dataset, tmp_path):
    out = weaken_dataset(tiny_dataset, "point", tmp_path / "w")
    with pytest.raises(DatasetError, match="data.weak"):  # no dense train masks: the hint names the weak folder
        Trainer(load_config(raw=tiny_config(out, tmp_path / "r1", "supervised", "none")), progress=False)
    with pytest.raises(ConfigError, match="data.weak"):
        Trainer(load_config(raw=tiny_config(tiny_dataset, tmp_path / "r2", "pce", "none")), progress=False)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def _scene():
    img = np.full((90, 120, 3), 50, np.uint8)
    img[20:70, 20:60] = (200, 40, 40)
    img[10:80, 80:115] = (40, 200, 40)
    gt = np.zeros((90, 120), np.uint8)
    gt[20:70, 20:60] = 1
    gt[10:80, 80:115] = 2
    return img + np.random.default_rng(0).integers(0, 6, img.shape).astype(np.uint8), gt


@pytest.mark.parametrize("kind", ["coarse", "scribble"])
def test_refinement_improves_weak_labels(kind):
    img, gt = _scene()
    weak = simulate(gt, kind, 3, np.random.default_rng(0), min_region=16, erode=4)
    seg = build_segmenter("classical")
    labels, conf = refine_image(img, weak, 3, seg, RefineSettings(weak_kind=kind), np.random.default_rng(0))
    q0, q1 = LabelQuality(3), LabelQuality(3)
    q0.update(weak, gt)
    q1.update(labels, gt)
    a, b = q0.summary(), q1.summary()
    assert b["coverage"] > a["coverage"] + 0.05 and b["miou"] > a["miou"] and b["precision"] > 0.9
    assert (labels[weak != 255] == weak[weak != 255]).all() and (conf[weak != 255] == 1).all()
    assert ((conf > 0) == (labels != 255)).all()


def test_refinement_from_a_teacher_probability_map():
    img, gt = _scene()
    probs = np.full((3, *gt.shape), 0.05)
    probs[gt, np.arange(gt.shape[0])[:, None], np.arange(gt.shape[1])] = 0.9
    probs[:, :, :10] = 1 / 3  # uncertain strip
    labels, _ = refine_image(img, None, 3, build_segmenter("classical"), RefineSettings(weak_kind="probs", sampler="probability", prob_threshold=0.85), np.random.default_rng(0), probs=probs)
    keep = labels != 255
    assert (labels[keep] == gt[keep]).mean() > 0.95


def test_label_quality_counts_unlabeled_as_wrong():
    gt = np.array([[0, 0, 1, 1]])
    q = LabelQuality(2)
    q.update(np.array([[0, 255, 1, 255]]), gt)
    s = q.summary()
    assert s["coverage"] == 0.5 and s["precision"] == 1.0 and s["miou"] == pytest.approx(0.5)


def test_refine_dataset_writes_manifest_and_resumes(tiny_dataset, tmp_path):
    weak = weaken_dataset(tiny_dataset, "coarse", tmp_path / "weak", erode=2, min_region=8)
    seg = build_segmenter("classical")
    cache = EmbeddingCache(tmp_path / "cache")
    man = refine_dataset(weak, tmp_path / "ref", seg, RefineSettings(), weak_folder="coarse", cache=cache, limit=2)
    assert set(man["images"]) == {"img00", "img01"} and man["backend"] == "classical" and man["settings"]["sampler"] == "skeleton"
    lab = read_label(tmp_path / "ref" / "refined" / "img00.png")
    assert lab.shape == (48, 64) and (tmp_path / "ref" / "confidence" / "img00.png").exists()
    assert cache.misses == 2
    refine_dataset(weak, tmp_path / "ref", seg, RefineSettings(), weak_folder="coarse", cache=cache, limit=2)
    assert cache.misses == 2 and cache.hits == 0  # finished images are skipped, not recomputed


def test_refine_output_is_a_dataset_fit_trains_on(tiny_dataset, tmp_path):
    from lowlabel.cli import main

    weak = weaken_dataset(tiny_dataset, "coarse", tmp_path / "w")
    out = tmp_path / "r"
    assert main(["refine", str(weak), "--weak", "coarse", "--out", str(out)]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["weak_labels"]["refined"] == "refined/" and meta["weak_confidence"] == {"refined": "confidence/"}
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == ["img04", "img05"]  # no dense train mask
    plain = FolderDataset(out, "train", weak="refined")[0]
    weighted = FolderDataset(out, "train", weak="refined", confidence="weight")[0]
    ignored = FolderDataset(out, "train", weak="refined", confidence="ignore", min_confidence=0.99)[0]
    conf = torch.from_numpy(np.array(Image.open(out / "confidence" / "img00.png"))).long()
    assert torch.equal(weighted["weight"], conf) and torch.equal(weighted["mask"], plain["mask"])
    low = conf < round(0.99 * 255)
    assert low.any() and (ignored["mask"][low] == 255).all() and torch.equal(ignored["mask"][~low], plain["mask"][~low])
    for mode in ("none", "weight", "ignore"):
        raw = tiny_config(out, tmp_path / f"runs-{mode}", "fixmatch", "ema", iterations=2, data={"weak": "refined", "weak_confidence": mode})
        fit(load_config(raw=raw), progress=False)
    with pytest.raises(DatasetError, match="confidence maps"):
        FolderDataset(tiny_dataset, "train", weak=None, confidence="weight")


def test_weighted_supervised_loss():
    from lowlabel.methods.base import supervised_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.randint(0, 3, (2, 8, 8), generator=g)
    full = torch.full_like(mask, 255)
    assert torch.allclose(supervised_loss(logits, mask, "ce", full), supervised_loss(logits, mask, "ce"))
    half = full.clone()
    half[:, :4] = 0  # zero weight == ignored
    assert torch.allclose(supervised_loss(logits, mask, "ce", half), supervised_loss(logits, torch.where(half == 0, 255, mask), "ce"))
    assert torch.allclose(supervised_loss(logits, mask, "ce_dice", half), supervised_loss(logits, torch.where(half == 0, 255, mask), "ce_dice"))
