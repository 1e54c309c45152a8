"""Load a base model: a tiny offline base, the demo world, a hub id, a diffusers folder or a
single-file checkpoint — and describe it (family, keys, native size) as a :class:`BaseModel`."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from studio.devices import pick_device, pick_dtype
from studio.errors import BaseModelError, StudioError
from studio.models.families import FAMILY_LABELS, FLOW_FAMILIES
from studio.models.keys import compat_hash, compatibility_key, fingerprint_files
from studio.models.profile import GENERIC, RANDOM, BaseProfile, flow_profile, profile_for_folder
from studio.models.tiny import FLOW_TINY_NAMES, TINY_BUILD_VERSION, TINY_NAMES, build_tiny_pipeline

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a Stable Diffusion repo needs; skips .ckpt duplicates, flax/onnx weights and fp16 variants.
_HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/diffusion_pytorch_model.safetensors",
                 "*/model.safetensors", "*/diffusion_pytorch_model-*.safetensors", "*/model-*.safetensors"]
# Pipeline classes by family (the flow families' transformers take bf16 on CUDA: fp16 overflows them).
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", *FLOW_PIPELINES)
_OFFLINE_HINT = ("pass a local diffusers folder or a .safetensors checkpoint with --base PATH, "
                 "or --base demo / tiny for the offline bases")


@dataclass
class BaseModel:
    """A loaded base and what the rest of the studio needs to know about it.

    ``pipe`` is a diffusers ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline`` or ``FluxPipeline``; :attr:`denoiser` is its UNet or transformer.
    """

    pipe: Any
    spec: str
    name: str
    family: str  # "sd1" | "sd2" | "sdxl" | "sd3" | "flux"
    compat: dict[str, Any]
    identity: str
    native_size: int
    device: torch.device
    dtype: torch.dtype
    label: str = ""  # shown to users: e.g. "random weights: draws noise"
    extra: dict[str, Any] = field(default_factory=dict)
    profile: BaseProfile = GENERIC  # sampling/evaluation/training defaults for this base (set at load)

    @property
    def prediction_type(self) -> str:
        """``epsilon`` / ``v_prediction`` (UNet families), ``flow`` (SD 3 / FLUX: rectified-flow velocity)."""
        if self.family in FLOW_FAMILIES:
            return "flow"
        return str(self.pipe.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def is_flow(self) -> bool:
        """True for the flow-matching transformer families (SD 3 / 3.5, FLUX.1): no UNet, no cross-attention."""
        return self.family in FLOW_FAMILIES

    @property
    def guidance_kind(self) -> str:
        """What ``--guidance`` drives: ``cfg`` (classifier-free guidance: SD 1/2/XL, SD 3), ``embedded``
        (FLUX.1-dev's distilled guidance, an input of the transformer; true CFG stays off) or ``none``
        (FLUX.1-schnell has no guidance input)."""
        if self.family != "flux":
            return "cfg"
        return "embedded" if self.pipe.transformer.config.get("guidance_embeds") else "none"

    @property
    def denoiser(self) -> Any:
        """The UNet (SD 1/2/XL) or the transformer (SD 3, FLUX)."""
        return denoiser_of(self.pipe)

    @property
    def compat_id(self) -> str:
        return compat_hash(self.compat)

    def fingerprint(self) -> dict[str, Any]:
        """What a concept records about the base it was trained on (``studio.base``)."""
        return {"name": self.name, "family": self.family, "identity": self.identity,
                "compat": self.compat, "prediction_type": self.prediction_type}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def denoiser_of(pipe: Any) -> Any:
    """A pipeline's UNet, or its transformer for the flow families."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def family_of_pipeline(pipe: Any) -> str:
    """sd3 / flux by pipeline (an SD 3 or FLUX transformer); else sdxl when there are two text encoders;
    sd2 when the UNet uses linear projections (SD 2's OpenCLIP-era layout) or the encoder is 1024-d;
    sd1 otherwise."""
    flow = FLOW_PIPELINES.get(type(pipe).__name__)
    if flow is not None:
        return flow
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if pipe.unet.config.get("use_linear_projection") or pipe.text_encoder.config.hidden_size == 1024:
        return "sd2"
    return "sd1"


def load_base(spec: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
              attention: str = "sdpa", prediction_type: str | None = None, offload: bool = False,
              cache_dir: str | os.PathLike[str] | None = None, revision: str | None = None,
              t5: bool = True) -> BaseModel:
    """Load ``spec`` and describe it.

    Args:
        spec: ``tiny`` / ``tiny-v`` / ``tiny-sdxl`` (random offline bases), ``demo`` (the learnable
            world's trained base), ``demo-scene`` (its scene world's base), a local diffusers folder,
            a single-file ``.safetensors`` checkpoint, or a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
            ``stabilityai/stable-diffusion-3.5-large`` or ``black-forest-labs/FLUX.1-dev``; also the
            flow tiny bases ``tiny-sd3`` / ``tiny-flux``.
        device, dtype: default CUDA fp16 → MPS fp16 → CPU fp32; SD 3 / FLUX default to bf16 on
            CUDA when the GPU supports it (their activations overflow fp16).
        attention: ``sdpa`` (PyTorch scaled-dot-product attention, the default) or ``xformers``.
        prediction_type: override the scheduler's ``epsilon`` / ``v_prediction`` (single files
            cannot always tell).
        offload: CUDA only — keep weights on the CPU and move each component when used.
        t5: SD 3 / 3.5 only — load the T5 text encoder (False: ``text_encoder_3=None``, the CLIPs
            alone read the prompt; FLUX always needs its T5).
    """
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = pick_dtype(dev, dtype)
    if dtype is None:
        dt = _flow_dtype(dev, dt, _family_hint(spec))
    label = ""
    profile = GENERIC
    if spec in TINY_NAMES:
        pipe = build_tiny_pipeline(spec)
        if not t5 and spec == "tiny-sd3":
            pipe = _without_t5(pipe)
        name, identity = spec, f"builtin:{spec}:v{TINY_BUILD_VERSION}:seed0"
        label = "random weights: this base draws noise (for tests; use --base demo to see learning offline)"
        profile = RANDOM if spec not in FLOW_TINY_NAMES else flow_profile(family_of_pipeline(pipe), pipe, kind="random")
    elif spec in ("demo", "demo-scene"):  # the learnable worlds' committed bases
        folder = _demo_dir() if spec == "demo" else _scene_dir()
        pipe = _load_folder(folder, dt)
        name, identity = spec, f"folder:{fingerprint_files(folder)}"
        label = ("the offline demo world (32-px toy scenes)" if spec == "demo" else
                 "the offline scene world (48-px shapes in frames)") + ", not a photographic model"
        profile = profile_for_folder(folder)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipe = _load_folder(path, dt, t5=t5)
            name, identity = path.name, f"folder:{fingerprint_files(path)}"
            profile = profile_for_folder(path)
        elif path.is_file():
            pipe = _load_single(path, dev, dt, prediction_type, t5=t5)
            name, identity = path.stem, f"file:{fingerprint_files(path)}"
        elif _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
            folder, commit = _resolve_hub(spec, revision=revision, cache_dir=cache_dir, t5=t5)
            if dtype is None:
                dt = _flow_dtype(dev, dt, _folder_family(folder))
            pipe = _load_folder(folder, dt, t5=t5)
            name, identity = spec, f"hub:{spec}@{commit}"
        else:
            raise BaseModelError(f"Base {spec!r} is not a folder, a file or a hub id; {_OFFLINE_HINT}.")
    family = family_of_pipeline(pipe)
    if family in FLOW_FAMILIES and profile is GENERIC:
        profile = flow_profile(family, pipe)
    if prediction_type and family in FLOW_FAMILIES:
        raise StudioError(f"--prediction-type does not apply to {FAMILY_LABELS[family]} bases, which are trained "
                          "for rectified flow (velocity), not epsilon or v; leave it out.")
    if prediction_type:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise StudioError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}.")
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    _set_attention(pipe, attention)
    if offload:
        if dev.type != "cuda":
            raise StudioError("--offload needs a CUDA device; on CPU the weights already stay in memory.")
        pipe.to(dtype=dt)
        pipe.enable_model_cpu_offload(device=dev)
    else:
        if any(p.dtype != dt for p in denoiser_of(pipe).parameters()):
            pipe.to(dtype=dt)
        pipe.to(dev)
    return describe(pipe, spec=spec, name=name, identity=identity, device=dev, dtype=dt, label=label, profile=profile)


def describe(pipe: Any, *, spec: str, name: str, identity: str, device: torch.device | None = None,
             dtype: torch.dtype | None = None, label: str = "", profile: BaseProfile = GENERIC) -> BaseModel:
    """Wrap an already built pipeline (e.g. one made from config in a test or a benchmark)."""
    family = family_of_pipeline(pipe)
    net = denoiser_of(pipe)
    # SD 1/2/XL and SD 3 configs carry the latent sample size; FLUX's transformer has none (its
    # pipeline's default_sample_size, 128 latent px, is what FluxPipeline renders by default).
    latent = net.config.get("sample_size") or getattr(pipe, "default_sample_size", 128)
    native = int(latent) * int(pipe.vae_scale_factor)
    return BaseModel(pipe=pipe, spec=spec, name=name, family=family, compat=compatibility_key(pipe, family),
                     identity=identity, native_size=native, device=device or pipe.device,
                     dtype=dtype or net.dtype, label=label, profile=profile)


def _family_hint(spec: str) -> str | None:
    """The flow family (sd3 / flux) of ``spec`` when it can be told before loading (tiny names, folders,
    single files); None for the UNet families and for hub ids (told once their snapshot is resolved)."""
    if spec in FLOW_TINY_NAMES:
        return family_of_pipeline_name(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_family(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from studio.models.families import detect_family
        from studio.models.single_file import read_safetensors_header

        try:
            family = detect_family(*read_safetensors_header(path)).family
        except BaseModelError:
            return None  # the loader reports it
        return family if family in FLOW_FAMILIES else None
    return None


def family_of_pipeline_name(spec: str) -> str:
    """sd3 / flux for the flow tiny bases' names."""
    return "sd3" if spec == "tiny-sd3" else "flux"


def _folder_family(folder: Path) -> str | None:
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return FLOW_PIPELINES.get(str(index.get("_class_name", ""))) if isinstance(index, dict) else None


def _flow_dtype(device: torch.device, chosen: torch.dtype, family: str | None) -> torch.dtype:
    """bf16 instead of the fp16 default for SD 3 / FLUX on a CUDA GPU that has it (their residual stream
    overflows fp16); the choice is unchanged elsewhere (CPU stays fp32)."""
    if family in FLOW_FAMILIES and device.type == "cuda" and chosen == torch.float16 \
            and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return chosen


def _without_t5(pipe: Any) -> Any:
    """An SD 3 pipeline without its T5 encoder (diffusers then feeds zeros in T5's place)."""
    return type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})


def _demo_dir() -> Path:
    try:
        from studio.world import DEMO_BASE_DIR
    except ImportError as err:  # the world package is part of the repo; this means a broken install
        raise BaseModelError(f"The demo world is missing from this install ({err}); reinstall the studio.") from err
    if not (Path(DEMO_BASE_DIR) / "model_index.json").is_file():
        raise BaseModelError(f"The demo base is not built at {DEMO_BASE_DIR}; run python scripts/build_world.py.")
    return Path(DEMO_BASE_DIR)


def _scene_dir() -> Path:
    """The scene world's base (``--base demo-scene``), for methods that learn several concepts from one picture."""
    from studio.world import WORLD_SCENE_BASE_DIR

    if not (Path(WORLD_SCENE_BASE_DIR) / "model_index.json").is_file():
        raise BaseModelError(f"The scene base is not built at {WORLD_SCENE_BASE_DIR}; "
                             "run python scripts/build_world.py --variant world-scene.")
    return Path(WORLD_SCENE_BASE_DIR)


def _load_folder(folder: Path, dtype: torch.dtype, *, t5: bool = True) -> Any:
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise BaseModelError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder; "
                             "pass the folder that contains model_index.json, or a single .safetensors file.")
    family = _folder_family(folder)
    if not t5 and family == "flux":
        raise StudioError("FLUX.1 reads the prompt through its T5 encoder, which cannot be left out; drop --no-t5.")
    extra: dict[str, Any] = {"text_encoder_3": None, "tokenizer_3": None} if not t5 and family == "sd3" else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                 safety_checker=None, requires_safety_checker=False) \
            if _has_safety_slot(folder) else \
            DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"Could not load the diffusers folder {folder}: {_first_line(err)}") from err
    if type(pipe).__name__ not in PIPELINE_CLASSES:
        raise BaseModelError(f"{folder} holds a {type(pipe).__name__}; the studio supports Stable Diffusion "
                             "1.x/2.x, SDXL, SD 3/3.5 (StableDiffusion3Pipeline) and FLUX.1 (FluxPipeline) pipelines.")
    return pipe


def _has_safety_slot(folder: Path) -> bool:
    import json

    index = json.loads((folder / "model_index.json").read_text())
    return "safety_checker" in index


def _load_single(path: Path, device: torch.device, dtype: torch.dtype, prediction_type: str | None, *,
                 t5: bool = True) -> Any:
    from studio.models.single_file import load_single_file

    family = _family_hint(str(path))
    if family in FLOW_FAMILIES:
        from studio.models.single_file_flow import load_flow_single_file

        return load_flow_single_file(path, dtype=dtype, t5=t5)
    return load_single_file(path, device=torch.device("cpu"), dtype=dtype, prediction_type=prediction_type)


def _resolve_hub(repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike[str] | None,
                 t5: bool = True) -> tuple[Path, str]:
    """The local snapshot folder of ``repo_id`` (downloading it when online) and its commit. With ``t5``
    False, SD 3's ``text_encoder_3`` (T5-XXL, about 9 GB) is not downloaded."""
    from huggingface_hub import snapshot_download

    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None  # the hub takes str | Path
    ignore = None if t5 else ["text_encoder_3/*", "tokenizer_3/*"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                        allow_patterns=_HUB_PATTERNS, ignore_patterns=ignore))
        if (folder / "model_index.json").is_file():
            return folder, folder.name
    except Exception:  # noqa: BLE001 - any cache miss (missing refs, missing snapshot) means "not cached"
        pass
    if hub_offline():
        raise BaseModelError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                             f"downloading it; {_OFFLINE_HINT}.")
    if not _hub_reachable():
        raise BaseModelError(f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
                             f"(no network); {_OFFLINE_HINT}.")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                        allow_patterns=_HUB_PATTERNS, ignore_patterns=ignore))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; report one line
        raise BaseModelError(f"Could not download {repo_id} from the hub: {_first_line(err)}") from err
    return folder, folder.name


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _set_attention(pipe: Any, attention: str) -> None:
    if attention == "sdpa":
        return  # diffusers' default processors use torch.nn.functional.scaled_dot_product_attention
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise StudioError("--attention xformers was asked for but xformers is not installed; "
                              "pip install xformers (CUDA only) or use the default --attention sdpa.") from None
        pipe.enable_xformers_memory_efficient_attention()
        return
    raise StudioError(f"Unknown attention {attention!r}; use sdpa or xformers.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
