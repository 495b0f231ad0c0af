"""Joint augmentations on sample dicts (the UniMatch recipe), seeded by an explicit generator.

Every function takes ``rng``, a ``numpy.random.Generator``; the dataset seeds it from
``(seed, epoch, index)`` so a run is reproducible whatever the number of loader workers.

Label maps move with the image: ``mask`` and ``gt`` (padding = 255, nearest resampling),
``weight`` (per-pixel loss weights 0..255, padding = 0), ``src_y`` / ``src_x`` (each pixel's
row and column in the untransformed image, padding = -1: how a method maps a per-image map kept
in the original frame, e.g. SeSAM's SAM labels, onto the augmented view),
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

LABEL_KEYS = {"mask": IGNORE_INDEX, "weight": 0, "instances": 0, "valid": 0, "gt": IGNORE_INDEX, "src_y": -1, "src_x": -1}
WIDE_KEYS = ("instances", "src_y", "src_x")  # label maps whose values exceed uint8 (rotated as int32)


def _labels(sample: dict) -> list[str]:
    return [k for k in LABEL_KEYS if k in sample and isinstance(sample[k], torch.Tensor)]


def _scaled_size(h: int, w: int, rng: np.random.Generator, scale, base_size: int | None) -> tuple[float, int, int]:
    ratio = float(rng.uniform(*scale))
    factor = ratio * (base_size / max(h, w) if base_size else 1.0)
    return factor, max(1, int(round(h * factor))), max(1, int(round(w * factor)))


def _resize(sample: dict, nh: int, nw: int, factor: float) -> dict:
    _, h, w = sample["image"].shape
    if (nh, nw) == (h, w):
        return sample
    out = dict(sample)
    out["image"] = F.interpolate(sample["image"][None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=factor < 1)[0].clamp_(0, 1)
    for k in _labels(sample):
        lab = sample[k][None, None].float()
        out[k] = F.interpolate(lab, size=(nh, nw), mode="nearest")[0, 0].to(sample[k].dtype)
    return out


def rescale(sample: dict, rng: np.random.Generator, scale=(0.5, 2.0), base_size: int | None = None) -> dict:
    """Resize by a random ratio in ``scale``; with ``base_size`` the long side becomes
    ``base_size * ratio`` (UniMatch's ``resize``), otherwise the image is scaled by the ratio."""
    _, h, w = sample["image"].shape
    factor, nh, nw = _scaled_size(h, w, rng, scale, base_size)
    return _resize(sample, nh, nw, factor)


def _source_index(start: int, n: int, in_size: int, out_size: int, bilinear: bool):
    """PyTorch's own source coordinates (``align_corners=False``) of output pixels
    ``start .. start + n - 1`` when resizing ``in_size`` to ``out_size``: nearest indices, or
    the two bilinear neighbours and the weight of the second one."""
    sc = torch.tensor(in_size / out_size, dtype=torch.float32)
    dst = torch.arange(start, start + n, dtype=torch.float32)
    if not bilinear:
        return (dst * sc).floor().long().clamp_(max=in_size - 1)
    src = ((dst + 0.5) * sc - 0.5).clamp_(min=0)
    i0 = src.long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    return i0, i1, src - i0


def rescale_crop(sample: dict, rng: np.random.Generator, size: int, scale=(0.5, 2.0), base_size: int | None = None) -> dict:
    """``crop(rescale(sample))`` with the same random draws and the same pixels, but when the
    image is enlarged only the ``size`` x ``size`` window that the crop keeps is interpolated
    (PyTorch's bilinear / nearest source coordinates, computed for those rows and columns).
    Enlarging a whole 1.2-megapixel dubai-aerial tile twofold to keep 256 x 256 of it took 0.26 s
    on one core; the window took 0.013 s (the cost grows with the image, so more on larger ones).
    Shrinking (antialiased) still resizes the whole image, which is cheap because the output is
    small."""
    sample = dict(sample)
    sample.setdefault("valid", torch.ones(sample["image"].shape[-2:], dtype=torch.bool))
    _, h, w = sample["image"].shape
    factor, nh, nw = _scaled_size(h, w, rng, scale, base_size)
    if nh <= h and nw <= w:
        return crop(_resize(sample, nh, nw, factor), rng, size)
    y = int(rng.integers(0, max(nh, size) - size + 1))
    x = int(rng.integers(0, max(nw, size) - size + 1))
    hv, wv = min(size, nh - y), min(size, nw - x)  # the part of the window inside the image
    out = dict(sample)
    r0, r1, ry = _source_index(y, hv, h, nh, True)
    c0, c1, cx = _source_index(x, wv, w, nw, True)
    img = sample["image"]
    top, bot = img[:, r0], img[:, r1]
    ry, cx = ry[:, None], cx[None, :]
    win = (1 - ry) * ((1 - cx) * top[:, :, c0] + cx * top[:, :, c1]) + ry * ((1 - cx) * bot[:, :, c0] + cx * bot[:, :, c1])
    out["image"] = F.pad(win.clamp_(0, 1), (0, size - wv, 0, size - hv), value=0.0)
    rn, cn = _source_index(y, hv, h, nh, False), _source_index(x, wv, w, nw, False)
    for k in _labels(sample):
        out[k] = F.pad(sample[k][rn][:, cn], (0, size - wv, 0, size - hv), value=LABEL_KEYS[k])
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


def resize_whole(sample: dict, size: int) -> dict:
    """The whole image resized to ``size`` x ``size`` (no crop: UniMatch's medical recipe, which
    zooms every ACDC slice to 256 x 256). Labels nearest; the image bilinear, antialiased when
    shrinking (the reference zooms the image with order 0 too; bilinear is the stated deviation)."""
    sample = dict(sample)
    sample.setdefault("valid", torch.ones(sample["image"].shape[-2:], dtype=torch.bool))
    _, h, w = sample["image"].shape
    return _resize(sample, size, size, min(size / h, size / w))


def rotate_medical(sample: dict, rng: np.random.Generator, max_angle: float = 20.0) -> dict:
    """UniMatch's medical augmentation: with p = 0.5 a random rot90 (k in 0..3) and a flip along
    a random axis; otherwise, with p = 0.5, a rotation by a random angle in [-max_angle,
    max_angle] degrees about the centre (image bilinear, filled with 0; labels nearest, filled
    with their ignore value and ``valid`` False, where the reference fills masks with
    background)."""
    sample = dict(sample)
    sample.setdefault("valid", torch.ones(sample["image"].shape[-2:], dtype=torch.bool))
    keys = ["image"] + _labels(sample)
    if rng.random() > 0.5:
        k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
        for key in keys:
            sample[key] = sample[key].rot90(k, dims=(-2, -1)).flip(-2 + axis)
    elif rng.random() > 0.5:
        angle = float(rng.uniform(-max_angle, max_angle))
        sample["image"] = TF.rotate(sample["image"], angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        for key in _labels(sample):
            lab = sample[key][None]
            rot = TF.rotate(lab.to(torch.int32 if key in WIDE_KEYS else torch.uint8), angle, interpolation=TF.InterpolationMode.NEAREST, fill=LABEL_KEYS[key])
            sample[key] = rot[0].to(sample[key].dtype)
    return sample


def weak(sample: dict, rng: np.random.Generator, size: int, scale=(0.5, 2.0), base_size: int | None = None, *, resize: bool = False, rotate: str = "none") -> dict:
    """UniMatch's weak view: random rescale, random crop with ignore padding, horizontal flip.
    With ``resize`` the whole image is resized to ``size`` instead of rescaled and cropped; with
    ``rotate="medical"`` :func:`rotate_medical` comes first and replaces the horizontal flip
    (its flips cover it) — UniMatch's recipe for ACDC."""
    if rotate == "medical":
        sample = rotate_medical(sample, rng)
    elif rotate != "none":
        raise ValueError(f"unknown rotation {rotate!r}; choose 'none' or 'medical'")
    sample = resize_whole(sample, size) if resize else rescale_crop(sample, rng, size, scale, base_size)
    if rotate == "none":
        sample = hflip(sample, rng)
    return {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}


def strong(image: torch.Tensor, rng: np.random.Generator, jitter=(0.5, 0.5, 0.5, 0.25), p_jitter=0.8, p_grey=0.2, p_blur=0.5, sigma=(0.1, 2.0)) -> torch.Tensor:
    """UniMatch's strong photometric view of a float [3, H, W] image: colour jitter (p=0.8),
    random grey (p=0.2), Gaussian blur with sigma in [0.1, 2.0] (p=0.5).

    A multi-band image [C, H, W] (C != 3, ``data.bands``) gets the same view with the same random
    draws: the colour operations (saturation, hue, grey) act on its first three channels, the
    RGB bands by convention, and not at all on a 1- or 2-band image; brightness and contrast act
    on every other band too, with the same factor, each band's contrast about its own mean (as a
    grey image's); the blur on all channels. UniMatch defines the view for RGB only: this is
    lowlabel's extension."""
    rgb, rest = (image[:3], image[3:]) if image.shape[0] >= 3 else (None, image)

    def on(fn, colour_only: bool) -> None:
        nonlocal rgb, rest
        if rgb is not None:
            rgb = fn(rgb)
        if not colour_only and rest.shape[0]:
            rest = fn(rest[:, None])[:, 0]  # each extra band as a grey image

    if rng.random() < p_jitter:
        b, c, s, hue = jitter
        ops = [  # (draw the factor, apply it, colour only)
            (lambda: float(rng.uniform(max(0, 1 - b), 1 + b)), TF.adjust_brightness, False),
            (lambda: float(rng.uniform(max(0, 1 - c), 1 + c)), TF.adjust_contrast, False),
            (lambda: float(rng.uniform(max(0, 1 - s), 1 + s)), TF.adjust_saturation, True),
            (lambda: float(rng.uniform(-hue, hue)), TF.adjust_hue, True),
        ]
        for i in rng.permutation(4):
            draw, fn, colour_only = ops[i]
            f = draw()
            on(lambda x: fn(x, f), colour_only)
    if rng.random() < p_grey and rgb is not None:
        rgb = TF.rgb_to_grayscale(rgb, num_output_channels=3)
    img = rest if rgb is None else (torch.cat([rgb, rest]) if rest.shape[0] else rgb)
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
    """Weak augmentation of a labeled sample; with ``n_strong``, also ``strong`` [n, 3, S, S]
    photometric strong views of it (same geometry; for methods that pseudo-label their weakly
    labeled images, e.g. SeSAM)."""

    size: int
    scale: tuple[float, float] = (0.5, 2.0)
    base_size: int | None = None
    resize: bool = False
    rotate: str = "none"
    n_strong: int = 0

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        s = weak(sample, rng, self.size, self.scale, self.base_size, resize=self.resize, rotate=self.rotate)
        if self.n_strong:
            s["strong"] = torch.stack([strong(s["image"], rng) for _ in range(self.n_strong)])
        return s


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
    resize: bool = False
    rotate: str = "none"

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        s = weak(sample, rng, self.size, self.scale, self.base_size, resize=self.resize, rotate=self.rotate)
        if self.n_strong:
            s["strong"] = torch.stack([strong(s["image"], rng) for _ in range(self.n_strong)])
            s["cutmix"] = torch.stack([cutmix_box(self.size, self.size, rng, self.cutmix_p) for _ in range(self.n_strong)])
        return s
