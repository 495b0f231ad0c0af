import math

import pytest
import torch
import torch.nn.functional as F

from lowlabel.engine.teachers import Teacher
from lowlabel.methods import StepContext, build_method
from lowlabel.methods.derprop import blend, der_loss, derivative, l1_normalize, pair_l1, propagate, similarity
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


@pytest.mark.parametrize("over", [{}, {"propagation_norm": "row"}, {"dlp": False}, {"der_loss": False}, {"der_order": 0}, {"der_order": 3, "sparsity": False},
                                  {"operator": "eq10"}, {"operator": "eq11"}, {"operator": "eq12"}, {"unlabeled_loss": "dice"}])
def test_one_step_with_every_ablation(over):
    torch.manual_seed(0)
    net = build_model("tiny", num_classes=3, width=4)
    m = build_method("derprop", {"threshold": 0.0, **over}, num_classes=3, model=net)
    s = 64
    lab = {"image": torch.rand(2, 3, s, s), "mask": torch.randint(0, 3, (2, s, s)), "valid": torch.ones(2, s, s, dtype=torch.bool)}
    lab["mask"][:, :4] = 255
    unl = {"image": torch.rand(2, 3, s, s), "strong": torch.rand(2, 1, 3, s, s), "cutmix": torch.zeros(2, 1, s, s, dtype=torch.bool),
           "valid": torch.ones(2, s, s, dtype=torch.bool), "gt": torch.randint(0, 3, (2, s, s))}
    unl["cutmix"][:, 0, 8:40, 8:40] = True
    out = m.training_step(net, Teacher("epoch_momentum", net), lab, unl, StepContext(5, 10, 1, 4, 3))
    for k, v in out.losses.items():
        assert torch.isfinite(v), k
    out.losses["loss"].backward()
    grads = [p.grad for p in m.projection.parameters()]
    assert all(g is not None for g in grads) == (over.get("dlp", True))
    assert {"acc_plain", "acc_propagated", "acc_rectified"} <= set(out.metrics)
    if not over.get("dlp", True):
        assert out.losses["loss_der"] == 0 and out.metrics["acc_plain"] == out.metrics["acc_rectified"]
    if over.get("unlabeled_loss") == "dice":  # a Dice loss lies in [0, 1]; the CE run of the same step differs
        assert 0 <= out.losses["loss_u"] <= 1
        torch.manual_seed(0)
        net_ce = build_model("tiny", num_classes=3, width=4)
        ce = build_method("derprop", {"threshold": 0.0}, num_classes=3, model=net_ce)
        assert ce.training_step(net_ce, Teacher("epoch_momentum", net_ce), lab, unl, StepContext(5, 10, 1, 4, 3)).losses["loss_u"] != out.losses["loss_u"]


def test_refuses_similarity_matrices_that_would_not_fit():
    net = build_model("tiny", num_classes=2, width=4)
    m = build_method("derprop", {"max_feature_pixels": 15}, num_classes=2, model=net)
    with pytest.raises(ValueError, match="max_feature_pixels"):
        m._forward(net, torch.rand(1, 3, 64, 64))  # 4 x 4 = 16 feature pixels


def _tiled_rectify(norm, copies):
    """The method's rectified logits for one feature map and for it tiled ``copies`` times along
    the width (same pixels, M multiplied by ``copies``); the logits are given at feature size."""
    torch.manual_seed(0)
    net = build_model("tiny", num_classes=3, width=4)
    m = build_method("derprop", {"propagation_norm": norm}, num_classes=3, model=net)
    h, w, d = 3, 4, 16
    logits = 4 * torch.randn(1, 3, h, w)
    v = l1_normalize(torch.randn(1, d, h, w))  # signed entries, as J's last Conv1x1 gives
    valid = torch.ones(1, h, w, dtype=torch.bool)
    valid[0, 0, :2] = False
    one = m._rectify(logits, v.flatten(2), (h, w), valid.flatten(1))
    tile = m._rectify(logits.repeat(1, 1, 1, copies), v.repeat(1, 1, 1, copies).flatten(2), (h, w * copies), valid.repeat(1, 1, copies).flatten(1))
    return logits, one, tile


def test_row_norm_makes_the_propagated_scale_invariant_to_M():
    logits, one, tile = _tiled_rectify("row", 3)
    assert torch.allclose(tile, one.repeat(1, 1, 1, 3), atol=1e-5)  # same per-pixel logits with 3x the pixels
    assert tile.abs().max() <= logits.abs().max() + 1e-5  # a weighted average of the input logits
    assert torch.equal(tile.argmax(1), one.repeat(1, 1, 1, 3).argmax(1))


def test_unnormalised_propagation_grows_with_M():
    _, one, tile = _tiled_rectify("none", 3)
    assert torch.allclose(tile, 3 * one.repeat(1, 1, 1, 3), atol=1e-4)  # eq. 4 as written: the sum triples
    conf1, conf3 = one.repeat(1, 1, 1, 3).softmax(1).amax(1), tile.softmax(1).amax(1)
    assert (conf3 >= conf1 - 1e-6).all() and conf3.mean() > conf1.mean()  # hence sharper pseudo-labels


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
