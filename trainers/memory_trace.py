"""The bytes of one training step's tensors, simulated on PyTorch's ``meta`` device.

A meta tensor has a shape and a dtype but no data: the real UNet, VAE and text-encoder code runs on
meta copies of the base's modules (built from their configs, so SD 1.5 or SDXL cost nothing to
"load") in a fraction of a second, doing no arithmetic. :class:`LiveBytes`, a dispatch mode, sees
every tensor an operation creates — in the forward, in the backward and in the recomputation of
gradient checkpointing alike — and frees it when its storage dies (the last view of it is gone,
autograd's saved copies included). Its ``peak`` is the high-water mark of the step's tensor bytes as
a device allocator would count them; nothing about layer counts, widths or block types is assumed.

What would differ on a real device is emulated by :class:`MetaRuntime`, a torch-function mode:

* **attention**: memory-efficient kernels (PyTorch SDPA's flash / memory-efficient backends,
  xformers) keep the output and a float32 log-sum-exp per query, never the ``heads × N × M``
  probability matrix; meta SDPA would take the math path, so ``attention="sdpa"`` replaces it by a
  kernel of that footprint and ``"math"`` runs the explicit ``softmax(q kᵀ) v`` (probabilities saved);
* **mixed precision**: autocast does not act on meta tensors, so inside :meth:`MetaRuntime.autocast`
  the mode casts the float32 inputs of matmul-like ops to fp16/bf16 (caching the casts of trainable
  leaves for the forward, as autocast does) and runs group/layer norm and softmax in float32 —
  CUDA autocast's lists for the ops a diffusion UNet and a CLIP encoder use.

:func:`trace_step` runs one training step (text encoder, UNet, loss, backward) and
:func:`trace_forward` a no-gradient pass (the probe's, the VAE's encoding of the photos); both
return a :class:`Trace`. ``trainers.memory`` turns traces into an estimate.
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")
# Autocast: ops whose float32 inputs are cast to the lower precision (CUDA and CPU), and the ops CUDA
# runs in float32 (on CPU these run in their inputs' precision).
LOWER_OPS = frozenset({"conv1d", "conv2d", "linear", "matmul", "__matmul__", "bmm", "baddbmm", "mm", "addmm",
                       "einsum", "scaled_dot_product_attention"})
FP32_OPS = frozenset({"group_norm", "layer_norm", "softmax", "log_softmax"})


@dataclass
class _Record:
    nbytes: int
    tag: str
    born: int
    died: int | None = None


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live meta storages. ``ignore``: tensors that exist before (weights,
    their gradients) — their storages are never counted, views of them included."""

    def __init__(self, ignore: Iterable[torch.Tensor] = (), workspace: Callable[[Any, Any], int] | None = None) -> None:
        super().__init__()
        self.workspace = workspace
        self._ignore = {t.untyped_storage()._cdata for t in ignore}
        self._live: dict[int, _Record] = {}
        self.records: list[_Record] = []
        self.current = 0
        self.peak = 0
        self.peak_at = 0  # the allocation count when the peak was reached
        self.tag = "other"

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        extra = self.workspace(func, args) if self.workspace is not None else 0
        if extra and self.current + extra > self.peak:  # a kernel's scratch memory, gone when it returns
            self.peak, self.peak_at = self.current + extra, len(self.records)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                self._allocate(t)
        return out

    def _allocate(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live or key in self._ignore:
            return
        rec = _Record(storage.nbytes(), self.tag, len(self.records))
        self.records.append(rec)
        self._live[key] = rec
        self.current += rec.nbytes
        if self.current > self.peak:
            self.peak, self.peak_at = self.current, rec.born
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        rec = self._live.pop(key, None)
        if rec is not None:
            rec.died = len(self.records)
            self.current -= rec.nbytes

    def reset_peak(self) -> None:
        """Start a new phase: its peak counts from what is live now."""
        gc.collect()
        self.peak, self.peak_at = self.current, len(self.records)

    def live_by_tag(self) -> dict[str, int]:
        """Bytes live now, by the tag they were allocated under."""
        out: dict[str, int] = {}
        for rec in self._live.values():
            out[rec.tag] = out.get(rec.tag, 0) + rec.nbytes
        return out

    def at_peak(self, keep: Callable[[_Record], bool]) -> int:
        """Bytes of the records ``keep`` selects that were live when the peak was reached."""
        return sum(r.nbytes for r in self.records
                   if keep(r) and r.born <= self.peak_at and (r.died is None or r.died > self.peak_at))


class _EfficientAttention(torch.autograd.Function):
    """The footprint of a memory-efficient attention kernel: saves q, k, v, the output and a float32
    log-sum-exp (B, heads, N); the backward makes dq, dk, dv and a float32 dq accumulator."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        accumulator = q.new_empty(q.shape, dtype=torch.float32)
        dq = accumulator.to(q.dtype)
        return dq, torch.empty_like(k), torch.empty_like(v)


def _attention(kind: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: float | None = None, **_: Any) -> torch.Tensor:
    """``kind`` "sdpa": :class:`_EfficientAttention`; "math": softmax(q kᵀ · scale + mask) v, (B, h, N, M) kept."""
    if kind != "math":
        return _EfficientAttention.apply(query, key, value)
    scores = (query * (scale or query.shape[-1] ** -0.5)) @ key.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ value


class MetaRuntime(TorchFunctionMode):
    """Attention kernels and autocast as on a real device (module docstring)."""

    def __init__(self, attention: str = "sdpa", autocast: torch.dtype | None = None, device: str = "cuda") -> None:
        super().__init__()
        self.attention, self.dtype = attention, autocast
        self.fp32_ops = FP32_OPS if device != "cpu" else frozenset()
        self.casting = False
        self._cache: dict[int, torch.Tensor] = {}

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The region the training loop runs under ``accelerator.autocast()`` (no-op without a dtype)."""
        self.casting = self.dtype is not None
        try:
            yield
        finally:
            self.casting = False
            self._cache.clear()  # autocast's weight-cast cache lives as long as the region

    @contextmanager
    def recompute(self, casting: bool) -> Iterator[None]:
        """Gradient checkpointing's recomputation in the backward: as in the forward (autocast on or off),
        with a cast cache of its own."""
        saved, self.casting, cache = self.casting, casting, self._cache
        self._cache = {}
        try:
            yield
        finally:
            self.casting, self._cache = saved, cache

    def checkpointing(self, model: nn.Module) -> None:
        """Turn on gradient checkpointing in every block of ``model`` that supports it (diffusers and
        transformers blocks carry ``gradient_checkpointing``) with PyTorch's non-reentrant checkpoint,
        recomputing under this mode (the backward runs outside the ``with`` of the forward)."""

        def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            casting = self.casting

            def run(*a: Any, **k: Any) -> Any:
                if any(m is self for m in _function_modes()):
                    return fn(*a, **k)
                with self, self.recompute(casting):
                    return fn(*a, **k)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        for m in model.modules():
            if hasattr(m, "gradient_checkpointing"):
                setattr(m, "gradient_checkpointing", True)  # noqa: B010 - nn.Module's typed __setattr__
                setattr(m, "_gradient_checkpointing_func", checkpoint)  # noqa: B010

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.casting and self.dtype is not None:
            if name in LOWER_OPS:
                args, kwargs = self._cast(args, self.dtype), self._cast(kwargs, self.dtype)
            elif name in self.fp32_ops:
                args, kwargs = self._cast(args, torch.float32), self._cast(kwargs, torch.float32)
        if name == "scaled_dot_product_attention":
            return _attention(self.attention, *args, **kwargs)
        return func(*args, **kwargs)

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point() or value.dtype == dtype:
                return value
            if dtype == torch.float32:  # a float32 op: half inputs are promoted
                return value.float()
            if value.dtype != torch.float32:  # only float32 inputs are lowered
                return value
            if value.is_leaf and value.requires_grad:  # autocast caches the casts of trainable leaves
                cached = self._cache.get(id(value))
                if cached is None:
                    cached = self._cache[id(value)] = value.to(dtype)
                return cached
            return value.to(dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if isinstance(value, dict):
            return {k: self._cast(v, dtype) for k, v in value.items()}
        return value


def _function_modes() -> list[Any]:
    from torch.overrides import _get_current_function_mode_stack

    return list(_get_current_function_mode_stack())


# -- meta copies of a pipeline's modules ----------------------------------------------------------------------
def meta_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``module`` on the meta device, built from its config (diffusers ``from_config``,
    transformers ``_from_config``), every parameter frozen, cast to ``dtype`` if given."""
    if next(module.parameters()).device.type == "meta":
        out = copy.deepcopy(module)
    else:
        cls: Any = type(module)
        with torch.device(META):
            out = cls.from_config(module.config) if hasattr(cls, "from_config") else cls._from_config(module.config)
    out.requires_grad_(False)
    out.train()
    return quiet_cast(out, dtype) if dtype is not None else out


def quiet_cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` without diffusers' notice about modules to keep in float32 (it is about loading weights)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of a meta module (no data is copied)."""
    return copy.deepcopy(module)


def _existing(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for m in modules:
        for p in m.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
        out.extend(m.buffers())
    return out


def _tag_blocks(unet: nn.Module, meter: LiveBytes) -> list[Any]:
    """Tag the allocations of each top-level UNet block (``down_blocks.0`` … ``mid_block`` …) by name."""
    handles: list[Any] = []
    stack: list[str] = []

    def enter(name: str) -> Callable[..., None]:
        def pre(*_: Any) -> None:
            stack.append(meter.tag)
            meter.tag = name
        return pre

    def leave(*_: Any) -> None:
        meter.tag = stack.pop() if stack else "unet"

    for name, child in unet.named_children():
        parts = list(child.named_children()) if isinstance(child, nn.ModuleList) else [("", child)]
        for sub, mod in parts:
            label = f"{name}.{sub}" if sub else name
            handles += [mod.register_forward_pre_hook(enter(label)), mod.register_forward_hook(leave)]
    return handles


@dataclass
class Trace:
    """What a simulated phase allocated (bytes). ``peak``: its high-water mark beyond what existed
    before; ``grads_at_peak``: the part of it that was parameter gradients; ``saved``: what the
    forward left for the backward; ``text``: the text encoders' share of it; ``blocks``: per UNet block."""

    peak: int
    grads_at_peak: int = 0
    saved: int = 0
    text: int = 0
    blocks: dict[str, int] = field(default_factory=dict)


@dataclass
class StepSpec:
    """One training step as the loop runs it (``trainers.loop``).

    ``rows``: samples through the UNet (instance + class rows); ``latent``: (C, h, w);
    ``text``: ``"none"`` (conditioning without gradient: cached, or the encoders under no_grad),
    ``"input"`` (gradients to trained input vectors spliced into the encoders' input),
    ``"trainable"`` (the encoders' trainable parameters, e.g. a LoRA, get gradients);
    ``text_rows``: rows through the encoders (0 = ``rows``; NeTI encodes one per UNet layer and row);
    ``image_tokens``: an IP-Adapter's image tokens per row (0: none); ``autocast``: the
    mixed-precision dtype or None; ``device``: the device type autocast's lists are those of."""

    rows: int
    latent: tuple[int, int, int]
    text: str = "none"
    text_rows: int = 0
    image_tokens: int = 0
    checkpointing: bool = False
    autocast: torch.dtype | None = None
    attention: str = "sdpa"
    device: str = "cuda"


def trace_step(unet: nn.Module, encoders: list[nn.Module], spec: StepSpec, *,
               adapter: Callable[[nn.Module, int], Callable[[int], None]] | None = None,
               others: Iterable[nn.Module] = (), workspace: Callable[[Any, Any], int] | None = None) -> Trace:
    """Simulate one training step on meta modules whose trainable parameters already have
    ``requires_grad`` (and a ``.grad`` each only if gradients should count as pre-existing).

    ``encoders``: the text encoders (their outputs concatenated, SDXL's penultimate states; the last
    one's pooled projection feeds SDXL's ``text_embeds``). ``adapter``: installs image attention
    on the UNet; called as ``adapter(unet, rows)`` it returns a function binding the batch's image
    tokens; ``others``: modules outside the UNet the step uses (the adapter's), whose weights are not
    allocations; ``workspace``: a kernel's scratch bytes per op (:class:`LiveBytes`). Returns the
    step's :class:`Trace`."""
    from studio.methods.neti.encoder import clip_core, clip_hidden_states

    modules: list[nn.Module] = [unet, *encoders, *others]
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    bind = adapter(unet, spec.rows) if adapter is not None else None
    meter = LiveBytes(_existing(modules), workspace)
    runtime = MetaRuntime(spec.attention, spec.autocast, spec.device)
    if spec.checkpointing:  # the loop checkpoints the UNet; DreamBooth also trained text encoders
        runtime.checkpointing(unet)
        for te in encoders:
            if any(p.requires_grad for p in te.parameters()):
                runtime.checkpointing(te)
    handles = _tag_blocks(unet, meter)
    c, h, w = spec.latent
    sdxl = len(encoders) > 1
    try:
        with runtime, meter:
            noisy = torch.empty((spec.rows, c, h, w), device=META, dtype=cast_any(unet).dtype)
            target = torch.empty((spec.rows, c, h, w), device=META)
            t = torch.zeros(spec.rows, dtype=torch.long, device=META)
            text_rows = spec.text_rows or spec.rows
            before = meter.current
            with runtime.autocast():
                meter.tag = "text encoder"
                states, pooled = [], None
                with torch.set_grad_enabled(spec.text != "none"):
                    for te in map(cast_any, encoders):
                        ids = torch.zeros((text_rows, 77), dtype=torch.long, device=META)
                        emb = te.get_input_embeddings()(ids)
                        if spec.text == "input":  # the trained vectors, spliced at one position
                            vector = torch.zeros(emb.shape[-1], device=META, requires_grad=True)
                            emb = torch.where(ids[..., None] == 1, vector.to(emb.dtype), emb)
                        hidden = clip_hidden_states(te, emb)
                        core = clip_core(te)
                        if not sdxl:
                            states.append(core.final_layer_norm(hidden[-1]))
                            continue
                        states.append(hidden[-2])  # SDXL reads the penultimate states
                        if hasattr(te, "text_projection"):  # the pooled, projected end-of-text state
                            pooled = te.text_projection(core.final_layer_norm(hidden[-1])[:, 0])
                    ehs = torch.cat(states, dim=-1) if sdxl else states[0]
                    if text_rows != spec.rows:  # NeTI: one context per layer; the UNet reads views of it
                        ehs = ehs.reshape(text_rows // spec.rows, spec.rows, *ehs.shape[1:])[0]
                        pooled = pooled[:spec.rows] if pooled is not None else None
                text_saved = meter.current - before
                added = None
                if sdxl:
                    if pooled is None:
                        pooled = torch.empty((spec.rows, 1280), device=META)
                    added = {"text_embeds": pooled,
                             "time_ids": torch.zeros((spec.rows, 6), device=META)}
                if bind is not None:
                    bind(spec.rows)
                meter.tag = "unet"
                pred = cast_any(unet)(noisy, t, ehs, added_cond_kwargs=added).sample
            meter.tag = "loss"
            loss = ((pred.float() - target) ** 2).mean()
            saved = meter.current
            blocks = {k: v for k, v in meter.live_by_tag().items() if k not in ("text encoder", "loss")}
            del pred, ehs, states, pooled, added, noisy
            meter.tag = "backward"
            if loss.requires_grad:
                loss.backward()
            del loss
            gc.collect()
    finally:
        for hnd in handles:
            hnd.remove()
    grad_keys = {p.grad.untyped_storage()._cdata for p in trainable if p.grad is not None}
    grads = sum(p.numel() * p.element_size() for p in trainable) if grad_keys else 0
    grads_at_peak = min(grads, meter.at_peak(lambda r: r.tag == "backward" and r.died is None))
    return Trace(peak=meter.peak, grads_at_peak=grads_at_peak, saved=saved, text=text_saved, blocks=blocks)


def trace_forward(run: Callable[[], Any], modules: list[nn.Module], *, attention: str = "sdpa",
                  autocast: torch.dtype | None = None, device: str = "cuda",
                  workspace: Callable[[Any, Any], int] | None = None) -> Trace:
    """The peak of ``run()`` under no_grad (the probe's UNet passes, the VAE's encoding); ``modules``:
    those it runs (their weights are not allocations)."""
    meter = LiveBytes(_existing(modules), workspace)
    runtime = MetaRuntime(attention, autocast, device)
    with runtime, meter, torch.no_grad(), runtime.autocast():
        out = run()
        del out
    return Trace(peak=meter.peak)


def cast_any(x: Any) -> Any:
    """``x`` as ``Any``: diffusers' and transformers' model methods are not typed."""
    return x
