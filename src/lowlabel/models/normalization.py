"""The input normalisation every network applies to images in [0, 1]: ImageNet's per-channel mean
and std (the convention of the encoders' published weights, SAM's included). One small module
that the networks (:mod:`.segmenter`, :mod:`.ssr_sam`, :mod:`.instance`) import, so that none
of them imports another for two tuples."""

from __future__ import annotations

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
