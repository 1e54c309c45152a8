"""A short training run is a function of its settings and its seed (docs/architecture.md, "Training":
one seeded generator draws every random number): the same seed gives the same losses and the same
concept bit for bit, another seed does not. And the loop's per-step shortcuts (trainers/loop.py) give
what the plain path gives: prompts tokenized once (:class:`trainers.conditioning.TokenCache`), the
weights' NaN/inf guard in one reduction (``_all_finite``)."""

from __future__ import annotations

import math

import pytest
import torch

from studio.errors import TrainingError
from studio.models.tiny import load_clip_tokenizer
from tests.helpers import write_square_photos
from trainers import get_trainer
from trainers.conditioning import TokenCache, encode_prompts, tokenize
from trainers.loop import _all_finite, run_training
from trainers.runner import train
from trainers.textual_inversion import TextualInversionTrainer

# name → (trainer, settings): the bench's two tasks (bench/compare_examples.py) and the variants whose
# per-step path differs (Cross Initialization's regulariser; a trained text encoder, tokenized each step)
CASES = {
    "ti": ("textual-inversion", dict(token="<cat-toy>", init="plain", init_words="toy", num_vectors=1,
                                     reg_weight=0.0, lr=5e-2)),
    "ti-cross": ("textual-inversion", dict(token="<cat-toy>", init="cross", num_vectors=2, reg_weight=1e-2,
                                           lr=2e-2)),
    "lora": ("dreambooth", dict(token="sks", rank=4, train_text_encoder=False, prior_preservation=False, lr=1e-2)),
    "lora-te": ("dreambooth", dict(token="sks", rank=4, train_text_encoder=True, prior_preservation=False,
                                   lr=1e-2)),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_square_photos(tmp_path_factory.mktemp("photos"), n=3)


def _cfg(case: str, photos, out, seed: int):
    name, settings = CASES[case]
    return get_trainer(name).resolve(**dict(images=str(photos), out=str(out), class_word="toy", steps=5,
                                            batch_size=2, resolution=32, seed=seed, probe=False, log_every=0,
                                            **settings))


def _run(base, case: str, photos, out, seed: int = 0):
    res = train(get_trainer(CASES[case][0]), _cfg(case, photos, out, seed), base)
    return res.losses, res.concept.tensors


@pytest.mark.parametrize("base_name", ["tiny", "demo"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_same_seed_trains_the_same_concept_bit_for_bit(tiny_bases, photos, tmp_path, base_name, case):
    base = tiny_bases(base_name)
    losses, tensors = _run(base, case, photos, tmp_path / "a.safetensors")
    again, tensors_again = _run(base, case, photos, tmp_path / "b.safetensors")
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert again == losses
    assert tensors.keys() == tensors_again.keys()
    for key in tensors:
        assert torch.equal(tensors[key], tensors_again[key]), key
    other, tensors_other = _run(base, case, photos, tmp_path / "c.safetensors", seed=1)
    assert other != losses  # the seed matters: equal runs above are not a constant output
    assert any(not torch.equal(tensors[k], tensors_other[k]) for k in tensors)


def test_tokenizing_once_trains_what_tokenizing_every_step_trains(tiny_bases, photos, tmp_path):
    """Textual inversion's prompts through the token cache and through the tokenizer every step."""

    class EveryStep(TextualInversionTrainer):
        def conditioning(self, prompts, resolution):
            return encode_prompts(self.base.pipe, prompts, resolution=resolution, device=self.base.device)

    base = tiny_bases("demo")
    cfg = _cfg("ti-cross", photos, tmp_path / "a.safetensors", 0)
    cached = run_training(base, TextualInversionTrainer(base, cfg, "<cat-toy>"), cfg, method="textual_inversion",
                          save=False)
    plain = run_training(base, EveryStep(base, cfg, "<cat-toy>"), cfg, method="textual_inversion", save=False)
    assert cached.losses == plain.losses
    assert torch.equal(cached.concept.tensors["emb_params"], plain.concept.tensors["emb_params"])


def test_token_cache_gives_the_tokenizers_ids_and_follows_added_tokens():
    tok, cache, device = load_clip_tokenizer(), TokenCache(), torch.device("cpu")
    prompts = ["a photo of a <new-thing>", "a toy", "a photo of a <new-thing>"]
    assert torch.equal(cache(tok, prompts, device), tokenize(tok, prompts, device))
    tok.add_tokens(["<new-thing>"])  # the same prompt now reads the new token: no stale ids
    ids = cache(tok, prompts, device)
    assert torch.equal(ids, tokenize(tok, prompts, device))
    assert int(tok.convert_tokens_to_ids("<new-thing>")) in ids[0].tolist()


def test_all_finite_sees_one_bad_value_among_many_tensors():
    good = [torch.randn(4, 8) for _ in range(40)] + [torch.zeros(0), torch.arange(5), torch.randn(3, dtype=torch.bfloat16)]
    assert _all_finite(good) and _all_finite([]) and _all_finite([torch.arange(3)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 17, 39):
            tensors = [t.clone() for t in good]
            tensors[where][2, 3] = bad
            assert not _all_finite(tensors), (bad, where)
        low = [t.clone() for t in good]
        low[-1][1] = bad
        assert not _all_finite(low), bad


def test_the_weights_guard_stops_at_the_step_that_made_one_lora_value_nan(tiny_bases, photos, tmp_path):
    base = tiny_bases("tiny")
    cfg = _cfg("lora", photos, tmp_path / "n.safetensors", 0)
    trainer = get_trainer("dreambooth").make_trainer(base, cfg, "sks")
    last = list(trainer.trainable().values())[-1]
    calls = []

    def poison(grad: torch.Tensor) -> torch.Tensor:  # a NaN gradient at step 3 makes AdamW's update NaN
        calls.append(1)
        return torch.full_like(grad, float("nan")) if len(calls) == 3 else grad

    last.register_hook(poison)
    with pytest.raises(TrainingError, match="weights became NaN/inf at step 3"):
        run_training(base, trainer, cfg, method="lora")
    assert not (tmp_path / "n.safetensors").exists()
