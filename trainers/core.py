"""CoRe — context-regularized text embedding learning (Wu et al., AAAI 2025, arXiv 2408.15914), an
option of the textual-inversion and NeTI trainers (``--core``; docs/methods.md, "CoRe").

An over-fitted concept embedding ``v*`` bends the text-encoder outputs of the *other* words of a
prompt and, through them, their cross-attention — which is why "a photo of <tok> on the beach"
forgets the beach. CoRe leaves ``v*`` itself free and regularises its **context**: for a context
prompt ``y`` (``"a photo of a {} in the jungle"``) filled once with the concept (``y*``) and once
with its class word (``y_cat``),

* **context embedding loss** (paper Eq. 3) — the outputs of the context tokens should agree:
  ``L_emb = mean_i [1 − cos(E(y*)_i, E(y_cat)_i)]`` over the tokens *after* the concept up to the
  end-of-text token. CLIP's encoders are causal (docs/methods.md), so the tokens before the concept
  have identical outputs in both prompts and no gradient; they are left out of the mean.
* **context attention loss** (paper Eq. 4) — every context token should draw the same share of the
  image's cross-attention: with ``μ_i`` the mean of token ``i``'s attention probabilities over the
  read layers, heads and pixels, ``L_attn = mean_i (μ_i(y*) − μ_i(y_cat))²`` over every token but the
  concept's, start- and end-of-text included (the softmax couples them: tokens before the concept
  do get a gradient here). The two UNet passes reuse the batch's noisy latents and timesteps; the
  probabilities are captured only on the layers the loss reads (``--core-layers``) through the
  shared processor's ``wants_probs``/``probs`` hook (:mod:`studio.methods.attention`), every other
  layer keeps SDPA, and the class pass runs without gradients.
* **total** (paper Eq. 5): ``L = L_diffusion + λ_emb·L_emb + λ_attn·L_attn``.

Both losses are averaged over the batch: each row draws its own context prompt (from a generator
seeded by ``(seed, step, micro-step)``, so a resumed run draws what an uninterrupted one would).
The norm-rescaling window (textual inversion only) is :class:`NormWindow`.

The context prompts come from :mod:`trainers.core_prompts`: ``auto`` takes the base's own words —
the demo world's caption grammar on the world's base (its profile) or on any base whose tokenizer
does not know English, else the generic English set; a file of prompts may replace them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from studio.configs import option
from studio.errors import TrainingError
from studio.methods.attention import AttentionHook, ConditioningStore, LayerInfo, add_hook, remove_hook, unet_layers
from studio.methods.runtime import text_encoders
from trainers.conditioning import Conditioning, encode_prompts
from trainers.core_prompts import GENERIC_PROMPTS, world_prompts

HOOK_KEY = "core"
PROMPT_SETS = ("auto", "generic", "world")


@dataclass
class CoreOptions:
    """The CoRe settings shared by the trainers that offer it (a mixin of their config dataclasses).
    Defaults: the paper's stage-1 weights (appendix G); all cross-attention layers, as the paper."""

    core: bool = option(False, "CoRe: regularise the words around the concept (their text-encoder outputs and "
                        "cross-attention must match the class word's) so prompts keep their context", group="method")
    core_embedding_weight: float = option(1.5e-4, "CoRe λ_emb: weight of the context embedding loss (1 − cosine of "
                                          "the context tokens' outputs, concept vs class word)", group="method")
    core_attention_weight: float = option(0.05, "CoRe λ_attn: weight of the context attention loss (squared "
                                          "difference of each context token's mean cross-attention)", group="method")
    core_every: int = option(1, "compute the CoRe losses every N steps (1 = every step; each costs two extra UNet "
                             "passes when λ_attn > 0)", group="method")
    core_layers: str = option("all", "cross-attention layers the CoRe attention loss reads: all (the paper), low "
                              "(the lowest-resolution level that has cross-attention), or indices in execution "
                              "order, e.g. 0,3,6", group="method")
    core_prompts: str = option("auto", "CoRe context prompts: auto (the base's own words: the demo world's grammar "
                               "there, else generic English), generic, or world", choices=list(PROMPT_SETS),
                               group="method")
    core_prompts_file: str | None = option(None, "CoRe context prompts from a file instead: one per line, {} = the "
                                           "concept, with words after it", group="method", path="file")

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # the config dataclass this is mixed into
        for name in ("core_embedding_weight", "core_attention_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise TrainingError(f"{name} must be a non-negative number, got {value}.")
        if self.core_every < 1:
            raise TrainingError(f"core_every must be at least 1, got {self.core_every}.")
        parse_layers(self.core_layers)  # syntax now; the indices against the UNet when training starts


# -- prompts and token positions --------------------------------------------------------------------
def read_prompt_file(path: str | Path) -> list[str]:
    """The non-empty lines of a prompt file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TrainingError(f"Cannot read the CoRe prompt file {path}: {err}.") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise TrainingError(f"The CoRe prompt file {path} holds no prompts; write one per line, {{}} = the concept.")
    return prompts


def _known_fraction(tokenizer: Any, prompts: Sequence[str]) -> float:
    """The fraction of the distinct words of ``prompts`` that ``tokenizer`` reads as one token."""
    words = {w for p in prompts for w in p.replace("{}", " ").split()}
    if not words:
        return 0.0
    return sum(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in words) / len(words)


def context_prompts(base: Any, set_name: str = "auto", path: str | None = None) -> tuple[str, list[str]]:
    """``(name, templates)``: the context prompts for ``base`` (see the module docstring)."""
    if path:
        return str(path), read_prompt_file(path)
    if set_name == "auto":
        profile = getattr(base, "profile", None)
        if getattr(profile, "kind", "") == "world":
            set_name = "world"
        else:  # a base whose tokenizer does not know English words (a learnt small vocabulary) reads its grammar
            tok = text_encoders(base.pipe)[0][0]
            generic = _known_fraction(tok, GENERIC_PROMPTS)
            set_name = "world" if generic < 0.5 and _known_fraction(tok, world_prompts()) > generic else "generic"
    if set_name == "generic":
        return "generic", list(GENERIC_PROMPTS)
    if set_name == "world":
        return "world", list(world_prompts())
    raise TrainingError(f"Unknown CoRe prompt set {set_name!r}; use one of {', '.join(PROMPT_SETS)} or a file.")


@dataclass(frozen=True)
class ContextPair:
    """One context prompt filled with the concept and with the class word, and where its context
    tokens sit (positions into the tokenized prompts, start-of-text = 0)."""

    template: str
    concept: str  # the prompt with the concept's text
    klass: str  # the prompt with the class word
    before: tuple[int, ...]  # start-of-text … the last token before the concept (same in both)
    concept_after: tuple[int, ...]  # the tokens after the concept … end-of-text, in the concept prompt
    class_after: tuple[int, ...]  # the same tokens in the class prompt


def make_pair(tokenizers: Sequence[Any], template: str, concept_text: str, class_text: str) -> ContextPair:
    """Tokenize ``template`` with both fillings and locate the context tokens: the common prefix is the
    context before the concept, the common suffix (up to end-of-text) the context after it. Refuses a
    template without exactly one ``{}``, with no word after it, or longer than the encoder reads."""
    if template.count("{}") != 1:
        raise TrainingError(f"CoRe prompt {template!r} must hold exactly one {{}} (where the concept goes).")
    concept, klass = template.format(concept_text), template.format(class_text)
    found: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    for tok in tokenizers:
        c = tok(concept).input_ids
        k = tok(klass).input_ids
        limit = tok.model_max_length
        if max(len(c), len(k)) > limit:
            raise TrainingError(f"CoRe prompt {template!r} is longer than the text encoder's {limit} tokens; "
                                "shorten it.")
        start = 0
        while start < min(len(c), len(k)) and c[start] == k[start]:
            start += 1
        room = min(len(c), len(k)) - start - 1  # each filling keeps at least one token of its own
        end = 0
        while end < room and c[len(c) - 1 - end] == k[len(k) - 1 - end]:
            end += 1
        if end < 2:  # only the end-of-text token after the concept
            raise TrainingError(f"CoRe prompt {template!r} has no words after {{}}: CoRe regularises the words "
                                "after the concept (the text encoder is causal, so the words before it cannot "
                                "change); add some, e.g. 'a photo of a {} on the beach'.")
        where = (tuple(range(start)), tuple(range(len(c) - end, len(c))), tuple(range(len(k) - end, len(k))))
        if found is not None and where != found:
            raise TrainingError(f"CoRe prompt {template!r} splits differently in the base's tokenizers.")
        found = where
    assert found is not None  # at least one tokenizer
    return ContextPair(template, concept, klass, *found)


def make_pairs(pipe: Any, templates: Sequence[str], concept_text: str, class_text: str) -> list[ContextPair]:
    """:func:`make_pair` for every template, with every tokenizer of ``pipe``."""
    if not class_text.strip():
        raise TrainingError("CoRe compares the concept with its class word: give --class-word (e.g. dog).")
    tokenizers = [tok for tok, _ in text_encoders(pipe)]
    return [make_pair(tokenizers, t, concept_text, class_text) for t in templates]


def _index(pairs: Sequence[ContextPair], which: Callable[[ContextPair], tuple[int, ...]],
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions per row, padded: ``(index (B, P) long, mask (B, P) float)``."""
    rows = [which(p) for p in pairs]
    width = max(len(r) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for b, r in enumerate(rows):
        index[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1.0
    return index.to(device), mask.to(device)


def _gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states`` (..., B, T, D) at ``index`` (B, P) → (..., B, P, D)."""
    lead = states.shape[:-3]
    idx = index[..., None].expand(*lead, *index.shape, states.shape[-1])
    return states.gather(-2, idx)


# -- the losses --------------------------------------------------------------------------------------
def context_embedding_loss(concept: Sequence[torch.Tensor], klass: Sequence[torch.Tensor],
                           pairs: Sequence[ContextPair]) -> torch.Tensor:
    """Paper Eq. 3 over the context tokens after the concept: ``mean [1 − cos(E(y*)_i, E(y_cat)_i)]``.

    ``concept[e]``: encoder ``e``'s states of the concept prompts, (B, T, D_e) or with leading axes
    (NeTI: (L, B, T, D_e), one per UNet layer); ``klass[e]``: (B, T, D_e) of the class prompts (row
    ``b`` of both is ``pairs[b]``). Mean over the tokens of each row, then rows (and leading axes),
    then encoders. A scalar, zero when the context tokens' outputs agree."""
    losses = []
    for c, k in zip(concept, klass):
        idx_c, mask = _index(pairs, lambda p: p.concept_after, c.device)
        idx_k, _ = _index(pairs, lambda p: p.class_after, c.device)
        cos = F.cosine_similarity(_gather_tokens(c.float(), idx_c), _gather_tokens(k.float(), idx_k), dim=-1)
        per_row = ((1 - cos) * mask).sum(-1) / mask.sum(-1)  # (..., B)
        losses.append(per_row.mean())
    return torch.stack(losses).mean()


def context_attention_loss(concept_mu: torch.Tensor, class_mu: torch.Tensor,
                           pairs: Sequence[ContextPair]) -> torch.Tensor:
    """Paper Eq. 4: ``mean_i (μ_i(y*) − μ_i(y_cat))²`` over every context token (before and after the
    concept, start- and end-of-text included), then over rows. ``*_mu``: (B, T), token ``i``'s attention
    probability averaged over the read layers, heads and pixels (:class:`AttentionCapture`)."""
    device = concept_mu.device
    before_c = _index(pairs, lambda p: p.before + p.concept_after, device)
    before_k = _index(pairs, lambda p: p.before + p.class_after, device)
    mu_c = concept_mu.float().gather(-1, before_c[0])
    mu_k = class_mu.float().gather(-1, before_k[0])
    mask = before_c[1]
    per_row = ((mu_c - mu_k) ** 2 * mask).sum(-1) / mask.sum(-1)
    return per_row.mean()


# -- which layers ------------------------------------------------------------------------------------
def parse_layers(spec: str) -> str | list[int]:
    """``"all"`` / ``"low"``, or a list of layer indices from ``"0,3,6"``."""
    spec = spec.strip().lower()
    if spec in ("all", "low"):
        return spec
    try:
        out = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        out = []
    if not out or any(i < 0 for i in out):
        raise TrainingError(f"core_layers must be all, low, or layer indices like 0,3,6; got {spec!r}.")
    return sorted(set(out))


def layer_levels(unet: Any) -> list[int]:
    """Per cross-attention layer (execution order), its resolution level: how many times the latent
    was downsampled before it (0 = full resolution), derived from the UNet's blocks."""
    downs = [getattr(b, "downsamplers", None) is not None for b in unet.down_blocks]
    ups = [getattr(b, "upsamplers", None) is not None for b in unet.up_blocks]
    bottom = sum(downs)
    levels = []
    for layer in unet_layers(unet):
        parts = layer.name.split(".")
        if parts[0] == "down_blocks":
            levels.append(sum(downs[: int(parts[1])]))
        elif parts[0] == "up_blocks":
            levels.append(bottom - sum(ups[: int(parts[1])]))
        else:  # mid_block
            levels.append(bottom)
    return levels


def resolve_layers(unet: Any, spec: str) -> list[int]:
    """The indices (execution order) of the layers ``spec`` names on this UNet."""
    parsed = parse_layers(spec)
    n = len(unet_layers(unet))
    if parsed == "all":
        return list(range(n))
    if parsed == "low":
        levels = layer_levels(unet)
        return [i for i, lv in enumerate(levels) if lv == max(levels)]
    assert isinstance(parsed, list)
    bad = [i for i in parsed if i >= n]
    if bad:
        raise TrainingError(f"core_layers {bad} do not exist: this UNet has {n} cross-attention layers (0–{n - 1}).")
    return parsed


class AttentionCapture(AttentionHook):
    """Keeps, per read layer, each token's attention probability averaged over heads and pixels —
    (B, T), in the autograd graph — while :attr:`active`; asks for nothing otherwise."""

    def __init__(self, layers: Sequence[int]):
        self.layers = frozenset(layers)
        self.active = False
        self.maps: dict[int, torch.Tensor] = {}

    def wants_probs(self, store: ConditioningStore, layer: LayerInfo) -> bool:
        return self.active and layer.index in self.layers

    def probs(self, store: ConditioningStore, layer: LayerInfo, probs: torch.Tensor, rows: slice) -> None:
        self.maps[layer.index] = probs.mean(dim=(1, 2))  # (B, heads, N, T) → (B, T)

    def token_means(self) -> torch.Tensor:
        """μ (B, T): the mean over the read layers of the per-layer means (paper Eq. 4's μ)."""
        if set(self.maps) != self.layers:
            missing = sorted(self.layers - set(self.maps))
            raise RuntimeError(f"attention of layers {missing} was not captured")
        return torch.stack([self.maps[i] for i in sorted(self.maps)]).mean(0)


@contextlib.contextmanager
def capturing(unet: Any, capture: AttentionCapture) -> Iterator[AttentionCapture]:
    """Install ``capture`` for the duration (the UNet's processors come back after, unless another
    method's hook keeps the studio's), with gradient checkpointing off: a recomputed block would run
    without the capture, so its probabilities could not take part in the backward pass."""
    add_hook(unet, HOOK_KEY, capture)
    checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))
    if checkpointing:
        unet.disable_gradient_checkpointing()
    try:
        yield capture
    finally:
        capture.active = False
        if checkpointing:
            unet.enable_gradient_checkpointing()
        remove_hook(unet, HOOK_KEY)


# -- the regulariser a trainer holds ----------------------------------------------------------------
def encoder_states(pipe: Any, cond: Conditioning) -> list[torch.Tensor]:
    """Per text encoder, its part of the UNet's context (B, T, D_e) — SD: the final-normed last layer;
    SDXL: each encoder's penultimate layer (channels concatenated in encoder order)."""
    widths = [int(te.config.hidden_size) for _, te in text_encoders(pipe)]
    return list(cond.encoder_hidden_states.split(widths, dim=-1))


@dataclass
class _Batch:
    """What the loop's last training UNet call got: the noisy latents (B, C, h, w), timesteps (B,),
    SDXL's added conditioning, and the autocast state it ran under."""

    sample: torch.Tensor
    timesteps: torch.Tensor
    added: dict[str, torch.Tensor] | None
    autocast: tuple[str, bool, torch.dtype]


Encode = Callable[[list[str]], Conditioning]
States = Callable[[list[str], Conditioning | None, torch.Tensor], list[torch.Tensor]]


class CoreRegularizer:
    """CoRe's losses for one training run (see the module docstring).

    ``encode(prompts)`` is the trainer's own conditioning of concept prompts (with gradients; the
    UNet call that follows must consume it — NeTI binds its ids there); ``states(prompts, cond,
    timesteps)`` gives each encoder's states of the concept prompts, (…, B, T, D_e), reusing ``cond``
    when given. A forward pre-hook on the UNet records each training call's inputs, which the
    attention passes reuse. :attr:`state` (the optimizer steps done, int64) belongs in the trainer's
    ``trainable()`` so that a resumed run draws the same prompts."""

    def __init__(self, base: Any, cfg: CoreOptions, *, concept_text: str, class_text: str, encode: Encode,
                 states: States, log: Callable[[str], None] | None = None):
        self.base, self.cfg = base, cfg
        self.pipe, self.unet = base.pipe, base.pipe.unet
        self.encode, self.states = encode, states
        self.prompt_set, templates = context_prompts(base, cfg.core_prompts, cfg.core_prompts_file)
        self.pairs = make_pairs(self.pipe, templates, concept_text, class_text)
        self.layers = resolve_layers(self.unet, cfg.core_layers) if cfg.core_attention_weight > 0 else []
        self.state = torch.zeros(1, dtype=torch.int64)
        self.micro = 0
        self.last: _Batch | None = None
        self.values: dict[str, float] = {}  # the last computed losses, unweighted (for logs and tests)
        self._busy = False
        self._handle = self.unet.register_forward_pre_hook(self._record, with_kwargs=True)
        if log is not None:
            log(f"CoRe: {len(self.pairs)} context prompts ({self.prompt_set}), attention read on "
                f"{len(self.layers)} of {len(unet_layers(self.unet))} cross-attention layers")

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._busy or not torch.is_grad_enabled():
            return  # our own passes; the probe's and previews' no-grad passes
        sample = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if not torch.is_tensor(sample) or sample.ndim != 4:
            return
        t = torch.as_tensor(t, device=sample.device).flatten()
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        kind = sample.device.type
        autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        self.last = _Batch(sample.detach(), t.detach(), kwargs.get("added_cond_kwargs"), autocast)

    def trainable(self) -> dict[str, torch.Tensor]:
        """The run state to checkpoint (no gradient)."""
        return {"core.step": self.state}

    def record(self) -> dict[str, Any]:
        return {"core_prompt_set": self.prompt_set, "core_prompt_count": len(self.pairs), "core_layers_read": self.layers}

    def due(self) -> bool:
        return int(self.state[0]) % self.cfg.core_every == 0

    def _draw(self, n: int) -> list[ContextPair]:
        gen = torch.Generator().manual_seed(hash((int(getattr(self.cfg, "seed", 0)), int(self.state[0]), self.micro, 11))
                                            & 0x7FFF_FFFF_FFFF_FFFF)
        return [self.pairs[int(i)] for i in torch.randint(len(self.pairs), (n,), generator=gen)]

    def loss(self) -> torch.Tensor | None:
        """``λ_emb·L_emb + λ_attn·L_attn`` for the last recorded batch (None on a step CoRe skips)."""
        cfg, batch = self.cfg, self.last
        self.micro += 1
        w_emb, w_attn = cfg.core_embedding_weight, cfg.core_attention_weight
        if batch is None or not self.due() or (w_emb <= 0 and w_attn <= 0):
            return None
        pairs = self._draw(batch.sample.shape[0])
        concept_prompts, class_prompts = [p.concept for p in pairs], [p.klass for p in pairs]
        kind, enabled, dtype = batch.autocast
        resolution = int(batch.sample.shape[-1])  # only for SDXL's square time_ids, replaced by the batch's
        self._busy = True
        try:
            with torch.autocast(kind, dtype=dtype, enabled=enabled):
                with torch.no_grad():
                    class_cond = encode_prompts(self.pipe, class_prompts, resolution=resolution,
                                                device=batch.sample.device)
                total = torch.zeros((), device=batch.sample.device)
                cond = None
                if w_attn > 0:
                    with capturing(self.unet, AttentionCapture(self.layers)) as cap:
                        cap.active = True
                        with torch.no_grad():
                            self._unet(batch, class_cond)
                            class_mu = cap.token_means()
                        cap.maps.clear()
                        cond = self.encode(concept_prompts)
                        self._unet(batch, cond)
                        concept_mu = cap.token_means()
                    l_attn = context_attention_loss(concept_mu, class_mu, pairs)
                    self.values["attention"] = float(l_attn.detach())
                    total = total + w_attn * l_attn
                if w_emb > 0:
                    concept_states = self.states(concept_prompts, cond, batch.timesteps)
                    l_emb = context_embedding_loss(concept_states, encoder_states(self.pipe, class_cond), pairs)
                    self.values["embedding"] = float(l_emb.detach())
                    total = total + w_emb * l_emb
        finally:
            self._busy = False
        return total

    def _unet(self, batch: _Batch, cond: Conditioning) -> None:
        added = cond.added_cond_kwargs
        if added is not None and batch.added is not None and "time_ids" in batch.added:
            added = added | {"time_ids": batch.added["time_ids"]}
        self.unet(batch.sample, batch.timesteps, cond.encoder_hidden_states.to(batch.sample.dtype),
                  added_cond_kwargs=added)

    def after_step(self) -> None:
        self.state += 1
        self.micro = 0

    def close(self) -> None:
        """Idempotent: the recording pre-hook leaves the UNet."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.last = None


class NormWindow:
    """The paper's embedding rescaling (§3.3, appendix G: steps 120–180 of 300): from optimizer step
    ``start`` to ``end`` the norm of every trained vector is put back, after each step, to the norm it
    had at ``start`` — outside the window the norm is free. ``norms`` (one per vector and encoder,
    zero until recorded) is run state for the checkpoint."""

    def __init__(self, params: Sequence[torch.Tensor], start: int, end: int):
        self.params, self.start, self.end = list(params), start, end
        self.norms = [torch.zeros(p.shape[0], device=p.device, dtype=torch.float32) for p in self.params]

    @property
    def enabled(self) -> bool:
        return self.end > self.start

    def trainable(self) -> dict[str, torch.Tensor]:
        return {f"core.norm.{e}": n for e, n in enumerate(self.norms)} if self.enabled else {}

    def after_step(self, done: int) -> None:
        """Call after optimizer step number ``done`` (1-based)."""
        if not self.enabled:
            return
        with torch.no_grad():
            if done == self.start or (self.start < done <= self.end and not bool(self.norms[0].any())):
                for p, n in zip(self.params, self.norms):  # the reference (also when resumed inside the window)
                    n.copy_(p.detach().float().norm(dim=-1))
            elif self.start < done <= self.end:
                for p, n in zip(self.params, self.norms):
                    p.mul_((n / p.detach().float().norm(dim=-1).clamp_min(1e-12)).to(p.dtype)[:, None])
