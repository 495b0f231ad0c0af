"""MobileSAM (``vit_t``): SAM's prompt encoder and mask decoder with a TinyViT-5M image encoder.

lowlabel's own implementation of the MobileSAM architecture (Zhang et al. 2023), written so that
its parameter names and shapes are those of the official ``mobile_sam.pt``: the registry offers
no official MobileSAM package. TinyViT-5M as adapted by MobileSAM: embedding dims 64/128/160/320,
depths 2/2/6/2, heads 2/4/5/10, attention windows 7/7/14/7; a convolutional first stage
(MBConv blocks), windowed-attention stages with learned relative-offset attention biases and a
depthwise "local" convolution between attention and MLP; the merge into the last stage keeps the
resolution (stride 1) so a 1024 x 1024 input gives SAM's 64 x 64 x 256 embedding through the
neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d). The classification head of TinyViT
(``norm_head``, ``head``) is kept only so the official state dict loads strictly; it is unused.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: [B, 3, H, W] -> [B, dim, H/4, W/4]."""

    def __init__(self, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, dim // 2, 3, 2, 1), nn.GELU(), ConvBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (x4), 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand: float = 4.0):
        super().__init__()
        hid = int(dim * expand)
        self.conv1, self.conv2, self.conv3 = ConvBN(dim, hid), ConvBN(hid, hid, 3, 1, 1, groups=hid), ConvBN(hid, dim)
        self.act = nn.GELU()

    def forward(self, x):
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Tokens or maps -> tokens [B, L', out], through 1x1, 3x3 depthwise (``stride``), 1x1."""

    def __init__(self, resolution: tuple[int, int], dim: int, out: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.conv1, self.conv2, self.conv3 = ConvBN(dim, out), ConvBN(out, out, 3, stride, 1, groups=out), ConvBN(out, out)
        self.act = nn.GELU()

    def forward(self, x):
        if x.dim() == 3:
            h, w = self.resolution
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """Multi-head attention inside a window of w x w tokens, plus a learned bias per head for
    each (|dy|, |dx|) offset between two tokens of the window."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.key_dim = heads, dim // heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        pts = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idx = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in pts for b in pts]
        self.attention_biases = nn.Parameter(torch.zeros(heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idx).view(len(pts), len(pts)), persistent=False)

    def forward(self, x):  # [B, N, C]
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.key_dim).split(self.key_dim, dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, int(dim * ratio)), nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], heads: int, window: int):
        super().__init__()
        self.resolution, self.window = resolution, window
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = Mlp(dim)
        self.local_conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x):  # tokens [B, H*W, C]
        h, w = self.resolution
        b, n, c = x.shape
        ws = self.window
        grid = x.view(b, h, w, c)
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            grid = F.pad(grid, (0, 0, 0, pw, 0, ph))
        H, W = h + ph, w + pw
        win = grid.view(b, H // ws, ws, W // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        win = self.attn(win).view(b, H // ws, W // ws, ws, ws, c).transpose(2, 3).reshape(b, H, W, c)
        x = x + win[:, :h, :w].reshape(b, n, c)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class LayerNorm2d(nn.Module):
    def __init__(self, ch: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(ch)), nn.Parameter(torch.zeros(ch)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + self.eps) + self.bias[:, None, None]


class TinyViTEncoder(nn.Module):
    """[B, 3, 1024, 1024] (SAM-normalised, padded) -> [B, 256, 64, 64]."""

    def __init__(self, img_size: int = 1024, dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), heads=(2, 4, 5, 10), windows=(7, 7, 14, 7)):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(dims[0])
        res = img_size // 4
        strides = (2, 2, 1)  # MobileSAM: the last merge keeps 64 x 64
        self.layers = nn.ModuleList()
        for i, (d, depth) in enumerate(zip(dims, depths)):
            r = (res, res)
            down = PatchMerging(r, d, dims[i + 1], strides[i]) if i < len(dims) - 1 else None
            if i == 0:
                blocks: list[nn.Module] = [MBConv(d) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(d, r, heads[i], windows[i]) for _ in range(depth)]
            self.layers.append(Stage(blocks, down))
            if i < len(strides):
                res //= strides[i]
        self.out_res = res
        self.norm_head, self.head = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], 1000)  # unused (see module doc)
        self.neck = nn.Sequential(nn.Conv2d(dims[-1], 256, 1, bias=False), LayerNorm2d(256), nn.Conv2d(256, 256, 3, padding=1, bias=False), LayerNorm2d(256))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        return self.neck(x.transpose(1, 2).reshape(b, c, self.out_res, self.out_res))


def build_mobile_sam():
    """MobileSAM with random weights: TinyViT-5M encoder + SAM's prompt encoder and mask decoder
    (the ``segment_anything`` classes, configured as for every SAM)."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(
        image_encoder=TinyViTEncoder(),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
