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
from studio.models.keys import compat_hash, compatibility_key, fingerprint_files
from studio.models.profile import GENERIC, RANDOM, BaseProfile, profile_for_folder
from studio.models.tiny import TINY_BUILD_VERSION, TINY_NAMES, build_tiny_pipeline

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a Stable Diffusion repo needs; skips .ckpt duplicates, flax/onnx weights and fp16 variants.
_HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors",
                 "*/model.safetensors"]
_OFFLINE_HINT = ("pass a local diffusers folder or a .safetensors checkpoint with --base PATH, "
                 "or --base demo / tiny for the offline bases")


@dataclass
class BaseModel:
    """A loaded base and what the rest of the studio needs to know about it.

    ``pipe`` is a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
    """

    pipe: Any
    spec: str
    name: str
    family: str  # "sd1" | "sd2" | "sdxl"
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
        return str(self.pipe.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def compat_id(self) -> str:
        return compat_hash(self.compat)

    def fingerprint(self) -> dict[str, Any]:
        """What a concept records about the base it was trained on (``studio.base``)."""
        return {"name": self.name, "family": self.family, "identity": self.identity,
                "compat": self.compat, "prediction_type": self.prediction_type}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def family_of_pipeline(pipe: Any) -> str:
    """sdxl when there are two text encoders; sd2 when the UNet uses linear projections (SD 2's
    OpenCLIP-era layout) or the encoder is 1024-d; sd1 otherwise."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if pipe.unet.config.get("use_linear_projection") or pipe.text_encoder.config.hidden_size == 1024:
        return "sd2"
    return "sd1"


def load_base(spec: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
              attention: str = "sdpa", prediction_type: str | None = None, offload: bool = False,
              cache_dir: str | os.PathLike[str] | None = None, revision: str | None = None) -> BaseModel:
    """Load ``spec`` and describe it.

    Args:
        spec: ``tiny`` / ``tiny-v`` / ``tiny-sdxl`` (random offline bases), ``demo`` (the learnable
            world's trained base), a local diffusers folder, a single-file ``.safetensors``
            checkpoint, or a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
        device, dtype: default CUDA fp16 → MPS fp16 → CPU fp32.
        attention: ``sdpa`` (PyTorch scaled-dot-product attention, the default) or ``xformers``.
        prediction_type: override the scheduler's ``epsilon`` / ``v_prediction`` (single files
            cannot always tell).
        offload: CUDA only — keep weights on the CPU and move each component when used.
    """
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = pick_dtype(dev, dtype)
    label = ""
    profile = GENERIC
    if spec in TINY_NAMES:
        pipe = build_tiny_pipeline(spec)
        name, identity = spec, f"builtin:{spec}:v{TINY_BUILD_VERSION}:seed0"
        label = "random weights: this base draws noise (for tests; use --base demo to see learning offline)"
        profile = RANDOM
    elif spec == "demo":
        folder = _demo_dir()
        pipe = _load_folder(folder, dt)
        name, identity = "demo", f"folder:{fingerprint_files(folder)}"
        label = "the offline demo world (32-px toy scenes), not a photographic model"
        profile = profile_for_folder(folder)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipe = _load_folder(path, dt)
            name, identity = path.name, f"folder:{fingerprint_files(path)}"
            profile = profile_for_folder(path)
        elif path.is_file():
            pipe = _load_single(path, dev, dt, prediction_type)
            name, identity = path.stem, f"file:{fingerprint_files(path)}"
        elif _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
            folder, commit = _resolve_hub(spec, revision=revision, cache_dir=cache_dir)
            pipe = _load_folder(folder, dt)
            name, identity = spec, f"hub:{spec}@{commit}"
        else:
            raise BaseModelError(f"Base {spec!r} is not a folder, a file or a hub id; {_OFFLINE_HINT}.")
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
        if any(p.dtype != dt for p in pipe.unet.parameters()):
            pipe.to(dtype=dt)
        pipe.to(dev)
    return describe(pipe, spec=spec, name=name, identity=identity, device=dev, dtype=dt, label=label, profile=profile)


def describe(pipe: Any, *, spec: str, name: str, identity: str, device: torch.device | None = None,
             dtype: torch.dtype | None = None, label: str = "", profile: BaseProfile = GENERIC) -> BaseModel:
    """Wrap an already built pipeline (e.g. one made from config in a test or a benchmark)."""
    family = family_of_pipeline(pipe)
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return BaseModel(pipe=pipe, spec=spec, name=name, family=family, compat=compatibility_key(pipe, family),
                     identity=identity, native_size=native, device=device or pipe.device,
                     dtype=dtype or pipe.unet.dtype, label=label, profile=profile)


def _demo_dir() -> Path:
    try:
        from studio.world import DEMO_BASE_DIR
    except ImportError as err:  # the world package is part of the repo; this means a broken install
        raise BaseModelError(f"The demo world is missing from this install ({err}); reinstall the studio.") from err
    if not (Path(DEMO_BASE_DIR) / "model_index.json").is_file():
        raise BaseModelError(f"The demo base is not built at {DEMO_BASE_DIR}; run python scripts/build_world.py.")
    return Path(DEMO_BASE_DIR)


def _load_folder(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise BaseModelError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder; "
                             "pass the folder that contains model_index.json, or a single .safetensors file.")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                 safety_checker=None, requires_safety_checker=False) \
            if _has_safety_slot(folder) else \
            DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"Could not load the diffusers folder {folder}: {_first_line(err)}") from err
    if type(pipe).__name__ not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise BaseModelError(f"{folder} holds a {type(pipe).__name__}; the studio supports Stable Diffusion "
                             "1.x/2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline).")
    return pipe


def _has_safety_slot(folder: Path) -> bool:
    import json

    index = json.loads((folder / "model_index.json").read_text())
    return "safety_checker" in index


def _load_single(path: Path, device: torch.device, dtype: torch.dtype, prediction_type: str | None) -> Any:
    from studio.models.single_file import load_single_file

    return load_single_file(path, device=torch.device("cpu"), dtype=dtype, prediction_type=prediction_type)


def _resolve_hub(repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The local snapshot folder of ``repo_id`` (downloading it when online) and its commit."""
    from huggingface_hub import snapshot_download

    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None  # the hub takes str | Path
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                        allow_patterns=_HUB_PATTERNS))
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
                                        allow_patterns=_HUB_PATTERNS))
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
