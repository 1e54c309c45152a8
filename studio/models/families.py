"""Which Stable Diffusion family a single-file checkpoint holds, from its tensor names and shapes.

:func:`detect_family` is a pure function of a safetensors header (tensor name → shape, plus the
``__metadata__`` string map); it never sees a weight, so it runs before anything is loaded.

Detection rules (structure, not exact sizes — a tiny test model of width 32 is detected like the
real one):

=====================  ===================================================================
original (LDM) names   family
=====================  ===================================================================
``cond_stage_model.transformer.…``  HF-``CLIPTextModel`` naming (CLIP ViT-L/14)  → ``sd1``
``cond_stage_model.model.…``        open_clip naming (OpenCLIP ViT-H/14)         → ``sd2``
``conditioner.embedders.0.transformer.…`` + ``conditioner.embedders.1.model.…``
+ ``model.diffusion_model.label_emb.…`` (size conditioning)                     → ``sdxl``
=====================  ===================================================================

Every family also needs a UNet (``model.diffusion_model.…``) and a VAE (``first_stage_model.…``).
Consistency checks: the UNet's cross-attention width (``attn2.to_k`` input) must equal the text
width (SD 1/2) or the sum of both widths (SDXL), and its input conv must take 4 latent channels
(text-to-image) or 9 (inpainting: reported in ``in_channels``; the loader refuses it for now).

Diffusers-style names with a component prefix (``unet.…``, ``vae.…``, ``text_encoder.…``,
``text_encoder_2.…`` — e.g. the headers of a diffusers folder's weight files, prefixed with their
folder name) are recognised too (``layout="diffusers"``): ``text_encoder_2`` + ``add_embedding``
→ ``sdxl``; otherwise the UNet's ``proj_in`` decides, a linear (2-D) projection → ``sd2``, a 1×1
conv (4-D) → ``sd1``. A bare component file (only a UNet, only a text encoder, a VAE) is refused
with a sentence saying which file of which folder to pass instead.

Prediction type — most checkpoints do not say, and ``prediction_type`` is then ``None``. Markers
read, in order: a ``v_pred`` tensor (the ComfyUI convention), ``modelspec.prediction_type``
(``v`` / ``v_prediction`` / ``epsilon``), a ``modelspec.architecture`` ending in ``-v`` (e.g.
``stable-diffusion-v2-768-v``; ``stable-diffusion-v2-512`` means epsilon) and kohya's
``ss_v_parameterization``. A ``ztsnr`` tensor marks zero-terminal-SNR training.

Native size: ``modelspec.resolution`` when present; otherwise 512 for sd1, 1024 for sdxl, and for
sd2 512 when the file says epsilon, else 768 — the SD 2.0/2.1 flagships and most SD 2 fine-tunes
are 768-px v-models, and that is also what diffusers assumes for an unlabelled SD 2 file. The
SD 2 base-vs-v ambiguity is real: a 512-px epsilon SD 2 fine-tune without metadata needs the
caller's ``prediction_type="epsilon"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from studio.errors import BaseModelError, IncompatibleConceptError

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]
PredictionType = Literal["epsilon", "v_prediction"]
Layout = Literal["ldm", "diffusers", "bfl"]

# Families whose denoiser is a UNet with cross-attention layers (what the attention-based methods
# hook) and the flow-matching transformer families (joint text-image attention, no cross-attention).
UNET_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
FLOW_FAMILIES: tuple[str, ...] = ("sd3", "flux")
FAMILY_LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL",
                 "sd3": "Stable Diffusion 3/3.5", "flux": "FLUX.1"}
# Bundled text encoders of SD 3 / FLUX single files (ComfyUI layout): name → prefix.
FLOW_TEXT_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                      "t5xxl": "text_encoders.t5xxl.transformer."}
FLOW_TEXT_ENCODERS: dict[str, tuple[str, ...]] = {"sd3": ("clip_l", "clip_g", "t5xxl"), "flux": ("clip_l", "t5xxl")}

# Prefixes of the original (LDM / A1111 / CivitAI) single-file layout.
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."  # HF CLIPTextModel names (CLIP ViT-L/14)
SD2_OPENCLIP = "cond_stage_model.model."  # open_clip names (OpenCLIP ViT-H/14)
SDXL_CLIP_L = "conditioner.embedders.0.transformer."  # HF names (CLIP ViT-L/14)
SDXL_CLIP_G = "conditioner.embedders.1.model."  # open_clip names (OpenCLIP ViT-bigG/14)

# Where each family's text encoders live in the LDM layout: (diffusers component, prefix, naming).
TEXT_ENCODER_PREFIXES: dict[str, tuple[tuple[str, str, Literal["hf", "openclip"]], ...]] = {
    "sd1": (("text_encoder", SD1_CLIP, "hf"),),
    "sd2": (("text_encoder", SD2_OPENCLIP, "openclip"),),
    "sdxl": (("text_encoder", SDXL_CLIP_L, "hf"), ("text_encoder_2", SDXL_CLIP_G, "openclip")),
}

# What the loader assumes when neither the caller nor the file says.
DEFAULT_PREDICTION: dict[str, PredictionType] = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
_DEFAULT_SIZE = {"sd1": 512, "sdxl": 1024}

_FAMILY_NAMES = FAMILY_LABELS
_PASS_A_BASE = ("pass a Stable Diffusion 1.x, 2.x, SDXL, SD 3/3.5 or FLUX.1 checkpoint (or a diffusers folder) "
                "as the base instead")
_AS_CONCEPT = "apply it as a concept (--concept FILE) on top of a base it was made for"
_LORA = re.compile(r"(^lora_(unet|te\d?)_)|([._]lora[._](up|down|A|B)\b)|(\.lora_(up|down|A|B)\.)|"
                   r"(\.(hada|lokr)_w)|(^lycoris_)")
_V_VALUES = {"v", "v_prediction", "v-prediction", "vpred", "v_pred", "v-pred"}
_EPS_VALUES = {"epsilon", "eps"}


def check_unet_family(base: Any, what: str, *, planned: bool = False) -> None:
    """Refuse, in one sentence, a method that needs what only the UNet families have.

    The attention-based methods (Perfusion, NeTI, ProSpect, Custom Diffusion, CoRe) hook the UNet's
    cross-attention layers, which SD 3 and FLUX do not have: their transformers attend over text and
    image tokens jointly (IP-Adapter has its own FLUX.1 path, ``studio.methods.zeroshot.flux``).
    Textual inversion and LoRA do carry over to those families, but not yet (``planned``).

    Args:
        base: the loaded :class:`~studio.models.BaseModel` (anything with ``family`` and ``name``).
        what: the method as users know it, e.g. ``"Perfusion concepts"``.
        planned: the method will come to the flow families (the message says "not yet").

    Raises:
        IncompatibleConceptError: ``base`` is an SD 3 / FLUX base.
    """
    family = getattr(base, "family", "")
    if family not in FLOW_FAMILIES:
        return
    label = FAMILY_LABELS[family]
    if planned:
        raise IncompatibleConceptError(f"{what} on {label} bases are not supported yet (planned), so they cannot be "
                                       f"applied to {getattr(base, 'name', '?')}; load an SD 1.x, 2.x or SDXL base "
                                       "to use them.")
    raise IncompatibleConceptError(f"{what} work through a UNet's cross-attention layers, which {label} bases such as "
                                   f"{getattr(base, 'name', '?')} do not have (their transformer attends over text and "
                                   "image jointly); load an SD 1.x, 2.x or SDXL base to use them.")


@dataclass(frozen=True)
class SingleFileInfo:
    """What a checkpoint's header says about the base it holds.

    Attributes:
        family: ``sd1`` / ``sd2`` / ``sdxl`` / ``sd3`` / ``flux``.
        prediction_type: ``epsilon`` / ``v_prediction`` when the file says so, ``None`` when it
            cannot tell (the loader then uses the caller's choice or :data:`DEFAULT_PREDICTION`).
        text_widths: hidden width of each text encoder, e.g. ``(768,)``, ``(1024,)``, ``(768, 1280)``.
        native_size: the training resolution in pixels (a guess when the file does not say).
        in_channels: latent channels the UNet takes: 4 (text-to-image) or 9 (inpainting); for the
            flow families the VAE's latent channels (16).
        cross_attention_dim: input width of the UNet's cross-attention keys/values; for the flow
            families the transformer's text-context width (``context_embedder`` / ``txt_in`` input).
        layout: ``ldm`` (original single-file names), ``diffusers`` (prefixed diffusers names) or
            ``bfl`` (a bare FLUX / SD 3 transformer, no prefix).
        zero_terminal_snr: the file carries a ``ztsnr`` marker (trained with zero terminal SNR).
        variant: flow families: ``sd3-medium`` / ``sd3.5-medium`` / ``sd3.5-large`` /
            ``flux-dev`` / ``flux-schnell``; empty otherwise.
        components: flow families: what the file holds among ``transformer``, ``vae``, ``clip_l``,
            ``clip_g``, ``t5xxl``. Their ``text_widths``: sd3, the bundled CLIPs' widths (``()`` when
            none is bundled: the transformer's pooled width does not split into the two); flux, CLIP-L's
            and T5's widths as the transformer's pooled and text inputs fix them.
        pooled_dim: flow families: the transformer's pooled-text input width (0 otherwise).
    """

    family: Family
    prediction_type: PredictionType | None
    text_widths: tuple[int, ...]
    native_size: int
    in_channels: int
    cross_attention_dim: int
    layout: Layout = "ldm"
    zero_terminal_snr: bool = False
    variant: str = ""
    components: tuple[str, ...] = ()
    pooled_dim: int = 0

    @property
    def is_inpainting(self) -> bool:
        return self.family in UNET_FAMILIES and self.in_channels == 9


def detect_family(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None, *,
                  source: str = "This file") -> SingleFileInfo:
    """Classify a checkpoint from its safetensors header alone (see the module docstring for the rules).

    Args:
        shapes: tensor name → shape, as read by ``read_safetensors_header``.
        metadata: the header's ``__metadata__`` string map (may be ``None``).
        source: how error messages name the file (e.g. its file name).

    Raises:
        BaseModelError: the file is not a Stable Diffusion 1.x / 2.x / SDXL base (a LoRA, an
            embedding, a VAE, SD3, Flux, a ControlNet, a refiner, a lone UNet, ...); the message
            says what it looks like and what to pass instead.
    """
    meta = dict(metadata or {})
    names = list(shapes)
    # 1. Things that are not a base model at all, or a base of an unsupported architecture.
    _refuse_foreign(names, meta, source)
    flow = _flow_info(shapes, meta, source)
    if flow is not None:
        return flow
    # 2. The two supported layouts.
    if any(n.startswith(LDM_UNET) for n in names):
        family = _ldm_family(shapes, source)
        widths = _ldm_text_widths(shapes, family)
        layout: Layout = "ldm"
        unet_prefix = LDM_UNET
        conv_in = shapes.get(LDM_UNET + "input_blocks.0.0.weight")
        has_label_emb = LDM_UNET + "label_emb.0.0.weight" in shapes
        if not any(n.startswith(LDM_VAE) for n in names):
            raise BaseModelError(f"{source} holds a {_FAMILY_NAMES[family]} UNet and text encoder but no VAE "
                                 f"({LDM_VAE}…); pass a full checkpoint with its VAE baked in.")
    elif any(n.startswith("unet.") for n in names):
        family, widths = _diffusers_family(shapes, source)
        layout, unet_prefix = "diffusers", "unet."
        conv_in = shapes.get("unet.conv_in.weight")
        has_label_emb = "unet.add_embedding.linear_1.weight" in shapes
    else:
        raise BaseModelError(_unknown_message(names, source))
    # 3. Consistency of the UNet with the text encoders.
    if conv_in is None or len(conv_in) != 4:
        raise BaseModelError(f"{source} has no UNet input convolution ({unet_prefix}…conv_in), so it is "
                             f"incomplete or not a Stable Diffusion checkpoint; {_PASS_A_BASE}.")
    in_channels = int(conv_in[1])
    if in_channels not in (4, 9):
        raise BaseModelError(f"{source} holds a {_FAMILY_NAMES[family]} UNet that takes {in_channels} input "
                             "channels (a depth, upscaler or instruct-pix2pix variant), not a text-to-image "
                             f"base (4) or an inpainting model (9); {_PASS_A_BASE}.")
    cross = _cross_attention_dim(shapes, unet_prefix)
    if cross is None:
        raise BaseModelError(f"{source} has a UNet without cross-attention, so it is not a Stable Diffusion "
                             f"text-to-image UNet; {_PASS_A_BASE}.")
    if cross != sum(widths):
        raise BaseModelError(f"{source} mixes parts of different models: its text encoder width "
                             f"{'+'.join(map(str, widths))} does not match the UNet's cross-attention width "
                             f"{cross}; {_PASS_A_BASE}.")
    if family == "sdxl" and not has_label_emb:
        raise BaseModelError(f"{source} has SDXL's two text encoders but its UNet lacks the size conditioning "
                             f"(label_emb / add_embedding), so it is not an SDXL base; {_PASS_A_BASE}.")
    if family != "sdxl" and has_label_emb:
        raise BaseModelError(f"{source} holds a {_FAMILY_NAMES[family]} UNet with an extra class embedding "
                             f"(an unCLIP or upscaler variant), which the studio does not support; {_PASS_A_BASE}.")
    # 4. What the file says about how it was trained.
    prediction = _prediction_type(shapes, meta)
    return SingleFileInfo(family=family, prediction_type=prediction, text_widths=widths,
                          native_size=_native_size(family, prediction, meta), in_channels=in_channels,
                          cross_attention_dim=cross, layout=layout, zero_terminal_snr="ztsnr" in shapes)


# ---------------------------------------------------------------------------------------------
# Refusals


def _refuse_foreign(names: list[str], meta: Mapping[str, str], source: str) -> None:
    if not names:
        raise BaseModelError(f"{source} holds no tensors, so it is not a model checkpoint; {_PASS_A_BASE}.")
    arch = meta.get("modelspec.architecture", "").lower()
    if "ss_network_module" in meta or arch.endswith("/lora") or any(_LORA.search(n) for n in names):
        raise BaseModelError(f"{source} looks like a LoRA (low-rank weight deltas), not a base model; "
                             f"{_AS_CONCEPT}.")
    # A1111 (emb_params; clip_l + clip_g for SDXL), diffusers (one tensor named after its token).
    if arch.endswith("/textual-inversion") or (len(names) <= 8 and all(
            "." not in n or n.startswith(("string_to_param.", "string_to_token")) for n in names)):
        raise BaseModelError(f"{source} looks like a textual-inversion embedding, not a base model; "
                             f"{_AS_CONCEPT}.")
    if any("single_stream_modulation." in n or "double_stream_modulation" in n for n in names):
        raise BaseModelError(f"{source} looks like a FLUX.2 transformer (shared stream modulation), which the studio "
                             f"does not support; {_PASS_A_BASE}.")
    if any(n.startswith("control_model.") or "input_hint_block." in n or n.startswith("controlnet_")
           for n in names):
        raise BaseModelError(f"{source} looks like a ControlNet, which guides a base model but is not one; "
                             f"{_PASS_A_BASE}.")
    if "edm_mean" in names or any(n.startswith("edm_vpred.") for n in names):
        raise BaseModelError(f"{source} is an EDM-parameterised model (Playground v2.5 / CosXL style), whose "
                             f"noise schedule the studio does not support; {_PASS_A_BASE}.")
    unet_roots = (LDM_UNET, "unet.", "down_blocks.", "input_blocks.", "joint_blocks.", "double_blocks.")
    if any(n.startswith(("decoder.", LDM_VAE + "decoder.")) for n in names) and not any(
            n.startswith(unet_roots) for n in names):
        raise BaseModelError(f"{source} looks like a VAE on its own (encoder/decoder weights only), not a base "
                             f"model; {_PASS_A_BASE}.")
    if any(n.startswith("conditioner.embedders.0.model.") for n in names) and not any(
            n.startswith("conditioner.embedders.1.") for n in names):
        raise BaseModelError(f"{source} looks like the SDXL refiner (one OpenCLIP-bigG encoder), which refines "
                             f"images but is not a text-to-image base; {_PASS_A_BASE}.")


def _unknown_message(names: list[str], source: str) -> str:
    if any(n.startswith("single_transformer_blocks.") for n in names) or (
            "context_embedder.weight" in names and any(n.startswith("transformer_blocks.") for n in names)):
        return (f"{source} holds only a FLUX.1 / SD 3 transformer with diffusers tensor names (a diffusers folder's "
                "transformer/ weights); pass the whole diffusers folder, the one with model_index.json, or the "
                "hub id as the base.")
    if "conv_in.weight" in names and any(n.startswith("down_blocks.") for n in names):
        return (f"{source} holds only a UNet with diffusers tensor names (a diffusers folder's "
                "unet/diffusion_pytorch_model.safetensors); pass the whole diffusers folder, the one with "
                "model_index.json, as the base.")
    if any(n.startswith(("text_model.", "embeddings.token_embedding", "encoder.layers.")) for n in names):
        return (f"{source} holds only a CLIP text encoder (a diffusers folder's text_encoder/model.safetensors); "
                "pass the whole diffusers folder, the one with model_index.json, as the base.")
    roots = sorted({n.split(".")[0] for n in names})
    shown = ", ".join(roots[:4]) + (", …" if len(roots) > 4 else "")
    return (f"{source} is not a Stable Diffusion checkpoint the studio recognises (its tensors start with "
            f"{shown}); {_PASS_A_BASE}.")


# ---------------------------------------------------------------------------------------------
# LDM layout


def _ldm_family(shapes: Mapping[str, Sequence[int]], source: str) -> Family:
    has = lambda prefix: any(n.startswith(prefix) for n in shapes)  # noqa: E731 - a local shorthand
    if has(SDXL_CLIP_G) or has(SDXL_CLIP_L):
        if not (has(SDXL_CLIP_G) and has(SDXL_CLIP_L)):
            raise BaseModelError(f"{source} has only one of SDXL's two text encoders "
                                 f"({SDXL_CLIP_L}… and {SDXL_CLIP_G}…); {_PASS_A_BASE}.")
        return "sdxl"
    if has(SD2_OPENCLIP):
        return "sd2"
    if has(SD1_CLIP):
        return "sd1"
    kind = _unet_kind(shapes, LDM_UNET)
    raise BaseModelError(f"{source} holds only an {kind} UNet (no text encoder under cond_stage_model.… or "
                         f"conditioner.…); pass a full checkpoint, or the diffusers folder it belongs to.")


def _ldm_text_widths(shapes: Mapping[str, Sequence[int]], family: Family) -> tuple[int, ...]:
    widths = []
    for _component, prefix, naming in TEXT_ENCODER_PREFIXES[family]:
        if naming == "openclip":
            candidates = [prefix + "token_embedding.weight"]
        else:  # current HF names, then the pre-2022 names without ``text_model.``
            candidates = [prefix + "text_model.embeddings.token_embedding.weight",
                          prefix + "embeddings.token_embedding.weight"]
        shape = next((shapes[c] for c in candidates if c in shapes), None)
        if shape is None or len(shape) != 2:
            raise BaseModelError(f"The text encoder under {prefix}… has no token embedding "
                                 f"({candidates[0]}), so the checkpoint is incomplete; {_PASS_A_BASE}.")
        widths.append(int(shape[1]))
    return tuple(widths)


# ---------------------------------------------------------------------------------------------
# Diffusers layout (component-prefixed)


def _diffusers_family(shapes: Mapping[str, Sequence[int]], source: str) -> tuple[Family, tuple[int, ...]]:
    def width(component: str) -> int | None:
        for key in (f"{component}.text_model.embeddings.token_embedding.weight",
                    f"{component}.embeddings.token_embedding.weight"):
            if key in shapes and len(shapes[key]) == 2:
                return int(shapes[key][1])
        return None

    w1, w2 = width("text_encoder"), width("text_encoder_2")
    if not any(n.startswith("vae.") for n in shapes):
        raise BaseModelError(f"{source} has diffusers-style UNet names but no vae.… tensors; pass the whole "
                             "diffusers folder, the one with model_index.json, as the base.")
    if w1 is None:
        kind = _unet_kind(shapes, "unet.")
        raise BaseModelError(f"{source} holds an {kind} UNet with diffusers names but no text_encoder.… "
                             "tensors; pass the whole diffusers folder, the one with model_index.json, as the base.")
    if w2 is not None:
        return "sdxl", (w1, w2)
    return ("sd2" if _linear_proj_in(shapes, "unet.") else "sd1"), (w1,)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _cross_attention_dim(shapes: Mapping[str, Sequence[int]], unet_prefix: str) -> int | None:
    for name, shape in shapes.items():
        if name.startswith(unet_prefix) and name.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def _linear_proj_in(shapes: Mapping[str, Sequence[int]], unet_prefix: str) -> bool:
    """True when the UNet's transformer blocks project in with a Linear (SD 2, SDXL), False for a
    1×1 conv (SD 1)."""
    for name, shape in shapes.items():
        if name.startswith(unet_prefix) and name.endswith("proj_in.weight"):
            return len(shape) == 2
    return False


def _unet_kind(shapes: Mapping[str, Sequence[int]], unet_prefix: str) -> str:
    if any(n.startswith(unet_prefix) and ("label_emb." in n or "add_embedding." in n) for n in shapes):
        return "SDXL-like"
    return "SD 2-like" if _linear_proj_in(shapes, unet_prefix) else "SD 1-like"


def _prediction_type(shapes: Mapping[str, Sequence[int]], meta: Mapping[str, str]) -> PredictionType | None:
    if "v_pred" in shapes:
        return "v_prediction"
    value = meta.get("modelspec.prediction_type", "").strip().lower()
    if value in _V_VALUES:
        return "v_prediction"
    if value in _EPS_VALUES:
        return "epsilon"
    arch = meta.get("modelspec.architecture", "").strip().lower()
    if arch.endswith("-v"):
        return "v_prediction"
    if arch == "stable-diffusion-v2-512":
        return "epsilon"
    if meta.get("ss_v_parameterization", "").strip().lower() == "true":
        return "v_prediction"
    return None


def _native_size(family: Family, prediction: PredictionType | None, meta: Mapping[str, str]) -> int:
    match = re.fullmatch(r"\s*(\d{2,5})\s*[x×,]\s*(\d{2,5})\s*", meta.get("modelspec.resolution", ""))
    if match:
        w, h = int(match.group(1)), int(match.group(2))
        return w if w == h else max(64, int((w * h) ** 0.5) // 64 * 64)
    if family == "sd2":
        return 512 if prediction == "epsilon" else 768
    return _DEFAULT_SIZE[family]


# ---------------------------------------------------------------------------------------------
# Flow-matching transformers: SD 3 / 3.5 (MMDiT) and FLUX.1


def _flow_info(shapes: Mapping[str, Sequence[int]], meta: Mapping[str, str], source: str) -> SingleFileInfo | None:
    """The :class:`SingleFileInfo` of an SD 3 or FLUX checkpoint, None when the file is neither."""
    names = list(shapes)
    for prefix, layout in ((LDM_UNET, "ldm"), ("", "bfl")):
        if any(n.startswith(prefix + "joint_blocks.") for n in names):
            return _sd3_info(shapes, meta, source, prefix, layout)  # type: ignore[arg-type]
        if any(n.startswith(prefix + "double_blocks.") for n in names):
            return _flux_info(shapes, meta, source, prefix, layout)  # type: ignore[arg-type]
    if any("joint_blocks." in n for n in names):
        raise BaseModelError(f"{source} holds Stable Diffusion 3 joint blocks under an unknown prefix, so the "
                             f"studio cannot tell its parts apart; {_PASS_A_BASE}.")
    if any("double_blocks." in n for n in names):
        raise BaseModelError(f"{source} holds Flux double-stream blocks under an unknown prefix, so the studio "
                             f"cannot tell its parts apart; {_PASS_A_BASE}.")
    return None


def _shape(shapes: Mapping[str, Sequence[int]], name: str, rank: int) -> Sequence[int] | None:
    shape = shapes.get(name)
    return shape if shape is not None and len(shape) == rank else None


def _bundled(shapes: Mapping[str, Sequence[int]], family: str, source: str) -> tuple[list[str], dict[str, int]]:
    """Which parts besides the transformer the file holds, and the hidden width of each bundled encoder."""
    parts: list[str] = []
    widths: dict[str, int] = {}
    if any(n.startswith(LDM_VAE) for n in shapes):
        conv = _shape(shapes, LDM_VAE + "decoder.conv_in.weight", 4)
        if conv is None or int(conv[1]) != 16:
            got = "no decoder.conv_in" if conv is None else f"{conv[1]} latent channels"
            raise BaseModelError(f"{source} bundles a VAE with {got}, but {FAMILY_LABELS[family]} needs the "
                                 f"16-channel VAE; {_PASS_A_BASE}.")
        parts.append("vae")
    for enc, prefix in FLOW_TEXT_PREFIXES.items():
        if not any(n.startswith(prefix) for n in shapes):
            continue
        if enc not in FLOW_TEXT_ENCODERS[family]:
            raise BaseModelError(f"{source} bundles a {enc} text encoder, which {FAMILY_LABELS[family]} does not "
                                 f"use, so it mixes parts of different models; {_PASS_A_BASE}.")
        key = prefix + ("shared.weight" if enc == "t5xxl" else "text_model.embeddings.token_embedding.weight")
        emb = _shape(shapes, key, 2)
        if emb is None:
            raise BaseModelError(f"{source} bundles a {enc} text encoder without its token embedding ({key}), so "
                                 f"the file is incomplete; {_PASS_A_BASE}.")
        widths[enc] = int(emb[1])
        parts.append(enc)
    return parts, widths


def _clip_projection(shapes: Mapping[str, Sequence[int]], enc: str, width: int) -> int:
    proj = _shape(shapes, FLOW_TEXT_PREFIXES[enc] + "text_projection.weight", 2)
    return int(proj[0]) if proj is not None else width


def _flow_size(meta: Mapping[str, str]) -> int:
    match = re.fullmatch(r"\s*(\d{2,5})\s*[x×,]\s*(\d{2,5})\s*", meta.get("modelspec.resolution", ""))
    if match:
        w, h = int(match.group(1)), int(match.group(2))
        return w if w == h else max(64, int((w * h) ** 0.5) // 64 * 64)
    return 1024


def _sd3_info(shapes: Mapping[str, Sequence[int]], meta: Mapping[str, str], source: str, prefix: str,
              layout: Layout) -> SingleFileInfo:
    x_in = _shape(shapes, prefix + "x_embedder.proj.weight", 4)
    context = _shape(shapes, prefix + "context_embedder.weight", 2)
    pooled = _shape(shapes, prefix + "y_embedder.mlp.0.weight", 2)
    if x_in is None or context is None or pooled is None or prefix + "pos_embed" not in shapes:
        raise BaseModelError(f"{source} looks like a Stable Diffusion 3 checkpoint (MMDiT joint blocks) but lacks "
                             "its patch, text or pooled embedders (x_embedder, context_embedder, y_embedder, "
                             f"pos_embed), so it is incomplete; {_PASS_A_BASE}.")
    latent = int(x_in[1])
    if latent != 16:
        raise BaseModelError(f"{source} holds a Stable Diffusion 3 transformer that takes {latent} latent channels, "
                             f"not the 16 of a text-to-image base (a control or inpainting variant); {_PASS_A_BASE}.")
    block = prefix + "joint_blocks."
    dual = any(n.startswith(block) and ".x_block.attn2." in n for n in shapes)
    qk_norm = any(n.startswith(block) and ".attn.ln_q." in n for n in shapes)
    variant = "sd3.5-medium" if dual else "sd3.5-large" if qk_norm else "sd3-medium"
    parts, widths = _bundled(shapes, "sd3", source)
    joint, pooled_dim = int(context[1]), int(pooled[1])
    clips = [e for e in ("clip_l", "clip_g") if e in widths]
    if len(clips) == 1:
        raise BaseModelError(f"{source} bundles only one of SD 3's two CLIP text encoders ({clips[0]}), so it is "
                             f"incomplete; {_PASS_A_BASE}.")
    if clips and sum(_clip_projection(shapes, e, widths[e]) for e in clips) != pooled_dim:
        raise BaseModelError(f"{source} mixes parts of different models: its CLIP projections do not add up to the "
                             f"transformer's pooled width {pooled_dim}; {_PASS_A_BASE}.")
    if "t5xxl" in widths and widths["t5xxl"] != joint:
        raise BaseModelError(f"{source} mixes parts of different models: its T5 width {widths['t5xxl']} differs from "
                             f"the transformer's text width {joint}; {_PASS_A_BASE}.")
    return SingleFileInfo(family="sd3", prediction_type=None, text_widths=tuple(widths[e] for e in clips),
                          native_size=_flow_size(meta), in_channels=latent, cross_attention_dim=joint, layout=layout,
                          variant=variant, components=("transformer", *parts), pooled_dim=pooled_dim)


def _flux_info(shapes: Mapping[str, Sequence[int]], meta: Mapping[str, str], source: str, prefix: str,
               layout: Layout) -> SingleFileInfo:
    img_in = _shape(shapes, prefix + "img_in.weight", 2)
    txt_in = _shape(shapes, prefix + "txt_in.weight", 2)
    vector_in = _shape(shapes, prefix + "vector_in.in_layer.weight", 2)
    if img_in is None or txt_in is None:
        raise BaseModelError(f"{source} looks like a Flux transformer (double-stream blocks) but lacks its image or "
                             f"text input layer (img_in, txt_in), so it is incomplete; {_PASS_A_BASE}.")
    if vector_in is None:
        raise BaseModelError(f"{source} holds a Flux-derived transformer without the pooled CLIP input (vector_in), "
                             f"a Chroma-style model the studio does not support; {_PASS_A_BASE}.")
    if not any(n.startswith(prefix + "single_blocks.") for n in shapes):
        raise BaseModelError(f"{source} looks like a Flux transformer but has no single-stream blocks, so it is "
                             f"incomplete; {_PASS_A_BASE}.")
    packed = int(img_in[1])
    if packed != 64:
        raise BaseModelError(f"{source} holds a Flux transformer whose image input takes {packed} channels, a FLUX.1 "
                             f"Fill, Depth or Canny variant (text-to-image FLUX takes 64); {_PASS_A_BASE}.")
    dev = any(n.startswith(prefix + "guidance_in.") for n in shapes)
    parts, widths = _bundled(shapes, "flux", source)
    joint, pooled_dim = int(txt_in[1]), int(vector_in[1])
    if "clip_l" in widths and widths["clip_l"] != pooled_dim:
        raise BaseModelError(f"{source} mixes parts of different models: its CLIP width {widths['clip_l']} differs "
                             f"from the transformer's pooled width {pooled_dim}; {_PASS_A_BASE}.")
    if "t5xxl" in widths and widths["t5xxl"] != joint:
        raise BaseModelError(f"{source} mixes parts of different models: its T5 width {widths['t5xxl']} differs from "
                             f"the transformer's text width {joint}; {_PASS_A_BASE}.")
    return SingleFileInfo(family="flux", prediction_type=None, text_widths=(pooled_dim, joint),
                          native_size=_flow_size(meta), in_channels=packed // 4, cross_attention_dim=joint,
                          layout=layout, variant="flux-dev" if dev else "flux-schnell",
                          components=("transformer", *parts), pooled_dim=pooled_dim)
