"""Attention-probability capture in the shared cross-attention processor (``wants_probs`` / ``probs``):
the explicit path equals SDPA, only the requested layers take it, and without a capturing hook the
processor runs exactly as before."""

from __future__ import annotations

import pytest
import torch

from studio.methods.attention import AttentionHook, add_hook, remove_hook, store_of
from studio.methods.attention import processor as proc


class Capture(AttentionHook):
    """Wants the probabilities on ``layers`` (None = every layer) while ``active``."""

    def __init__(self, layers=None, active=True):
        self.layers, self.active = layers, active
        self.got: dict[int, torch.Tensor] = {}
        self.asked: list[int] = []

    def wants_probs(self, store, layer):
        self.asked.append(layer.index)
        return self.active and (self.layers is None or layer.index in self.layers)

    def probs(self, store, layer, probs, rows):
        self.got[layer.index] = probs


def _inputs(base, batch=2, seed=0):
    """Random UNet inputs for ``base``: (sample, timesteps, context, added_cond_kwargs)."""
    g = torch.Generator().manual_seed(seed)
    unet = base.pipe.unet
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    t = torch.tensor([999, 500][:batch])
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, width, generator=g), "time_ids": torch.rand(batch, 6, generator=g) * 32}
    return sample, t, ctx, added


def _run(unet, inputs):
    sample, t, ctx, added = inputs
    return unet(sample, t, ctx, added_cond_kwargs=added).sample


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_capture_equals_sdpa_in_outputs_and_gradients(tiny_bases, name):
    unet = tiny_bases(name).pipe.unet
    inputs = _inputs(tiny_bases(name))
    sample, t, ctx, added = inputs
    results = []
    for hook in (AttentionHook(), Capture()):
        add_hook(unet, "probe", hook)
        try:
            c = ctx.clone().requires_grad_(True)
            out = unet(sample, t, c, added_cond_kwargs=added).sample
            (grad,) = torch.autograd.grad(out.square().mean(), c)
        finally:
            remove_hook(unet, "probe")
        results.append((out.detach(), grad, hook))
    (ref, ref_grad, _), (out, grad, capture) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    n_layers = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    assert sorted(capture.got) == list(range(n_layers))
    for index, probs in capture.got.items():  # (B, heads, N, T), rows sum to 1
        attn = unet.get_submodule(proc.unet_layers(unet)[index].name)
        assert probs.shape[0] == 2 and probs.shape[1] == attn.heads and probs.shape[-1] == 77
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))


def test_only_requested_layers_compute_probs(tiny, monkeypatch):
    unet = tiny.pipe.unet
    calls = {"explicit": 0, "sdpa": 0}
    explicit, sdpa = proc._attention_with_probs, proc._sdpa

    def count_explicit(*a, **k):
        calls["explicit"] += 1
        return explicit(*a, **k)

    def count_sdpa(*a, **k):
        calls["sdpa"] += 1
        return sdpa(*a, **k)

    monkeypatch.setattr(proc, "_attention_with_probs", count_explicit)
    monkeypatch.setattr(proc, "_sdpa", count_sdpa)
    capture = Capture(layers={0, 3})
    store = add_hook(unet, "probe", capture)
    try:
        n_layers = len(store.layers)
        with torch.no_grad():
            _run(unet, _inputs(tiny))
    finally:
        remove_hook(unet, "probe")
    assert sorted(capture.got) == [0, 3]
    assert calls == {"explicit": 2, "sdpa": n_layers - 2}
    assert capture.asked == list(range(n_layers))  # asked on every layer, once per call


def test_without_a_capturing_hook_the_path_is_the_old_one(tiny_bases, monkeypatch):
    """No hook wanting probabilities (none at all, or one that declines): SDPA on every layer, and the
    UNet's output bit-identical to its own processors'."""
    def refuse(*a, **k):
        raise AssertionError("probabilities computed although no hook asked for them")

    monkeypatch.setattr(proc, "_attention_with_probs", refuse)
    for name in ("tiny", "tiny-sdxl"):
        unet = tiny_bases(name).pipe.unet
        inputs = _inputs(tiny_bases(name), seed=1)
        with torch.no_grad():
            own = _run(unet, inputs)
            for hook in (AttentionHook(), Capture(active=False)):
                add_hook(unet, "probe", hook)
                try:
                    studio = _run(unet, inputs)
                finally:
                    remove_hook(unet, "probe")
                assert torch.equal(studio, own), name
        assert store_of(unet) is None


@pytest.mark.parametrize("qk_norm", [None, "layer_norm"])
def test_explicit_attention_respects_masks_heads_and_qk_norm(qk_norm):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=24, cross_attention_dim=16, heads=3, dim_head=8, qk_norm=qk_norm)
    b, n, t = 2, 5, 7
    query = torch.randn(b, n, 24)
    key, value = torch.randn(b, t, 24), torch.randn(b, t, 24)
    keep = torch.ones(b, 1, 1, t, dtype=torch.bool)
    keep[0, ..., 4:] = False  # row 0 sees only its first four tokens
    additive = torch.zeros(b, 1, 1, t).masked_fill(~keep, float("-inf"))
    for mask in (None, keep, additive):
        with torch.no_grad():
            out, probs = proc._attention_with_probs(attn, query, key, value, mask)
            ref = proc._sdpa(attn, query, key, value, mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert probs.shape == (b, 3, n, t)
        if mask is not None:
            assert float(probs[0, ..., 4:].abs().max()) == 0.0 and float(probs[1, ..., 4:].min()) > 0
