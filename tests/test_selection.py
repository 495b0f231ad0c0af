"""Pseudo-label selection rules of the weak-to-strong bases (lowlabel.methods.selection), each
checked by hand on pixel maps whose statistics are known, plus the ramp-up and the seams."""

import math

import pytest
import torch

from lowlabel.methods import build_method
from lowlabel.methods.base import SelectionParams, kept_pseudo_loss
from lowlabel.methods.selection import Selection, ramp_up


def _maps(conf_rows, classes=3):
    """probs [1, C, 1, W] with the given top confidence for class 0 / 1 alternately, rest spread."""
    w = len(conf_rows)
    probs = torch.zeros(1, classes, 1, w)
    for j, (c, k) in enumerate(conf_rows):
        probs[0, :, 0, j] = (1 - c) / (classes - 1)
        probs[0, k, 0, j] = c
    conf, pseudo = probs.max(1)
    return probs, conf, pseudo, torch.ones_like(conf, dtype=torch.bool)


def test_fixed_is_the_threshold_and_has_no_state():
    sel = Selection(SelectionParams(threshold=0.9), 3)
    probs, conf, pseudo, valid = _maps([(0.95, 0), (0.5, 1), (0.91, 2)])
    keep, weight = sel.select(probs, conf, pseudo, valid)
    assert keep.tolist() == [[[True, False, True]]] and weight is None
    assert set(dict(sel.named_buffers())) == {"steps"}


def test_flexmatch_thresholds_follow_each_class_learning_effect():
    """momentum 0: sigma = this batch's confident shares; class 0 has 2 of 4 pixels above tau,
    class 1 one, class 2 none; unused = 1/4. beta = sigma / max(max sigma, unused) = (1, 1/2, 0),
    thresholds M(beta) tau = (tau, tau/3, 0)."""
    sel = Selection(SelectionParams(threshold=0.9, selection="flexmatch", selection_momentum=0.0), 3)
    probs, conf, pseudo, valid = _maps([(0.95, 0), (0.97, 0), (0.92, 1), (0.4, 2)])
    keep, _ = sel.select(probs, conf, pseudo, valid)
    assert torch.allclose(sel.class_thresholds(), torch.tensor([0.9, 0.3, 0.0]))
    assert keep.tolist() == [[[True, True, True, True]]]  # class 2's 0.4 passes its threshold 0
    probs, conf, pseudo, valid = _maps([(0.25, 1), (0.89, 0)])
    keep, _ = sel.select(probs, conf, pseudo, valid)  # now nothing above tau: sigma 0, unused 1: thresholds 0
    assert torch.allclose(sel.class_thresholds(), torch.zeros(3))


def test_freematch_scales_the_mean_confidence_by_maxnorm_of_the_class_means():
    sel = Selection(SelectionParams(selection="freematch", selection_momentum=0.0), 3)
    probs, conf, pseudo, valid = _maps([(0.9, 0), (0.6, 0), (0.8, 1), (0.5, 2)])
    sel.select(probs, conf, pseudo, valid)
    tau = conf.mean()
    p_local = probs.mean((0, 2, 3))
    expected = p_local / p_local.max() * tau
    assert torch.allclose(sel.class_thresholds(), expected)
    keep, _ = sel.select(probs, conf, pseudo, valid)
    assert torch.equal(keep, conf >= expected[pseudo])
    fresh = Selection(SelectionParams(selection="freematch"), 3)  # momentum 0.999: starts at 1 / C
    assert torch.allclose(fresh.class_thresholds(), torch.full((3,), 1 / 3))


def test_softmatch_weighs_below_the_running_mean_by_a_gaussian():
    sel = Selection(SelectionParams(selection="softmatch", selection_momentum=0.0), 3)
    probs, conf, pseudo, valid = _maps([(0.9, 0), (0.7, 1), (0.5, 2), (0.3, 0)])
    keep, weight = sel.select(probs, conf, pseudo, valid)
    mu, var = conf.mean(), conf.var()  # unbiased, as the paper's code
    assert keep.all() and float(sel.mu) == pytest.approx(float(mu)) and float(sel.var) == pytest.approx(float(var))
    expected = torch.where(conf >= mu, torch.ones_like(conf), torch.exp(-((conf - mu) ** 2) / (2 * var)))
    assert torch.allclose(weight, expected)
    # the weights reach the loss: CE terms scale by them (divided by the valid pixels as ever)
    logits = torch.randn(1, 3, 1, 4)
    ce = torch.nn.functional.cross_entropy(logits, pseudo, reduction="none")
    assert kept_pseudo_loss(logits, pseudo, weight, valid) == pytest.approx(float((ce * weight).sum() / 4))


def test_ramp_up_and_its_counter():
    assert ramp_up(0, 0) == 1.0 and ramp_up(100, 100) == 1.0
    assert ramp_up(0, 100) == pytest.approx(math.exp(-5)) and ramp_up(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    sel = Selection(SelectionParams(unlabeled_ramp=10), 3)
    probs, conf, pseudo, valid = _maps([(0.95, 0)])
    sel.select(probs, conf, pseudo, valid)
    assert sel.ramp() == pytest.approx(math.exp(-5))  # the first step: t = 0
    sel.select(probs, conf, pseudo, valid)
    assert sel.ramp() == pytest.approx(math.exp(-5 * 0.81))


def test_the_rules_are_buffers_of_the_bases_and_add_ons_and_old_checkpoints_load():
    from lowlabel.models import build_model

    model = build_model("tiny", num_classes=3, width=4)
    m = build_method("unimatch", {"selection": "freematch", "unlabeled_ramp": 100}, num_classes=3, model=model)
    assert {"selection.tau_global", "selection.p_local", "selection.steps"} <= set(m.state_dict())
    rm = build_method("regionmatch", {"base": "fixmatch", "selection": "flexmatch"}, num_classes=3, model=model)
    assert rm.base.p.selection == "flexmatch" and "base.selection.sigma" in rm.state_dict()
    old = {k: v for k, v in m.state_dict().items() if not k.startswith("selection.")}  # a checkpoint from before
    fresh = build_method("unimatch", {"selection": "freematch"}, num_classes=3, model=model)
    fresh.load_state_dict(old)
    assert int(fresh.selection.steps) == 0
    with pytest.raises(ValueError, match="selection"):
        build_method("fixmatch", {"selection": "sometimes"}, num_classes=3, model=model)
    with pytest.raises(ValueError, match="base_params"):
        build_method("derprop", {"base_params": {"selection": "softmatch"}}, num_classes=3, model=model)


@pytest.mark.parametrize("rule,loss", [("flexmatch", "ce"), ("freematch", "dice"), ("softmatch", "dice")])
def test_a_run_trains_with_each_rule_and_logs_what_it_kept(tiny_dataset, tmp_path, rule, loss):
    import json

    from lowlabel.api import fit
    from lowlabel.config import load_config

    from .conftest import tiny_config

    raw = tiny_config(tiny_dataset, tmp_path / "runs", method="unimatch", iterations=2)
    raw["method"]["params"] = {"selection": rule, "unlabeled_loss": loss, "unlabeled_ramp": 4}
    fit(load_config(raw=raw), progress=False)
    recs = [json.loads(ln) for ln in (tmp_path / "runs" / raw["name"] / "metrics.jsonl").read_text().splitlines() if "loss" in ln]
    assert [r["unlabeled_ramp"] for r in recs] == pytest.approx([math.exp(-5), math.exp(-5 * 0.75 ** 2)], abs=1e-6)  # logged to 6 places
    assert all(0.0 <= r["selected_ratio"] <= 1.0 and math.isfinite(r["loss"]) for r in recs)
    assert ("softmatch_mu" in recs[0]) == (rule == "softmatch") and ("threshold_c0" in recs[0]) == (rule != "softmatch")
