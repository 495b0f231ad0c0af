import copy

import pytest
import torch

from lowlabel.augment.transforms import LabeledTransform, UnlabeledTransform
from lowlabel.data.dataset import FolderDataset, collate
from lowlabel.engine.optim import build_optimizer
from lowlabel.engine.teachers import Teacher
from lowlabel.config import OptimConfig
from lowlabel.methods import METHODS, StepContext, build_method
from lowlabel.models import build_model


def batches(root, n_strong, labeled_strong=0, coords=False):
    lab = FolderDataset(root, ["img00", "img01"], transform=LabeledTransform(32, n_strong=labeled_strong), coords=coords)
    unl = FolderDataset(root, ["img02", "img03"], labeled=False, transform=UnlabeledTransform(32, n_strong=n_strong, cutmix_p=1.0))
    return collate([lab[0], lab[1]]), collate([unl[0], unl[1]]) if n_strong else None, lab


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("teacher_kind", ["self", "ema", "epoch_momentum"])
def test_method_contract_one_cpu_step(tiny_dataset, name, teacher_kind):
    torch.manual_seed(0)
    if name.startswith("ssr_sam"):  # SSR-SAM's methods train its retrieval model only
        student = build_model("ssr-sam", "scratch", 3, options={"mspg": "tiny", "img_size": 32, "train_encoder": True, "train_mspg": True, "min_prompt_pixels": 4})
    else:
        student = build_model("tiny", num_classes=3, width=4)
    method = build_method(name, {}, num_classes=3, model=student)
    teacher = Teacher(teacher_kind, student, decay=0.9)
    lab, unl, lab_set = batches(tiny_dataset, method.n_strong, method.labeled_strong, method.needs_coords)
    if method.needs_run:  # per-image state (SeSAM): the engine attaches the run's data first
        from lowlabel.config import EvalConfig
        from lowlabel.methods import RunContext

        from lowlabel.errors import ConfigError

        wanted = {"sesam": "ema", "ssr_sam": "self", "ssr_sam_labeled": "self", "sesam_ssl": None}[name]  # sesam_ssl: its base's teacher, any kind
        if wanted is not None and teacher_kind != wanted and not (wanted == "self" and teacher_kind == "none"):  # the contract for other teachers: refused before any step
            with pytest.raises(ConfigError, match=f"teacher.kind={wanted}"):
                method.attach(RunContext(lab_set, tiny_dataset.parent / "run", torch.device("cpu"), EvalConfig(tile=64), 0, teacher_kind))
            return
        method.attach(RunContext(lab_set, tiny_dataset.parent / "run", torch.device("cpu"), EvalConfig(tile=64), 0, teacher_kind))
    if method.uses_unlabeled:
        method.p = method.p.model_copy(update={"threshold": 0.0})  # so every unlabeled term is active on a random net
    t_before = copy.deepcopy(teacher.model.state_dict())
    opt = build_optimizer(OptimConfig(lr=0.1), student, method)
    out = method.training_step(student, teacher, lab, unl, StepContext(0, 10, 0, 2, 3))
    loss = out.losses["loss"]
    assert loss.requires_grad and torch.isfinite(loss)
    for k, v in out.losses.items():
        assert torch.isfinite(v), k
    opt.zero_grad()
    loss.backward()
    student_grads = [p.grad for p in student.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    if not teacher.is_student:
        assert all(p.grad is None for p in teacher.model.parameters())  # gradients only in the student
        assert all(not p.requires_grad for p in teacher.model.parameters())
    opt.step()
    # the teacher changes only as its kind says
    teacher.after_step(student)
    after_step = teacher.model.state_dict()
    changed = any(not torch.equal(t_before[k], after_step[k]) for k in t_before)
    if teacher_kind == "epoch_momentum":
        # before its first average the momentum network is the student whenever it predicts (a
        # method that asks it copies the student's current state in; the step's forward passes
        # moved the BN statistics): the trained weights reach it only through network()
        for pt, ps in zip(teacher.network().parameters(), student.parameters()):
            assert torch.equal(pt, ps)
    else:
        assert changed == (teacher_kind in ("ema", "self"))
    if teacher_kind == "epoch_momentum":
        teacher.after_epoch(student)  # the first average copies the student: no share of the init
        for pt, ps in zip(teacher.model.parameters(), student.parameters()):
            assert torch.equal(pt, ps)
        before = [p.clone() for p in teacher.model.parameters()]
        opt.step()
        teacher.after_epoch(student)  # eq. 6 from then on, on the parameters
        for p0, pt, ps in zip(before, teacher.model.parameters(), student.parameters()):
            assert torch.allclose(pt, (p0 + ps) / 2, atol=1e-6)


def test_ema_update_rule():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    t = Teacher("ema", a, decay=0.9)
    t.updates = 100  # past warm-up
    with torch.no_grad():
        for p in b.parameters():
            p.fill_(1.0)
    before = [p.clone() for p in t.model.parameters()]
    t.after_step(b)
    for p0, p1 in zip(before, t.model.parameters()):
        assert torch.allclose(p1, 0.9 * p0 + 0.1)


def test_fixmatch_threshold_masks_everything_on_uncertain_predictions(tiny_dataset):
    student = build_model("tiny", num_classes=3, width=4)
    m = build_method("fixmatch", {"threshold": 1.0}, num_classes=3)
    lab, unl, _ = batches(tiny_dataset, 1)
    out = m.training_step(student, Teacher("self", student), lab, unl, StepContext(0, 1, 0, 1, 3))
    assert out.losses["loss_s"] == 0 and out.metrics["mask_ratio"] == 0


def test_method_params_are_validated():
    with pytest.raises(Exception):
        build_method("unimatch", {"threshhold": 0.9}, num_classes=2)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("magic", {}, num_classes=2)


def test_pseudo_label_class_mean_iou_is_not_carried_by_background():
    """95 % background: labels without any foreground score 95 % pixel accuracy but a class-mean
    IoU of 47.5 % (background 0.95, foreground 0)."""
    from lowlabel.methods.base import pseudo_label_metrics

    gt = torch.zeros(1, 20, 20, dtype=torch.long)
    gt[0, :2, :10] = 1  # 20 of 400 pixels
    gt[0, 19, 19] = 255  # ignored
    none = torch.zeros_like(gt)
    conf = torch.ones(1, 20, 20)
    valid = torch.ones(1, 20, 20, dtype=torch.bool)
    m = pseudo_label_metrics(none, conf, valid, 0.5, gt)
    assert abs(m["acc_all"] - 379 / 399) < 1e-6 and abs(m["miou_all"] - (379 / 399) / 2) < 1e-6
    m = pseudo_label_metrics(gt.clamp(max=1), conf, valid, 0.5, gt)
    assert m["miou_all"] == 1.0 and m["miou_threshold"] == 1.0
    assert "miou_all" not in pseudo_label_metrics(none, conf, valid, 0.5, None)
