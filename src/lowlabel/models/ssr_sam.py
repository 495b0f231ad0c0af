"""SSR-SAM's retrieval model (``../shared/papers/ssr-sam.md``, sec. "Method", eqs. 1-5): SAM's
image encoder g, a mask-induced semantic prompt generator (MSPG), a bank of visual-semantic
prompts per class, prompt compression, and SAM's mask decoder h decoding one mask per class.

    feats  = net.encode(images)                       # [g(x)]: SAM image embeddings [B, 256, h, w]
    logits = net.decode(feats, out_size)              # every class decoded with the whole bank
    logits = net.decode(feats, out_size, prompts)     # ... with these per-class prompt sets
    tokens, classes = net.prompts_from(images, masks) # MSPG: [CLS] of x ⊙ m_c, one per (image, class)
    net.bank.add(tokens, classes); sample_prompts(net.bank.all(), k)   # the prompt bank

The parts, as the paper has them, and where lowlabel decides what it leaves open (each stated):

- **g**: SAM's ViT image encoder (``encoder``: ``vit_b`` / ``vit_l`` / ``vit_h`` built by
  ``segment_anything``, ``vit_t`` = MobileSAM's TinyViT from :mod:`lowlabel.sam.mobilesam`), frozen
  as in the paper; ``scratch`` is a small SAM-style ViT (embed 192, depth 4, 3 heads, windowed
  attention with two global blocks) at the crop size, trainable, for measuring the method from
  scratch where no SAM weights exist. Inputs smaller than the encoder's size are zero-padded at the
  bottom/right (the reference code pads 512² pathology patches to 1024²) and the logits cropped.
- **MSPG** (eqs. 1-2): each class c present in a labeled image gives x ⊙ m_c (the normalised image,
  zero outside the class), resized to the ViT's input size, and the ViT's [CLS] output is the
  prompt s_c. ``mspg``: ``vit_b_16`` (torchvision's ViT-B/16 at 224², frozen unless trained; a
  local checkpoint through ``model.options.mspg_weights``; training says so when it stays frozen
  with random weights) or ``tiny`` (a 4-layer, 192-wide ViT at 64², for
  from-scratch runs). Classes covering fewer than ``min_prompt_pixels`` pixels of an image give no
  prompt (a stated choice: a few stray pixels make no semantic prompt).
- **Prompt bank**: the prompts of the labeled data per class, a FIFO of ``bank_size`` per class
  (a deviation: the paper's teacher uses all the prompts extracted from labeled data, with no
  update rule; here prompts are made from each step's augmented labeled crops, so the FIFO holds
  the newest ``bank_size`` of them, all of them only while a class has that few). Buffers, so a
  checkpoint carries its bank and ``predict`` decodes with it.
- **Prompt compression** (eqs. 3-4): prompts are first projected to the decoder's width (256; the
  paper's W_k, W_v are d x d and leave this projection implicit), then per class
  s_c^com = softmax(q_c K_c^T / sqrt(d)) V_c with one learnable query q_c (``queries``; the
  reference code uses 8 queries and 8 heads: ``queries: 8`` gives that many tokens, one head as
  eq. 4). A class without any prompt is not decodable: its logits are a large negative constant,
  so it is never predicted, and its labeled pixels are left out of the labeled loss until it has
  a prompt (``lowlabel.methods.ssr_sam.decodable_targets``).
- **Decoding** (eq. 5): SAM's mask decoder (two-way transformer) takes the compressed tokens of a
  class as sparse prompt embeddings, SAM's no-mask dense embedding and positional encoding, and
  returns one mask logit map per class (single-mask output); the C maps, stacked, are the class
  logits (softmax over classes, cross-entropy, as the paper's losses imply). One decoder pass per
  class and image, as the reference code.
- **Frozen encoder = embedding cache** (``cache_embeddings``, issue 13): with g (and the MSPG)
  frozen, their outputs on training inputs are kept (:class:`EmbeddingCache`) and a repeated input
  is looked up, not re-encoded. Inputs repeat only where the views are deterministic: the cached
  recipe is ``data.resize: true`` (each image, or each patch pre-cut at the encoder's size as the
  paper cuts its 1024² patches, seen whole) whose only randomness is the horizontal flip, so
  every labeled and unlabeled image has two weak inputs. The strong views' colour jitter changes
  g's input and cannot be cached: SSR-SAM's method then makes its image perturbation in feature
  space (CutMix of the cached embeddings; see :mod:`lowlabel.methods.ssr_sam`).
- **Zero-shot exemplar retrieval** (``Retriever``): the exemplar's masked image through the MSPG
  gives one prompt; with a single prompt eq. 4's attention weight is 1 whatever the query, so the
  compressed prompt is W_v of the projected prompt for any query (no class query is needed for an
  unseen category); the mask decoder decodes it alone on each query tile and pixels with a mask
  logit > 0 (SAM's mask threshold) are retrieved. The paper gives no protocol for this (its
  appendix is not available): these are lowlabel's choices.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..precision import autocast_tag

NOT_DECODABLE = -1e4  # the logits of a class without prompts


class SSRSAMOptions(BaseModel):
    """``model.options`` of ``arch: ssr-sam``."""

    model_config = ConfigDict(extra="forbid")
    mspg: Literal["vit_b_16", "tiny"] = "vit_b_16"
    train_encoder: bool = False  # the paper freezes g; true for from-scratch runs
    train_mspg: bool = False  # the paper's MSPG is a pre-trained ViT, not in its trainable list
    img_size: int | None = Field(None, ge=32)  # g's input side; default 1024 for SAM, the crop for scratch
    queries: int = Field(1, ge=1)  # learnable queries per class (eq. 4: one; the reference code: 8)
    bank_size: int = Field(64, ge=1)  # prompts kept per class
    min_prompt_pixels: int = Field(16, ge=1)  # a class covering fewer pixels of an image gives no prompt
    mspg_weights: str | None = None  # a local torchvision ViT-B/16 state dict (e.g. ImageNet's vit_b_16) for the MSPG
    cache_embeddings: bool = False  # frozen g (and MSPG): keep their training outputs, keyed by the exact input (EmbeddingCache)
    cache_entries: int = Field(1024, ge=1)  # embeddings kept (least recently used dropped): 4 MiB each for SAM at 1024²


def _scratch_encoder(img_size: int):
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0, out_chans=256,
                           qkv_bias=True, use_rel_pos=True, window_size=max(1, min(14, img_size // 16)), global_attn_indexes=(1, 3),
                           norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))


def build_sam_encoder(name: str, img_size: int | None):
    """(image encoder, its input side) of a SAM variant, randomly initialised (weights come from
    ``model.pretrained``)."""
    if name == "scratch":
        side = img_size or 256
        if side % 16:
            raise ValueError(f"model.options.img_size must be a multiple of 16 for the scratch encoder, got {side}")
        return _scratch_encoder(side), side
    if name == "vit_t":
        from ..sam.mobilesam import build_mobile_sam

        return build_mobile_sam().image_encoder, 1024
    if name in ("vit_b", "vit_l", "vit_h"):
        from segment_anything import sam_model_registry

        return sam_model_registry[name]().image_encoder, 1024
    raise ValueError(f"unknown SSR-SAM encoder {name!r}; choose from vit_b, vit_l, vit_h, vit_t (MobileSAM), scratch")


class EmbeddingCache:
    """What a frozen network computed in training, kept in memory and keyed by the exact input.

    With the encoder g frozen (the paper's setting), g(x) is a function of the input pixels alone:
    an input the run has already encoded (the same window of the same image, after the same
    deterministic view) is looked up instead of re-encoded. Keys are BLAKE2 digests of the input
    tensor's bytes (exact: a changed pixel is another key); at most ``max_entries`` values are
    kept, the least recently used dropped first. Only training inputs are cached (``SSRSAM``
    bypasses the cache in eval mode: a tiled prediction never revisits a window). ``hits`` and
    ``misses`` count lookups. In memory, not on disk: lowlabel's on-disk SAM cache
    (:mod:`lowlabel.sam.cache`) keys whole images for ``refine``; training inputs are views.
    """

    def __init__(self, max_entries: int = 1024):
        from collections import OrderedDict

        self.max_entries = max_entries
        self.store: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(t: torch.Tensor, extra: bytes = b"") -> bytes:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(str((tuple(t.shape), t.dtype)).encode() + extra)
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    def lookup(self, keys: Sequence[bytes], compute) -> torch.Tensor:
        """Values for ``keys``, stacked; ``compute(indices)`` gives the missing ones (a stacked
        tensor, in that order) in one call."""
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, v in zip(missing, compute(missing)):
                self.store[keys[i]] = v.detach()
                self.store.move_to_end(keys[i])
                if len(self.store) > self.max_entries:
                    self.store.popitem(last=False)
        out = []
        for k in keys:
            out.append(self.store[k])
            self.store.move_to_end(k)
        return torch.stack(out)

    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


class MSPG(nn.Module):
    """Mask-induced semantic prompt generator (eqs. 1-2): the [CLS] token of a ViT over the image
    masked to one class."""

    def __init__(self, kind: str = "vit_b_16"):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        if kind == "vit_b_16":
            self.vit = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
        elif kind == "tiny":
            self.vit = VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768)
        else:
            raise ValueError(f"unknown MSPG ViT {kind!r}; choose from vit_b_16, tiny")
        self.vit.heads = nn.Identity()
        self.size, self.dim = self.vit.image_size, self.vit.hidden_dim

    def forward(self, masked: torch.Tensor) -> torch.Tensor:
        """masked: normalised images x ⊙ m_c [N, 3, H, W] -> prompts [N, dim]."""
        if masked.shape[-2:] != (self.size, self.size):
            masked = F.interpolate(masked, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.vit(masked)  # torchvision's forward: encoder output's [CLS] token through heads (Identity)


class PromptBank(nn.Module):
    """Prompts per class, a FIFO of ``size`` each (buffers: saved with the model)."""

    def __init__(self, num_classes: int, dim: int, size: int):
        super().__init__()
        self.register_buffer("tokens", torch.zeros(num_classes, size, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))  # valid entries
        self.register_buffer("head", torch.zeros(num_classes, dtype=torch.long))  # next slot to write

    @torch.no_grad()
    def add(self, tokens: torch.Tensor, classes: torch.Tensor) -> None:
        size = self.tokens.shape[1]
        for t, c in zip(tokens.detach().to(self.tokens.dtype), classes.tolist()):
            self.tokens[c, self.head[c]] = t
            self.head[c] = (self.head[c] + 1) % size
            self.count[c] = torch.clamp(self.count[c] + 1, max=size)

    def get(self, c: int) -> torch.Tensor:
        return self.tokens[c, : int(self.count[c])]

    def all(self) -> list[torch.Tensor]:
        return [self.get(c) for c in range(self.tokens.shape[0])]


def sample_prompts(prompts: Sequence[torch.Tensor], k: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Prompt perturbation (eq. 13): k prompts per class drawn with replacement from each class's
    set (a class without prompts stays empty)."""
    out = []
    for s in prompts:
        idx = torch.randint(0, len(s), (k,), generator=generator) if len(s) else torch.zeros(0, dtype=torch.long)
        out.append(s[idx.to(s.device)])
    return out


class PromptCompression(nn.Module):
    """Eqs. 3-4: per class, learnable queries attend over the class's prompts (any number) and give
    a fixed-length prompt [queries, dim]."""

    def __init__(self, num_classes: int, in_dim: int, dim: int = 256, queries: int = 1):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)  # to the decoder's width (implicit in the paper)
        self.q = nn.Parameter(torch.randn(num_classes, queries, dim) * dim**-0.5)
        self.k = nn.Linear(dim, dim, bias=False)  # W_k
        self.v = nn.Linear(dim, dim, bias=False)  # W_v
        self.dim = dim

    def attention(self, c: int, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ``c``'s queries over its [n_c, in_dim] prompts: (attention [queries, n_c], the projected prompts)."""
        s = self.proj(prompts.to(self.q.dtype))
        return (self.q[c] @ self.k(s).T / math.sqrt(self.dim)).softmax(-1), s

    def forward(self, prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts: per class a [n_c, in_dim] set -> (compressed [C, queries, dim], decodable bool [C])."""
        out = self.q.new_zeros(self.q.shape)
        ok = torch.zeros(len(prompts), dtype=torch.bool, device=self.q.device)
        for c, s in enumerate(prompts):
            if len(s) == 0:
                continue
            att, s = self.attention(c, s)
            out[c] = att @ self.v(s)
            ok[c] = True
        return out, ok


class SSRSAM(nn.Module):
    """The retrieval model (see the module docstring); a :class:`lowlabel.models.Segmenter` in
    its interface (``encode`` / ``decode`` / ``forward`` / ``param_groups``)."""

    size_divisor = 16
    features_include_input = False

    def __init__(self, num_classes: int, encoder: str = "vit_b", in_channels: int = 3, options: dict | None = None):
        super().__init__()
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        from .normalization import MEAN, STD

        if in_channels not in (1, 3):
            raise ValueError(f"ssr-sam's SAM encoder takes RGB (in_channels 3) or grey (1), got {in_channels}")
        self.options = o = SSRSAMOptions(**(options or {}))
        self.arch, self.num_classes, self.in_channels, self.encoder_name = "ssr-sam", num_classes, in_channels, encoder
        self.encoder, self.img_size = build_sam_encoder(encoder, o.img_size)
        self.encoder.requires_grad_(o.train_encoder)
        side = self.img_size // 16
        self.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(side, side), input_image_size=(self.img_size, self.img_size), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
        self.mspg = MSPG(o.mspg)
        self.mspg.requires_grad_(o.train_mspg)
        self.compression = PromptCompression(num_classes, self.mspg.dim, 256, o.queries)
        self.mspg_loaded = False  # whether load_weights gave the MSPG weights (its ViT's, or a whole model's)
        if o.mspg_weights:
            self.load_weights(torch.load(o.mspg_weights, map_location="cpu", weights_only=True))
        self.bank = PromptBank(num_classes, self.mspg.dim, o.bank_size)
        if o.cache_embeddings and o.train_encoder:
            raise ValueError("model.options.cache_embeddings keeps a frozen encoder's outputs: it needs train_encoder false")
        self.cache = EmbeddingCache(o.cache_entries) if o.cache_embeddings else None
        self.feature_channels = 256
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ inputs
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif self.in_channels == 1:
            images = images.mean(1, keepdim=True).expand(-1, 3, -1, -1)  # grey data: SAM's encoders take 3 channels
        return (images - self.mean) / self.std

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h > self.img_size or w > self.img_size:
            raise ValueError(f"input {h}x{w} exceeds the SSR-SAM encoder's {self.img_size}x{self.img_size}; predict larger images tile by tile "
                             f"(eval.tile <= {self.img_size})")
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    # ------------------------------------------------------------------ g, MSPG
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[g(x)]: SAM image embeddings [B, 256, img_size / 16, img_size / 16] of the zero-padded input."""
        x = self._pad(self.normalize(images))
        if self.options.train_encoder:
            return [self.encoder(x)]
        with torch.no_grad():
            if self.cache is None or not self.training:
                return [self.encoder(x)]
            tag = autocast_tag(x.device.type)  # an embedding computed in bf16 is never served to an fp32 step, nor the reverse
            return [self.cache.lookup([EmbeddingCache.key(v, tag) for v in x], lambda idx: self.encoder(x[idx]))]

    def prompts_from(self, images: torch.Tensor, masks: torch.Tensor, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
        """MSPG over every (image, class) with at least ``min_prompt_pixels`` pixels of the class:
        (prompts [N, d], their classes [N])."""
        x = self.normalize(images)
        pairs = [(b, c) for b in range(len(masks)) for c in range(self.num_classes) if int((masks[b] == c).sum()) >= self.options.min_prompt_pixels]
        if not pairs:
            return x.new_zeros(0, self.mspg.dim), torch.zeros(0, dtype=torch.long, device=x.device)
        def run(sel) -> torch.Tensor:
            masked = torch.stack([x[b] * (masks[b] == c).to(x.dtype) for b, c in (pairs[i] for i in sel)])
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.options.train_mspg):
                return self.mspg(masked)

        classes = torch.tensor([c for _, c in pairs], device=x.device)
        if self.cache is None or self.options.train_mspg or not self.training:
            return run(range(len(pairs))), classes
        tag = autocast_tag(x.device.type)
        image_keys = {b: EmbeddingCache.key(x[b], tag) for b in {b for b, _ in pairs}}  # a prompt: f(image, class mask), frozen MSPG
        keys = [EmbeddingCache.key(masks[b] == c, b"mspg" + image_keys[b]) for b, c in pairs]
        with torch.no_grad():
            return self.cache.lookup(keys, run), classes

    # ------------------------------------------------------------------ h
    def decode_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        return features[-1]

    def decode(self, features: list[torch.Tensor], out_size, prompts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Class logits [B, C, *out_size]: each class decoded with its compressed prompts (default:
        the whole bank). ``out_size`` is the (unpadded) input size."""
        compressed, ok = self.compression(self.bank.all() if prompts is None else prompts)
        logits = self._masks(features[-1], compressed, out_size).float()  # float32 logits under autocast too (lowlabel.precision)
        return torch.where(ok.view(1, -1, 1, 1), logits, torch.full_like(logits, NOT_DECODABLE))

    def _masks(self, emb: torch.Tensor, compressed: torch.Tensor, out_size) -> torch.Tensor:
        """SAM's mask decoder over image embeddings [B, 256, h, w], one single-mask pass per
        compressed prompt set [n, queries, 256]: logits [B, n, *out_size] (upsampled to the
        encoder's input, cropped to the unpadded size)."""
        pe = self.prompt_encoder.get_dense_pe()
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(compressed), -1, *emb.shape[-2:])
        maps = [self.mask_decoder(image_embeddings=emb[b : b + 1], image_pe=pe, sparse_prompt_embeddings=compressed, dense_prompt_embeddings=dense,
                                  multimask_output=False)[0][:, 0] for b in range(emb.shape[0])]  # each [n, 4h, 4w]
        logits = F.interpolate(torch.stack(maps), size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return logits[..., : out_size[0], : out_size[1]]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images), images.shape[-2:])

    @torch.no_grad()
    def exemplar_prompt(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The MSPG prompt [1, d] of an exemplar: image [1, 3, H, W] in [0, 1], mask bool [H, W]."""
        if not mask.any():
            raise ValueError("the exemplar mask is empty: mark the region to retrieve with non-zero pixels")
        return self.mspg(self.normalize(image) * mask.to(image.dtype))

    def decode_prompt(self, features: list[torch.Tensor], out_size, prompt: torch.Tensor) -> torch.Tensor:
        """Mask logits [B, *out_size] of one prompt set [n, d] decoded alone (retrieval)."""
        compressed, _ = self.compression([prompt])  # one set: the first query row (a single prompt makes the query irrelevant)
        return self._masks(features[-1], compressed[:1], out_size)[:, 0]

    def load_weights(self, state: dict) -> str:
        """Load a state dict: an official SAM / MobileSAM checkpoint (``image_encoder.*``,
        ``prompt_encoder.*``, ``mask_decoder.*``: g and h, strictly), a torchvision ViT for the MSPG
        (``conv_proj.*``, ``encoder.layers.*``, ``class_token``; its classifier head dropped), or a
        whole SSR-SAM model. Returns what was loaded."""
        if any(k.startswith("image_encoder.") for k in state):
            parts = {"encoder": self.encoder, "prompt_encoder": self.prompt_encoder, "mask_decoder": self.mask_decoder}
            for name, module in parts.items():
                prefix = "image_encoder." if name == "encoder" else f"{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
            return "SAM image encoder, prompt encoder and mask decoder"
        if "class_token" in state and "conv_proj.weight" in state:
            self.mspg.vit.load_state_dict({k: v for k, v in state.items() if not k.startswith("heads.")}, strict=True)
            self.mspg_loaded = True
            return "MSPG ViT"
        self.load_state_dict(state, strict=True)
        self.mspg_loaded = True
        return "SSR-SAM model"

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in enc}
        return {"backbone": enc, "head": [p for p in self.parameters() if p.requires_grad and id(p) not in ids]}


class Retriever(nn.Module):
    """An exemplar's region as a 2-class segmenter (0 = rest, 1 = retrieved, where the mask logit
    is > 0), so the tiled inference of :func:`lowlabel.eval.inference.sliding_window` runs it over
    query images of any size."""

    def __init__(self, model: SSRSAM, image: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.model = model
        self.prompt = model.exemplar_prompt(image, mask)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logit = self.model.decode_prompt(self.model.encode(images), images.shape[-2:], self.prompt)
        return torch.stack([torch.zeros_like(logit), logit], 1)
