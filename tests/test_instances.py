"""The instance task: targets, COCO mask AP by hand, tile merging, and a model trained, evaluated
and predicting through the engine and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowlabel.eval.instances import Instances, from_id_map, mask_ap, merge_tiles, predict_instances
from lowlabel.data.tiling import TileGrid
from lowlabel.models.instance import instance_targets

pytest.importorskip("pycocotools")


def boxes(h, w, *rects):
    """Instances of axis-aligned rectangles (y0, x0, y1, x1) with scores."""
    masks = np.zeros((len(rects), h, w), bool)
    scores = []
    for k, (y0, x0, y1, x1, s) in enumerate(rects):
        masks[k, y0:y1, x0:x1] = True
        scores.append(s)
    return Instances.from_masks(masks, scores, np.zeros(len(rects), np.int64))


def test_instance_targets_boxes_masks_and_min_size():
    m = torch.zeros(10, 12, dtype=torch.long)
    m[1:4, 2:7] = 3  # 15 px, box x 2..7, y 1..4
    m[8, 11] = 9  # a 1-pixel sliver of an object cut by the crop
    t = instance_targets(m, min_size=2)
    assert t["boxes"].tolist() == [[2.0, 1.0, 7.0, 4.0]]
    assert t["labels"].tolist() == [0] and t["masks"].shape == (1, 10, 12) and int(t["masks"].sum()) == 15
    assert len(instance_targets(m)["boxes"]) == 2
    empty = instance_targets(torch.zeros(5, 5, dtype=torch.long))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 5, 5)


def test_mask_ap_hand_computed_cases():
    h, w = 40, 40
    a, b = (2, 2, 12, 7), (20, 20, 26, 25)  # 10x5 = 50 px and 6x5 = 30 px
    gt = boxes(h, w, (*a, 1.0), (*b, 1.0))
    # perfect prediction
    r = mask_ap([boxes(h, w, (*a, 0.9), (*b, 0.8))], [gt])
    assert r["ap"] == pytest.approx(1.0) and r["ap50"] == pytest.approx(1.0) and r["ap75"] == pytest.approx(1.0)
    # one of two instances missed: recall 0.5 at precision 1 -> 51 of the 101 recall points
    r = mask_ap([boxes(h, w, (*a, 0.9))], [gt])
    assert r["ap"] == pytest.approx(51 / 101) and r["ap50"] == pytest.approx(51 / 101)
    # a split instance: one object (y 2..10, x 2..10 = 64 px) predicted as 40 + 24 px pieces
    one = boxes(h, w, (2, 2, 10, 10, 1.0))
    big_first = boxes(h, w, (2, 2, 10, 7, 0.9), (2, 7, 10, 10, 0.6))  # IoU 0.625 and 0.375
    r = mask_ap([big_first], [one])
    # matched at IoU 0.50, 0.55, 0.60 only (3 of 10 thresholds), then precision 1 up to recall 1
    assert r["ap50"] == pytest.approx(1.0) and r["ap75"] == pytest.approx(0.0) and r["ap"] == pytest.approx(0.3)
    small_first = boxes(h, w, (2, 2, 10, 7, 0.6), (2, 7, 10, 10, 0.9))
    r = mask_ap([small_first], [one])  # the unmatched piece ranks first: precision 1/2 at recall 1
    assert r["ap50"] == pytest.approx(0.5) and r["ap"] == pytest.approx(0.15)
    # two touching objects (50 + 30 px) merged into one prediction: IoU 50/80 = 0.625 with the larger
    touching = boxes(h, w, (2, 2, 12, 7, 1.0), (2, 7, 8, 12, 1.0))
    merged = Instances.from_masks(touching.masks.any(0, keepdims=True), [0.9], [0])
    r = mask_ap([merged], [touching])
    assert r["ap50"] == pytest.approx(51 / 101) and r["ap"] == pytest.approx(3 * 51 / 101 / 10) and r["ap75"] == pytest.approx(0.0)
    # no prediction at all
    assert mask_ap([Instances.empty(h, w)], [gt])["ap"] == 0.0


def test_id_map_orders_by_score():
    inst = boxes(10, 10, (0, 0, 5, 5, 0.2), (3, 3, 8, 8, 0.9))
    ids = inst.id_map()
    assert ids.dtype == np.uint16 and ids[4, 4] == 1 and ids[0, 0] == 2 and ids[9, 9] == 0


class OracleModel(torch.nn.Module):
    """A stand-in instance model that "predicts" the true instances of the window it is given: the
    window's position is read from the image (channel 1 = row / 1000, channel 2 = column / 1000)."""

    def __init__(self, ids: np.ndarray):
        super().__init__()
        self.ids = ids

    def forward(self, x):
        _, _, th, tw = x.shape
        y0, x0 = round(float(x[0, 1, 0, 0]) * 1000), round(float(x[0, 2, 0, 0]) * 1000)
        inst = from_id_map(self.ids[y0 : y0 + th, x0 : x0 + tw])
        n = len(inst)
        return [{"masks": torch.from_numpy(inst.masks).float(), "scores": torch.linspace(0.99, 0.9, n) if n else torch.zeros(0),
                 "labels": torch.zeros(n, dtype=torch.long)}]

    def detect(self, x, score_threshold=None):  # predict_instances filters the scores itself
        return self(x)


def position_image(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return torch.from_numpy(np.stack([np.zeros((h, w)), yy / 1000, xx / 1000])).float()


@pytest.mark.shared
def test_tile_merging_recovers_real_nuclei_without_duplicates_or_cuts(shared_datasets):
    """Real nuclei (a dsb2018 instance map) predicted tile by tile by an oracle that sees only its
    tile: after merging, every nucleus comes back exactly once and whole."""
    from scipy import ndimage

    root = shared_datasets / "dsb2018-nuclei"
    ids = None
    for p in sorted((root / "instances").iterdir()):
        m = np.array(Image.open(p)).astype(np.int64)
        if m.shape[0] >= 300 and m.shape[1] >= 300 and 20 <= len(np.unique(m)) - 1 <= 200:
            ids = m
            break
    assert ids is not None, "no dsb2018 image of at least 300 x 300 px with 20-200 nuclei"
    ids = ids[:300, :300]
    # objects that are one connected piece (the merge keeps masks whole, not their fragments)
    ext = max(max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndimage.find_objects(ids) if s is not None)
    tile = 128
    overlap = ext + 2
    assert overlap < tile, f"nuclei of {ext} px need a larger tile"
    truth = from_id_map(ids)
    area = np.bincount(ids.ravel())
    cuts = 0
    for (y0, x0, th, tw) in TileGrid(300, 300, tile, overlap):  # the grid does cut nuclei at tile borders
        inside = np.bincount(ids[y0 : y0 + th, x0 : x0 + tw].ravel(), minlength=len(area))
        cuts += int(((inside > 0) & (inside < area))[1:].sum())
    assert cuts > 0
    pred = predict_instances(OracleModel(ids), position_image(300, 300), tile=tile, overlap=overlap, score_threshold=0.5, min_size=1)
    assert len(pred) == len(truth)
    r = mask_ap([pred], [truth])
    assert r["ap"] == pytest.approx(1.0)
    # without the overlap, objects on the borders come back cut: merging cannot invent the missing parts
    pred0 = predict_instances(OracleModel(ids), position_image(300, 300), tile=tile, overlap=0, score_threshold=0.5, min_size=1)
    assert mask_ap([pred0], [truth])["ap"] < 1.0


def test_merge_tiles_drops_cut_copies_and_duplicates():
    h, w = 20, 30
    whole = np.zeros((20, 16), bool)
    whole[5:10, 10:15] = True  # seen whole in the left tile (x 0..16)
    cut = np.zeros((20, 16), bool)
    cut[5:10, 0:1] = True  # its sliver in the right tile (x 14..30), touching that tile's left edge
    dup = np.zeros((20, 16), bool)
    dup[12:15, 3:6] = True  # an object at x 17..20, seen whole by the right tile ...
    tiles = [((0, 0, 20, 16), Instances.from_masks(whole[None], [0.9], [0], size=(h, w))),
             ((0, 14, 20, 16), Instances.from_masks(np.stack([cut, dup]), [0.95, 0.8], [0, 0], offset=(0, 14), size=(h, w)))]
    out = merge_tiles(h, w, tiles)
    assert len(out) == 2
    assert sorted(int(m.sum()) for m in out.masks) == [9, 25] and out.masks.shape == (2, h, w)
    assert out.boxes.tolist() == [[5, 10, 10, 15], [12, 17, 15, 20]]


def make_instance_dataset(root: Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Bright discs (instances) on a dark background."""
    rng = np.random.default_rng(seed)
    for d in ("images", "instances", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:02d}" for i in range(n)]
    yy, xx = np.mgrid[0:size, 0:size]
    for i in ids:
        inst = np.zeros((size, size), np.uint16)
        for k in range(1, 5):
            cy, cx = rng.integers(8, size - 8, 2)
            inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = k
        img = np.where(inst[..., None] > 0, 200, 30) + rng.integers(-10, 10, (size, size, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(inst).save(root / "instances" / f"{i}.png")
    (root / "splits" / "train.txt").write_text("\n".join(ids[: n - 2]) + "\n")
    (root / "splits" / "val.txt").write_text(ids[n - 2] + "\n")
    (root / "splits" / "test.txt").write_text(ids[n - 1] + "\n")
    (root / "dataset.json").write_text(json.dumps({"name": "discs", "task": "instance", "classes": ["disc"], "ignore_index": 255}))
    return root


def test_instance_run_trains_evaluates_and_predicts(tmp_path):
    from lowlabel import fit
    from lowlabel.cli import main
    from lowlabel.config import load_config
    from lowlabel.engine.run import Run

    root = make_instance_dataset(tmp_path / "discs")
    raw = {
        "name": "inst", "out_dir": str(tmp_path / "runs"),
        "data": {"root": str(root), "labeled": "2", "crop": 64, "labeled_batch": 2},
        "model": {"arch": "maskrcnn", "encoder": "resnet18", "options": {"roi_batch": 32, "rpn_post_nms_train": 100}},
        "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05},
        "train": {"iterations": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1},
        "eval": {"tile": 64},
    }
    fit(load_config(raw=raw), progress=False)
    run_dir = tmp_path / "runs" / "inst"
    log = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_mask", "loss_classifier", "loss_objectness"} <= set(log[0]) and np.isfinite(log[0]["loss"])
    val = [r["val"] for r in log if "val" in r][0]
    assert {"ap", "ap50", "ap75", "count_mae"} <= set(val) and val["instances"] == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["select"] == "ap" and summary["best_val_miou"] is None
    run = Run.load(run_dir)
    assert run.task == "instance"
    net = run.model.net  # model.options reach torchvision's sampler and RPN, and the checkpoint keeps them
    assert net.roi_heads.fg_bg_sampler.batch_size_per_image == 32 and net.rpn._post_nms_top_n["training"] == 100
    res = run.evaluate(split="test")
    assert res["task"] == "instance" and res["instances"] == 4 and 0.0 <= res["ap"] <= 1.0
    out = tmp_path / "pred"
    assert main(["predict", str(run_dir), str(root / "images"), "--out", str(out)]) == 0
    ids = Image.open(out / "img00.png")
    assert np.array(ids).dtype == np.uint16 or ids.mode.startswith("I")
    coco = json.loads((out / "instances.json").read_text())
    assert len(coco["images"]) == 6 and coco["categories"] == [{"id": 1, "name": "disc"}]
    assert all({"segmentation", "bbox", "score", "image_id"} <= set(a) for a in coco["annotations"])
    assert (out / "overlays" / "img00.jpg").is_file()
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0


def test_instance_config_errors(tmp_path, tiny_dataset):
    from pydantic import ValidationError

    from lowlabel.config import load_config
    from lowlabel.engine.trainer import Trainer
    from lowlabel.errors import ConfigError
    from lowlabel.models import build_model

    with pytest.raises(ValueError, match="unknown method 'unimatch' for the instance task"):
        load_config(raw={"data": {"root": str(tiny_dataset)}, "model": {"arch": "maskrcnn"}, "method": {"name": "unimatch"}})
    cfg = load_config(raw={"out_dir": str(tmp_path), "data": {"root": str(tiny_dataset), "labeled": "2"}, "model": {"arch": "maskrcnn"}})
    with pytest.raises(ConfigError, match="instance model"):
        Trainer(cfg, progress=False)
    s4m = {"data": {"root": str(tiny_dataset)}, "model": {"arch": "maskrcnn"}, "train": {"iterations": 10}}
    with pytest.raises(ValueError, match="teacher would be random"):  # no burn-in, no teacher weights
        load_config(raw={**s4m, "method": {"name": "s4m"}})
    with pytest.raises(ValueError, match="never uses its unlabeled images"):
        load_config(raw={**s4m, "method": {"name": "s4m", "params": {"burn_in": 10}}})
    assert load_config(raw={**s4m, "method": {"name": "s4m", "params": {"burn_in": 9}}}).method.params["burn_in"] == 9
    assert load_config(raw={**s4m, "model": {"arch": "maskrcnn", "pretrained": "teacher.pt"}, "method": {"name": "s4m"}}).model.pretrained

    with pytest.raises(ValidationError, match="roi_bacth"):
        build_model("maskrcnn", "resnet18", 1, options={"roi_bacth": 64})
    with pytest.raises(ValueError, match="unet has none"):
        build_model("unet", "resnet18", 2, options={"roi_batch": 64})


def test_copy_paste_pairs_by_hand():
    from lowlabel.methods.instance import copy_paste, pair_partner

    assert pair_partner(5).tolist() == [1, 0, 3, 2, 4]
    images = torch.stack([torch.full((3, 4, 4), float(v)) for v in (1, 2, 3)])
    ids = torch.zeros(3, 4, 4, dtype=torch.long)
    ids[0, 0:2, 0:2] = 1  # image 0: one instance top-left
    ids[1, 1:3, 1:3] = 1  # image 1: one instance in the middle, overlapping image 0's
    ids[1, 3, 3] = 2
    ids[2, 0, 0] = 7
    x, m = copy_paste(images, ids, pair_partner(3))
    # image 0 receives image 1's instances (ids offset by 1 + max id of image 0 = 2): 3 and 4
    assert m[0, 1, 1] == 3 and m[0, 3, 3] == 4 and m[0, 0, 0] == 1 and x[0, 0, 1, 1] == 2 and x[0, 0, 0, 0] == 1
    assert int((m[0] == 1).sum()) == 3  # one of its 4 pixels is now covered by the pasted instance
    # image 1 receives image 0's instance (offset 3): where it lands, the pixels and labels are image 0's
    assert m[1, 0, 0] == 4 and x[1, 0, 0, 0] == 1 and m[1, 1, 1] == 4 and m[1, 2, 2] == 1
    # the odd last image is its own partner: unchanged
    assert torch.equal(m[2], ids[2]) and torch.equal(x[2], images[2])


def test_instance_bn_recompute_runs_the_backbone():
    """An averaged instance network's BatchNorm statistics are re-estimated (the engine's
    update_bn pass runs the backbone in train mode)."""
    from lowlabel.engine.teachers import Teacher
    from lowlabel.models.instance import InstanceModel

    torch.manual_seed(0)
    net = InstanceModel(1)
    t = Teacher("ema", net, 0.9996)
    bn = t.model.net.backbone.body.bn1
    before = bn.running_mean.clone()
    t.recompute_bn([torch.rand(2, 3, 64, 64) * 0.5 + 0.5])
    assert not torch.allclose(bn.running_mean, before) and int(bn.num_batches_tracked) == 1


def test_s4m_steps_with_refinement_and_copy_paste(tmp_path):
    from lowlabel import fit
    from lowlabel.config import load_config

    root = make_instance_dataset(tmp_path / "discs", n=8)
    raw = {
        "name": "s4m", "out_dir": str(tmp_path / "runs"),
        "data": {"root": str(root), "labeled": "2", "crop": 64, "labeled_batch": 2, "unlabeled_batch": 2},
        "model": {"arch": "maskrcnn"},
        "method": {"name": "s4m", "params": {"threshold": 0.0, "refine": True, "arp": True, "burn_in": 1}},
        "teacher": {"kind": "ema", "decay": 0.9996},
        "optim": {"name": "adamw", "lr": 1e-4},
        "train": {"iterations": 3, "val_every": 0, "checkpoint_every": 3, "log_every": 1},
        "eval": {"tile": 64},
    }
    fit(load_config(raw=raw), progress=False)
    log = [json.loads(x) for x in (tmp_path / "runs" / "s4m" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["loss_u"] == 0  # burn-in: labeled only
    assert {"pseudo_instances", "refined"} <= set(log[1]) and np.isfinite(log[1]["loss_u"])


class FakeTeacher(torch.nn.Module):
    """Detections given in advance (as a trained teacher's would be)."""

    def __init__(self, dets):
        super().__init__()
        self.dets = dets

    def forward(self, x):
        return self.dets

    def detect(self, x, score_threshold=None):  # unfiltered: pseudo_instances' own threshold is under test
        return self.dets


def test_detect_with_a_score_threshold_keeps_the_same_detections():
    """``detect(x, t)`` drops boxes under t before the mask head: the detections scoring >= t
    are those of the unthresholded pass (boxes, scores, masks), on a random Mask R-CNN whose
    scores straddle t."""
    from lowlabel.models.instance import InstanceModel

    torch.manual_seed(0)
    net = InstanceModel(1).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full = net(x)
        t = float(torch.cat([d["scores"] for d in full]).median())
        cut = net.detect(x, score_threshold=t)
    assert net.net.roi_heads.score_thresh == 0.05  # restored
    for f, c in zip(full, cut):
        keep = f["scores"] >= t
        assert 0 < int(keep.sum()) < len(keep) and len(c["scores"]) == int(keep.sum())
        assert torch.equal(c["scores"], f["scores"][keep]) and torch.equal(c["boxes"], f["boxes"][keep])
        torch.testing.assert_close(c["masks"], f["masks"][keep], atol=1e-5, rtol=0)


def test_s4m_pseudo_instances_threshold_size_and_sam_refinement():
    """Kept: class confidence >= 0.7 and >= 5 px; PR replaces a sloppy pseudo-mask (a disc's
    probability map shifted off the disc) by the promptable segmenter's mask of the object."""
    from types import SimpleNamespace

    from lowlabel.methods.instance import S4M
    from lowlabel.sam import build_segmenter

    yy, xx = np.mgrid[0:64, 0:64]
    disc = (yy - 30) ** 2 + (xx - 30) ** 2 <= 100
    img = np.where(disc, 0.8, 0.1)[None].repeat(3, 0)
    sloppy = np.clip(1.0 - np.sqrt((yy - 34) ** 2 + (xx - 36) ** 2) / 14, 0, 1)  # peaks off-centre, spills out
    tiny = np.zeros((64, 64))
    tiny[2, 2:5] = 1.0
    dets = [{"masks": torch.tensor(np.stack([sloppy, sloppy, tiny]), dtype=torch.float32), "scores": torch.tensor([0.9, 0.5, 0.95]),
             "labels": torch.zeros(3, dtype=torch.long)}]
    weak = torch.tensor(img, dtype=torch.float32)[None]
    plain = S4M({}, num_classes=1)
    ids, m = plain.pseudo_instances(FakeTeacher(dets), weak, np.random.default_rng(0))
    assert m["pseudo_instances"] == 1 and m["refined"] == 0 and set(ids.unique().tolist()) == {0, 1}

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    before = iou(ids[0].numpy() > 0, disc)
    pr = S4M({"refine": True}, num_classes=1)
    pr.attach(SimpleNamespace(teacher_kind="ema", seed=0, device="cpu"))
    assert pr.segmenter is not None and build_segmenter("classical").name == pr.segmenter.name
    ids, m = pr.pseudo_instances(FakeTeacher(dets), weak, np.random.default_rng(0))
    assert m["pseudo_instances"] == 1 and m["refined"] == 1
    after = iou(ids[0].numpy() > 0, disc)
    assert after > before + 0.1, (before, after)


def test_s4m_unlabeled_terms_keep_only_the_named_mask_rcnn_losses():
    """``unlabeled_terms`` sums only those of Mask R-CNN's terms on the strong view; None sums all."""
    from types import SimpleNamespace

    from lowlabel.methods.instance import S4M

    terms = {"loss_objectness": 1.0, "loss_rpn_box_reg": 2.0, "loss_classifier": 4.0, "loss_box_reg": 8.0, "loss_mask": 16.0}

    class Student:
        def losses(self, images, targets, features=None, background_weight=1.0):
            assert background_weight == 1.0  # S4M's default: Mask R-CNN's loss as it is
            return {k: torch.tensor(v) for k, v in terms.items()}

    disc = torch.zeros(1, 32, 32)
    disc[0, 8:16, 8:16] = 1.0
    dets = [{"masks": disc, "scores": torch.tensor([0.9]), "labels": torch.zeros(1, dtype=torch.long)}]
    ctx = SimpleNamespace(iteration=5)
    lab = {"image": torch.rand(1, 3, 32, 32), "instances": torch.zeros(1, 32, 32, dtype=torch.long)}
    unl = {"image": torch.rand(1, 3, 32, 32), "strong": torch.rand(1, 1, 3, 32, 32)}
    for chosen, expected in ((None, 31.0), (["objectness", "classifier"], 5.0), (["mask"], 16.0)):
        m = S4M({"unlabeled_terms": chosen}, num_classes=1)
        m.seed = 0
        out = m.training_step(Student(), SimpleNamespace(model=FakeTeacher(dets)), lab, unl, ctx)
        assert out.losses["loss_u"].item() == expected and out.metrics["pseudo_instances"] == 1


def test_background_weighted_losses_by_hand():
    """Background samples weigh ``background_weight``, objects 1, normalised by the weights' sum."""
    from lowlabel.models.instance import weighted_classifier_loss, weighted_objectness_loss

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
    labels = [torch.tensor([0, 1]), torch.tensor([0])]
    ce = -torch.log_softmax(logits, 1)[torch.arange(3), torch.tensor([0, 1, 0])]
    expected = (0.1 * ce[0] + ce[1] + 0.1 * ce[2]) / 1.2
    assert torch.isclose(weighted_classifier_loss(logits, labels, 0.1), expected)
    assert torch.isclose(weighted_classifier_loss(logits, labels, 1.0), ce.mean())
    obj = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.5, 2.0])
    anchor_labels = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 0.0, 1.0])]
    pos = [torch.tensor([1, 0, 0], dtype=torch.uint8), torch.tensor([0, 0, 1], dtype=torch.uint8)]
    neg = [torch.tensor([0, 1, 0], dtype=torch.uint8), torch.tensor([0, 1, 0], dtype=torch.uint8)]  # anchor 2 not drawn, 3 ignored
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    sampled = torch.tensor([0, 1, 4, 5])
    target = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    each = bce(obj, target, reduction="none")
    assert torch.isclose(weighted_objectness_loss(obj, anchor_labels, pos, neg, 0.25), (each[0] + 0.25 * (each[1] + each[4]) + each[5]) / 2.5)
    assert torch.isclose(weighted_objectness_loss(obj, anchor_labels, pos, neg, 1.0), bce(obj[sampled], target[sampled]))


def test_background_weight_changes_only_mask_rcnn_classification_terms():
    """At weight 1 the swapped-in terms are torchvision's to the bit (same sampler draw); below 1
    only objectness and classifier change; torchvision's functions are back after the block."""
    from torchvision.models.detection import roi_heads

    from lowlabel.models.instance import InstanceModel, background_weighted

    torch.manual_seed(0)
    net = InstanceModel(1, options={"roi_batch": 64, "rpn_post_nms_train": 200}).train()
    ids = torch.zeros(2, 64, 64, dtype=torch.long)
    ids[0, 5:15, 5:17], ids[0, 30:44, 20:30], ids[1, 40:52, 40:60] = 1, 2, 1
    targets = [instance_targets(m, min_size=5) for m in ids]
    images = torch.rand(2, 3, 64, 64)

    def losses(**kw):
        torch.manual_seed(1)  # the samplers' draw
        return {k: v.item() for k, v in net.losses(images, targets, **kw).items()}

    plain = losses()
    with background_weighted(net.net, 1.0):
        assert losses() == pytest.approx(plain, rel=1e-6)
    assert roi_heads.fastrcnn_loss.__module__ == "torchvision.models.detection.roi_heads" and "compute_loss" not in vars(net.net.rpn)
    low = losses(background_weight=0.1)
    for k in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask"):
        assert low[k] == pytest.approx(plain[k], rel=1e-6)
    for k in ("loss_objectness", "loss_classifier"):
        assert low[k] != pytest.approx(plain[k], rel=1e-3)
    with pytest.raises(RuntimeError), background_weighted(net.net, 0.1):
        raise RuntimeError("a failed step")
    assert roi_heads.fastrcnn_loss.__module__ == "torchvision.models.detection.roi_heads" and "compute_loss" not in vars(net.net.rpn)
    assert net.net.rpn.fg_bg_sampler.__class__.__name__ == "BalancedPositiveNegativeSampler"


def test_bench_reports_mask_ap_for_instance_protocols(tmp_path):
    import yaml

    from lowlabel.bench import run_protocol

    root = make_instance_dataset(tmp_path / "discs", n=8)
    proto = {
        "name": "discs-bench", "split": "test", "fractions": ["2"], "seeds": [0],
        "config": {"data": {"root": str(root), "crop": 64, "labeled_batch": 2, "unlabeled_batch": 2},
                   "model": {"arch": "maskrcnn"}, "optim": {"name": "adamw", "lr": 1e-4},
                   "train": {"iterations": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1}, "eval": {"tile": 64}},
        "methods": {"supervised": {"method": {"name": "supervised"}},
                    "s4m": {"method": {"name": "s4m", "params": {"arp": True, "burn_in": 1}}, "teacher": {"kind": "ema", "decay": 0.9996}}},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    res = run_protocol(tmp_path / "p.yaml", out=tmp_path / "res", in_process=True)
    assert sorted(r["method"] for r in res["rows"]) == ["s4m", "supervised"]
    assert all(0.0 <= r["ap_mean"] <= 1.0 and r["count_mae_mean"] >= 0 for r in res["rows"])
    md = (tmp_path / "res" / "results.md").read_text()
    assert "test mask AP (%)" in md and "test mIoU" not in md
    assert (tmp_path / "res" / "miou.png").is_file()


def test_structural_distillation_matches_structure_not_features():
    """SD compares cosine self-similarity rows, so a teacher whose features differ from SAM's but
    share its layout costs nothing, and one that merges SAM's two regions costs."""
    from lowlabel.methods.instance import structural_distillation

    def layout(u, v, side=16):
        f = torch.zeros(len(u), side, side)
        f[:, :, : side // 2] = u.view(-1, 1, 1)
        f[:, :, side // 2:] = v.view(-1, 1, 1)
        return f

    e = torch.eye(6)
    sam = layout(e[0], e[1]).expand(3, -1, -1, -1)  # three queries, each its own (here equal) map
    idx = torch.tensor([0, 9, 200])  # positions in the left, right and left half
    same_layout = layout(e[4] * 3, e[5] * 0.5)  # other channels and norms
    assert structural_distillation(same_layout, sam, idx) < 1e-6
    merged = torch.ones(6, 8, 8, requires_grad=True)  # half SAM's resolution: interpolated to it
    loss = structural_distillation(merged, sam, idx)
    assert loss > 0.1
    loss.backward()
    assert merged.grad.abs().sum() > 0


def test_sd_trains_the_teacher_with_sam_decoder_features(tmp_path):
    """SD in a labeled-only run (teacher training) and in S4M's burn-in only (``sd_stage:
    teacher``), with MobileSAM's real architecture (random weights); refused with the classical
    backend, which has no decoder."""
    pytest.importorskip("segment_anything")
    from lowlabel import fit
    from lowlabel.config import load_config
    from lowlabel.errors import ConfigError

    root = make_instance_dataset(tmp_path / "discs", n=6)
    sd = {"sd": True, "sd_points": 4, "backend": "mobilesam", "allow_random_weights": True}
    base = {
        "data": {"root": str(root), "labeled": "2", "crop": 64, "labeled_batch": 2, "unlabeled_batch": 2},
        "model": {"arch": "maskrcnn"}, "optim": {"name": "adamw", "lr": 1e-4},
        "train": {"iterations": 2, "val_every": 0, "checkpoint_every": 2, "log_every": 1, "grad_norm_every": 1}, "eval": {"tile": 64},
    }

    def log(name):
        return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]

    fit(load_config(raw={**base, "name": "sup", "out_dir": str(tmp_path / "runs"), "method": {"name": "supervised", "params": sd}}), progress=False)
    first = log("sup")[0]
    assert first["loss_sd"] > 0 and np.isclose(first["loss"], first["loss_x"] + first["loss_sd"], rtol=1e-4)
    assert first["gn_sd"] > 0
    fit(load_config(raw={**base, "name": "s4m", "out_dir": str(tmp_path / "runs"), "teacher": {"kind": "ema", "decay": 0.9996},
                         "method": {"name": "s4m", "params": {**sd, "burn_in": 1, "threshold": 0.0}}}), progress=False)
    burn, after = log("s4m")
    assert burn["loss_sd"] > 0 and burn["gn_sd"] > 0 and after["loss_sd"] == 0 and "gn_sd" not in after
    teacher = str(tmp_path / "runs" / "sup" / "checkpoints" / "last.pt")  # burn_in 0 needs a teacher's weights
    with pytest.raises(ConfigError, match="burn_in: 0 this run has none"):
        fit(load_config(raw={**base, "name": "s4m0", "out_dir": str(tmp_path / "runs"), "teacher": {"kind": "ema", "decay": 0.9996},
                             "model": {"arch": "maskrcnn", "pretrained": teacher},
                             "method": {"name": "s4m", "params": {**sd, "burn_in": 0}}}), progress=False)
    with pytest.raises(ConfigError, match="classical backend has none"):
        fit(load_config(raw={**base, "name": "bad", "out_dir": str(tmp_path / "runs"),
                             "method": {"name": "supervised", "params": {"sd": True}}}), progress=False)
