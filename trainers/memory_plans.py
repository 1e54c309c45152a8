"""What each training method adds to a base for a memory estimate (:mod:`trainers.memory`): its
trainable tensors, what flows through the text encoders, the rows of a step, extra frozen weights
and host copies — set up on meta copies of the base's modules exactly as the trainer sets up the
real ones (the same PEFT LoRA, the same NeTI mapper and IP-Adapter modules), so that counts are the
trainer's own, not formulas."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.errors import StudioError
from trainers.memory_trace import META

# CLIP image encoders of the published IP-Adapters (transformers CLIPVisionConfig values of
# h94/IP-Adapter's image_encoder folders: OpenCLIP ViT-H/14 and ViT-bigG/14), for presets whose
# encoder is not on this machine.
VIT_H: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
             image_size=224, projection_dim=1024, hidden_act="gelu")
VIT_BIGG: dict[str, Any] = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                patch_size=14, image_size=224, projection_dim=1280, hidden_act="gelu")


@dataclass
class Plan:
    """A method's footprint on a base (see the module docstring). ``trainable``: the trained tensors
    (modules on the meta copies, or stand-alone); ``text``/``text_rows``: as :class:`~trainers.memory_trace.StepSpec`;
    ``extra_weights``: frozen device weights beyond the base (an adapter's image encoder);
    ``extra_state``: tensors the trainer keeps on the device besides the trained ones; ``host``: host-RAM
    copies; ``base_trained``: the base's own parameters that train (they leave the frozen weights)."""

    rows: int
    text: str = "none"
    text_rows: int = 0
    trainable: list[torch.Tensor] = field(default_factory=list)
    image_tokens: int = 0
    adapter: Callable[[nn.Module, int], Callable[[int], None]] | None = None
    adapter_modules: list[nn.Module] = field(default_factory=list)
    extra_weights: int = 0
    extra_state: int = 0
    host: int = 0
    base_trained: int = 0
    probe: bool = True
    class_images: int = 0  # class images generated before training (DreamBooth), per pipeline call
    token_table: bool = True  # the trainer opens the pipeline's token table (copies of the tokenizers, host RAM)
    notes: list[str] = field(default_factory=list)


def widths(encoders: list[Any]) -> list[int]:
    return [int(te.config.hidden_size) for te in encoders]


def plan_for(cli_name: str, cfg: Any, unet: nn.Module, encoders: list[nn.Module]) -> Plan:
    """The :class:`Plan` of trainer ``cli_name`` with config ``cfg`` on meta copies ``unet``/``encoders``
    (which it modifies: adapters added, trained parameters' ``requires_grad`` set)."""
    planners: dict[str, Callable[[Any, nn.Module, list[nn.Module]], Plan]] = {
        "textual-inversion": _textual_inversion, "dreambooth": _dreambooth, "perfusion": _perfusion,
        "neti": _neti, "adapter": _adapter}
    if cli_name not in planners:
        raise StudioError(f"No memory model for the trainer {cli_name!r}; known: {', '.join(planners)}.")
    return planners[cli_name](cfg, unet, encoders)


def _vectors(sizes: list[int]) -> list[torch.Tensor]:
    return [torch.empty(n, device=META) for n in sizes]


def _textual_inversion(cfg: Any, unet: nn.Module, encoders: list[nn.Module]) -> Plan:
    """An (n, D) vector per text encoder; gradients flow through the encoders and the whole UNet."""
    return Plan(rows=cfg.batch_size, text="input", trainable=_vectors([cfg.num_vectors * w for w in widths(encoders)]))


def _dreambooth(cfg: Any, unet: nn.Module, encoders: list[nn.Module]) -> Plan:
    """LoRA (PEFT adapters on the targets, float32) or a full fine-tune; prior preservation doubles the rows."""
    rows = cfg.batch_size * (2 if cfg.prior_preservation else 1)
    text = "trainable" if cfg.train_text_encoder else "none"
    plan = Plan(rows=rows, text=text)
    if cfg.prior_preservation and not cfg.class_images:
        plan.class_images = cfg.class_batch_size
    if cfg.full:
        models = [unet, *(encoders if cfg.train_text_encoder else [])]
        for m in models:
            m.float().requires_grad_(True)
        plan.trainable = [p for m in models for p in m.parameters()]
        plan.base_trained = sum(p.numel() for p in plan.trainable)
        plan.host = 4 * plan.base_trained  # the float32 backup that restores the base afterwards (CPU)
        return plan
    from peft import LoraConfig

    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    models_targets: list[tuple[Any, list[str]]] = [(unet, cfg.target_modules)]
    if cfg.train_text_encoder:
        models_targets += [(te, cfg.text_encoder_targets) for te in encoders]
    for model, targets in models_targets:
        config = LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",  # type: ignore[arg-type]
                            target_modules=targets)
        model.add_adapter(config, adapter_name="estimate")
        for name, p in model.named_parameters():
            if ".estimate." in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                plan.trainable.append(p)
    return plan


def _perfusion(cfg: Any, unet: nn.Module, encoders: list[nn.Module]) -> Plan:
    """The trigger's input embedding per encoder and ``o*_V`` per cross-attention layer; ``i*`` and C⁻¹ kept."""
    from studio.methods.attention import unet_layers

    layers = unet_layers(unet)
    ws = widths(encoders)
    context = layers[0].context_dim if layers else sum(ws)
    return Plan(rows=cfg.batch_size, text="input", trainable=_vectors(ws + [layer.inner_dim for layer in layers]),
                extra_state=8 * context * context + 4 * 2 * context)  # C⁻¹ (float64), i* and i*_super


def _neti(cfg: Any, unet: nn.Module, encoders: list[nn.Module]) -> Plan:
    """The mapper M(t, ℓ); every row is encoded once per cross-attention layer, with gradients."""
    from studio.methods.attention import unet_layers
    from studio.methods.neti.mapper import MapperConfig, NetiMapper

    layers = unet_layers(unet)
    ws = widths(encoders)
    mcfg = MapperConfig(widths=tuple(ws), layers=tuple(layer.name for layer in layers), class_norms=(1.0,) * len(ws),
                        hidden=cfg.hidden_dim, time_anchors=cfg.time_anchors, sigma_t=cfg.sigma_t,
                        sigma_l=cfg.sigma_l, nested_dropout=cfg.nested_dropout, bypass=cfg.bypass,
                        bypass_scale=cfg.bypass_scale)
    with torch.device(META):
        mapper = NetiMapper(mcfg)
    return Plan(rows=cfg.batch_size, text="input", text_rows=len(layers) * cfg.batch_size,
                trainable=list(mapper.parameters()), extra_state=sum(b.numel() * 4 for b in mapper.buffers()))


def _adapter(cfg: Any, unet: nn.Module, encoders: list[nn.Module]) -> Plan:
    """IP-Adapter fine-tuning: projection + to_k_ip/to_v_ip train; the CLIP image encoder stays loaded (float32)."""
    from studio.methods.attention import add_hook
    from studio.methods.zeroshot.adapter import new_adapter
    from studio.methods.zeroshot.hook import IPAdapterHook

    encoder, note = _image_encoder(cfg)
    embed_dim = int(encoder.config.projection_dim)
    plus = "plus" in str(cfg.adapter) or "full-face" in str(cfg.adapter)
    tokens = cfg.num_tokens if cfg.adapter == "new" else (16 if plus else 4)
    with torch.device(META):
        adapter = new_adapter(unet, embed_dim, num_tokens=tokens)
    trained: list[torch.Tensor] = []
    if cfg.train_projection:
        trained += list(adapter.projection.parameters())
    if cfg.train_kv:
        trained += [*adapter.to_k_ip.parameters(), *adapter.to_v_ip.parameters()]
    for p in trained:
        p.requires_grad_(True)

    def install(model: nn.Module, rows: int) -> Callable[[int], None]:
        hook = IPAdapterHook(adapter, None, None)
        add_hook(model, "memory-estimate", hook)
        hook.attach(model)
        projected: list[torch.Tensor] = []

        def bind(n: int) -> None:
            hook.batch_embeds = torch.empty((n, 1, embed_dim), device=META)
            # the hook projects the image once per UNet call; projecting here, before the UNet, keeps that
            # single projection out of checkpointed blocks (whose recomputation would find it cached)
            projected[:] = [hook.tokens(n, slice(0, n))]
            setattr(hook, "tokens", lambda batch, rows: projected[0])  # noqa: B010

        return bind

    notes = [note] if note else []
    if cfg.gradient_checkpointing:
        notes.append("the adapter trainer stops with a CheckpointError under --gradient-checkpointing today (the "
                     "IP-Adapter hook reuses its projected tokens within a UNet call, so the recomputation differs); "
                     "the estimate is what it would need")
    if plus:
        notes.append("a plus/full-face adapter's projection (a Resampler) is counted as a base projection with "
                     "16 tokens")
    weights = sum(p.numel() for p in encoder.parameters()) * 4
    return Plan(rows=cfg.batch_size, trainable=trained, image_tokens=tokens, adapter=install,
                adapter_modules=[adapter.projection, adapter.to_k_ip, adapter.to_v_ip], extra_weights=weights,
                probe=False, token_table=False, notes=notes)


def _image_encoder(cfg: Any) -> tuple[Any, str]:
    """The adapter's CLIP image encoder on the meta device, from its local config when there is one,
    else the published architecture of the preset's encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    source = cfg.image_encoder
    if source is None and cfg.adapter not in ("", "new"):
        local = Path(cfg.adapter).expanduser()
        folder = local if local.is_dir() else local.parent
        for candidate in (folder / "image_encoder", folder.parent / "image_encoder"):
            if (candidate / "config.json").is_file():
                source = str(candidate)
                break
    note = ""
    if source and (Path(source).expanduser() / "config.json").is_file():
        config = CLIPVisionConfig.from_pretrained(str(Path(source).expanduser()), local_files_only=True)
    else:
        big = str(cfg.adapter) == "sdxl" or "bigG" in str(source or "") or "sdxl_models/image_encoder" in str(source)
        values: dict[str, Any] = VIT_BIGG if big else VIT_H
        config = CLIPVisionConfig(**values)
        note = f"image encoder: the published {'ViT-bigG/14' if big else 'ViT-H/14'} (its config is not on this machine)"
    with torch.device(META):
        return CLIPVisionModelWithProjection(config), note
