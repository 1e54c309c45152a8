"""Issue 25, item 2: one bad concept must not break later generations, nor the app's start-up.

The attack: a concept file whose ``studio.tokens`` is ``"[1]"`` used to load, fail at generation,
and leave its entry in the pipeline's token table, so every later generation with any concept
failed until a restart; in the library it stopped ``python app.py`` at start-up.

Every method gets poisoned files (bad metadata, a token of the vocabulary, tensors of the wrong
width, layers the base lacks …) and injected failures deep inside ``apply``. Each attempt must raise
the studio's error (a :class:`StudioError`) and leave the pipeline exactly as it was: tokenizers,
input embeddings, attention processors and hooks, PEFT layers, the token table, the weights, and a
generation with a good concept gives the pixels of a freshly loaded base.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.errors import StudioError
from studio.generation import ConceptUse, GenerateConfig, generate
from studio.methods import save_concept
from studio.methods.runtime import text_encoders, token_table
from studio.service import BaseSettings, Studio
from tests.method_cases import CASES, make_lora, make_ti

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(CASES)
GOOD, BAD = "<good>", "<bad>"
PROMPT = f"a photo of {GOOD} on the grass"


# -- the pipeline's state, and a reference from a fresh base ------------------------------------------------
def pipe_state(pipe) -> dict:
    """Everything applying a concept may touch, by identity where identity matters."""
    unet = pipe.unet
    encoders = [te for _, te in text_encoders(pipe)]
    table = getattr(pipe, "_studio_tokens", None)
    store = getattr(unet, "_studio_store", None)
    return {
        "tokenizers": [(id(tok), len(tok)) for tok, _ in text_encoders(pipe)],
        "embeddings": [id(te.get_input_embeddings()) for te in encoders],
        "processors": {name: id(proc) for name, proc in unet.attn_processors.items()},
        "store": None if store is None else (id(store), sorted(store.hooks)),
        "peft_config": [hasattr(m, "peft_config") for m in (unet, *encoders)],
        "lora_state": getattr(pipe, "_studio_lora", None),
        "table": {} if table is None else {k: list(e.tokens) for k, e in table.entries.items()},  # none = empty
        "torch_hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in (unet, *encoders)],
        "modules": [(n, type(x).__name__) for m in (unet, *encoders) for n, x in m.named_modules()],
    }


def weights(pipe) -> list[tuple[str, torch.Tensor]]:
    mods = [pipe.unet, pipe.vae, *(te for _, te in text_encoders(pipe))]
    return [(n, p.detach().clone()) for m in mods for n, p in m.state_dict().items()]


def assert_weights_equal(before, after) -> None:
    assert [n for n, _ in before] == [n for n, _ in after]
    for (n, p0), (_, p1) in zip(before, after):
        assert torch.equal(p0, p1), n


def render(base, concepts=(), prompt: str = PROMPT) -> np.ndarray:
    cfg = GenerateConfig(prompt=prompt, steps=2, guidance=5.0, seed=0)
    return np.asarray(generate(base, cfg, list(concepts))[0])


@pytest.fixture(scope="module")
def fresh():
    """A second tiny base, loaded for this module only: the reference a clean pipeline renders."""
    from studio.models import load_base

    return load_base("tiny", device="cpu")


@pytest.fixture(scope="module")
def good(fresh):
    """A valid concept of every method (made on the fresh base) and what it renders there."""
    concepts = {m: CASES[m](fresh, GOOD, 7) for m in METHODS}
    pixels = {m: render(fresh, [(c, None, "good")]) for m, c in concepts.items()}
    return concepts, pixels


def assert_clean_after(base, before_state, before_weights, good, method: str) -> None:
    """Bit-identical state and weights, and a good concept renders exactly what a fresh base does."""
    assert pipe_state(base.pipe) == before_state
    assert_weights_equal(before_weights, weights(base.pipe))
    concepts, pixels = good
    np.testing.assert_array_equal(render(base, [(concepts[method], None, "good")]), pixels[method])
    assert pipe_state(base.pipe) == before_state  # the good generation cleaned up after itself too


# -- poisoned files ------------------------------------------------------------------------------------------
def vocab_word(base) -> str:
    vocab = base.pipe.tokenizer.get_vocab()
    return "cat</w>" if "cat</w>" in vocab else next(iter(vocab))


def rewrite_file(path: Path, tensors=None, metadata=None) -> Path:
    """Rewrite a concept file's tensors and/or metadata directly (bypassing every studio check)."""
    with safe_open(str(path), "pt") as f:
        md = dict(f.metadata())
    t = load_file(str(path))
    t = tensors(t) if tensors else t
    md = metadata(md) if metadata else md
    save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata=md)
    return path


def _set(d: dict, **kv) -> dict:
    return d | kv


def _meta(key: str, value: str):
    return lambda md: md | {key: value}


def _wider(key: str, *extra_keys: str):
    """Make tensor ``key`` (and ``extra_keys``) one column wider along the last axis."""
    def edit(t):
        for k in (key, *extra_keys):
            t[k] = torch.cat([t[k], torch.zeros(*t[k].shape[:-1], 1)], dim=-1)
        return t
    return edit


def _lora_missing_module(t):
    down = next(v for k, v in t.items() if k.endswith(".lora_down.weight"))
    up = next(v for k, v in t.items() if k.endswith(".lora_up.weight"))
    return t | {"lora_unet_not_a_layer.lora_down.weight": down.clone(), "lora_unet_not_a_layer.lora_up.weight": up.clone(),
                "lora_unet_not_a_layer.alpha": torch.tensor(2.0)}


def _lora_conv_as_linear(base):
    """A (r, in) / (out, r) pair for a 3×3 conv: the base has the layer with those widths, so the
    studio's checks pass, and diffusers fails half-way through loading (after the text encoder)."""
    def edit(t):
        conv = base.pipe.unet.conv_in
        return t | {"lora_unet_conv_in.lora_down.weight": torch.randn(4, conv.in_channels),
                    "lora_unet_conv_in.lora_up.weight": torch.randn(conv.out_channels, 4),
                    "lora_unet_conv_in.alpha": torch.tensor(2.0)}
    return edit


def _neti_layers_reversed(md):
    cfg = json.loads(md["neti.config"])
    cfg["layers"] = list(reversed(cfg["layers"]))
    return md | {"neti.config": json.dumps(cfg)}


# method -> poison name -> (how to edit tensors, how to edit metadata)
POISONS = {
    "textual_inversion": {
        "tokens-int": (None, _meta("studio.tokens", "[1]")),
        "tokens-nested": (None, _meta("studio.tokens", '[["<a>"]]')),
        "token-in-vocab": (None, "vocab"),
        "wrong-width": (_wider("emb_params"), None),
        "compat-not-object": (None, lambda md: md | {"studio.base": json.dumps({"compat": 1})}),
    },
    "lora": {
        "tokens-int": (None, _meta("studio.tokens", "[1]")),
        "module-the-base-lacks": (_lora_missing_module, None),
        "wrong-width": (lambda t: _wider(next(k for k in t if k.endswith(".lora_down.weight")))(t), None),
        "conv-as-linear": ("conv", None),
    },
    "perfusion": {
        "tokens-int": (None, _meta("studio.tokens", "[1]")),
        "token-in-vocab": (None, "vocab"),
        "wrong-width": (_wider("perfusion.embedding"), None),
        "value-target-width": (_wider("perfusion.v_target.0"), None),
        "bad-gate": (None, _meta("perfusion.tau", "0")),
    },
    "neti": {
        "tokens-int": (None, _meta("studio.tokens", "[1]")),
        "token-in-vocab": (None, "vocab"),
        "layers-of-another-unet": (None, _neti_layers_reversed),
    },
    "prospect": {
        "tokens-int": (None, _meta("studio.tokens", "[1]")),
        "token-in-vocab": (None, "vocab"),
        "wrong-width": (_wider("prospect.emb_params"), None),
        "stages-garbage": (None, _meta("prospect.config", '{"stages": "x"}')),
    },
    "custom_diffusion": {
        "tokens-int": (None, _meta("studio.tokens", "[1]")),
        "token-in-vocab": (None, "vocab"),
        "wrong-width": (_wider("custom_diffusion.embedding"), None),
        "kv-width": (lambda t: _wider(next(k for k in t if k.endswith("to_k_custom_diffusion.weight")))(t), None),
    },
    "break_a_scene": {
        "tokens-int": (None, _meta("studio.tokens", "[1]")),
        "token-in-vocab": (None, "vocab"),
        "wrong-width": (_wider("break_a_scene.embedding"), None),
        "lora-edited": (lambda t: t | {k: v * 2 for k, v in t.items() if k.endswith(".lora_up.weight")}, None),
        "run-tokens-garbage": (None, _meta("break_a_scene.tokens", '{"a": 1}')),
    },
    "zeroshot": {
        "tokens-int": (None, _meta("studio.tokens", "[1]")),
        "wrong-width": (_wider("zeroshot.image_embeds", "zeroshot.negative_embeds"), None),
        "layer-scales-garbage": (None, _meta("zeroshot.layer_scales", json.dumps({"down": "x"}))),
        "layer-scales-list": (None, _meta("zeroshot.layer_scales", "[1, 2]")),
    },
}
CASES_POISON = [(m, p) for m in METHODS for p in POISONS[m]]


def poisoned_file(base, method: str, poison: str, folder: Path, name: str | None = None, seed: int = 11) -> Path:
    """A valid concept of ``method`` saved to ``folder`` (as ``name``), then poisoned."""
    folder.mkdir(parents=True, exist_ok=True)
    path = save_concept(CASES[method](base, BAD, seed), folder / f"{name or f'{method}-{poison}'}.safetensors")
    tensors, metadata = POISONS[method][poison]
    if tensors == "conv":
        tensors = _lora_conv_as_linear(base)
    if metadata == "vocab":
        metadata = _meta("studio.tokens", json.dumps([vocab_word(base)]))
    return rewrite_file(path, tensors, metadata)


def test_every_method_has_poisons():
    assert set(POISONS) == set(METHODS)


@pytest.mark.parametrize(("method", "poison"), CASES_POISON)
def test_a_poisoned_file_fails_cleanly_and_leaves_the_pipeline_as_it_was(tiny, good, tmp_path, method, poison):
    studio = Studio(BaseSettings(base="tiny"), library=tmp_path / "lib", base=tiny)
    path = poisoned_file(tiny, method, poison, tmp_path)
    state, params = pipe_state(tiny.pipe), weights(tiny.pipe)
    cfg = GenerateConfig(prompt="a photo of a cat", steps=2, guidance=5.0, concepts=[ConceptUse(str(path))])
    with pytest.raises(StudioError):
        studio.generate(cfg)
    with pytest.raises(StudioError):  # and again: the first failure changed nothing
        studio.generate(cfg)
    assert_clean_after(tiny, state, params, good, method)


@pytest.mark.parametrize("first", METHODS)
@pytest.mark.parametrize(("method", "poison"), [("lora", "conv-as-linear"), ("textual_inversion", "token-in-vocab"),
                                                ("perfusion", "value-target-width")])
def test_when_the_second_concept_fails_the_first_is_taken_off_again(tiny, good, tmp_path, first, method, poison):
    studio = Studio(BaseSettings(base="tiny"), library=tmp_path / "lib", base=tiny)
    ok = save_concept(good[0][first], tmp_path / "good.safetensors")
    bad = poisoned_file(tiny, method, poison, tmp_path)
    state, params = pipe_state(tiny.pipe), weights(tiny.pipe)
    cfg = GenerateConfig(prompt=PROMPT, steps=2, guidance=5.0, concepts=[ConceptUse(str(ok)), ConceptUse(str(bad))])
    with pytest.raises(StudioError):
        studio.generate(cfg)
    assert_clean_after(tiny, state, params, good, first)


def test_the_reader_names_the_file_and_the_field(tiny, tmp_path):
    from studio.errors import ConceptFormatError
    from studio.methods import load_concept

    for tokens in ("[1]", '[""]', '[null]', '"<a>"', '[["<a>"]]'):
        path = poisoned_file(tiny, "textual_inversion", "tokens-int", tmp_path)
        rewrite_file(path, metadata=_meta("studio.tokens", tokens))
        with pytest.raises(ConceptFormatError) as err:
            load_concept(path)
        assert path.name in str(err.value) and "studio.tokens" in str(err.value), tokens


# -- failures deep inside apply (not caught by any check) ----------------------------------------------------
def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


INJECT = {
    # the token table's rebuild fails (the scenario: the entry was stored before the rebuild)
    "textual_inversion": ("studio.methods.runtime.SplicedEmbedding", _boom),
    # diffusers loaded the adapter, then activating it fails
    "lora": ("PIPE.set_adapters", _boom),  # patched on the pipeline's class
    # the token is in, the hook target added, then the processors cannot be installed
    "perfusion": ("studio.methods.perfusion.ensure_installed", _boom),
    # the token is in and the NeTI hook installed, then adding the concept to it fails
    "neti": ("studio.methods.neti.hook.NetiHook.add", _boom),
    # the token is in and the (shared NeTI) hook installed, then adding the concept to it fails
    "prospect": ("studio.methods.neti.hook.NetiHook.add", _boom),
    # the token is in, then the K/V hook cannot be added
    "custom_diffusion": ("studio.methods.custom_diffusion.add_hook", _boom),
    # the attention hook is registered, then its UNet pre-hook cannot be attached
    "zeroshot": ("studio.methods.zeroshot.hook.IPAdapterHook.attach", _boom),
    # the token is in and diffusers loaded the group's LoRA, then activating it fails
    "break_a_scene": ("PIPE.set_adapters", _boom),
}


@pytest.mark.parametrize("method", METHODS)
def test_an_injected_failure_inside_apply_leaves_nothing_behind(tiny, good, monkeypatch, method):
    concept = CASES[method](tiny, BAD, 12)
    state, params = pipe_state(tiny.pipe), weights(tiny.pipe)
    target, fn = INJECT[method]
    with monkeypatch.context() as mp:
        if target.startswith("PIPE."):
            mp.setattr(type(tiny.pipe), target.split(".", 1)[1], fn)
        else:
            mp.setattr(target, fn)
        first = good[0]["lora" if method == "textual_inversion" else "textual_inversion"]  # not hit by the injection
        for concepts in ([(concept, None, "bad")], [(first, None, "good"), (concept, None, "bad")]):
            with pytest.raises(StudioError) as err:
                render(tiny, concepts, prompt="a photo of a cat")
            assert isinstance(err.value.__cause__, RuntimeError) or "injected failure" in str(err.value)
            assert pipe_state(tiny.pipe) == state
    assert_clean_after(tiny, state, params, good, method)


def test_a_partial_rebuild_on_a_two_encoder_base_is_undone(tiny_bases, monkeypatch):
    """SDXL: the rebuild succeeds for the first encoder and fails for the second."""
    import studio.methods.runtime as runtime

    base = tiny_bases("tiny-sdxl")
    concept = make_ti(base, BAD, 3)
    plain = render(base, prompt="a photo of a cat")
    state, params = pipe_state(base.pipe), weights(base.pipe)
    real, made = runtime.SplicedEmbedding, []

    def second_fails(original, extra):
        made.append(1)
        if len(made) == 2:
            raise RuntimeError("injected failure")
        return real(original, extra)

    monkeypatch.setattr(runtime, "SplicedEmbedding", second_fails)
    with pytest.raises(StudioError):
        render(base, [(concept, None, "bad")], prompt="a photo of a cat")
    assert made == [1, 1] and pipe_state(base.pipe) == state
    monkeypatch.undo()
    assert_weights_equal(params, weights(base.pipe))
    np.testing.assert_array_equal(render(base, prompt="a photo of a cat"), plain)
    with_concept = render(base, [(make_ti(base, GOOD, 4), None, "good")])
    assert with_concept.shape == plain.shape and pipe_state(base.pipe) == state


def test_the_token_table_is_transactional(tiny):
    table = token_table(tiny.pipe)
    state = pipe_state(tiny.pipe)
    width = table.original_embeddings[0].embedding_dim
    bad_inputs = [
        ([1], [torch.zeros(1, width)]),  # the issue: a token that is not a string
        (["<x>", "<x>"], [torch.zeros(2, width)]),  # repeated
        ([vocab_word(tiny)], [torch.zeros(1, width)]),  # in the vocabulary
        (["<x>"], [torch.zeros(1, width + 1)]),  # wrong width
        (["<x>"], [torch.zeros(2, width)]),  # one vector too many
        (["<x>"], [torch.full((1, width), float("nan"))]),
        (["<x>"], []),  # no vectors for the encoder
    ]
    for tokens, vectors in bad_inputs:
        with pytest.raises(ValueError):
            table.set("k", tokens, vectors)
        assert pipe_state(tiny.pipe) == state, tokens
    table.set("k", ["<x>"], [torch.ones(1, width)])
    try:
        with_x = pipe_state(tiny.pipe)
        for tokens, vectors in bad_inputs + [(["<y>", "<x>"], [torch.zeros(2, width)])]:  # <x> is k's own: replace
            if tokens == ["<y>", "<x>"]:
                with pytest.raises(ValueError):
                    table.set("other", tokens, vectors)  # <x> belongs to another entry
            else:
                with pytest.raises(ValueError):
                    table.set("k", tokens, vectors)  # a failed replace keeps the old entry
            assert pipe_state(tiny.pipe) == with_x
        assert tiny.pipe.tokenizer.convert_tokens_to_ids("<x>") == table.original_embeddings[0].num_embeddings
    finally:
        table.drop("k")
    assert pipe_state(tiny.pipe) == state


# -- the library and the app's start-up ----------------------------------------------------------------------
def _poisoned_library(tiny, folder: Path) -> dict[str, Path]:
    """A library with a good concept and files that used to break the listing (or the app)."""
    from studio.library import Library

    lib = Library(folder)
    lib.add(make_ti(tiny, "<ok>", 0), "ok")
    lib.add(make_lora(tiny, "<ok-lora>", 1), "ok-lora")
    files = {
        "tokens-int": poisoned_file(tiny, "textual_inversion", "tokens-int", folder, "tokens-int"),
        "tokens-nested": poisoned_file(tiny, "textual_inversion", "tokens-nested", folder, "tokens-nested"),
        "lora-tokens-int": poisoned_file(tiny, "lora", "tokens-int", folder, "lora-tokens-int"),
        "bad-gate": poisoned_file(tiny, "perfusion", "bad-gate", folder, "bad-gate"),
    }
    for name, edit in {
        "unknown-method": _meta("studio.method", "not-a-method"),
        "base-not-object": _meta("studio.base", "[1]"),
        "base-name-int": _meta("studio.base", json.dumps({"name": 5, "family": ["x"]})),
        "metrics-odd": _meta("studio.metrics", json.dumps({"eval": 5, "curve": [1], "eval_multi": "x"})),
        "strength-nan": _meta("studio.strength", "nan"),
        "format-huge": _meta("studio.format", "99"),
    }.items():
        files[name] = rewrite_file(save_concept(make_ti(tiny, "<p>", 2), folder / f"{name}.safetensors"),
                                   metadata=edit)
    files["nan-tensor"] = rewrite_file(save_concept(make_ti(tiny, "<q>", 3), folder / "nan-tensor.safetensors"),
                                       tensors=lambda t: t | {"emb_params": torch.full_like(t["emb_params"], float("nan"))})
    files["junk"] = folder / "junk.safetensors"
    files["junk"].write_bytes(b"\x00" * 3)
    (folder / "ok.preview.png").write_bytes(b"not a png")  # a broken preview must not break the cards
    return files


def test_the_listing_reports_broken_files_and_never_fails(tiny, tmp_path):
    from studio.library import Library

    files = _poisoned_library(tiny, tmp_path / "lib")
    lib = Library(tmp_path / "lib")
    rows = {i.name: i for i in lib.list()}
    assert rows["ok"].usable and rows["ok-lora"].usable and rows["metrics-odd"].usable
    assert rows["base-name-int"].usable  # odd but harmless: shown, and applicable
    broken = {n for n, i in rows.items() if not i.usable}
    assert broken == {"tokens-int", "tokens-nested", "lora-tokens-int", "bad-gate", "unknown-method",
                      "base-not-object", "strength-nan", "format-huge", "nan-tensor", "junk"}
    assert "studio.tokens" in rows["tokens-int"].error and "not-a-method" in rows["unknown-method"].error
    for name in broken:
        assert "\n" not in rows[name].error and rows[name].error, name
        rows[name].row()  # every row renders
    assert set(lib.usable_names()) == set(rows) - broken
    assert set(files) - {"metrics-odd", "base-name-int"} == broken


def test_the_app_starts_and_lists_a_poisoned_library(tiny_bases, tmp_path):
    import gradio as gr

    from studio.ui import build_app, concepts
    from studio.ui import generate as gen_tab
    from studio.ui.common import UIContext

    tiny = tiny_bases("tiny")
    _poisoned_library(tiny, tmp_path / "lib")
    studio = Studio(BaseSettings(base="tiny"), library=tmp_path / "lib", base=tiny)
    demo = build_app(studio, out_dir=tmp_path / "out")  # what `python app.py` builds at start-up
    assert isinstance(demo, gr.Blocks)
    ctx = UIContext.create(studio, out_dir=tmp_path / "out2")
    cards = {c["name"]: c for c in concepts.cards(ctx)}
    assert "studio.tokens" in cards["tokens-int"]["error"] and not cards["ok"]["error"]
    html = concepts.cards_html(list(cards.values()))
    assert "broken: " in html and "tokens-int" in html
    assert cards["metrics-odd"]["scores"] == {}
    # generation offers only what can be applied; the Concepts tab still lists (and can delete) the rest
    assert set(gen_tab.concept_choices(ctx)) == {"ok", "ok-lora", "metrics-odd", "base-name-int"}
    assert concepts.export_formats(ctx, "unknown-method") == ["studio"]
    assert concepts.export_formats(ctx, "junk") == ["studio"]
    concepts.delete(ctx, {"name": "tokens-int", "confirmed": True})
    assert "tokens-int" not in {c["name"] for c in concepts.cards(ctx)}
    # a broken file chosen by name anyway is refused with its reason, and the pipeline stays clean
    state = pipe_state(tiny.pipe)
    with pytest.raises(StudioError, match="studio.tokens"):
        studio.generate(GenerateConfig(prompt="a cat", steps=1, concepts=[ConceptUse("tokens-nested")]))
    assert pipe_state(tiny.pipe) == state
    image = studio.generate(GenerateConfig(prompt="a photo of <ok>", steps=1, concepts=[ConceptUse("ok")]))[0]
    assert isinstance(image, Image.Image) and pipe_state(tiny.pipe) == state


def test_cli_concepts_list_shows_broken_files_with_a_reason(tiny, tmp_path):
    _poisoned_library(tiny, tmp_path / "lib")
    res = subprocess.run([sys.executable, "-m", "studio", "concepts", "list", "--library", str(tmp_path / "lib")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:] if line.strip()}
    assert "!" not in lines["ok"] and "studio.tokens" in lines["tokens-int"].split("!", 1)[1]
    assert "!" in lines["junk"] and "!" in lines["unknown-method"]
    res = subprocess.run([sys.executable, "-m", "studio", "concepts", "list", "--json", "--library",
                          str(tmp_path / "lib")], capture_output=True, text=True, cwd=REPO, timeout=300)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["tokens-int"]["error"] and not rows["ok"]["error"]
