"""The shared per-layer cross-attention processor."""

import numpy as np
import torch

from studio.generation import GenerateConfig, generate
from studio.methods.attention import AttentionHook, add_hook, ensure_installed, remove_hook, store_of
from tests.conftest import render


class Probe(AttentionHook):
    def __init__(self):
        self.calls = []

    def context(self, store, layer, ctx, rows):
        self.calls.append((layer.index, float(store.timestep.flatten()[0]), rows, ctx.shape[0]))
        return None


def test_noop_hook_is_bit_identical_and_remove_restores_processors(tiny_bases):
    for name in ("tiny", "tiny-sdxl"):
        base = tiny_bases(name)
        unet = base.pipe.unet
        before = dict(unet.attn_processors)
        plain = render(base)
        add_hook(unet, "probe", AttentionHook())
        np.testing.assert_array_equal(render(base), plain)
        remove_hook(unet, "probe")
        assert all(unet.attn_processors[k] is v for k, v in before.items())
        assert store_of(unet) is None


def test_probe_sees_every_layer_in_order_with_timestep_and_cfg_rows(tiny):
    probe = Probe()
    store = add_hook(tiny.pipe.unet, "probe", probe)
    try:
        n_layers = len(store.layers)
        expected = sum(1 for n, _ in tiny.pipe.unet.named_modules() if n.endswith('attn2'))
        assert n_layers == expected == 7 and [layer.index for layer in store.layers] == list(range(n_layers))
        generate(tiny, GenerateConfig(prompt="a cat", steps=2, guidance=5.0))
    finally:
        remove_hook(tiny.pipe.unet, "probe")
    assert [c[0] for c in probe.calls] == list(range(n_layers)) * 2
    first, second = probe.calls[0][1], probe.calls[n_layers][1]
    assert first > second  # timesteps run downwards
    assert probe.calls[0][2] == slice(1, 2) and probe.calls[0][3] == 2  # [uncond, cond]: only row 1 editable


def test_processors_come_back_after_something_replaced_them(tiny):
    unet = tiny.pipe.unet
    add_hook(unet, "probe", AttentionHook())
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # what xformers / load_ip_adapter do
        ensure_installed(unet)
        from studio.methods.attention import StudioCrossAttnProcessor

        attn2 = [p for k, p in unet.attn_processors.items() if "attn2" in k]
        assert all(isinstance(p, StudioCrossAttnProcessor) for p in attn2)
    finally:
        remove_hook(unet, "probe")


def test_layer_index_is_fixed_under_gradient_checkpointing(tiny):
    probe = Probe()
    unet = tiny.pipe.unet
    add_hook(unet, "probe", probe)
    unet.enable_gradient_checkpointing()
    unet.train()
    try:
        x = torch.randn(1, 4, 16, 16, requires_grad=True)
        ctx = torch.randn(1, 77, 32)
        unet(x, torch.tensor([10]), ctx).sample.sum().backward()
    finally:
        unet.disable_gradient_checkpointing()
        unet.eval()
        remove_hook(unet, "probe")
    idx = [c[0] for c in probe.calls]
    assert sorted(set(idx)) == list(range(7))  # recomputation may repeat layers, never mislabel them
