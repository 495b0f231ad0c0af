"""Promptable segmenters (SAM and a weight-free classical one), prompts from labels, mask choice,
embedding cache, and refinement of weak labels into dense ones."""

from __future__ import annotations

from .base import Embedding, PromptableSegmenter, Prompts, Segments

BACKENDS = ("classical", "sam", "mobilesam", "sam2")


def build_segmenter(backend: str = "classical", *, checkpoint=None, model_type: str | None = None, device: str = "cpu", seed: int = 0,
                    precision: str = "auto") -> PromptableSegmenter:
    """``classical`` (no weights), ``sam`` (segment_anything; ``model_type`` vit_b/vit_l/vit_h),
    ``mobilesam`` (vit_t: lowlabel's TinyViT + SAM's decoder; the official mobile_sam.pt loads) or ``sam2`` (the sam2 package; ``model_type`` a SAM 2.1 config name). Without a checkpoint
    the SAM backends have random weights of the real architecture. ``precision`` (auto / fp32 /
    bf16 / fp16, :mod:`lowlabel.precision`): what the image encoder runs in (auto: bf16 where the
    device runs it natively); the classical backend has no network and ignores it."""
    if backend == "classical":
        from .classical import ClassicalSegmenter

        return ClassicalSegmenter()
    if backend == "sam":
        from .official import SamSegmenter

        return SamSegmenter(model_type or "vit_b", checkpoint, device=device, seed=seed, precision=precision)
    if backend == "mobilesam":
        from .official import SamSegmenter

        return SamSegmenter("vit_t", checkpoint, device=device, seed=seed, precision=precision)
    if backend == "sam2":
        from .sam2_backend import Sam2Segmenter

        return Sam2Segmenter(model_type or "sam2.1_hiera_t", checkpoint, device=device, seed=seed, precision=precision)
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


__all__ = ["BACKENDS", "Embedding", "PromptableSegmenter", "Prompts", "Segments", "build_segmenter"]
