"""The promptable-segmenter interface.

    emb = segmenter.embed(image)                 # uint8 [H, W, 3] -> Embedding (cacheable)
    out = segmenter.segment(emb, prompts)        # Segments for N prompts

Prompts are in the *original* image's pixel coordinates: points (x, y) = (column, row) with
labels 1 (positive) / 0 (negative), boxes XYXY; each backend resizes and pads itself.
``Segments.masks`` is bool [N, 3, H, W] (three granularities when ``multimask``, else [N, 1, H,
W]), ``scores`` float [N, 3], ``low_res_logits`` float [N, 3, h, w] (256 x 256 for SAM).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Prompts:
    """N prompts. ``points`` float [N, K, 2] (x, y), ``labels`` int [N, K] (1 pos, 0 neg),
    ``boxes`` float [N, 4] XYXY or None, ``mask_logits`` float [N, 1, 256, 256] or None."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    boxes: np.ndarray | None = None
    mask_logits: np.ndarray | None = None

    def __post_init__(self):
        if self.points is not None:
            self.points = np.asarray(self.points, np.float32).reshape(-1, np.asarray(self.points).shape[-2], 2)
            self.labels = np.ones(self.points.shape[:2], np.int64) if self.labels is None else np.asarray(self.labels, np.int64).reshape(self.points.shape[:2])
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        if self.points is None and self.boxes is None and self.mask_logits is None:
            raise ValueError("a prompt needs points, boxes or mask logits")

    def __len__(self) -> int:
        for a in (self.points, self.boxes, self.mask_logits):
            if a is not None:
                return len(a)
        return 0


@dataclass
class Embedding:
    """A backend's encoding of one image. ``data`` is whatever the backend needs (a tensor for
    SAM, label maps for the classical backend); ``original_size`` is (H, W)."""

    data: object
    original_size: tuple[int, int]
    backend: str
    meta: dict = field(default_factory=dict)


@dataclass
class Segments:
    masks: np.ndarray  # bool [N, M, H, W]
    scores: np.ndarray  # float [N, M]
    low_res_logits: torch.Tensor | None = None  # [N, M, h, w]


class PromptableSegmenter(abc.ABC):
    """Frozen promptable segmenters (SAM and friends). ``name`` and ``weights_id`` (a hash of the
    weights, or how they were made) key the embedding cache together with ``transform_id``."""

    name: str = "segmenter"
    weights_id: str = "none"
    transform_id: str = "identity"
    precision: str = "fp32"  # what embed() computes in (fp32 / bf16 / fp16; lowlabel.precision): part of the cache key
    code_modules: tuple[str, ...] = ()  # modules besides the class's own that compute embeddings
    code_packages: tuple[str, ...] = ()  # installed packages that do

    @property
    def code_version(self) -> str:
        """A hash of the code that computes this backend's embeddings (the source of its module
        and of ``code_modules``, the versions of ``code_packages``): part of the embedding-cache
        key, so an edit of that code never serves embeddings the new code would not compute."""
        import hashlib
        import importlib
        import inspect
        from importlib import metadata

        h = hashlib.sha256()
        for mod in (type(self).__module__, *self.code_modules):
            h.update(inspect.getsource(importlib.import_module(mod)).encode())
        for pkg in self.code_packages:
            try:
                h.update(f"{pkg}=={metadata.version(pkg)}".encode())
            except metadata.PackageNotFoundError:
                h.update(f"{pkg}==?".encode())
        return h.hexdigest()[:16]

    @abc.abstractmethod
    def embed(self, image: np.ndarray) -> Embedding:
        """uint8 [H, W, 3] -> Embedding."""

    @abc.abstractmethod
    def segment(self, embedding: Embedding, prompts: Prompts, multimask: bool = True) -> Segments:
        """Masks at the original size for each prompt."""

    def decoder_transformer(self) -> torch.nn.Module | None:
        """The mask decoder's two-way transformer (SAM's and SAM 2's ``transformer``, whose output
        is (prompt tokens, image features)); None for a backend that has no decoder."""
        return None

    def feature_grid(self, embedding: Embedding, side: int) -> tuple[int, int]:
        """(rows, cols) of the ``side`` x ``side`` decoder-feature grid that cover the image; the
        rest is padding."""
        return side, side

    def decoder_features(self, embedding: Embedding, prompts: Prompts) -> torch.Tensor:
        """float [N, C, rows, cols]: the image features after the mask decoder's two-way
        transformer, one map per prompt (the prompt-conditioned "decoder features" that S4M's
        structural distillation compares, sec. 4.1), cropped to the grid that covers the image."""
        module = self.decoder_transformer()
        if module is None:
            raise ValueError(f"backend {self.name!r} has no mask decoder and so no decoder features: use sam, mobilesam or sam2")
        out = []
        handle = module.register_forward_hook(lambda mod, inp, res: out.append(res[1]))
        try:
            self.segment(embedding, prompts, multimask=False)
        finally:
            handle.remove()
        src = out[0]  # [N, side * side, C]
        n, hw, c = src.shape
        side = int(round(hw ** 0.5))
        rows, cols = self.feature_grid(embedding, side)
        return src.transpose(1, 2).reshape(n, c, side, side)[:, :, :rows, :cols].float().cpu()
