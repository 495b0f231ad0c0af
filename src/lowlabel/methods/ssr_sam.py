"""SSR-SAM's semi-supervised training (``../shared/papers/ssr-sam.md``, eqs. 6-15), on UniMatch,
for the retrieval model of :mod:`lowlabel.models.ssr_sam` (``model.arch: ssr-sam``).

- Labeled (eq. 6): cross-entropy of the labeled images decoded with "all visual-semantic
  prompts": the bank plus the prompts the MSPG makes from this labeled batch (x^l ⊙ m_c), which
  then enter the bank. With a trained MSPG (``model.options.train_mspg``, from scratch) the batch's
  own prompts carry its gradient; the bank's are stored detached.
- Unlabeled (eq. 14): the weak view decoded with the full prompt set gives the pseudo-labels
  (confidence >= tau = 0.9), which supervise
  p^f, the weak view's SAM embedding under channel dropout 0.5 (feature perturbation, eq. 11),
  p^s, two strong views (colour + CutMix, "treated equally": their mean), and
  p^p, the weak view decoded with k prompts per class drawn with replacement from the bank
  (prompt perturbation, eq. 13; the student decodes the unperturbed weak features).
  L = L^l + lambda (alpha H(p^f) + beta H(p^s) + gamma H(p^p)), lambda = 0.5 (eq. 15).

Stated choices where the paper is silent: alpha = beta = gamma = 1 (its values are in an appendix
not given; with lambda = 0.5 this is UniMatch's 0.5 / 0.25 / 0.25 split of the feature and image
terms, before UniMatch's halving, plus the prompt term at the feature term's weight; the reference
code weighs 0.5 / 0.25 + 0.25 / 1.0 with no lambda); k = 8 prompts per class (the paper's Fig. 3
varies k and gives no default; the reference code draws about n / 8 of an n-prompt bank); each
unlabeled term is the mean over the batch's valid pixels of the masked cross-entropy (UniMatch's).
Deviations: the k prompts are drawn once per step for the whole unlabeled batch (the paper draws
them "for each unlabeled image"; the reference code also draws per batch), and the strong views
are UniMatch's recipe (colour jitter p 0.8, random greyscale p 0.2, Gaussian blur p 0.5, CutMix p 0.5
with the next image of the batch) where the paper names colour and CutMix.
``perturbations`` selects the terms for the paper's ablation (Table 4): ``[prompt]``,
``[image, feature]``, or all three (default). ``ssr_sam_labeled`` is the labeled-only retrieval
baseline (eq. 6 alone, the paper's "Labeled Only").

With ``model.options.cache_embeddings`` (a frozen encoder whose outputs are looked up, not
recomputed) the image perturbation is made in feature space, a deviation from the paper: each of
the two strong views is the weak view's cached embedding CutMixed with its batch partner's, the
view's CutMix box snapped to the encoder's 16-pixel patch grid (the pseudo-labels, confidences and
valid pixels mixed with the snapped box, so labels and features agree); the colour jitter of the
pixel strong views is left out, since it changes g's input and would need g again. This is not the
same perturbation: g's attention spreads context across the whole window, and a pixel CutMix would
give the pasted patch that context, the embedding CutMix keeps each part's own. The prompt and
feature perturbations are unchanged (they act after g). ``embedding_cache_hit_rate`` is logged.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from ..augment.transforms import mix
from ..data.dataset import IGNORE_INDEX
from ..models.ssr_sam import sample_prompts
from ..utils import console
from .base import LossParams, Method, StepOutput, masked_pseudo_loss, mix_partner, pseudo_label_metrics, pseudo_labels, supervised_loss


class SSRSAMParams(LossParams):
    threshold: float = Field(0.9, ge=0, le=1)  # tau, "in all experiments"
    fp_dropout: float = Field(0.5, ge=0, lt=1)  # channel dropout 0.5 on g(x^w)
    weight_u: float = 0.5  # lambda (eq. 15)
    alpha: float = 1.0  # feature perturbation
    beta: float = 1.0  # the two strong views (their mean)
    gamma: float = 1.0  # prompt perturbation
    prompt_samples: int = Field(8, ge=1)  # k per class, with replacement
    perturbations: list[str] = ["image", "feature", "prompt"]


def _check_model(model) -> None:
    from ..errors import ConfigError
    from ..models.ssr_sam import SSRSAM

    if model is not None and not isinstance(model, SSRSAM):
        raise ConfigError(f"method ssr_sam trains SSR-SAM's retrieval model: set model.arch=ssr-sam, not {type(model).__name__}")


def patch_grid_box(box: torch.Tensor, grid: tuple[int, int], patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pixel CutMix box bool [B, H, W] snapped to an encoder's patch grid: (the cells [B, *grid]
    whose centre pixel is in the box; the box those cells cover, bool [B, H, W]). The grid covers
    the zero-padded encoder input, whose top-left H x W is the image."""
    b, h, w = box.shape
    cells = torch.zeros(b, *grid, dtype=torch.bool, device=box.device)
    ys, xs = torch.arange(patch // 2, h, patch, device=box.device), torch.arange(patch // 2, w, patch, device=box.device)
    cells[:, : len(ys), : len(xs)] = box[:, ys][:, :, xs]
    snapped = cells.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :h, :w]
    return cells, snapped


def _cache_metrics(student, tokens) -> dict[str, float]:
    out = {"prompts": float(len(tokens))}
    if student.cache is not None:
        out["embedding_cache_hit_rate"] = student.cache.hit_rate()
    return out


def labeled_prompts(student, labeled: dict) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(per-class prompt sets = bank + this batch's MSPG prompts, the batch's prompts, their classes)."""
    tokens, classes = student.prompts_from(labeled["image"], labeled["mask"])
    full = [torch.cat([student.bank.get(c), tokens[classes == c].to(student.bank.tokens.dtype)]) for c in range(student.num_classes)]
    return full, tokens, classes


def decodable_targets(mask: torch.Tensor, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mask`` with the pixels of classes that have no prompt set to IGNORE_INDEX. Such a class
    (fewer than ``min_prompt_pixels`` in the batch, none in the bank yet) is decoded as the constant
    NOT_DECODABLE: its labeled pixels cost ~1e4 each and their gradient only pushes the other
    classes' logits down, so the labeled loss leaves them out until the class has a prompt."""
    absent = [c for c, s in enumerate(prompts) if len(s) == 0]
    if not absent:
        return mask
    return mask.masked_fill(torch.isin(mask, torch.tensor(absent, device=mask.device)), IGNORE_INDEX)


class SSRSAMLabeledOnly(Method):
    """The labeled-only retrieval baseline: eq. 6 alone, the bank filled from the labeled data."""

    Params = SSRSAMParams
    default_teacher = "none"
    needs_run = True  # only to check the teacher (attach)

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        _check_model(model)
        self.random_mspg = model is not None and not model.options.train_mspg and not model.mspg_loaded

    def attach(self, run) -> None:
        if self.random_mspg:
            console().print("[yellow]note[/]: the MSPG's ViT is frozen with random weights (no model.options.mspg_weights): its prompts carry "
                            "no learned semantics. The paper's is pre-trained: give a local torchvision ViT-B/16 state dict, or set "
                            "model.options.train_mspg: true to train it")
        if run.teacher_kind not in ("self", "none"):  # an averaged network would average the prompt bank's tokens too
            from ..errors import ConfigError

            raise ConfigError(f"method {'ssr_sam' if self.uses_unlabeled else 'ssr_sam_labeled'} trains and evaluates the student itself "
                              f"(an averaged network would average its prompt bank): set teacher.kind=self, not {run.teacher_kind!r}")

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        prompts, tokens, classes = labeled_prompts(student, labeled)
        x = labeled["image"]
        loss_x = supervised_loss(student.decode(student.encode(x), x.shape[-2:], prompts), decodable_targets(labeled["mask"], prompts),
                                 self.p.labeled_loss, labeled.get("weight"))
        student.bank.add(tokens, classes)
        return StepOutput({"loss": loss_x, "loss_x": loss_x.detach()}, _cache_metrics(student, tokens), {"x": loss_x})


class SSRSAMMethod(SSRSAMLabeledOnly):
    """SSR-SAM on UniMatch with prompt perturbation (see the module docstring)."""

    uses_unlabeled = True
    n_strong = 2
    default_teacher = "self"

    def __init__(self, params=None, *, num_classes: int, model=None):
        super().__init__(params, num_classes=num_classes, model=model)
        bad = set(self.p.perturbations) - {"image", "feature", "prompt"}
        if bad or not self.p.perturbations:
            from ..errors import ConfigError

            raise ConfigError(f"method.params.perturbations: a non-empty subset of image, feature, prompt; got {self.p.perturbations}")

    def training_step(self, student, teacher, labeled, unlabeled, ctx):
        p = self.p
        prompts, tokens, classes = labeled_prompts(student, labeled)
        x, u_w = labeled["image"], unlabeled["image"]
        b, size = x.shape[0], x.shape[-2:]
        feats = student.encode(torch.cat([x, u_w]))
        both = student.decode(feats, size, prompts)
        pred_x, pred_w = both.split([b, u_w.shape[0]])
        _, conf, pseudo = pseudo_labels(pred_w.detach())  # the teacher: the full prompt set, weak view
        valid = unlabeled["valid"]
        feats_u = [f[b:] for f in feats]
        full = [s.detach() for s in prompts]

        def pseudo_loss(pred, target=pseudo, c=conf, v=valid):
            return masked_pseudo_loss(pred, target, c, v, p.threshold, p.unlabeled_loss)

        terms = {"x": supervised_loss(pred_x, decodable_targets(labeled["mask"], prompts), p.labeled_loss, labeled.get("weight"))}
        losses = {"loss_x": terms["x"].detach()}
        if "feature" in p.perturbations:
            fp = pseudo_loss(student.decode([torch.nn.functional.dropout2d(f, p.fp_dropout, training=True) for f in feats_u], size, full))
            terms["fp"], losses["loss_fp"] = p.weight_u * p.alpha * fp, fp.detach()
        if "image" in p.perturbations:
            strong, boxes = unlabeled["strong"], unlabeled["cutmix"]
            ls = []
            for k in range(2):
                box = boxes[:, k]
                if student.cache is not None:  # feature-space CutMix of the cached embeddings (module docstring)
                    cells, box = patch_grid_box(box, feats_u[-1].shape[-2:], 16)
                    feats_s = [mix(cells, feats_u[-1], mix_partner(feats_u[-1]))]
                else:
                    feats_s = student.encode(mix(box, strong[:, k], mix_partner(strong[:, k])))
                ls.append(pseudo_loss(student.decode(feats_s, size, full), mix(box, pseudo, mix_partner(pseudo)),
                                      mix(box, conf, mix_partner(conf)), mix(box, valid, mix_partner(valid))))
            s = (ls[0] + ls[1]) / 2
            terms["s"], losses["loss_s"] = p.weight_u * p.beta * s, s.detach()
        if "prompt" in p.perturbations:
            pp = pseudo_loss(student.decode(feats_u, size, sample_prompts(full, p.prompt_samples)))
            terms["pp"], losses["loss_pp"] = p.weight_u * p.gamma * pp, pp.detach()
        student.bank.add(tokens, classes)
        return StepOutput({"loss": sum(terms.values()), **losses},
                          {**pseudo_label_metrics(pseudo, conf, valid, p.threshold, unlabeled.get("gt")), **_cache_metrics(student, tokens)}, terms)
