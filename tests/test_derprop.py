import math

import pytest
import torch
import torch.nn.functional as F

from lowlabel.engine.teachers import Teacher
from lowlabel.methods import StepContext, build_method
from lowlabel.methods.derprop import blend, der_loss, derivative, l1_normalize, pair_l1, propagate, propagate_lowrank, similarity
from lowlabel.models import build_model

R3 = math.sqrt(3)


def test_forward_derivative_by_hand():
    v = torch.tensor([[1.0, 4.0, 9.0, 16.0]])
    assert derivative(v, 1).tolist() == [[3.0, 5.0, 7.0]]
    assert derivative(v, 2).tolist() == [[2.0, 2.0]]
    assert derivative(v, 0).tolist() == v.tolist()


def test_alternative_operators_by_hand():
    v = torch.tensor([[1.0, 4.0, 9.0, 16.0]])
    assert derivative(v, 1, "eq10").tolist() == [[4.0, 6.0]]  # (v(i+2) - v(i)) / 2
    assert derivative(v, 1, "eq11").tolist() == [[5.0, 13.0, 25.0]]  # v(i+1) + v(i)
    assert derivative(v, 1, "eq12").tolist() == [[2.0, 2.0]]  # v(i+1) + v(i-1) - 2 v(i)
    with pytest.raises(ValueError):
        derivative(v, 1, "eq99")


def test_papers_example_equal_cosine_but_different_derivatives():
    v = torch.tensor([1.0, 1.0, 1.0])
    a = torch.tensor([2 + R3, 1.0, 0.0])
    b = torch.tensor([2 - R3, 1.0, 0.0])
    ca, cb = F.cosine_similarity(v, a, dim=0), F.cosine_similarity(v, b, dim=0)
    assert ca.item() == pytest.approx(math.sqrt(2) / 2, abs=1e-6) and cb.item() == pytest.approx(ca.item(), abs=1e-6)
    da, db = derivative(a[None, :, None], 1)[0, :, 0], derivative(b[None, :, None], 1)[0, :, 0]
    assert torch.allclose(da, torch.tensor([-1 - R3, -1.0])) and torch.allclose(db, torch.tensor([-1 + R3, -1.0]))
    # with L1-normalised vectors (as in the paper), the Delta^1 similarities tell a from b
    V = l1_normalize(torch.stack([v, a, b], 1)[None])  # [1, 3 channels, 3 pixels]
    d1 = similarity(derivative(V, 1))[0]
    assert not torch.isclose(d1[1, 1], d1[2, 2]) and not torch.isclose(d1[1, 2], d1[1, 1])


def test_propagation_with_identity_like_similarity_keeps_the_ranking():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    for sim in (torch.eye(6), 3 * torch.eye(6) + 0.01):
        out = propagate(logits, sim.expand(2, 6, 6))
        assert torch.equal(out.argmax(1), logits.argmax(1))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[:, 0] = False
    out = propagate(logits, torch.ones(2, 6, 6), valid)
    assert torch.allclose(out[..., 0], logits[..., 1:].sum(-1))  # pixel 0 contributes nothing


def test_blend_ramps_with_epochs():
    a, b = torch.zeros(3), torch.ones(3)
    assert torch.equal(blend(a, b, 0, 80), a) and torch.allclose(blend(a, b, 20, 80), torch.full((3,), 0.25))


def test_der_loss_is_zero_for_its_own_targets_without_sparsity():
    torch.manual_seed(0)
    v = l1_normalize(torch.randn(2, 8, 5))
    valid = torch.ones(2, 5, dtype=torch.bool)
    t = [similarity(v), similarity(derivative(v, 1))]
    assert der_loss(v, t, valid, 1, "eq2", 0.5, sparsity=False).item() == pytest.approx(0, abs=1e-7)
    with_s = der_loss(v, t, valid, 1, "eq2", 0.5, sparsity=True).item()
    assert with_s == pytest.approx(0.5 * derivative(v, 2).abs().sum(1).mean().item(), rel=1e-5)
    assert pair_l1(torch.ones(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor([[True, False]])).item() == 1.0


def _batch(s=64, views=2):
    lab = {"image": torch.rand(2, 3, s, s), "mask": torch.randint(0, 3, (2, s, s)), "valid": torch.ones(2, s, s, dtype=torch.bool)}
    lab["mask"][:, :4] = 255
    unl = {"image": torch.rand(2, 3, s, s), "strong": torch.rand(2, views, 3, s, s), "cutmix": torch.zeros(2, views, s, s, dtype=torch.bool),
           "valid": torch.ones(2, s, s, dtype=torch.bool), "gt": torch.randint(0, 3, (2, s, s))}
    unl["cutmix"][:, :, 8:40, 8:40] = True
    return lab, unl


@pytest.mark.parametrize("over", [{}, {"propagation_norm": "row"}, {"propagation_norm": "none"}, {"dlp": False}, {"der_loss": False},
                                  {"kl": False}, {"der_order": 0}, {"der_order": 3, "sparsity": False}, {"operator": "eq10"},
                                  {"operator": "eq11"}, {"operator": "eq12"}, {"unlabeled_loss": "dice"}, {"feature_source": "bottleneck"},
                                  {"base": "fixmatch"}])
def test_one_step_with_every_ablation(over):
    torch.manual_seed(0)
    net = build_model("tiny", num_classes=3, width=4)
    m = build_method("derprop", {"threshold": 0.0, **over}, num_classes=3, model=net)
    lab, unl = _batch()
    out = m.training_step(net, Teacher("epoch_momentum", net), lab, unl, StepContext(5, 10, 1, 4, 3))
    for k, v in out.losses.items():
        assert torch.isfinite(v), k
    out.losses["loss"].backward()
    dlp = over.get("dlp", True)
    grads = [p.grad for p in m.projection.parameters()]
    assert all(g is not None for g in grads) == dlp
    assert torch.allclose(sum(out.terms.values()), out.losses["loss"])
    assert {"acc_plain", "miou_plain"} <= set(out.metrics)
    if dlp:
        assert {"acc_propagated", "acc_rectified", "miou_propagated", "miou_rectified", "miou_plain_c0", "miou_rectified_c2"} <= set(out.metrics)
        assert ("loss_der" in out.losses) == over.get("der_loss", True)
    else:
        assert "loss_der" not in out.losses and "acc_propagated" not in out.metrics
    assert ("kl" in out.terms) == over.get("kl", True)
    if over.get("unlabeled_loss") == "dice":  # a Dice loss lies in [0, 1]; the CE run of the same step differs
        assert 0 <= out.losses["loss_s"] <= 1
        torch.manual_seed(0)
        net_ce = build_model("tiny", num_classes=3, width=4)
        ce = build_method("derprop", {"threshold": 0.0}, num_classes=3, model=net_ce)
        assert ce.training_step(net_ce, Teacher("epoch_momentum", net_ce), lab, unl, StepContext(5, 10, 1, 4, 3)).losses["loss_s"] != out.losses["loss_s"]


def test_row_norm_refuses_similarity_matrices_that_would_not_fit():
    net = build_model("tiny", num_classes=2, width=4)
    m = build_method("derprop", {"max_feature_pixels": 15, "propagation_norm": "row"}, num_classes=2, model=net)
    v = l1_normalize(torch.rand(1, 8, 4, 4))  # 16 feature pixels
    with pytest.raises(ValueError, match="max_feature_pixels"):
        m._rectify(torch.rand(1, 2, 4, 4), v, torch.ones(1, 4, 4, dtype=torch.bool))
    for norm in ("none", "similarity"):  # the low-rank form needs no M x M matrix
        m = build_method("derprop", {"max_feature_pixels": 15, "propagation_norm": norm}, num_classes=2, model=net)
        assert torch.isfinite(m._rectify(torch.rand(1, 2, 4, 4), v, torch.ones(1, 4, 4, dtype=torch.bool))).all()


def test_lowrank_propagation_equals_the_explicit_matrices():
    torch.manual_seed(0)
    logits, v = 3 * torch.randn(2, 4, 30), l1_normalize(torch.randn(2, 16, 30))
    dv = derivative(v, 1)
    valid = torch.rand(2, 30) > 0.2
    explicit = propagate(logits, similarity(v) + similarity(dv), valid)
    assert torch.allclose(propagate_lowrank(logits, v, dv, valid), explicit, atol=1e-5)
    # "similarity": divided by Z_j = sum_i valid_i |v_i|^T |v_j|
    z = (valid[:, :, None].float() * (v.abs().transpose(1, 2) @ v.abs())).sum(1)  # [B, M]
    assert torch.allclose(propagate_lowrank(logits, v, dv, valid, "similarity"), explicit / z[:, None], atol=1e-5)
    with pytest.raises(ValueError, match="low-rank propagation norm"):
        propagate_lowrank(logits, v, dv, valid, "row")


def _tiled(copies, norm):
    """Propagation of one feature map and of it tiled ``copies`` times (same pixels, M x copies)."""
    torch.manual_seed(0)
    logits, v = 4 * torch.randn(1, 3, 12), l1_normalize(torch.randn(1, 16, 12))  # signed entries, as J's last Conv1x1 gives
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, :2] = False
    if norm == "row":
        def run(lg, vv, va):
            return propagate(lg, similarity(vv) + similarity(derivative(vv, 1)), va, "row")
    else:
        def run(lg, vv, va):
            return propagate_lowrank(lg, vv, derivative(vv, 1), va, norm)
    return logits, run(logits, v, valid), run(logits.repeat(1, 1, copies), v.repeat(1, 1, copies), valid.repeat(1, copies))


@pytest.mark.parametrize("norm", ["row", "similarity"])
def test_normalised_propagation_does_not_grow_with_M(norm):
    logits, one, tile = _tiled(3, norm)
    assert torch.allclose(tile, one.repeat(1, 1, 3), atol=1e-5)  # same per-pixel logits with 3x the pixels
    assert torch.equal(tile.argmax(1), one.repeat(1, 1, 3).argmax(1))
    if norm == "row":
        assert tile.abs().max() <= logits.abs().max() + 1e-5  # a weighted average of the input logits


def test_unnormalised_propagation_grows_with_M():
    _, one, tile = _tiled(3, "none")
    assert torch.allclose(tile, 3 * one.repeat(1, 1, 3), atol=1e-4)  # eq. 4 as written: the sum triples
    conf1, conf3 = one.repeat(1, 1, 3).softmax(1).amax(1), tile.softmax(1).amax(1)
    assert (conf3 >= conf1 - 1e-6).all() and conf3.mean() > conf1.mean()  # hence sharper pseudo-labels


def test_similarity_norm_averages_the_logits_for_non_negative_features():
    """With V >= 0 and the Delta^1 part left out, the similarity norm is the S-weighted mean."""
    torch.manual_seed(0)
    logits, v = torch.randn(1, 2, 9), l1_normalize(torch.rand(1, 5, 9))
    out = propagate_lowrank(logits, v, torch.zeros(1, 4, 9), None, "similarity")
    s = similarity(v)[0]
    assert torch.allclose(out[0], (logits[0] @ s) / s.sum(0), atol=1e-6)
    assert out.abs().max() <= logits.abs().max() + 1e-6


def test_row_norm_by_hand_and_its_bound():
    logits = torch.tensor([[[2.0, -4.0, 10.0]]])  # [1, 1 class, 3 pixels]
    sim = torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, -0.5], [0.0, -0.5, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    out = propagate(logits, sim, valid, "row")[0, 0]
    # pixel 0: (2*1 - 4*0.5) / 1.5; pixel 1: (2*0.5 - 4*1) / 1.5; pixel 2: (0 + 4*0.5) / 0.5
    assert torch.allclose(out, torch.tensor([0.0, -2.0, 4.0]))
    torch.manual_seed(1)
    lg, s = torch.randn(2, 4, 50), torch.randn(2, 50, 50)
    assert propagate(lg, s, None, "row").abs().max() <= lg.abs().max() + 1e-5
    with pytest.raises(ValueError, match="propagation norm"):
        propagate(lg, s, None, "col")
