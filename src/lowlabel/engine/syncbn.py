"""Synchronised BatchNorm for every device: torch's ``SyncBatchNorm`` on GPUs, and on the CPU
(gloo) :class:`GlooSyncBatchNorm`, because torch's refuses CPU tensors ("SyncBatchNorm layers
only work with GPU modules") and CPU training with torchrun is a first-class use of lowlabel.

:class:`GlooSyncBatchNorm` is a ``BatchNorm2d`` (same parameters, buffers and state-dict keys, so
checkpoints load either way) whose training-mode forward normalises with the statistics of the
global batch: one all-reduce of the per-channel sums, sums of squares and counts, and in the
backward pass one all-reduce of the per-channel sums of the upstream gradient and of its product
with the normalised input — the standard BatchNorm backward over the global batch. Statistics are
accumulated in float64 and the arithmetic runs in float32 under bf16 autocast too. Running
statistics are updated as BatchNorm does (unbiased variance of the global batch). Outside
training, or without a process group of more than one process, it is plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        stats = torch.cat([xf.sum(dims).double(), (xf * xf).sum(dims).double(), torch.tensor([xf.numel() / c], dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats, group=group)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        invstd = (var + eps).rsqrt().float()
        xhat = (xf - mean.float().view(shape)) * invstd.view(shape)
        y = xhat * weight.float().view(shape) + bias.float().view(shape) if weight is not None else xhat
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.group, ctx.count, ctx.dims, ctx.shape, ctx.in_dtype = group, float(n), dims, shape, x.dtype
        unbiased = var * n / (n - 1).clamp_min(1)
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean.float(), unbiased.float()

    @staticmethod
    def backward(ctx, gy, _mean, _var):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, c = ctx.dims, ctx.shape, xhat.shape[1]
        gy = gy.float()
        g = gy * weight.float().view(shape) if weight is not None else gy
        sums = torch.cat([g.sum(dims), (g * xhat).sum(dims)])
        dist.all_reduce(sums, group=ctx.group)
        mean_g, mean_gx = (sums[:c] / ctx.count).view(shape), (sums[c:] / ctx.count).view(shape)
        dx = (g - mean_g - xhat * mean_gx) * invstd.view(shape)
        dw = (gy * xhat).sum(dims) if weight is not None else None
        db = gy.sum(dims) if weight is not None else None
        return dx.to(ctx.in_dtype), dw, db, None, None


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch of all processes, on any device (see the module docstring)."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world(self.process_group) < 2:
            return super().forward(x)
        y, mean, var = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps, self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean, alpha=f)
                self.running_var.mul_(1 - f).add_(var, alpha=f)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised across processes: torch's ``SyncBatchNorm`` on
    CUDA, :class:`GlooSyncBatchNorm` elsewhere (in place where possible; parameters and
    statistics kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm):
        bn = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        bn.train(module.training)
        return bn.to(module.running_mean.device if module.running_mean is not None else device)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every synchronised BatchNorm replaced by a ``BatchNorm2d`` holding its
    parameters and statistics: for an averaged teacher, whose statistics are recomputed on one
    rank's batches, where a synchronised layer would wait for the other ranks."""
    if isinstance(module, (nn.SyncBatchNorm, GlooSyncBatchNorm)):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        bn.train(module.training)
        return bn.to(module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, plain_batchnorm(child))
    return module
