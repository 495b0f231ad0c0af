import math

import pytest
import torch

from lowlabel.methods.regionmatch import (
    alpha_at,
    connected_regions,
    per_image_mean,
    pixel_region_loss,
    prspl_mask,
    region_pool,
    region_targets,
    resize_ids,
    similarity_consistency,
)

L = torch.tensor([[[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [2, 2, 255, 0],
                   [2, 2, 0, 0]]])


def test_connected_regions_per_class_and_ignore():
    ids, cls, img, size = connected_regions(L, num_classes=3)
    # class 0 has two components (top-left block, bottom-right L-shape); class 1 one; class 2 one
    assert sorted(cls.tolist()) == [0, 0, 1, 2]
    assert ids[0, 2, 2] == -1  # ignore belongs to no region
    assert ids[0, 0, 0] == ids[0, 1, 1] and ids[0, 0, 0] != ids[0, 3, 3]
    assert sorted(size.tolist()) == [3, 4, 4, 4]
    ids2, cls2, _, _ = connected_regions(L, 3, min_pixels=4)
    assert len(cls2) == 3 and (ids2[0, 2:, 3] == -1).all() and ids2[0, 3, 2] == -1  # the 3-pixel region dropped
    ids3, cls3, _, size3 = connected_regions(L, 3, max_regions=2)
    assert len(cls3) == 2 and ids3.max() == 1 and (size3 == 4).all()


def test_connected_regions_are_batch_global():
    ids, cls, img, _ = connected_regions(torch.stack([L[0], L[0]]), 3)
    assert len(cls) == 8 and img.tolist() == [0] * 4 + [1] * 4
    assert ids[1].max() == 7 and ids[1][ids[1] >= 0].min() == 4


def test_region_pool_hand_computed():
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    ids, cls, _, _ = connected_regions(L, 3)
    means, counts = region_pool(feats, ids, len(cls))
    r_top_left = ids[0, 0, 0]
    assert means[r_top_left, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)
    r_br = ids[0, 3, 3]
    assert means[r_br, 0] == pytest.approx((11 + 14 + 15) / 3) and counts[r_br] == 3
    assert resize_ids(ids, (2, 2)).shape == (1, 2, 2)


def test_dual_threshold_region_targets():
    conf = torch.tensor([0.97, 0.90, 0.50])
    prob = torch.tensor([[0.97, 0.03], [0.2, 0.8], [0.5, 0.5]])
    t, keep = region_targets(conf, prob, 0.85, 0.95, "both")
    assert keep.tolist() == [True, True, False]
    assert t[0].tolist() == [1.0, 0.0]  # hard above tau_high
    assert torch.allclose(t[1], prob[1])  # soft in between
    th, _ = region_targets(conf, prob, 0.85, 0.95, "hard")
    assert th[1].tolist() == [0.0, 1.0]
    ts, _ = region_targets(conf, prob, 0.85, 0.95, "soft")
    assert torch.allclose(ts[0], prob[0])


def test_per_image_mean_is_mean_of_means():
    v = torch.tensor([1.0, 3.0, 10.0, 5.0])
    img = torch.tensor([0, 0, 1, 1])
    keep = torch.tensor([True, True, True, False])
    assert per_image_mean(v, img, keep, 2).item() == pytest.approx((2 + 10) / 2)
    assert per_image_mean(v, img, torch.zeros(4, dtype=torch.bool), 2).item() == 0


def test_prspl_quantile_mask():
    # 1 image, 2 classes, 4 pixels; pixel entropies increase left to right
    qp = torch.tensor([[0.99, 0.9, 0.7, 0.6]]).view(1, 1, 1, 4)
    q_pixel = torch.cat([qp, 1 - qp], 1)
    q_region = q_pixel.clone()
    q_region[0, :, 0, 1] = torch.tensor([0.2, 0.8])  # region view disagrees at pixel 1
    has = torch.ones(1, 1, 4, dtype=torch.bool)
    valid = torch.ones_like(has)
    m0 = prspl_mask(q_pixel, q_region, has, valid, alpha=0.0)  # quantile 1: entropy filter keeps all
    assert m0[0, 0].tolist() == [True, False, True, True]
    m = prspl_mask(q_pixel, q_region, has, valid, alpha=0.5)  # median: only the low-entropy half
    assert m[0, 0].tolist() == [True, False, False, False]
    has[0, 0, 0] = False
    assert not prspl_mask(q_pixel, q_region, has, valid, 0.0)[0, 0, 0]


def test_dynamic_alpha():
    assert alpha_at(0.2, 0, 80) == pytest.approx(0.2)
    assert alpha_at(0.2, 40, 80) == pytest.approx(0.1)
    assert alpha_at(0.2, 40, 80, dynamic=False) == pytest.approx(0.2)


def test_similarity_consistency_hand_computed():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # S^w = I; S^s = [[1, 1/sqrt2], [1/sqrt2, 1]] -> MSE = 2 * (1/2) / 4
    assert similarity_consistency(w, s).item() == pytest.approx(0.25)
    assert similarity_consistency(w, w * 3).item() == pytest.approx(0.0, abs=1e-7)
    assert similarity_consistency(w[:1], s[:1]).item() == 0


def test_pixel_region_loss_hand_computed():
    pix = torch.tensor([[[[0.0, 3.0], [0.0, 0.0]]]])  # D=1, 2x2
    ids = torch.tensor([[[0, 0], [1, -1]]])
    regions = torch.tensor([[0.0], [2.0]])
    keep = torch.tensor([True, True])
    # region 0: |0-0| and |0-3| -> mean 1.5 ; region 1: |2-0| = 2 -> mean over regions 1.75
    assert pixel_region_loss(pix, ids, regions, keep).item() == pytest.approx(1.75)
    assert pixel_region_loss(pix, ids, regions, keep, "sum").item() == pytest.approx((3 + 2) / 2)
    assert pixel_region_loss(pix, ids, regions, torch.tensor([False, True])).item() == pytest.approx(2.0)
    # -log E_ij = ||R_i - F_j||
    assert -math.log(math.exp(-1.5)) == pytest.approx(1.5)


from lowlabel.engine.teachers import Teacher  # noqa: E402
from lowlabel.methods import StepContext, build_method  # noqa: E402
from lowlabel.models import build_model  # noqa: E402


def _batch(b=2, s=32, noise=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, s, s, generator=g)
    mask = (torch.arange(s) >= s // 2).long().expand(b, s, s).clone()
    lab = {"image": img, "mask": mask, "valid": torch.ones(b, s, s, dtype=torch.bool)}
    unl = {"image": img.flip(0), "strong": img.flip(0)[:, None].clone(), "cutmix": torch.zeros(b, 1, s, s, dtype=torch.bool),
           "valid": torch.ones(b, s, s, dtype=torch.bool), "gt": mask.clone()}
    unl["cutmix"][:, 0, 4:20, 4:20] = True
    return lab, unl


@pytest.mark.parametrize("over", [
    {}, {"prspl": False}, {"cir": False, "prcc": False}, {"dynamic_alpha": False}, {"region_labels": "hard"},
    {"region_labels": "soft"}, {"region_labeled": False}, {"region_unlabeled": False}, {"prcc_reduction": "sum"},
    {"min_region_pixels": 1, "max_regions": 5},
])
def test_every_ablation_runs_and_backpropagates(over):
    torch.manual_seed(0)
    net = build_model("tiny", num_classes=2, width=4)
    m = build_method("regionmatch", {"tau_low": 0.0, "tau_high": 0.6, "threshold": 0.0, **over}, num_classes=2, model=net)
    lab, unl = _batch()
    out = m.training_step(net, Teacher("self", net), lab, unl, StepContext(3, 10, 1, 4, 2))
    for k, v in out.losses.items():
        assert torch.isfinite(v), k
    out.losses["loss"].backward()
    assert m.proj.weight.grad is not None and m.region_classifier.weight.grad is not None
    assert {"acc_prspl", "acc_threshold", "acc_all", "regions"} <= set(out.metrics)
    if over.get("max_regions"):
        assert out.metrics["regions"] <= 5


def test_no_regions_and_no_confident_regions():
    net = build_model("tiny", num_classes=2, width=4)
    m = build_method("regionmatch", {}, num_classes=2, model=net)  # tau_low 0.85: a random net keeps none
    lab, unl = _batch()
    unl["valid"][:] = False  # all padding: no unlabeled region at all
    lab["mask"][:] = 255
    out = m.training_step(net, Teacher("self", net), lab, unl, StepContext(0, 10, 0, 4, 2))
    assert out.metrics["regions"] == 0 and torch.isfinite(out.losses["loss"])
    lab, unl = _batch()
    out = m.training_step(net, Teacher("ema", net), lab, unl, StepContext(0, 10, 0, 4, 2))
    assert out.metrics["regions_kept"] == 0 and out.losses["loss_r_u"] == 0 and out.losses["loss_prcc"] == 0


def test_many_tiny_regions_stay_bounded():
    net = build_model("tiny", num_classes=4, width=4)
    m = build_method("regionmatch", {"min_region_pixels": 1, "max_regions": 64}, num_classes=4, model=net)
    lab, unl = _batch(s=64)
    lab["mask"] = torch.randint(0, 4, (2, 64, 64), generator=torch.Generator().manual_seed(1))  # thousands of specks
    ids, cls, _, _ = connected_regions(lab["mask"], 4, 1, 64)
    assert len(cls) == 64 and ids.max() == 63
    out = m.training_step(net, Teacher("self", net), lab, unl, StepContext(0, 10, 0, 4, 4))
    assert torch.isfinite(out.losses["loss"])
