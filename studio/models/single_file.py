"""Single-file checkpoints (A1111 / CivitAI ``.safetensors`` in the original LDM naming): read the
header, load a pipeline fully offline, and export a pipeline back to one file.

Loading never touches the network: the pipeline configs come from ``studio/models/configs/``
(one folder per family, see its README), the tokenizers from ``studio/assets/clip_tokenizer/``,
and every ``from_single_file`` / ``from_pretrained`` call gets a local folder and
``local_files_only=True``. Pickled checkpoints (``.ckpt`` / ``.pt``) are refused, never opened.

Name mapping (diffusers → LDM), used to export, and to check a file against a config before
loading anything:

* UNet: ``conv_in`` → ``input_blocks.0.0``; ``down_blocks.i.{resnets,attentions}.j`` →
  ``input_blocks.{1 + i(L+1) + j}.{0,1}``; ``down_blocks.i.downsamplers.0.conv`` →
  ``input_blocks.{(i+1)(L+1)}.0.op``; ``mid_block`` → ``middle_block.{0,1,2}``;
  ``up_blocks.i.{resnets,attentions}.j`` → ``output_blocks.{i(L+1) + j}.{0,1}`` and the
  upsampler → ``output_blocks.{i(L+1) + L}.{1|2}.conv`` (L = ``layers_per_block``); resnets
  ``norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut`` → ``in_layers.0/in_layers.2/
  emb_layers.1/out_layers.0/out_layers.3/skip_connection``; transformer blocks keep their names.
* VAE: ``down_blocks.i.resnets.j`` → ``down.i.block.j``; decoder ``up_blocks.i`` →
  ``up.{n-1-i}``; ``mid_block.resnets.k`` → ``mid.block_{k+1}``; the mid attention's
  ``group_norm/to_q/to_k/to_v/to_out.0`` → ``norm/q/k/v/proj_out`` as 1×1 convs.
* CLIP-L (SD 1, SDXL's first encoder): HF names under ``…transformer.text_model.``.
* OpenCLIP (SD 2, SDXL's second encoder): ``resblocks.i`` with a fused ``attn.in_proj_weight``
  (q, k, v stacked on dim 0), ``ln_1/ln_2``, ``mlp.c_fc/c_proj``, ``positional_embedding``,
  ``ln_final`` and ``text_projection`` stored transposed (``x @ P``).

Import of the UNet and VAE uses diffusers' own converters (``from_single_file`` with a local
config); the text encoders are converted here and loaded strictly, so a missing tensor is an error
rather than a silently random layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from studio.errors import BaseModelError
from studio.models.families import (
    DEFAULT_PREDICTION,
    LDM_UNET,
    LDM_VAE,
    TEXT_ENCODER_PREFIXES,
    Family,
    PredictionType,
    SingleFileInfo,
    detect_family,
)
from studio.models.ldm_names import _text_from_ldm, to_ldm_state_dict

logger = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
_FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
_OPENCLIP_PAD = "!"  # OpenCLIP pads with "!" (id 0); OpenAI CLIP (SD 1) pads with <|endoftext|>
_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


# =============================================================================================
# Header


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Read and validate a ``.safetensors`` header without loading any tensor.

    Returns:
        ``(shapes, metadata)``: tensor name → shape, and the ``__metadata__`` string map.

    Raises:
        BaseModelError: the path is missing or a folder; a pickle (``.ckpt``/``.pt``/…) that must be
            converted first; a truncated or corrupt file (the message names the file).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise BaseModelError(f"Checkpoint {p} does not exist; check the path.")
    if p.is_dir():
        raise BaseModelError(f"{p} is a folder, not a single-file checkpoint; pass a .safetensors file, or pass "
                             "the folder itself as a diffusers base.")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise BaseModelError(_pickle_message(p))
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BaseModelError(f"{p.name} is truncated or empty, so it is not a usable .safetensors file; "
                                 "download or copy it again.")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
            if head[:4] == b"PK\x03\x04" or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
                raise BaseModelError(_pickle_message(p))  # a zip (torch.save) or a raw pickle
            # never the header's claimed size: those are the file's first 8 bytes (text, for a file that is
            # not a checkpoint), and the size says more about a file than a user may need to know
            raise BaseModelError(f"{p.name} is truncated or not a .safetensors file (its header length does not fit "
                                 "the file); download or copy it again.")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BaseModelError(f"{p.name} has a corrupt .safetensors header ({err.__class__.__name__}); "
                             "download or copy it again.") from err
    if not isinstance(header, dict):
        raise BaseModelError(f"{p.name} has a corrupt .safetensors header (not a JSON object); "
                             "download or copy it again.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise BaseModelError(f"{p.name} has corrupt __metadata__ (it must map strings to strings); "
                             "re-save it with a current tool.")
    shapes: dict[str, list[int]] = {}
    data_end = 0
    for name, entry in header.items():
        shape, begin, end = _check_entry(p, name, entry)
        shapes[name] = shape
        data_end = max(data_end, end)
    available = size - 8 - n
    if data_end > available:
        raise BaseModelError(f"{p.name} is truncated: its header describes {data_end} bytes of tensor data but "
                             f"only {available} are present; download or copy it again.")
    return shapes, dict(metadata)


def _check_entry(p: Path, name: str, entry: Any) -> tuple[list[int], int, int]:
    bad = f"{p.name} has a corrupt .safetensors header (entry {name!r}"
    if not isinstance(entry, dict):
        raise BaseModelError(f"{bad} is not an object); download or copy it again.")
    shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]
            or not isinstance(dtype, str)):
        raise BaseModelError(f"{bad} has an invalid shape, dtype or data_offsets); download or copy it again.")
    begin, end = offsets
    itemsize = _DTYPE_BYTES.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - begin:
        raise BaseModelError(f"{bad}: {dtype}{shape} needs {math.prod(shape) * itemsize} bytes, its offsets "
                             f"span {end - begin}); download or copy it again.")
    return list(shape), begin, end


def _pickle_message(p: Path) -> str:
    return (f"{p.name} is a PyTorch pickle, which can run code when opened, so the studio does not load it; "
            "convert it to .safetensors first (e.g. with a trusted converter such as A1111's checkpoint merger "
            "or kohya's scripts) and pass the .safetensors file.")


# =============================================================================================
# Loading


def shipped_config_dir(family: Family, prediction_type: PredictionType) -> Path:
    """The folder under ``studio/models/configs/`` for a family (sd2: by prediction type)."""
    name = {"sd1": "sd1", "sdxl": "sdxl"}.get(family) or ("sd2-v" if prediction_type == "v_prediction" else "sd2")
    return CONFIG_ROOT / name


def load_single_file(path: str | os.PathLike[str], *, device: str | torch.device, dtype: torch.dtype,
                     prediction_type: str | None = None, config: str | os.PathLike[str] | None = None) -> Any:
    """Load a single-file SD 1.x / 2.x / SDXL checkpoint as a diffusers pipeline, offline.

    Args:
        path: a ``.safetensors`` checkpoint in the original LDM naming.
        device, dtype: where and in which precision the weights end up.
        prediction_type: ``epsilon`` / ``v_prediction``; wins over the file's own marker (a
            warning is logged when they disagree). When neither says: sd1/sdxl → epsilon,
            sd2 → v_prediction (the 768-v configs); see ``studio.models.families``.
        config: a diffusers-style config folder (``model_index.json`` + component configs) to use
            instead of the shipped one — for non-standard architectures (and tiny test models).

    Returns:
        A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` on ``device`` in ``dtype``.

    Raises:
        BaseModelError: the file is unreadable, not a supported base, an inpainting model, or
            does not match the configuration (the message names the first mismatching tensor).
    """
    from safetensors import safe_open

    # 1. Classify the file from its header; nothing is loaded yet.
    p = Path(path).expanduser()
    shapes, metadata = read_safetensors_header(p)
    info = detect_family(shapes, metadata, source=p.name)
    if info.family in ("sd3", "flux"):  # flow transformers have their own loader (no prediction type)
        raise BaseModelError(f"{p.name} is an SD 3 / FLUX checkpoint, which this SD 1/2/XL loader does not read; "
                             "load it with studio.models.load_base (or single_file_flow.load_flow_single_file).")
    if info.layout != "ldm":
        raise BaseModelError(f"{p.name} holds diffusers-style tensor names (unet.…, text_encoder.…), not a "
                             "single-file checkpoint; pass the diffusers folder (the one with model_index.json).")
    if info.in_channels != 4:
        raise BaseModelError(f"{p.name} is an inpainting model (its UNet takes {info.in_channels} input channels), "
                             "which the studio does not support yet; pass the text-to-image version of the model.")
    # 2. Pick the configs and check the file against them.
    prediction = _resolve_prediction(info, prediction_type, p.name)
    cfg_dir = Path(config).expanduser() if config is not None else shipped_config_dir(info.family, prediction)
    index = _read_model_index(cfg_dir)
    skeleton = _meta_components(cfg_dir, index)
    _check_against_config(shapes, skeleton, info.family, p.name, cfg_dir)
    # 3. Load the weights, component by component (EMA copies and training buffers are skipped).
    components: dict[str, Any] = {}
    with safe_open(str(p), framework="pt", device="cpu") as f:
        for name, prefix in (("unet", LDM_UNET), ("vae", LDM_VAE)):
            cls: Any = type(skeleton[name])
            part = {k: f.get_tensor(k) for k in shapes if k.startswith(prefix)}
            try:
                with _quiet_fp32_notice():
                    components[name] = cls.from_single_file(part, config=str(cfg_dir), subfolder=name,
                                                            local_files_only=True, torch_dtype=dtype)
            except (ValueError, RuntimeError, OSError, KeyError) as err:
                raise BaseModelError(f"Could not load the {name} of {p.name}: {_first_line(err)}") from err
            del part
        for name, prefix, naming in TEXT_ENCODER_PREFIXES[info.family]:
            model = skeleton[name]
            state = _text_from_ldm(model, lambda k: f.get_tensor(k) if k in shapes else None, prefix, naming,
                                   source=p.name)
            model.load_state_dict({k: _cast(v, dtype) for k, v in state.items()}, strict=True, assign=True)
            components[name] = model.eval()
    _refuse_meta_tensors(components, p.name)
    # 4. Tokenizers, scheduler and the pipeline.
    components["tokenizer"] = _clip_tokenizer(_OPENCLIP_PAD if info.family == "sd2" else None)
    if info.family == "sdxl":
        components["tokenizer_2"] = _clip_tokenizer(_OPENCLIP_PAD)
    components["scheduler"] = _scheduler(cfg_dir, prediction, info.zero_terminal_snr)
    pipe = _assemble(index, components)
    device = torch.device(device)
    return pipe if device.type == "cpu" else pipe.to(device)  # the weights were read onto the CPU


class _DropFp32Notice(logging.Filter):
    """diffusers' ``from_single_file(torch_dtype=…)`` casts with ``model.to(dtype)``, which logs "There are
    modules … that should be kept in float32: []" even when the list is empty."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def _quiet_fp32_notice() -> Iterator[None]:
    target = logging.getLogger("diffusers.models.modeling_utils")
    drop = _DropFp32Notice()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _resolve_prediction(info: SingleFileInfo, requested: str | None, source: str) -> PredictionType:
    if requested is not None:
        if requested not in ("epsilon", "v_prediction"):
            raise BaseModelError(f"prediction_type must be 'epsilon' or 'v_prediction', not {requested!r}.")
        if info.prediction_type is not None and requested != info.prediction_type:
            logger.warning("%s says it was trained for %s but %s was asked for; using %s.", source,
                           info.prediction_type, requested, requested)
        return requested  # type: ignore[return-value]
    return info.prediction_type or DEFAULT_PREDICTION[info.family]


def _read_model_index(cfg_dir: Path, *, flow: bool = False) -> dict[str, Any]:
    index_path = cfg_dir / "model_index.json"
    if not index_path.is_file():
        raise BaseModelError(f"Config folder {cfg_dir} has no model_index.json; pass a diffusers-style config "
                             "folder (model_index.json plus unet/, vae/, text_encoder/ and scheduler/ configs).")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BaseModelError(f"{index_path} is unreadable ({_first_line(err)}); "
                             "fix or replace the config folder.") from err
    allowed = _FLOW_PIPELINES if flow else _PIPELINES
    if not isinstance(index, dict) or index.get("_class_name") not in allowed:
        raise BaseModelError(f"{index_path} describes a {index.get('_class_name') if isinstance(index, dict) else '?'}"
                             f", not one of {', '.join(allowed)}; pass a config folder of that family.")
    return index


def _meta_components(cfg_dir: Path, index: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder(s) built from their configs with parameters on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    models: dict[str, torch.nn.Module] = {}
    with init_empty_weights():  # parameters on "meta"; buffers (e.g. CLIP's position_ids) stay real
        for name in ("unet", "vae", *_TEXT_COMPONENTS):
            entry = index.get(name)
            if not isinstance(entry, list) or entry[0] is None:
                continue
            library, class_name = entry
            try:
                if library == "diffusers":
                    cls = getattr(diffusers, class_name)
                    models[name] = cls.from_config(cls.load_config(str(cfg_dir / name)))
                else:
                    cls = getattr(transformers, class_name)
                    models[name] = cls(cls.config_class.from_pretrained(str(cfg_dir / name), local_files_only=True))
            except (AttributeError, OSError, ValueError, TypeError) as err:
                raise BaseModelError(f"Config folder {cfg_dir} has an unusable {name} config "
                                     f"({_first_line(err)}); fix or replace the config folder.") from err
    missing = {"unet", "vae", "text_encoder"} - set(models)
    if missing:
        raise BaseModelError(f"Config folder {cfg_dir} lacks {', '.join(sorted(missing))} in its model_index.json; "
                             "pass a complete Stable Diffusion config folder.")
    return models


def _check_against_config(shapes: Mapping[str, list[int]], skeleton: Mapping[str, torch.nn.Module],
                          family: Family, source: str, cfg_dir: Path) -> None:
    """Every tensor the configured models need must be in the file with the same shape."""
    expected = to_ldm_state_dict(skeleton, family)
    found = {k: _legacy_clip_name(k) if k not in shapes else k for k in expected}
    for name, tensor in expected.items():  # shapes first: they say more than a missing name does
        if found[name] not in shapes:
            continue
        have, want = list(shapes[found[name]]), list(tensor.shape)
        if have != want and not (".attn_1." in name and name.startswith(LDM_VAE) and have == want[:2]):
            raise BaseModelError(f"{source} does not match the {cfg_dir.name} configuration: {name} is {have} in the "
                                 f"file but {want} in the config; pass config= a folder whose configs match the file.")
    missing = [k for k, have in found.items() if have not in shapes]
    if missing:
        raise BaseModelError(f"{source} lacks {len(missing)} tensors that the {cfg_dir.name} configuration needs "
                             f"(e.g. {missing[0]}); pass config= a folder whose configs match the file.")


def _legacy_clip_name(name: str) -> str:
    """The pre-2022 HF CLIP name (no ``text_model.``) that some old SD 1 checkpoints use."""
    return name.replace(".transformer.text_model.", ".transformer.", 1)


def _refuse_meta_tensors(components: Mapping[str, Any], source: str) -> None:
    for name, model in components.items():
        left = [k for k, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise BaseModelError(f"{source} lacks weights for {len(left)} tensors of its {name} (e.g. {left[0]}); "
                                 "the file is incomplete, so pass a full checkpoint.")


def _clip_tokenizer(pad_token: str | None) -> Any:
    from studio.models.tiny import load_clip_tokenizer

    return load_clip_tokenizer(pad_token) if pad_token else load_clip_tokenizer()


def _scheduler(cfg_dir: Path, prediction: PredictionType, zero_terminal_snr: bool) -> Any:
    import inspect

    import diffusers

    cfg = json.loads((cfg_dir / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, cfg["_class_name"])
    overrides: dict[str, Any] = {"prediction_type": prediction}
    if zero_terminal_snr:  # rescale the betas (Lin et al. 2024, §3.1) and sample from the last timestep (§3.3)
        if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            cls = diffusers.EulerDiscreteScheduler
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return cls.from_config(cfg, **overrides)


def _assemble(index: Mapping[str, Any], components: dict[str, Any]) -> Any:
    import diffusers

    kwargs = dict(components)
    for key, value in index.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list):
            kwargs.setdefault(key, None)  # [null, null] slots: safety checker, feature extractor, ...
        else:
            kwargs[key] = value  # pipeline flags: requires_safety_checker, force_zeros_for_empty_prompt
    return getattr(diffusers, index["_class_name"])(**kwargs)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# =============================================================================================
# Text encoders: diffusers/transformers names <-> LDM names


def family_for_export(pipe: Any) -> Family:
    """sdxl with two text encoders; sd2 when the encoder is OpenCLIP-like (exact GELU), else sd1
    (CLIP-L's quick-GELU) — the encoder type is what decides the single-file names."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


def save_single_file(pipe: Any, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write ``pipe`` as one A1111/ComfyUI-style ``.safetensors`` checkpoint (LDM names).

    The file carries ``modelspec.*`` metadata (architecture, prediction type, resolution) plus
    ``metadata``, and the ComfyUI markers ``v_pred`` / ``ztsnr`` (empty tensors) where they apply,
    so :func:`load_single_file` and other tools read its prediction type back. SD 2 files hold the
    23 text-encoder layers diffusers keeps (the original 24th layer is unused by SD 2).

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        path: the file to write (atomically).
        dtype: cast floating-point tensors (e.g. ``torch.float16`` halves the size).
    """
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    family = family_for_export(pipe)
    components = {n: getattr(pipe, n) for n in ("unet", "vae", *_TEXT_COMPONENTS) if getattr(pipe, n, None) is not None}
    tensors = {}
    for k, v in to_ldm_state_dict(components, family).items():
        v = v.detach().to("cpu")
        tensors[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    sched = pipe.scheduler.config
    v_pred = sched.get("prediction_type") == "v_prediction"
    if v_pred:
        tensors["v_pred"] = torch.zeros(0)
    if sched.get("rescale_betas_zero_snr"):
        tensors["ztsnr"] = torch.zeros(0)
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    arch = "stable-diffusion-v2-768-v" if family == "sd2" and v_pred else _ARCHITECTURES[family]
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.prediction_type": "v" if v_pred else "epsilon", "modelspec.resolution": f"{size}x{size}",
            **dict(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)
