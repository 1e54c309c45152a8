"""FLUX.1 LoRA files in BFL's layout (kohya sd-scripts and BFL names: q/k/v fused) and diffusers-format SD 3 /
FLUX LoRAs: the fusing math, what diffusers' ``load_lora_weights`` makes of the studio's files (the same
latents as the studio's own apply), and export → import round trips (studio.methods.lora.flux_formats)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.concept import Concept
from studio.errors import ConceptFormatError, StudioError
from studio.methods import get_method
from studio.methods.interop import export_concept, import_concept
from studio.methods.lora import lora_state, quiet_loading
from studio.methods.lora.flux_formats import (
    bfl_of_kohya,
    bfl_target,
    diffusers_parts,
    from_bfl,
    fuse,
    mlp_ratio,
    split,
    to_bfl,
)
from studio.methods.lora.keys import LoraModule, _io, base_modules, kohya_tensors, lora_modules

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks dog"


# -- helpers ---------------------------------------------------------------------------------------
def _random_lora(pipe, select, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, std: float = 0.2):
    """A LoRA with random (non-zero) A and B on every Linear of ``pipe`` whose studio name ``select`` accepts."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in sorted(base_modules(pipe).items()):
        io = _io(module)
        if io is None or not select(name):
            continue
        out[name] = LoraModule(torch.randn(rank, io[0], generator=g) * std, torch.randn(io[1], rank, generator=g) * std,
                               alpha)
    return out


def _concept(modules, family: str = "flux") -> Concept:
    return Concept(method="lora", tokens=["<sks>"], tensors=kohya_tensors(modules), class_word="dog", name="sks",
                   base={"family": family})


def _latents(pipe) -> torch.Tensor:
    steps = 2 if pipe.transformer.config.attention_head_dim < 128 else 1  # the 3072-wide block: one step
    return pipe(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


def _studio_latents(pipe, concept: Concept, base=None) -> torch.Tensor:
    """The studio's own apply: the LoRA method on a base (its checks included), else its pipeline state."""
    if base is not None:
        applied = get_method("lora").apply(base, concept, strength=1.0)
        try:
            return _latents(pipe)
        finally:
            applied.remove()
    state = lora_state(pipe)
    state.add("studio_test", concept.tensors, 1.0)
    try:
        return _latents(pipe)
    finally:
        state.drop("studio_test")


def _diffusers_latents(pipe, file: Path) -> torch.Tensor:
    """Plain diffusers: ``load_lora_weights`` on the file, render, unload."""
    with quiet_loading():
        pipe.load_lora_weights(str(file), adapter_name="plain")
    try:
        return _latents(pipe)
    finally:
        pipe.unload_lora_weights()


def _delta(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.up.double() @ m.down.double())


@pytest.fixture(scope="module")
def flux(tiny_bases):
    return tiny_bases("tiny-flux")


@pytest.fixture(scope="module")
def wide_flux(flux):
    """tiny-flux with its transformer replaced by one single-stream block at FLUX.1's real width (24 heads × 128
    = 3072, MLP 12288): diffusers' kohya converter splits ``linear1`` at those fixed sizes. 191 M parameters."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=0, num_single_layers=1,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    pipe = FluxPipeline(**(flux.pipe.components | {"transformer": transformer}))
    pipe.default_sample_size = 16
    return pipe


# -- the math --------------------------------------------------------------------------------------
def test_fused_update_is_the_stack_of_the_parts_and_splits_back():
    g = torch.Generator().manual_seed(1)

    def part(r, out, alpha):
        return LoraModule(torch.randn(r, 12, generator=g), torch.randn(out, r, generator=g), alpha)

    # unequal ranks and alphas, one part untrained: ΔW of the fused layer = the parts' ΔW stacked by rows
    parts = [part(4, 12, 2.0), part(2, 12, 8.0), None, part(3, 48, 3.0)]
    dims = [12, 12, 12, 48]
    fused = fuse(parts, dims, 12)
    assert fused.down.shape == (16, 12) and fused.up.shape == (84, 16)
    assert fused.scale == pytest.approx(parts[0].scale)  # α rescaled: α/R is the first part's α/r
    want = torch.cat([_delta(p) if p is not None else torch.zeros(d, 12, dtype=torch.float64)
                      for p, d in zip(parts, dims)])
    torch.testing.assert_close(_delta(fused), want, rtol=1e-6, atol=1e-6)
    pieces = split(fused, dims)
    assert pieces[2] is None  # the untrained part's zero blocks are left out
    for p, q in zip(parts, pieces):
        if p is not None:
            assert q is not None
            torch.testing.assert_close(_delta(q), _delta(p), rtol=1e-6, atol=1e-6)
    # equal ranks and one α (what the studio trains): split(fuse(·)) gives the very tensors back
    same = [part(4, 12, 2.0), part(4, 12, 2.0), part(4, 12, 2.0)]
    back = split(fuse(same, [12] * 3, 12), [12] * 3)
    for p, q in zip(same, back):
        assert q is not None and torch.equal(p.down, q.down) and torch.equal(p.up, q.up) and p.alpha == q.alpha
    # a fused LoRA as kohya trains it (dense, not block-sparse): every part keeps all of A, the same update
    dense = LoraModule(torch.randn(4, 12, generator=g), torch.randn(36, 4, generator=g), 2.0)
    rows = split(dense, [12] * 3)
    torch.testing.assert_close(torch.cat([_delta(q) for q in rows if q is not None]), _delta(dense))


def test_every_flux_linear_has_a_bfl_name_and_back(flux):
    linears = [n for n, m in flux.pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 20
    for path in linears:
        target = bfl_target(path)
        assert target is not None, path
        parts = diffusers_parts(target[0])
        assert parts is not None and parts[target[1]] == path
        assert bfl_of_kohya("lora_unet_" + target[0].replace(".", "_")) == target[0]
    assert bfl_target("transformer_blocks.0.attn.to_q") == ("double_blocks.0.img_attn.qkv", 0)
    assert bfl_target("single_transformer_blocks.7.proj_mlp") == ("single_blocks.7.linear1", 3)
    assert bfl_target("norm_out.linear") == ("final_layer.adaLN_modulation.1", 0)
    assert mlp_ratio() == 4.0


# -- diffusers reads the studio's kohya files --------------------------------------------------------
def test_kohya_export_gives_diffusers_the_studios_latents(flux, tmp_path):
    """Double-stream blocks (every Linear: fused q/k/v, projections, MLPs, modulations) + CLIP-L on tiny-flux."""
    modules = _random_lora(flux.pipe, lambda n: n.startswith("lora_transformer_transformer_blocks_") or
                           (n.startswith("lora_te1_") and n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))))
    concept = _concept(modules)
    file = export_concept(concept, tmp_path / "kohya.safetensors", "kohya")
    stored = load_file(str(file))
    width = flux.pipe.transformer.config.num_attention_heads * flux.pipe.transformer.config.attention_head_dim
    assert stored["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, width)
    assert stored["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].shape == (3 * width, 12)
    assert float(stored["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 6.0  # 3α for 3r: α/r unchanged
    assert "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight" in stored
    assert not any(k.startswith("lora_transformer_") for k in stored)
    studio = _studio_latents(flux.pipe, concept, flux)
    assert (studio - _latents(flux.pipe)).abs().max() > 1e-2  # the LoRA changes the image
    assert (_diffusers_latents(flux.pipe, file) - studio).abs().max() <= 1e-5


def test_single_blocks_at_flux_width_give_diffusers_the_studios_latents(wide_flux, tmp_path):
    """``linear1`` = q, k, v, MLP fused: the default targets (q/k/v: the MLP block zero), then every Linear."""
    for k, suffixes in enumerate([("attn_to_q", "attn_to_k", "attn_to_v"), ("",)]):
        modules = _random_lora(wide_flux, lambda n, ends=suffixes: n.startswith("lora_transformer_single") and
                               n.endswith(ends), seed=k, std=0.05)
        concept = _concept(modules)
        file = export_concept(concept, tmp_path / f"wide{k}.safetensors", "kohya")
        up = load_file(str(file))["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        assert up.shape == (3 * 3072 + 12288, 16)
        if k == 0:
            assert not up[3 * 3072:].any()  # no MLP LoRA trained: its rows are zero
        studio = _studio_latents(wide_flux, concept)
        assert (studio - _latents(wide_flux)).abs().max() > 1e-3
        assert (_diffusers_latents(wide_flux, file) - studio).abs().max() <= 1e-5


def test_a_kohya_file_as_sd_scripts_trains_it_imports_with_diffusers_latents(flux, wide_flux, tmp_path):
    """sd-scripts trains one dense LoRA per fused layer (not block-sparse): imported, the studio applies what
    diffusers applies — on tiny-flux's double block + CLIP-L, and on the wide single block."""
    g = torch.Generator().manual_seed(3)
    for pipe, names in ((flux.pipe, {"double_blocks_0_img_attn_qkv": (32, 96), "double_blocks_0_txt_attn_qkv": (32, 96),
                                     "double_blocks_0_img_mlp_0": (32, 128), "double_blocks_0_txt_mod_lin": (32, 192)}),
                        (wide_flux, {"single_blocks_0_linear1": (3072, 21504), "single_blocks_0_linear2": (15360, 3072),
                                     "single_blocks_0_modulation_lin": (3072, 9216)})):
        tensors = {}
        for name, (fan_in, fan_out) in names.items():
            tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, fan_in, generator=g) * 0.05
            tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, 4, generator=g) * 0.05
            tensors[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
        if pipe is flux.pipe:  # diffusers reads kohya CLIP LoRAs only with an out_proj among them
            for te in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                       "lora_te1_text_model_encoder_layers_0_self_attn_out_proj"):
                tensors |= {f"{te}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.2,
                            f"{te}.lora_up.weight": torch.randn(32, 4, generator=g) * 0.2,
                            f"{te}.alpha": torch.tensor(4.0)}
        file = tmp_path / "sd-scripts.safetensors"
        save_file(tensors, str(file), metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": "4"})
        concept = import_concept(file)
        assert concept.base == {"family": "flux"}
        names_in = set(lora_modules(concept.tensors))
        assert ("lora_transformer_transformer_blocks_0_attn_add_v_proj" in names_in) == (pipe is flux.pipe)
        assert ("lora_transformer_single_transformer_blocks_0_proj_mlp" in names_in) == (pipe is wide_flux)
        studio = _studio_latents(pipe, concept, flux if pipe is flux.pipe else None)
        assert (_diffusers_latents(pipe, file) - studio).abs().max() <= 1e-5


# -- round trips ---------------------------------------------------------------------------------------
def _same_tensors(a: Concept, b: Concept) -> None:
    assert set(a.tensors) == set(b.tensors)
    for k, v in a.tensors.items():
        assert torch.equal(v, b.tensors[k]), k


def test_kohya_bfl_and_diffusers_files_round_trip(flux, tiny_bases, tmp_path):
    from studio.methods.lora.flow_keys import default_targets

    targets = tuple(t.replace(".", "_") for t in default_targets("flux"))
    modules = _random_lora(flux.pipe, lambda n: (n.startswith("lora_transformer_") and n.endswith(targets)) or
                           (n.startswith("lora_te1_") and n.endswith("q_proj")))
    modules["lora_transformer_norm_out_linear"] = _random_lora(  # BFL's (shift, scale) order: swapped and back
        flux.pipe, lambda n: n == "lora_transformer_norm_out_linear")["lora_transformer_norm_out_linear"]
    concept = _concept(modules)
    for fmt in ("kohya", "diffusers", "bfl"):  # α = 2 ≠ r = 4: every format keeps the scale
        back = import_concept(export_concept(concept, tmp_path / f"{fmt}.safetensors", fmt))
        assert (back.trigger, back.class_word, back.base.get("family")) == ("<sks>", "dog", "flux")
        if fmt == "bfl":  # the scale is folded into lora_B: the same updates, α = r
            got = lora_modules(back.tensors)
            assert set(got) == set(modules)
            for n, m in modules.items():
                torch.testing.assert_close(_delta(got[n]), _delta(m), rtol=1e-6, atol=1e-7)
        else:
            _same_tensors(concept, back)
    unit = _concept({n: LoraModule(m.down, m.up, float(m.rank)) for n, m in modules.items()})
    _same_tensors(unit, import_concept(export_concept(unit, tmp_path / "bfl1.safetensors", "bfl")))  # α = r: bit-equal
    # SD 3 (transformer + both CLIPs) through diffusers' names
    sd3 = tiny_bases("tiny-sd3")
    sd3_concept = _concept(_random_lora(sd3.pipe, lambda n: n.endswith(("attn_to_q", "attn_add_k_proj", "q_proj"))
                                        and "layers_1" not in n), family="sd3")
    back = import_concept(export_concept(sd3_concept, tmp_path / "sd3.safetensors", "diffusers"))
    _same_tensors(sd3_concept, back)
    assert any(n.startswith("lora_te2_") for n in lora_modules(back.tensors))
    get_method("lora").check_base(back, sd3)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_lora_files_diffusers_writes_import_with_its_latents(tiny_bases, tmp_path, name):
    """A file written by diffusers itself (``save_lora_weights`` of PEFT adapters with α ≠ r, transformer and
    CLIP): imported and applied by the studio, the same latents as diffusers' ``load_lora_weights``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from studio.models import build_tiny_pipeline

    base = tiny_bases(name)
    source = build_tiny_pipeline(name)  # a second copy: the adapters diffusers saves are trained on it
    torch.manual_seed(5)
    layers, meta = {}, {}
    parts = [("transformer", source.transformer, ["to_q", "to_v", "add_k_proj", "ff.net.2"]),
             ("text_encoder", source.text_encoder, ["q_proj", "out_proj"])]
    if name == "tiny-sd3":
        parts.append(("text_encoder_2", source.text_encoder_2, ["k_proj"]))
    for component, model, targets in parts:
        config = LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False)
        model.add_adapter(config)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        meta[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(source).save_lora_weights(tmp_path / "saved", **layers, **meta)
    file = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    concept = import_concept(file)
    names = set(lora_modules(concept.tensors))
    assert any(n.startswith("lora_transformer_transformer_blocks_0_attn_add_k_proj") for n in names)
    assert any(n.startswith("lora_te1_") for n in names)
    assert any(n.startswith("lora_te2_") for n in names) == (name == "tiny-sd3")
    assert all(m.scale == 0.5 for m in lora_modules(concept.tensors).values())  # α = 2, r = 4 from the metadata
    studio = _studio_latents(base.pipe, concept, base)
    assert (studio - _latents(base.pipe)).abs().max() > 1e-2
    assert (_diffusers_latents(base.pipe, file) - studio).abs().max() <= 1e-5


# -- refusals and the command line ---------------------------------------------------------------------
def test_refusals(flux, tiny_bases, tmp_path):
    g = torch.Generator().manual_seed(0)
    t5 = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 32, generator=g),
          "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(32, 2, generator=g),
          "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(2, 64, generator=g),
          "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.randn(64, 2, generator=g)}
    save_file(t5, str(tmp_path / "t5.safetensors"))
    with pytest.raises(ConceptFormatError, match="T5"):
        import_concept(tmp_path / "t5.safetensors")
    odd = {"lora_unet_double_blocks_0_img_attn_norm.lora_down.weight": torch.randn(2, 32, generator=g),
           "lora_unet_double_blocks_0_img_attn_norm.lora_up.weight": torch.randn(32, 2, generator=g)}
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ConceptFormatError, match="not a FLUX.1 layer"):
        import_concept(tmp_path / "odd.safetensors")
    sd3 = _concept(_random_lora(tiny_bases("tiny-sd3").pipe, lambda n: n.endswith("attn_to_q")), family="sd3")
    with pytest.raises(StudioError, match="Only FLUX.1 LoRAs"):
        export_concept(sd3, tmp_path / "x.safetensors", "bfl")
    assert not (tmp_path / "x.safetensors").exists()
    # a FLUX layer with no BFL name is refused in one sentence, not dropped
    with pytest.raises(ConceptFormatError, match="--format diffusers"):
        to_bfl({"lora_transformer_transformer_blocks_0_attn_norm_q": LoraModule(torch.ones(1, 4), torch.ones(4, 1))})
    with pytest.raises(ConceptFormatError, match="do not split"):
        from_bfl({"double_blocks.0.img_attn.qkv": LoraModule(torch.ones(1, 4), torch.ones(4, 1))}, where="f")


def test_cli_exports_kohya_and_imports_it_back(flux, tmp_path):
    from studio.library import Library

    modules = _random_lora(flux.pipe, lambda n: n.endswith(("attn_to_q", "attn_to_k", "attn_to_v", "attn_add_v_proj")))
    concept = _concept(modules)
    lib = tmp_path / "lib"
    Library(lib).add(concept, "sks")
    out = tmp_path / "sks-kohya.safetensors"
    for cmd in (["concepts", "export", "sks", str(out), "--format", "kohya"],
                ["concepts", "import", str(out), "--name", "back"]):
        res = subprocess.run([sys.executable, "-m", "studio", *cmd, "--library", str(lib)], capture_output=True,
                             text=True, cwd=REPO, timeout=300)
        assert res.returncode == 0, res.stderr
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in load_file(str(out)))
    _same_tensors(concept, Library(lib).load("back"))
