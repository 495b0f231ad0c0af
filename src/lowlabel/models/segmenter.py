"""Segmentation networks behind one interface.

Every network is a :class:`Segmenter`::

    feats  = net.encode(images)            # list of multi-level features, high resolution first
    dec    = net.decode_features(feats)    # decoder feature map [B, D, h, w] (penultimate layer)
    logits = net.classify(dec, out_size)   # [B, C, *out_size]
    logits = net.decode(feats, out_size)   # = classify(decode_features(feats), out_size)
    logits = net(images)                   # any input size: padded to the stride, then cropped

Images are float [B, 3, H, W] in [0, 1]; the network normalises them itself (ImageNet mean and
std, the convention of the encoders' published weights). A network built with ``in_channels=1``
(grey data: MRI, EM, X-ray) takes the mean of the three channels — the grey level itself, since
grey images are stored as three equal channels — and normalises it with the mean of ImageNet's
means and stds, so its first layer does not carry three times the weights for one signal. With
any other ``in_channels`` (a multi-band raster, e.g. RGB + near-infrared: ``data.bands`` with that
many bands) the network takes that many channels, the first three normalised as RGB, the rest as
grey (:func:`channel_stats`). Methods perturb features as
``decode(dropout(encode(x)))`` and read ``decode_features`` (RegionMatch's region pooling,
DerProp's projection) — the model has no method-specific flags.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .instance import INSTANCE_ARCHS, build_instance_model
from .normalization import MEAN, STD



def channel_stats(in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of the input normalisation: ImageNet's for RGB; for grey (1) and
    for every band beyond the first three of a multi-band raster, the mean of ImageNet's means and
    stds (such a band is a grey image stretched to 0..1 like the others). A 2-band input is two
    grey bands."""
    grey_m, grey_s = sum(MEAN) / 3, sum(STD) / 3
    if in_channels < 3:
        return torch.full((in_channels,), grey_m), torch.full((in_channels,), grey_s)
    return (torch.tensor(MEAN + (grey_m,) * (in_channels - 3)), torch.tensor(STD + (grey_s,) * (in_channels - 3)))


# name -> smp class name. A plain dict of builders (as segment-anything's sam_model_registry).
SMP_ARCHS = {"deeplabv3plus": "DeepLabV3Plus", "unet": "Unet", "segformer": "Segformer", "fpn": "FPN"}
OWN_ARCHS = ("tiny", "unet2d")
ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mit_b0", "mit_b1", "mit_b2")


class Segmenter(nn.Module):
    """Base class: subclasses provide ``encoder``, ``decoder_net`` and ``head`` modules and set
    ``num_classes``, ``feature_channels`` (D of ``decode_features``) and ``size_divisor``."""

    num_classes: int
    feature_channels: int
    size_divisor: int = 32
    features_include_input: bool = True  # encode()[0] is the (normalised) input itself
    channels_last_pays: bool = True  # convolutions: channels_last memory format is faster (benchmarks/results/cpu-precision)

    def __init__(self, in_channels: int = 3):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        self.in_channels = in_channels
        mean, std = channel_stats(in_channels)
        self.register_buffer("mean", mean.view(1, in_channels, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, in_channels, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1 and images.shape[1] != 1:
            images = images.mean(1, keepdim=True)
        elif images.shape[1] != self.in_channels:
            raise ValueError(f"the network takes {self.in_channels} channel(s), got images with {images.shape[1]} "
                             "(model.in_channels must equal the number of data.bands)")
        return (images - self.mean) / self.std

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images float [B, 3, H, W] in [0, 1], H and W divisible by ``size_divisor``."""
        h, w = images.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(
                f"input {h}x{w} is not divisible by {self.size_divisor}; use forward() (which pads) "
                f"or a crop size that is a multiple of {self.size_divisor}"
            )
        return list(self.encoder(self.normalize(images)))

    def decode_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder_net(features)

    def classify(self, decoded: torch.Tensor, out_size) -> torch.Tensor:
        """float32 logits [B, C, *out_size] (also under bf16 / fp16 autocast: losses, softmax
        confidences and their thresholds stay float32; see :mod:`lowlabel.precision`)."""
        logits = self.head(decoded).float()
        if tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

    def decode(self, features: list[torch.Tensor], out_size) -> torch.Tensor:
        return self.classify(self.decode_features(features), out_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        k = self.size_divisor
        ph, pw = (-h) % k, (-w) % k
        x = F.pad(images, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate") if ph or pw else images
        return self.decode(self.encode(x), x.shape[-2:])[..., :h, :w]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` (encoder) and ``head`` (decoder + classifier) parameters, for the
        optimiser's learning-rate multiplier."""
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in enc}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return {"backbone": enc, "head": head}


class SmpSegmenter(Segmenter):
    """A segmentation_models_pytorch architecture split into encode/decode."""

    def __init__(self, arch: str, encoder: str, num_classes: int, in_channels: int = 3):
        super().__init__(in_channels)
        import segmentation_models_pytorch as smp

        net = getattr(smp, SMP_ARCHS[arch])(encoder_name=encoder, encoder_weights=None, classes=num_classes, in_channels=in_channels)
        self.arch, self.encoder_name, self.num_classes = arch, encoder, num_classes
        self.encoder = net.encoder
        self.decoder_net = net.decoder
        self.head = net.segmentation_head
        net.eval()
        with torch.no_grad():
            probe = self.decoder_net(self.encoder(torch.zeros(1, in_channels, 64, 64)))
        net.train()
        self.feature_channels = probe.shape[1]
        self.size_divisor = max(32, int(getattr(net.encoder, "output_stride", 32)))


class _ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class _TinyEncoder(nn.Module):
    def __init__(self, width: int, in_channels: int = 3):
        super().__init__()
        chans = [width, width * 2, width * 4, width * 8]
        self.out_channels = [in_channels] + chans
        self.stages = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.stages.append(_ConvBlock(cin, c, stride=2))
            cin = c

    def forward(self, x):
        feats = [x]
        for s in self.stages:
            x = s(x)
            feats.append(x)
        return feats


class _TinyDecoder(nn.Module):
    def __init__(self, chans: list[int], out: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out, 1) for c in chans[1:])
        self.fuse = _ConvBlock(out, out)

    def forward(self, feats):
        x = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[1:-1])):
            x = F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False) + lat(f)
        return self.fuse(x)  # stride 2


class TinySegmenter(Segmenter):
    """A small from-scratch U-Net-like network (4 stages, FPN-style decoder) for CPU tests and
    the quickstart. Same interface as the smp networks; not meant to compete with them."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 3):
        super().__init__(in_channels)
        self.arch, self.encoder_name, self.num_classes = "tiny", f"tiny{width}", num_classes
        self.encoder = _TinyEncoder(width, in_channels)
        self.feature_channels = width * 2
        self.decoder_net = _TinyDecoder(self.encoder.out_channels, self.feature_channels)
        self.head = nn.Conv2d(self.feature_channels, num_classes, 1)
        self.size_divisor = 16


class _UNetBlock(nn.Sequential):
    """conv3x3-BN-LeakyReLU, dropout, conv3x3-BN-LeakyReLU (the 2D UNet of the SSL4MIS/UniMatch
    medical benchmarks)."""

    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01, inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01, inplace=True),
        )


class _UNetEncoder(nn.Module):
    """Five levels of width w, 2w, 4w, 8w, 16w; max-pooling between them; dropout 0.05, 0.1, 0.2,
    0.3, 0.5 (level by level, as in the medical semi-supervised benchmarks' UNet)."""

    DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)

    def __init__(self, width: int, in_channels: int):
        super().__init__()
        chans = [width * 2**i for i in range(5)]
        self.out_channels = chans
        self.blocks = nn.ModuleList()
        cin = in_channels
        for c, p in zip(chans, self.DROPOUT):
            self.blocks.append(_UNetBlock(cin, c, p))
            cin = c

    def forward(self, x):
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if i else x)
            feats.append(x)
        return feats


class _UNetDecoder(nn.Module):
    """Four up-steps: a 2x2 transposed convolution halves the channels and doubles the size, the
    skip feature is concatenated, a conv block (no dropout) fuses them."""

    def __init__(self, chans: list[int]):
        super().__init__()
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in reversed(chans[1:]))
        self.blocks = nn.ModuleList(_UNetBlock(c, c // 2, 0.0) for c in reversed(chans[1:]))

    def forward(self, feats):
        x = feats[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(feats[:-1])):
            x = block(torch.cat([skip, up(x)], 1))
        return x  # full resolution, ``width`` channels


class UNet2D(Segmenter):
    """The small 2D UNet of the medical semi-supervised benchmarks (SSL4MIS, UniMatch's ACDC
    results): channels 16-32-64-128-256 at ``width=16`` (1.9 M parameters),
    trained from scratch. Written here (smp's ``Unet`` needs a classification encoder and is
    ~14 M parameters with resnet18); layout: :class:`_UNetEncoder`, :class:`_UNetDecoder`, a 3x3
    classifier. ``encode`` returns the five levels, so UniMatch's feature perturbation drops
    channels on every skip as in its medical code."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 1):
        super().__init__(in_channels)
        self.arch, self.encoder_name, self.num_classes = "unet2d", f"unet2d{width}", num_classes
        self.encoder = _UNetEncoder(width, in_channels)
        self.decoder_net = _UNetDecoder(self.encoder.out_channels)
        self.feature_channels = width
        self.head = nn.Conv2d(width, num_classes, 3, padding=1)
        self.size_divisor = 16
        self.features_include_input = False


def build_model(
    arch: str = "deeplabv3plus",
    encoder: str = "resnet18",
    num_classes: int = 2,
    pretrained: str | os.PathLike | None = None,
    width: int = 16,
    in_channels: int = 3,
    options: dict | None = None,
) -> Segmenter:
    """Build a :class:`Segmenter`.

    Args:
        arch: ``deeplabv3plus``, ``unet``, ``segformer``, ``fpn`` (segmentation_models_pytorch),
            ``unet2d`` (the small from-scratch 2D UNet of the medical benchmarks; ``width`` sets
            its first level's channels) or ``tiny`` (a small from-scratch network for tests).
            ``maskrcnn`` is the instance model (:mod:`lowlabel.models.instance`) of instance datasets;
            ``ssr-sam`` SSR-SAM's retrieval model (:mod:`lowlabel.models.ssr_sam`; ``encoder``: vit_b,
            vit_l, vit_h, vit_t or scratch; ``options``: :class:`~lowlabel.models.ssr_sam.SSRSAMOptions`;
            ``maskrcnn``'s: :class:`~lowlabel.models.instance.InstanceOptions`).
        encoder: any smp encoder name (tested: resnet18/50/101, mobilenet_v2, mit_b0); ignored by
            ``unet2d`` and ``tiny``; resnet18/34/50 for ``maskrcnn``.
        in_channels: 3 (RGB), 1 (grey: the network sees the mean of the image's channels) or
            the number of bands of a multi-band raster (RGB first; :func:`channel_stats`).
        pretrained: a local file with weights — a whole-model state dict, or an encoder-only one
            (e.g. ImageNet weights converted for the encoder); RGB weights of the first
            convolution are fitted to other ``in_channels`` (:func:`_first_conv`). Never downloads.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if options and arch != "ssr-sam" and arch not in INSTANCE_ARCHS:
        raise ValueError(f"model.options are settings of arch ssr-sam and maskrcnn; {arch} has none")
    if arch in INSTANCE_ARCHS:
        model = build_instance_model(arch, encoder, num_classes, in_channels, options)
    elif arch == "ssr-sam":
        from .ssr_sam import SSRSAM

        model = SSRSAM(num_classes, encoder, in_channels, options)
    elif arch == "tiny":
        model: Segmenter = TinySegmenter(num_classes, width, in_channels)
    elif arch == "unet2d":
        model = UNet2D(num_classes, width, in_channels)
    elif arch in SMP_ARCHS:
        try:
            model = SmpSegmenter(arch, encoder, num_classes, in_channels)
        except (KeyError, ValueError) as err:
            raise ValueError(f"unknown or unsupported encoder {encoder!r} for {arch}: {err}") from None
    else:
        raise ValueError(f"unknown model arch {arch!r}; choose from {sorted(SMP_ARCHS) + list(OWN_ARCHS) + list(INSTANCE_ARCHS) + ['ssr-sam']}")
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def _first_conv(rgb: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """RGB weights of a first convolution [O, 3, k, k] fitted to ``own``'s input channels, or None
    if they are not such weights: for grey input (1 channel) their sum over colours, which gives
    the response they had to a grey RGB image (two grey bands share it); for more bands, the RGB
    weights on the first three channels and zeros on the rest, so the pretrained network's
    response to the RGB bands is kept and the extra bands' weights are learned from zero."""
    if rgb.dim() != 4 or own.dim() != 4 or rgb.shape[1] != 3 or own.shape[1] == 3 or rgb.shape[0] != own.shape[0] or rgb.shape[2:] != own.shape[2:]:
        return None
    if own.shape[1] < 3:  # grey band(s): the grey response, shared evenly
        return (rgb.sum(1, keepdim=True) / own.shape[1]).expand_as(own).clone()
    out = torch.zeros_like(own)
    out[:, :3] = rgb
    return out


def load_pretrained(model: Segmenter, path: str | os.PathLike) -> None:
    """Load a local weights file into the whole model or, failing that, its encoder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found (lowlabel never downloads weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "student", "weights"):  # weights: a lowlabel best.pt
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    if hasattr(model, "load_weights"):  # SSR-SAM: official SAM checkpoints by their own layout
        try:
            model.load_weights(state)
        except RuntimeError as err:
            raise ValueError(f"{path}: weights do not fit ssr-sam/{model.encoder_name}: {str(err).splitlines()[0][:200]}") from None
        return
    for target in (model, getattr(model, "net", None), model.encoder, getattr(model.encoder, "model", None)):
        if target is None:
            continue
        own = target.state_dict()
        match = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        match.update({k: _first_conv(v, own[k]) for k, v in state.items() if k in own and k not in match and _first_conv(v, own[k]) is not None})
        if len(match) >= 0.9 * len(own) or (target is not model and len(match) >= 0.9 * len(state)):
            target.load_state_dict(match, strict=False)
            return
    raise ValueError(
        f"{path}: weights do not fit {model.arch}/{model.encoder_name} "
        f"(neither the whole model nor its encoder matches {len(state)} tensors)"
    )
