"""DECOR (studio/methods/decor.py): the projection, its settings, and generation / evaluation with it on
the tiny SD 1 and SDXL bases.

:func:`with_decor` wraps a learning-harness generator so that a bench can score the same trained concept
with and without DECOR (``studio evaluate --decor-words …`` does the same through the studio)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import StudioError
from studio.evaluation import EvaluateConfig, render_images
from studio.generation import GenerateConfig, generate, png_info
from studio.methods.attention import store_of
from studio.methods.decor import (
    Projector,
    build_projector,
    check_settings,
    decor_applied,
    project,
    prompt_states,
    span_basis,
)
from tests.method_cases import make_lora, make_ti

BASES = ["tiny", "tiny-sdxl"]


def with_decor(generate, pipe, words, strength: float = 1.0, *, guided: bool = True):
    """A harness generator ``(prompts, seed) -> images`` (:class:`tests.learning.harness.Trained`'s
    ``generate``) that renders with DECOR on ``pipe``: the words' directions projected out with strength
    ``strength`` (``guided``: the generator uses classifier-free guidance, as the world's does). The words are
    encoded before ``generate`` applies its concept, i.e. by the base's text encoder(s)."""

    def run(prompts, seed):
        with decor_applied(pipe, words, strength, guided=guided):
            return generate(prompts, seed)

    return run


# -- the projection ---------------------------------------------------------------------------------
def test_projection_math():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g)
    rows = torch.randn(2, 16, generator=g)
    rows = torch.cat([rows, rows[:1] * 3 + rows[1:] * 0.5])  # 3 rows of rank 2
    v = span_basis(rows)
    assert v.shape == (16, 2)
    assert torch.allclose(v.T @ v, torch.eye(2, dtype=v.dtype), atol=1e-10)
    assert project(x, v, 0.0) is x  # α = 0: the same tensor
    full = project(x, v, 1.0)
    assert torch.equal(full[:, 0], x[:, 0])  # the start row is kept
    assert (full[:, 1:] @ v.float()).abs().max() < 1e-5  # orthogonal to every named row's direction
    assert (full[:, 1:] @ rows.T).abs().max() < 1e-4
    half = project(x, v, 0.5)
    assert torch.allclose(half[:, 1:] @ v.float(), 0.5 * (x[:, 1:] @ v.float()), atol=1e-5)
    # what is orthogonal to the words is untouched
    ortho = x[:, 1:] - (x[:, 1:] @ v.float()) @ v.float().T
    assert torch.allclose(full[:, 1:], ortho, atol=1e-6)
    assert full.shape == x.shape and full.dtype == x.dtype


def test_settings_are_checked_and_split():
    assert check_settings([], 1.0) == []
    assert check_settings(["hat, red", " sky "], 0.5) == ["hat", "red", "sky"]
    assert check_settings("hat, red", 1) == ["hat", "red"]
    with pytest.raises(StudioError, match="empty entry"):
        check_settings(["hat", "  "], 1.0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(StudioError, match="between 0 and 1"):
            check_settings(["hat"], bad)
    cfg = GenerateConfig(prompt="a cat", decor_words=["hat, red"], decor_strength=0.5)
    assert cfg.decor_words == ["hat", "red"]
    with pytest.raises(StudioError, match="decor_strength"):
        GenerateConfig(prompt="a cat", decor_words=["hat"], decor_strength=2.0)
    with pytest.raises(StudioError, match="empty entry"):
        EvaluateConfig(decor_words=[""])


@pytest.mark.parametrize("name", BASES)
def test_projected_embeddings_are_orthogonal_to_the_words(tiny_bases, name):
    base = tiny_bases(name)
    proj = build_projector(base.pipe, ["red hat", "sky"], 1.0)
    assert len(proj.bases) == (2 if name == "tiny-sdxl" else 1)
    assert (proj.pooled is not None) == (name == "tiny-sdxl")
    states, pooled = prompt_states(base.pipe, ["a photo of a cat with a red hat under the sky"])
    ctx = torch.cat(states, dim=-1)
    out = proj.apply(ctx)
    assert torch.equal(out[:, 0], ctx[:, 0])
    lo = 0
    for width, basis in zip(proj.widths, proj.bases):
        assert 3 <= basis.shape[1] <= width // 2  # "red", "hat", "sky": at least three directions
        before = ctx[0, 1:, lo:lo + width] @ basis.float()
        after = out[0, 1:, lo:lo + width] @ basis.float()
        assert before.abs().max() > 1e-2 and after.abs().max() < 1e-4 * before.abs().max() + 1e-5
        lo += width
    if pooled is not None:
        assert proj.pooled is not None
        assert (proj.apply_pooled(pooled) @ proj.pooled.float()).abs().max() < 1e-4
    # α = 0.5 removes half of each named component
    half = Projector(proj.words, 0.5, proj.bases, proj.pooled, proj.widths).apply(ctx)
    assert torch.allclose(half[0, 1:, :proj.widths[0]] @ proj.bases[0].float(),
                          0.5 * (ctx[0, 1:, :proj.widths[0]] @ proj.bases[0].float()), atol=1e-5)


def test_too_many_words_are_refused(tiny):
    words = [w for w in "red green blue hat sky tree house river car dog bird boat chair lamp cup road moon".split()]
    with pytest.raises(StudioError, match="name fewer words"):
        build_projector(tiny.pipe, words, 1.0)


# -- the hook is the projection of the embeddings ---------------------------------------------------
@pytest.mark.parametrize("name", BASES)
def test_hook_equals_projecting_the_prompt_embeddings(tiny_bases, name):
    """Rendering inside :func:`decor_applied` gives the pixels of the pipeline fed the projected prompt
    embeddings (and pooled vector) directly, negative embeddings untouched."""
    base = tiny_bases(name)
    pipe, prompt, words = base.pipe, "a photo of a cat with a red hat", ["red hat"]
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", height=base.native_size,
              width=base.native_size)
    with torch.no_grad():
        enc = pipe.encode_prompt(prompt=prompt, device=base.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=True)
    proj = build_projector(pipe, words, 1.0)
    fed = dict(prompt_embeds=proj.apply(enc[0]), negative_prompt_embeds=enc[1])
    if name == "tiny-sdxl":
        fed |= dict(pooled_prompt_embeds=proj.apply_pooled(enc[2]), negative_pooled_prompt_embeds=enc[3])
    expected = pipe(generator=torch.Generator().manual_seed(0), **fed, **kw).images[0]
    with decor_applied(pipe, words, 1.0, guided=True) as got_proj:
        assert got_proj is not None
        got = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kw).images[0]
    plain = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert store_of(pipe.unet) is None  # the hook and the processors are gone
    assert np.abs(got - expected).max() < 2e-4
    assert np.abs(got - plain).max() > 1e-3  # DECOR changed the image


# -- generation, evaluation -------------------------------------------------------------------------
@pytest.mark.parametrize("name", BASES)
def test_strength_zero_and_no_words_are_bit_identical_to_none(tiny_bases, name):
    base = tiny_bases(name)
    plain = np.asarray(generate(base, GenerateConfig(prompt="a photo of a cat", steps=2))[0])
    for words, strength in ((["hat"], 0.0), ([], 1.0)):
        img = generate(base, GenerateConfig(prompt="a photo of a cat", steps=2, decor_words=words,
                                            decor_strength=strength))[0]
        assert np.array_equal(np.asarray(img), plain)
        assert "DECOR" not in img.info["parameters"]


@pytest.mark.parametrize("name", BASES)
def test_generation_is_deterministic_and_its_png_records_decor(tiny_bases, name, tmp_path):
    base = tiny_bases(name)
    cfg = GenerateConfig(prompt="a photo of a cat, red hat", steps=2, decor_words=["red hat", "sky"],
                         decor_strength=0.7, seed=3)
    a, b = generate(base, cfg)[0], generate(base, cfg)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    plain = generate(base, GenerateConfig(prompt="a photo of a cat, red hat", steps=2, seed=3))[0]
    assert not np.array_equal(np.asarray(a), np.asarray(plain))
    buf = io.BytesIO()
    a.save(buf, format="PNG", pnginfo=png_info(a))
    saved = Image.open(io.BytesIO(buf.getvalue()))
    assert 'DECOR words: "red hat, sky", DECOR strength: 0.7' in saved.info["parameters"]
    request = json.loads(saved.info["studio"])
    assert request["decor_words"] == ["red hat", "sky"] and request["decor_strength"] == 0.7
    # the recorded request reproduces the image
    fields = {k: v for k, v in request.items() if k in GenerateConfig.__dataclass_fields__}
    again = generate(base, GenerateConfig(**fields))[0]
    assert np.array_equal(np.asarray(again), np.asarray(a))
    assert store_of(base.pipe.unet) is None


@pytest.mark.parametrize("maker", [make_ti, make_lora])
def test_decor_composes_with_concepts_and_names_triggers(tiny, maker):
    """With a concept applied; a named trigger is rewritten to its prompt text; the base is clean after."""
    concept = maker(tiny, "<thing>", 0)
    uses = [(concept, None, "thing")]
    prompt = "a photo of <thing> on a red sofa"
    plain = np.asarray(generate(tiny, GenerateConfig(prompt=prompt, steps=2), uses)[0])
    img = generate(tiny, GenerateConfig(prompt=prompt, steps=2, decor_words=["red sofa"]), uses)[0]
    assert not np.array_equal(np.asarray(img), plain)
    named = generate(tiny, GenerateConfig(prompt=prompt, steps=2, decor_words=["<thing>"]), uses)[0]
    assert not np.array_equal(np.asarray(named), plain)
    with pytest.raises(StudioError, match="Unknown token <other>"):
        generate(tiny, GenerateConfig(prompt=prompt, steps=2, decor_words=["<other>"]), uses)
    assert store_of(tiny.pipe.unet) is None
    assert np.array_equal(np.asarray(generate(tiny, GenerateConfig(prompt=prompt, steps=2), uses)[0]), plain)


def test_evaluation_renders_with_decor(tiny):
    kw = dict(seeds=2, steps=2, guidance=5.0, batch_size=2)
    plain = render_images(tiny, [], ["a photo of a cat", "a red hat"], **kw)
    got = render_images(tiny, [], ["a photo of a cat", "a red hat"], decor_words=["red hat"], decor_strength=1.0, **kw)
    for prompt in plain:
        assert not np.array_equal(np.asarray(got[prompt][0]), np.asarray(plain[prompt][0]))
        assert "DECOR words" in got[prompt][0].info["parameters"]
        assert json.loads(got[prompt][0].info["studio"])["decor_words"] == ["red hat"]
    # one image of a batch equals the same image rendered alone
    alone = render_images(tiny, [], ["a red hat"], decor_words=["red hat"], decor_strength=1.0,
                          **(kw | {"seeds": 1, "batch_size": 1}))
    assert np.abs(np.asarray(alone["a red hat"][0], dtype=int) - np.asarray(got["a red hat"][0], dtype=int)).max() <= 1
    assert store_of(tiny.pipe.unet) is None
