"""Official SAM (``segment_anything`` package: vit_b, vit_l, vit_h) and MobileSAM (vit_t, with
lowlabel's TinyViT encoder) behind the promptable interface.

Weights come from a local checkpoint file (``checkpoint=`` or ``LOWLABEL_SAM_CHECKPOINT``); with
none, the real architecture is built with random weights (``seed``), which gives the real cost
and exercises the whole path but no useful masks. The model is frozen: ``embed`` runs the image
encoder, ``segment`` the prompt encoder and mask decoder (``Sam.forward`` is not used; it runs
under no_grad and recomputes embeddings). Input handling follows SAM: the long side is resized
to 1024, pixels are normalised and padded to 1024 x 1024; prompt coordinates are scaled by the
same factor; masks are upsampled from 256 x 256 logits, cropped and resized to the original size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..precision import resolve_precision
from .base import Embedding, PromptableSegmenter, Prompts, Segments

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "vit_t")  # vit_t = MobileSAM (lowlabel.sam.mobilesam)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _load_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class SamSegmenter(PromptableSegmenter):
    code_modules = ("lowlabel.sam.mobilesam",)
    code_packages = ("segment_anything", "segment-anything")

    def __init__(self, model_type: str = "vit_b", checkpoint: str | os.PathLike | None = None, device: str = "cpu", seed: int = 0,
                 precision: str = "fp32"):
        try:
            from segment_anything import sam_model_registry
            from segment_anything.utils.transforms import ResizeLongestSide
        except ImportError:
            raise ImportError("the 'sam' backend needs the segment_anything package: pip install 'lowlabel[sam]'") from None
        if model_type not in SAM_TYPES:
            raise ValueError(f"unknown SAM type {model_type!r}; choose from {SAM_TYPES}")
        checkpoint = checkpoint or os.environ.get("LOWLABEL_SAM_CHECKPOINT") or None
        torch.manual_seed(seed)
        if model_type == "vit_t":
            from .mobilesam import build_mobile_sam

            sam = build_mobile_sam()
        else:
            sam = sam_model_registry[model_type](checkpoint=None)
        if checkpoint:
            path = Path(checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: SAM checkpoint not found (see `lowlabel weights list`)")
            missing, unexpected = sam.load_state_dict(_load_state(path), strict=False)
            if missing or unexpected:
                raise ValueError(f"{path}: not a {model_type} SAM checkpoint ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
            self.weights_id = file_sha256(path)[:16]
        else:
            self.weights_id = f"random-seed{seed}"
        self.sam = sam.to(device).eval()
        for p in self.sam.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.resize = ResizeLongestSide(self.sam.image_encoder.img_size)
        self.name = "mobilesam_vit_t" if model_type == "vit_t" else f"sam_{model_type}"
        self.transform_id = f"longest{self.sam.image_encoder.img_size}"
        self._precision = resolve_precision(precision, self.device, setting="precision")  # the image encoder's; prompts and decoder: fp32
        self.precision = self._precision.name

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> Embedding:
        h, w = image.shape[:2]
        x = self.resize.apply_image(image)
        t = torch.as_tensor(x, device=self.device).permute(2, 0, 1)[None].float()
        input_size = tuple(t.shape[-2:])
        with self._precision.autocast():
            feats = self.sam.image_encoder(self.sam.preprocess(t))
        return Embedding(feats.float().cpu(), (h, w), self.name, {"input_size": input_size, "precision": self.precision})

    def decoder_transformer(self):
        return self.sam.mask_decoder.transformer

    def feature_grid(self, embedding: Embedding, side: int) -> tuple[int, int]:
        # the resized image (long side 1024) sits top-left of the padded square
        h, w = embedding.meta["input_size"]
        stride = self.sam.image_encoder.img_size / side
        return int(np.ceil(h / stride)), int(np.ceil(w / stride))

    @torch.no_grad()
    def segment(self, embedding: Embedding, prompts: Prompts, multimask: bool = True) -> Segments:
        size = embedding.original_size
        points = boxes = masks = None
        if prompts.points is not None:
            coords = torch.as_tensor(self.resize.apply_coords(prompts.points.copy(), size), device=self.device)
            points = (coords, torch.as_tensor(prompts.labels, device=self.device))
        if prompts.boxes is not None:
            boxes = torch.as_tensor(self.resize.apply_boxes(prompts.boxes.copy(), size), device=self.device)
        if prompts.mask_logits is not None:
            masks = torch.as_tensor(prompts.mask_logits, device=self.device, dtype=torch.float32)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
        emb = embedding.data.to(self.device)
        low, iou = self.sam.mask_decoder(
            image_embeddings=emb, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        )
        full = self.sam.postprocess_masks(low, embedding.meta["input_size"], size)
        return Segments((full > self.sam.mask_threshold).cpu().numpy(), iou.cpu().numpy(), low.cpu())
