"""Single-file SD 3 / 3.5 and FLUX.1 checkpoints (ComfyUI-style ``.safetensors``): load one offline.

:func:`studio.models.families.detect_family` reads the header first (family, variant, and which
parts the file bundles). A file that holds every part — the transformer under
``model.diffusion_model.``, the 16-channel VAE under ``first_stage_model.`` and the text encoders
under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (HF names) — loads from the shipped
configs (``studio/models/configs/<variant>/``) with ``local_files_only=True``:

* transformer and VAE through diffusers' own single-file converters (``from_single_file`` with a
  local config), which map the original names (``joint_blocks.i.x_block.attn.qkv`` …,
  ``double_blocks.i.img_attn.qkv`` …) onto diffusers' modules;
* text encoders built from their configs on the meta device and loaded strictly (every tensor the
  model needs must be in the file; fp8 weights are cast to the requested dtype);
* CLIP tokenizers from the committed CLIP BPE (``studio/assets/clip_tokenizer``; SD 3's second
  tokenizer pads with ``!``); the T5 tokenizer from the local Hugging Face cache
  (:data:`T5_TOKENIZER_REPOS`), the only part not shipped with the studio.

What the studio does not do is fetch the missing parts of a partial file (a BFL release such as
``flux1-dev.safetensors`` holds the transformer alone; ``sd3.5_large.safetensors`` has no text
encoders): it refuses in one sentence naming the hub id or folder to pass instead. SD 3 without a
bundled T5, or without a cached T5 tokenizer, loads with ``text_encoder_3=None`` (diffusers feeds
zeros in T5's place); FLUX cannot run without T5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from studio.errors import BaseModelError
from studio.models.families import (
    FLOW_TEXT_ENCODERS,
    FLOW_TEXT_PREFIXES,
    LDM_UNET,
    LDM_VAE,
    SingleFileInfo,
    detect_family,
)

logger = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
# Where a real user's base comes from when a single file is partial (the hub ids users pass instead).
HUB_IDS = {"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
           "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
           "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
           "flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"}
# Hub repos (and subfolders) holding the T5-XXL tokenizer SD 3 and FLUX use, looked up in the local cache only.
T5_TOKENIZER_REPOS = (("google/t5-v1_1-xxl", ""), ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
                      ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3"))
# (pipeline component, bundled encoder name) per family.
_COMPONENTS = {"sd3": (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")),
               "flux": (("text_encoder", "clip_l"), ("text_encoder_2", "t5xxl"))}


def load_flow_single_file(path: str | os.PathLike[str], *, dtype: torch.dtype, t5: bool = True,
                          config: str | os.PathLike[str] | None = None) -> Any:
    """Load a single-file SD 3 / FLUX checkpoint as a ``StableDiffusion3Pipeline`` / ``FluxPipeline`` on the CPU.

    Args:
        path: a ``.safetensors`` checkpoint that bundles the transformer, the VAE and the text encoders.
        dtype: the weights' dtype.
        t5: SD 3 only — load the bundled T5 (False: ``text_encoder_3=None``).
        config: a diffusers-style config folder to use instead of the shipped ``configs/<variant>``.

    Raises:
        BaseModelError: not an SD 3 / FLUX file, a part is missing (the message names the hub id to
            pass instead), or a tensor does not fit the configuration.
    """
    from studio.models.single_file import (
        _assemble,
        _first_line,
        _read_model_index,
        _refuse_meta_tensors,
        read_safetensors_header,
    )

    p = Path(path).expanduser()
    shapes, metadata = read_safetensors_header(p)
    info = detect_family(shapes, metadata, source=p.name)
    if info.family not in FLOW_TEXT_ENCODERS:
        raise BaseModelError(f"{p.name} is a {info.family} checkpoint, not SD 3 or FLUX; load it as a base directly.")
    _refuse_partial(info, p.name, t5)
    cfg_dir = Path(config).expanduser() if config is not None else CONFIG_ROOT / info.variant
    index = _read_model_index(cfg_dir, flow=True)
    import diffusers
    from safetensors import safe_open

    components: dict[str, Any] = {}
    prefix = LDM_UNET if info.layout == "ldm" else ""
    with safe_open(str(p), framework="pt", device="cpu") as f:
        for name, part_prefix in (("transformer", prefix), ("vae", LDM_VAE)):
            cls: Any = getattr(diffusers, index[name][1])
            part = {k: f.get_tensor(k) for k in shapes if k.startswith(part_prefix) and
                    (part_prefix or not k.startswith(("text_encoders.", LDM_VAE)))}
            try:
                components[name] = cls.from_single_file(part, config=str(cfg_dir), subfolder=name,
                                                        local_files_only=True, torch_dtype=dtype)
            except (ValueError, RuntimeError, OSError, KeyError) as err:
                raise BaseModelError(f"Could not load the {name} of {p.name}: {_first_line(err)}") from err
            del part
        for component, enc in _COMPONENTS[info.family]:
            if enc not in info.components or (enc == "t5xxl" and not t5):
                components[component] = None
                continue
            components[component] = _text_encoder(f, shapes, cfg_dir / component, FLOW_TEXT_PREFIXES[enc],
                                                   index[component][1], dtype, p.name)
    _refuse_meta_tensors({k: v for k, v in components.items() if v is not None}, p.name)
    _add_tokenizers(components, info, p.name)
    components["scheduler"] = _scheduler(cfg_dir)
    return _assemble(index, components)


def _refuse_partial(info: SingleFileInfo, source: str, t5: bool) -> None:
    needed = ["vae", *FLOW_TEXT_ENCODERS[info.family]]
    if info.family == "sd3":
        needed.remove("t5xxl")  # optional: SD 3 runs on its CLIPs alone
    elif not t5:
        raise BaseModelError("FLUX.1 reads the prompt through its T5 encoder, which cannot be left out; drop --no-t5.")
    missing = [n for n in needed if n not in info.components]
    if missing:
        held = " and ".join(c for c in ("transformer", "vae") if c in info.components)
        raise BaseModelError(f"{source} holds the {info.variant} {held} but not its {', '.join(missing)}, and the "
                             f"studio does not fetch the missing parts of a single file; pass the hub id "
                             f"{HUB_IDS[info.variant]} or its diffusers folder as the base instead.")
    if info.family == "sd3" and "t5xxl" not in info.components and t5:
        logger.warning("%s bundles no T5 encoder; loading SD 3 with its CLIP encoders only.", source)


def _text_encoder(f: Any, shapes: dict[str, list[int]], cfg_dir: Path, prefix: str, class_name: str,
                  dtype: torch.dtype, source: str) -> Any:
    """A bundled CLIP / T5 encoder, built from its config on the meta device and loaded strictly."""
    import transformers
    from accelerate import init_empty_weights

    cls: Any = getattr(transformers, class_name)
    with init_empty_weights():
        model = cls(cls.config_class.from_pretrained(str(cfg_dir), local_files_only=True))
    wanted = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for key in wanted:
        name = prefix + key
        if name not in shapes and prefix + "text_model." + key in shapes:
            name = prefix + "text_model." + key  # transformers 5's CLIPTextModel drops the ``text_model.`` level
        if name not in shapes and key == "encoder.embed_tokens.weight":
            name = prefix + "shared.weight"  # T5 ties its encoder's embedding to ``shared``
        if name not in shapes:
            if not wanted[key].is_meta:  # a real buffer (CLIP's position ids) keeps its value
                continue
            raise BaseModelError(f"{source} lacks {name} of its {prefix.split('.')[1]} text encoder, so the file is "
                                 "incomplete; pass a full checkpoint.")
        tensor = f.get_tensor(name)
        if list(tensor.shape) != list(wanted[key].shape):
            raise BaseModelError(f"{source} does not match the {cfg_dir.parent.name} configuration: {name} is "
                                 f"{list(tensor.shape)} in the file but {list(wanted[key].shape)} in the config.")
        state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval()


def _add_tokenizers(components: dict[str, Any], info: SingleFileInfo, source: str) -> None:
    from studio.models.tiny import load_clip_tokenizer

    components["tokenizer"] = load_clip_tokenizer()
    if info.family == "sd3":
        components["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
        t5_slot, t5_tok = "text_encoder_3", "tokenizer_3"
    else:
        t5_slot, t5_tok = "text_encoder_2", "tokenizer_2"
    components[t5_tok] = None
    if components.get(t5_slot) is None:
        return
    tok = cached_t5_tokenizer()
    if tok is not None:
        components[t5_tok] = tok
        return
    if info.family == "flux":
        raise BaseModelError(f"{source} needs the T5-XXL tokenizer, which is not in the local Hugging Face cache; "
                             f"run once online with --base {HUB_IDS[info.variant]}, or pass that hub id instead.")
    logger.warning("No cached T5-XXL tokenizer; loading %s with its CLIP encoders only (text_encoder_3=None).", source)
    components[t5_slot] = None


def cached_t5_tokenizer() -> Any:
    """The T5-XXL tokenizer from the local Hugging Face cache (:data:`T5_TOKENIZER_REPOS`), or None."""
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # exported lazily

    for repo, sub in T5_TOKENIZER_REPOS:
        try:
            return T5TokenizerFast.from_pretrained(repo, subfolder=sub, local_files_only=True)
        except (OSError, ValueError):
            continue
    return None


def _scheduler(cfg_dir: Path) -> Any:
    import json

    import diffusers

    cfg = json.loads((cfg_dir / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
