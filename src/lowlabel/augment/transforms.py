"""Joint augmentations on sample dicts (the UniMatch recipe), seeded by an explicit generator.

Every function takes ``rng``, a ``numpy.random.Generator``; the dataset seeds it from
``(seed, epoch, index)`` so a run is reproducible whatever the number of loader workers.

Label maps move with the image: ``mask``, ``scribble`` and ``gt`` (padding = 255, nearest resampling),
``instances`` (padding = 0), and ``valid`` (bool, False on padding) which is added by
:func:`weak` so that unlabeled losses can skip padded pixels without a fake mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..data.dataset import IGNORE_INDEX

LABEL_KEYS = {"mask": IGNORE_INDEX, "scribble": IGNORE_INDEX, "instances": 0, "valid": 0, "gt": IGNORE_INDEX}


def _labels(sample: dict) -> list[str]:
    return [k for k in LABEL_KEYS if k in sample and isinstance(sample[k], torch.Tensor)]


def rescale(sample: dict, rng: np.random.Generator, scale=(0.5, 2.0), base_size: int | None = None) -> dict:
    """Resize by a random ratio in ``scale``; with ``base_size`` the long side becomes
    ``base_size * ratio`` (UniMatch's ``resize``), otherwise the image is scaled by the ratio."""
    _, h, w = sample["image"].shape
    ratio = float(rng.uniform(*scale))
    factor = ratio * (base_size / max(h, w) if base_size else 1.0)
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    if (nh, nw) == (h, w):
        return sample
    out = dict(sample)
    out["image"] = F.interpolate(sample["image"][None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=factor < 1)[0].clamp_(0, 1)
    for k in _labels(sample):
        lab = sample[k][None, None].float()
        out[k] = F.interpolate(lab, size=(nh, nw), mode="nearest")[0, 0].to(sample[k].dtype)
    return out


def crop(sample: dict, rng: np.random.Generator, size: int) -> dict:
    """Random ``size`` x ``size`` crop; images smaller than that are padded first (image 0,
    labels with their ignore value, ``valid`` False)."""
    out = dict(sample)
    if "valid" not in out:
        out["valid"] = torch.ones(sample["image"].shape[-2:], dtype=torch.bool)
    _, h, w = out["image"].shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        out["image"] = F.pad(out["image"], (0, pw, 0, ph), value=0.0)
        for k in _labels(out):
            out[k] = F.pad(out[k], (0, pw, 0, ph), value=LABEL_KEYS[k])
        h, w = h + ph, w + pw
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    out["image"] = out["image"][:, y : y + size, x : x + size]
    for k in _labels(out):
        out[k] = out[k][y : y + size, x : x + size]
    return out


def hflip(sample: dict, rng: np.random.Generator, p: float = 0.5) -> dict:
    if rng.random() >= p:
        return sample
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    for k in _labels(sample):
        out[k] = sample[k].flip(-1)
    return out


def weak(sample: dict, rng: np.random.Generator, size: int, scale=(0.5, 2.0), base_size: int | None = None) -> dict:
    """UniMatch's weak view: random rescale, random crop with ignore padding, horizontal flip."""
    sample = dict(sample)
    sample.setdefault("valid", torch.ones(sample["image"].shape[-2:], dtype=torch.bool))
    sample = rescale(sample, rng, scale, base_size)
    sample = crop(sample, rng, size)
    sample = hflip(sample, rng)
    return {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}


def strong(image: torch.Tensor, rng: np.random.Generator, jitter=(0.5, 0.5, 0.5, 0.25), p_jitter=0.8, p_grey=0.2, p_blur=0.5, sigma=(0.1, 2.0)) -> torch.Tensor:
    """UniMatch's strong photometric view of a float [3, H, W] image: colour jitter (p=0.8),
    random grey (p=0.2), Gaussian blur with sigma in [0.1, 2.0] (p=0.5)."""
    img = image
    if rng.random() < p_jitter:
        b, c, s, hue = jitter
        ops = [
            lambda x: TF.adjust_brightness(x, float(rng.uniform(max(0, 1 - b), 1 + b))),
            lambda x: TF.adjust_contrast(x, float(rng.uniform(max(0, 1 - c), 1 + c))),
            lambda x: TF.adjust_saturation(x, float(rng.uniform(max(0, 1 - s), 1 + s))),
            lambda x: TF.adjust_hue(x, float(rng.uniform(-hue, hue))),
        ]
        for i in rng.permutation(4):
            img = ops[i](img)
    if rng.random() < p_grey:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < p_blur:
        sd = float(rng.uniform(*sigma))
        k = 2 * math.ceil(3 * sd) + 1
        img = TF.gaussian_blur(img, kernel_size=[k, k], sigma=[sd, sd])
    return img.clamp(0, 1)


def cutmix_box(h: int, w: int, rng: np.random.Generator, p: float = 0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3)) -> torch.Tensor:
    """A CutMix box as bool [h, w] (all False with probability 1 - p), area fraction in ``area``
    and aspect ratio in ``ratio`` (UniMatch's ``obtain_cutmix_box``)."""
    box = torch.zeros(h, w, dtype=torch.bool)
    if rng.random() >= p:
        return box
    for _ in range(100):
        a = rng.uniform(*area) * h * w
        r = rng.uniform(*ratio)
        bw, bh = int(math.sqrt(a / r)), int(math.sqrt(a * r))
        if 0 < bw <= w and 0 < bh <= h:
            x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box[y : y + bh, x : x + bw] = True
            return box
    return box


def mix(box: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """CutMix: ``source`` inside the box, ``target`` outside. ``box`` is bool [B, H, W];
    target/source are [B, H, W] (labels, confidences) or [B, C, H, W] (images, probabilities),
    so pixels, labels and confidences move together when mixed with the same box."""
    b = box if target.dim() == box.dim() else box.unsqueeze(1)
    return torch.where(b, source, target)


@dataclass
class LabeledTransform:
    """Weak augmentation of a labeled sample."""

    size: int
    scale: tuple[float, float] = (0.5, 2.0)
    base_size: int | None = None

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        return weak(sample, rng, self.size, self.scale, self.base_size)


@dataclass
class UnlabeledTransform:
    """The views of an unlabeled sample: ``image`` (weak view), ``strong`` [n, 3, S, S]
    (strong views of the weak view), ``cutmix`` bool [n, S, S] (one box per strong view) and
    ``valid``. ``n_strong`` = 1 for FixMatch, 2 for UniMatch."""

    size: int
    scale: tuple[float, float] = (0.5, 2.0)
    base_size: int | None = None
    n_strong: int = 2
    cutmix_p: float = 0.5

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        s = weak(sample, rng, self.size, self.scale, self.base_size)
        if self.n_strong:
            s["strong"] = torch.stack([strong(s["image"], rng) for _ in range(self.n_strong)])
            s["cutmix"] = torch.stack([cutmix_box(self.size, self.size, rng, self.cutmix_p) for _ in range(self.n_strong)])
        return s
