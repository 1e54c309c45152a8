"""Textual-inversion files of other tools: import (A1111 ``.pt``/safetensors, diffusers
``learned_embeds``, Cross Initialization's ``{token}_v0 …``) and export (diffusers, A1111).

Tensor names are those of :mod:`studio.methods.textual_inversion` (``emb_params``; SDXL ``clip_l`` +
``clip_g``), the convention A1111, ComfyUI and InvokeAI share.
"""

from __future__ import annotations

import torch

from studio.concept import Concept
from studio.errors import ConceptFormatError

METHOD = "textual_inversion"
SD_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL and SD 3 / 3.5 (CLIP-L, CLIP-G)
FLUX_KEYS = ("clip_l",)  # FLUX.1: CLIP-L only (diffusers' advanced FLUX script's ``clip_l``; T5 is not trained)
KEY_SETS = ({SD_KEY}, set(SDXL_KEYS), set(FLUX_KEYS))  # the tensor sets a concept may hold


def tensor_keys(n_encoders: int, family: str = "") -> tuple[str, ...]:
    """The file's tensor names for a base with ``n_encoders`` CLIP text encoders (``family`` flux: ``clip_l``)."""
    if family == "flux":
        return FLUX_KEYS
    return (SD_KEY,) if n_encoders == 1 else SDXL_KEYS


def concept_keys(tensors: dict) -> tuple[str, ...]:
    """The encoder tensors of a concept's ``tensors``, in encoder order."""
    return tuple(k for k in SDXL_KEYS if k in tensors) if SDXL_KEYS[0] in tensors else (SD_KEY,)

def _ti_concept(vectors: dict[str, torch.Tensor], token: str, source: str) -> Concept:
    from studio.concept import Concept
    from studio.prompts import normalize_token

    bad = [k for k, v in vectors.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim < 1]
    if bad:  # integer / bool / complex / 0-d "embeddings" are refused, never converted
        raise ConceptFormatError(f"{source}: the embedding {bad[0]!r} is not a float tensor of vectors.")
    family = ("sdxl" if SDXL_KEYS[1] in vectors else "flux") if SDXL_KEYS[0] in vectors else \
        {768: "sd1", 1024: "sd2"}.get(vectors[SD_KEY].shape[-1], "")
    return Concept(method=METHOD, tokens=[normalize_token(token)],
                   tensors={k: v.detach().float().reshape(-1, v.shape[-1]).contiguous() for k, v in vectors.items()},
                   name=token.strip("<>"), base={"family": family} if family else {})


def _token_from_name(path) -> str:
    import re

    stem = re.sub(r"[^A-Za-z0-9_.\-]", "-", path.stem).strip("-.") or "concept"
    return f"<{stem}>"


def import_ti(tensors: dict, md: dict, path) -> Concept | None:
    """A1111 ``emb_params`` / ``string_to_param``, SDXL ``clip_l``+``clip_g``, diffusers
    ``{token: (n, d)}`` and Cross-Initialization's ``{token}_v0, {token}_v1 …``."""
    import re

    if set(tensors) in KEY_SETS:
        return _ti_concept(dict(tensors), _token_from_name(path), str(path))
    if "string_to_param" in tensors:  # A1111 .pt
        params = tensors["string_to_param"]
        vec = params.get("*") if isinstance(params, dict) else None
        if vec is None and isinstance(params, dict) and params:
            vec = next(iter(params.values()))
        if not isinstance(vec, torch.Tensor):
            raise ConceptFormatError(f"{path.name}: an A1111 embedding without vectors in string_to_param.")
        name = tensors.get("name") if isinstance(tensors.get("name"), str) else path.stem
        return _ti_concept({SD_KEY: vec}, f"<{name}>", str(path))
    if tensors and all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) for v in tensors.values()):
        groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for k, v in tensors.items():
            m = re.fullmatch(r"(.+)_v(\d+)", k)
            base, idx = (m.group(1), int(m.group(2))) if m else (k, 0)
            groups.setdefault(base, []).append((idx, v.reshape(-1, v.shape[-1])))
        if len(groups) == 1:
            token, parts = next(iter(groups.items()))
            vec = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])], dim=0)
            return _ti_concept({SD_KEY: vec}, token if token.startswith("<") else f"<{token}>", str(path))
    return None


def export_diffusers(concept: Concept, out) -> object:
    """diffusers ``learned_embeds.safetensors``: ``{token: (n, d)}`` (SDXL: a folder-less pair is
    not a diffusers convention, so SDXL exports the A1111 ``clip_l``/``clip_g`` file)."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    tensors = ({concept.trigger: concept.tensors[SD_KEY]} if SD_KEY in concept.tensors
               else {k: concept.tensors[k] for k in concept_keys(concept.tensors)})
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return out


def export_a1111(concept: Concept, out) -> object:
    """A1111 / ComfyUI safetensors: the tensors alone (``emb_params`` or ``clip_l``/``clip_g``)."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in concept.tensors.items()}, str(tmp),
                  metadata={"modelspec.trigger_phrase": concept.trigger})
    return out


IMPORTERS = (import_ti,)
EXPORTERS = {"diffusers": export_diffusers, "a1111": export_a1111}
