"""Shared helpers of the method tests: a fixed synthetic batch and a few optimiser steps of a
method, recording its losses and the student's gradients at every step (the pinned base
losses and the add-on reduction tests compare these)."""

from __future__ import annotations

import torch

from lowlabel.engine.teachers import Teacher
from lowlabel.methods import StepContext, build_method
from lowlabel.models import build_model

NUM_CLASSES = 3


def synthetic_batch(seed: int, s: int = 32, b: int = 2, n_strong: int = 2):
    """A labeled and an unlabeled batch in the engine's layout: structured masks (every class
    present, a few ignored pixels), padding in the unlabeled ``valid``, CutMix boxes in each
    strong view, and the unlabeled truth as ``gt``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")

    def masks():
        out = []
        for _ in range(b):
            cy, cx = torch.randint(8, s - 8, (2,), generator=g).tolist()
            r = int(torch.randint(4, 9, (1,), generator=g))
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            m = torch.zeros(s, s, dtype=torch.long)
            m[d2 <= (r + 3) ** 2] = 1  # a ring of class 1 around a disc of class 2
            m[d2 <= r**2] = 2
            out.append(m)
        return torch.stack(out)

    def images(m):
        return (m[:, None].float() / NUM_CLASSES + 0.3 * torch.rand(b, 3, s, s, generator=g)).clamp(0, 1)

    mask = masks()
    lab_mask = mask.clone()
    lab_mask[:, 0, :5] = 255
    lab = {"image": images(mask), "mask": lab_mask, "valid": torch.ones(b, s, s, dtype=torch.bool)}
    gt = masks()
    weak = images(gt)
    strong = (weak[:, None] + 0.2 * torch.randn(b, n_strong, 3, s, s, generator=g)).clamp(0, 1)
    cutmix = torch.zeros(b, n_strong, s, s, dtype=torch.bool)
    for i in range(b):
        for k in range(n_strong):
            y0, x0 = torch.randint(0, s // 2, (2,), generator=g).tolist()
            cutmix[i, k, y0 : y0 + s // 2, x0 : x0 + s // 3] = True
    valid = torch.ones(b, s, s, dtype=torch.bool)
    valid[:, -3:] = False  # padding rows
    unl = {"image": weak, "strong": strong, "cutmix": cutmix, "valid": valid, "gt": gt}
    return lab, unl


def run_steps(name: str, params: dict, *, arch: str = "tiny", teacher_kind: str = "self", steps: int = 3, seed: int = 0,
              total: int = 10, total_epochs: int = 2, epoch_of=lambda i: 0):
    """``steps`` SGD steps of method ``name`` on :func:`synthetic_batch` batches; per step the
    detached losses, the weighted terms and the student's gradients. The same seed gives the same
    initial weights and the same dropout draws, so two methods that compute the same thing give
    the same records."""
    torch.manual_seed(seed)
    in_ch = 1 if arch == "unet2d" else 3
    net = build_model(arch, num_classes=NUM_CLASSES, width=4, in_channels=in_ch)
    method = build_method(name, params, num_classes=NUM_CLASSES, model=net)
    teacher = Teacher(teacher_kind, net, decay=0.9)
    opt = torch.optim.SGD(list(net.parameters()) + list(method.parameters()), lr=0.05, momentum=0.9)
    torch.manual_seed(seed + 1000)  # the step's random draws (dropout) start from here
    records = []
    for i in range(steps):
        lab, unl = synthetic_batch(100 + i)
        out = method.training_step(net, teacher, lab, unl, StepContext(i, total, epoch_of(i), total_epochs, NUM_CLASSES))
        opt.zero_grad(set_to_none=True)
        out.losses["loss"].backward()
        grads = [None if p.grad is None else p.grad.detach().clone() for p in net.parameters()]
        records.append({
            "losses": {k: v.detach().clone() for k, v in out.losses.items()},
            "terms": {k: v.detach().clone() for k, v in out.terms.items()},
            "metrics": dict(out.metrics),
            "grads": grads,
        })
        opt.step()
        teacher.after_step(net)
    return records


def grad_sq(record) -> float:
    """Sum of the squared gradient entries of the student (a checksum of the gradients)."""
    return float(sum((g.double() ** 2).sum() for g in record["grads"] if g is not None))
