"""The modules a memory estimate counts (:mod:`trainers.memory`): a loaded base's, or the same
architecture built from configs on the meta device — no weights read, so SD 1.5 or SDXL are
estimated in a second on any machine.

:func:`layout_of` accepts a loaded :class:`~studio.models.BaseModel`, a diffusers pipeline, a
:class:`BaseLayout` or a spec string (:func:`layout_for_spec`): ``tiny`` / ``tiny-v`` /
``tiny-sdxl`` (built, they are small), ``demo``, ``sd15`` / ``sd2`` / ``sd2-v`` / ``sdxl`` (the
published architectures, from the configs shipped in ``studio/models/configs/``), a diffusers
folder, a single-file ``.safetensors`` checkpoint (its family read from the header), or a hub id
whose configs are in the local Hugging Face cache (or one of the published ids named in
:data:`KNOWN_HUB_IDS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.devices import pick_device, pick_dtype
from studio.errors import StudioError
from studio.methods.runtime import text_encoders
from studio.models.single_file import CONFIG_ROOT, read_safetensors_header, shipped_config_dir
from studio.models.tiny import TINY_NAMES, build_tiny_pipeline
from trainers.memory_trace import quiet_cast

# Names of the shipped config folders (the published architectures), and their aliases.
CONFIG_NAMES = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2-v", "sdxl": "sdxl"}
# Hub ids of the published bases whose architecture the shipped configs are.
KNOWN_HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1", "runwayml/stable-diffusion-v1-5": "sd1",
    "CompVis/stable-diffusion-v1-4": "sd1", "stabilityai/stable-diffusion-2-1-base": "sd2",
    "stabilityai/stable-diffusion-2-1": "sd2-v", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}
_TEXT = ("text_encoder", "text_encoder_2")


@dataclass
class BaseLayout:
    """A base's UNet, VAE and text encoder(s) — real modules or on the meta device — with the
    dtype and device its weights have (or would have) for training."""

    name: str
    unet: Any  # diffusers / transformers models: their configs are untyped
    vae: Any
    text_encoders: list[Any]
    native_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel (8 on Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)


def layout_of(base: Any, *, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None) -> BaseLayout:
    """The :class:`BaseLayout` of ``base`` (see the module docstring). ``device``/``dtype`` override
    what the base has; for a spec they default as loading would: best device, fp16 on a GPU, fp32 on CPU."""
    if isinstance(base, BaseLayout):
        out = base
    elif hasattr(base, "pipe"):  # a loaded BaseModel
        out = _from_pipe(base.pipe, base.name, base.native_size, base.dtype, base.device)
    elif hasattr(base, "unet"):  # a diffusers pipeline
        native = int(base.unet.config.sample_size) * int(base.vae_scale_factor)
        out = _from_pipe(base, type(base).__name__, native, base.unet.dtype, base.unet.device)
    elif isinstance(base, str):
        return layout_for_spec(base, device=device, dtype=dtype)
    else:
        raise StudioError(f"Cannot estimate memory for a {type(base).__name__}: pass a loaded base, a pipeline or "
                          "a base spec (sd15, sdxl, a folder, a .safetensors file).")
    dev = torch.device(device) if device is not None else out.device
    return replace(out, device=dev, dtype=pick_dtype(dev, dtype) if dtype is not None else out.dtype)


def layout_for_spec(spec: str, *, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None) -> BaseLayout:
    """The layout of a base spec without loading weights (module docstring). Errors say what works."""
    dev = torch.device(device) if isinstance(device, (str, torch.device)) and str(device) != "auto" \
        else pick_device(None)
    dt = pick_dtype(dev, dtype)
    if spec in TINY_NAMES:
        pipe = build_tiny_pipeline(spec)
        return _from_pipe(pipe, spec, int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor), dt, dev)
    folder = _config_folder(spec)
    index = json.loads((folder / "model_index.json").read_text())
    return _from_folder(folder, index, spec, dt, dev)


def _config_folder(spec: str) -> Path:
    if spec in CONFIG_NAMES:
        return CONFIG_ROOT / CONFIG_NAMES[spec]
    if spec == "demo":
        from studio.world import DEMO_BASE_DIR

        return Path(DEMO_BASE_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise StudioError(f"{path} has no model_index.json: pass a diffusers folder, a .safetensors file, or "
                              f"a layout name ({', '.join(CONFIG_NAMES)}).")
        return path
    if path.is_file():
        from studio.models.families import detect_family

        shapes, meta = read_safetensors_header(path)
        info = detect_family(shapes, meta, source=path.name)
        return shipped_config_dir(info.family, info.prediction_type or "epsilon")
    if spec in KNOWN_HUB_IDS:
        return CONFIG_ROOT / KNOWN_HUB_IDS[spec]
    cached = _hub_cache_folder(spec)
    if cached is not None:
        return cached
    raise StudioError(f"Cannot read the configs of {spec!r} without downloading it: pass a local folder or "
                      f".safetensors file, or the layout of its architecture ({', '.join(CONFIG_NAMES)}).")


def _hub_cache_folder(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` when its model_index.json and component configs are there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    if repo_id.count("/") != 1:
        return None
    found = try_to_load_from_cache(repo_id, "model_index.json")
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    return folder if (folder / "unet" / "config.json").is_file() else None


def _from_pipe(pipe: Any, name: str, native: int, dtype: torch.dtype, device: torch.device) -> BaseLayout:
    return BaseLayout(name=name, unet=pipe.unet, vae=pipe.vae, text_encoders=[te for _, te in text_encoders(pipe)],
                      native_size=native, dtype=dtype, device=device)


def _from_folder(folder: Path, index: dict[str, Any], name: str, dtype: torch.dtype, device: torch.device) -> BaseLayout:
    """UNet, VAE and text encoder(s) of a diffusers-style config folder, built on the meta device."""
    import diffusers
    import transformers

    models: dict[str, Any] = {}
    with torch.device("meta"):
        for part in ("unet", "vae", *_TEXT):
            entry = index.get(part)
            if not isinstance(entry, list) or entry[0] is None:
                continue
            library, class_name = entry
            try:
                if library == "diffusers":
                    cls: Any = getattr(diffusers, class_name)
                    models[part] = cls.from_config(cls.load_config(str(folder / part)))
                else:
                    cls = getattr(transformers, class_name)
                    config = cls.config_class.from_pretrained(str(folder / part), local_files_only=True)
                    models[part] = cls._from_config(config)
            except (AttributeError, OSError, ValueError, TypeError) as err:
                raise StudioError(f"{folder} has an unusable {part} config ({str(err).splitlines()[0]}).") from None
    missing = {"unet", "vae", "text_encoder"} - set(models)
    if missing:
        raise StudioError(f"{folder} lacks {', '.join(sorted(missing))}: not a Stable Diffusion config folder.")
    unet = models["unet"]
    native = int(unet.config.sample_size) * 2 ** (len(models["vae"].config.block_out_channels) - 1)
    for m in models.values():
        quiet_cast(m, dtype)
    return BaseLayout(name=name, unet=unet, vae=models["vae"], text_encoders=[models[t] for t in _TEXT if t in models],
                      native_size=native, dtype=dtype, device=device)
