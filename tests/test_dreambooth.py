"""DreamBooth-LoRA and full fine-tuning with prior preservation, on the tiny bases.

Interop is checked against diffusers itself: a trained file is loaded into a freshly built
pipeline with ``pipe.load_lora_weights(file)`` (no studio code) and must give the same pixels.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from studio.errors import StudioError, TrainingError
from studio.generation import applied, effective_strengths
from studio.methods import get_method, load_concept, save_concept
from studio.methods.interop import export_concept, import_concept
from studio.methods.lora import lora_state
from studio.methods.lora.keys import lora_modules, module_path, sgm_to_diffusers, te_path
from studio.models import build_tiny_pipeline
from studio.prompts import rewrite
from tests.conftest import render
from tests.helpers import dreambooth_config, write_square_photos
from tests.method_cases import make_lora
from trainers import get_trainer
from trainers.loop import TrainCallbacks, TrainControl, TrainingStopped, _noise, _optimizer
from trainers.lora import (
    ADAPTER,
    RARE_IDENTIFIERS,
    DreamBoothConfig,
    class_image_folder,
    ensure_class_images,
)
from trainers.rates import SD15_TEXT_FAN_IN, SD15_UNET_FAN_IN, fan_in_rate
from trainers.runner import train

ENTRY = get_trainer("dreambooth")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many short steps; on a shared CPU two OpenMP threads spin-wait for each other
    (measured: 45 s with one thread, 5+ min with two, under load). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_square_photos(tmp_path_factory.mktemp("db-imgs"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("class-cache")


def _cfg(images, out, cache, **kw):
    # the UNet-only LoRA unless a test asks for the text encoder (the default trains both)
    return dreambooth_config(images, out, cache, **{"steps": 3, "train_text_encoder": False, **kw})


def _state(pipe):
    mods = {"unet": pipe.unet, "vae": pipe.vae, "te": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        mods["te2"] = pipe.text_encoder_2
    return {f"{m}.{k}": v.clone() for m, mod in mods.items() for k, v in mod.state_dict().items()}


class _CountCalls:
    """Counts pipeline calls (class-image generation) by wrapping the pipeline class's __call__."""

    def __init__(self, monkeypatch, pipe):
        self.n = 0
        original = type(pipe).__call__

        def wrapped(this, *args, **kwargs):
            self.n += 1
            return original(this, *args, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", wrapped)


@pytest.fixture(scope="module")
def trained(tiny_bases, images, cache_dir, tmp_path_factory):
    """One LoRA trained by the runner on ``tiny`` (with prior preservation), and the base's state
    before training."""
    base = tiny_bases("tiny")
    before = _state(base.pipe)
    out = tmp_path_factory.mktemp("db-out") / "dog.safetensors"
    result = train(ENTRY, _cfg(images, out, cache_dir), base)
    return base, result, before


@pytest.fixture(scope="module")
def plain_pipe():
    """Freshly built tiny pipelines (the bases' weights) for diffusers-only loading; unloaded after use."""
    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_pipeline(family)
        built[family].unload_lora_weights()
        return built[family]

    return get


def _plain_render(pipe, prompt):
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt=prompt, num_inference_steps=2, generator=gen, output_type="np", guidance_scale=5.0).images[0]


def _studio_render(base, concept, prompt, strength=None):
    resolved = effective_strengths(prompt, "", [(concept, strength, "c")])
    with applied(base, resolved) as texts:
        return render(base, rewrite(prompt, texts))


def test_lora_file_loads_in_plain_diffusers_and_matches_the_studio(trained, plain_pipe):
    base, result, _ = trained
    assert result.path.is_file() and result.concept.tokens == ["<sks>"]
    studio = _studio_render(base, load_concept(result.path), "a photo of <sks> on the grass")
    pipe = plain_pipe("tiny")  # the same weights as the base, no studio code below
    pipe.load_lora_weights(str(result.path))
    np.testing.assert_array_equal(_plain_render(pipe, "a photo of sks dog on the grass"), studio)


def test_strength_zero_is_the_base_and_one_differs(trained):
    base, result, _ = trained
    concept = load_concept(result.path)
    off = _studio_render(base, concept, "a photo of <sks:0> on the grass")
    np.testing.assert_array_equal(off, render(base, "a photo of dog on the grass"))
    on = _studio_render(base, concept, "a photo of <sks:1> on the grass")
    assert np.abs(on - off).max() > 1e-3


def test_only_lora_parameters_change_and_the_base_is_restored(trained):
    base, result, before = trained
    after = _state(base.pipe)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not hasattr(base.pipe.unet, "peft_config") and not getattr(base.pipe.text_encoder, "peft_config", None)
    assert all(not p.requires_grad for p in base.pipe.unet.parameters())
    assert all(t.abs().sum() > 0 for k, t in result.concept.tensors.items() if k.endswith("lora_up.weight"))


def test_saved_keys_are_exactly_the_modules_peft_targeted(trained):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    base, result, _ = trained
    unet = inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                   copy.deepcopy(base.pipe.unet))
    targeted = {"lora_unet_" + n.replace(".", "_") for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    modules = lora_modules(result.concept.tensors)
    assert set(modules) == targeted and len(targeted) == 56
    assert all(m.rank == 8 and m.alpha == 8.0 for m in modules.values())  # the default rank, alpha = rank
    md = result.concept.metadata()
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "8" and md["ss_base_model_version"] == "sd_v1"


def test_class_images_are_cached_per_base(trained, tiny_bases, images, cache_dir, tmp_path, monkeypatch):
    base, _, _ = trained
    folder = class_image_folder(base, "a photo of a dog", 32, cache_dir)
    assert sorted(p.name for p in folder.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    calls = _CountCalls(monkeypatch, base.pipe)
    train(ENTRY, _cfg(images, tmp_path / "again.safetensors", cache_dir, steps=1), base)
    assert calls.n == 0  # the second training generated nothing
    other = dataclasses.replace(base, identity="folder:another-sd1-fine-tune")  # same family, other weights
    assert class_image_folder(other, "a photo of a dog", 32, cache_dir) != folder
    ensure_class_images(other, "a photo of a dog", 32, 1, root=cache_dir, steps=1)
    assert calls.n == 1


def test_resume_is_bit_identical(tiny_bases, images, cache_dir, tmp_path):
    base = tiny_bases("tiny")
    whole = train(ENTRY, _cfg(images, tmp_path / "a.safetensors", cache_dir, steps=3), base)

    class PauseAfterOne(TrainControl):
        def poll(self):
            return "pause"

    out = tmp_path / "b.safetensors"
    with pytest.raises(TrainingStopped) as stop:
        train(ENTRY, _cfg(images, out, cache_dir, steps=3), base, control=PauseAfterOne())
    assert stop.value.step == 1 and stop.value.checkpoint is not None
    resumed = train(ENTRY, _cfg(images, out, cache_dir, steps=3, resume="latest"), base)
    assert whole.concept.tensors.keys() == resumed.concept.tensors.keys()
    for k, v in whole.concept.tensors.items():
        assert torch.equal(v, resumed.concept.tensors[k]), k


def test_two_lora_concepts_compose_with_their_own_strengths(tiny):
    a, b = make_lora(tiny, "<aa>", 1, text_encoder=False), make_lora(tiny, "<bb>", 2)
    prompt = "a photo of <aa:0.5> and <bb:1.2>"
    resolved = effective_strengths(prompt, "", [(a, None, "a"), (b, None, "b")])
    with applied(tiny, resolved) as texts:
        assert rewrite(prompt, texts) == "a photo of aa cat and bb cat"
        state = lora_state(tiny.pipe)
        assert list(state.weights.values()) == [0.5, 1.2]
        layer = tiny.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        scales = {name: layer.scaling[name] for name in state.weights}
        assert sorted(scales.values()) == pytest.approx([0.5 * 0.5, 1.2 * 0.5])  # strength × α/r (α = r/2)
        both = render(tiny, rewrite(prompt, texts))
    alone = [_studio_render(tiny, c, f"a photo of {t} and {u}") for c, t, u in
             ((a, "<aa:0.5>", "bb cat"), (b, "aa cat", "<bb:1.2>"))]
    assert all(np.abs(both - x).max() > 1e-3 for x in alone)
    assert not hasattr(tiny.pipe, "_studio_lora") and not hasattr(tiny.pipe.unet, "peft_config")


@pytest.mark.parametrize("family,prefixes", [("tiny", {"lora_unet_", "lora_te_"}), ("tiny-v", {"lora_unet_", "lora_te_"}),
                                             ("tiny-sdxl", {"lora_unet_", "lora_te1_", "lora_te2_"})])
def test_text_encoder_lora_key_layout(tiny_bases, plain_pipe, images, cache_dir, tmp_path, family, prefixes):
    base = tiny_bases(family)
    before = _state(base.pipe)
    cfg = _cfg(images, tmp_path / "te.safetensors", cache_dir, steps=1, train_text_encoder=True,
               prior_preservation=False)
    result = train(ENTRY, cfg, base)
    modules = lora_modules(result.concept.tensors)
    assert {n[: n.index("_", 5) + 1] for n in modules} == prefixes
    te = [n for n in modules if not n.startswith("lora_unet_")]
    assert len(te) == 4 * 2 * (len(prefixes) - 1)  # q, k, v, out_proj × 2 layers × encoders
    assert all("_text_model_encoder_layers_" in n for n in te)
    for k, v in _state(base.pipe).items():
        assert torch.equal(before[k], v), k
    pipe = plain_pipe(family)  # diffusers reads every part, text encoders included
    pipe.load_lora_weights(str(result.path))
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "tiny-sdxl" else set())
    assert set(pipe.get_list_adapters()) == expected


def test_kohya_and_diffusers_round_trips(trained, plain_pipe, tmp_path):
    base, result, _ = trained
    concept = load_concept(result.path)
    kohya = export_concept(concept, tmp_path / "k.safetensors", "kohya")
    diffusers_file = export_concept(concept, tmp_path / "diffusers", "diffusers")
    assert diffusers_file.name == "pytorch_lora_weights.safetensors"
    from_kohya = import_concept(kohya)
    from_diffusers = import_concept(diffusers_file)
    for c in (from_kohya, from_diffusers):
        assert c.method == "lora" and c.tokens == ["<sks>"] and c.class_word == "dog"
        assert c.tensors.keys() == concept.tensors.keys()
        for k, v in concept.tensors.items():
            assert torch.equal(v, c.tensors[k]), k
    again = export_concept(from_diffusers, tmp_path / "again.safetensors", "kohya")
    assert import_concept(again).tensors.keys() == concept.tensors.keys()
    # diffusers' own loader reads the diffusers export (and its alpha metadata) like the kohya file
    renders = []
    for path in (kohya, diffusers_file):
        pipe = plain_pipe("tiny")
        pipe.load_lora_weights(str(path))
        renders.append(_plain_render(pipe, "a photo of sks dog"))
    np.testing.assert_array_equal(*renders)


def test_diffusers_and_peft_name_variants_import_alike(tiny, tmp_path):
    """diffusers' PEFT names, its older ``lora.down``/``lora_linear_layer`` names and a PEFT adapter file
    (``base_model.model.``) all import to the same kohya tensors."""
    from safetensors.torch import save_file

    concept = make_lora(tiny, "<aa>", 3)
    for k in [k for k in concept.tensors if k.endswith(".alpha")]:
        concept.tensors[k] = torch.tensor(4.0)  # α = r: these formats carry no alpha
    peft_keys = export_concept(concept, tmp_path / "peft.safetensors", "diffusers")
    from safetensors.torch import load_file

    peft = load_file(str(peft_keys))
    older = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
             if k.startswith("unet.") else
             k.replace(".lora_A.weight", ".lora_linear_layer.down.weight").replace(".lora_B.weight",
                                                                                   ".lora_linear_layer.up.weight"): v
             for k, v in peft.items()}
    adapter = {"base_model.model." + k[len("unet."):]: v for k, v in peft.items() if k.startswith("unet.")}
    for name, tensors in (("older", older), ("adapter", adapter)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        back = import_concept(tmp_path / f"{name}.safetensors")
        expected = {k: v for k, v in concept.tensors.items() if name != "adapter" or k.startswith("lora_unet_")}
        assert back.tensors.keys() == expected.keys(), name
        for k, v in expected.items():
            assert torch.equal(v.float(), back.tensors[k].float()), (name, k)


def test_gradient_checkpointing_trains_the_same_and_previews_show_the_lora(tiny, images, cache_dir, tmp_path):
    from trainers.loop import TrainCallbacks

    class Previews(TrainCallbacks):
        images: list = []

        def on_preview(self, step, imgs):
            self.images.extend(imgs)

    ensure_class_images(tiny, "a photo of a dog", 32, 2, root=cache_dir, steps=1)  # so that nothing is generated
    calls = []
    hook = tiny.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        plain = train(ENTRY, _cfg(images, tmp_path / "a.safetensors", cache_dir, steps=2), tiny)
    finally:
        hook.remove()
    assert len(calls) == 2  # text embeddings cached: the instance prompt and the class prompt, once each
    cb = Previews()
    gc = train(ENTRY, _cfg(images, tmp_path / "b.safetensors", cache_dir, steps=2, gradient_checkpointing=True,
                           preview_every=2), tiny, callbacks=cb)
    for k, v in plain.concept.tensors.items():
        torch.testing.assert_close(gc.concept.tensors[k], v, rtol=1e-5, atol=1e-6)
    assert len(cb.images) == 1 and cb.images[0].size == (32, 32)
    assert not tiny.pipe.unet.is_gradient_checkpointing


def test_alpha_other_than_rank_survives_the_diffusers_format(tiny, plain_pipe, tmp_path):
    concept = make_lora(tiny, "<aa>", 5, text_encoder=True)  # α = r/2
    first = next(k for k in concept.tensors if k.endswith(".alpha"))
    concept.tensors[first] = torch.tensor(3.0)  # one module with its own alpha → an alpha_pattern
    out = export_concept(concept, tmp_path / "x.safetensors", "diffusers")
    back = import_concept(out)
    for k, v in concept.tensors.items():
        assert torch.equal(v.float(), back.tensors[k].float()), k
    with_studio = _studio_render(tiny, concept, "a photo of <aa>")
    pipe = plain_pipe("tiny")
    pipe.load_lora_weights(str(out))
    plain = _plain_render(pipe, "a photo of aa cat")
    # the studio folds the odd module's α into its B for diffusers' kohya loader: equal up to rounding
    np.testing.assert_allclose(plain, with_studio, atol=1e-5)


def test_kohya_names_round_trip_to_module_paths(tiny_bases):
    for family in ("tiny", "tiny-sdxl"):
        pipe = tiny_bases(family).pipe
        names = [n for n, _ in pipe.unet.named_modules()]
        names += [te_path(n) for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te
                  for n, _ in te.named_modules() if n]
        for name in names:
            assert module_path(name.replace(".", "_")) == name, name
    # kohya's SGM (original-repo) SDXL names
    pairs = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_proj_in": "lora_unet_down_blocks_2_attentions_1_proj_in",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k": "lora_unet_mid_block_attentions_0_transformer_blocks_9_attn2_to_k",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2": "lora_unet_up_blocks_1_attentions_2_transformer_blocks_1_ff_net_2",
        "lora_unet_output_blocks_0_0_in_layers_2": "lora_unet_up_blocks_0_resnets_0_conv1",
        "lora_unet_input_blocks_3_0_op": "lora_unet_down_blocks_0_downsamplers_0_conv",
    }
    for sgm, diffusers_name in pairs.items():
        assert sgm_to_diffusers(sgm) == diffusers_name


def test_sd15_unet_lora_at_rank_4_is_under_3_5_mb(tmp_path):
    """The size promise of docs/methods.md, measured on a real file for SD 1.5's UNet layout (built from the
    shipped config on the meta device; the LoRA tensors are real)."""
    from diffusers import UNet2DConditionModel

    from studio.concept import Concept

    config = json.loads((_config_dir() / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    tensors = {}
    for name, mod in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            k = "lora_unet_" + name.replace(".", "_")
            tensors[f"{k}.lora_down.weight"] = torch.zeros(4, mod.in_features)
            tensors[f"{k}.lora_up.weight"] = torch.zeros(mod.out_features, 4)
            tensors[f"{k}.alpha"] = torch.tensor(4.0)
    path = save_concept(Concept(method="lora", tokens=["<sks>"], tensors=tensors, class_word="dog"),
                        tmp_path / "sd15.safetensors")
    assert len(tensors) == 128 * 3
    assert path.stat().st_size <= 3.5e6, path.stat().st_size


def _config_dir():
    from pathlib import Path

    import studio.models

    return Path(studio.models.__file__).parent / "configs" / "sd1"


def test_full_fine_tune_writes_a_diffusers_folder_and_restores_the_base(tiny_bases, images, cache_dir, tmp_path):
    from studio.models import load_base

    base = tiny_bases("tiny")
    before = _state(base.pipe)
    out = tmp_path / "model"
    result = train(ENTRY, _cfg(images, out, cache_dir, steps=2, full=True, lr=1e-3), base)
    assert result.path == out and (out / "model_index.json").is_file()
    for k, v in _state(base.pipe).items():
        assert torch.equal(before[k], v), k
    tuned = load_base(str(out), device="cpu")
    changed = [k for k, v in tuned.pipe.unet.state_dict().items() if not torch.equal(v, before[f"unet.{k}"])]
    assert changed and all(torch.equal(v, before[f"te.{k}"]) for k, v in tuned.pipe.text_encoder.state_dict().items())
    info = json.loads((out / "studio.json").read_text())
    assert info["prompt_text"] == "sks dog" and info["train"]["full"] is True
    with pytest.raises(StudioError, match="folder"):
        train(ENTRY, _cfg(images, tmp_path / "m.safetensors", cache_dir, steps=1, full=True), base)


def test_cli_trains_and_picks_unused_rare_identifiers(images, tmp_path):
    from studio.cli import main
    from studio.library import Library
    from trainers.runner import choose_token

    lib = Library(tmp_path / "lib")
    assert main(["train", "dreambooth", "--base", "tiny", "--library", str(lib.folder), "--images", str(images),
                 "--class-word", "dog", "--steps", "1", "--no-prior-preservation", "--log-every", "0"]) == 0
    assert [(i.name, i.tokens, i.method) for i in lib.list()] == [("sks", ["<sks>"], "lora")]
    cfg = DreamBoothConfig(images=str(images), class_word="cat")
    assert choose_token(cfg, lib) == f"<{RARE_IDENTIFIERS[1]}>"  # unique in the library
    assert choose_token(dataclasses.replace(cfg, token="mine"), lib) == "<mine>"


def test_config_defaults_and_errors(tmp_path):
    lora = DreamBoothConfig(images="x", class_word="dog")
    full = DreamBoothConfig(images="x", class_word="dog", full=True, train_text_encoder=False)
    full_te = DreamBoothConfig(images="x", class_word="dog", full=True, train_text_encoder=True)
    # rates in units of 1/fan-in (trainers.rates): SD 1.5's usual values at SD 1.5's widths
    assert lora.lr is None and lora.train_text_encoder and lora.steps == 500 and full.steps == 800
    sd15 = [fan_in_rate(c.lr_scale, SD15_UNET_FAN_IN) for c in (lora, full, full_te)]
    assert sd15 == pytest.approx([1e-4, 5e-6, 2e-6], rel=0.02)
    assert fan_in_rate(lora.lr_scale, SD15_TEXT_FAN_IN) == pytest.approx(1e-4, rel=0.02)
    assert DreamBoothConfig(images="x", class_word="dog", target_modules=["to_q,to_v"]).target_modules == ["to_q", "to_v"]
    with pytest.raises(TrainingError, match="class-word"):
        DreamBoothConfig(images="x")
    with pytest.raises(TrainingError, match="bitsandbytes"):
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is not None:
            pytest.skip("bitsandbytes is installed")
        _optimizer(dataclasses.replace(lora, optimizer="adamw8bit"), [{"params": [torch.nn.Parameter(torch.ones(1))]}])


def test_default_rates_follow_the_base_widths(tiny, images, cache_dir, tmp_path):
    """Without --lr each model trains at lr_scale / (mean fan-in of its attention projections), printed
    and stored; --lr is the optimizer's value as given."""
    from trainers.rates import TEXT_ATTENTION, UNET_ATTENTION, attention_fan_in

    logs: list[str] = []

    class Log(TrainCallbacks):
        def on_log(self, message):
            logs.append(message)

    cfg = _cfg(images, tmp_path / "d.safetensors", cache_dir, steps=1, lr=None, train_text_encoder=True)
    result = train(ENTRY, cfg, tiny, callbacks=Log())
    unet_w = attention_fan_in(tiny.pipe.unet, UNET_ATTENTION)
    te_w = attention_fan_in(tiny.pipe.text_encoder, TEXT_ATTENTION)
    assert unet_w == pytest.approx(sum(m.in_features for n, m in tiny.pipe.unet.named_modules()
                                       if n.endswith(UNET_ATTENTION)) / sum(1 for n, _ in tiny.pipe.unet.named_modules()
                                                                            if n.endswith(UNET_ATTENTION)))
    record = result.concept.train
    assert record["fan_in"] == [round(unet_w, 2), round(te_w, 2)]
    assert record["lr_effective"] == pytest.approx([cfg.lr_scale / unet_w, cfg.lr_scale / te_w])
    assert any(m.startswith("learning rate UNet") and "fan-in" in m for m in logs)
    given = train(ENTRY, _cfg(images, tmp_path / "e.safetensors", cache_dir, steps=1, lr=3e-3,
                              train_text_encoder=True), tiny)
    assert given.concept.train["lr_effective"] == [3e-3, 3e-3]


def test_offset_noise_adds_a_per_channel_constant():
    plain = _noise(torch.Generator().manual_seed(0), (2, 4, 8, 8), 0.0)
    offset = _noise(torch.Generator().manual_seed(0), (2, 4, 8, 8), 0.1)
    assert torch.equal(plain, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6) and shift.abs().max() > 0


def test_lora_and_textual_inversion_mix_and_leave_the_base_intact(tiny):
    from tests.method_cases import make_ti

    before = _state(tiny.pipe)
    lora, ti = make_lora(tiny, "<aa>", 1), make_ti(tiny, "<tt>", 2)
    prompt = "a photo of <aa:0.8> next to <tt>"
    resolved = effective_strengths(prompt, "", [(lora, None, "l"), (ti, None, "t")])
    with applied(tiny, resolved) as texts:
        both = render(tiny, rewrite(prompt, texts))
    only_ti = _studio_render(tiny, ti, "a photo of cat next to <tt>")
    assert np.abs(both - only_ti).max() > 1e-3
    for k, v in _state(tiny.pipe).items():
        assert torch.equal(before[k], v), k
    np.testing.assert_array_equal(render(tiny, "a photo of cat"), render(_fresh(tiny), "a photo of cat"))


def _fresh(base):
    """The same base, freshly built (to compare pixels with a pipeline that never saw a concept)."""
    return dataclasses.replace(base, pipe=build_tiny_pipeline(base.name))


def test_lora_concepts_are_refused_on_another_family(tiny_bases):
    from studio.errors import IncompatibleConceptError

    sdxl = make_lora(tiny_bases("tiny-sdxl"), "<aa>", 0)
    with pytest.raises(IncompatibleConceptError, match="SDXL"):
        get_method("lora").check_base(sdxl, tiny_bases("tiny"))


def test_training_needs_a_clean_pipeline(tiny, images, cache_dir, tmp_path):
    handle = get_method("lora").apply(tiny, make_lora(tiny, "<aa>", 0), strength=1.0)
    try:
        with pytest.raises(TrainingError, match="Remove applied concepts"):
            train(ENTRY, _cfg(images, tmp_path / "x.safetensors", cache_dir, steps=1), tiny)
    finally:
        handle.remove()
    assert ADAPTER not in str(getattr(tiny.pipe.unet, "peft_config", {}))
