"""Table-driven over every registered method (rows in tests/method_cases.py)."""

import numpy as np
import pytest
import torch

from studio.generation import applied, effective_strengths
from studio.methods import get_method, method_names
from tests.conftest import render
from tests.method_cases import CASES

FAMILIES = ["tiny", "tiny-v", "tiny-sdxl"]


def test_every_method_has_a_row():
    assert set(method_names()) <= set(CASES), f"add rows to tests/method_cases.py for {set(method_names()) - set(CASES)}"


def _params(pipe):
    mods = [pipe.unet, pipe.text_encoder, pipe.vae] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return [(n, p.detach().clone()) for m in mods for n, p in m.state_dict().items()]


def _prompt(concept, strength=None):
    tok = concept.trigger if strength is None else f"{concept.trigger[:-1]}:{strength}>"
    return f"a photo of {tok} on the grass"


def _run(base, concepts, prompt):
    resolved = effective_strengths(prompt, "", [(c, None, c.name) for c in concepts])
    with applied(base, resolved) as texts:
        from studio.prompts import rewrite

        return render(base, rewrite(prompt, texts))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(CASES))
def test_apply_changes_output_and_remove_restores_base(tiny_bases, method, family):
    base = tiny_bases(family)
    before_params = _params(base.pipe)
    tok_len = len(base.pipe.tokenizer)
    plain = render(base, "a photo of cat on the grass")
    c = CASES[method](base, "<aa>", 0)
    with_concept = _run(base, [c], _prompt(c))
    assert np.abs(with_concept - plain).max() > 1e-3
    after = render(base, "a photo of cat on the grass")
    np.testing.assert_array_equal(after, plain)
    for (n, p0), (_, p1) in zip(before_params, _params(base.pipe)):
        assert torch.equal(p0, p1), n
    assert len(base.pipe.tokenizer) == tok_len


@pytest.mark.parametrize("method", sorted(CASES))
def test_apply_a_apply_b_remove_a_equals_b_alone(tiny_bases, method):
    base = tiny_bases("tiny")
    a, b = CASES[method](base, "<aa>", 1), CASES[method](base, "<bb>", 2)
    prompt = _prompt(b)
    resolved_b = effective_strengths(prompt, "", [(b, None, "b")])
    with applied(base, resolved_b) as texts:
        from studio.prompts import rewrite

        alone = render(base, rewrite(prompt, texts))
    ha = get_method(method).apply(base, a, strength=1.0)
    hb = get_method(method).apply(base, b, strength=1.0)
    ha.remove()
    from studio.prompts import rewrite

    mixed = render(base, rewrite(prompt, {b.trigger: hb.prompt_text()}))
    hb.remove()
    np.testing.assert_array_equal(mixed, alone)


@pytest.mark.parametrize("method", sorted(CASES))
def test_strength_zero_is_the_class_word_image(tiny_bases, method):
    base = tiny_bases("tiny")
    c = CASES[method](base, "<aa>", 3)
    off = _run(base, [c], _prompt(c, 0))
    np.testing.assert_array_equal(off, render(base, f"a photo of {c.class_word} on the grass"))
    full = _run(base, [c], _prompt(c, 1))
    assert np.abs(full - off).max() > 1e-3


def test_ti_strength_interpolates_from_the_class_word(tiny):
    from studio.methods.runtime import token_table
    from studio.methods.textual_inversion import class_embedding

    c = CASES["textual_inversion"](tiny, "<aa>", 4)
    table = token_table(tiny.pipe)
    start = class_embedding(table.pristine_tokenizers[0], table.original_embeddings[0], "cat")
    h = get_method("textual_inversion").apply(tiny, c, strength=0.25)
    try:
        spliced = tiny.pipe.text_encoder.get_input_embeddings().extra
        torch.testing.assert_close(spliced, start + 0.25 * (c.tensors["emb_params"] - start))
    finally:
        h.remove()


# -- the flow families (SD 3 / FLUX): TI, LoRA (and zero-shot on FLUX) apply; the rest refuse in one sentence
FLOW = ["tiny-sd3", "tiny-flux"]
FLOW_METHODS = {"textual_inversion", "lora"}  # the methods that carry over to a joint-attention transformer
FLUX_METHODS = FLOW_METHODS | {"zeroshot"}  # FLUX.1 also takes IP-Adapters (XLabs layout: tests/test_flux_ip_adapter.py)


def _flow_state(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the transformer, each text encoder (CLIP and T5) and the VAE, by name."""
    mods = {k: getattr(pipe, k, None) for k in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
                                                "vae")}
    return {f"{k}.{n}": p.detach().clone() for k, m in mods.items() if m is not None for n, p in m.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys(), sorted(before.keys() ^ after.keys())[:5]
    for n, p in before.items():
        assert torch.equal(p, after[n]), n


def _tokenizer_lengths(pipe) -> list[int]:
    return [len(t) for t in (getattr(pipe, k, None) for k in ("tokenizer", "tokenizer_2", "tokenizer_3")) if t is not None]


@pytest.mark.parametrize("family", FLOW)
@pytest.mark.parametrize("method", sorted(CASES))
def test_flow_families_apply_or_refuse_in_one_sentence(tiny_bases, method, family):
    from studio.errors import StudioError
    from studio.models.families import FAMILY_LABELS

    base = tiny_bases(family)
    before, tok_lens = _flow_state(base.pipe), _tokenizer_lengths(base.pipe)
    processors = {k: type(v) for k, v in base.pipe.transformer.attn_processors.items()}
    if method in (FLUX_METHODS if base.family == "flux" else FLOW_METHODS):
        plain = render(base, "a photo of cat on the grass")
        c = CASES[method](base, "<aa>", 0)
        assert np.abs(_run(base, [c], _prompt(c)) - plain).max() > 1e-3
        np.testing.assert_array_equal(render(base, "a photo of cat on the grass"), plain)
    else:  # its row builds on a UNet base; generation checks the method's family before anything else
        c = CASES[method](tiny_bases("tiny"), "<aa>", 0)
        with pytest.raises(StudioError) as err:
            _run(base, [c], _prompt(c))
        message = str(err.value)
        assert "\n" not in message and FAMILY_LABELS[base.family] in message and base.name in message, message
        assert "cross-attention" in message, message  # the family sentence, not an incidental mismatch
    _assert_same_state(before, _flow_state(base.pipe))
    assert _tokenizer_lengths(base.pipe) == tok_lens
    assert {k: type(v) for k, v in base.pipe.transformer.attn_processors.items()} == processors
