"""FLUX.1 LoRA files in Black Forest Labs' module layout: kohya sd-scripts names and BFL names
(docs/methods.md §3, "FLUX files with fused projections").

The studio trains diffusers' FLUX modules (:mod:`studio.methods.lora.flow_keys`): separate ``to_q``,
``to_k``, ``to_v`` … BFL's original model — what kohya sd-scripts trains, ComfyUI runs and diffusers'
kohya converter reads — fuses some of them into one layer:

=====================================  ======================================================
BFL module (block ``i``)               diffusers modules, in the order of its output rows
=====================================  ======================================================
``double_blocks.i.img_attn.qkv``       ``transformer_blocks.i.attn.to_q``, ``to_k``, ``to_v``
``double_blocks.i.txt_attn.qkv``       ``…attn.add_q_proj``, ``add_k_proj``, ``add_v_proj``
``double_blocks.i.img_attn.proj``      ``…attn.to_out.0`` (``txt_attn.proj``: ``to_add_out``)
``double_blocks.i.img_mlp.0`` / ``.2`` ``…ff.net.0.proj`` / ``ff.net.2`` (``txt_mlp``: ``ff_context``)
``double_blocks.i.img_mod.lin``        ``…norm1.linear`` (``txt_mod.lin``: ``norm1_context.linear``)
``single_blocks.i.linear1``            ``single_transformer_blocks.i.attn.to_q``, ``to_k``, ``to_v``, ``proj_mlp``
``single_blocks.i.linear2``            ``…proj_out``; ``modulation.lin``: ``…norm.linear``
``img_in``, ``txt_in``, ``time_in.*``, ``x_embedder``, ``context_embedder``, ``time_text_embed.*``,
``vector_in.*``, ``guidance_in.*``     ``proj_out``; ``norm_out.linear`` (its two halves swapped:
``final_layer.linear``, ``…adaLN_…1``  BFL's modulation is (shift, scale), diffusers' (scale, shift))
=====================================  ======================================================

File names: kohya ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha``, CLIP-L as ``lora_te1_…`` (sd-scripts' FLUX names its T5 ``lora_te2_``, which the studio
never trains); BFL ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` / ``.lora_B.weight``
with the scale folded into ``lora_B`` (no alpha key: readers of ``lora_A``/``lora_B`` names take the
scale as 1), CLIP-L beside it in kohya names.

**Fusing** (export) parts ``i = 1…n`` of one fused layer, each ``A_i`` (r_i, in), ``B_i`` (out_i, r_i),
scale ``s_i = α_i / r_i``; ``r = max r_i``, ``R = n·r``, ``s`` the first trained part's scale:

* ``A = [A_1; …; A_n]`` (R, in) — each block padded to r rows with zeros, an untrained part all zeros;
* ``B`` (Σ out_i, R) block-diagonal: rows of part i, columns ``i·r … i·r + r_i``, hold ``B_i · s_i / s``;
* ``α = s · R`` (computed as ``α_1 · R / r_1``), so the file's ``α / R`` is the trained scale ``s``.

Then ``(α/R) · B A`` stacks the parts' updates ``s_i B_i A_i`` row block by row block — the same
weight change as the separate LoRAs, exactly (the off-diagonal blocks are zero). kohya sd-scripts
writes its ``split_qkv`` LoRAs in this layout (but keeps α, so they apply at a third of the
trained scale in a fused reader); diffusers' kohya converter recognises it as block-sparse and
splits it back.

**Splitting** (import) a fused ``A`` (R, in), ``B`` (Σ out_i, R), α: when R = n·k and every
off-diagonal block of ``B`` is zero, part i is ``A[i·k:(i+1)·k]``, ``B[rows_i, i·k:(i+1)·k]`` with
``α_i = α·k/R`` (a part whose blocks are both zero was not trained and is left out); otherwise every
part gets all of ``A``, its rows of ``B`` and α (rank R): the same update, with more columns.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch

from studio.errors import ConceptFormatError
from studio.methods.lora.flow_keys import FLOW_PREFIX
from studio.methods.lora.keys import ALPHA, DOWN, UP, LoraModule, kohya_name, lora_modules, split_prefix

KOHYA_PREFIX = "lora_unet_"  # sd-scripts' FLUX transformer prefix (its LORA_PREFIX_FLUX)
BFL_PREFIX = "diffusion_model."  # ComfyUI's / BFL's state-dict names of the FLUX transformer
KOHYA_CLIP = "lora_te1_"  # sd-scripts' FLUX CLIP-L prefix (= the studio's)
KOHYA_T5 = "lora_te2_"  # sd-scripts' FLUX T5 prefix: not trained or read by the studio
KOHYA_METADATA = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}

DOUBLE_BLOCK: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE_BLOCK: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
TOP_LEVEL: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})  # (shift, scale) in BFL, (scale, shift) in diffusers
_BLOCKS = {"double_blocks": ("transformer_blocks", DOUBLE_BLOCK),
           "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK)}


# -- names -------------------------------------------------------------------------------------------
def diffusers_parts(bfl: str) -> tuple[str, ...] | None:
    """A BFL module path → the diffusers module paths it fuses, in row order (None: not a LoRA-able
    FLUX.1 layer). ``double_blocks.3.img_attn.qkv`` → ``(transformer_blocks.3.attn.to_q, …to_k, …to_v)``."""
    if bfl in TOP_LEVEL:
        return (TOP_LEVEL[bfl],)
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", bfl)
    if not m or m.group(3) not in _BLOCKS[m.group(1)][1]:
        return None
    block, table = _BLOCKS[m.group(1)]
    return tuple(f"{block}.{m.group(2)}.{part}" for part in table[m.group(3)])


def bfl_target(path: str) -> tuple[str, int] | None:
    """A diffusers FLUX transformer module path → (BFL module path, index of its row block), or None."""
    for bfl, diffusers in TOP_LEVEL.items():
        if path == diffusers:
            return bfl, 0
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if not m:
        return None
    kind = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
    for bfl, parts in _BLOCKS[kind][1].items():
        if m.group(3) in parts:
            return f"{kind}.{m.group(2)}.{bfl}", parts.index(m.group(3))
    return None


def _flat_names() -> dict[str, str]:
    """kohya's flattened name (no prefix) → BFL path, for the top-level layers (blocks: regex in :func:`bfl_of_kohya`)."""
    return {bfl.replace(".", "_"): bfl for bfl in TOP_LEVEL}


def bfl_of_kohya(module: str) -> str | None:
    """``lora_unet_double_blocks_0_img_attn_qkv`` → ``double_blocks.0.img_attn.qkv`` (None: not a FLUX.1 name)."""
    flat = module.removeprefix(KOHYA_PREFIX)
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(.+)", flat)
    if m:
        names = {k.replace(".", "_"): k for k in _BLOCKS[m.group(1)][1]}
        return f"{m.group(1)}.{m.group(2)}.{names[m.group(3)]}" if m.group(3) in names else None
    return _flat_names().get(flat)


def is_kohya_flux(modules: list[str]) -> bool:
    """True when kohya module names address FLUX.1's BFL layout (``lora_unet_double_blocks_…`` …)."""
    return any(re.match(r"lora_unet_(double_blocks|single_blocks)_\d+_", n) or
               (n.startswith(KOHYA_PREFIX) and bfl_of_kohya(n) in TOP_LEVEL) for n in modules)


# -- fusing and splitting ----------------------------------------------------------------------------
def mlp_ratio() -> float:
    """FLUX.1's MLP width over its model width in the single-stream blocks (diffusers'
    ``FluxSingleTransformerBlock`` default, 4.0): the size of ``linear1``'s ``proj_mlp`` rows."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    return float(inspect.signature(FluxSingleTransformerBlock.__init__).parameters["mlp_ratio"].default)


def fuse(parts: list[LoraModule | None], dims: list[int], in_features: int) -> LoraModule:
    """One LoRA of a fused layer from its parts' (module docstring, "Fusing"): ``parts[i]`` the LoRA of
    the layer whose ``dims[i]`` output rows come i-th (None: not trained), ``in_features`` the shared input.
    Returns ``down`` (n·r, in), ``up`` (Σ dims, n·r), ``alpha`` = s·n·r."""
    trained = [p for p in parts if p is not None]
    if not trained:
        raise ValueError("fuse() needs at least one trained part")
    for p, d in zip(parts, dims):
        if p is not None and (p.down.ndim != 2 or p.down.shape[1] != in_features or p.up.shape[0] != d):
            raise ConceptFormatError(f"A LoRA part of shape down {tuple(p.down.shape)}, up {tuple(p.up.shape)} does "
                                     f"not fit a fused layer of {in_features} inputs and row blocks {dims}.")
    r = max(p.rank for p in trained)
    n = len(parts)
    ref = trained[0]
    scale = ref.scale
    dtype = trained[0].down.dtype
    for p in trained[1:]:
        dtype = torch.promote_types(dtype, torch.promote_types(p.down.dtype, p.up.dtype))
    dtype = torch.promote_types(dtype, ref.up.dtype)
    down = torch.zeros(n * r, in_features, dtype=dtype)
    up = torch.zeros(sum(dims), n * r, dtype=dtype)
    row = 0
    for i, (p, d) in enumerate(zip(parts, dims)):
        if p is not None:
            down[i * r: i * r + p.rank] = p.down
            up[row: row + d, i * r: i * r + p.rank] = p.up if p.scale == scale else p.up * (p.scale / scale)
        row += d
    ref_alpha = ref.alpha if ref.alpha is not None else float(ref.rank)
    return LoraModule(down, up, ref_alpha * (n * r) / ref.rank)


def split(fused: LoraModule, dims: list[int]) -> list[LoraModule | None]:
    """The parts of a fused layer's LoRA (module docstring, "Splitting"): one per row block ``dims``
    (None for a block-sparse part whose two blocks are zero)."""
    if sum(dims) != fused.up.shape[0] or fused.down.ndim != 2:
        raise ConceptFormatError(f"A fused FLUX LoRA of up {tuple(fused.up.shape)} cannot be split into row blocks {dims}.")
    n, rank = len(dims), fused.rank
    alpha = fused.alpha if fused.alpha is not None else float(rank)
    starts = [sum(dims[:i]) for i in range(n)]
    k = rank // n
    sparse = rank % n == 0 and all(
        not fused.up[starts[i]: starts[i] + dims[i], j * k:(j + 1) * k].any()
        for i in range(n) for j in range(n) if i != j)
    out: list[LoraModule | None] = []
    for i in range(n):
        rows = slice(starts[i], starts[i] + dims[i])
        if sparse:
            a, b = fused.down[i * k:(i + 1) * k], fused.up[rows, i * k:(i + 1) * k]
            out.append(None if not a.any() and not b.any() else LoraModule(a.clone(), b.clone(), alpha * k / rank))
        else:
            out.append(LoraModule(fused.down.clone(), fused.up[rows].clone(), alpha))
    return out


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    """(2h, r) → its two row halves exchanged (BFL's (shift, scale) ↔ diffusers' (scale, shift))."""
    h = up.shape[0] // 2
    return torch.cat([up[h:], up[:h]])


def to_bfl(modules: dict[str, LoraModule]) -> tuple[dict[str, LoraModule], dict[str, LoraModule]]:
    """Studio FLUX LoRA modules → (BFL module path → fused :class:`LoraModule`, the CLIP-L modules as
    they are). A transformer layer BFL's layout has no name for is refused in one sentence."""
    groups: dict[str, dict[int, LoraModule]] = {}
    encoders: dict[str, LoraModule] = {}
    for name, m in modules.items():
        prefix, path = split_prefix(name)
        if prefix != FLOW_PREFIX:
            encoders[name] = m
            continue
        target = bfl_target(path)
        if target is None:
            raise ConceptFormatError(f"The LoRA of FLUX layer {path} has no name in kohya's / BFL's FLUX layout; "
                                     "export it with --format diffusers.")
        groups.setdefault(target[0], {})[target[1]] = m
    out: dict[str, LoraModule] = {}
    for bfl, got in sorted(groups.items()):
        parts = diffusers_parts(bfl)
        assert parts is not None  # bfl_target only names mapped layers
        if len(parts) == 1:
            m = got[0]
            out[bfl] = LoraModule(m.down, _swap_halves(m.up) if bfl in SWAPPED else m.up, m.alpha)
            continue
        in_features = next(iter(got.values())).down.shape[1]
        qkv = [got[i].up.shape[0] for i in range(3) if i in got]
        width = qkv[0] if qkv else in_features  # q, k and v map the model width to itself in FLUX
        dims = [width] * 3
        if len(parts) == 4:  # linear1: q, k, v, then the MLP's input projection
            dims.append(got[3].up.shape[0] if 3 in got else int(in_features * mlp_ratio()))
        out[bfl] = fuse([got.get(i) for i in range(len(parts))], dims, in_features)
    return out, encoders


def from_bfl(fused: dict[str, LoraModule], *, where: str) -> dict[str, LoraModule]:
    """BFL module path → LoRA (as in a kohya / BFL FLUX file) → studio ``lora_transformer_…`` modules,
    fused layers split (module docstring)."""
    out: dict[str, LoraModule] = {}
    for bfl, m in fused.items():
        parts = diffusers_parts(bfl)
        if parts is None:
            raise ConceptFormatError(f"{where} adapts FLUX layer {bfl!r}, which the studio does not map to "
                                     "diffusers' FLUX modules.")
        if len(parts) == 1:
            out[kohya_name(FLOW_PREFIX, parts[0])] = \
                LoraModule(m.down, _swap_halves(m.up) if bfl in SWAPPED else m.up, m.alpha)
            continue
        rows, width = int(m.up.shape[0]), int(m.down.shape[1])
        dims = [rows // 3] * 3 if len(parts) == 3 else [width] * 3 + [rows - 3 * width]
        if sum(dims) != rows or min(dims) < 1:
            raise ConceptFormatError(f"{where}: the LoRA of {bfl} has {rows} output rows, which do not split into "
                                     f"FLUX's {'q, k, v' if len(parts) == 3 else 'q, k, v and MLP'} blocks.")
        for path, piece in zip(parts, split(m, dims)):
            if piece is not None:
                out[kohya_name(FLOW_PREFIX, path)] = piece
    return out


# -- files -------------------------------------------------------------------------------------------
def kohya_tensors(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """Studio FLUX modules → the tensors of a kohya sd-scripts FLUX LoRA file."""
    fused, encoders = to_bfl(modules)
    out: dict[str, torch.Tensor] = {}
    for name, m in [(KOHYA_PREFIX + bfl.replace(".", "_"), m) for bfl, m in fused.items()] + list(encoders.items()):
        out[f"{name}.{DOWN}"] = m.down
        out[f"{name}.{UP}"] = m.up
        out[f"{name}.{ALPHA}"] = torch.tensor(float(m.alpha if m.alpha is not None else m.rank))
    return out


def bfl_tensors(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """Studio FLUX modules → BFL-named tensors (``diffusion_model.<path>.lora_A/B.weight``, scale folded
    into ``lora_B``) + CLIP-L in kohya names."""
    fused, encoders = to_bfl(modules)
    out: dict[str, torch.Tensor] = {}
    for bfl, m in fused.items():
        out[f"{BFL_PREFIX}{bfl}.lora_A.weight"] = m.down
        out[f"{BFL_PREFIX}{bfl}.lora_B.weight"] = m.up if m.scale == 1.0 else m.up * m.scale
    for name, m in encoders.items():
        out[f"{name}.{DOWN}"] = m.down
        out[f"{name}.{UP}"] = m.up
        out[f"{name}.{ALPHA}"] = torch.tensor(float(m.alpha if m.alpha is not None else m.rank))
    return out


def modules_from_kohya(tensors: dict[str, Any], *, where: str) -> dict[str, LoraModule]:
    """A kohya sd-scripts FLUX LoRA's tensors → studio modules (CLIP-L kept; ``lora_te_`` read as CLIP-L)."""
    if any(k.startswith(KOHYA_T5) for k in tensors):
        raise ConceptFormatError(f"{where} also adapts FLUX's T5 encoder (lora_te2_… in sd-scripts' FLUX names), "
                                 "which the studio does not train or apply; remove those tensors to use the rest.")
    renamed = {(KOHYA_CLIP + k[len("lora_te_"):] if k.startswith("lora_te_") else k): v for k, v in tensors.items()}
    flat = lora_modules(renamed, where=where)
    fused: dict[str, LoraModule] = {}
    out: dict[str, LoraModule] = {}
    for name, m in flat.items():
        if not name.startswith(KOHYA_PREFIX):
            out[name] = m
            continue
        bfl = bfl_of_kohya(name)
        if bfl is None:
            raise ConceptFormatError(f"{where} holds {name!r}, which is not a FLUX.1 layer in kohya's names.")
        fused[bfl] = m
    return out | from_bfl(fused, where=where)


_BFL_KEY = re.compile(r"(?:diffusion_model\.)?(.+)\.(lora_A|lora_B|lora_down|lora_up)\.weight|"
                      r"(?:diffusion_model\.)?(.+)\.alpha")


def modules_from_bfl(tensors: dict[str, Any], *, where: str) -> dict[str, LoraModule] | None:
    """BFL-named FLUX LoRA tensors (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` …, optional
    ``.alpha``; kohya ``lora_te1_…`` beside) → studio modules; None when the names are not that format."""
    grouped: dict[str, dict[str, Any]] = {}
    clip: dict[str, Any] = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            return None
        if key.startswith(KOHYA_CLIP):
            clip[key] = value
            continue
        m = _BFL_KEY.fullmatch(key)
        if m is None:
            return None
        path = m.group(1) or m.group(3)
        if diffusers_parts(path) is None:
            return None
        kind = "alpha" if m.group(3) else ("A" if m.group(2) in ("lora_A", "lora_down") else "B")
        grouped.setdefault(path, {})[kind] = value
    if not grouped:
        return None
    fused = {}
    for path, p in grouped.items():
        if "A" not in p or "B" not in p:
            raise ConceptFormatError(f"{where}: FLUX layer {path} lacks its lora_A/lora_B weight.")
        alpha = None if "alpha" not in p else float(p["alpha"].reshape(()).item())
        a, b = p["A"], p["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or min(a.shape) < 1 or min(b.shape) < 1:
            raise ConceptFormatError(f"{where}: FLUX layer {path} has lora_A {tuple(a.shape)} and lora_B "
                                     f"{tuple(b.shape)}; expected (r, in) and (out, r).")
        fused[path] = LoraModule(a, b, alpha)
    return (lora_modules(clip, where=where) if clip else {}) | from_bfl(fused, where=where)
