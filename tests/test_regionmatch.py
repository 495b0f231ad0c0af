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
    rampup_weight,
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


def _batch(b=2, s=32, noise=False, seed=0, views=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, s, s, generator=g)
    mask = (torch.arange(s) >= s // 2).long().expand(b, s, s).clone()
    lab = {"image": img, "mask": mask, "valid": torch.ones(b, s, s, dtype=torch.bool)}
    unl = {"image": img.flip(0), "strong": img.flip(0)[:, None].repeat(1, views, 1, 1, 1), "cutmix": torch.zeros(b, views, s, s, dtype=torch.bool),
           "valid": torch.ones(b, s, s, dtype=torch.bool), "gt": mask.clone()}
    unl["cutmix"][:, :, 4:20, 4:20] = True
    return lab, unl


@pytest.mark.parametrize("over", [
    {}, {"prspl": False}, {"cir": False, "prcc": False}, {"dynamic_alpha": False}, {"region_labels": "hard"},
    {"region_labels": "soft"}, {"region_labeled": False}, {"region_unlabeled": False}, {"prcc_reduction": "sum"},
    {"min_region_pixels": 1, "max_regions": 5}, {"prcc_distance": "euclidean"}, {"region_pixels": "prspl"},
    {"alpha_schedule": "prose"}, {"region_rampup": 0.0}, {"region_rampup_shape": "linear"}, {"max_region_share": 1.0},
    {"base": "unimatch"}, {"labeled_loss": "ce_dice", "unlabeled_loss": "dice"},
])
def test_every_ablation_runs_and_backpropagates(over):
    torch.manual_seed(0)
    net = build_model("tiny", num_classes=2, width=4)
    m = build_method("regionmatch", {"tau_low": 0.0, "tau_high": 0.6, "threshold": 0.0, **over}, num_classes=2, model=net)
    lab, unl = _batch(views=2 if over.get("base") == "unimatch" else 1)
    out = m.training_step(net, Teacher("self", net), lab, unl, StepContext(3, 10, 1, 4, 2))
    for k, v in out.losses.items():
        assert torch.isfinite(v), k
    out.losses["loss"].backward()
    assert m.proj.weight.grad is not None and m.region_classifier.weight.grad is not None
    assert {"acc_prspl", "acc_threshold", "acc_all", "regions", "regions_in_loss", "region_share_in_loss"} <= set(out.metrics)
    assert torch.allclose(sum(out.terms.values()), out.losses["loss"])
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


# ----------------------------------------------------------------------------- from-scratch options
def test_rampup_weight_hand_computed():
    assert rampup_weight(0.0, 0.2) == 0.0
    assert rampup_weight(0.2, 0.2) == pytest.approx(1.0) and rampup_weight(0.9, 0.2) == 1.0
    e5 = math.exp(-5)
    assert rampup_weight(0.1, 0.2) == pytest.approx((math.exp(-5 * 0.25) - e5) / (1 - e5))
    assert rampup_weight(0.1, 0.2, "linear") == pytest.approx(0.5)
    assert rampup_weight(0.0, 0.0) == 1.0  # no ramp-up: the paper
    ws = [rampup_weight(t / 10, 0.5) for t in range(11)]
    assert ws == sorted(ws)
    with pytest.raises(ValueError):
        rampup_weight(0.1, 0.2, "cosine")


def test_normalized_prcc_is_scale_free():
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(2, 8, 4, 4, generator=g)
    ids = torch.randint(0, 3, (2, 4, 4), generator=g) + 3 * torch.arange(2).view(2, 1, 1)
    ids[0, 0, 0] = -1
    regions, _ = region_pool(pix, ids, 6)
    keep = torch.ones(6, dtype=torch.bool)
    base = pixel_region_loss(pix, ids, regions, keep, distance="normalized")
    eucl = pixel_region_loss(pix, ids, regions, keep, distance="euclidean")
    for c in (1e-3, 37.5, 1e4):
        assert pixel_region_loss(pix * c, ids, regions * c, keep, distance="normalized").item() == pytest.approx(base.item(), rel=1e-5)
        assert pixel_region_loss(pix * c, ids, regions * c, keep, distance="euclidean").item() == pytest.approx(eucl.item() * c, rel=1e-4)
    assert 0 < base.item() <= 2
    # hand-computed: orthogonal directions are sqrt(2) apart whatever the lengths
    one = torch.tensor([[[[1.0]], [[0.0]]]])  # D=2, 1x1 pixel (1, 0)
    r = torch.tensor([[0.0, 5.0]])
    k = torch.tensor([True])
    assert pixel_region_loss(one, torch.zeros(1, 1, 1, dtype=torch.long), r, k, distance="normalized").item() == pytest.approx(math.sqrt(2))
    assert pixel_region_loss(one, torch.zeros(1, 1, 1, dtype=torch.long), r, k, distance="euclidean").item() == pytest.approx(math.sqrt(26))
    with pytest.raises(ValueError):
        pixel_region_loss(one, torch.zeros(1, 1, 1, dtype=torch.long), r, k, distance="cosine")


def test_alpha_schedules_move_the_kept_share_in_opposite_directions():
    assert alpha_at(0.2, 0, 80, schedule="equations") == pytest.approx(0.2)
    assert alpha_at(0.2, 80, 80, schedule="equations") == pytest.approx(0.0)
    assert alpha_at(0.2, 0, 80, schedule="prose") == pytest.approx(0.0)
    assert alpha_at(0.2, 40, 80, schedule="prose") == pytest.approx(0.1)
    assert alpha_at(0.2, 80, 80, schedule="prose") == pytest.approx(0.2)
    assert alpha_at(0.2, 40, 80, dynamic=False, schedule="prose") == pytest.approx(0.2)
    with pytest.raises(ValueError):
        alpha_at(0.2, 1, 80, schedule="other")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 16, 16, generator=g).mul(3).softmax(1)
    has = torch.ones(2, 16, 16, dtype=torch.bool)

    def kept(schedule, epoch, total=10):
        return prspl_mask(q, q, has, has, alpha_at(0.2, epoch, total, schedule=schedule)).float().mean().item()

    eq0, eq9, pr0, pr9 = kept("equations", 0), kept("equations", 9), kept("prose", 0), kept("prose", 9)
    assert eq0 == pytest.approx(0.8, abs=0.01) and eq9 == pytest.approx(0.98, abs=0.01) and eq9 > eq0  # grows
    assert pr0 == 1.0 and pr9 == pytest.approx(0.82, abs=0.01) and pr9 < pr0  # shrinks


def _confident_net(num_classes=2, cls=0, scale=1.0):
    """A tiny model that predicts class ``cls`` everywhere with confidence ~1 (one whole-image
    region per image, as in the collapse), with its decoder features multiplied by ``scale``."""
    torch.manual_seed(0)
    net = build_model("tiny", num_classes=num_classes, width=4)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(-10.0)
        net.head.bias[cls] = 10.0
    if scale != 1.0:
        orig = net.decode_features
        net.decode_features = lambda feats: orig(feats) * scale
    return net


def _whole_image_batch(s=32):
    lab, unl = _batch(s=s)
    lab["mask"][:] = 0
    unl["gt"][:] = 0
    return lab, unl


def _step(net, params, it=5, total=10, lab_unl=None):
    m = build_method("regionmatch", params, num_classes=2, model=net)
    lab, unl = lab_unl or _whole_image_batch()
    return m, m.training_step(net, Teacher("self", net), lab, unl, StepContext(it, total, 0, 4, 2))


REGION_LOSSES = ("loss_r_u", "loss_cir", "loss_prcc")


def test_whole_image_region_defaults_give_no_region_loss_and_bounded_terms():
    _, out = _step(_confident_net(), {})
    assert out.metrics["regions"] == 2 and out.metrics["regions_kept"] == 2  # confident: passes tau_low
    assert out.metrics["regions_too_large"] == 2 and out.metrics["regions_in_loss"] == 0
    assert out.metrics["region_share_in_loss"] == 0 and out.metrics["regions_in_cir"] == 0
    for k in REGION_LOSSES:
        assert out.losses[k] == 0, k
    for k, v in out.losses.items():
        assert torch.isfinite(v) and 0 <= v.item() < 5, (k, v)
    assert out.terms["prcc"].requires_grad and out.terms["r_u"] == 0


def test_whole_image_region_terms_bounded_only_with_normalized_prcc():
    """With the paper's region filter (max_region_share 1) the whole-image regions enter the
    region losses; every term stays small with the normalised PRCC, whatever the feature scale,
    while the paper's Euclidean PRCC grows with it."""
    _, out = _step(_confident_net(), {"max_region_share": 1.0})
    assert out.metrics["regions_in_loss"] == 2 and out.metrics["region_share_in_loss"] == pytest.approx(1.0)
    assert out.metrics["regions_in_cir"] == 2
    assert out.losses["loss_prcc"] > 0 and out.losses["loss_r_u"] > 0
    for k, v in out.losses.items():
        assert torch.isfinite(v) and 0 <= v.item() < 5, (k, v)
    # the normalised PRCC and CIR2R (cosines) do not grow with the feature scale
    _, out_big = _step(_confident_net(scale=1000.0), {"max_region_share": 1.0})
    assert torch.isfinite(out_big.losses["loss"])
    assert out_big.losses["loss_prcc"] <= 2 and out_big.losses["loss_cir"] <= 4
    _, small = _step(_confident_net(), {"max_region_share": 1.0, "prcc_distance": "euclidean"})
    _, big = _step(_confident_net(scale=1000.0), {"max_region_share": 1.0, "prcc_distance": "euclidean"})
    assert big.losses["loss_prcc"].item() == pytest.approx(1000 * small.losses["loss_prcc"].item(), rel=1e-3)
    assert big.losses["loss_prcc"] > 5


def test_region_rampup_weight_zero_at_start_one_at_end():
    params = {"max_region_share": 1.0, "region_rampup": 0.2}
    _, first = _step(_confident_net(), params, it=0, total=100)
    assert first.metrics["region_weight"] == 0.0
    # FixMatch's halved total, (L_x + L_s) / 2, and eq. 4's terms in the same scale (0.5 L_r^l, ...)
    non_region = (first.losses["loss_x"] + first.losses["loss_s"] + first.losses["loss_r_l"]) / 2
    assert first.losses["loss"].item() == pytest.approx(non_region.item(), abs=1e-6)
    assert first.losses["loss_prcc"] > 0  # still computed and logged
    m, last = _step(_confident_net(), params, it=99, total=100)
    assert last.metrics["region_weight"] == 1.0
    p = m.p
    full = (last.losses["loss_x"] + last.losses["loss_s"] + last.losses["loss_r_l"] + p.lambda_u_region * last.losses["loss_r_u"]
            + p.lambda_cir * last.losses["loss_cir"] + p.lambda_prcc * last.losses["loss_prcc"]) / 2
    assert last.losses["loss"].item() == pytest.approx(full.item(), rel=1e-5)
    assert last.losses["loss"] > first.losses["loss"]
    _, mid = _step(_confident_net(), params, it=10, total=100)
    assert 0 < mid.metrics["region_weight"] < 1


def test_region_pixels_prspl_keeps_only_prspl_pixels():
    def run(region_cls, mode):
        net = _confident_net()
        m = build_method("regionmatch", {"max_region_share": 1.0, "region_pixels": mode}, num_classes=2, model=net)
        with torch.no_grad():  # region view: class region_cls everywhere
            m.region_classifier.weight.zero_()
            m.region_classifier.bias.fill_(-5.0)
            m.region_classifier.bias[region_cls] = 5.0
        lab, unl = _whole_image_batch()
        return m.training_step(net, Teacher("self", net), lab, unl, StepContext(5, 10, 0, 4, 2))

    # the views disagree: PRSPL keeps no pixel, so with "prspl" no region enters a region loss
    dis_all, dis_prspl = run(1, "all"), run(1, "prspl")
    assert dis_all.metrics["prspl_ratio"] == 0 and dis_all.metrics["regions_in_loss"] == 2
    assert dis_prspl.metrics["regions_in_loss"] == 0
    assert all(dis_prspl.losses[k] == 0 for k in REGION_LOSSES) and dis_all.losses["loss_prcc"] > 0
    # the views agree everywhere: PRSPL keeps every pixel, both modes give the same losses
    ag_all, ag_prspl = run(0, "all"), run(0, "prspl")
    assert ag_all.metrics["prspl_ratio"] == 1.0 and ag_prspl.metrics["regions_in_loss"] == 2
    for k in REGION_LOSSES:
        assert ag_prspl.losses[k].item() == pytest.approx(ag_all.losses[k].item(), rel=1e-5), k


def test_region_count_and_share_metrics_hand_computed():
    """Predictions split every image into a left and a right half: 4 regions of share 0.5."""
    torch.manual_seed(0)
    net = build_model("tiny", num_classes=2, width=4)
    s = 32
    split = torch.full((1, 2, s, s), -10.0)
    split[:, 0, :, : s // 2] = 10.0
    split[:, 1, :, s // 2:] = 10.0
    net.classify = lambda dec, size: split.expand(dec.shape[0], -1, -1, -1) + 0 * dec.mean()
    lab, unl = _batch(s=s)
    _, out = _step(net, {}, lab_unl=(lab, unl))
    assert out.metrics["regions"] == 4 and out.metrics["regions_too_large"] == 0
    assert out.metrics["regions_in_loss"] == 4 and out.metrics["region_share_in_loss"] == pytest.approx(0.5)
    assert out.losses["loss_prcc"] > 0
    _, out = _step(net, {"max_region_share": 0.4}, lab_unl=_batch(s=s))
    assert out.metrics["regions_too_large"] == 4 and out.metrics["regions_in_loss"] == 0 and out.losses["loss_prcc"] == 0
