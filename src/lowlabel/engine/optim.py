"""Optimiser with parameter groups, and iteration-based learning-rate schedules.

The schedule is a pure function of the iteration, so resuming needs only the iteration count.
"""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def build_optimizer(cfg: OptimConfig, model, extra_modules=None) -> torch.optim.Optimizer:
    """Groups: backbone at ``lr``, head (decoder + classifier) and the method's own modules at
    ``lr * head_lr_mult``. Each group remembers its ``base_lr``."""
    groups = model.param_groups()
    extra = [p for p in (extra_modules.parameters() if extra_modules is not None else []) if p.requires_grad]
    spec = [
        {"params": groups["backbone"], "base_lr": cfg.lr, "name": "backbone"},
        {"params": groups["head"] + extra, "base_lr": cfg.lr * cfg.head_lr_mult, "name": "head"},
    ]
    spec = [g for g in spec if g["params"]]
    for g in spec:
        g["lr"] = g["base_lr"]
    if cfg.name == "sgd":
        return torch.optim.SGD(spec, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(spec, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, iteration: int, total: int) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based) of ``total``."""
    if cfg.warmup_iters and iteration < cfg.warmup_iters:
        return cfg.warmup_ratio + (1 - cfg.warmup_ratio) * iteration / cfg.warmup_iters
    t = min(max(iteration - cfg.warmup_iters, 0) / max(total - cfg.warmup_iters, 1), 1.0)
    if cfg.schedule == "poly":
        return (1 - t) ** cfg.power
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, iteration: int, total: int) -> float:
    f = lr_factor(cfg, iteration, total)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * f
    return optimizer.param_groups[0]["lr"]
