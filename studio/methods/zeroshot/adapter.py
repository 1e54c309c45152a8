"""IP-Adapter inside the studio's shared cross-attention processor: files, image encoder, hooks.

IP-Adapter (Ye et al., 2023) adds **decoupled cross-attention** to every cross-attention layer
(paper eq. 5)::

    Z = Attn(Q, K_txt, V_txt) + λ · Attn(Q, c W'_k, c W'_v),     c = P(e)

where ``e`` is a CLIP image embedding of the reference image (``image_embeds`` (D_e,) for the
base adapter; the penultimate hidden states (257, D_h) for "plus" / "full-face"), ``P`` the
adapter's image projection (Linear + LayerNorm → 4 tokens; a Perceiver resampler → 16 tokens
for "plus"), and ``W'_k``/``W'_v`` the per-layer ``to_k_ip``/``to_v_ip`` weights.

Here the second term is an ``extra`` hook of :mod:`studio.methods.attention` that carries its
own ``W'_k``/``W'_v`` and projection, so it composes with Perfusion, NeTI, TI and LoRA and is
never silently replaced:

* :class:`IPAdapterHook` — an adapter + cached image embeddings (a zero-shot concept or
  ``--reference-image``): the projection runs once per UNet call; the unconditional rows of a
  CFG batch get the negative embeddings (zeros, or the encoder's reading of a black image for
  hidden-state adapters), exactly as diffusers' pipelines do;
* :class:`DiffusersIPAdapterHook` — *passive*: when the studio processors replace diffusers'
  ``IPAdapterAttnProcessor2_0`` (a user called ``pipe.load_ip_adapter``), it runs their image
  attention (tokens from the UNet's ``encoder_hid_proj``, scales, ``ip_adapter_masks``).

Files are read in the published layout (``image_proj.*`` + ``ip_adapter.{2j+1}.to_{k,v}_ip.weight``
in a safetensors file, or a ``.bin`` with those two dicts), the projection is converted by
diffusers' own loader code, and :func:`published_state` writes the inverse so that diffusers'
``load_ip_adapter`` reads what the studio trains.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from studio.errors import IncompatibleConceptError, StudioError
from studio.methods.zeroshot.xlabs import PROJ_PREFIX, from_xlabs, is_flux_state, is_xlabs_key

WEIGHT_NAME = "ip_adapter.safetensors"  # what the adapter trainer writes
IMAGE_ENCODER_DIR = "image_encoder"
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_SIZE = 2  # adapters kept loaded per pipeline (an SDXL adapter is ~700 MB)

# name → (hub repo, path of the weights in the repo, image-encoder folder in the repo)
PRESETS: dict[str, tuple[str, str, str]] = {
    "sd15": ("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors", "models/image_encoder"),
    "sd15-light": ("h94/IP-Adapter", "models/ip-adapter_sd15_light.safetensors", "models/image_encoder"),
    "sd15-plus": ("h94/IP-Adapter", "models/ip-adapter-plus_sd15.safetensors", "models/image_encoder"),
    "sd15-plus-face": ("h94/IP-Adapter", "models/ip-adapter-plus-face_sd15.safetensors", "models/image_encoder"),
    "sd15-full-face": ("h94/IP-Adapter", "models/ip-adapter-full-face_sd15.safetensors", "models/image_encoder"),
    "sdxl": ("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder"),
    "sdxl-vit-h": ("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder"),
    "sdxl-plus": ("h94/IP-Adapter", "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder"),
    "sdxl-plus-face": ("h94/IP-Adapter", "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
                       "models/image_encoder"),
    "flux": ("XLabs-AI/flux-ip-adapter", "ip_adapter.safetensors", ""),  # FLUX.1-dev (XLabs layout; encoder below)
    "sd15-faceid": ("h94/IP-Adapter-FaceID", "ip-adapter-faceid_sd15.bin", ""),
    "sd15-faceid-plus": ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sd15.bin", ""),
    "sdxl-faceid": ("h94/IP-Adapter-FaceID", "ip-adapter-faceid_sdxl.bin", ""),
}

# Presets whose CLIP image encoder lives in another hub repo (owner/repo[/subfolder]).
PRESET_ENCODERS: dict[str, str] = {"flux": "openai/clip-vit-large-patch14"}

FACEID_MESSAGE = ("{what} is an IP-Adapter FaceID model: it reads insightface face-ID embeddings, and insightface "
                  "is not installed in this studio (it cannot be installed here). Use a CLIP-based face adapter "
                  "instead: --adapter sd15-plus-face, sd15-full-face or sdxl-plus-face.")


# -- where the adapter is ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterRef:
    """A resolved adapter: the weights file on disk and where its CLIP image encoder is.

    ``spec`` is what the user gave (a preset, a hub path ``owner/repo/sub/weights.safetensors``, a
    local file or folder); ``image_encoder`` a local folder, ``owner/repo/subfolder`` or None.
    """

    spec: str
    file: Path
    weight_name: str
    image_encoder: str | None

    def describe(self) -> dict[str, Any]:
        """What a zero-shot concept records about the adapter (``zeroshot.adapter``)."""
        from studio.models.keys import fingerprint_files

        return {"source": self.spec, "file": str(self.file), "weight_name": self.weight_name,
                "fingerprint": fingerprint_files(self.file), "image_encoder": self.image_encoder}


def resolve_adapter(spec: str, image_encoder: str | None = None) -> AdapterRef:
    """A preset name, a local weights file, a local folder or a hub path → :class:`AdapterRef`.

    Folders: ``ip_adapter.safetensors`` (what ``train adapter`` writes), else the only
    ``.safetensors``/``.bin`` file with ``image_proj`` keys. Hub paths name the file inside the repo:
    ``h94/IP-Adapter/models/ip-adapter_sd15.safetensors`` (downloaded through huggingface_hub).
    """
    spec = str(spec).strip()
    if not spec:
        raise StudioError("No adapter given: pass --adapter with a preset (sd15, sd15-plus, sdxl, …), an adapter "
                          "file or folder, or a hub path such as h94/IP-Adapter/models/ip-adapter_sd15.safetensors.")
    if spec in PRESETS:
        repo, path, encoder = PRESETS[spec]
        if "faceid" in spec:
            raise StudioError(FACEID_MESSAGE.format(what=f"Adapter preset {spec!r}"))
        encoder = PRESET_ENCODERS.get(spec) or f"{repo}/{encoder}"
        return AdapterRef(spec, _download(repo, path), Path(path).name, image_encoder or encoder)
    local = Path(spec).expanduser()
    if local.is_file():
        return AdapterRef(spec, local.resolve(), local.name, image_encoder or _find_encoder(local))
    if local.is_dir():
        file = _weights_in_folder(local)
        return AdapterRef(spec, file.resolve(), file.name, image_encoder or _find_encoder(file) or _recorded_encoder(local))
    parts = spec.split("/")
    if len(parts) >= 3 and _HUB_REPO.match("/".join(parts[:2])) and parts[-1].endswith((".safetensors", ".bin")):
        repo, path = "/".join(parts[:2]), "/".join(parts[2:])
        if "faceid" in path.lower():
            raise StudioError(FACEID_MESSAGE.format(what=spec))
        sub = str(Path(path).parent)
        guess = f"{repo}/{sub}/{IMAGE_ENCODER_DIR}" if sub != "." else f"{repo}/{IMAGE_ENCODER_DIR}"
        return AdapterRef(spec, _download(repo, path), Path(path).name, image_encoder or guess)
    raise StudioError(f"Adapter {spec!r} is neither a preset ({', '.join(p for p in PRESETS if 'faceid' not in p)}), "
                      "an existing file or folder, nor a hub path like h94/IP-Adapter/models/ip-adapter_sd15.safetensors.")


def _download(repo: str, path: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, path))
    except Exception as err:  # noqa: BLE001 - any hub failure is the same actionable message
        raise StudioError(f"Could not fetch {path} from the hub repo {repo} ({type(err).__name__}); without internet, "
                          "download the adapter elsewhere and pass its local file with --adapter PATH.") from None


def _weights_in_folder(folder: Path) -> Path:
    if (folder / WEIGHT_NAME).is_file():
        return folder / WEIGHT_NAME
    found = [p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin") and _looks_like_adapter(p)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise StudioError(f"{folder} holds no IP-Adapter weights (a .safetensors or .bin file with image_proj.* and "
                          "ip_adapter.* tensors).")
    raise StudioError(f"{folder} holds several adapters ({', '.join(p.name for p in found)}); pass the file itself.")


def _looks_like_adapter(path: Path) -> bool:
    if path.suffix == ".bin":
        return "ip" in path.name.lower() or "adapter" in path.name.lower()
    from studio.concept import read_header
    from studio.errors import ConceptFormatError

    try:
        header, _ = read_header(path)
    except ConceptFormatError:
        return False
    if any(k.startswith(PROJ_PREFIX) for k in header) and any(is_xlabs_key(k) for k in header):
        return True  # a FLUX adapter in XLabs' layout
    return any(k.startswith("image_proj.") for k in header) and any(k.startswith("ip_adapter.") for k in header)


def _recorded_encoder(folder: Path) -> str | None:
    """The encoder a ``train adapter`` folder names in ``studio_adapter.json`` (when it holds no copy)."""
    try:
        rec = json.loads((folder / "studio_adapter.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    enc = rec.get("image_encoder") if isinstance(rec, dict) else None
    return str(enc) if enc else None


def _find_encoder(weights: Path) -> str | None:
    """The image-encoder folder beside a weights file, the hub layout (``models/image_encoder``) included."""
    here, up = weights.parent, weights.parent.parent
    for cand in (here / IMAGE_ENCODER_DIR, up / IMAGE_ENCODER_DIR, up / "models" / IMAGE_ENCODER_DIR,
                 up / "sdxl_models" / IMAGE_ENCODER_DIR):
        if (cand / "config.json").is_file():
            return str(cand.resolve())
    return None


# -- reading and converting weights ---------------------------------------------------------------------
def read_adapter_state(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a safetensors file (prefixed keys; a FLUX
    adapter's XLabs names are read as diffusers reads them, :mod:`studio.methods.zeroshot.xlabs`) or a
    ``.bin`` (read with ``weights_only=True``: nothing is unpickled)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from studio import safetensors_io as sio

        # The studio's validating reader: float weights (published adapters are fp16/fp32; a "plus"
        # SDXL adapter is ~1 GB), bounded before allocation, finite.
        flat, _ = sio.read_file(path, sio.Limits(dtypes=sio.FLOATS, max_bytes=8 * sio.GIB), error=StudioError)
        state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        if any(is_xlabs_key(k) for k in flat):
            state = from_xlabs(flat, what=str(path))  # a FLUX adapter
        else:
            for k, v in flat.items():
                head, _, rest = k.partition(".")
                if head in state:
                    state[head][rest] = v
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickles fail in many ways; one message
            raise StudioError(f"{path} is not a readable IP-Adapter .bin file ({type(err).__name__}).") from None
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise StudioError(f"{path} is not an IP-Adapter: it needs image_proj.* and ip_adapter.* weights.")
    return state


def adapter_kind(image_proj: dict[str, torch.Tensor]) -> str:
    """``base`` | ``full`` | ``plus`` | ``faceid`` | ``faceid-plus``, by diffusers' own key rules."""
    if "proj.weight" in image_proj:
        return "base"
    if "proj.3.weight" in image_proj:
        return "full"
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "faceid-plus"
    if "norm.weight" in image_proj:
        return "faceid"
    if "latents" in image_proj:
        return "plus"
    raise StudioError(f"Unknown IP-Adapter projection (keys {sorted(image_proj)[:4]}…).")


@dataclass(frozen=True)
class AdapterInfo:
    """What the image projection expects and produces (read from the weights alone)."""

    kind: str
    embed_dim: int  # width of the CLIP features it reads
    hidden_states: bool  # True: penultimate hidden states (N, T, D); False: image_embeds (N, D)
    num_tokens: int  # image tokens per reference image
    token_dim: int  # width of the image tokens (= the UNet's cross_attention_dim)
    n_layers: int  # cross-attention layers with to_k_ip / to_v_ip (FLUX: double-stream blocks)
    layout: str = "unet"  # "unet" (published h94 layout) | "flux" (XLabs' FLUX layout, biased to_k_ip / to_v_ip)

    @property
    def family(self) -> str:
        if self.layout == "flux":
            return "flux"
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(self.token_dim, "")


def adapter_info(state: dict[str, dict[str, torch.Tensor]], what: str = "the adapter") -> AdapterInfo:
    if is_flux_state(state):
        return flux_info(state, what)
    ip, sd = state["image_proj"], state["ip_adapter"]
    kind = adapter_kind(ip)
    if kind.startswith("faceid"):
        raise StudioError(FACEID_MESSAGE.format(what=what))
    if kind == "base":
        embed, tokens, width = ip["proj.weight"].shape[1], 4, ip["proj.weight"].shape[0] // 4
    elif kind == "full":
        embed, tokens, width = ip["proj.0.weight"].shape[0], 257, ip["proj.3.weight"].shape[0]
    else:
        embed, tokens, width = ip["proj_in.weight"].shape[1], ip["latents"].shape[1], ip["proj_out.weight"].shape[0]
    n = sum(1 for k in sd if k.endswith(".to_k_ip.weight"))
    return AdapterInfo(kind, int(embed), kind != "base", int(tokens), int(width), n)


def flux_info(state: dict[str, dict[str, torch.Tensor]], what: str = "the adapter") -> AdapterInfo:
    """What a FLUX adapter (XLabs layout) reads and makes: ``image_embeds`` of width D_e → T tokens of width
    D_t (T = rows of ``proj`` / width of ``norm``; diffusers' loader reads the same T for every file it loads)."""
    ip = state["image_proj"]
    if set(ip) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        raise StudioError(f"{what} is a FLUX IP-Adapter with an image projection of another kind (keys "
                          f"{sorted(ip)[:4]}); only the linear projection (proj + norm) of XLabs' layout is supported.")
    w, b, norm = ip["proj.weight"], ip["proj.bias"], ip["norm.weight"]
    width = int(norm.shape[0]) if norm.ndim == 1 else 0
    if w.ndim != 2 or width < 1 or w.shape[0] % width or tuple(b.shape) != (w.shape[0],):
        raise StudioError(f"{what}: its image projection ({tuple(w.shape)}, norm {tuple(norm.shape)}) is inconsistent.")
    n = sum(1 for k in state["ip_adapter"] if k.endswith(".to_k_ip.weight"))
    return AdapterInfo("base", int(w.shape[1]), False, int(w.shape[0]) // width, width, n, layout="flux")


def ip_key_ids(unet: Any) -> dict[str, int]:
    """Cross-attention layer name → the number of its ``ip_adapter.{id}.to_k_ip`` weights.

    The published numbering counts every attention processor in ``unet.attn_processors`` order
    (down, up, mid): self-attention even, cross-attention odd — what diffusers' loader assumes.
    """
    ids, key_id = {}, 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            ids[name[: -len(".processor")]] = key_id
            key_id += 2
    return ids


@dataclass
class LoadedAdapter:
    """An adapter ready to run: the projection and per-layer ``to_k_ip``/``to_v_ip`` in the order of
    the store's layers (execution order)."""

    ref: AdapterRef | None
    info: AdapterInfo
    projection: nn.Module  # (B, D_e) or (B, T, D_h) → (B, num_tokens, token_dim)
    to_k_ip: nn.ModuleList  # per layer: Linear(token_dim → inner, bias=False)
    to_v_ip: nn.ModuleList
    fingerprint: str = ""

    def parameters(self) -> list[nn.Parameter]:
        return [*self.projection.parameters(), *self.to_k_ip.parameters(), *self.to_v_ip.parameters()]

    def to_eval(self) -> LoadedAdapter:
        """Inference mode: eval, no gradients (a trainer turns gradients back on for what it trains)."""
        for m in (self.projection, self.to_k_ip, self.to_v_ip):
            m.eval().requires_grad_(False)
        return self


def build_adapter(unet: Any, state: dict[str, dict[str, torch.Tensor]], *, ref: AdapterRef | None = None,
                  what: str = "the adapter") -> LoadedAdapter:
    """Turn a published state dict into modules for ``unet``, checking every width against it."""
    from studio.methods.attention import unet_layers

    info = adapter_info(state, what)
    if info.layout != "unet":
        raise IncompatibleConceptError(f"{what} is a FLUX.1 IP-Adapter (XLabs layout); load a FLUX.1 base to use it, "
                                       "or pass an adapter made for this UNet base.")
    layers = unet_layers(unet)
    if info.n_layers != len(layers):
        raise IncompatibleConceptError(
            f"{what} has image attention for {info.n_layers} cross-attention layers but the base has {len(layers)}: "
            f"it was made for another model family ({info.family or 'unknown'}).")
    if info.token_dim != layers[0].context_dim:
        raise IncompatibleConceptError(
            f"{what} makes {info.token_dim}-d image tokens but the base's cross-attention reads {layers[0].context_dim}-d "
            f"states: it was made for {info.family or 'another model family'}.")
    convert = getattr(unet, "_convert_ip_adapter_image_proj_to_diffusers", None)
    if convert is None:
        raise StudioError("This diffusers version cannot convert IP-Adapter projections; install diffusers ≥ 0.27.")
    projection = convert(state["image_proj"], low_cpu_mem_usage=False)
    ids = ip_key_ids(unet)
    ks, vs = nn.ModuleList(), nn.ModuleList()
    for layer in layers:
        key_id = ids[layer.name]
        for bank, which in ((ks, "to_k_ip"), (vs, "to_v_ip")):
            w = state["ip_adapter"].get(f"{key_id}.{which}.weight")
            if w is None or tuple(w.shape) != (layer.inner_dim, info.token_dim):
                got = None if w is None else tuple(w.shape)
                raise IncompatibleConceptError(
                    f"{what}: {which} of layer {layer.name} (weights {key_id}) is {got}, the base needs "
                    f"{(layer.inner_dim, info.token_dim)}; the adapter was made for another UNet.")
            lin = nn.Linear(info.token_dim, layer.inner_dim, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w.float())
            bank.append(lin)
    fp = ""
    if ref is not None:
        from studio.models.keys import fingerprint_files

        fp = fingerprint_files(ref.file)
    return LoadedAdapter(ref, info, projection.float(), ks, vs, fp).to_eval()


def move(adapter: LoadedAdapter, device: torch.device | str, dtype: torch.dtype) -> LoadedAdapter:
    for m in (adapter.projection, adapter.to_k_ip, adapter.to_v_ip):
        m.to(device=device, dtype=dtype)
    return adapter


def load_adapter(pipe: Any, ref: AdapterRef, *, cache: bool = True,
                 build: Callable[..., LoadedAdapter] | None = None) -> LoadedAdapter:
    """Load ``ref`` for ``pipe``'s UNet (device and dtype of the UNet) — or, with ``build`` (FLUX.1:
    ``studio.methods.zeroshot.flux.build_flux_adapter``), for its transformer. With ``cache`` the last few
    adapters stay loaded on the pipeline (keyed by the file's fingerprint), so generating again
    does not re-read hundreds of megabytes."""
    from studio.models.keys import fingerprint_files

    denoiser = pipe.unet if build is None else pipe.transformer
    fp = fingerprint_files(ref.file)
    store: dict[str, LoadedAdapter] = pipe.__dict__.setdefault("_studio_ip_adapters", {})
    if cache and fp in store:
        store[fp] = store.pop(fp)  # most recently used last
        return store[fp]
    adapter = (build or build_adapter)(denoiser, read_adapter_state(ref.file), ref=ref, what=f"Adapter {ref.spec}")
    move(adapter, denoiser.device, denoiser.dtype)
    if cache:
        store[fp] = adapter
        while len(store) > _CACHE_SIZE:
            store.pop(next(iter(store)))
    return adapter


# -- writing weights in the published layout ------------------------------------------------------------
def published_projection(kind: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of diffusers' ``_convert_ip_adapter_image_proj_to_diffusers`` for base, full and plus."""
    out: dict[str, torch.Tensor] = {}
    if kind == "base":
        return {k.replace("image_embeds.", "proj."): v for k, v in sd.items()}
    if kind == "full":
        for k, v in sd.items():
            k = k.replace("ff.net.0.proj.", "proj.0.").replace("ff.net.2.", "proj.2.")
            out[k.replace("norm.", "proj.3.") if k.startswith("norm.") else k] = v
        return out
    if kind != "plus":
        raise StudioError(f"Cannot write a {kind} IP-Adapter projection.")
    for k, v in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", k)
        if m is None:
            out[k] = v  # latents, proj_in, proj_out, norm_out
            continue
        i, rest = m.groups()
        table = {"ln0.": "0.norm1.", "ln1.": "0.norm2.", "attn.to_q.": "0.to_q.", "attn.to_out.0.": "0.to_out.",
                 "ff.0.": "1.0.", "ff.1.net.0.proj.": "1.1.", "ff.1.net.2.": "1.3."}
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([v, sd[f"layers.{i}.attn.to_v.weight"]], dim=0)
            continue
        if rest.startswith("attn.to_v."):
            continue
        for a, b in table.items():
            if rest.startswith(a):
                out[f"layers.{i}.{b}{rest[len(a):]}"] = v
                break
        else:
            raise StudioError(f"Cannot write projection weight {k!r} in the published layout.")
    return out


def published_state(unet: Any, adapter: LoadedAdapter) -> dict[str, torch.Tensor]:
    """The adapter as the flat published state dict (``image_proj.*`` + ``ip_adapter.*``) that
    diffusers' ``load_ip_adapter`` reads. CPU float32, contiguous."""
    from studio.methods.attention import unet_layers

    flat = {f"image_proj.{k}": v for k, v in published_projection(adapter.info.kind,
                                                                     adapter.projection.state_dict()).items()}
    ids = ip_key_ids(unet)
    for layer, k, v in zip(unet_layers(unet), adapter.to_k_ip, adapter.to_v_ip):
        flat[f"ip_adapter.{ids[layer.name]}.to_k_ip.weight"] = cast(nn.Linear, k).weight
        flat[f"ip_adapter.{ids[layer.name]}.to_v_ip.weight"] = cast(nn.Linear, v).weight
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in flat.items()}


def save_adapter_file(path: str | Path, flat: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a published-layout adapter atomically (``.safetensors``)."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata or {})
    return Path(path)


def new_adapter(unet: Any, embed_dim: int, *, num_tokens: int = 4, seed: int = 0) -> LoadedAdapter:
    """A fresh base-kind adapter for ``unet`` reading ``embed_dim``-d image embeddings: the
    projection at PyTorch's default init, ``to_k_ip``/``to_v_ip`` copied from each layer's text
    ``to_k``/``to_v`` (the paper's initialisation)."""
    from diffusers.models.embeddings import ImageProjection

    from studio.methods.attention import unet_layers

    layers = unet_layers(unet)
    width = layers[0].context_dim
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        projection = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=width,
                                     num_image_text_embeds=num_tokens)
    finally:
        torch.random.set_rng_state(state)
    ks, vs = nn.ModuleList(), nn.ModuleList()
    for layer in layers:
        attn = unet.get_submodule(layer.name)
        for bank, src in ((ks, attn.to_k), (vs, attn.to_v)):
            lin = nn.Linear(width, layer.inner_dim, bias=False)
            with torch.no_grad():
                lin.weight.copy_(src.weight.float())
            bank.append(lin)
    info = AdapterInfo("base", embed_dim, False, num_tokens, width, len(layers))
    return LoadedAdapter(None, info, projection.float(), ks, vs).to_eval()


# -- the CLIP image encoder ------------------------------------------------------------------------------
def mask_tensor(image: Any, max_side: int = 64) -> torch.Tensor:
    """A mask image (white = where the reference acts) → (H, W) float32 in {0, 1}, at most ``max_side``
    pixels a side with the image's aspect ratio, as diffusers' ``IPAdapterMaskProcessor`` binarises it
    (each layer resizes it to its own grid; a mask of another aspect ratio than the output is padded)."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    w, h = image.size
    f = max_side / max(w, h)
    size = (max(8, round(h * f) // 8 * 8), max(8, round(w * f) // 8 * 8))
    return IPAdapterMaskProcessor().preprocess([image.convert("L")], height=size[0], width=size[1])[0, 0]
