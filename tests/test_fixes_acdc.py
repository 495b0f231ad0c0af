"""Pins for the fixes that hid semi-supervised gains (BN of averaged networks, UniMatch's loss
weights, the last partial epoch) and for the medical recipe (2D UNet, grey input, Dice metrics
and losses, whole-image resize and rotations)."""

import copy
import json

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

from .conftest import tiny_config
from lowlabel.augment.transforms import UnlabeledTransform, rotate_medical, weak
from lowlabel.config import load_config
from lowlabel.engine.teachers import Teacher
from lowlabel.engine.trainer import Trainer
from lowlabel.eval.metrics import Scores, foreground, volume_of
from lowlabel.methods import StepContext, build_method
from lowlabel.methods.base import dice_loss, masked_pseudo_loss, supervised_loss
from lowlabel.models import build_model


def _shifted_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 32, 32, generator=g) * 0.5 + 0.4 for _ in range(n)]


def _perturb(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_momentum_teacher_predicts_like_a_fresh_network_with_recomputed_bn():
    torch.manual_seed(0)
    student = build_model("tiny", num_classes=3, width=4)
    teacher = Teacher("epoch_momentum", student)
    batches = _shifted_batches()
    student.train()
    for b in batches:  # the student's running statistics: of its own weights
        student(b)
    teacher.after_epoch(student, batches)  # first epoch: a copy
    _perturb(student, 0.2, 1)
    for b in batches:
        student(b)
    teacher.after_epoch(student, batches)  # eq. 6, then update_bn
    fresh = build_model("tiny", num_classes=3, width=4)
    fresh.load_state_dict({k: v for k, v in teacher.model.state_dict().items() if "running" not in k and "num_batches" not in k}, strict=False)
    update_bn(batches, fresh)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher.model.eval()(x), fresh.eval()(x), atol=1e-5)
        # the statistics were really recomputed: the averaged ones would predict otherwise
        stale = copy.deepcopy(teacher.model)
        for bs, bt in zip(stale.buffers(), student.buffers()):
            if bs.dtype.is_floating_point:
                bs.copy_(bt)
        assert not torch.allclose(stale.eval()(x), fresh(x), atol=1e-3)


def test_ema_evaluation_model_gets_recomputed_statistics_and_the_teacher_keeps_its_own():
    torch.manual_seed(0)
    student = build_model("tiny", num_classes=3, width=4)
    teacher = Teacher("ema", student, decay=0.5)
    _perturb(student, 0.2, 2)
    student.train()
    for b in _shifted_batches():
        student(b)
    teacher.updates = 10  # past the warm-up (whose first step copies)
    teacher.after_step(student)
    ema_buffers = [b.clone() for b in teacher.model.buffers()]
    batches = _shifted_batches(seed=3)
    net = teacher.evaluation_model(batches)
    fresh = copy.deepcopy(teacher.model)
    update_bn(batches, fresh)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), fresh.eval()(x), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(ema_buffers, teacher.model.buffers()))  # the copy, not the teacher
    # EMA statistics follow the weights' average, they are not the student's copy
    sb = [b for b in student.buffers() if b.dtype.is_floating_point]
    tb = [b for b in teacher.model.buffers() if b.dtype.is_floating_point]
    assert any(not torch.equal(a, b) for a, b in zip(sb, tb))


def test_last_partial_epoch_is_averaged(tiny_dataset, tmp_path):
    # 2 unlabeled train images at batch 1: 2 iterations an epoch; 3 iterations end mid-epoch
    raw = tiny_config(tiny_dataset, tmp_path, method="derprop", teacher="epoch_momentum", iterations=3,
                      data={"unlabeled_batch": 1, "labeled_batch": 1}, train={"val_every": 0, "checkpoint_every": 10})
    raw["teacher"]["bn_batches"] = 2
    t = Trainer(load_config(raw=raw), progress=False)
    assert t.iters_per_epoch == 2
    t.fit()
    assert t.teacher.updates == 2  # after epoch 1 and after the partial epoch 2


def test_unimatch_loss_weights_are_the_reference():
    m = build_method("unimatch", {}, num_classes=3)
    assert (m.p.weight_x, m.p.weight_s, m.p.weight_fp) == (0.5, 0.125, 0.25)
    # the total is (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 on a real step
    torch.manual_seed(0)
    student = build_model("tiny", num_classes=3, width=4)
    m = build_method("unimatch", {"threshold": 0.0}, num_classes=3)
    lab = {"image": torch.rand(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}
    unl = {"image": torch.rand(2, 3, 32, 32), "strong": torch.rand(2, 2, 3, 32, 32), "cutmix": torch.zeros(2, 2, 32, 32, dtype=torch.bool),
           "valid": torch.ones(2, 32, 32, dtype=torch.bool)}
    out = m.training_step(student, Teacher("self", student), lab, unl, StepContext(0, 10, 0, 1, 3))
    L = out.losses
    # loss_s is the mean of the two views, so 0.25 L_s1 + 0.25 L_s2 = 0.5 loss_s
    expected = (L["loss_x"] + 0.5 * L["loss_s"] + 0.5 * L["loss_fp"]) / 2
    assert torch.allclose(L["loss"].detach(), expected, atol=1e-5)
    assert set(out.terms) == {"x", "s", "fp"} and torch.allclose(sum(out.terms.values()), L["loss"])


def test_unimatch_one_strong_view_forwards_three_batches():
    # the FixMatch + feature-perturbation probe: the second strong view never reaches the network
    torch.manual_seed(0)
    student = build_model("tiny", num_classes=3, width=4)
    calls = []
    student.encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    m = build_method("unimatch", {"threshold": 0.0, "strong_views": 1, "weight_s": 0.25}, num_classes=3)
    lab = {"image": torch.rand(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}
    unl = {"image": torch.rand(2, 3, 32, 32), "strong": torch.rand(2, 2, 3, 32, 32), "cutmix": torch.zeros(2, 2, 32, 32, dtype=torch.bool),
           "valid": torch.ones(2, 32, 32, dtype=torch.bool)}
    out = m.training_step(student, Teacher("self", student), lab, unl, StepContext(0, 10, 0, 1, 3))
    assert calls == [4, 2]  # labeled + weak jointly, then one strong-view forward
    L = out.losses
    assert torch.allclose(L["loss"].detach(), 0.5 * L["loss_x"] + 0.25 * L["loss_s"] + 0.25 * L["loss_fp"], atol=1e-5)


def test_dice_loss_and_pseudo_dice_ignore():
    target = torch.tensor([[[0, 1], [2, 2]]])
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target, torch.ones_like(target, dtype=torch.bool)) < 1e-3
    wrong = perfect.roll(1, dims=1)
    assert dice_loss(wrong, target, torch.ones_like(target, dtype=torch.bool)) > 0.99
    # ignored pixels do not count: a wrong pixel masked out leaves a perfect score
    logits = perfect.clone()
    logits[0, :, 0, 0] = torch.tensor([0.0, 50.0, 0.0])
    conf = torch.tensor([[[0.1, 1.0], [1.0, 1.0]]])
    valid = torch.ones_like(conf, dtype=torch.bool)
    keep_all = masked_pseudo_loss(logits, target, conf, valid, 0.0, "dice")
    keep_conf = masked_pseudo_loss(logits, target, conf, valid, 0.95, "dice")
    assert keep_conf < 0.35 < keep_all  # class 0 has no kept pixel: its Dice is 1 - s / s = 0
    mask = target.clone()
    mask[0, 0, 0] = 255
    ce_dice = supervised_loss(perfect, mask, "ce_dice")
    assert ce_dice < 1e-2 and torch.isfinite(ce_dice)
    with pytest.raises(ValueError):
        supervised_loss(perfect, mask, "focal")


def test_dice_metrics_pooled_and_per_volume():
    names = ["background", "rv", "lv"]
    assert foreground(names) == [1, 2] and volume_of("patient001_frame01_slice_3") == "patient001_frame01"
    ids = ["a_slice_0", "a_slice_1", "b_slice_0"]
    s = Scores.for_ids(3, ids)
    # volume a: rv perfect on 2 slices (4 px); volume b: rv 1 of 4 px found, 3 missed as background
    gt_a = np.array([[1, 1], [0, 2]])
    s.update(gt_a, gt_a, "a_slice_0").update(gt_a, gt_a, "a_slice_1")
    s.update(np.array([[1, 0], [0, 0]]), np.array([[1, 1], [1, 1]]), "b_slice_0")
    out = s.summary(names)
    # per volume: rv dice a = 1, b = 2*1/(1+4) = 0.4 -> 0.7; lv only in volume a (b: absent, left out) -> 1
    assert out["dice_by"] == "volume" and out["volumes"] == 2
    assert out["per_class_dice"]["rv"] == pytest.approx(0.7)
    assert out["per_class_dice"]["lv"] == pytest.approx(1.0)
    assert out["dice_mean"] == pytest.approx(0.85)
    # pooled: rv TP 5, FP 0, FN 3 -> 10/13
    assert out["per_class_dice_pooled"]["rv"] == pytest.approx(10 / 13, abs=1e-6)
    assert out["dice_mean_pooled"] == pytest.approx((10 / 13 + 1) / 2, abs=1e-6)
    plain = Scores.for_ids(3, ["x", "y"]).update(gt_a, gt_a, "x").summary(names)
    assert plain["dice_by"] == "pooled" and plain["dice_mean"] == 1.0


def test_unet2d_size_and_grey_input():
    m = build_model("unet2d", num_classes=4, width=16, in_channels=1).eval()
    n = sum(p.numel() for p in m.parameters())
    assert 1.7e6 < n < 2.1e6  # the anchors' ~1.8 M
    assert m.encoder.blocks[0][0].in_channels == 1
    x = torch.rand(2, 1, 64, 64).expand(2, 3, 64, 64)  # a grey image as three equal channels
    with torch.no_grad():
        assert m(x).shape == (2, 4, 64, 64)
        assert torch.allclose(m(x), m.decode(m.encode(x[:, :1]), (64, 64)), atol=1e-5)
        assert m(torch.rand(1, 3, 50, 70)).shape == (1, 4, 50, 70)
    assert len(m.encode(x)) == 5 and m.decode_features(m.encode(x)).shape[1] == m.feature_channels == 16
    with pytest.raises(ValueError, match="in_channels"):
        build_model("unet2d", num_classes=2, in_channels=0)


def _coded(h=40, w=60):
    mask = ((torch.arange(h)[:, None] // 10) + (torch.arange(w)[None] // 15)) % 3
    return {"image": (mask.float() / 2).expand(3, h, w).clone(), "mask": mask.long(), "id": "x"}


def test_whole_image_resize_and_medical_rotations_move_labels_with_pixels():
    rotated = 0
    for seed in range(40):
        out = weak(_coded(), np.random.default_rng(seed), 32, resize=True, rotate="medical")
        assert out["image"].shape == (3, 32, 32) and out["mask"].shape == (32, 32)
        v = out["valid"]
        assert (out["mask"][~v] == 255).all()
        rotated += int((~v).any())
        cls = (out["image"][0] * 2).round().long()
        assert (cls[v] == out["mask"][v]).float().mean() > 0.85
    assert rotated > 3  # the free-angle branch ran (its corners are not valid)
    s = _coded()
    a = rotate_medical(s, np.random.default_rng(1))
    b = rotate_medical(s, np.random.default_rng(1))
    assert torch.equal(a["mask"], b["mask"])
    u = UnlabeledTransform(32, n_strong=2, resize=True, rotate="medical")({k: v for k, v in s.items() if k != "mask"}, np.random.default_rng(0))
    assert u["strong"].shape == (2, 3, 32, 32) and u["cutmix"].shape == (2, 32, 32)


def test_fit_logs_gradient_norms_selects_on_dice_and_evaluates_resized(tiny_dataset, tmp_path):
    raw = tiny_config(tiny_dataset, tmp_path, method="unimatch", iterations=4,
                      data={"resize": True, "rotate": "medical", "crop": 32}, train={"grad_norm_every": 2, "select": "dice_mean"})
    raw["method"]["params"] = {"labeled_loss": "ce_dice", "unlabeled_loss": "dice", "threshold": 0.0}
    cfg = load_config(raw=raw)
    assert cfg.eval.resize == 32  # evaluation follows the training size
    t = Trainer(cfg, progress=False)
    summary = t.fit()
    recs = [json.loads(x) for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    gn = [r for r in recs if "gn_x" in r]
    assert [r["iteration"] for r in gn] == [2, 4] and all(r["gn_x"] > 0 and "gn_fp" in r for r in gn)
    assert summary["select"] == "dice_mean" and summary["best_val_dice_mean"] is not None
    assert all("dice_mean" in r["val"] for r in recs if "val" in r)


def test_unimatch_feature_perturbation_drops_unet2d_first_level_but_not_an_input_level():
    m = build_method("unimatch", {}, num_classes=2)
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.features_include_input = net, net.features_include_input

        def decode(self, feats, size):
            seen["first"] = feats[0]
            return self.net.decode(feats, size)

    for arch, dropped in (("unet2d", True), ("tiny", False)):
        net = build_model(arch, num_classes=2, width=4)
        feats = net.encode(torch.rand(2, 3, 32, 32))
        m.perturbed_decode(Spy(net), feats, (32, 32))
        assert (not torch.equal(seen["first"], feats[0])) == dropped, arch


def test_resized_model_sees_the_whole_image_whatever_the_tile():
    """A model of whole resized images (eval.resize) is given the whole image resized, not tiles
    of it resized: a tile smaller than the image would hand it zoomed-in crops it never saw."""
    from lowlabel.eval.inference import Resized, sliding_window

    seen = []

    def model(x):
        seen.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    sliding_window(Resized(model, 8), torch.rand(3, 40, 60), 2, tile=16)
    assert seen == [(1, 3, 8, 8)]
