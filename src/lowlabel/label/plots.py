"""The pictures that explain a suggestion: an overview of the picks and one heat map per picked
image (its prediction beside its uncertainty map, titled with its score)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.dataset import as_rgb
from ..utils import progress_bar
from . import strategies as S
from .tiles import open_unit

DISPLAY_SIDE = 768  # heat maps are drawn at most this many pixels on the long side
THUMB_SIDE = 192

UNITS = {"entropy": "nats", "predictive_entropy": "nats", "expected_entropy": "nats", "mutual_information": "nats",
         "balanced_entropy": "class-weighted nats", "margin": "1 - (p1 - p2)", "balanced_margin": "weighted 1 - (p1 - p2)"}


def _shrink(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    f = min(1.0, side / max(h, w))
    if f == 1.0:
        return img
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR if img.ndim == 3 else Image.NEAREST))


def _shrink_map(m: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    if tuple(m.shape) == tuple(shape):
        return m.float().numpy()
    return F.interpolate(m.float()[None, None], size=shape, mode="area")[0, 0].numpy()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def heatmap_figure(image: np.ndarray, overlay: np.ndarray, pixel_map: np.ndarray, title: str, term: str):
    """Prediction (left) and uncertainty heat map over the grey image (right), with a colour bar."""
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    fig = Figure(figsize=(2 * 4.2 * min(2.0, w / max(h, 1)) + 1.2, 4.6))
    a, b = fig.subplots(1, 2)
    a.imshow(overlay)
    a.set_title("prediction", fontsize=9)
    grey = image.mean(2) if image.ndim == 3 else image
    b.imshow(grey, cmap="gray")
    hm = b.imshow(pixel_map, cmap="magma", alpha=0.65, vmin=0.0, vmax=max(float(pixel_map.max()), 1e-6))
    b.set_title(f"{term} ({UNITS.get(term, 'score')})", fontsize=9)
    for ax in (a, b):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(hm, ax=b, fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_explanations(result, base: Path, run, info, images: dict, units: dict, scorer, *, limit: int, rows: int, progress: bool = False) -> dict:
    """``<base>.heatmaps/<id>.png`` for the picked images (at most ``limit``) and the overview
    ``<base>.png`` (one row per pick, at most ``rows``: the unit's highest-scoring image)."""
    from matplotlib.figure import Figure

    folder = Path(f"{base}.heatmaps")
    rank = {r["id"]: r["rank"] for r in result.rows}
    todo = [(u, i) for u in result.picks for i in sorted(units[u])][:limit]
    thumbs: dict[str, tuple] = {}
    written = 0
    with progress_bar("heat maps", len(todo), enabled=progress) as adv:
        for u, sid in todo:
            smap, terms, probs = scorer.pixel_maps(sid, images[sid])
            term = next(iter(terms))
            score = S.image_score(smap)
            reader = open_unit(images[sid], *run.raster_options())
            img = as_rgb(reader.read(0, 0, reader.height, reader.width))
            labels = probs.argmax(0).numpy().astype(np.uint8)
            disp = _shrink(img, DISPLAY_SIDE)
            lab = _shrink(labels, DISPLAY_SIDE)
            m = _shrink_map(smap, disp.shape[:2])
            where = f"case {u}, " if u != sid else ""
            title = f"{sid}: {term} {score:.4g} ({where}rank {rank[u]} of {len(result.queue)}, {result.strategy})"
            fig = heatmap_figure(disp, run.overlay(disp, lab), m, title, term)
            _save(fig, folder / f"{sid}.png")
            written += 1
            if u not in thumbs or score > thumbs[u][0]:
                t = _shrink(img, THUMB_SIDE)
                thumbs[u] = (score, sid, t, run.overlay(t, _shrink(labels, THUMB_SIDE)), _shrink_map(smap, t.shape[:2]), term)
            adv()
    shown = [u for u in result.picks if u in thumbs][:rows]
    fig = Figure(figsize=(9, 2.9 * len(shown) + 0.4))
    axes = np.atleast_2d(fig.subplots(len(shown), 3, squeeze=False))
    vmax = max(float(thumbs[u][4].max()) for u in shown) or 1e-6  # one colour scale: the rows compare
    for k, u in enumerate(shown):
        score, sid, t, ov, m, term = thumbs[u]
        a, b, c = axes[k]
        a.imshow(t)
        a.set_title(f"#{rank[u]} {u}" + (f" ({sid})" if sid != u else ""), fontsize=8)
        b.imshow(ov)
        b.set_title("prediction", fontsize=8)
        c.imshow(m, cmap="magma", vmin=0, vmax=vmax)
        c.set_title(f"{term} {score:.3g}", fontsize=8)
        for ax in (a, b, c):
            ax.set_xticks([])
            ax.set_yticks([])
    more = len(result.picks) - len(shown)
    fig.suptitle(f"{result.strategy}: {len(result.picks)} pick(s)" + (f", first {len(shown)} shown" if more > 0 else ""), fontsize=10)
    fig.tight_layout()
    files = {"overview": _save(fig, Path(f"{base}.png"))}
    if written:
        files["heatmaps"] = folder
    return files
