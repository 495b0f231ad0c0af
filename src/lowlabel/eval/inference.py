"""Sliding-window inference over images of any size.

Windows are run row by row. Each row's weighted logits are added into a band buffer that spans
only the rows still open; rows that no later window touches are finalised (divided by the
weight sum) and written out. Memory therefore holds the windows in flight, one band of
``tile`` rows of class scores, and the output (labels + confidence, or probabilities when asked)
— never the full-resolution float logits of a huge image unless ``return_probs`` asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data.tiling import ArrayReader, TileGrid, WindowReader, window_weights


@dataclass
class Prediction:
    labels: np.ndarray | None  # uint8/int64 [H, W]: argmax class (None when streamed to a sink)
    confidence: np.ndarray | None  # float16 [H, W]: max softmax probability (None when streamed)
    probs: torch.Tensor | None = None  # float32 [C, H, W] when return_probs=True


class Resized(torch.nn.Module):
    """``model`` applied to images resized whole to ``size`` x ``size`` (bilinear), its logits
    resized back to the input's size (bilinear): prediction for a model trained on whole
    resized images (``data.resize``), as UniMatch's medical evaluation zooms each slice to the
    training size and back."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], size: int):
        super().__init__()
        self.model, self.size = model, int(size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        x = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return torch.nn.functional.interpolate(self.model(x), size=(h, w), mode="bilinear", align_corners=False)


def for_eval(model, eval_cfg):
    """The callable that evaluation and prediction tile over: ``model`` itself, or
    :class:`Resized` when ``eval_cfg.resize`` is set."""
    return Resized(model, eval_cfg.resize) if getattr(eval_cfg, "resize", None) else model


def _channels(model) -> int:
    """How many channels of an array the network takes: 3 for RGB and grey networks (a grey one
    averages them), ``in_channels`` for a multi-band one (also behind :class:`Resized`)."""
    c = getattr(model, "in_channels", None) or getattr(getattr(model, "model", None), "in_channels", None) or 3
    return 3 if c in (1, 3) else int(c)


@torch.no_grad()
def sliding_window(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray | torch.Tensor | WindowReader,
    num_classes: int,
    *,
    tile: int = 512,
    overlap: int | float = 0.25,
    weighting: str = "gaussian",
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    return_probs: bool = False,
    progress: Callable[[int, int], None] | None = None,
    sink: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> Prediction:
    """Predict a whole image window by window.

    Args:
        model: maps float images [B, 3, h, w] in [0, 1] (a multi-band network: [B, in_channels,
            h, w]) to logits [B, C, h, w].
        image: uint8 [H, W, 3] array, float [3, H, W] tensor in [0, 1], or a window reader (or
            the same with a multi-band network's channels).
        num_classes: C.
        tile, overlap: the :class:`TileGrid`.
        weighting: ``gaussian`` or ``uniform`` stitching weights; softmax probabilities of
            overlapping windows are averaged with these weights.
        return_probs: also return the stitched probabilities [C, H, W] (memory: 4*C*H*W bytes).
        sink: ``sink(y0, labels_rows, confidence_rows)`` receives each band of finished rows,
            top to bottom, instead of the result holding them (memory then stays flat: write
            the rows to disk as they come).
    """
    if isinstance(image, torch.Tensor):
        arr = (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        reader: WindowReader = ArrayReader(arr, _channels(model))
    elif isinstance(image, np.ndarray):
        reader = ArrayReader(image, _channels(model))
    else:
        reader = image
    H, W = reader.height, reader.width
    grid = TileGrid(H, W, tile, overlap)
    th, tw = min(tile, H), min(tile, W)
    wt = window_weights(th, tw, weighting).to(device)
    dtype = np.uint8 if num_classes <= 255 else np.int64
    labels = None if sink else np.zeros((H, W), dtype=dtype)
    conf = None if sink else np.zeros((H, W), dtype=np.float16)
    probs_out = torch.zeros(num_classes, H, W) if return_probs else None

    band = torch.zeros(num_classes, 0, W, device=device)  # rows [band_top, band_top + band.shape[1])
    band_w = torch.zeros(0, W, device=device)
    band_top = 0
    rows = list(grid.rows())
    done = 0

    def flush(upto: int) -> None:
        nonlocal band, band_w, band_top
        n = upto - band_top
        if n <= 0:
            return
        p = band[:, :n] / band_w[:n].clamp_min(1e-12)
        c, lab = p.max(0)
        lab_np, c_np = lab.cpu().numpy().astype(dtype), c.cpu().numpy().astype(np.float16)
        if sink:
            sink(band_top, lab_np, c_np)
        else:
            labels[band_top:upto] = lab_np
            conf[band_top:upto] = c_np
        if probs_out is not None:
            probs_out[:, band_top:upto] = p.cpu()
        band, band_w, band_top = band[:, n:], band_w[n:], upto

    for r, (y0, windows) in enumerate(rows):
        need = y0 + th - (band_top + band.shape[1])
        if need > 0:
            band = torch.cat([band, torch.zeros(num_classes, need, W, device=device)], 1)
            band_w = torch.cat([band_w, torch.zeros(need, W, device=device)], 0)
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            batch = np.stack([reader.read(y, x, h, w) for (y, x, h, w) in chunk])
            x_in = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            logits = model(x_in)
            if logits.shape[1] != num_classes or logits.shape[-2:] != (th, tw):
                raise ValueError(f"model returned {tuple(logits.shape)}, expected [B, {num_classes}, {th}, {tw}]")
            p = logits.float().softmax(1) * wt
            for k, (y, x, h, w) in enumerate(chunk):
                band[:, y - band_top : y - band_top + h, x : x + w] += p[k]
                band_w[y - band_top : y - band_top + h, x : x + w] += wt
            done += len(chunk)
            if progress:
                progress(done, len(grid))
        next_top = rows[r + 1][0] if r + 1 < len(rows) else H
        flush(next_top)
    return Prediction(labels, conf, probs_out)
