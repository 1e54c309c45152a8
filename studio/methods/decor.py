"""DECOR: project the prompt's text embeddings away from the directions of words the user names
(Jang et al., "DECOR: Decomposition and Projection of Text Embeddings for Text-to-Image
Customization", arXiv 2412.09169; docs/methods.md, "DECOR").

A concept trained on few photos drags in what they had in common (a background, a colour, an
object beside it); naming those words removes their directions from the conditioning at
inference, with no training. With ``X̃`` the text embeddings of the named words and ``X̃ = Ũ Σ̃ Ṽᵀ``
its SVD, ``P = Ṽ Ṽᵀ`` projects onto their span, and every embedding row ``e`` of the prompt becomes

    e' = e − α · P e          (the paper's projection ``X' = X − α · X P_X̃``; α ∈ [0, 1])

α = 0 is the plain prompt (bit for bit: nothing is installed), α = 1 makes the rows orthogonal to the
named words. The paper's equation is the one detail its public text confirms; the studio's choices
for the rest, and why:

* **Which embeddings.** ``X̃`` is made of the named words' own token rows — each entry of
  ``decor_words`` is encoded alone, as a prompt, by the same encoder and at the same layer the UNet
  reads (SD 1/2: the last hidden state; SDXL: each encoder's penultimate one), and the rows of its
  tokens are kept (start, end and padding rows are left out: they are the same for every word or
  carry the whole phrase). A multi-word entry ("red hat") gives the rows of all its tokens; several
  entries stack their rows. Only the numerically non-zero singular directions span ``P``. Triggers
  may be named (generation rewrites them to their prompt text first).
* **Which rows are projected.** Every row of the conditional prompt but the first (the start token):
  the words' meaning spreads to every row after them — CLIP's encoders are causal, and the paper
  finds the end and padding rows carry most of a prompt's semantics — so those rows are projected
  too; the start row is the same for every prompt (it sees only itself) and is the attention sink
  every layer leans on, so it is left alone. The concept's own rows are *not* exempt: what leaks
  from the photos sits in the trigger's rows as much as anywhere, and exempting them would make the
  projection depend on the prompt's tokens (evaluation renders several prompts per batch). Do not
  name the concept's class word or its trigger unless removing the concept is the point.
* **Which batch rows.** The conditional rows only; the unconditional (negative) rows under
  classifier-free guidance are the model's reference point and stay as they are.
* **SDXL.** Each encoder's slice of the UNet context (``[h_L ; h_G]``) is projected with its own
  ``P`` from that encoder's rows — the two spaces are unrelated, so one ``P`` over the concatenation
  would mix them. The pooled ``text_embeds`` (the UNet's global text vector) is projected the same
  way, with ``P`` spanned by the named words' pooled vectors (one per entry), so at α = 1 nothing the
  UNet reads of the prompt keeps the named directions.

The projection is applied where the UNet reads the text (so it composes with every method, NeTI's
per-layer contexts included): a hook of the shared cross-attention processor
(:mod:`studio.methods.attention`) subtracts ``α · to_k(P ctx)`` and ``α · to_v(P ctx)`` from the keys and
values — equal to projecting the context first, since the projections are linear (an affine
projection's bias is taken back out). The pooled vector is projected by a pre-hook on the UNet.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from studio.errors import StudioError
from studio.methods.attention import AttentionHook, ConditioningStore, LayerInfo, add_hook, remove_hook
from studio.methods.runtime import text_encoders

HOOK_KEY = "decor"
MAX_SPAN_FRACTION = 0.5
"""The named words may span at most this fraction of an encoder's width: beyond it, α = 1 would leave
too little of the prompt (and a full-rank ``P`` would zero every row)."""
WORDS_HELP = ("DECOR: words whose directions are projected out of the prompt's text embeddings, e.g. what the "
              "training photos had in common (comma-separated; empty = off)")
STRENGTH_HELP = "DECOR strength α in [0, 1]: 0 = off, 1 = the named words' directions removed entirely"
DEFAULT_STRENGTH = 1.0


def check_settings(words: str | Sequence[str], strength: float) -> list[str]:
    """The named words, each entry split on commas and stripped (``["hat, red", "sky"]`` → ``["hat", "red",
    "sky"]``; a string is one entry), after checking them: a blank entry or an α outside [0, 1] is an
    error. An empty list is allowed (DECOR is then off)."""
    if isinstance(strength, bool) or not (isinstance(strength, (int, float)) and math.isfinite(strength)
                                          and 0 <= strength <= 1):
        raise StudioError(f"decor_strength must be between 0 and 1, got {strength}.")
    entries = [words] if isinstance(words, str) else list(words)
    if any(not isinstance(w, str) or not w.strip(" ,") for w in entries):
        raise StudioError(f"decor_words {entries!r} has an empty entry; name words such as 'hat, red'.")
    return [t.strip() for w in entries for t in w.split(",") if t.strip()]


def span_basis(rows: torch.Tensor) -> torch.Tensor:
    """``(k, D)`` rows → ``(D, r)`` orthonormal columns ``Ṽ`` spanning them (``r`` = the numerical rank:
    singular values above ``max(k, D) · eps · σ_max``, ``eps`` of the rows' dtype), so that ``P = Ṽ Ṽᵀ``.
    Computed in float64."""
    if rows.ndim != 2 or rows.shape[0] == 0 or not rows.is_floating_point():
        raise ValueError(f"need (k ≥ 1, D) float rows, got shape {tuple(rows.shape)}, {rows.dtype}")
    _, s, vh = torch.linalg.svd(rows.detach().double().cpu(), full_matrices=False)
    tol = max(rows.shape) * torch.finfo(rows.dtype).eps * float(s.max())
    keep = s > tol
    return vh[keep].T.contiguous()


def project(x: torch.Tensor, basis: torch.Tensor, strength: float, *, keep_first: bool = True) -> torch.Tensor:
    """``e' = e − α · P e`` on every row ``e`` of ``x`` ``(..., T, D)`` (``P = Ṽ Ṽᵀ``, ``basis`` = ``Ṽ``
    ``(D, r)``); with ``keep_first`` the row at position 0 (the start token) is left as it is.
    ``α = 0`` returns ``x`` unchanged. Same shape and dtype as ``x``."""
    if strength == 0:
        return x
    return x - strength * removed_part(x, basis, keep_first=keep_first)


def removed_part(x: torch.Tensor, basis: torch.Tensor, *, keep_first: bool = True) -> torch.Tensor:
    """``P e`` for every row of ``x`` ``(..., T, D)`` (zero at position 0 with ``keep_first``), in ``x``'s dtype."""
    v = basis.to(device=x.device, dtype=x.dtype)
    part = (x @ v) @ v.T
    if keep_first:
        part = torch.cat([torch.zeros_like(part[..., :1, :]), part[..., 1:, :]], dim=-2)
    return part


@dataclass
class WordEmbeddings:
    """The named words as the UNet would read them: per encoder the stacked token rows ``(k_e, D_e)``,
    and (SDXL) one pooled ``text_embeds`` vector per word ``(n_words, P)``."""

    rows: list[torch.Tensor]
    pooled: torch.Tensor | None = None


def _reads_penultimate(pipe: Any) -> bool:
    """SDXL (two encoders) conditions on each encoder's penultimate hidden states; SD 1/2 on the last."""
    return len(text_encoders(pipe)) > 1


@torch.no_grad()
def prompt_states(pipe: Any, prompts: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """What the pipeline's own prompt encoding gives the UNet, per encoder ``(B, T, D_e)`` (SD 1/2: the last
    hidden state; SDXL: the penultimate ones), and SDXL's pooled ``text_embeds`` ``(B, P)`` (else None)."""
    penultimate = _reads_penultimate(pipe)
    states, pooled = [], None
    for tok, te in text_encoders(pipe):
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(te.device)
        if penultimate:
            out = te(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output, as the SDXL pipeline takes it
        else:
            mask = None
            if getattr(te.config, "use_attention_mask", False):
                mask = (ids != tok.pad_token_id).long() if tok.pad_token_id is not None else None
            states.append(te(ids, attention_mask=mask)[0])
    return states, pooled


@torch.no_grad()
def word_embeddings(pipe: Any, words: Sequence[str]) -> WordEmbeddings:
    """Each word encoded alone (see the module docstring); a word with no token is an error."""
    states, pooled = prompt_states(pipe, list(words))
    rows: list[torch.Tensor] = []
    for (tok, _), hidden in zip(text_encoders(pipe), states):
        picked = []
        for i, word in enumerate(words):
            n = len(tok(word, add_special_tokens=False).input_ids)
            if n == 0:
                raise StudioError(f"decor_words entry {word!r} has no tokens; name a word.")
            n = min(n, hidden.shape[1] - 2)  # rows 1 … n (after the start token, before the end token)
            picked.append(hidden[i, 1:1 + n])
        rows.append(torch.cat(picked).float().cpu())
    return WordEmbeddings(rows, pooled.float().cpu() if pooled is not None else None)


@dataclass
class Projector:
    """DECOR for one set of words on one pipeline: per encoder the basis ``Ṽ_e`` ``(D_e, r_e)``, the pooled
    basis ``(P, r_p)`` (SDXL) and α. :meth:`apply` acts on a UNet context ``(B, T, ΣD_e)``."""

    words: list[str]
    strength: float
    bases: list[torch.Tensor]
    pooled: torch.Tensor | None = None
    widths: list[int] = field(default_factory=list)

    def apply(self, ctx: torch.Tensor) -> torch.Tensor:
        """``(B, T, ΣD_e)`` → each encoder's slice projected with its own ``P`` (row 0 kept)."""
        return ctx - self.strength * self.removed(ctx)

    def removed(self, ctx: torch.Tensor) -> torch.Tensor:
        """``P ctx`` per encoder slice ``(B, T, ΣD_e)`` (zero at position 0)."""
        parts, lo = [], 0
        for width, basis in zip(self.widths, self.bases):
            parts.append(removed_part(ctx[..., lo:lo + width], basis))
            lo += width
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def apply_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, P)`` → projected with the pooled basis (unchanged when there is none)."""
        if self.pooled is None:
            return pooled
        return project(pooled[:, None, :], self.pooled, self.strength, keep_first=False)[:, 0]


def build_projector(pipe: Any, words: str | Sequence[str], strength: float) -> Projector:
    """The :class:`Projector` of ``words`` on ``pipe`` as it is now (with the concepts applied, a text
    encoder's LoRA shapes the words too). Refuses words spanning more than :data:`MAX_SPAN_FRACTION`
    of an encoder's width."""
    words = check_settings(words, strength)
    if not words:
        raise StudioError("DECOR needs at least one word in decor_words.")
    emb = word_embeddings(pipe, words)
    bases = [span_basis(r) for r in emb.rows]
    widths = [int(r.shape[1]) for r in emb.rows]
    for basis, width in zip(bases, widths):
        if basis.shape[1] > MAX_SPAN_FRACTION * width:
            raise StudioError(f"decor_words span {basis.shape[1]} of the text encoder's {width} dimensions; name "
                              f"fewer words (their tokens may span at most {int(MAX_SPAN_FRACTION * width)}).")
    pooled = span_basis(emb.pooled) if emb.pooled is not None else None
    if pooled is not None and pooled.shape[1] > MAX_SPAN_FRACTION * pooled.shape[0]:
        raise StudioError(f"decor_words span {pooled.shape[1]} of the pooled text embedding's {pooled.shape[0]} "
                          "dimensions; name fewer words.")
    return Projector(list(words), float(strength), bases, pooled, widths)


class DecorHook(AttentionHook):
    """The projection inside the shared cross-attention processor: keys and values of the conditional rows
    lose ``α · to_k(P ctx)`` / ``α · to_v(P ctx)`` (minus the projection's bias), which is what projecting
    the context itself gives. Additive, so it composes with Perfusion's K/V edits in either order, and
    it reads the contexts after NeTI's per-layer replacement."""

    def __init__(self, projector: Projector, guided: bool):
        self.projector, self.guided = projector, guided
        self.width = sum(projector.widths)

    def edit_kv(self, store: ConditioningStore, layer: LayerInfo, attn: Any, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx_k.shape[-1] != self.width:
            return key, value
        start = ctx_k.shape[0] // 2 if self.guided and ctx_k.shape[0] > 1 else 0  # [uncond ; cond]
        alpha = self.projector.strength
        part_k = self.projector.removed(ctx_k[start:])
        part_v = part_k if ctx_v is ctx_k else self.projector.removed(ctx_v[start:])
        zero = torch.zeros_like(part_k[:1, :1])
        dk = attn.to_k(part_k) - attn.to_k(zero)  # the linear part of to_k applied to P ctx
        dv = attn.to_v(part_v) - attn.to_v(zero)
        return _sub_rows(key, alpha * dk, start), _sub_rows(value, alpha * dv, start)


def _sub_rows(x: torch.Tensor, delta: torch.Tensor, start: int) -> torch.Tensor:
    """``x`` with ``delta`` subtracted from rows ``start:`` (out of place)."""
    delta = delta.to(x.dtype)
    return x - delta if start == 0 else torch.cat([x[:start], x[start:] - delta])


@contextlib.contextmanager
def decor_applied(pipe: Any, words: str | Sequence[str], strength: float, *, guided: bool) -> Iterator[Projector | None]:
    """Apply DECOR to every UNet call inside the block; yields the :class:`Projector`, or None when DECOR
    is off (no words, or α = 0: nothing is installed, so the output is bit-identical to none).
    ``guided``: the calls use classifier-free guidance (diffusers batches ``[negative ; prompt]``), so only
    the second half of each batch is projected. Enter it with the concepts already applied."""
    words = check_settings(words, strength)
    if not words or strength == 0:
        yield None
        return
    projector = build_projector(pipe, words, strength)
    unet = pipe.unet
    add_hook(unet, HOOK_KEY, DecorHook(projector, guided))
    handle = None
    if projector.pooled is not None:
        def pooled_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            added = kwargs.get("added_cond_kwargs")
            if not isinstance(added, dict) or not torch.is_tensor(added.get("text_embeds")):
                return None
            embeds = added["text_embeds"]
            start = embeds.shape[0] // 2 if guided and embeds.shape[0] > 1 else 0
            new = torch.cat([embeds[:start], projector.apply_pooled(embeds[start:])])
            return args, kwargs | {"added_cond_kwargs": added | {"text_embeds": new}}

        handle = unet.register_forward_pre_hook(pooled_hook, with_kwargs=True)
    try:
        yield projector
    finally:
        if handle is not None:
            handle.remove()
        remove_hook(unet, HOOK_KEY)


def parameters_fields(words: Sequence[str], strength: float) -> list[str]:
    """The A1111-style settings of a DECOR request (``DECOR words: "hat, red"``, ``DECOR strength: 1``), or
    none when DECOR is off."""
    import json

    if not words or strength == 0:
        return []
    return [f"DECOR words: {json.dumps(', '.join(words), ensure_ascii=False)}", f"DECOR strength: {strength:g}"]
