"""IP-Adapter on FLUX.1 (docs/methods.md §6, "FLUX.1"): building an XLabs-layout adapter
(:mod:`studio.methods.zeroshot.xlabs`) for a FLUX transformer, and the studio's double-stream
processor that adds its image attention.

**The image term.** In double-stream block ``i`` the image stream's query ``Q`` (after ``to_q`` and
the block's RMS q-norm, *before* the rotary embedding) attends to the image tokens
``c = LN(P f_img)`` (``f_img``: the CLIP ``image_embeds``), as Ye et al.'s eq. (5)::

    h ← h + λ · softmax(Q K'ᵀ/√d) V',     K' = c W'_kᵀ + b'_k,  V' = c W'_vᵀ + b'_v

added to the block's image-stream output after its feed-forward — not through ``to_out`` nor the
block's gate; the text stream and the single-stream blocks get no image term. This is what
XLabs' ``IPDoubleStreamBlockProcessor`` and diffusers' ``FluxIPAdapterAttnProcessor`` compute.

**In the studio** a :class:`FluxIPProcessor` wraps the processor each double-stream attention
already has (diffusers' ``FluxAttnProcessor``, with any LoRA on its projections): it lets that
processor compute the joint attention unchanged, reads ``Q`` from the q-norm's output (a forward
hook, no extra projection), and returns the image term as the third output, which diffusers'
``FluxTransformerBlock`` adds after the feed-forward. Every zero-shot concept applied is one
:class:`FluxIPHook` in the :class:`FluxIPStore` on the transformer (several add up, as several
adapters do in diffusers). When the last one leaves, the original processor objects are put back
and every hook handle is removed, so the transformer is exactly what it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import IncompatibleConceptError, StudioError
from studio.methods.zeroshot.adapter import AdapterRef, LoadedAdapter, flux_info, move
from studio.methods.zeroshot.xlabs import is_flux_state, to_xlabs

if TYPE_CHECKING:
    from studio.concept import Concept

STORE_ATTR = "_studio_flux_ip"


# -- building an adapter for a FLUX transformer ------------------------------------------------------------
def double_layers(transformer: Any) -> list[tuple[str, Any]]:
    """The double-stream attention modules ``(name, FluxAttention)`` in the order of their adapter
    weights: every attention processor of the transformer except the single-stream blocks' (diffusers'
    own numbering rule)."""
    out = []
    for name in transformer.attn_processors:
        if not name.startswith("single_transformer_blocks"):
            path = name[: -len(".processor")]
            out.append((path, transformer.get_submodule(path)))
    return out


def build_flux_adapter(transformer: Any, state: dict[str, dict[str, torch.Tensor]], *, ref: AdapterRef | None = None,
                       what: str = "the adapter") -> LoadedAdapter:
    """A FLUX adapter's state → modules for ``transformer`` (float32, CPU), checking every width."""
    from diffusers.models.embeddings import ImageProjection

    if not is_flux_state(state):
        raise IncompatibleConceptError(f"{what} is an IP-Adapter for UNet bases (SD 1.x, 2.x, SDXL); FLUX.1 bases need "
                                       "a FLUX IP-Adapter in XLabs' layout, e.g. --adapter flux.")
    info = flux_info(state, what)
    layers = double_layers(transformer)
    if info.n_layers != len(layers):
        raise IncompatibleConceptError(f"{what} has image attention for {info.n_layers} double-stream blocks but the base "
                                       f"has {len(layers)}: it was made for another FLUX model.")
    joint = int(transformer.config.joint_attention_dim)
    if info.token_dim != joint:
        raise IncompatibleConceptError(f"{what} makes {info.token_dim}-d image tokens but the base's joint attention "
                                       f"reads {joint}-d ones: it was made for another FLUX model.")
    ip = state["image_proj"]
    with torch.random.fork_rng(devices=[]):  # the modules' default init must not move the global generator
        projection = ImageProjection(image_embed_dim=info.embed_dim, cross_attention_dim=info.token_dim,
                                     num_image_text_embeds=info.num_tokens)
        projection.load_state_dict({"image_embeds.weight": ip["proj.weight"], "image_embeds.bias": ip["proj.bias"],
                                    "norm.weight": ip["norm.weight"], "norm.bias": ip["norm.bias"]})
        ks, vs = nn.ModuleList(), nn.ModuleList()
        for i, (name, attn) in enumerate(layers):
            inner = int(attn.inner_dim)
            for bank, which in ((ks, "to_k_ip"), (vs, "to_v_ip")):
                w, b = state["ip_adapter"].get(f"{i}.{which}.weight"), state["ip_adapter"].get(f"{i}.{which}.bias")
                if w is None or b is None or tuple(w.shape) != (inner, joint) or tuple(b.shape) != (inner,):
                    got = None if w is None else tuple(w.shape)
                    raise IncompatibleConceptError(f"{what}: {which} of {name} (double block {i}) is {got}, the base "
                                                   f"needs {(inner, joint)} with a bias; it was made for another FLUX model.")
                lin = nn.Linear(joint, inner, bias=True)
                lin.load_state_dict({"weight": w, "bias": b})
                bank.append(lin)
    fp = ""
    if ref is not None:
        from studio.models.keys import fingerprint_files

        fp = fingerprint_files(ref.file)
    return LoadedAdapter(ref, info, projection.float(), ks.float(), vs.float(), fp).to_eval()


def xlabs_state(adapter: LoadedAdapter) -> dict[str, torch.Tensor]:
    """A FLUX adapter as the flat XLabs state dict (what ``pipe.load_ip_adapter`` reads). CPU float32."""
    proj = adapter.projection.state_dict()
    state: dict[str, dict[str, torch.Tensor]] = {
        "image_proj": {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                       "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]},
        "ip_adapter": {}}
    for i, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip)):
        for which, module in (("to_k_ip", k), ("to_v_ip", v)):
            lin = cast(nn.Linear, module)
            assert lin.bias is not None  # FLUX adapters are built with biases
            state["ip_adapter"][f"{i}.{which}.weight"] = lin.weight
            state["ip_adapter"][f"{i}.{which}.bias"] = lin.bias
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in to_xlabs(state).items()}


# -- running it ----------------------------------------------------------------------------------------------
def flux_ip_attention(query: torch.Tensor, tokens: torch.Tensor, to_k_ip: nn.Module, to_v_ip: nn.Module,
                      mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """One adapter's image term in a double-stream block.

    query: (B, N, H, d) — the image stream's normed query before RoPE; tokens: (B, n_img, T, D_t).
    Without a mask all images' tokens form one key sequence (diffusers' behaviour); with ``mask``
    (1, n_img, h, w) each image attends separately, weighted by its mask resized to the N image
    positions (row-major over the packed latent grid, as on a UNet layer). Returns (B, N, H·d).
    """
    b, _, heads, head_dim = query.shape
    q = query.permute(0, 2, 1, 3)  # (B, H, N, d)

    def one(tok: torch.Tensor) -> torch.Tensor:
        k = to_k_ip(tok).reshape(b, -1, heads, head_dim).permute(0, 2, 1, 3)  # (B, H, n·T, d)
        v = to_v_ip(tok).reshape(b, -1, heads, head_dim).permute(0, 2, 1, 3)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        return out.permute(0, 2, 1, 3).reshape(b, -1, heads * head_dim).to(query.dtype)

    if mask is None:
        return scale * one(tokens)
    from diffusers.image_processor import IPAdapterMaskProcessor

    total: torch.Tensor | None = None
    for i in range(mask.shape[1]):
        out = one(tokens[:, i])
        m = IPAdapterMaskProcessor.downsample(mask[:, i], b, out.shape[1], out.shape[2]).to(query.device, query.dtype)
        term = scale * (out * m)
        total = term if total is None else total + term
    assert total is not None  # the mask has a channel per image, at least one
    return total


class FluxIPHook:
    """One adapter with cached image embeddings on a FLUX transformer.

    embeds: (1, n_img, D_e) ``image_embeds`` (expanded to every row of the batch); ``scale`` is λ,
    ``scales[i]`` multiplies it in double block i; mask: (1, n_img, h, w) or None.
    """

    def __init__(self, adapter: LoadedAdapter, embeds: torch.Tensor, *, scale: float = 1.0,
                 scales: Sequence[float] | None = None, mask: torch.Tensor | None = None):
        self.adapter, self.embeds, self.mask = adapter, embeds, mask
        self.scale, self.scales = float(scale), list(scales) if scales is not None else None
        self._tokens: torch.Tensor | None = None
        self._key: tuple[int, int] | None = None

    def tokens(self, call: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, n_img, T, D_t), projected once per transformer call, on ``like``'s device."""
        if self._tokens is not None and self._key == (call, batch):
            return self._tokens
        proj = self.adapter.projection
        p = next(proj.parameters())
        if p.device != like.device:  # CPU offload moves the transformer to the GPU for its forward only
            move(self.adapter, like.device, p.dtype)
            p = next(proj.parameters())
        embeds = self.embeds.expand(batch, *self.embeds.shape[1:])
        out = proj(embeds.reshape(-1, embeds.shape[-1]).to(p.device, p.dtype))  # (B·n_img, T, D_t)
        self._tokens, self._key = out.reshape(batch, embeds.shape[1], *out.shape[1:]), (call, batch)
        return self._tokens

    def output(self, call: int, index: int, query: torch.Tensor) -> torch.Tensor | None:
        """The image term of double block ``index`` for ``query`` (B, N, H, d), or None at scale 0."""
        s = self.scale * (self.scales[index] if self.scales is not None else 1.0)
        if s == 0:
            return None
        tokens = self.tokens(call, query.shape[0], query)
        return flux_ip_attention(query, tokens.to(query.dtype), self.adapter.to_k_ip[index], self.adapter.to_v_ip[index],
                                 self.mask, s)


class FluxIPProcessor:
    """Wraps a double-stream attention's own processor and adds the active hooks' image terms as the
    third output (``FluxTransformerBlock`` adds it to the image stream after the feed-forward).

    A plain object, not an ``nn.Module``: installing it adds nothing to the transformer's state dict.
    """

    def __init__(self, store: FluxIPStore, index: int, inner: Any):
        self.store, self.index, self.inner = store, index, inner
        self.query: torch.Tensor | None = None

    def capture(self, module: Any, args: Any, output: torch.Tensor) -> None:
        """Forward hook of the attention's ``norm_q``: the image stream's normed query (B, N, H, d)."""
        self.query = output

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        self.query = None
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, self.query = self.query, None
        if encoder_hidden_states is None:
            return out
        if query is None:  # a processor that skipped norm_q: the same query, computed here
            query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
        extra: torch.Tensor | None = None
        for hook in self.store.hooks.values():
            term = hook.output(self.store.call, self.index, query)
            if term is not None:
                extra = term if extra is None else extra + term
        if extra is None:
            return out
        return (*out, extra)


class FluxIPStore:
    """The studio's image attention on one FLUX transformer: the wrapped processors, the hooks by key,
    and the transformer-call counter that keys each hook's projected tokens."""

    def __init__(self, transformer: Any):
        self.transformer = transformer
        self.hooks: dict[str, FluxIPHook] = {}
        self.call = 0
        self.layers = double_layers(transformer)
        self.processors: list[FluxIPProcessor] = []
        self.originals: list[Any] = []
        self.handles: list[Any] = []

    def _count(self, module: Any, args: Any) -> None:
        self.call += 1

    def install(self) -> None:
        t = self.transformer
        if getattr(t, "encoder_hid_proj", None) is not None or any(isinstance(a.processor, nn.Module)
                                                                    for _, a in self.layers):
            raise StudioError("diffusers' own FLUX IP-Adapter is loaded on this pipeline (pipe.load_ip_adapter); call "
                              "pipe.unload_ip_adapter() before applying a zero-shot concept.")
        try:
            self.handles.append(t.register_forward_pre_hook(self._count))
            for i, (_, attn) in enumerate(self.layers):
                proc = FluxIPProcessor(self, i, attn.processor)
                self.handles.append(attn.norm_q.register_forward_hook(proc.capture))
                self.originals.append(attn.processor)
                self.processors.append(proc)
                attn.set_processor(proc)
            t.__dict__[STORE_ATTR] = self
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        """Put every original processor object back (where ours is still in place) and drop every hook."""
        for (_, attn), proc, orig in zip(self.layers, self.processors, self.originals):
            if attn.processor is proc:
                attn.set_processor(orig)
        for h in self.handles:
            h.remove()
        self.handles, self.processors, self.originals = [], [], []
        self.transformer.__dict__.pop(STORE_ATTR, None)


def flux_store(transformer: Any) -> FluxIPStore | None:
    """The store on ``transformer``, or None when no zero-shot concept is applied."""
    return transformer.__dict__.get(STORE_ATTR)


def add_flux_hook(transformer: Any, key: str, hook: FluxIPHook) -> FluxIPStore:
    store = flux_store(transformer)
    if store is None:
        store = FluxIPStore(transformer)
        store.install()
    if key in store.hooks:
        raise StudioError(f"Zero-shot concept {key.partition(':')[2] or key} is already applied.")
    store.hooks[key] = hook
    return store


def remove_flux_hook(transformer: Any, key: str) -> None:
    store = flux_store(transformer)
    if store is None:
        return
    store.hooks.pop(key, None)
    if not store.hooks:
        store.uninstall()


@dataclass
class AppliedFluxZeroShot:
    concept: Concept
    transformer: Any
    key: str | None

    def prompt_text(self) -> str:
        from studio.methods.base import class_word_text

        return class_word_text(self.concept)

    def remove(self) -> None:
        if self.key is not None:
            remove_flux_hook(self.transformer, self.key)
            self.key = None


def flux_scales(transformer: Any, config: Any) -> list[float] | None:
    """Per-double-block multipliers: a number (every block), or None. A per-block object names UNet
    blocks (InstantStyle), which FLUX does not have: refused."""
    if config is None:
        return None
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        return [float(config)] * len(double_layers(transformer))
    raise StudioError("Per-block adapter scales (zeroshot.layer_scales) name UNet blocks; on FLUX.1 bases a zero-shot "
                      "concept takes one scale, so recreate it without --layer-scales.")


def apply_flux(base: Any, concept: Concept, adapter: LoadedAdapter, embeds: torch.Tensor, *, key: str, strength: float,
               scales: Any = None, mask: torch.Tensor | None = None) -> AppliedFluxZeroShot:
    """Add the adapter's image term to every double-stream block of ``base``'s transformer under ``key``.

    embeds: (n_img, D_e) — all images of one concept attend together; mask: (H, W) or None.
    """
    transformer = base.pipe.transformer
    dev, dtype = transformer.device, transformer.dtype
    n_img = embeds.shape[0]
    masks = None if mask is None else mask.to(dev, dtype).expand(1, n_img, *mask.shape[-2:])
    hook = FluxIPHook(adapter, embeds.unsqueeze(0).to(dev, dtype), scale=strength,
                      scales=flux_scales(transformer, scales), mask=masks)
    add_flux_hook(transformer, key, hook)
    return AppliedFluxZeroShot(concept, transformer, key)
