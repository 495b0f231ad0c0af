"""SAM 2 / 2.1 through the ``sam2`` package (optional extra ``lowlabel[sam2]``).

Configs are the package's own (``sam2.1_hiera_t``, ``_s``, ``_b+``, ``_l``); weights come from a
local checkpoint, or are random (``seed``) for tests and timing. ``embed`` runs the Hiera image
encoder once (``SAM2ImagePredictor.set_image``) and keeps its features; ``segment`` runs the
prompt encoder and mask decoder for a batch of prompts on those features.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..precision import resolve_precision
from .base import Embedding, PromptableSegmenter, Prompts, Segments
from .official import file_sha256


class Sam2Segmenter(PromptableSegmenter):
    code_packages = ("sam2", "SAM-2")

    def __init__(self, config: str = "sam2.1_hiera_t", checkpoint: str | os.PathLike | None = None, device: str = "cpu", seed: int = 0,
                 precision: str = "fp32"):
        try:
            from sam2.build_sam import build_sam2
            from sam2.sam2_image_predictor import SAM2ImagePredictor
        except ImportError:
            raise ImportError("the 'sam2' backend needs the sam2 package: pip install 'lowlabel[sam2]'") from None
        checkpoint = checkpoint or os.environ.get("LOWLABEL_SAM_CHECKPOINT") or None
        if checkpoint and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{checkpoint}: SAM 2 checkpoint not found (see `lowlabel weights list`)")
        torch.manual_seed(seed)
        cfg = config if config.endswith(".yaml") else f"configs/{config.split('_hiera')[0]}/{config}.yaml"
        model = build_sam2(cfg, ckpt_path=str(checkpoint) if checkpoint else None, device=device, mode="eval")
        self.predictor = SAM2ImagePredictor(model)
        self.name = f"sam2_{Path(cfg).stem}"
        self.weights_id = file_sha256(checkpoint)[:16] if checkpoint else f"random-seed{seed}"
        self.transform_id = f"sam2-{model.image_size}"
        self._precision = resolve_precision(precision, device, setting="precision")  # the Hiera encoder's; prompts and decoder: fp32
        self.precision = self._precision.name

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> Embedding:
        with self._precision.autocast():
            self.predictor.set_image(image)
        f = self.predictor._features
        data = {"image_embed": f["image_embed"].float().cpu(), **{f"high_res_{i}": t.float().cpu() for i, t in enumerate(f["high_res_feats"])}}
        return Embedding(data, tuple(image.shape[:2]), self.name, {"levels": len(f["high_res_feats"]), "precision": self.precision})

    def decoder_transformer(self):
        return self.predictor.model.sam_mask_decoder.transformer  # SAM 2 resizes to a square: the whole grid is the image

    @torch.no_grad()
    def segment(self, embedding: Embedding, prompts: Prompts, multimask: bool = True) -> Segments:
        p = self.predictor
        dev = p.device
        d = embedding.data
        p._features = {"image_embed": d["image_embed"].to(dev), "high_res_feats": [d[f"high_res_{i}"].to(dev) for i in range(int(embedding.meta["levels"]))]}
        p._orig_hw = [tuple(embedding.original_size)]
        p._is_image_set, p._is_batch = True, False
        masks, scores, low = p.predict(
            point_coords=prompts.points, point_labels=prompts.labels, box=prompts.boxes,
            mask_input=prompts.mask_logits, multimask_output=multimask, return_logits=False,
        )
        n = len(prompts)
        masks = np.asarray(masks).reshape(n, -1, *embedding.original_size).astype(bool)
        return Segments(masks, np.asarray(scores).reshape(n, -1), torch.as_tensor(np.asarray(low)).reshape(n, -1, *np.asarray(low).shape[-2:]))
