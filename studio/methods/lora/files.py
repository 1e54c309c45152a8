"""LoRA files of other tools: import kohya and diffusers/PEFT LoRAs, export to both
(docs/methods.md §3). Names and conversions live in :mod:`studio.methods.lora.keys`; FLUX.1's
kohya sd-scripts and BFL layouts (fused q/k/v) in :mod:`studio.methods.lora.flux_formats`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from studio.concept import Concept
from studio.errors import ConceptFormatError, StudioError
from studio.methods.lora import flux_formats
from studio.methods.lora.flow_keys import FLOW_PREFIX, flow_family_of
from studio.methods.lora.keys import (
    ALL_PREFIXES,
    DIFFUSERS_METADATA_KEY,
    METHOD,
    UNET_PREFIX,
    LoraModule,
    _peft_parts,
    diffusers_to_kohya,
    family_of,
    kohya_metadata,
    kohya_tensors,
    kohya_to_diffusers,
    lora_modules,
    sgm_to_diffusers,
)


def _trigger_from(md: dict[str, str], path: Path) -> tuple[str, str]:
    """(token, class word) from ``modelspec.trigger_phrase`` ("sks dog" → <sks>, dog), else the file name."""
    from studio.prompts import normalize_token

    words = md.get("modelspec.trigger_phrase", "").split()
    if words:
        try:
            return normalize_token(words[0]), " ".join(words[1:])
        except StudioError:
            pass
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "-", path.stem).strip("-.") or "lora"
    return f"<{stem}>", ""


def _lora_concept(modules: dict[str, LoraModule], md: dict[str, str], path: Path, *,
                  family: str | None = None) -> Concept:
    from studio.concept import Concept

    token, class_word = _trigger_from(md, path)
    family = family if family is not None else family_of(modules, md)
    meta = {k: v for k, v in md.items() if k.startswith(("ss_", "modelspec."))}
    meta.update({k: v for k, v in kohya_metadata(modules, family).items() if k not in meta})
    return Concept(method=METHOD, tokens=[token], tensors=kohya_tensors(modules), class_word=class_word,
                   name=token.strip("<>"), base={"family": family} if family else {}, meta=meta)


def import_kohya(tensors: dict, md: dict, path: Path) -> Concept | None:
    """kohya-ss / A1111 LoRA files (SGM-named SDXL UNet keys are renamed to diffusers' names)."""
    if not tensors or not all(isinstance(k, str) and k.startswith(ALL_PREFIXES) for k in tensors):
        return None
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ConceptFormatError(f"{path.name}: a kohya LoRA file must hold tensors only.")
    if flux_formats.is_kohya_flux([k.partition(".")[0] for k in tensors]):  # sd-scripts' FLUX (BFL layout)
        return _lora_concept(flux_formats.modules_from_kohya(tensors, where=path.name), md, path, family="flux")
    renamed = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if module.startswith(UNET_PREFIX) and re.match(r"lora_unet_(input_blocks|middle_block|output_blocks|"
                                                       r"out_2|time_embed|label_emb)", module):
            module = sgm_to_diffusers(module)
        renamed[f"{module}.{suffix}"] = value
    return _lora_concept(lora_modules(renamed, where=path.name), md, path)


def import_bfl(tensors: dict, md: dict, path: Path) -> Concept | None:
    """FLUX.1 LoRAs in BFL's names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` …)."""
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        return None
    modules = flux_formats.modules_from_bfl(tensors, where=path.name)
    return None if modules is None else _lora_concept(modules, md, path, family="flux")


def import_diffusers(tensors: dict, md: dict, path: Path) -> Concept | None:
    """diffusers ``pytorch_lora_weights.safetensors`` (PEFT or older names) and PEFT adapter files; SD 3 /
    FLUX files (``transformer.…``) become ``lora_transformer_…`` modules, their CLIPs ``lora_te1_`` / ``lora_te2_``."""
    keys = [k for k in tensors if isinstance(k, str)]
    if not keys or len(keys) != len(tensors) or not all(_peft_parts(k) for k in keys):
        return None
    if not any(re.search(r"lora_A|lora\.down|lora_linear_layer|_lora\.down", k) for k in keys):
        return None
    two_encoders = any(k.startswith("text_encoder_2.") for k in keys) or \
        any(_peft_parts(k)[0] == "transformer" for k in keys)  # type: ignore[index]  # SDXL, SD 3, FLUX: lora_te1_
    return _lora_concept(diffusers_to_kohya(tensors, md, sdxl=two_encoders), md, path)


def _trigger_phrase(concept: Concept) -> str:
    return " ".join(t for t in (concept.trigger.strip("<>"), concept.class_word) if t)


def export_kohya(concept: Concept, out: Path) -> Path:
    """A kohya file for A1111 / ComfyUI: the tensors, ``ss_*`` and ModelSpec metadata, the trigger
    phrase as users type it ("sks dog")."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    modules = lora_modules(concept.tensors)
    md = {k: v for k, v in concept.meta.items() if k.startswith(("ss_", "modelspec."))}
    md.update({k: v for k, v in kohya_metadata(modules, concept.base.get("family", "")).items() if k not in md})
    md.update({"modelspec.title": concept.name or concept.trigger, "modelspec.trigger_phrase": _trigger_phrase(concept)})
    if _is_flux(concept, modules):  # sd-scripts' FLUX names, q/k/v fused as BFL's model has them
        tensors = flux_formats.kohya_tensors(modules)
        md.update(flux_formats.KOHYA_METADATA)
    else:
        tensors = kohya_tensors(modules)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=md)
    return out


def _is_flux(concept: Concept, modules: dict[str, LoraModule]) -> bool:
    """A FLUX.1 LoRA: trained on a ``flux`` base, or (no family recorded) naming FLUX's single-stream blocks."""
    family = concept.base.get("family", "") if isinstance(concept.base, dict) else ""
    return family == "flux" or (not family and flow_family_of(list(modules)) == "flux")


def export_bfl(concept: Concept, out: Path) -> Path:
    """A FLUX.1 LoRA in BFL's module names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``;
    ComfyUI's key map reads them), the scale folded into ``lora_B``; CLIP-L in kohya names beside."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    modules = lora_modules(concept.tensors)
    if not _is_flux(concept, modules) or not any(n.startswith(FLOW_PREFIX) for n in modules):
        raise StudioError(f"Only FLUX.1 LoRAs have BFL names; export {concept.name or concept.trigger} with "
                          "--format kohya or --format diffusers.")
    md = {"modelspec.title": concept.name or concept.trigger, "modelspec.trigger_phrase": _trigger_phrase(concept)}
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in flux_formats.bfl_tensors(modules).items()}, str(tmp), metadata=md)
    return out


def export_diffusers(concept: Concept, out: Path) -> Path:
    """diffusers' ``pytorch_lora_weights.safetensors`` layout with its ``lora_adapter_metadata``; a
    path without ``.safetensors`` is a folder that receives that file name."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    tensors, config = kohya_to_diffusers(lora_modules(concept.tensors))
    target = out if out.suffix == ".safetensors" else out / "pytorch_lora_weights.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    md = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True),
          "modelspec.trigger_phrase": _trigger_phrase(concept)}
    with atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=md)
    return target


IMPORTERS = (import_kohya, import_bfl, import_diffusers)
EXPORTERS = {"kohya": export_kohya, "diffusers": export_diffusers, "bfl": export_bfl}
