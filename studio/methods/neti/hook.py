"""Per-layer, per-timestep text contexts for every NeTI (and ProSpect) concept of a pipeline, through
the shared cross-attention processor (:mod:`studio.methods.attention`).

One :class:`NetiHook` per pipeline serves all applied concepts whose token vector depends on the
denoising timestep (two such tokens in one prompt are encoded in the same pass). Each is a
:class:`TimestepTokens` entry: NeTI's :class:`NetiEntry` (a mapper ``M(t, ℓ)``, per layer) or
ProSpect's stage table (:mod:`studio.methods.prospect`, the same vector at every layer). When no
entry depends on the layer, one context serves every layer (``L' = 1`` below, not ``L``). It is a ``context`` hook: each cross-attention layer ``ℓ``
(fixed index from :class:`~studio.methods.attention.LayerInfo`, no call counter) gets
``(keys ctx, values ctx)`` for the current UNet call. The work is done **before** the UNet runs,
in a forward pre-hook on the UNet, so that gradient checkpointing only ever re-reads finished
tensors (the recomputed blocks look the contexts up again; gradients reach the mapper through
the same graph):

1. **which rows**, and which prompt each row is. *Training*: the trainer :meth:`~NetiHook.bind`\\ s
   the batch's token ids just before the UNet call; every row is edited. *Inference*: a forward
   hook on each text encoder records the ids and output states of every call whose ids hold a NeTI
   placeholder; a batch row of ``encoder_hidden_states`` whose slice equals a recorded row
   (exactly) is that prompt. Rows that match nothing (the unconditional half of classifier-free
   guidance, prompts without the token) keep the pipeline's own context; the processor's ``rows``
   (the conditional CFG rows) bound what is edited, so CFG stays one batched UNet pass.
2. **one batched text-encoder pass for all layers**: for ``Q`` (timestep, prompt) pairs the ``L``
   per-layer token vectors ``M(t, ℓ)`` are spliced into ``(L·Q, T)`` sequences and encoded at once
   (:func:`~studio.methods.neti.encoder.text_states`): keys without the bypass, values with it.
3. **cache** (inference): contexts are kept per (encoder, timestep, prompt) — a scheduler's
   timesteps are only known once it has run ``set_timesteps``, so each is computed lazily on first
   sight and reused by the next images of the same prompt. The key holds the prompt's ids and a
   fingerprint of the pipeline's own states for it (which change when another concept — a TI
   token, a text-encoder LoRA — changes the encoder), and the cache is emptied when NeTI concepts
   come or go. It stops growing at ``max_cache_bytes``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from studio.methods.attention import AttentionHook, ConditioningStore, LayerInfo, add_hook, remove_hook, store_of
from studio.methods.neti.encoder import bypass_direction, text_states
from studio.methods.neti.mapper import NetiMapper
from studio.methods.runtime import text_encoders, token_table

HOOK_KEY = "neti"
DEFAULT_CACHE_BYTES = 1 << 30


class TimestepTokens(Protocol):
    """One concept served by the hook: its placeholder's input vector per (timestep, layer)."""

    trigger: str  # the placeholder token, e.g. "<hrt>"

    @property
    def n_layers(self) -> int | None:
        """How many cross-attention layers the vectors are made for; None: the same at every layer."""
        ...

    def vectors(self, t: torch.Tensor, layer: torch.Tensor, *, training: bool
                ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per text encoder ``(token (N, D_e), bypass direction (N, D_e) or None)`` for the queries
        ``t`` (N,) (raw timesteps) and ``layer`` (N,) (layer indices; all 0 when ``n_layers`` is None).
        The direction is :func:`~studio.methods.neti.encoder.bypass_direction`'s ``scale · b/‖b‖``."""
        ...


@dataclass
class NetiEntry:
    """One NeTI concept on the pipeline (a :class:`TimestepTokens`)."""

    trigger: str  # the placeholder token, e.g. "<hrt>"
    mapper: NetiMapper
    truncation: int | None = None  # keep h[:truncation] (None = all)
    bypass: bool = True
    rng_state: torch.Tensor | None = None  # training: nested-dropout generator state (uint8, updated in place)

    @property
    def n_layers(self) -> int | None:
        return self.mapper.cfg.n_layers

    def vectors(self, t: torch.Tensor, layer: torch.Tensor, *, training: bool
                ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``M(t, ℓ)`` split per encoder; one nested-dropout draw per call while training."""
        device = self.mapper.w.device
        gen = None
        if training and self.rng_state is not None:
            gen = torch.Generator()
            gen.set_state(self.rng_state)
        out = self.mapper(t.to(device), layer.to(device), truncation=self.truncation, dropout=gen)
        if gen is not None:
            assert self.rng_state is not None  # gen was made from it
            self.rng_state.copy_(gen.get_state())
        scale = self.mapper.cfg.bypass_scale
        return [(tok, bypass_direction(byp, scale) if self.bypass else None) for tok, byp in self.mapper.split(out)]


@dataclass
class _Record:
    """A text-encoder call that held a placeholder: ids (R, T), the states the UNet reads (R, T, D),
    and per row a cache key (ids, fingerprint of the states)."""

    ids: torch.Tensor
    states: torch.Tensor
    keys: list[tuple[Any, ...]]


@dataclass
class _Part:
    """One encoder's edit of a UNet call: batch ``rows`` (R,) take ``keys[ℓ, src]`` (L', Q, T, D_e);
    with ``L' = 1`` every layer reads ``keys[0, src]``."""

    rows: torch.Tensor
    src: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor  # the same tensor as ``keys`` when no concept uses the bypass


@dataclass
class _Plan:
    batch: int
    seq: int
    parts: list[_Part | None]


@dataclass
class HookStats:
    """Counters (for tests and the benchmark)."""

    encoder_passes: int = 0  # batched text-encoder passes run by the hook
    sequences: int = 0  # sequences encoded in them
    cache_hits: int = 0
    cache_misses: int = 0


class NetiHook(AttentionHook):
    """See the module docstring. Made by :func:`attach_neti_hook`; uninstalled when its last entry goes."""

    def __init__(self, pipe: Any, max_cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.pipe = pipe
        self.encoders = [te for _, te in text_encoders(pipe)]
        self.widths = [int(te.config.hidden_size) for te in self.encoders]
        self.offsets = _offsets(self.widths)  # each encoder's channel slice of the UNet's context
        self.penultimate = len(self.encoders) > 1  # SDXL reads hidden_states[-2]
        self.entries: dict[str, TimestepTokens] = {}
        self.records: list[deque[_Record]] = [deque(maxlen=4) for _ in self.encoders]
        self.cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache_bytes = 0
        self.max_cache_bytes = max_cache_bytes
        self.bound: list[torch.Tensor] | None = None
        self.plan: _Plan | None = None
        self.n_layers = 0
        self.stats = HookStats()
        self._handles: list[Any] = []

    # -- lifecycle --------------------------------------------------------------------------------
    def install(self) -> None:
        store = add_hook(self.pipe.unet, HOOK_KEY, self)
        self.n_layers = len(store.layers)
        self._handles.append(self.pipe.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
        for e, te in enumerate(self.encoders):
            self._handles.append(te.register_forward_hook(self._recorder(e), with_kwargs=True))

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        remove_hook(self.pipe.unet, HOOK_KEY)
        self.entries.clear()
        self.clear_cache()
        self.plan, self.bound = None, None
        for r in self.records:
            r.clear()

    def add(self, entry: TimestepTokens) -> None:
        if entry.n_layers is not None and entry.n_layers != self.n_layers:
            raise ValueError(f"mapper for {entry.n_layers} layers on a UNet with {self.n_layers}")
        self.entries[entry.trigger] = entry
        self.clear_cache()

    def drop(self, trigger: str) -> None:
        """Remove a concept; the last one out uninstalls the hook."""
        self.entries.pop(trigger, None)
        self.clear_cache()
        if not self.entries:
            self.uninstall()

    def clear_cache(self) -> None:
        self.cache.clear()
        self.cache_bytes = 0

    @property
    def n_contexts(self) -> int:
        """``L'``: contexts per (timestep, prompt) — one per layer when an entry depends on the layer, else 1."""
        return self.n_layers if any(e.n_layers is not None for e in self.entries.values()) else 1

    def bind(self, input_ids: list[torch.Tensor]) -> None:
        """Training: the next UNet call's rows are these prompts, ``input_ids[e]`` (B, T) per encoder."""
        self.bound = list(input_ids)

    # -- the attention hook -------------------------------------------------------------------------
    def context(self, store: ConditioningStore, layer: LayerInfo, ctx: torch.Tensor,
                rows: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(keys ctx, values ctx)`` (B, T, ΣD): planned rows ≥ ``rows.start`` replaced by layer
        ``layer.index``'s contexts (the one shared context when ``L' = 1``), the other rows as given."""
        plan = self.plan
        if plan is None or tuple(ctx.shape[:2]) != (plan.batch, plan.seq) or layer.index >= self.n_layers:
            return None
        split_values = any(p is not None and p.values is not p.keys for p in plan.parts)
        keys = ctx.clone()
        values = ctx.clone() if split_values else keys
        changed = False
        for part, (lo, hi) in zip(plan.parts, self.offsets):
            if part is None:
                continue
            sel, src = part.rows, part.src
            if rows.start > 0:
                keep = sel >= rows.start
                sel, src = sel[keep], src[keep.to(src.device)]
            if not sel.numel():
                continue
            changed = True
            index = layer.index if part.keys.shape[0] > 1 else 0
            keys[sel, :, lo:hi] = part.keys[index, src].to(ctx.dtype)
            if values is not keys:
                values[sel, :, lo:hi] = part.values[index, src].to(ctx.dtype)
        return (keys, values) if changed else None

    # -- 1. which rows -----------------------------------------------------------------------------
    def _placeholder_ids(self, e: int) -> dict[str, int]:
        """Trigger → token id in encoder ``e``'s tokenizer now (ids move when other concepts come
        and go, so they are looked up at every use)."""
        table = token_table(self.pipe)
        tokenizer = text_encoders(self.pipe)[e][0]
        first_added = len(table.pristine_tokenizers[e])
        out = {}
        for trigger in self.entries:
            tid = tokenizer.convert_tokens_to_ids(trigger)
            if isinstance(tid, int) and tid >= first_added:
                out[trigger] = tid
        return out

    def _recorder(self, e: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            ids = args[0] if args else kwargs.get("input_ids")
            if not self.entries or not torch.is_tensor(ids) or ids.ndim != 2:
                return
            pids = list(self._placeholder_ids(e).values())
            if not pids:
                return
            holds = torch.isin(ids, torch.tensor(pids, device=ids.device)).any(dim=-1)  # (R,)
            if not bool(holds.any()):
                return
            if self.penultimate:
                hidden = getattr(output, "hidden_states", None)
                states = hidden[-2] if hidden is not None else None
            else:
                states = getattr(output, "last_hidden_state", None)
            if states is None:
                return  # e.g. clip_skip or a tuple output: the placeholder keeps its fixed row
            ids, states = ids[holds].detach(), states[holds].detach()
            sums = states.double().sum(dim=(1, 2)).tolist()
            abs_sums = states.double().abs().sum(dim=(1, 2)).tolist()
            keys = [(tuple(row), s, a) for row, s, a in zip(ids.tolist(), sums, abs_sums)]
            self.records[e].append(_Record(ids, states, keys))
        return hook

    def _match(self, e: int, part: torch.Tensor) -> list[tuple[int, _Record, int]]:
        """Rows ``b`` of ``part`` (B, T, D_e) equal to a recorded row: ``[(b, record, r)]``."""
        found: dict[int, tuple[_Record, int]] = {}
        sig = part.float().sum(-1)  # (B, T): a cheap pre-filter before exact comparison
        for rec in reversed(self.records[e]):  # newest first
            if tuple(rec.states.shape[1:]) != tuple(part.shape[1:]):
                continue
            states = rec.states.to(part.device, part.dtype)
            close = torch.isclose(sig[:, None], states.float().sum(-1)[None], rtol=1e-4, atol=1e-4).all(-1)  # (B, R)
            for b, r in close.nonzero().tolist():
                if b not in found and torch.equal(part[b], states[r]):
                    found[b] = (rec, r)
        return [(b, rec, r) for b, (rec, r) in sorted(found.items())]

    # -- 2./3. the contexts --------------------------------------------------------------------------
    def _before_unet(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.plan = None
        bound, self.bound = self.bound, None
        ehs = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if not self.entries or not torch.is_tensor(ehs) or ehs.ndim != 3 or ehs.shape[-1] != sum(self.widths):
            return
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        batch = ehs.shape[0]
        ts = torch.as_tensor(t).detach().float().flatten()
        ts = ts.expand(batch) if ts.numel() == 1 else ts
        if bound is not None and all(tuple(ids.shape) == tuple(ehs.shape[:2]) for ids in bound):
            self.plan = self._training_plan(bound, ts)
        else:
            self.plan = self._inference_plan(ehs, ts)

    def _mapper_outputs(self, t: torch.Tensor, n_rows: int, training: bool
                        ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """Trigger → per encoder ``(token, bypass direction or None)``, each (L'·Q, D_e), rows
        layer-major (row ``ℓ·Q + q``); ``t``: (Q,)."""
        n_ctx = self.n_contexts
        tt = t.repeat(n_ctx)
        ll = torch.arange(n_ctx, device=t.device).repeat_interleave(n_rows)
        return {trigger: entry.vectors(tt, ll, training=training) for trigger, entry in self.entries.items()}

    def layer_contexts(self, e: int, ids: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder ``e``'s ``(keys, values)`` contexts, each (L', Q, T, D_e), for prompts ``ids``
        (Q, T) at timesteps ``t`` (Q,) — every layer in one batched pass, no dropout, no cache."""
        return self._contexts(e, ids, self._mapper_outputs(t, ids.shape[0], training=False))

    def _contexts(self, e: int, ids: torch.Tensor, outs: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder ``e``'s contexts for ``Q`` prompts ``ids`` (Q, T) at every layer, from the entries'
        vectors ``outs`` (L'·Q rows each): ``(keys, values)`` each (L', Q, T, D_e), one encoder pass."""
        te = self.encoders[e]
        n_q, seq = ids.shape
        n_ctx = self.n_contexts
        ids_rep = ids.to(te.device).repeat(n_ctx, 1)  # (L'·Q, T), row ℓ·Q + q
        emb = te.get_input_embeddings()(ids_rep)  # (L'·Q, T, D)
        bypass: torch.Tensor | None = None
        where: torch.Tensor | None = None
        for trigger, tid in self._placeholder_ids(e).items():
            mask = ids_rep == tid  # (L'·Q, T)
            if not bool(mask.any()):
                continue
            token, direction = outs[trigger][e]  # (L'·Q, D) each
            emb = torch.where(mask[..., None], token[:, None, :].to(emb.device, emb.dtype), emb)
            if direction is not None:
                direction = direction[:, None, :].to(emb.device, emb.dtype)
                bypass = torch.where(mask[..., None], direction, bypass if bypass is not None else torch.zeros_like(emb))
                where = mask if where is None else where | mask
        keys, values = text_states(te, emb, penultimate=self.penultimate, bypass=bypass, where=where)
        self.stats.encoder_passes += 1
        self.stats.sequences += ids_rep.shape[0]
        shape = (n_ctx, n_q, seq, keys.shape[-1])
        keys = keys.reshape(shape)
        return keys, (keys if values is None or where is None else values.reshape(shape))

    def _training_plan(self, bound: list[torch.Tensor], ts: torch.Tensor) -> _Plan:
        batch, seq = bound[0].shape
        outs = self._mapper_outputs(ts, batch, training=True)  # one dropout draw shared by the encoders
        parts: list[_Part | None] = []
        for e, ids in enumerate(bound):
            keys, values = self._contexts(e, ids, outs)
            rows = torch.arange(batch, device=keys.device)
            parts.append(_Part(rows, rows, keys, values))
        return _Plan(batch, seq, parts)

    def _inference_plan(self, ehs: torch.Tensor, ts: torch.Tensor) -> _Plan | None:
        parts: list[_Part | None] = []
        for e, (lo, hi) in enumerate(self.offsets):
            matches = self._match(e, ehs[..., lo:hi])
            if not matches:
                parts.append(None)
                continue
            order: dict[tuple[Any, ...], int] = {}
            rows, src, missing = [], [], {}
            for b, rec, r in matches:
                key = (e, float(ts[b]), rec.keys[r])
                if key not in order:
                    order[key] = len(order)
                    if key not in self.cache:
                        missing[key] = (rec.ids[r], ts[b])
                rows.append(b)
                src.append(order[key])
            self.stats.cache_hits += len(order) - len(missing)
            self.stats.cache_misses += len(missing)
            fresh: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
            if missing:
                ids = torch.stack([i for i, _ in missing.values()])  # (M, T)
                t = torch.stack([t for _, t in missing.values()])  # (M,)
                keys, values = self._contexts(e, ids, self._mapper_outputs(t, len(missing), training=False))
                for m, key in enumerate(missing):
                    k = keys[:, m].contiguous()
                    v = k if values is keys else values[:, m].contiguous()
                    fresh[key] = (k, v)
                    size = k.numel() * k.element_size() * (1 if v is k else 2)
                    if self.cache_bytes + size <= self.max_cache_bytes:
                        self.cache[key] = (k, v)
                        self.cache_bytes += size
            got = [self.cache[key] if key in self.cache else fresh[key] for key in order]
            keys = torch.stack([k for k, _ in got], dim=1)  # (L', Q, T, D_e)
            same = all(v is k for k, v in got)
            values = keys if same else torch.stack([v for _, v in got], dim=1)
            dev = ehs.device
            parts.append(_Part(torch.tensor(rows, device=dev), torch.tensor(src, device=keys.device), keys, values))
        if all(p is None for p in parts):
            return None
        return _Plan(ehs.shape[0], ehs.shape[1], parts)


def _offsets(widths: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for w in widths:
        out.append((start, start + w))
        start += w
    return out


def neti_hook(pipe: Any) -> NetiHook | None:
    """The pipeline's :class:`NetiHook`, or None when no NeTI concept is on it."""
    store = store_of(pipe.unet)
    hook = store.hooks.get(HOOK_KEY) if store is not None else None
    return hook if isinstance(hook, NetiHook) else None


def attach_neti_hook(pipe: Any) -> NetiHook:
    """The pipeline's :class:`NetiHook`, installed on first use."""
    hook = neti_hook(pipe)
    if hook is None:
        hook = NetiHook(pipe)
        try:
            hook.install()
        except BaseException:  # a half-done install (attention hook, some forward hooks) leaves nothing
            for handle in hook._handles:
                handle.remove()
            hook._handles = []
            store = store_of(pipe.unet)
            if store is not None and store.hooks.get(HOOK_KEY) is hook:
                remove_hook(pipe.unet, HOOK_KEY)
            raise
    return hook
