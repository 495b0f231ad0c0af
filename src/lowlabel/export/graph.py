"""What an exported file computes, as torch modules that trace into a graph with dynamic sizes.

``SemanticGraph(net)``: images float32 [B, C, H, W] in [0, 1] -> float32 logits [B, K, H, W]
for any B and any H, W >= ``net.size_divisor``. It pads the bottom and right edges to a multiple
of the stride by reflection, runs the network (whose ``normalize`` — ImageNet mean and std, or the
grey / multi-band statistics of :func:`lowlabel.models.segmenter.channel_stats` — is part of the
traced graph) and crops the logits back to H x W. This is what :meth:`Segmenter.forward` does for
such sizes, written so that tracing records the pad amounts as functions of the input's shape
instead of constants: ``Segmenter.forward`` skips the pad with a Python ``if`` (a traced graph
would keep the example's branch) and picks ``replicate`` padding for images smaller than the
stride, which only :class:`lowlabel.export.runtime.ExportedModel` handles (outside the graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SemanticGraph(nn.Module):
    """A :class:`~lowlabel.models.segmenter.Segmenter` padded to its stride and cropped back, with
    shapes that stay symbolic under tracing (see the module docstring)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.k = int(net.size_divisor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2], images.shape[-1]
        ph, pw = (self.k - h % self.k) % self.k, (self.k - w % self.k) % self.k  # 0 where already a multiple
        x = F.pad(images, (0, pw, 0, ph), mode="reflect")
        logits = self.net.decode(self.net.encode(x), x.shape[-2:])
        return logits[:, :, :h, :w]


class RetrievalGraph(nn.Module):
    """An SSR-SAM model (:class:`lowlabel.models.ssr_sam.SSRSAM`) with its prompt bank as it is
    now: images float32 [1, 3, H, W] in [0, 1], H and W at most the encoder's side, -> class
    logits [1, K, H, W] (a class without prompts: -1e4 everywhere). One image a call: the model
    decodes image by image in a Python loop, which tracing unrolls for the example's batch."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).float()
