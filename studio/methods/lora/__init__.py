"""LoRA concepts (DreamBooth-LoRA): low-rank updates of the UNet and, optionally, text-encoder layers.

Tensors use the **kohya-ss names**, which A1111, ComfyUI and diffusers' ``load_lora_weights`` read,
so a studio LoRA file is also a plain kohya LoRA file. For a module at path ``P`` (dots → ``_``):

==========================================  ==================================================
``lora_unet_P.lora_down.weight``            ``A``: (r, in) — conv layers: (r, in, kh, kw)
``lora_unet_P.lora_up.weight``              ``B``: (out, r) — conv layers: (out, r, 1, 1)
``lora_unet_P.alpha``                       ``α``: () scalar
``lora_te_…`` (SD 1/2)                      the text encoder, ``P`` = ``text_model.encoder.layers.…``
``lora_te1_…`` / ``lora_te2_…`` (SDXL)      CLIP-L / OpenCLIP-bigG
==========================================  ==================================================

The update of a layer ``W`` is ``W′x = Wx + s · (α / r) · B A x`` (Hu et al. 2021, eq. 3, with
kohya's α). UNet names are diffusers' module paths for every family (diffusers, ComfyUI and A1111
read them); SDXL files in kohya's SGM naming (``input_blocks_4_1_…``) are renamed on import.

**Strength** ``s`` is the LoRA scale (diffusers' ``set_adapters`` weight): 0 = the adapter is
off and the trigger reads as the class word, 1 = as trained. The trigger is ordinary text — the
identifier and the class word (``sks dog``), see :func:`~studio.methods.base.plain_prompt_text`.

Applied concepts are named PEFT adapters on the pipeline; when the last one is removed every PEFT
layer is unloaded, so the pipeline's modules and weights are the base's again, bit for bit. With
``apply(…, fuse=True)`` (generation's default, ``--no-fuse-lora`` to turn it off) the adapter's
update is folded into the weights instead and restored from a copy on removal
(:mod:`studio.methods.lora.fuse`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from studio.concept import Concept
from studio.errors import ConceptFormatError, IncompatibleConceptError, StudioError
from studio.methods.base import plain_prompt_text
from studio.methods.lora.files import EXPORTERS, IMPORTERS
from studio.methods.lora.flow_keys import FLOW_PREFIX, flow_te_prefixes, is_flow_pipe
from studio.methods.lora.fuse import FusedWeights, fused_models, peft_factors
from studio.methods.lora.keys import (
    TE_PREFIXES,
    UNET_PREFIX,
    _io,
    base_modules,
    diffusers_loadable,
    flow_peft_state,
    lora_modules,
    split_prefix,
)
from studio.methods.runtime import text_encoders
from studio.safetensors_io import FLOATS, GIB, Limits, check_values

if TYPE_CHECKING:
    from studio.models import BaseModel


# -- the method -----------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers and transformers report, per load, keys that are absent on purpose (a UNet-only
    LoRA has no text-encoder keys; the adapter's base weights are not in its state dict). Silence
    that for one load and restore the previous verbosity."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = (dlog.get_verbosity(), tlog.get_verbosity(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])
        if saved[2]:
            tlog.enable_progress_bar()


@dataclass
class LoraState:
    """The pipeline's applied LoRA adapters and their weights (hangs on the pipeline, no globals):
    ``weights`` the unfused PEFT adapters, ``fused`` those folded into the base weights."""

    pipe: Any
    weights: dict[str, float] = field(default_factory=dict)
    fused: FusedWeights = field(default_factory=FusedWeights)

    def add(self, adapter: str, tensors: dict[str, torch.Tensor], weight: float, *, fuse: bool = False) -> bool:
        """Load kohya ``tensors`` as adapter ``adapter`` through diffusers and activate it at ``weight``;
        with ``fuse``, then fold it into the weights and take its PEFT layers out again (a LoRA that
        cannot be fused exactly stays a PEFT adapter). Returns whether it was fused."""
        if adapter in self.weights or adapter in self.fused.adapters:
            raise StudioError(f"The LoRA adapter {adapter} is already applied; remove it first.")
        # Transactional: whatever fails (loading, activating) takes this adapter out again — and
        # every PEFT layer when no other adapter is on — and re-activates the others as they were.
        try:
            modules = lora_modules(tensors)
            # SD 3 / FLUX: diffusers' PEFT names with α/r folded in (flow_keys); else kohya names as they are
            state = flow_peft_state(modules) if is_flow_pipe(self.pipe) else diffusers_loadable(modules)
            with quiet_loading():
                self.pipe.load_lora_weights(state, adapter_name=adapter)
            self.weights[adapter] = float(weight)
            self._activate()
            factors = peft_factors(fused_models(self.pipe), adapter) if fuse else None
            if factors is not None:  # the same update, read from the layers diffusers built, now in W
                del self.weights[adapter]
                self.fused.add(adapter, factors)  # first, so that the state stays on the pipeline
                self._forget(adapter)
                self._activate()
                return True
            return False
        except BaseException as err:
            self.weights.pop(adapter, None)
            self.fused.drop(adapter)
            self._forget(adapter)
            self._activate()
            if isinstance(err, StudioError) or not isinstance(err, Exception):
                raise
            detail = (str(err).splitlines() or [""])[0]
            raise ConceptFormatError(f"diffusers could not load this LoRA ({type(err).__name__}: {detail}).") from None

    def drop(self, adapter: str) -> None:
        if adapter in self.fused.adapters:
            self.fused.drop(adapter)  # the touched weights are restored from their copies
            self._forget(adapter)
            return
        if adapter not in self.weights:
            return
        del self.weights[adapter]
        self._forget(adapter)
        self._activate()

    def _forget(self, adapter: str) -> None:
        present = {a for names in self.pipe.get_list_adapters().values() for a in names}
        if adapter in present:
            self.pipe.delete_adapters(adapter)
        if not self.weights:  # no PEFT adapter left: take every PEFT layer out (modules are the base's again)
            self.pipe.unload_lora_weights()
        if not self.weights and not self.fused and getattr(self.pipe, "_studio_lora", None) is self:
            del self.pipe._studio_lora

    def _activate(self) -> None:
        if self.weights:
            self.pipe.set_adapters(list(self.weights), list(self.weights.values()))


def lora_state(pipe: Any) -> LoraState:
    """The pipeline's :class:`LoraState`, created on first use."""
    state = getattr(pipe, "_studio_lora", None)
    if state is None:
        state = LoraState(pipe)
        pipe._studio_lora = state
    return state


def adapter_name(concept: Concept) -> str:
    """A PEFT adapter name for the concept: module-name safe (no dots) and unique per trigger."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", concept.trigger.strip("<>"))[:40]
    return f"studio_{stem}_{hashlib.sha1(concept.trigger.encode()).hexdigest()[:8]}"


@dataclass
class AppliedLoRA:
    concept: Concept
    pipe: Any
    strength: float
    adapter: str

    def prompt_text(self) -> str:
        return plain_prompt_text(self.concept, self.strength)

    def remove(self) -> None:
        lora_state(self.pipe).drop(self.adapter)


class LoRA:
    name: ClassVar[str] = "lora"
    trigger_is_subject: ClassVar[bool] = False  # the trigger goes with the class noun
    importers: ClassVar[tuple] = IMPORTERS
    exporters: ClassVar[dict] = EXPORTERS
    description: ClassVar[str] = "DreamBooth-LoRA: low-rank layer updates in kohya keys (A1111/ComfyUI/diffusers)"
    # Files: float16/bfloat16/float32; up to 4 GiB of tensors (a rank-128 SDXL LoRA with text
    # encoders is ~1.5 GB in fp32) — refused from the header before anything is allocated.
    file_limits: ClassVar[Limits] = Limits(dtypes=FLOATS, max_bytes=4 * GIB)
    # lora_up/lora_down entries are O(0.01–1) and alpha is at most a rank (≤ 1024 in practice);
    # 1e4 refuses values that overflow the fp16 UNet (black images) without touching real files.
    max_abs: ClassVar[float] = 1e4

    def validate(self, concept: Concept) -> None:
        label = f"LoRA concept {concept.name or concept.trigger}"
        lora_modules(concept.tensors, where=label)  # names; up/down 2-d or 4-d, non-empty; alpha a scalar
        check_values(concept.tensors, label, dtypes=FLOATS, max_abs=self.max_abs)
        if len(concept.tokens) != 1 or not concept.tokens[0]:
            raise ConceptFormatError("A LoRA concept has exactly one trigger (its identifier, e.g. <sks>).")

    def check_base(self, concept: Concept, base: BaseModel) -> None:
        modules = lora_modules(concept.tensors)
        n_te = len(text_encoders(base.pipe))
        allowed = (FLOW_PREFIX, *flow_te_prefixes(n_te)) if getattr(base, "is_flow", False) else \
            (UNET_PREFIX, *TE_PREFIXES[n_te])
        if getattr(base, "is_flow", False) != any(n.startswith(FLOW_PREFIX) for n in modules) and any(
                n.startswith((UNET_PREFIX, FLOW_PREFIX)) for n in modules):
            made = "an SD 3 / FLUX transformer" if any(n.startswith(FLOW_PREFIX) for n in modules) else "a UNet"
            raise IncompatibleConceptError(
                f"Concept {concept.name} adapts {made}, which base {base.name} ({base.family}) does not have; load "
                "a base of the family it was trained on.")
        wrong = sorted({split_prefix(n)[0] for n in modules} - set(allowed))
        if wrong:
            raise IncompatibleConceptError(
                f"Concept {concept.name} has text-encoder keys {', '.join(wrong)}… but base {base.name} "
                f"({base.family}) uses {', '.join(allowed[1:])}; SDXL LoRAs need an SDXL base and SD 1/2 LoRAs an SD 1/2 base.")
        have = base_modules(base.pipe)
        missing = [n for n in modules if n not in have or _io(have[n]) is None]
        if missing:
            raise IncompatibleConceptError(
                f"Concept {concept.name} adapts {len(missing)} layer(s) that base {base.name} does not have "
                f"(e.g. {missing[0]}); it was made for another architecture.")
        for n, m in modules.items():
            fan_in, fan_out = _io(have[n])  # type: ignore[misc]
            if m.down.shape[1] != fan_in or m.up.shape[0] != fan_out:
                raise IncompatibleConceptError(
                    f"Concept {concept.name}: layer {n} is {fan_in}→{fan_out} in base {base.name} but the LoRA is "
                    f"{m.down.shape[1]}→{m.up.shape[0]}; it was made for another model family.")

    def apply(self, base: BaseModel, concept: Concept, *, strength: float, fuse: bool = False) -> AppliedLoRA:
        """Apply at ``strength``; ``fuse``: fold the update into the weights for as long as it is applied
        (faster sampling; the strength is then fixed until :meth:`AppliedLoRA.remove`)."""
        self.check_base(concept, base)
        adapter = adapter_name(concept)
        lora_state(base.pipe).add(adapter, concept.tensors, strength, fuse=fuse)
        return AppliedLoRA(concept=concept, pipe=base.pipe, strength=strength, adapter=adapter)
