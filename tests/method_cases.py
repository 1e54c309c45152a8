"""One row per registered method: how to make a small random concept of it for a given base.

The table-driven tests in ``test_methods.py`` run every row; a method registered without a row
fails ``test_every_method_has_a_row``. Trainer issues add their rows here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from studio.concept import Concept
from studio.methods.runtime import text_encoders


def make_ti(base, trigger: str, seed: int) -> Concept:
    """Two random ``(2, D_e)`` vectors per CLIP encoder of ``base``, under the family's file keys
    (``emb_params`` SD 1/2; ``clip_l`` + ``clip_g`` SDXL / SD 3; ``clip_l`` FLUX)."""
    from studio.methods.textual_inversion.files import FLUX_KEYS, SD_KEY, SDXL_KEYS

    g = torch.Generator().manual_seed(seed)
    encs = text_encoders(base.pipe)
    keys = FLUX_KEYS if getattr(base, "family", "") == "flux" else (SD_KEY,) if len(encs) == 1 else SDXL_KEYS
    tensors = {k: torch.randn(2, te.config.hidden_size, generator=g) * 2.0 for k, (_, te) in zip(keys, encs)}
    return Concept(method="textual_inversion", tokens=[trigger], tensors=tensors, class_word="cat",
                   name=trigger.strip("<>"), base=base.fingerprint())


def make_lora(base, trigger: str, seed: int, *, rank: int = 4, text_encoder: bool = True) -> Concept:
    """Random rank-``rank`` kohya LoRA on the UNet's attention projections — on an SD 3 / FLUX base, the
    transformer's default targets (:func:`studio.methods.lora.flow_keys.default_targets`) — and the CLIP
    text encoders' q/k/v/out_proj, ``alpha = rank / 2`` so the scale is not 1."""
    from studio.methods.lora.flow_keys import FLOW_PREFIX, default_targets
    from studio.methods.lora.keys import UNET_PREFIX, base_modules

    if getattr(base, "is_flow", False):
        prefix = FLOW_PREFIX
        targets = tuple("_" + t.replace(".", "_") for t in default_targets(base.family))
    else:
        prefix, targets = UNET_PREFIX, ("_to_q", "_to_k", "_to_v", "_to_out_0")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in base_modules(base.pipe).items():
        denoiser = name.startswith(prefix) and name.endswith(targets)
        te = text_encoder and not name.startswith(prefix) and name.endswith(("_q_proj", "_k_proj", "_v_proj",
                                                                             "_out_proj"))
        if denoiser or te:
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.3
            tensors[f"{name}.lora_up.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.3
            tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
    return Concept(method="lora", tokens=[trigger], tensors=tensors, class_word="cat", name=trigger.strip("<>"),
                   base=base.fingerprint())


def make_perfusion(base, trigger: str, seed: int) -> Concept:
    """Random token embedding(s) and value targets; ``i*`` is the token's real encoding in "a photo
    of <tok>" (so the gate opens at the token in "a photo of <tok> …"), ``i*_super`` the class word's."""
    from studio.methods.attention import unet_layers
    from studio.methods.perfusion import concept_meta, concept_tensors
    from studio.methods.perfusion.covariance import token_encoding, word_encoding

    g = torch.Generator().manual_seed(seed)
    encs = text_encoders(base.pipe)
    embeddings = [torch.randn(te.config.hidden_size, generator=g) * 2.0 for _, te in encs]
    i_star = token_encoding(base.pipe, trigger, embeddings, [f"a photo of {trigger}"])
    i_super = word_encoding(base.pipe, "cat", ["a photo of a cat"])
    v_targets = [torch.randn(layer.inner_dim, generator=g) for layer in unet_layers(base.pipe.unet)]
    return Concept(method="perfusion", tokens=[trigger], class_word="cat", name=trigger.strip("<>"),
                   tensors=concept_tensors(v_targets=v_targets, i_star=i_star, i_super=i_super, embeddings=embeddings),
                   meta=concept_meta(), base=base.fingerprint())


def make_neti(base, trigger: str, seed: int) -> Concept:
    """An untrained NeTI mapper for ``base`` (weights from ``seed``; class word "cat")."""
    from studio.methods.neti import random_concept

    return random_concept(base, trigger, seed, class_word="cat")


def make_prospect(base, trigger: str, seed: int) -> Concept:
    """Random ProSpect stage vectors for ``base`` (10 stages from ``seed``; class word "cat")."""
    from studio.methods.prospect import random_concept

    return random_concept(base, trigger, seed, class_word="cat")


def make_custom_diffusion(base, trigger: str, seed: int) -> Concept:
    """Random Custom Diffusion weights for ``base``: every cross-attention ``W_k``/``W_v`` is the base's plus
    seeded noise, and a random modifier-token embedding per encoder (class word "cat")."""
    from studio.methods.attention import unet_layers
    from studio.methods.custom_diffusion import concept_tensors

    g = torch.Generator().manual_seed(seed)
    unet = base.pipe.unet
    kv = {}
    for layer in unet_layers(unet):
        attn = unet.get_submodule(layer.name)
        kv[layer.name] = tuple(getattr(attn, p).weight.detach().float().cpu()
                               + 0.3 * torch.randn(layer.inner_dim, layer.context_dim, generator=g) for p in ("to_k", "to_v"))
    embeddings = [torch.randn(1, te.config.hidden_size, generator=g) * 2.0 for _, te in text_encoders(base.pipe)]
    return Concept(method="custom_diffusion", tokens=[trigger], tensors=concept_tensors(kv, embeddings),
                   class_word="cat", name=trigger.strip("<>"), base=base.fingerprint())


def make_break_a_scene(base, trigger: str, seed: int) -> Concept:
    """A random Break-A-Scene file for ``base``: one ``(1, D_e)`` token vector per CLIP encoder and a random
    LoRA (:func:`make_lora`'s) as the run's shared LoRA, with its group id; class word "cat"."""
    import json

    from studio.methods.break_a_scene import EMBEDDINGS, META_GROUP, META_TOKENS, group_id

    g = torch.Generator().manual_seed(seed)
    lora = make_lora(base, trigger, seed).tensors
    tensors = {k: torch.randn(1, te.config.hidden_size, generator=g) * 2.0
               for k, (_, te) in zip(EMBEDDINGS, text_encoders(base.pipe))} | lora
    return Concept(method="break_a_scene", tokens=[trigger], tensors=tensors, class_word="cat",
                   name=trigger.strip("<>"), base=base.fingerprint(),
                   meta={META_GROUP: group_id(lora), META_TOKENS: json.dumps([trigger])})


CASES: dict[str, Callable] = {
    "textual_inversion": make_ti,
    "lora": make_lora,
    "zeroshot": lambda base, trigger, seed: make_zeroshot(base, trigger, seed),
    "perfusion": make_perfusion,
    "neti": make_neti,
    "prospect": make_prospect,
    "custom_diffusion": make_custom_diffusion,
    "break_a_scene": make_break_a_scene,
}


# -- zero-shot (IP-Adapter) --------------------------------------------------------------------------
def tiny_image_encoder(seed: int = 0, *, image_size: int = 32):
    """A seeded CLIPVisionModelWithProjection at toy widths (hidden 32, projection 16, 17 tokens)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=8)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return CLIPVisionModelWithProjection(cfg).eval()
    finally:
        torch.random.set_rng_state(state)


def tiny_adapter_state(unet, encoder, kind: str = "base", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random adapter weights for ``unet`` reading ``encoder``'s features, in the published layout
    (``image_proj.*`` + ``ip_adapter.{2j+1}.to_{k,v}_ip.weight``)."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    from studio.methods.attention import unet_layers
    from studio.methods.zeroshot.adapter import ip_key_ids, published_projection

    width = int(unet.config.cross_attention_dim)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if kind == "base":
            proj = ImageProjection(image_embed_dim=encoder.config.projection_dim, cross_attention_dim=width,
                                   num_image_text_embeds=4)
        else:
            proj = IPAdapterPlusImageProjection(embed_dims=encoder.config.hidden_size, output_dims=width,
                                                hidden_dims=64, heads=1, num_queries=4)
        flat = {f"image_proj.{k}": v for k, v in published_projection(kind, proj.state_dict()).items()}
        ids = ip_key_ids(unet)
        for layer in unet_layers(unet):
            for which in ("to_k_ip", "to_v_ip"):
                flat[f"ip_adapter.{ids[layer.name]}.{which}.weight"] = torch.randn(layer.inner_dim, width) * 0.5
    finally:
        torch.random.set_rng_state(state)
    return {k: v.detach().float().contiguous() for k, v in flat.items()}


def save_tiny_adapter(folder, unet, kind: str = "base", seed: int = 0):
    """``folder/ip_adapter.safetensors`` + ``folder/image_encoder/`` — what ``load_ip_adapter(folder,
    subfolder="", weight_name="ip_adapter.safetensors")`` reads. Returns the folder."""
    from pathlib import Path

    from studio.methods.zeroshot.adapter import save_adapter_file

    folder = Path(folder)
    encoder = tiny_image_encoder(seed)
    encoder.save_pretrained(str(folder / "image_encoder"))
    save_adapter_file(folder / "ip_adapter.safetensors", tiny_adapter_state(unet, encoder, kind, seed))
    return folder


def save_tiny_flux_adapter(folder, transformer, seed: int = 0, *, num_tokens: int = 4):
    """A fresh random FLUX IP-Adapter for ``transformer`` in XLabs' layout (``folder/ip_adapter.safetensors``)
    + a tiny CLIP image encoder (``folder/image_encoder/``): what ``FluxPipeline.load_ip_adapter`` reads."""
    from pathlib import Path

    from studio.methods.zeroshot.adapter import save_adapter_file
    from studio.methods.zeroshot.flux import double_layers
    from studio.methods.zeroshot.xlabs import to_xlabs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = tiny_image_encoder(seed)
    encoder.save_pretrained(str(folder / "image_encoder"))
    g = torch.Generator().manual_seed(seed)
    width, embed = int(transformer.config.joint_attention_dim), int(encoder.config.projection_dim)
    state: dict[str, dict[str, torch.Tensor]] = {
        "image_proj": {"proj.weight": 0.3 * torch.randn(num_tokens * width, embed, generator=g),
                       "proj.bias": 0.1 * torch.randn(num_tokens * width, generator=g),
                       "norm.weight": 1 + 0.1 * torch.randn(width, generator=g),
                       "norm.bias": 0.1 * torch.randn(width, generator=g)},
        "ip_adapter": {}}
    for i, (_, attn) in enumerate(double_layers(transformer)):
        for which in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{i}.{which}.weight"] = 0.5 * torch.randn(attn.inner_dim, width, generator=g)
            state["ip_adapter"][f"{i}.{which}.bias"] = 0.1 * torch.randn(attn.inner_dim, generator=g)
    save_adapter_file(folder / "ip_adapter.safetensors", to_xlabs(state))
    return folder


_TINY_ADAPTERS: dict[tuple[str, str], Any] = {}


def tiny_adapter_folder(base, kind: str = "base"):
    """A tiny adapter for ``base`` saved once per test session (in a temporary folder)."""
    import tempfile
    from pathlib import Path

    key = (base.compat_id, kind)
    if key not in _TINY_ADAPTERS or not (_TINY_ADAPTERS[key] / "ip_adapter.safetensors").is_file():
        import atexit
        import shutil

        tmp = Path(tempfile.mkdtemp(prefix="studio-ip-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        if getattr(base, "family", "") == "flux":  # FLUX.1: XLabs' layout (base kind only)
            _TINY_ADAPTERS[key] = save_tiny_flux_adapter(tmp / kind, base.pipe.transformer)
        else:
            _TINY_ADAPTERS[key] = save_tiny_adapter(tmp / kind, base.pipe.unet, kind)
    return _TINY_ADAPTERS[key]


def reference_image(seed: int, size: int = 40):
    """A seeded random RGB picture (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def make_zeroshot(base, trigger: str, seed: int) -> Concept:
    from studio.methods.zeroshot import make_zeroshot_concept

    return make_zeroshot_concept([reference_image(seed)], str(tiny_adapter_folder(base)), name=trigger.strip("<>"),
                                 token=trigger, class_word="cat")
