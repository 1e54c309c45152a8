"""Zero-shot concepts: reference images' CLIP embeddings + the IP-Adapter that reads them.

A zero-shot concept is made in seconds from 1–N photos with no training (docs/methods.md §6): the
photos go through the adapter's CLIP image encoder **once**; the file keeps the embeddings, so
using the concept later needs neither the photos nor an image-encoder pass.

Tensors:

* ``zeroshot.image_embeds`` — ``(N, D_e)`` CLIP ``image_embeds`` (base adapters) or ``(N, T, D_h)``
  penultimate hidden states ("plus", "full-face"), one row per reference image, or a single row
  with ``average`` (the mean over the images);
* ``zeroshot.negative_embeds`` — ``(1, …)`` what the unconditional half of a CFG batch sees: zeros
  for base adapters, the encoder's reading of a black image for hidden-state adapters (as
  diffusers' ``encode_image``);
* ``zeroshot.mask`` (optional) — ``(H, W)`` in {0, 1}: where in the picture the reference acts (white),
  resized to every layer's grid as diffusers' ``ip_adapter_masks`` are.

Metadata ``zeroshot.adapter`` (JSON): the adapter as given (``source``: preset, hub path, file or
folder), the resolved ``file``, ``weight_name``, a content ``fingerprint``, its ``kind``, the
``image_encoder`` that made the embeddings and the widths; ``zeroshot.layer_scales`` (optional
JSON): a diffusers ``set_ip_adapter_scale`` per-layer config (InstantStyle-like block selection).

**Strength** = the adapter scale λ of the decoupled attention (``studio.strength`` stores the
scale it was made with); 0 = off: nothing is installed, the output is exactly the plain pipeline.
Several reference images of one concept attend as one token sequence (diffusers' behaviour for a
list of images per adapter). The trigger token only names the concept in prompts (``<dog:0.6>``
sets the strength); it is rewritten to the class word, since the image carries the identity.

Bases: SD 1.x / 2.x / SDXL (the image term is an ``extra`` hook of the shared cross-attention
processor) and FLUX.1 (XLabs-layout adapters, the image term added in every double-stream block:
:mod:`studio.methods.zeroshot.flux`). SD 3 is refused in one sentence (:func:`check_family`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods.attention import add_hook, remove_hook, store_of
from studio.methods.base import class_word_text
from studio.methods.zeroshot.adapter import (
    WEIGHT_NAME,
    AdapterRef,
    LoadedAdapter,
    adapter_info,
    load_adapter,
    mask_tensor,
    read_adapter_state,
    resolve_adapter,
)
from studio.methods.zeroshot.encoder import check_encoder, load_image_encoder
from studio.methods.zeroshot.flux import AppliedFluxZeroShot, apply_flux, build_flux_adapter
from studio.methods.zeroshot.hook import IPAdapterHook, layer_scales
from studio.safetensors_io import FLOATS, GIB, Limits, check_values, loads_json

if TYPE_CHECKING:
    from PIL import Image

    from studio.concept import Concept
    from studio.models import BaseModel

EMBEDS = "zeroshot.image_embeds"
NEGATIVE = "zeroshot.negative_embeds"
MASK = "zeroshot.mask"
META_ADAPTER = "zeroshot.adapter"
META_LAYER_SCALES = "zeroshot.layer_scales"
REFERENCE_TOKEN = "<reference>"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# Default adapters per base family (hub presets; the demo world ships its own).
DEFAULT_ADAPTERS = {"sd1": "sd15", "sdxl": "sdxl", "flux": "flux"}


def check_family(base: Any) -> None:
    """Refuse, in one sentence, a base family the studio has no IP-Adapter for (SD 3 / 3.5)."""
    if getattr(base, "family", "") == "sd3":
        raise IncompatibleConceptError(
            "IP-Adapter image prompts work through a UNet's cross-attention layers or FLUX.1's double-stream blocks, "
            "and the studio has no IP-Adapter for Stable Diffusion 3/3.5 bases yet, so they cannot be applied to "
            f"{getattr(base, 'name', '?')}; load an SD 1.x, 2.x or SDXL base or a FLUX.1 base to use them.")


def check_trainable(base: Any) -> None:
    """Refuse, in one sentence, fine-tuning an adapter where the studio cannot (SD 3, FLUX.1)."""
    check_family(base)
    if getattr(base, "family", "") == "flux":
        raise IncompatibleConceptError(
            "Fine-tuning an IP-Adapter on FLUX.1 bases is not supported (zero-shot concepts with a FLUX IP-Adapter "
            "such as --adapter flux do apply there); load an SD 1.x, 2.x or SDXL base to train one.")


def adapter_record(concept: Concept) -> dict[str, Any]:
    raw = concept.meta.get(META_ADAPTER, "")
    try:
        rec = loads_json(raw, where=f"metadata {META_ADAPTER}") if raw else None  # depth-limited
    except ConceptFormatError:
        rec = None
    if not isinstance(rec, dict) or not isinstance(rec.get("source"), str) or not rec["source"]:
        raise ConceptFormatError(f"Zero-shot concept {concept.name or concept.trigger} does not say which adapter made "
                                 f"it (metadata {META_ADAPTER} is missing or invalid).")
    return rec


@dataclass
class AppliedZeroShot:
    concept: Concept
    unet: Any
    key: str | None
    hook: IPAdapterHook | None = None

    def prompt_text(self) -> str:
        return class_word_text(self.concept)

    def remove(self) -> None:
        if self.hook is not None:
            assert self.key is not None  # apply sets both, or neither
            self.hook.detach()
            remove_hook(self.unet, self.key)
            self.hook = None


def install(base: BaseModel, adapter: LoadedAdapter, embeds: torch.Tensor, negative: torch.Tensor, *, key: str,
            scale: float, scales: float | dict | None = None, mask: torch.Tensor | None = None) -> IPAdapterHook:
    """Add the adapter's image attention to ``base``'s UNet under ``key``.

    embeds: (n_img, D_e) or (n_img, T, D_h) — all images of one concept attend together;
    negative: (1, …); mask: (H, W) or None. Returns the hook (``hook.detach()`` + ``remove_hook(unet, key)`` undo it).
    """
    unet = base.pipe.unet
    dev, dtype = unet.device, unet.dtype
    n_img = embeds.shape[0]
    masks = None if mask is None else mask.to(dev, dtype).expand(1, n_img, *mask.shape[-2:])  # (1, n_img, H, W)
    hook = IPAdapterHook(adapter, embeds.unsqueeze(0).to(dev, dtype),
                         negative.expand(n_img, *negative.shape[1:]).unsqueeze(0).to(dev, dtype),
                         scale=scale, mask=masks)
    store = add_hook(unet, key, hook)
    try:
        hook.scales = layer_scales(unet, store.layers, scales) if scales is not None else None
        hook.attach(unet)
    except BaseException:
        remove_hook(unet, key)
        raise
    return hook


class ZeroShot:
    name: ClassVar[str] = "zeroshot"
    importers: ClassVar[tuple] = ()  # no other tool writes this method's files
    exporters: ClassVar[dict] = {}
    embedding_guard: ClassVar[bool] = True  # its first tensor could pass for an embedding in ComfyUI (docs/architecture.md)
    trigger_is_subject: ClassVar[bool] = False  # the trigger goes with the class noun
    description: ClassVar[str] = "IP-Adapter image prompt: reference-image embeddings, no training (kilobytes to a few MB)"
    # Files: float16/bfloat16/float32. A "plus" adapter keeps (257, 1280) floats per photo (1.3 MB);
    # 1 GiB allows hundreds of photos and still refuses absurd headers before any allocation.
    file_limits: ClassVar[Limits] = Limits(dtypes=FLOATS, max_bytes=1 * GIB)
    # CLIP image embeddings / hidden states: a few units, outlier channels a few hundred; 1e4 refuses
    # values that overflow the fp16 attention. The mask is in [0, 1].
    max_abs: ClassVar[float] = 1e4

    def validate(self, concept: Concept) -> None:
        keys = set(concept.tensors)
        if not {EMBEDS, NEGATIVE} <= keys <= {EMBEDS, NEGATIVE, MASK}:
            raise ConceptFormatError(f"A zero-shot concept holds {EMBEDS} and {NEGATIVE} (and optionally {MASK}); this "
                                     f"one holds {sorted(keys)}.")
        m = concept.tensors.get(MASK)
        if m is not None and (m.ndim != 2 or min(m.shape) < 1 or not m.is_floating_point()):
            raise ConceptFormatError(f"A zero-shot mask is a float (H, W) tensor, got {m.dtype} {tuple(m.shape)}.")
        e, n = concept.tensors[EMBEDS], concept.tensors[NEGATIVE]
        if e.ndim not in (2, 3) or min(e.shape) < 1 or n.shape != (1, *e.shape[1:]) or not e.is_floating_point():
            raise ConceptFormatError(f"Zero-shot embeddings must be (N, D) or (N, T, D) floats with a (1, …) negative; "
                                     f"got {tuple(e.shape)} and {tuple(n.shape)}.")
        check_values(concept.tensors, f"Zero-shot concept {concept.name or concept.trigger}", dtypes=FLOATS,
                     max_abs=self.max_abs)
        if m is not None and not bool(((m >= 0) & (m <= 1)).all()):
            raise ConceptFormatError(f"Zero-shot concept {concept.name or concept.trigger}: {MASK} must lie in [0, 1].")
        if len(concept.tokens) != 1 or not concept.tokens[0]:
            raise ConceptFormatError("A zero-shot concept has exactly one trigger token.")
        adapter_record(concept)
        if META_LAYER_SCALES in concept.meta:
            scales = loads_json(concept.meta[META_LAYER_SCALES],
                                where=f"Zero-shot concept {concept.name}: {META_LAYER_SCALES}")  # depth-limited
            number = isinstance(scales, (int, float)) and not isinstance(scales, bool)
            if not (isinstance(scales, dict) or (number and math.isfinite(scales))):
                raise ConceptFormatError(f"Zero-shot concept {concept.name}: {META_LAYER_SCALES} must be a finite number "
                                         "or a per-block object.")

    def adapter(self, concept: Concept, base: BaseModel) -> LoadedAdapter:
        """The concept's adapter, loaded for ``base`` (cached on the pipeline)."""
        rec = adapter_record(concept)
        label = concept.name or concept.trigger
        try:
            ref = resolve_adapter(rec["source"], rec.get("image_encoder"))
        except StudioError:
            file = Path(rec.get("file") or "")
            if not file.is_file():
                raise StudioError(f"Zero-shot concept {label} needs the adapter {rec['source']}, which is not "
                                  "available here; put the adapter file back or recreate the concept with "
                                  "`concepts create-zeroshot --adapter …`.") from None
            ref = AdapterRef(rec["source"], file, rec.get("weight_name", file.name), rec.get("image_encoder"))
        adapter = load_adapter(base.pipe, ref, build=build_flux_adapter if base.family == "flux" else None)
        if rec.get("fingerprint") and adapter.fingerprint and rec["fingerprint"] != adapter.fingerprint:
            warnings.warn(f"{label}: the adapter at {ref.file} changed since the concept was made (fingerprint "
                          f"{rec['fingerprint']} → {adapter.fingerprint}); results may differ.", stacklevel=2)
        return adapter

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        check_family(base)  # SD 3: one clear sentence
        self._check_embeds(concept, self.adapter(concept, base))

    @staticmethod
    def _check_embeds(concept: Concept, adapter: LoadedAdapter) -> None:
        e = concept.tensors[EMBEDS]
        info = adapter.info
        if (e.ndim == 3) != info.hidden_states or e.shape[-1] != info.embed_dim:
            want = f"(N, T, {info.embed_dim}) hidden states" if info.hidden_states else f"(N, {info.embed_dim}) embeddings"
            raise IncompatibleConceptError(f"Zero-shot concept {concept.name or concept.trigger} holds "
                                           f"{tuple(e.shape)} embeddings but its adapter reads {want}.")

    def apply(self, base: BaseModel, concept: Concept, *, strength: float) -> AppliedZeroShot | AppliedFluxZeroShot:
        check_family(base)
        if base.family == "flux":
            return self._apply_flux(base, concept, strength)
        unet = base.pipe.unet
        if strength == 0:
            return AppliedZeroShot(concept, unet, None)
        adapter = self.adapter(concept, base)
        self._check_embeds(concept, adapter)
        key = f"zeroshot:{concept.trigger}"
        store = store_of(unet)
        if store is not None and key in store.hooks:
            raise StudioError(f"Zero-shot concept {concept.trigger} is already applied.")
        scales = json.loads(concept.meta[META_LAYER_SCALES]) if META_LAYER_SCALES in concept.meta else None
        hook = install(base, adapter, concept.tensors[EMBEDS], concept.tensors[NEGATIVE], key=key, scale=strength,
                       scales=scales, mask=concept.tensors.get(MASK))
        return AppliedZeroShot(concept, unet, key, hook)

    def _apply_flux(self, base: BaseModel, concept: Concept, strength: float) -> AppliedFluxZeroShot:
        """FLUX.1: the image term in every double-stream block (:mod:`studio.methods.zeroshot.flux`)."""
        transformer = base.pipe.transformer
        if strength == 0:
            return AppliedFluxZeroShot(concept, transformer, None)
        adapter = self.adapter(concept, base)
        self._check_embeds(concept, adapter)
        scales = json.loads(concept.meta[META_LAYER_SCALES]) if META_LAYER_SCALES in concept.meta else None
        return apply_flux(base, concept, adapter, concept.tensors[EMBEDS], key=f"zeroshot:{concept.trigger}",
                          strength=strength, scales=scales, mask=concept.tensors.get(MASK))


# -- making zero-shot concepts ---------------------------------------------------------------------------
def open_images(sources: Sequence[str | Path | Image.Image]) -> list[Image.Image]:
    """Paths (files, or folders of images sorted by name) or PIL images → RGB PIL images."""
    from PIL import Image as PILImage

    from studio.images import open_image

    out: list[PILImage.Image] = []
    for src in sources:
        if isinstance(src, PILImage.Image):
            out.append(src.convert("RGB"))
            continue
        path = Path(src).expanduser()
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and
                       not p.name.lower().endswith(".mask.png")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise StudioError(f"{path} holds no images (PNG, JPEG, WebP, BMP or TIFF).")
        for f in files:
            if not f.is_file():
                raise StudioError(f"Reference image {f.name} does not exist.")
            out.append(open_image(f).convert("RGB"))  # size-checked before decoding; errors name the file
    if not out:
        raise StudioError("No reference images given.")
    return out


def make_zeroshot_concept(images: Sequence[str | Path | Image.Image], adapter: str, *, image_encoder: str | None = None,
                          average: bool = False, scale: float = 1.0, layer_scales: float | dict | None = None,
                          name: str = "", token: str | None = None, class_word: str = "",
                          mask: str | Path | Image.Image | None = None, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32, pipe: Any = None) -> Concept:
    """Encode the reference images with the adapter's CLIP image encoder → a zero-shot concept.

    No base model is needed: the adapter's weights say which embeddings it reads and for which
    UNet widths; applying the concept checks them against the base. ``pipe`` (optional) caches
    the image encoder across calls. ``mask``: an image, white where the reference should act.
    """
    from studio.concept import Concept
    from studio.prompts import check_strength, normalize_token

    ref = resolve_adapter(adapter, image_encoder)
    info = adapter_info(read_adapter_state(ref.file), what=f"Adapter {adapter}")
    encoder = load_image_encoder(ref.image_encoder, device=device, dtype=dtype, pipe=pipe, what=f"adapter {adapter}")
    check_encoder(encoder, info, f"Adapter {adapter}")
    pil = open_images(images)
    embeds, negative = encoder.encode(pil, hidden_states=info.hidden_states)
    if average:
        embeds = embeds.mean(0, keepdim=True)
    name = name or (Path(str(images[0])).stem if images and not hasattr(images[0], "size") else "reference")
    trigger = normalize_token(token or name.replace(" ", "-"))
    record = ref.describe() | {"kind": info.kind, "embed_dim": info.embed_dim, "hidden_states": info.hidden_states,
                               "num_tokens": info.num_tokens, "token_dim": info.token_dim, "n_layers": info.n_layers}
    meta = {META_ADAPTER: json.dumps(record, sort_keys=True)}
    if layer_scales is not None and not isinstance(layer_scales, (int, float)):
        meta[META_LAYER_SCALES] = json.dumps(layer_scales, sort_keys=True)
    tensors = {EMBEDS: embeds.contiguous(), NEGATIVE: negative.contiguous()}
    if mask is not None:
        tensors[MASK] = mask_tensor(open_images([mask])[0]).contiguous()
    return Concept(method=ZeroShot.name, tokens=[trigger], tensors=tensors,
                   class_word=class_word, name=name, base={"family": info.family} if info.family else {},
                   train={"method": ZeroShot.name, "n_images": len(pil), "average": average},
                   strength=check_strength(float(scale), where="scale"), meta=meta)


def default_adapter(base: BaseModel) -> str:
    """The adapter ``--reference-image`` uses without ``--adapter``: the one the base's profile names
    (the demo world's own), else the family's published hub preset."""
    if base.profile.adapter:
        folder = Path(base.profile.adapter)
        if not (folder / WEIGHT_NAME).is_file():
            raise StudioError(f"This base's IP-Adapter is missing from {folder} (the demo world's is built by "
                              "`python scripts/build_world_adapter.py`); pass --adapter.")
        return str(folder)
    preset = DEFAULT_ADAPTERS.get(base.family)
    if preset is None:
        raise StudioError(f"There is no published IP-Adapter for {base.family} bases; pass --adapter with one made for "
                          "this base (or train one with `python -m studio train adapter`).")
    return preset


def reference_concept(base: BaseModel, images: Sequence[str | Path | Image.Image], *, adapter: str | None = None,
                      image_encoder: str | None = None, scale: float = 1.0, average: bool = False,
                      mask: str | Path | Image.Image | None = None) -> Concept:
    """``--reference-image``: an in-memory zero-shot concept for one generation (the image encoder
    is cached on the pipeline, so repeated calls encode but do not reload)."""
    return make_zeroshot_concept(images, adapter or default_adapter(base), image_encoder=image_encoder, average=average,
                                 scale=scale, name="reference", token=REFERENCE_TOKEN, mask=mask, device=base.device,
                                 dtype=base.dtype, pipe=base.pipe)
