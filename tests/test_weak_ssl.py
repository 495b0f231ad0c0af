"""Weak labels on some images, nothing on the others, in one run (issue 42): SeSAM's labeled side
on a weak-to-strong base (``sesam_ssl``) and the bases' partial-CE labeled term (``data.weak``).

The combined step is the sum of its parts (SeSAM's weak-label terms in the base's scale plus the
base's unchanged unlabeled terms); with SeSAM's terms off it *is* its base (losses and gradients
over 3 steps); on dense-equivalent labels SAM labels find no pixel; a weak + unlabeled run never
reads a dense train mask; the run says what supervision it had, and bad combinations are refused
in one line."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lowlabel.api import fit
from lowlabel.config import load_config
from lowlabel.data.dataset import DatasetError, DatasetInfo
from lowlabel.data.validate import Supervision, count_cases, supervision_problems, validate_dataset
from lowlabel.engine.teachers import Teacher
from lowlabel.engine.trainer import Trainer
from lowlabel.errors import ConfigError
from lowlabel.methods import StepContext, build_method
from lowlabel.models import build_model

from .conftest import make_dataset, tiny_config
from .method_steps import NUM_CLASSES, run_steps, synthetic_batch
from .test_methods_addons import assert_same_records
from .test_weak_refine import _with_scribbles

OFF = {"lambda_sam": 0.0, "lambda_pseudo": 0.0}
# (arch, base, shared params): CE on the tiny net; on the UNet (dropout in its encoder) the ACDC recipe's Dice on pseudo-labels
SETTINGS = [("tiny", "unimatch", {"threshold": 0.4}), ("tiny", "fixmatch", {"threshold": 0.4}),
            ("unet2d", "unimatch", {"threshold": 0.4, "unlabeled_loss": "dice"}), ("unet2d", "fixmatch", {"threshold": 0.4, "unlabeled_loss": "dice"})]


# ----------------------------------------------------------------------------- the step
@pytest.mark.parametrize("arch,base,params", SETTINGS)
def test_with_sesams_terms_off_the_method_is_its_base(arch, base, params):
    """lambda_sam = lambda_pseudo = 0: no SAM labels, no strong labeled view; the labeled term is
    the base's partial CE (labeled_loss ce), the unlabeled terms the base's: same losses and
    gradients over 3 steps."""
    torch.set_num_threads(1)
    plain = run_steps(base, {**params, "labeled_loss": "ce"}, arch=arch)
    combined = run_steps("sesam_ssl", {**params, **OFF, "base": base}, arch=arch)
    assert_same_records(plain, combined)


def test_with_sesams_terms_off_the_method_is_fixmatch_with_an_ema_teacher():
    torch.set_num_threads(1)
    assert_same_records(run_steps("fixmatch", {"threshold": 0.4, "weight_u": 0.5}, teacher_kind="ema"),
                        run_steps("sesam_ssl", {"threshold": 0.4, "base": "fixmatch", "base_params": {"weight_u": 0.5}, **OFF}, teacher_kind="ema"))


def _weak(mask: torch.Tensor, every: int = 5) -> torch.Tensor:
    """A scribble-like weak label map: every ``every``-th row of the mask, 255 elsewhere."""
    weak = torch.full_like(mask, 255)
    weak[:, ::every] = mask[:, ::every]
    return weak


def _sam_labels(sid: str, shape) -> torch.Tensor:
    """Deterministic stand-in SAM labels of one image (original frame): class bands by column,
    every fourth band unlabeled (255)."""
    h, w = shape
    band = (torch.arange(w).expand(h, w) + int(sid[-1])) // 8 % (NUM_CLASSES + 1)
    return torch.where(band == NUM_CLASSES, 255, band).to(torch.uint8)


def _sesam_batch(seed: int, dense: bool = False):
    """:func:`synthetic_batch` with what SeSAM's side reads: ids, source coordinates (views = the
    original frame), a strong labeled view; weak labels (rows of the mask) unless ``dense``."""
    lab, unl = synthetic_batch(seed)
    b, s = lab["mask"].shape[0], lab["mask"].shape[-1]
    g = torch.Generator().manual_seed(seed + 7)
    lab["mask"] = lab["mask"].clamp_max(NUM_CLASSES - 1) if dense else _weak(lab["mask"])
    lab["id"] = [f"img{seed}{i}" for i in range(b)]
    lab["src_y"], lab["src_x"] = (t.expand(b, s, s).clone() for t in torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij"))
    lab["strong"] = (lab["image"] + 0.2 * torch.randn(lab["image"].shape, generator=g)).clamp(0, 1)[:, None]
    return lab, unl


def _with_fake_sam(method):
    """SeSAM's side without a promptable segmenter: ``refresh`` writes :func:`_sam_labels`."""
    calls = []

    def refresh(sid, teacher, iteration):
        calls.append((sid, iteration))
        method.bank[sid] = _sam_labels(sid, (32, 32))
        return method.bank[sid]

    method.refresh = refresh
    return calls


def test_combined_step_is_the_sum_of_its_parts():
    """UniMatch base, tiny net, student teacher: total = 0.5 (L_coarse + 1.0 L_SAM + 0.01 L_pseudo)
    + 0.125 (L_s1 + L_s2) + 0.25 L_fp; the unlabeled terms and L_coarse are UniMatch's own on the
    same batch and weights; L_SAM and L_pseudo equal their definitions recomputed by hand."""
    torch.set_num_threads(1)
    lab, unl = _sesam_batch(3)
    ctx = StepContext(0, 10, 0, 1, NUM_CLASSES)
    torch.manual_seed(0)
    net = build_model("tiny", num_classes=NUM_CLASSES, width=4)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    m = build_method("sesam_ssl", {"threshold": 0.4, "theta1": 0.0}, num_classes=NUM_CLASSES, model=net)
    calls = _with_fake_sam(m)
    torch.manual_seed(1)
    out = m.training_step(net, Teacher("self", net), lab, unl, ctx)
    assert sorted(calls) == [("img30", 0), ("img31", 0)]  # first sighting of each image: refreshed
    L, T = out.losses, out.terms
    assert list(T) == ["x", "sam", "pseudo", "s", "fp"]
    assert torch.equal(L["loss"], sum(T.values()))
    assert torch.allclose(T["x"], 0.5 * L["loss_x"]) and torch.allclose(T["sam"], 0.5 * 1.0 * L["loss_sam"])
    assert torch.allclose(T["pseudo"], 0.5 * 0.01 * L["loss_pseudo"])
    assert torch.allclose(T["s"], 0.125 * 2 * L["loss_s"]) and torch.allclose(T["fp"], 0.25 * L["loss_fp"])
    assert L["loss_sam"] > 0 and L["loss_pseudo"] > 0
    total = 0.5 * (L["loss_x"] + L["loss_sam"] + 0.01 * L["loss_pseudo"]) + 0.125 * 2 * L["loss_s"] + 0.25 * L["loss_fp"]
    assert torch.allclose(L["loss"], total)
    # the base's own terms on the same batch and initial weights (dropout draws from the same seed)
    net.load_state_dict(init)
    base = build_method("unimatch", {"threshold": 0.4, "labeled_loss": "ce"}, num_classes=NUM_CLASSES, model=net)
    torch.manual_seed(1)
    ref = base.training_step(net, Teacher("self", net), lab, unl, ctx)
    for k in ("x", "s", "fp"):
        assert torch.equal(T[k], ref.terms[k]), k
    # L_SAM and L_pseudo by hand (the tiny net has no dropout: its logits are a function of the weights)
    net.load_state_dict(init)
    net.train()
    pred_x = net(torch.cat([lab["image"], unl["image"]]))[:2]
    sam = torch.stack([_sam_labels(s, (32, 32)) for s in lab["id"]]).long()
    weak = lab["mask"]
    sam_only = torch.where(weak != 255, 255, sam)
    assert torch.allclose(L["loss_sam"], F.cross_entropy(pred_x, sam_only, ignore_index=255), atol=1e-6)
    assert torch.allclose(L["loss_x"], F.cross_entropy(pred_x, weak, ignore_index=255), atol=1e-6)
    pseudo = pred_x.detach().softmax(1).argmax(1)
    keep = (weak == 255) & (sam == 255) & lab["valid"]  # theta1 = 0: every pixel no weak or SAM label claims
    pred_s = net(lab["strong"][:, 0])
    expect = (F.cross_entropy(pred_s, pseudo, reduction="none") * keep).sum() / lab["valid"].sum()
    assert keep.any() and torch.allclose(L["loss_pseudo"], expect, atol=1e-6)
    assert out.metrics["sam_ratio"] == pytest.approx(float(((sam_only != 255) & lab["valid"]).float().mean()))
    assert "mask_ratio" in out.metrics  # the base's pseudo-label metrics are still there


def test_sesams_terms_change_the_steps():
    """The reduction test above can fail: with L_SAM on (stand-in SAM labels) the losses and the
    gradients differ from the base's."""
    torch.set_num_threads(1)
    lab, unl = _sesam_batch(3)
    records = []
    for params in (OFF, {"lambda_sam": 1.0, "lambda_pseudo": 0.0}):
        torch.manual_seed(0)
        net = build_model("tiny", num_classes=NUM_CLASSES, width=4)
        m = build_method("sesam_ssl", {"threshold": 0.4, **params}, num_classes=NUM_CLASSES, model=net)
        _with_fake_sam(m)
        torch.manual_seed(1)
        out = m.training_step(net, Teacher("self", net), lab, unl, StepContext(0, 10, 0, 1, NUM_CLASSES))
        out.losses["loss"].backward()
        records.append((out.losses["loss"].detach(), [p.grad.clone() for p in net.parameters()]))
    assert not torch.equal(records[0][0], records[1][0])
    assert any(not torch.equal(a, b) for a, b in zip(records[0][1], records[1][1]))


def test_dense_equivalent_labels_leave_sam_and_pseudo_labels_no_pixel():
    """Weak labels that cover every pixel (dense masks through data.weak): the weak labels take
    precedence everywhere, so L_SAM and L_pseudo are 0 and the step's losses are the base's
    with a CE labeled term, exactly."""
    torch.set_num_threads(1)
    lab, unl = _sesam_batch(4, dense=True)
    ctx = StepContext(0, 10, 0, 1, NUM_CLASSES)
    outs = []
    for name, params in (("sesam_ssl", {"threshold": 0.4, "theta1": 0.0}), ("unimatch", {"threshold": 0.4, "labeled_loss": "ce"})):
        torch.manual_seed(0)
        net = build_model("tiny", num_classes=NUM_CLASSES, width=4)
        m = build_method(name, params, num_classes=NUM_CLASSES, model=net)
        if name == "sesam_ssl":
            _with_fake_sam(m)
        torch.manual_seed(1)
        outs.append(m.training_step(net, Teacher("self", net), lab, unl, ctx))
    combined, base = outs
    assert combined.losses["loss_sam"] == 0 and combined.losses["loss_pseudo"] == 0
    assert combined.metrics["sam_ratio"] == 0 and combined.metrics["pseudo_ratio"] == 0 and combined.metrics["weak_ratio"] == 1
    assert torch.equal(combined.losses["loss"], base.losses["loss"])


def test_the_sam_labels_are_saved_and_restored_with_the_method():
    m = build_method("sesam_ssl", {}, num_classes=NUM_CLASSES)
    m.bank, m.seen = {"a": torch.arange(6, dtype=torch.uint8).view(2, 3)}, {"a": 3}
    state = m.state_dict()
    assert set(state) == {"bank.a", "seen.a", "base.selection.steps"}  # and the base's pseudo-label selection (its step counter)
    other = build_method("sesam_ssl", {}, num_classes=NUM_CLASSES)
    other.load_state_dict(state)
    assert torch.equal(other.bank["a"], m.bank["a"]) and other.seen == {"a": 3}


def test_params_are_sesams_and_the_bases():
    net = build_model("tiny", num_classes=NUM_CLASSES, width=4)
    m = build_method("sesam_ssl", {"base": "fixmatch", "unlabeled_loss": "dice", "base_params": {"weight_u": 0.5}}, num_classes=NUM_CLASSES, model=net)
    assert type(m.base).__name__ == "FixMatch" and (m.base.p.weight_u, m.base.p.unlabeled_loss, m.base.p.labeled_loss) == (0.5, "dice", "ce")
    d = build_method("sesam_ssl", {}, num_classes=NUM_CLASSES, model=net)
    assert type(d.base).__name__ == "UniMatch"
    assert (d.p.theta1, d.p.theta2, d.p.points, d.p.resample_every, d.p.lambda_sam, d.p.lambda_pseudo) == (0.96, 0.98, 5, 4, 1.0, 0.01)  # SeSAM sec. 4
    with pytest.raises(Exception, match="labeled_loss"):
        build_method("sesam_ssl", {"labeled_loss": "ce_dice"}, num_classes=NUM_CLASSES)  # L_coarse is SeSAM's partial CE


# ----------------------------------------------------------------------------- runs
@pytest.fixture
def weak_ssl_data(tmp_path):
    """A dataset with scribbles; 2 of its 4 train images are weakly labeled (splits/weak.txt),
    the other 2 unlabeled (splits/unl.txt)."""
    d = _with_scribbles(make_dataset(tmp_path / "src"), tmp_path / "d")
    train = (d / "splits" / "train.txt").read_text().split()
    (d / "splits" / "weak.txt").write_text("\n".join(train[:2]) + "\n")
    (d / "splits" / "unl.txt").write_text("\n".join(train[2:]) + "\n")
    return d


def _raw(root, out, method, teacher="self", **data):
    raw = tiny_config(root, out, method, teacher, iterations=3, data={"labeled": str(root / "splits" / "weak.txt"), "weak": "scribbles", **data})
    if method in ("sesam_ssl", "unimatch"):
        raw["method"]["params"] = {"threshold": 0.0, **({"labeled_loss": "ce"} if method == "unimatch" else {})}  # every pseudo-label kept: the unlabeled terms train from step 1
    return raw


def _losses(out, raw):
    lines = (out / raw["name"] / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if '"val"' not in ln]


@pytest.mark.parametrize("method", ["sesam_ssl", "unimatch"])
def test_weak_plus_unlabeled_run_trains_with_every_dense_train_mask_deleted(weak_ssl_data, tmp_path, method):
    """The weak-label contract of the combined run: the same steps with every dense train mask
    deleted (weakly labeled and unlabeled images alike; data.unlabeled_gt then finds no mask to
    measure with), and not the steps of the same run on the dense masks."""
    torch.set_num_threads(1)
    without = tmp_path / "without"
    shutil.copytree(weak_ssl_data, without)
    for i in (without / "splits" / "train.txt").read_text().split():
        (without / "masks" / f"{i}.png").unlink()
    runs = {}
    for name, root, weak in (("with", weak_ssl_data, "scribbles"), ("without", without, "scribbles"), ("dense", weak_ssl_data, None)):
        raw = _raw(root, tmp_path / f"runs-{name}", method, unlabeled=str(root / "splits" / "unl.txt"), unlabeled_gt=True)
        if weak is None:  # the same images with their dense masks: UniMatch with dense labels
            raw["data"]["weak"] = None
            raw["method"] = {"name": "unimatch", "params": {"threshold": 0.0, "labeled_loss": "ce"}}
        fit(load_config(raw=raw), progress=False)
        runs[name] = _losses(tmp_path / f"runs-{name}", raw)
        summary = json.loads((tmp_path / f"runs-{name}" / raw["name"] / "summary.json").read_text())
        assert summary["supervision"]["text"] == ("2 images scribbles" if weak else "2 images dense masks") + ", 2 images unlabeled"
    assert len(runs["with"]) == 3 and all(np.isfinite(runs["with"]))
    assert runs["with"] == runs["without"]
    assert runs["with"] != runs["dense"]


def test_the_run_says_what_supervision_it_had(weak_ssl_data, tmp_path, capsys):
    raw = _raw(weak_ssl_data, tmp_path / "runs", "sesam_ssl", case_pattern=r"^im(g)")  # every id one case
    raw["train"]["iterations"] = 1
    tr = Trainer(load_config(raw=raw), progress=False)
    assert tr.supervision == Supervision("scribbles", 2, 2, 1, 1)
    summary = tr.fit()
    assert summary["supervision"] == {"text": "1 case (2 images) scribbles, 1 case (2 images) unlabeled", "labels": "scribbles",
                                      "labeled_images": 2, "unlabeled_images": 2, "labeled_cases": 1, "unlabeled_cases": 1}
    assert json.loads((tmp_path / "runs" / raw["name"] / "summary.json").read_text())["supervision"] == summary["supervision"]
    assert "sesam_ssl on src — 1 case (2 images) scribbles, 1 case (2 images) unlabeled;" in " ".join(capsys.readouterr().out.split())
    # a labeled-only weak run has no unlabeled images, whatever the train split holds
    pce = Trainer(load_config(raw=_raw(weak_ssl_data, tmp_path / "r-pce", "pce", "none")), progress=False)
    assert pce.supervision.line() == "2 images scribbles, no unlabeled images"


def test_cases_and_the_supervision_line():
    ids = ["patient001_frame01_slice_0", "patient001_frame12_slice_3", "patient002_frame01_slice_1", "other"]
    assert count_cases(ids, r"^(patient\d+)_") == 3  # an id the pattern misses is a case of its own
    assert count_cases(ids, None) is None
    assert Supervision("scribbles", 136, 1176, 7, 63).line() == "7 cases (136 images) scribbles, 63 cases (1176 images) unlabeled"
    assert Supervision("dense masks", 1, 0).line() == "1 image dense masks, no unlabeled images"
    with pytest.raises(Exception, match="group"):
        load_config(raw=tiny_config("d", "o", data={"case_pattern": "patient"}))


def test_bad_combinations_are_refused_in_one_line(weak_ssl_data, tmp_path):
    d = weak_ssl_data
    errors = []
    (d / "splits" / "overlap.txt").write_text((d / "splits" / "weak.txt").read_text().split()[0] + "\n")
    with pytest.raises(DatasetError, match="both labeled and unlabeled") as e:  # an id weakly labeled and unlabeled
        Trainer(load_config(raw=_raw(d, tmp_path / "r1", "sesam_ssl", unlabeled=str(d / "splits" / "overlap.txt"))), progress=False)
    errors.append(e.value)
    with pytest.raises(DatasetError, match="data.weak='scribble' names no weak labels of this dataset") as e:
        Trainer(load_config(raw=_raw(d, tmp_path / "r2", "sesam_ssl", weak="scribble")), progress=False)
    errors.append(e.value)
    first = (d / "splits" / "weak.txt").read_text().split()[0]
    (d / "scribbles" / f"{first}.png").unlink()  # a weakly labeled image without its weak label file
    with pytest.raises(DatasetError, match=rf"data.weak='scribbles': 1 of 2 weakly labeled image\(s\) have no weak label file here, e.g. {first}") as e:
        Trainer(load_config(raw=_raw(d, tmp_path / "r3", "unimatch")), progress=False)
    errors.append(e.value)
    raw = _raw(d, tmp_path / "r4", "sesam_ssl")
    raw["data"]["weak"] = None
    with pytest.raises(ConfigError, match="set data.weak") as e:  # SeSAM's side reads weak labels
        Trainer(load_config(raw=raw), progress=False)
    errors.append(e.value)
    assert all("\n" not in str(err) for err in errors)
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


def test_validate_reports_the_weak_and_unlabeled_counts(weak_ssl_data):
    d = weak_ssl_data
    rep = validate_dataset(d, labeled=d / "splits" / "weak.txt", weak="scribbles", read_pixels=False)
    assert rep.ok and rep.supervision.line() == "2 images scribbles, 2 images unlabeled"
    rep = validate_dataset(d, labeled="weak", unlabeled="unl", weak="scribbles", case_pattern=r"^(img0[01])", read_pixels=False)
    assert rep.ok and rep.supervision == Supervision("scribbles", 2, 2, 2, 2)
    rep = validate_dataset(d, labeled="weak", unlabeled="train", weak="scribbles", read_pixels=False)
    assert [p.problem for p in rep.problems] == ["2 id(s) are both weakly labeled and unlabeled, e.g. img00, img01: data.labeled and data.unlabeled must not overlap"]
    rep = validate_dataset(d, labeled="weak", weak="points", read_pixels=False)
    assert not rep.ok and rep.supervision is None and "names no weak labels" in str(rep.problems[0])
    info = DatasetInfo.load(d)
    (d / "masks" / "img00.png").unlink()
    assert [p.problem for p in supervision_problems(info, ["img00", "img01"], [], None)] == ["1 of 2 labeled image(s) have no dense mask file here, e.g. img00"]
    assert supervision_problems(info, ["img00", "img01"], [], "scribbles") == []  # the weak run does not need it
    img = np.array(Image.open(d / "scribbles" / "img01.png"))
    assert (img != 255).any()  # the fixture's scribbles are real weak labels


def test_combined_run_resumes_exactly_with_its_sam_labels(weak_ssl_data, tmp_path):
    """A sesam_ssl run stopped after 2 of 5 steps and resumed ends where the uninterrupted run
    ends: the same weights, SAM labels and sightings (the bank is in the checkpoint)."""
    torch.set_num_threads(1)
    raw = _raw(weak_ssl_data, tmp_path / "a", "sesam_ssl")
    raw["train"]["iterations"] = 5
    fit(load_config(raw=raw), progress=False)
    full = torch.load(tmp_path / "a" / raw["name"] / "checkpoints" / "last.pt", weights_only=True)
    raw_b = _raw(weak_ssl_data, tmp_path / "b", "sesam_ssl")
    raw_b["train"]["iterations"] = 5
    Trainer(load_config(raw=raw_b), progress=False).fit(stop_at=2)
    run_dir = tmp_path / "b" / raw_b["name"]
    fit(resume=run_dir, progress=False)
    resumed = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("bank.") for k in full["method"]) and full["method"].keys() == resumed["method"].keys()
    for part in ("student", "method"):
        for k, v in full[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
