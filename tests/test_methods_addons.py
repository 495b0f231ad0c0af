"""Add-ons over a weak-to-strong base (issue 38): with its own terms off an add-on *is* its base
(same losses, same gradients, over 3 steps), its terms keep the paper's weights in the base's
scale, its parameters take the bases' loss kinds, DerProp's propagation keeps small classes at the
decoder's resolution, and the epoch-momentum network is never the random initialisation."""

import pytest
import torch
import torch.nn.functional as F

from lowlabel.engine.teachers import Teacher
from lowlabel.methods import StepContext, build_method
from lowlabel.methods.derprop import l1_normalize
from lowlabel.models import build_model

from .method_steps import NUM_CLASSES, run_steps, synthetic_batch

RM_OFF = {"prspl": False, "cir": False, "prcc": False, "region_labeled": False, "region_unlabeled": False}
DP_OFF = {"dlp": False, "kl": False}


def assert_same_records(a, b):
    assert len(a) == len(b) == 3
    for step, (ra, rb) in enumerate(zip(a, b)):
        assert set(ra["losses"]) == set(rb["losses"]), step
        for k in ra["losses"]:
            assert torch.equal(ra["losses"][k], rb["losses"][k]), (step, k)
        assert ra["terms"].keys() == rb["terms"].keys()
        for ga, gb in zip(ra["grads"], rb["grads"]):
            assert (ga is None) == (gb is None)
            if ga is not None:
                assert torch.equal(ga, gb), step


# (arch, base params): CE on the tiny net, the ACDC recipe's losses on the UNet (dropout in its encoder)
SETTINGS = [("tiny", {"threshold": 0.4}), ("unet2d", {"threshold": 0.4, "labeled_loss": "ce_dice", "unlabeled_loss": "dice"})]


@pytest.mark.parametrize("arch,params", SETTINGS)
def test_regionmatch_without_its_terms_equals_fixmatch(arch, params):
    torch.set_num_threads(1)
    base = run_steps("fixmatch", params, arch=arch)
    addon = run_steps("regionmatch", {**params, **RM_OFF, "base": "fixmatch"}, arch=arch)
    assert_same_records(base, addon)


@pytest.mark.parametrize("arch,params", SETTINGS)
def test_regionmatch_without_its_terms_equals_unimatch(arch, params):
    torch.set_num_threads(1)
    assert_same_records(run_steps("unimatch", params, arch=arch), run_steps("regionmatch", {**params, **RM_OFF, "base": "unimatch"}, arch=arch))


def test_regionmatch_without_its_terms_equals_fixmatch_with_an_ema_teacher():
    torch.set_num_threads(1)
    p = {"threshold": 0.4, "base_params": {"weight_u": 0.5}}
    assert_same_records(run_steps("fixmatch", {"threshold": 0.4, "weight_u": 0.5}, teacher_kind="ema"),
                        run_steps("regionmatch", {**p, **RM_OFF}, teacher_kind="ema"))


@pytest.mark.parametrize("arch,params", SETTINGS)
def test_derprop_without_its_terms_equals_unimatch(arch, params):
    """DerProp's momentum network only evaluates (pseudo-labels come from the student), so with
    DLP and KL off its training is UniMatch's with the student as teacher."""
    torch.set_num_threads(1)
    base = run_steps("unimatch", params, arch=arch, teacher_kind="self")
    addon = run_steps("derprop", {**params, **DP_OFF}, arch=arch, teacher_kind="epoch_momentum")
    assert_same_records(base, addon)


def test_derprop_without_its_terms_equals_fixmatch():
    torch.set_num_threads(1)
    assert_same_records(run_steps("fixmatch", {"threshold": 0.4}), run_steps("derprop", {"threshold": 0.4, **DP_OFF, "base": "fixmatch"}))


def test_reduction_tests_can_fail():
    """The comparison above sees a change of one term: RegionMatch's region classification alone
    (everything else off) changes the losses and the gradients."""
    torch.set_num_threads(1)
    base = run_steps("fixmatch", {"threshold": 0.4})
    with_lr = run_steps("regionmatch", {"threshold": 0.4, **{**RM_OFF, "region_labeled": True}})
    with pytest.raises(AssertionError):
        assert_same_records(base, with_lr)


def test_addon_terms_are_added_to_the_unchanged_base_terms_in_its_scale():
    """RegionMatch with every term on (PRSPL off, so the pixel terms see the base's mask): the
    base's terms are FixMatch's exactly on the first step, each region term is eq. 4's weight x
    the base's labeled weight (0.5), and the total is their sum (not 2x FixMatch)."""
    torch.set_num_threads(1)
    params = {"threshold": 0.4, "tau_low": 0.3, "tau_high": 0.5, "prspl": False, "region_rampup": 0.0, "min_region_pixels": 4, "max_region_share": 1.0}
    (fm,) = run_steps("fixmatch", {"threshold": 0.4}, steps=1)
    (rm,) = run_steps("regionmatch", params, steps=1)
    for k in ("x", "s"):
        assert torch.equal(fm["terms"][k], rm["terms"][k]), k
    L = rm["losses"]
    assert torch.allclose(rm["terms"]["r_l"], 0.5 * L["loss_r_l"]) and torch.allclose(rm["terms"]["r_u"], 0.5 * 0.5 * L["loss_r_u"])
    assert torch.allclose(rm["terms"]["cir"], 0.5 * 2.0 * L["loss_cir"]) and torch.allclose(rm["terms"]["prcc"], 0.5 * 1.0 * L["loss_prcc"])
    assert L["loss_r_l"] > 0 and L["loss_prcc"] > 0
    assert torch.allclose(L["loss"], sum(rm["terms"].values()))
    # with the region terms off but PRSPL on, the total is FixMatch's form (L_x + L_s) / 2 with PRSPL's mask
    (pr,) = run_steps("regionmatch", {**params, **RM_OFF, "prspl": True}, steps=1)
    assert torch.allclose(pr["losses"]["loss"], (pr["losses"]["loss_x"] + pr["losses"]["loss_s"]) / 2)
    assert set(pr["terms"]) == {"x", "s"}


def test_addons_take_the_bases_loss_kinds_and_parameters():
    net = build_model("tiny", num_classes=3, width=4)
    for name in ("regionmatch", "derprop"):
        m = build_method(name, {"labeled_loss": "ce_dice", "unlabeled_loss": "dice", "base": "unimatch",
                                "base_params": {"weight_fp": 0.3, "strong_views": 1}}, num_classes=3, model=net)
        assert (m.base.p.labeled_loss, m.base.p.unlabeled_loss, m.base.p.weight_fp, m.base.p.strong_views) == ("ce_dice", "dice", 0.3, 1)
        assert type(m.base).__name__ == "UniMatch"
        with pytest.raises(Exception, match="weight_q"):
            build_method(name, {"base_params": {"weight_q": 1.0}}, num_classes=3, model=net)
        with pytest.raises(Exception, match="own parameters"):
            build_method(name, {"base_params": {"threshold": 0.5}}, num_classes=3, model=net)
        with pytest.raises(Exception):
            build_method(name, {"unlabeled_loss": "focal"}, num_classes=3, model=net)
    # the papers' bases by default
    assert type(build_method("regionmatch", {}, num_classes=3, model=net).base).__name__ == "FixMatch"
    assert type(build_method("derprop", {}, num_classes=3, model=net).base).__name__ == "UniMatch"


def test_regionmatch_dice_pixel_loss_is_the_bases():
    torch.set_num_threads(1)
    (ce,) = run_steps("regionmatch", {"threshold": 0.4, "prspl": False}, steps=1)
    (dice,) = run_steps("regionmatch", {"threshold": 0.4, "prspl": False, "labeled_loss": "ce_dice", "unlabeled_loss": "dice"}, steps=1)
    (fm,) = run_steps("fixmatch", {"threshold": 0.4, "labeled_loss": "ce_dice", "unlabeled_loss": "dice"}, steps=1)
    assert 0 <= dice["losses"]["loss_s"] <= 1 and dice["losses"]["loss_s"] != ce["losses"]["loss_s"]
    assert torch.equal(dice["losses"]["loss_s"], fm["losses"]["loss_s"]) and torch.equal(dice["losses"]["loss_x"], fm["losses"]["loss_x"])


# ----------------------------------------------------------------------------- DerProp's propagation
def _heart_like_masks(b=4, s=128, seed=0):
    """ACDC-like label maps: ~96 % background, a left-ventricle disc (3) in a myocardium ring of
    3-4 pixels (2) and a right-ventricle crescent (1) beside it."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    out = []
    for _ in range(b):
        cy, cx = torch.randint(40, s - 40, (2,), generator=g).tolist()
        r = int(torch.randint(7, 11, (1,), generator=g))
        d = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
        m = torch.zeros(s, s, dtype=torch.long)
        rv = ((yy - cy) ** 2 + (xx - (cx - r - 6)) ** 2).float().sqrt()
        m[(rv <= r) & (d > r + 4)] = 1
        m[d <= r + 3.5] = 2
        m[d <= r] = 3
        out.append(m)
    return torch.stack(out)


def _kept_by_ideal_propagation(stride, source="decoder", norm="similarity"):
    y = _heart_like_masks()
    s = y.shape[-1]
    logits = 5 * F.one_hot(y, 4).permute(0, 3, 1, 2).float()  # correct logits
    h = s // stride
    v = F.one_hot(F.interpolate(y[:, None].float(), size=(h, h), mode="nearest")[:, 0].long(), 4).permute(0, 3, 1, 2).float()  # ideal features
    net = build_model("unet2d", num_classes=4, width=4, in_channels=1)
    m = build_method("derprop", {"feature_source": source, "propagation_norm": norm}, num_classes=4, model=net)
    pred = m._rectify(logits, l1_normalize(v), torch.ones_like(y, dtype=torch.bool)).argmax(1)
    fg = y > 0
    return float((pred[fg] == y[fg]).float().mean()), [float((pred[y == c] == c).float().mean()) for c in (1, 2, 3)]


@pytest.mark.parametrize("norm", ["similarity", "none"])
def test_propagation_of_correct_logits_with_ideal_features_keeps_the_foreground(norm):
    """At the decoder's resolution (the default feature source on the UNet: stride 1) correct
    logits propagated with ideal features keep >= 90 % of the foreground pixels' classes (the
    thin ring included); at the stride-16 bottleneck, where the old code propagated, they do not."""
    torch.set_num_threads(1)
    kept, per_class = _kept_by_ideal_propagation(1, norm=norm)
    assert kept >= 0.9 and min(per_class) >= 0.9, per_class
    coarse, coarse_per_class = _kept_by_ideal_propagation(16, "bottleneck", norm)
    assert coarse < 0.9 and coarse_per_class[1] < 0.5, coarse_per_class


def test_derprop_propagates_at_the_decoders_resolution():
    net = build_model("unet2d", num_classes=4, width=4, in_channels=1)
    m = build_method("derprop", {}, num_classes=4, model=net)
    assert m.projection[0].in_channels == net.feature_channels  # J reads decode_features
    feats = net.encode(torch.rand(1, 1, 64, 64))
    v = m._embed(net.decode_features(feats))
    assert v.shape[-2:] == (64, 64)
    assert torch.allclose(v.abs().sum(1), torch.ones(1, 64, 64), atol=1e-5)  # L1-normalised per pixel
    paper = build_method("derprop", {"feature_source": "bottleneck"}, num_classes=4, model=net)
    assert paper.projection[0].in_channels == net.encoder.out_channels[-1]


def test_derprop_logs_per_class_pseudo_label_iou():
    torch.set_num_threads(1)
    (rec,) = run_steps("derprop", {"threshold": 0.4}, teacher_kind="epoch_momentum", steps=1, epoch_of=lambda i: 1)
    m = rec["metrics"]
    for rule in ("plain", "propagated", "rectified"):
        assert 0 <= m[f"acc_{rule}"] <= 1 and 0 <= m[f"miou_{rule}"] <= 1
        per = [m[f"miou_{rule}_c{c}"] for c in range(NUM_CLASSES) if f"miou_{rule}_c{c}" in m]
        assert per and m[f"miou_{rule}"] == pytest.approx(sum(per) / len(per))
    assert "miou_rectified_confident" in m and 0 <= m["eta_ep"] <= 1
    from lowlabel.bench import is_pseudo_key

    assert all(is_pseudo_key(k) for k in m if k.startswith(("acc_", "miou_")))


def test_addons_under_bf16_autocast_keep_float32_region_and_affinity_losses():
    torch.set_num_threads(1)
    for name, params in (("regionmatch", {"threshold": 0.4, "tau_low": 0.3, "tau_high": 0.5, "min_region_pixels": 4, "max_region_share": 1.0}),
                         ("derprop", {"threshold": 0.4})):
        torch.manual_seed(0)
        net = build_model("tiny", num_classes=3, width=4)
        m = build_method(name, params, num_classes=3, model=net)
        lab, unl = synthetic_batch(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.training_step(net, Teacher("self", net), lab, unl, StepContext(1, 10, 1, 2, 3))
        for k, v in out.losses.items():
            assert torch.isfinite(v), (name, k)
        for k in ("loss_r_l", "loss_cir", "loss_prcc", "loss_der", "loss_x_prop"):
            if k in out.losses:
                assert out.losses[k].dtype == torch.float32, (name, k)
        out.losses["loss"].backward()


# ----------------------------------------------------------------------------- the momentum network
def test_epoch_momentum_network_is_never_the_random_init():
    torch.manual_seed(0)
    student = build_model("tiny", num_classes=3, width=4)
    teacher = Teacher("epoch_momentum", student)
    init = [p.clone() for p in teacher.model.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    x = torch.rand(2, 3, 32, 32)
    student.train()
    student(x).mean().backward()
    opt.step()
    # evaluated (or asked for pseudo-labels) before the first epoch ends: the student as it is now
    net = teacher.evaluation_model()
    for pt, ps, p0 in zip(net.parameters(), student.parameters(), init):
        assert torch.equal(pt, ps)
    assert any(not torch.equal(pt, p0) for pt, p0 in zip(net.parameters(), init))
    with torch.no_grad():
        assert torch.allclose(teacher.predict(x), student.eval()(x))
    student.train()
    # the first epoch end copies; from then on eq. 6, and uses no longer copy the student in
    teacher.after_epoch(student)
    first = [p.clone() for p in teacher.model.parameters()]
    opt.zero_grad()
    student(x).mean().backward()
    opt.step()
    teacher.evaluation_model()
    assert all(torch.equal(a, b) for a, b in zip(first, teacher.model.parameters()))  # stays the last average
    teacher.after_epoch(student)
    for p1, pt, ps in zip(first, teacher.model.parameters(), student.parameters()):
        assert torch.allclose(pt, (p1 + ps) / 2, atol=1e-6)
