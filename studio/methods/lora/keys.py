"""LoRA tensor names: kohya-ss names (what A1111, ComfyUI and diffusers read), the modules they
address on a pipeline, and the conversions from diffusers/PEFT and SGM names (docs/methods.md §3)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from studio.errors import ConceptFormatError
from studio.methods.lora.flow_keys import (  # SD 3 / FLUX transformers: diffusers' paths under lora_transformer_
    FLOW_PREFIX,
    flow_family_of,
    flow_module_path,
    flow_te_prefixes,
    is_flow_pipe,
)
from studio.methods.runtime import text_encoders

METHOD = "lora"
UNET_PREFIX = "lora_unet_"
TE_PREFIXES = {1: ("lora_te_",), 2: ("lora_te1_", "lora_te2_")}  # by number of text encoders
ALL_PREFIXES = (UNET_PREFIX, "lora_te_", "lora_te1_", "lora_te2_", FLOW_PREFIX)
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
# diffusers' component names, in the order of ALL_PREFIXES[1:] for SDXL
DIFFUSERS_COMPONENTS = {UNET_PREFIX: "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                        "lora_te2_": "text_encoder_2", FLOW_PREFIX: "transformer"}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # the LoraConfig that diffusers writes and reads
KOHYA_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}

# Module-name parts that contain "_" in diffusers' UNet and transformers' CLIP (longest first), so
# that a kohya name, where every "." became "_", can be turned back into a module path.
_COMPOUNDS = tuple(sorted((
    "conv_norm_out", "transformer_blocks", "final_layer_norm", "position_embedding", "token_embedding",
    "text_projection", "conv_shortcut", "time_embedding", "add_embedding", "time_emb_proj", "down_blocks",
    "up_blocks", "mid_block", "text_model", "layer_norm1", "layer_norm2", "self_attn", "proj_in", "proj_out",
    "conv_in", "conv_out", "linear_1", "linear_2", "q_proj", "k_proj", "v_proj", "out_proj", "to_q", "to_k",
    "to_v", "to_out", "time_proj", "add_time_proj", "conv_act", "activation_fn",
), key=len, reverse=True))


# -- kohya names ----------------------------------------------------------------------------------
def module_path(flat: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` →
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` (the kohya name without its prefix)."""
    dotted = flat.replace("_", ".")
    for part in _COMPOUNDS:
        dotted = dotted.replace(part.replace("_", "."), part)
    return dotted


def te_path(name: str) -> str:
    """A text-encoder module name as kohya spells it: under ``text_model.`` (transformers ≥ 5 flattens
    ``CLIPTextModel``, so its modules may lack that prefix)."""
    return name if name.startswith(("text_model.", "text_projection")) else f"text_model.{name}"


def kohya_name(prefix: str, path: str) -> str:
    """``("lora_unet_", "mid_block.attentions.0.proj_in")`` → ``lora_unet_mid_block_attentions_0_proj_in``."""
    return prefix + path.replace(".", "_")


def split_prefix(module: str) -> tuple[str, str]:
    """A kohya module name → (prefix, module path)."""
    for prefix in sorted(ALL_PREFIXES, key=len, reverse=True):
        if module.startswith(prefix):
            if prefix == FLOW_PREFIX:
                return prefix, flow_module_path(module[len(prefix):])
            return prefix, module_path(module[len(prefix):])
    raise ConceptFormatError(f"{module!r} is not a kohya LoRA name (lora_unet_…, lora_te_…, lora_te1_…, lora_te2_…).")


@dataclass
class LoraModule:
    """One adapted layer: ``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1]), ``alpha`` (None = r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def lora_modules(tensors: dict[str, torch.Tensor], *, where: str = "This LoRA") -> dict[str, LoraModule]:
    """Group kohya tensors by module (``lora_unet_…`` → :class:`LoraModule`), validating names and shapes."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if not module.startswith(ALL_PREFIXES) or suffix not in (DOWN, UP, ALPHA):
            hint = (" (LyCORIS LoHa/LoKr and DoRA files are not supported)"
                    if re.search(r"hada_|lokr_|dora_scale", key) else "")
            raise ConceptFormatError(f"{where} holds {key!r}, which is not a kohya LoRA tensor "
                                     f"(lora_unet_/lora_te*_ + .lora_down.weight, .lora_up.weight or .alpha){hint}.")
        parts.setdefault(module, {})[suffix] = value
    out = {}
    for module, p in sorted(parts.items()):
        if DOWN not in p or UP not in p:
            raise ConceptFormatError(f"{where}: module {module!r} lacks its "
                                     f"{'lora_down' if DOWN not in p else 'lora_up'} weight.")
        down, up = p[DOWN], p[UP]
        if (down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]
                or min(down.shape) < 1 or min(up.shape) < 1):
            raise ConceptFormatError(f"{where}: module {module!r} has lora_down {tuple(down.shape)} and lora_up "
                                     f"{tuple(up.shape)}; expected (r, in) and (out, r) (or their conv forms).")
        alpha = p.get(ALPHA)
        if alpha is not None and alpha.numel() != 1:
            raise ConceptFormatError(f"{where}: the alpha of {module!r} must be a scalar, got shape {tuple(alpha.shape)}.")
        out[module] = LoraModule(down, up, None if alpha is None else float(alpha.reshape(()).item()))
    if not out:
        raise ConceptFormatError(f"{where} holds no LoRA modules.")
    return out


def kohya_tensors(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`lora_modules` (alpha written as a float32 scalar; missing alpha = rank)."""
    out = {}
    for name, m in modules.items():
        out[f"{name}.{DOWN}"] = m.down
        out[f"{name}.{UP}"] = m.up
        out[f"{name}.{ALPHA}"] = torch.tensor(float(m.alpha if m.alpha is not None else m.rank))
    return out


def base_modules(pipe: Any) -> dict[str, nn.Module]:
    """Every module of the pipeline's UNet and text encoder(s) under its kohya name (SD 3 / FLUX: the
    transformer's, :func:`studio.methods.lora.flow_keys.flow_base_modules`)."""
    if is_flow_pipe(pipe):
        return flow_base_modules(pipe)
    out: dict[str, nn.Module] = {}
    for name, mod in pipe.unet.named_modules():
        if name:
            out[kohya_name(UNET_PREFIX, name)] = mod
    encoders = text_encoders(pipe)
    for prefix, (_, te) in zip(TE_PREFIXES[len(encoders)], encoders):
        for name, mod in te.named_modules():
            if name:
                out[kohya_name(prefix, te_path(name))] = mod
    return out


def _io(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear / Conv2d, seen through a PEFT wrapper; None for other modules."""
    get_base_layer = getattr(module, "get_base_layer", None)
    if get_base_layer is not None:
        module = get_base_layer()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def family_of(modules: dict[str, LoraModule], md: dict[str, str]) -> str:
    """sd1 / sd2 / sdxl from kohya's ``ss_base_model_version``, else from the tensors ('' if unknown)."""
    version = md.get("ss_base_model_version", "")
    for family, tag in KOHYA_VERSION.items():
        if version.startswith(tag.split("_base")[0]):
            return family
    if any(n.startswith(FLOW_PREFIX) for n in modules):
        return flow_family_of(list(modules))
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in modules):
        return "sdxl"
    widths = {m.down.shape[1] for n, m in modules.items() if n.endswith(("attn2_to_k", "attn2_to_v"))}
    widths |= {m.down.shape[1] for n, m in modules.items() if n.startswith("lora_te_") and n.endswith("q_proj")}
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(next(iter(widths)) if len(widths) == 1 else 0, "")


def diffusers_loadable(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """kohya tensors that diffusers' ``load_lora_weights`` applies exactly: one α for every module.

    diffusers' kohya converter misnames the alphas of modules whose α differs from the most common
    one (they end up as ``alpha_pattern`` keys that match nothing, and the common α is used), so such
    a module gets its scale folded into ``B``: with the common α′, ``B′ = B · α/α′`` keeps
    ``(α′/r) · B′ A = (α/r) · B A``. Files whose modules share one α (every studio-trained LoRA) pass
    through unchanged, bit for bit.
    """
    alphas = {n: m.alpha if m.alpha is not None else float(m.rank) for n, m in modules.items()}
    common = Counter(alphas.values()).most_common(1)[0][0]
    return kohya_tensors({n: LoraModule(m.down, m.up if alphas[n] == common else m.up * (alphas[n] / common), common)
                          for n, m in modules.items()})


def kohya_metadata(modules: dict[str, LoraModule], family: str) -> dict[str, str]:
    """kohya ``ss_*`` keys that A1111 / ComfyUI show (dim, alpha, base version) + the ModelSpec architecture."""
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha if m.alpha is not None else m.rank for m in modules.values()).most_common(1)[0][0]
    md = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
          "ss_network_train_unet_only": str(all(n.startswith((UNET_PREFIX, FLOW_PREFIX)) for n in modules))}
    if family in KOHYA_VERSION:
        md.update({"ss_base_model_version": KOHYA_VERSION[family], "ss_v2": str(family == "sd2"),
                   "modelspec.architecture": f"{_ARCH[family]}/lora"})
    return md


_UPSAMPLER = re.compile(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")


def a1111_dropped(modules: Iterable[str], *, family: str, up_block_types: Sequence[str] = ()) -> list[str]:
    """The kohya module names (sorted) whose LoRA A1111 leaves out on an SDXL base: its loader
    (``extensions-builtin/Lora/networks.py``: ``convert_diffusers_name_to_compvis``, then a lookup in
    the SGM model's modules) finds no layer for

    * ``lora_unet_add_embedding_linear_1`` / ``_2`` (SDXL's size/crop embedding; no conversion rule),
    * ``lora_te2_text_projection`` (a bare parameter, not a layer, in A1111's OpenCLIP encoder),
    * ``lora_unet_up_blocks_N_upsamplers_0_conv`` where the rule's guess of the upsampler's place —
      second in block 0, third in later blocks, right for SD 1/2 — is wrong: up block 0 has
      attentions in SDXL, so its upsampler is third (``up_block_types``: the UNet's, default SDXL's).

    ComfyUI, diffusers and the studio apply them all; only non-default target modules reach them.
    Other families: ``[]`` (A1111's rules fit their layouts)."""
    if family != "sdxl":
        return []
    types = list(up_block_types) or ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    dropped = set()
    for name in modules:
        up = _UPSAMPLER.fullmatch(name)
        if up:
            block = int(up.group(1))
            has_attention = block < len(types) and "CrossAttn" in types[block]
            if has_attention != (block > 0):
                dropped.add(name)
        elif name.startswith("lora_unet_add_embedding_") or name == "lora_te2_text_projection":
            dropped.add(name)
    return sorted(dropped)


# -- foreign names → kohya (import) ---------------------------------------------------------------
_SGM_RESNET = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
               ("skip_connection", "conv_shortcut"))


def sgm_to_diffusers(module: str, layers_per_block: int = 2) -> str:
    """kohya's SGM (original-repo) SDXL UNet names → diffusers names (the SDXL layout: 2 layers per block).

    ``lora_unet_input_blocks_4_1_…`` → ``lora_unet_down_blocks_1_attentions_0_…``;
    ``middle_block_1`` → ``mid_block_attentions_0``; ``output_blocks_3_1`` → ``up_blocks_1_attentions_0``.
    """
    rest = module[len(UNET_PREFIX):]
    n = layers_per_block + 1
    fixed = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
             "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
             "label_emb_0_2": "add_embedding_linear_2"}
    for old, new in fixed.items():
        if rest == old or rest.startswith(old + "_"):
            return UNET_PREFIX + new + rest[len(old):]
    m = re.match(r"(input_blocks|output_blocks|middle_block)_(\d+)_?(\d+)?_(.+)", rest)
    if not m:
        return module
    kind, i, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "middle_block":  # middle_block_0/1/2 = resnet, attention, resnet
        inner = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}[i]
        block = f"mid_block_{inner}"
        tail = (j + "_" + tail) if j is not None else tail
    else:
        j = int(j)
        if kind == "input_blocks":
            b, layer = (i - 1) // n, (i - 1) % n
            block = f"down_blocks_{b}_" + ("downsamplers_0" if layer == layers_per_block else
                                            {0: f"resnets_{layer}", 1: f"attentions_{layer}"}[j])
        else:
            b, layer = i // n, i % n
            block = f"up_blocks_{b}_" + {0: f"resnets_{layer}", 1: f"attentions_{layer}", 2: "upsamplers_0"}[j]
    for old, new in _SGM_RESNET:
        tail = tail.replace(old, new)
    if "samplers" in block:
        tail = tail.replace("op", "conv")
    return f"{UNET_PREFIX}{block}_{tail}"


def _peft_parts(key: str) -> tuple[str, str, str] | None:
    """A diffusers / PEFT LoRA key → (component, module path, "A" | "B" | "alpha"), or None.

    Accepts ``unet.P.lora_A.weight`` (PEFT, optionally ``.lora_A.<adapter>.weight``),
    ``unet.P.lora.down.weight`` (diffusers), ``text_encoder.P.lora_linear_layer.up.weight``,
    the attention-processor format ``…attn1.processor.to_q_lora.down.weight``, PEFT's
    ``base_model.model.`` prefix, ``P.alpha``, and unprefixed UNet keys; SD 3 / FLUX transformer keys
    (``transformer.P…``, or unprefixed paths that only those transformers have) as component ``transformer``.
    """
    component = ""
    for name in ("text_encoder_2.", "text_encoder.", "unet.", "transformer.", "base_model.model."):
        if key.startswith(name):
            component = name[:-1] if name != "base_model.model." else ""
            key = key[len(name):]
            break
    if not component:  # no component prefix: a CLIP module path says text encoder, a flow transformer's its own
        component = "text_encoder" if key.startswith(("text_model.", "encoder.layers.")) else \
            "transformer" if key.startswith(_FLOW_ROOTS) else "unet"
    key = key.replace(".processor.", ".")
    old = re.match(r"(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$", key)
    if old:
        proj = old.group(2)
        if component.startswith("text_encoder"):
            proj = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}[proj]
        elif proj == "to_out":
            proj = "to_out.0"
        return component, f"{old.group(1)}.{proj}", "A" if old.group(3) == "down" else "B"
    m = re.match(r"(.+)\.(?:lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
                 r"(?:\.[A-Za-z0-9_\-]+)?\.weight$", key)
    if m:
        kind = "A" if re.search(r"\.(lora_A|lora\.down|lora_linear_layer\.down)[.]", key) else "B"
        return component, m.group(1), kind
    if key.endswith(".alpha"):
        return component, key[: -len(".alpha")], "alpha"
    return None


# Top-level module names of SD 3 / FLUX transformers that no UNet has (a PEFT file saved from the transformer
# itself has no ``transformer.`` prefix).
_FLOW_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
               "time_text_embed.", "norm_out.linear", "pos_embed.", "proj_out.")


def _pattern_value(patterns: dict[str, Any], path: str) -> Any:
    """PEFT's rank/alpha pattern lookup (``peft.utils.other.get_pattern_key``): a pattern is a regex
    that matches the end of the module path at a dot boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], md: dict[str, str], *, sdxl: bool) -> dict[str, LoraModule]:
    """A diffusers / PEFT LoRA state dict (+ its ``lora_adapter_metadata``) → kohya modules.

    Alpha comes from the metadata's ``lora_alpha`` / ``alpha_pattern`` (what diffusers applies),
    else from ``P.alpha`` keys, else it is the module's rank (diffusers' convention: scale 1).
    """
    from studio.safetensors_io import loads_json

    config = loads_json(md.get(DIFFUSERS_METADATA_KEY) or "{}", where=f"metadata {DIFFUSERS_METADATA_KEY}")
    if not isinstance(config, dict):
        raise ConceptFormatError(f"metadata {DIFFUSERS_METADATA_KEY} must be a JSON object.")
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in tensors.items():
        parts = _peft_parts(key)
        if parts is None:
            raise ConceptFormatError(f"{key!r} is not a diffusers/PEFT LoRA tensor.")
        component, path, kind = parts
        grouped.setdefault((component, path), {})[kind] = value
    prefix = {"unet": UNET_PREFIX, "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_",
              "transformer": FLOW_PREFIX}
    out = {}
    for (component, path), p in grouped.items():
        if "A" not in p or "B" not in p:
            raise ConceptFormatError(f"LoRA module {component}.{path} lacks its lora_A/lora_B (down/up) weight.")
        c = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
        alpha = None
        if c:
            alpha = _pattern_value(c.get("alpha_pattern") or {}, path)
            alpha = float(alpha if alpha is not None else c.get("lora_alpha", 8))  # 8: LoraConfig's default
        elif "alpha" in p:
            alpha = float(p["alpha"].reshape(()).item())
        else:
            alpha = float(p["A"].shape[0])
        kpath = te_path(path) if component.startswith("text_encoder") else path
        out[kohya_name(prefix[component], kpath)] = LoraModule(p["A"], p["B"], alpha)
    return out


def kohya_to_diffusers(modules: dict[str, LoraModule]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """kohya modules → diffusers' ``pytorch_lora_weights`` keys (``unet.P.lora_A.weight`` …) and the
    ``lora_adapter_metadata`` (per component: r, lora_alpha, target_modules, rank/alpha patterns)."""
    tensors: dict[str, torch.Tensor] = {}
    by_component: dict[str, dict[str, LoraModule]] = {}
    for name, m in modules.items():
        prefix, path = split_prefix(name)
        component = DIFFUSERS_COMPONENTS[prefix]
        denoiser = component in ("unet", "transformer")
        if not denoiser:
            # target names without "text_model." match both flattened and nested CLIP modules
            path = path.removeprefix("text_model.")
        key_path = path if denoiser else te_path(path)
        tensors[f"{component}.{key_path}.lora_A.weight"] = m.down
        tensors[f"{component}.{key_path}.lora_B.weight"] = m.up
        by_component.setdefault(component, {})[path] = m
    config: dict[str, Any] = {}
    for component, mods in by_component.items():
        r0 = Counter(m.rank for m in mods.values()).most_common(1)[0][0]
        alphas = {p: float(m.alpha if m.alpha is not None else m.rank) for p, m in mods.items()}
        a0 = Counter(alphas.values()).most_common(1)[0][0]
        config.update({
            f"{component}.r": r0, f"{component}.lora_alpha": a0, f"{component}.target_modules": sorted(mods),
            f"{component}.rank_pattern": {re.escape(p): m.rank for p, m in mods.items() if m.rank != r0},
            f"{component}.alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != a0},
        })
    return tensors, config


# -- SD 3 / FLUX (studio.methods.lora.flow_keys) ------------------------------------------------------
def flow_base_modules(pipe: Any) -> dict[str, nn.Module]:
    """Every module of an SD 3 / FLUX pipeline's transformer and CLIP encoder(s) under its file name."""
    out: dict[str, nn.Module] = {}
    for name, mod in pipe.transformer.named_modules():
        if name:
            out[kohya_name(FLOW_PREFIX, name)] = mod
    encoders = text_encoders(pipe)
    for prefix, (_, te) in zip(flow_te_prefixes(len(encoders)), encoders):
        for name, mod in te.named_modules():
            if name:
                out[kohya_name(prefix, te_path(name))] = mod
    return out


def flow_peft_state(modules: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers' PEFT names for ``modules`` (``lora_transformer_…`` / ``lora_te1_…`` / ``lora_te2_…``
    :class:`~studio.methods.lora.keys.LoraModule`): ``transformer.<path>.lora_A.weight`` (A, (r, in)) and
    ``….lora_B.weight`` (B · α/r, (out, r)); ``text_encoder[_2].text_model.…`` for the CLIPs. With the
    scale folded in, diffusers applies ``B′A`` at its default α = r: exactly ``(α/r)·BA``."""
    folded = {n: LoraModule(m.down, m.up * m.scale, float(m.rank)) for n, m in modules.items()}
    tensors, _ = kohya_to_diffusers(folded)
    return tensors
