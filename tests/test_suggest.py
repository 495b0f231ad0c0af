"""lowlabel suggest / simulate: every strategy on toy pools whose right pick is known.

Most tests use a hand-built network (``ColourNet``): its logits are a fixed linear map of each
pixel's colour (red, green, blue = classes 0, 1, 2), so which image is uncertain, where its
probability mass lies and how far its pooled features are from the labeled ones is known by
hand. The CLI and the simulation use tiny trained runs.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lowlabel.cli import main
from lowlabel.config import load_config
from lowlabel.engine.run import Run
from lowlabel.errors import ConfigError, DatasetError
from lowlabel.label import STRATEGIES, suggest
from lowlabel.label import strategies as S
from lowlabel.models.segmenter import Segmenter

from .conftest import make_dataset, tiny_config

RED, GREEN, BLUE, BLACK = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0)
MIXED = (0.5, 0.5, 0.0)  # torn between red and green: entropy ~ ln 2


# ----------------------------------------------------------------------------- toy data and model
def toy_dataset(root: Path, images: dict, size: int = 32, classes=("red", "green", "blue"), name: str | None = None) -> Path:
    """A folder dataset of the given images: each a colour (filled) or an [H, W, 3] float array.
    Masks are the brightest channel. train = the given ids; val, test: one red image each."""
    for d in ("images", "masks", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    images = {**images, "val0": RED, "test0": RED}
    for sid, spec in images.items():
        arr = np.asarray(spec, np.float32)
        if arr.ndim == 1:
            arr = np.broadcast_to(arr, (size, size, 3))
        Image.fromarray((arr * 255).round().astype(np.uint8)).save(root / "images" / f"{sid}.png")
        Image.fromarray(arr.argmax(2).astype(np.uint8)).save(root / "masks" / f"{sid}.png")
    train = [i for i in images if i not in ("val0", "test0")]
    (root / "splits" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / "val.txt").write_text("val0\n")
    (root / "splits" / "test.txt").write_text("test0\n")
    (root / "dataset.json").write_text(json.dumps({"name": name or root.name, "task": "semantic", "classes": list(classes)}))
    return root


class _Input(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return [self.drop(x)]


class _Last(nn.Module):
    def forward(self, feats):
        return feats[-1]


class ColourNet(Segmenter):
    """logits = head(colour): a 1x1 convolution with weight ``k`` x identity (or ``kernel``, a
    [C, 3, kh, kw] weight), optional dropout on the input; features = the colour itself."""

    def __init__(self, k: float = 10.0, dropout: float = 0.0, kernel: torch.Tensor | None = None):
        super().__init__(3)
        self.arch, self.encoder_name, self.num_classes = "colour", "colour", 3
        self.encoder, self.decoder_net = _Input(dropout), _Last()
        w = kernel if kernel is not None else (k * torch.eye(3)).view(3, 3, 1, 1)
        self.head = nn.Conv2d(3, 3, tuple(w.shape[-2:]), padding=(w.shape[-2] // 2, w.shape[-1] // 2), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(w)
        self.feature_channels, self.size_divisor = 3, 1

    def normalize(self, images):
        return images


def hand_run(root: Path, tmp: Path, model: nn.Module | None = None) -> Run:
    cfg = load_config(raw=tiny_config(root, tmp / "runs", train={"precision": "fp32"}))
    return Run(model or ColourNet(), ["red", "green", "blue"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)], config=cfg, run_dir=tmp / "hand", device="cpu")


# ----------------------------------------------------------------------------- pure functions
def test_pixel_scores_by_hand():
    p = torch.tensor([0.5, 0.3, 0.2]).view(3, 1, 1)
    assert S.pixel_margin(p).item() == pytest.approx(0.8)
    assert S.pixel_entropy(torch.full((4, 2, 2), 0.25)).allclose(torch.full((2, 2), math.log(4)))
    w = S.class_weights([50, 50, 0])
    f0, f2 = (50 + 0.01 * 100 / 3) / 101, (0.01 * 100 / 3) / 101
    assert w == pytest.approx([1 / (3 * f0), 1 / (3 * f0), 1 / (3 * f2)]) and w[2] == pytest.approx(101.0)
    assert S.class_weights([7, 7, 7]) == pytest.approx([1, 1, 1]) and S.class_weights([0, 0]) == pytest.approx([1, 1])
    # weighted entropy: -sum w_c p_c log p_c; weighted margin: the rarer contender's weight
    assert S.weighted_entropy(p, [1, 2, 3]).item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.3 * math.log(0.3) + 3 * 0.2 * math.log(0.2)))
    assert S.weighted_margin(p, [1, 2, 3]).item() == pytest.approx(2 * 0.8)
    # BALD: confident but disagreeing samples -> ln 2; agreeing uniform samples -> 0
    a, b = torch.tensor([1.0, 0.0]).view(2, 1, 1), torch.tensor([0.0, 1.0]).view(2, 1, 1)
    assert S.mutual_information(torch.stack([a, b])).item() == pytest.approx(math.log(2), abs=1e-5)
    assert S.mutual_information(torch.full((2, 2, 1, 1), 0.5)).item() == pytest.approx(0.0, abs=1e-6)
    assert S.aggregate([1, 2, 6]) == 3 and S.aggregate([1, 2, 6], "max") == 6


def test_k_center_greedy_by_hand():
    order, dist = S.k_center_greedy(np.array([[0.0], [1.0], [5.0], [6.0]]), centers=np.array([[0.0]]))
    assert order == [3, 1, 2, 0] and dist == pytest.approx([6, 1, 1, 0])
    order, _ = S.k_center_greedy(np.array([[0.0], [1.0], [10.0]]), count=2)  # no centers: farthest from the mean first
    assert order == [2, 0]


# ----------------------------------------------------------------------------- strategies on toy pools
def test_class_balanced_uncertainty_puts_the_missing_class_first(tmp_path):
    quarter = np.broadcast_to(np.array(RED, np.float32), (32, 32, 3)).copy()
    quarter[:16, :16] = (0.6, 0.0, 0.4)  # a region torn between red and blue, which the labeled set lacks
    root = toy_dataset(tmp_path / "d", {"lab0": RED, "lab1": GREEN, "mixed": MIXED, "has_blue": quarter, "plain": RED})
    run = hand_run(root, tmp_path)
    pool, lab = ["mixed", "has_blue", "plain"], ["lab0", "lab1"]
    assert suggest(run, pool, 1, "entropy", labeled=lab).picks == ["mixed"]  # red/green over the whole image
    assert suggest(run, pool, 1, "margin", labeled=lab).picks == ["mixed"]
    for s in ("balanced-entropy", "balanced-margin"):
        res = suggest(run, pool, 1, s, labeled=lab)
        assert res.picks == ["has_blue"], s
        assert res.info["class_pixels"]["blue"] == 0 and res.info["class_weights"]["blue"] > 50 * res.info["class_weights"]["red"]
    row = suggest(run, pool, 1, "balanced-entropy", labeled=lab).rows[0]
    assert row["id"] == "has_blue" and row["score"] == row["balanced_entropy"] > row["entropy"]  # the CSV's terms


def test_bald_mc_dropout_prefers_disagreement_over_plain_uncertainty(tmp_path):
    root = toy_dataset(tmp_path / "d", {"lab0": RED, "black": BLACK, "yellow": (1.0, 1.0, 0.0), "red": RED})
    run = hand_run(root, tmp_path, ColourNet(dropout=0.5))
    pool = ["black", "yellow", "red"]
    # eval mode: black is uniform (ln 3), yellow torn (ln 2), red certain
    assert suggest(run, pool, 3, "entropy", labeled=["lab0"]).picks == ["black", "yellow", "red"]
    res = suggest(run, pool, 3, "bald", labeled=["lab0"], mc_samples=16, seed=1)
    assert res.info["bald_source"] == "dropout"
    # dropout never changes a black pixel (MI 0); by hand MI(yellow) ~ 0.47 > MI(red) ~ 0.32
    assert res.picks == ["yellow", "red", "black"]
    mi = {r["id"]: r["mutual_information"] for r in res.rows}
    assert mi["black"] == pytest.approx(0, abs=1e-6) and mi["yellow"] == pytest.approx(0.47, abs=0.06) and mi["red"] == pytest.approx(0.32, abs=0.06)
    again = suggest(run, pool, 3, "bald", labeled=["lab0"], mc_samples=16, seed=1)
    assert [r["mutual_information"] for r in again.rows] == [r["mutual_information"] for r in res.rows]  # seeded masks
    with pytest.raises(ConfigError, match="no dropout"):
        suggest(hand_run(root, tmp_path), pool, 1, "bald", labeled=["lab0"], bald_source="dropout")


def test_bald_flips_where_the_model_has_no_dropout(tmp_path):
    stripes = np.zeros((32, 32, 3), np.float32)
    stripes[:, (np.arange(32) // 2) % 2 == 0] = RED
    stripes[:, (np.arange(32) // 2) % 2 == 1] = GREEN
    root = toy_dataset(tmp_path / "d", {"lab0": RED, "stripes": stripes, "mixed": MIXED, "red": RED})
    kernel = torch.zeros(3, 3, 1, 3)
    kernel[:, :, 0, 0] = 10 * torch.eye(3)  # each pixel is classified by its left neighbour's colour: flips disagree on stripes
    run = hand_run(root, tmp_path, ColourNet(kernel=kernel))
    res = suggest(run, ["stripes", "mixed", "red"], 1, "bald", labeled=["lab0"])
    assert res.info["bald_source"] == "flips" and res.picks == ["stripes"]
    assert suggest(run, ["stripes", "mixed", "red"], 1, "entropy", labeled=["lab0"]).picks == ["mixed"]


def test_coreset_picks_the_far_away_cluster_and_hybrid_filters_by_uncertainty(tmp_path):
    imgs = {"lab0": RED, "lab1": (0.95, 0.05, 0.0), "r1": RED, "r2": (0.9, 0.1, 0.0), "r3": (0.95, 0.0, 0.05), "blue": BLUE, "olive": MIXED}
    root = toy_dataset(tmp_path / "d", imgs)
    run = hand_run(root, tmp_path)
    pool, lab = ["r1", "r2", "r3", "blue", "olive"], ["lab0", "lab1"]
    res = suggest(run, pool, 2, "coreset", labeled=lab)
    assert res.picks == ["blue", "olive"]  # farthest from the labeled reds, then farthest from those and blue
    assert res.rows[0]["distance"] == pytest.approx(math.sqrt(0.95**2 + 0.05**2 + 1), abs=0.01)  # to the nearer labeled image, lab1
    # hybrid: two identical most-uncertain images; k-center inside the top 3 takes one of them, then the different one
    imgs = {"lab0": RED, "a1": MIXED, "a2": MIXED, "b": (0.55, 0.0, 0.45), "c": RED, "d": (0.8, 0.2, 0.0)}
    root = toy_dataset(tmp_path / "h", imgs)
    run = hand_run(root, tmp_path)
    pool = ["a1", "a2", "b", "c", "d"]
    assert suggest(run, pool, 2, "entropy", labeled=["lab0"]).picks == ["a1", "a2"]
    res = suggest(run, pool, 2, "hybrid", labeled=["lab0"], candidates=1.5)
    assert res.picks == ["a1", "b"]
    assert [r["candidate"] for r in res.rows] == [1, 1, 1, 0, 0]


def test_random_is_reproducible_by_seed(tmp_path):
    root = toy_dataset(tmp_path / "d", {"lab0": RED, **{f"p{i}": RED for i in range(8)}})
    run = hand_run(root, tmp_path)
    pool = [f"p{i}" for i in range(8)]
    a = suggest(run, pool, 3, "random", labeled=["lab0"], seed=4)
    b = suggest(run, list(reversed(pool)), 3, "random", labeled=["lab0"], seed=4)
    assert a.picks == b.picks and a.queue == b.queue  # the seed, not the pool's order, decides
    assert len({tuple(suggest(run, pool, 3, "random", labeled=["lab0"], seed=s).picks) for s in range(5)}) > 1


def test_cases_are_scored_and_budgeted_as_units(tmp_path):
    imgs = {"lab_s0": RED, "case1_s0": BLACK, "case1_s1": RED, "case1_s2": RED, "case2_s0": MIXED, "case2_s1": MIXED, "case2_s2": MIXED}
    root = toy_dataset(tmp_path / "d", imgs)
    run = hand_run(root, tmp_path)
    pool = [i for i in imgs if i.startswith("case")]
    res = suggest(run, pool, 1, "entropy", labeled=["lab_s0"], group_by=r"^(case\d+)_", out=tmp_path / "o" / "next.txt", heatmaps=False)
    assert res.picks == ["case2"] and res.images == ["case2_s0", "case2_s1", "case2_s2"]  # mean: uncertain throughout
    assert (tmp_path / "o" / "next.images.txt").read_text().split() == res.images
    assert res.rows[0]["images"] == 3 and res.rows[1]["top_image"] == "case1_s0"
    assert suggest(run, pool, 1, "entropy", labeled=["lab_s0"], group_by=r"^(case\d+)_", aggregate="max").picks == ["case1"]
    with pytest.raises(ConfigError, match="larger than the pool"):
        suggest(run, pool, 3, "entropy", labeled=["lab_s0"], group_by=r"^(case\d+)_")  # 2 cases
    with pytest.raises(ConfigError, match="does not match"):
        suggest(run, pool, 1, "entropy", labeled=["lab_s0"], group_by=r"^(patient\d+)_")
    assert suggest(run, pool, 1, "coreset", labeled=["lab_s0"], group_by=r"^(case\d+)_").picks == ["case2"]  # mean colour farther from red
    # a run that counts cases (data.case_pattern) is suggested cases by default; group_by=False: images
    run.config = load_config(raw=tiny_config(root, tmp_path / "runs", data={"case_pattern": r"^(case\d+)_"}))
    res = suggest(run, pool, 1, "entropy", labeled=["lab_s0"])
    assert res.picks == ["case2"] and res.info["group_by"] == r"^(case\d+)_" and res.info["group_by_from"] == "data.case_pattern"
    assert len(suggest(run, pool, 1, "entropy", labeled=["lab_s0"], group_by=False).picks[0].split("_")) == 2  # an image id


def test_cost_budget_takes_what_fits_in_rank_order(tmp_path):
    imgs = {"lab_0": RED, "A_0": BLACK, "A_1": BLACK, "A_2": BLACK, "B_0": MIXED, "C_0": (0.8, 0.2, 0.0), "D_0": RED, "D_1": RED}
    root = toy_dataset(tmp_path / "d", imgs)
    run = hand_run(root, tmp_path)
    pool, g = [i for i in imgs if not i.startswith("lab")], r"^([A-D])_"
    res = suggest(run, pool, None, "entropy", labeled=["lab_0"], group_by=g, cost="fine", minutes=180)
    assert res.queue[0] == "A" and res.picks == ["B", "C"]  # A (3 x 90 min) does not fit; B and C (90 min each) do
    assert res.info["spent_minutes"] == pytest.approx(180) and res.rows[0]["minutes"] == pytest.approx(270)
    res = suggest(run, pool, None, "entropy", labeled=["lab_0"], group_by=g, cost="scribbles", hours=0.2)  # 12 min = 5 images of 2.2 min
    assert res.picks == ["A", "B", "C"] and res.info["spent_minutes"] == pytest.approx(5 * 2.2)
    with pytest.raises(ConfigError, match="buys no"):
        suggest(run, pool, None, "entropy", labeled=["lab_0"], group_by=g, cost="points", minutes=0.5)
    with pytest.raises(ConfigError, match="larger than the pool"):
        suggest(run, pool, None, "entropy", labeled=["lab_0"], group_by=g, cost="fine", minutes=10_000)
    with pytest.raises(ConfigError, match="not both"):
        suggest(run, pool, 1, "entropy", labeled=["lab_0"], cost="fine", minutes=90)
    with pytest.raises(ConfigError, match="kind of labels"):
        suggest(run, pool, None, "entropy", labeled=["lab_0"], minutes=90)


def test_skipped_ids_go_to_the_end_and_are_remembered(tmp_path):
    root = toy_dataset(tmp_path / "d", {"lab0": RED, "black": BLACK, "mixed": MIXED, "red": RED})
    run = hand_run(root, tmp_path)
    out = tmp_path / "o" / "next.txt"
    pool = ["black", "mixed", "red"]
    assert suggest(run, pool, 1, "entropy", labeled=["lab0"], out=out, heatmaps=False).picks == ["black"]
    res = suggest(run, pool, 1, "entropy", labeled=["lab0"], out=out, skip=["black"], heatmaps=False)
    assert res.picks == ["mixed"] and res.queue == ["mixed", "red", "black"]
    assert json.loads((tmp_path / "o" / "next.state.json").read_text())["skipped"] == ["black"]
    res = suggest(run, pool, 3, "entropy", labeled=["lab0"], out=out, heatmaps=False)  # remembered without --skip
    assert res.picks == ["mixed", "red", "black"] and res.rows[-1]["skipped"] == 1
    with pytest.raises(ConfigError, match="not an id of the pool"):
        suggest(run, pool, 1, "entropy", labeled=["lab0"], out=out, skip=["nobody"])


def test_bad_input_is_one_clear_error(tmp_path):
    root = toy_dataset(tmp_path / "d", {"lab0": RED, "lab1": GREEN, "p0": MIXED, "p1": RED})
    run = hand_run(root, tmp_path)
    with pytest.raises(DatasetError, match="labeled already"):
        suggest(run, ["p0", "lab0"], 1, "entropy", labeled=["lab0", "lab1"])
    with pytest.raises(DatasetError, match="test split"):
        suggest(run, ["p0", "test0"], 1, "entropy", labeled=["lab0"])
    with pytest.raises(DatasetError, match="no image"):
        suggest(run, ["p0", "ghost"], 1, "entropy", labeled=["lab0"])
    with pytest.raises(ConfigError, match="larger than the pool"):
        suggest(run, ["p0", "p1"], 3, "entropy", labeled=["lab0"])
    with pytest.raises(ConfigError, match="strategy"):
        suggest(run, ["p0"], 1, "uncertainty", labeled=["lab0"])
    other = toy_dataset(tmp_path / "other", {"x": RED}, classes=("sky", "road", "car"))
    with pytest.raises(DatasetError, match="another dataset"):
        suggest(run, ["x"], 1, "entropy", data=other, labeled=["x"])
    renamed = toy_dataset(tmp_path / "renamed", {"lab0": RED, "p0": MIXED}, name="not-d")
    with pytest.raises(DatasetError, match="not the one the run was trained on"):
        suggest(run, ["p0"], 1, "entropy", data=renamed, labeled=["lab0"])
    done = suggest(run, ["lab0", "lab1"], 1, "entropy", labeled=["lab0", "lab1"])  # not an error: the work is done
    assert done.picks == [] and "everything is labeled" in done.message
    from lowlabel.models import build_model

    inst = Run(build_model("maskrcnn", "resnet18", 1), ["nucleus"], [(255, 0, 0)], device="cpu")
    for s in STRATEGIES:
        if s not in ("random", "coreset"):
            with pytest.raises(ConfigError, match="instance run"):
                suggest(inst, ["p0"], 1, s)


def test_cli_writes_the_files_and_errors_in_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "tiny", n=8)
    assert main(["fit", "--quiet", "-c", str(_write_config(tmp_path, root))]) == 0
    run_dir = tmp_path / "runs" / "supervised-self"
    out = tmp_path / "s" / "next.txt"
    assert main(["suggest", str(run_dir), "--budget", "2", "--strategy", "hybrid", "--out", str(out), "--quiet"]) == 0
    assert len(out.read_text().split()) == 2 and "to label next" in capsys.readouterr().out
    csv = (tmp_path / "s" / "next.csv").read_text().splitlines()
    assert csv[0].startswith("rank,id,picked,skipped,score") and len(csv) == 1 + 4  # train 6 - labeled 2
    assert (tmp_path / "s" / "next.png").stat().st_size > 0 and len(list((tmp_path / "s" / "next.heatmaps").glob("*.png"))) == 2
    first = out.read_text().split()[0]
    assert main(["suggest", str(run_dir), "--budget", "1", "--out", str(out), "--skip", first, "--quiet", "--no-heatmaps"]) == 0
    assert out.read_text().split() != [first]
    capsys.readouterr()
    assert main(["suggest", str(run_dir), "--budget", "9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "larger than the pool" in err and "Traceback" not in err
    assert main(["suggest", str(run_dir), "--pool", str(run_dir / "splits" / "labeled.txt"), "--budget", "1", "--out", str(out)]) == 0
    assert "everything is labeled" in capsys.readouterr().out
    assert main(["suggest", str(run_dir), "--budget", "2", "--strategy", "margin", "--out", str(out), "--no-heatmaps", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # stdout is the JSON document and nothing else
    assert doc["strategy"] == "margin" and doc["picks"] == out.read_text().split() and len(doc["picks"]) == 2
    assert [r["id"] for r in doc["rows"][:2]] == doc["picks"] and all("score" in r for r in doc["rows"])
    assert doc["files"]["picks"] == str(out)


def _write_config(tmp_path: Path, root: Path) -> Path:
    import yaml

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tiny_config(root, tmp_path / "runs", iterations=2, train={"precision": "fp32"})))
    return p


def test_simulate_replays_held_out_labels_against_random(tmp_path, capsys):
    root = make_dataset(tmp_path / "tiny", n=8)
    assert main(["fit", "--quiet", "-c", str(_write_config(tmp_path, root))]) == 0
    run_dir = tmp_path / "runs" / "supervised-self"
    sim = tmp_path / "sim"
    assert main(["suggest", str(run_dir), "--simulate", "--budget", "2", "--strategy", "entropy", "--random-seeds", "0",
                 "--iterations", "2", "--out", str(sim), "--quiet"]) == 0
    rep = json.loads((sim / "simulate.json").read_text())
    gain = rep["gains"][0]
    assert gain["strategy"] == "entropy" and gain["labeled_images"] == 4
    assert gain["gain"] == pytest.approx(gain["score"] - gain["random_mean"])
    start = set((run_dir / "splits" / "labeled.txt").read_text().split())
    for arm in ("entropy", "random-s0"):
        lab = (sim / arm / "round1" / "labeled.txt").read_text().split()
        assert start <= set(lab) and len(lab) == 4
        assert set((sim / "runs" / f"{arm}-r1" / "splits" / "labeled.txt").read_text().split()) == set(lab)  # it trained on them
    assert "gain" in (sim / "simulate.md").read_text() and "gain" in capsys.readouterr().out


def test_active_acdc_benchmark_builds_its_configs_and_report():
    import importlib.util

    from .conftest import REPO

    spec = importlib.util.spec_from_file_location("active_acdc", REPO / "benchmarks" / "active_acdc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for method in ("supervised", "unimatch"):
        raw = mod.recipe(method)
        raw.update(name="x", data={**raw["data"], "labeled": "ssl-labeled-1.txt"})
        cfg = load_config(raw=raw)
        assert cfg.method.name == method and cfg.train.iterations == 1500 and cfg.model.arch == "unet2d"
    res = {"rows": [{"row": "start (1 case)", "cases": 1, "dice": 0.4, "per_class_dice": {"lv": 0.5}, "picks": []},
                    {"row": "entropy (labeled-only)", "cases": 3, "dice": 0.55, "per_class_dice": {}, "picks": ["patient001", "patient002"],
                     "pick_scores": {"patient001": 0.8, "patient002": 0.7}, "val_dice": 0.5, "gain_over_random_mean": 0.05}],
           "verdicts": [{"training": "labeled-only", "random_mean": 0.5, "random_std": 0.01, "best_strategy": "entropy", "best_dice": 0.55,
                         "meets_plus_3": True}]}
    md = mod._markdown(res)
    assert "patient001 (0.8)" in md and "+5.0" in md and "meets the +3 Dice bar" in md
    assert mod.GROUP_BY == r"^(patient\d+)_" and "entropy" in mod.STRATEGIES and len(mod.RANDOM_SEEDS) >= 3


def test_instance_run_takes_coreset(tmp_path):
    from lowlabel.models import build_model

    from .test_instances import make_instance_dataset

    root = make_instance_dataset(tmp_path / "inst", n=6)
    from lowlabel.data.dataset import DatasetInfo, read_ids

    info = DatasetInfo.load(root)
    train = read_ids(root / "splits" / "train.txt")
    run = Run(build_model("maskrcnn", "resnet18", info.num_classes), list(info.classes), list(info.palette), device="cpu")
    res = suggest(run, train[1:], 2, "coreset", data=root, labeled=train[:1], out=tmp_path / "o" / "next.txt")
    assert len(res.picks) == 2 and res.rows[0]["distance"] >= res.rows[1]["distance"] > 0
    assert (tmp_path / "o" / "next.csv").is_file() and not (tmp_path / "o" / "next.png").exists()  # no probability maps to draw


def test_windows_of_a_large_image_are_units_without_blanks_duplicates_or_neighbours(tmp_path):
    """tile=32 on one 64 x 160 image: 10 windows; the blank one, the copy of A and four of the five
    red windows (noise aside, the same thumbnail) are left out;
    the most uncertain window comes first, its uncertain neighbour goes behind the windows that
    are not next to it (tile_gap 1), and comes second with tile_gap 0."""
    rng = np.random.default_rng(0)
    big = np.zeros((64, 160, 3), np.float32)

    def fill(cx, cy, colour):
        big[cy * 32:(cy + 1) * 32, cx * 32:(cx + 1) * 32] = np.clip(np.asarray(colour) + rng.uniform(-0.05, 0.05, (32, 32, 3)), 0, 1)

    fill(1, 0, (0.5, 0.5, 0.0))  # A: the most uncertain
    big[0:32, 64:96] = big[0:32, 32:64]  # an exact copy of A: a near-duplicate
    fill(3, 0, (0.65, 0.35, 0.0))  # B: less uncertain, two windows away from A
    fill(4, 0, RED)
    fill(0, 1, (0.55, 0.45, 0.0))  # D: uncertain, A's diagonal neighbour
    for cx in range(1, 5):
        fill(cx, 1, RED)
    big[0:32, 0:32] = 0.0  # blank
    root = toy_dataset(tmp_path / "d", {"lab0": RED, "mosaic": big})
    run = hand_run(root, tmp_path)
    res = suggest(run, ["mosaic"], 2, "entropy", labeled=["lab0"], tile=32, out=tmp_path / "o" / "next.txt")
    assert res.info["tiles"] == {"side": 32, "gap": 1, "windows": 10, "blank": 1, "near_duplicates": 5, "kept": 4}
    a, b, d = "mosaic@32,0,32,32", "mosaic@96,0,32,32", "mosaic@0,32,32,32"
    assert res.picks == [a, b] and res.queue[2:] == [d, "mosaic@128,0,32,32"]  # both next to a pick
    assert "mosaic@64,0,32,32" not in res.queue and "mosaic@0,0,32,32" not in res.queue
    rows = {r["id"]: r for r in res.rows}
    assert rows[d]["near_pick"] == rows["mosaic@128,0,32,32"]["near_pick"] == 1 and rows[b]["near_pick"] == 0 and (rows[a]["x"], rows[a]["y"], rows[a]["w"]) == (32, 0, 32)
    assert rows[d]["score"] > rows[b]["score"]  # moved behind for its place, not its score
    assert (tmp_path / "o" / "next.txt").read_text().split() == [a, b]
    assert (tmp_path / "o" / "next.heatmaps" / f"{a}.png").stat().st_size > 0
    assert suggest(run, ["mosaic"], 2, "entropy", labeled=["lab0"], tile=32, tile_gap=0).picks == [a, d]
    with pytest.raises(ConfigError, match="choose one"):
        suggest(run, ["mosaic"], 1, "entropy", labeled=["lab0"], tile=32, group_by=r"^(m)")
    with pytest.raises(ConfigError, match="at least 16"):
        suggest(run, ["mosaic"], 1, "entropy", labeled=["lab0"], tile=8)
