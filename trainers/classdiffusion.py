"""ClassDiffusion's semantic preservation loss (Huang et al., arXiv 2405.17532; docs/methods.md,
"ClassDiffusion"), as a regulariser of DreamBooth (:mod:`trainers.lora`).

Fine-tuning drifts the concept phrase ("a photo of a sks dog") away from its class ("a photo of a
dog") in the text encoder's space, and the class's compositional knowledge goes with it. The loss
keeps the two phrases' sentence features aligned (the paper's Eq. 3, in the form of its reference
code: one pooled vector per phrase):

    L_SPL = mean_j [ 1 − cos( f(p_j), f(q_j) ) ],      L = L_diffusion (+ w_prior · L_class) + λ · L_SPL

``p_j`` is the prompt sample ``j`` of this step trains with, ``q_j`` the same prompt with the
class word alone where the identifier and class word were. Unlike the reference code, which runs
either prior preservation or this loss, both are added to the total here.

``f`` — the sentence feature, per text encoder:

* SD 1/2 (one encoder): the final-layer-norm hidden state at the end-of-text token (``pooler_output``),
  as the reference code.
* SDXL (two encoders): encoder 1's ``pooler_output`` (the same EOS state as SD 1) and encoder 2's
  projected pooled output ``text_embeds`` — the vector the SDXL UNet itself reads as its global text
  conditioning, so the term keeps exactly that from drifting. The two ``1 − cos`` terms are averaged,
  so ``λ`` means the same on every family.

The loss reaches only the text side (the UNet is not in it). With the text encoder frozen and the
identifier a fixed vocabulary token, ``f(p_j)`` is a constant and the loss has no gradient: the
config refuses that combination (:func:`check_trainable_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from studio.errors import TrainingError
from studio.methods.runtime import text_encoders
from trainers.conditioning import tokenize
from trainers.templates import fill_templates


def check_trainable_text(weight: float, train_text_encoder: bool) -> None:
    """Refuse a semantic preservation loss that could not act: ``weight`` must be ≥ 0 and finite, and
    with ``weight`` > 0 the text encoder must train (a LoRA on it, or every weight with ``--full``)."""
    if not (weight >= 0 and weight < float("inf")):
        raise TrainingError(f"classdiffusion_weight must be a finite number ≥ 0, got {weight}.")
    if weight > 0 and not train_text_encoder:
        raise TrainingError("--classdiffusion-weight needs a trainable text side: turn on --train-text-encoder "
                            "(with a frozen text encoder the loss has no gradient), or set --classdiffusion-weight 0.")


def class_counterparts(templates: Sequence[str], captions: Sequence[str | None], token: str,
                       class_word: str) -> list[str]:
    """The class-word-only prompt of each training prompt: the same template and caption as
    :func:`trainers.templates.fill_templates` uses, with ``class_word`` where it puts ``text``
    (``"a photo of a {}"`` → ``"a photo of a dog"`` beside ``"a photo of a sks dog"``; a caption
    naming the token gets the class word in its place)."""
    return fill_templates(templates, captions, token, class_word)


def sentence_features(pipe: Any, prompts: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    """Per text encoder, the pooled sentence feature of each prompt, ``(B, D_e)`` (see the module
    docstring: EOS state after the final layer norm; SDXL's second encoder: its projected ``text_embeds``).
    Differentiable with respect to whatever trains in the encoders."""
    feats = []
    for tok, te in text_encoders(pipe):
        out = te(tokenize(tok, list(prompts), device))
        pooled = getattr(out, "text_embeds", None)  # CLIPTextModelWithProjection (SDXL's second encoder)
        feats.append(pooled if pooled is not None else out.pooler_output)
    return feats


def semantic_preservation_loss(pipe: Any, concept_prompts: Sequence[str], class_prompts: Sequence[str],
                               device: torch.device) -> torch.Tensor:
    """``L_SPL`` (module docstring): a scalar, the mean over the encoders and the prompt pairs of
    ``1 − cos(f(p_j), f(q_j))`` — 0 when every pair encodes identically, at most 2."""
    if len(concept_prompts) != len(class_prompts) or not concept_prompts:
        raise ValueError(f"need as many class prompts as concept prompts (≥ 1), got {len(concept_prompts)} and "
                         f"{len(class_prompts)}")
    both = list(concept_prompts) + list(class_prompts)  # one encoder pass for the pairs' two halves
    n = len(concept_prompts)
    terms = []
    for feat in sentence_features(pipe, both, device):
        feat = feat.float()
        terms.append((1 - F.cosine_similarity(feat[:n], feat[n:], dim=-1)).mean())
    return torch.stack(terms).mean()
