"""Fast paths of generation and training (README "Fast paths"): LoRA fused into the weights and restored
exactly, channels-last, VAE tiling, torch.compile (accepted, or refused in one line where it cannot run)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.generation import GenerateConfig, ResolvedConcept, applied, generate
from studio.methods.runtime import text_encoders
from studio.models.speed import compile_unsupported, unet_speedups
from tests.method_cases import make_lora


def _weights(pipe) -> dict[str, torch.Tensor]:
    mods = [pipe.unet, *(te for _, te in text_encoders(pipe))]
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(mods) for n, p in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _render(base, prompt: str, size: int | None = None) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    size = size or base.native_size
    return base.pipe(prompt=prompt, num_inference_steps=2, generator=gen, output_type="np", guidance_scale=5.0,
                     width=size, height=size).images[0]


def _fused_render(base, concepts, prompt, fuse: bool) -> np.ndarray:
    resolved = [ResolvedConcept(c, f"c{i}", s) for i, (c, s) in enumerate(concepts)]
    with applied(base, resolved, options={"lora": {"fuse": fuse}}):
        state = base.pipe._studio_lora
        assert bool(state.fused) is fuse and bool(state.weights) is not fuse
        assert hasattr(base.pipe.unet, "peft_config") is not fuse  # fused: no PEFT layer in the forward
        return _render(base, prompt)


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_a_fused_lora_draws_what_the_adapter_draws_and_leaves_the_base_bit_identical(tiny_bases, name):
    base = tiny_bases(name)
    concept = make_lora(base, "<aa>", 3, text_encoder=True)
    before = _weights(base.pipe)
    plain = _render(base, "a photo of aa cat")
    unfused = _fused_render(base, [(concept, 0.8)], "a photo of aa cat", fuse=False)
    fused = _fused_render(base, [(concept, 0.8)], "a photo of aa cat", fuse=True)
    assert np.abs(unfused - plain).max() > 1e-3  # the LoRA acts …
    np.testing.assert_allclose(fused, unfused, atol=2e-5)  # … and fused acts the same, to float32 rounding
    assert _same(before, _weights(base.pipe))  # restored from the copies, bit for bit
    assert not hasattr(base.pipe, "_studio_lora") and not hasattr(base.pipe.unet, "peft_config")


def test_generate_fuses_by_default_and_the_flag_turns_it_off(tiny, monkeypatch):
    concept = make_lora(tiny, "<aa>", 4, text_encoder=True)
    before = _weights(tiny.pipe)
    seen = []
    real = tiny.pipe.__class__.__call__

    def spy(pipe, *args, **kwargs):
        seen.append(bool(pipe._studio_lora.fused))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(tiny.pipe.__class__, "__call__", spy)
    on = generate(tiny, GenerateConfig(prompt="a photo of <aa:0.7>", steps=2, guidance=5.0), [(concept, None, "c")])
    off = generate(tiny, GenerateConfig(prompt="a photo of <aa:0.7>", steps=2, guidance=5.0, fuse_lora=False),
                   [(concept, None, "c")])
    assert seen == [True, False]
    assert np.abs(np.asarray(on[0], dtype=float) - np.asarray(off[0], dtype=float)).max() <= 1  # PNG rounding
    assert _same(before, _weights(tiny.pipe))


def test_two_fused_loras_on_one_layer_leave_in_any_order(tiny):
    a, b = make_lora(tiny, "<aa>", 5, text_encoder=True), make_lora(tiny, "<bb>", 6, text_encoder=True)
    from studio.methods.lora import LoRA

    before = _weights(tiny.pipe)
    only_b = LoRA().apply(tiny, b, strength=1.2, fuse=True)
    weights_b = _weights(tiny.pipe)
    only_b.remove()
    ha = LoRA().apply(tiny, a, strength=0.5, fuse=True)
    hb = LoRA().apply(tiny, b, strength=1.2, fuse=True)
    both = _weights(tiny.pipe)
    assert not _same(both, weights_b)
    ha.remove()  # the first one leaves first: what stays is exactly b alone (rounded once from the originals)
    assert _same(_weights(tiny.pipe), weights_b)
    hb.remove()
    assert _same(_weights(tiny.pipe), before) and not hasattr(tiny.pipe, "_studio_lora")


def test_low_precision_weights_come_back_exactly_where_subtracting_would_not(tiny_bases):
    from studio.models import load_base

    base = load_base("tiny", device="cpu", dtype="bf16")
    concept = make_lora(base, "<aa>", 7, text_encoder=True)
    before = _weights(base.pipe)
    with applied(base, [ResolvedConcept(concept, "c", 1.0)], options={"lora": {"fuse": True}}):
        fused = _weights(base.pipe)
        factors = next(iter(base.pipe._studio_lora.fused.adapters.values()))
    changed = [k for k in before if not torch.equal(before[k], fused[k])]
    assert changed and all(fused[k].dtype == torch.bfloat16 for k in changed)
    assert _same(before, _weights(base.pipe))
    # why a copy and not W + Δ − Δ: in bf16 the subtraction does not give W back
    f = factors[0]
    w = f.weight.detach().clone()
    round_trip = ((w.float() + f.delta().to(w.device)).to(w.dtype).float() - f.delta()).to(w.dtype)
    assert not torch.equal(round_trip, w)


def test_a_failure_while_fusing_leaves_nothing_behind(tiny, monkeypatch):
    from studio.methods.lora import fuse

    concept = make_lora(tiny, "<aa>", 8, text_encoder=True)
    before = _weights(tiny.pipe)
    calls = []
    real = fuse.Factor.delta

    def third_fails(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(self)

    monkeypatch.setattr(fuse.Factor, "delta", third_fails)
    with pytest.raises(StudioError, match="injected failure"):
        generate(tiny, GenerateConfig(prompt="a photo of <aa>", steps=1, guidance=5.0), [(concept, None, "c")])
    assert _same(before, _weights(tiny.pipe))
    assert not hasattr(tiny.pipe, "_studio_lora") and not hasattr(tiny.pipe.unet, "peft_config")


# -- channels-last, VAE tiling, compile ---------------------------------------------------------------------
def test_channels_last_draws_the_same_and_puts_the_layout_back(tiny):
    conv = [p for p in tiny.pipe.unet.parameters() if p.dim() == 4]
    strides = [p.stride() for p in conv]
    plain = generate(tiny, GenerateConfig(prompt="a cat", steps=2, guidance=5.0))[0]
    with unet_speedups(tiny.pipe.unet, channels_last=True):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)
    fast = generate(tiny, GenerateConfig(prompt="a cat", steps=2, guidance=5.0, channels_last=True))[0]
    assert np.abs(np.asarray(plain, dtype=float) - np.asarray(fast, dtype=float)).max() <= 1
    assert [p.stride() for p in conv] == strides


def test_vae_tiling_decodes_in_tiles_for_the_call_only(tiny, monkeypatch):
    vae = tiny.pipe.vae
    tiles = []
    real = type(vae).tiled_decode
    monkeypatch.setattr(type(vae), "tiled_decode", lambda self, *a, **k: tiles.append(1) or real(self, *a, **k))
    size = 2 * vae.tile_sample_min_size  # larger than one tile
    img = generate(tiny, GenerateConfig(prompt="a cat", steps=1, guidance=5.0, width=size, height=size,
                                        vae_tiling=True))[0]
    assert img.size == (size, size) and tiles and vae.use_tiling is False
    generate(tiny, GenerateConfig(prompt="a cat", steps=1, guidance=5.0, width=size, height=size))
    assert len(tiles) == 1  # off again by default


def test_compile_is_refused_in_one_line_where_it_cannot_run(tiny, monkeypatch):
    import studio.models.speed as speed

    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in (compile_unsupported("cpu") or "")
    with pytest.raises(StudioError, match="--compile cannot run here") as err:
        generate(tiny, GenerateConfig(prompt="a cat", steps=1, guidance=5.0, compile=True))
    assert "\n" not in str(err.value)
    assert getattr(tiny.pipe.unet, "_compiled_call_impl", None) is None


@pytest.mark.slow  # compiling even the tiny UNet takes minutes on a CPU (274 s measured on the 2-core machine)
def test_a_compiled_unet_draws_what_the_eager_one_draws(tiny):
    if compile_unsupported("cpu"):
        pytest.skip(compile_unsupported("cpu"))
    plain = generate(tiny, GenerateConfig(prompt="a cat", steps=1, guidance=5.0))[0]
    t0 = time.monotonic()
    fast = generate(tiny, GenerateConfig(prompt="a cat", steps=1, guidance=5.0, compile=True))[0]
    assert np.abs(np.asarray(plain, dtype=float) - np.asarray(fast, dtype=float)).max() <= 1, time.monotonic() - t0
    assert getattr(tiny.pipe.unet, "_compiled_call_impl", None) is None


def test_training_speed_options_run_and_do_not_block_a_resume(tiny, tmp_path):
    from tests.helpers import write_photos
    from trainers import get_trainer
    from trainers.checkpoint import config_hash
    from trainers.loop import _hashed_config
    from trainers.runner import train

    write_photos(tmp_path / "images", 2, 32)
    entry = get_trainer("textual-inversion")
    common = dict(images=str(tmp_path / "images"), steps=1, batch_size=1, probe=False, log_every=0, class_word="dog",
                  token="<sp>")
    conv = [p for p in tiny.pipe.unet.parameters() if p.dim() == 4]
    strides = [p.stride() for p in conv]
    plain = train(entry, entry.resolve(out=str(tmp_path / "a.safetensors"), **common), tiny)
    fast = train(entry, entry.resolve(out=str(tmp_path / "b.safetensors"), channels_last=True, **common), tiny)
    assert fast.losses[0] == pytest.approx(plain.losses[0], rel=1e-4)
    assert [p.stride() for p in conv] == strides
    a, b = entry.resolve(**common), entry.resolve(compile=True, channels_last=True, **common)
    assert config_hash(_hashed_config(a)) == config_hash(_hashed_config(b))
