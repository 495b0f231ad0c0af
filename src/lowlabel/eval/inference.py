"""Sliding-window inference over images of any size.

Windows are run row by row, left to right. Their weighted softmax scores are summed in a strip
that spans one row of windows and only the columns still open; columns that no later window of
the row touches are closed: their rows that no later row of windows touches are final (divided by
the weight sum, labels and confidence kept), the overlap rows are carried to the next row.
Memory therefore holds the windows in flight, the carried overlap (C x overlap rows x width
floats; the edge-aligned last row of windows can overlap its predecessor by more than
``overlap``) and one row of finished labels — never the full-resolution float scores of a huge image
unless ``return_probs`` asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data.tiling import ArrayReader, TileGrid, WindowReader, window_weights
from ..precision import Precision


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
    precision: Precision | None = None,
) -> Prediction:
    """Predict a whole image window by window.

    Args:
        model: maps float images [B, 3, h, w] in [0, 1] (a multi-band network: [B, in_channels,
            h, w]) to logits [B, C, h, w].
        image: uint8 [H, W, 3] array, float [3, H, W] tensor in [0, 1], or a window reader (or
            the same with a multi-band network's channels).
        num_classes: C.
        tile, overlap: the :class:`TileGrid` (a :class:`Resized` model takes the whole image as
            one window, whatever ``tile``).
        weighting: ``gaussian`` or ``uniform`` stitching weights; softmax probabilities of
            overlapping windows are averaged with these weights.
        return_probs: also return the stitched probabilities [C, H, W] (memory: 4*C*H*W bytes).
        sink: ``sink(y0, labels_rows, confidence_rows)`` receives each band of finished rows,
            top to bottom, instead of the result holding them (memory then stays flat: write
            the rows to disk as they come).
        precision: the model runs under its autocast, on channels_last windows where it says so
            (None: fp32); probabilities are stitched in float32 whatever the precision.
    """
    if isinstance(image, torch.Tensor):
        arr = (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        reader: WindowReader = ArrayReader(arr, _channels(model))
    elif isinstance(image, np.ndarray):
        reader = ArrayReader(image, _channels(model))
    else:
        reader = image
    H, W = reader.height, reader.width
    if isinstance(model, Resized):  # a model of whole resized images: the image is one window, resized whole
        tile = max(H, W)
    grid = TileGrid(H, W, tile, overlap)
    th, tw = min(tile, H), min(tile, W)
    wt = window_weights(th, tw, weighting).to(device)
    dtype = np.uint8 if num_classes <= 255 else np.int64
    labels = None if sink else np.zeros((H, W), dtype=dtype)
    conf = None if sink else np.zeros((H, W), dtype=np.float16)
    probs_out = torch.zeros(num_classes, H, W) if return_probs else None

    # Scores are summed in a strip: the current row of windows' rows [y0, y0 + th) and only the
    # columns still open, [s0, s0 + strip width). When the next window starts at column x, the
    # strip's columns left of x are complete for this row of windows: their rows above the next
    # row of windows are final (labels and confidence into the row buffers), the rest (the
    # overlap with the next row) go to `carry`, from which the next row's strip starts. What
    # grows with the image width is `carry` (C x overlap rows x W floats) and the finished rows
    # (3 bytes a pixel); what grows with its height, nothing.
    rows = list(grid.rows())
    keep_max = max([th - (b[0] - a[0]) for a, b in zip(rows, rows[1:])] or [0])
    carry = torch.zeros(num_classes, keep_max, W, device=device)
    carry_w = torch.zeros(keep_max, W, device=device)
    done = 0
    for r, (y0, windows) in enumerate(rows):
        next_top = rows[r + 1][0] if r + 1 < len(rows) else H
        n, keep_in = next_top - y0, (th - (y0 - rows[r - 1][0]) if r else 0)
        keep_out = th - n
        lab_rows, conf_rows = np.empty((n, W), dtype), np.empty((n, W), np.float16)
        strip = torch.zeros(num_classes, th, 0, device=device)
        strip_w = torch.zeros(th, 0, device=device)
        s0 = 0

        def extend(upto: int) -> None:  # open the columns [s0 + strip width, upto), carrying the previous row's sums
            nonlocal strip, strip_w
            a = s0 + strip.shape[2]
            if upto <= a:
                return
            new, new_w = torch.zeros(num_classes, th, upto - a, device=device), torch.zeros(th, upto - a, device=device)
            new[:, :keep_in], new_w[:keep_in] = carry[:, :keep_in, a:upto], carry_w[:keep_in, a:upto]
            strip, strip_w = torch.cat([strip, new], 2), torch.cat([strip_w, new_w], 1)

        def finish(upto: int) -> None:  # close the columns [s0, upto)
            nonlocal strip, strip_w, s0
            k = upto - s0
            if k <= 0:
                return
            p = strip[:, :n, :k] / strip_w[:n, :k].clamp_min(1e-12)
            c, lab = p.max(0)
            lab_rows[:, s0:upto], conf_rows[:, s0:upto] = lab.cpu().numpy(), c.cpu().numpy()
            if probs_out is not None:
                probs_out[:, y0 : y0 + n, s0:upto] = p.cpu()
            if keep_out > 0:
                carry[:, :keep_out, s0:upto], carry_w[:keep_out, s0:upto] = strip[:, n:, :k], strip_w[n:, :k]
            strip, strip_w, s0 = strip[:, :, k:], strip_w[:, k:], upto

        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            batch = np.stack([reader.read(y, x, h, w) for (y, x, h, w) in chunk])
            x_in = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            if precision is not None:
                with precision.autocast():
                    logits = model(precision.images(x_in))
            else:
                logits = model(x_in)
            if logits.shape[1] != num_classes or logits.shape[-2:] != (th, tw):
                raise ValueError(f"model returned {tuple(logits.shape)}, expected [B, {num_classes}, {th}, {tw}]")
            p = logits.float().softmax(1) * wt
            extend(max(x + w for (_, x, _, w) in chunk))
            for k, (y, x, h, w) in enumerate(chunk):
                strip[:, :, x - s0 : x - s0 + w] += p[k]
                strip_w[:, x - s0 : x - s0 + w] += wt
            finish(windows[i + batch_size][1] if i + batch_size < len(windows) else W)
            done += len(chunk)
            if progress:
                progress(done, len(grid))
        if sink:
            sink(y0, lab_rows, conf_rows)
        else:
            labels[y0:next_top], conf[y0:next_top] = lab_rows, conf_rows
    return Prediction(labels, conf, probs_out)
