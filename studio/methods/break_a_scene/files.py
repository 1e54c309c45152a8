"""Break-A-Scene concept files: tensor names, the metadata keys and the LoRA group id.

A run of Break-A-Scene learns one token per concept and **one** LoRA shared by all of them. It
writes one file per token, each complete on its own:

==============================================  ================================================
``break_a_scene.embedding``                     the token's input embedding, ``(1, D)`` (SD 1/2; SDXL: CLIP-L)
``break_a_scene.embedding_2``                   SDXL only: in the second text encoder, ``(1, D_2)``
``lora_unet_…`` / ``lora_te…`` (kohya names)    the run's shared LoRA (:mod:`studio.methods.lora`)
==============================================  ================================================

Metadata: ``break_a_scene.group`` — the **group id**, a hash of the LoRA tensors (:func:`group_id`),
equal in every file of a run, so that applying two files of one run applies the LoRA once;
``break_a_scene.tokens`` — the run's tokens (JSON list), so a file says which siblings it came with.
The LoRA tensors carry kohya names, so other tools that read kohya LoRAs read the file's LoRA.
"""

from __future__ import annotations

import hashlib
import json

import torch

from studio.concept import Concept
from studio.errors import ConceptFormatError
from studio.methods.lora.keys import ALL_PREFIXES

METHOD = "break_a_scene"
EMBEDDINGS = ("break_a_scene.embedding", "break_a_scene.embedding_2")  # per text encoder, in encoder order
META_GROUP = "break_a_scene.group"
META_TOKENS = "break_a_scene.tokens"


def embeddings(concept: Concept) -> list[torch.Tensor]:
    """The token embedding per text encoder, ``(n, D_e)``, in encoder order."""
    return [concept.tensors[k] for k in EMBEDDINGS if k in concept.tensors]


def lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kohya LoRA tensors of a file (everything named ``lora_…``)."""
    return {k: v for k, v in tensors.items() if k.startswith(ALL_PREFIXES)}


def group_id(lora: dict[str, torch.Tensor]) -> str:
    """A hash of the LoRA tensors (names, shapes, float32 values): 16 hex digits. Two files of one run hold
    the same LoRA, so they have the same id; any other LoRA gets another."""
    h = hashlib.sha256()
    for name in sorted(lora):
        value = lora[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(value.shape)).encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()[:16]


def run_tokens(concept: Concept) -> list[str]:
    """The tokens of the run the file came from (``break_a_scene.tokens``), its own first when absent."""
    raw = concept.meta.get(META_TOKENS, "")
    if not raw:
        return list(concept.tokens)
    try:
        tokens = json.loads(raw)
    except json.JSONDecodeError:
        tokens = None
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise ConceptFormatError(f"{META_TOKENS} of Break-A-Scene concept {concept.name or concept.trigger} must be a "
                                 f"JSON list of tokens, got {raw[:80]!r}.")
    return tokens


def concept_tensors(embedding: list[torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The named tensors of one file: the token's embedding per encoder (``(1, D_e)``) and the shared LoRA,
    CPU float32, contiguous."""
    out = {k: e.detach().to("cpu", torch.float32).reshape(-1, e.shape[-1]).contiguous().clone()
           for k, e in zip(EMBEDDINGS, embedding)}
    out.update({k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in lora.items()})
    return out


IMPORTERS: tuple = ()
EXPORTERS: dict = {}
