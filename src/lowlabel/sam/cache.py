"""On-disk cache of frozen-encoder embeddings.

Key = SHA-256 of the image's pixels (shape + bytes) + backend name + weights id + input
transform + the precision the encoder ran in (fp32 / bf16: an entry computed in one precision is
never served to a segmenter of another) + the backend's code version (a hash of the code that
computes its embeddings). Entries also record their precision (``meta["precision"]``). An
entry that cannot be read back, whatever the reason, is deleted and recomputed. Files are written to a temporary name and renamed (atomic on POSIX), so concurrent
writers of the same key race harmlessly: each rename installs a complete file and the last wins.
Entries load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .base import Embedding, PromptableSegmenter


def image_hash(image: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def _to_tensors(obj):
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    return obj


def _from_tensors(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _from_tensors(v) for k, v in obj.items()}
    return obj


class EmbeddingCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = self.misses = 0

    def key(self, image: np.ndarray, segmenter: PromptableSegmenter) -> str:
        parts = [image_hash(image), segmenter.name, segmenter.weights_id, segmenter.transform_id, segmenter.precision, segmenter.code_version]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get_or_embed(self, image: np.ndarray, segmenter: PromptableSegmenter) -> Embedding:
        key = self.key(image, segmenter)
        path = self.path(key)
        if path.is_file():
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
                return Embedding(_from_tensors(d["data"]), tuple(d["original_size"]), d["backend"], _from_tensors(d["meta"]))
            except Exception:  # noqa: BLE001  (truncated, not a torch file, pickled objects, wrong fields...)
                path.unlink(missing_ok=True)  # unreadable entry: drop it, recompute below
        self.misses += 1
        emb = segmenter.embed(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(emb)}.tmp")
        torch.save({"data": _to_tensors(emb.data), "original_size": list(emb.original_size), "backend": emb.backend, "meta": _to_tensors(emb.meta)}, tmp)
        os.replace(tmp, path)
        return emb
