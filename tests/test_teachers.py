"""EMA teachers: the warm-up for a random start, none for trained weights (a pretrained model
or a burn-in's hand-over)."""

import copy

import torch

from lowlabel.engine.teachers import Teacher


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def _step(student: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)


def test_pretrained_teacher_survives_its_first_update():
    student = _net(0)
    pretrained = copy.deepcopy(student.state_dict())
    teacher = Teacher("ema", student, decay=0.9996, warmup=False)
    _step(student)
    teacher.after_step(student)
    for (k, t), s in zip(teacher.model.state_dict().items(), student.state_dict().values()):
        if t.is_floating_point():
            assert torch.allclose(t, 0.9996 * pretrained[k] + 0.0004 * s, atol=1e-6), k


def test_random_start_warms_up_and_hand_over_drops_the_warm_up():
    student = _net(0)
    teacher = Teacher("ema", student, decay=0.9996)
    _step(student)
    teacher.after_step(student)  # decay_0 = 0: the random initialisation keeps no share
    w = teacher.model[0].weight
    assert torch.equal(w, student[0].weight)
    for _ in range(3):
        _step(student)
        teacher.after_step(student)
    trained = copy.deepcopy(student)
    teacher.start_from(trained)  # S4M's end of burn-in
    _step(student)
    teacher.after_step(student)
    assert torch.allclose(teacher.model[0].weight, 0.9996 * trained[0].weight + 0.0004 * student[0].weight, atol=1e-6)
    state = teacher.state_dict()
    fresh = Teacher("ema", _net(1), decay=0.9996)
    fresh.load_state_dict(state)
    assert fresh.warmup is False and fresh.updates == teacher.updates
