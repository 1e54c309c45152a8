"""Textual inversion with Cross Initialization on the tiny bases."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import TrainingError
from studio.generation import ConceptUse, GenerateConfig
from studio.methods import load_concept
from studio.service import Studio
from trainers import get_trainer
from trainers.loop import TrainControl, TrainingStopped
from trainers.runner import train
from trainers.textual_inversion import initial_vectors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(3):
        im = Image.new("RGB", (40, 40), (220, 40 + 40 * i, 40))
        im.paste((30, 30, 200), (10, 10, 30, 30))
        im.save(d / f"{i}.png")
    return d


def _cfg(images, out, **kw):
    values = dict(images=str(images), out=str(out), class_word="cat", steps=4, batch_size=2, lr=5e-2,
                  log_every=0, seed=0)
    values.update(kw)
    return get_trainer("textual-inversion").resolve(**values)


def _state(pipe):
    mods = {"unet": pipe.unet, "vae": pipe.vae, "te": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        mods["te2"] = pipe.text_encoder_2
    return {f"{m}.{k}": v.clone() for m, mod in mods.items() for k, v in mod.state_dict().items()}


@pytest.mark.parametrize("family", ["tiny", "tiny-sdxl"])
def test_only_the_new_vectors_train(tiny_bases, images, tmp_path, family):
    base = tiny_bases(family)
    before = _state(base.pipe)
    tok_len = len(base.pipe.tokenizer)
    cfg = _cfg(images, tmp_path / "c.safetensors", num_vectors=3)
    init = initial_vectors(base.pipe, cfg)
    res = train(get_trainer("textual-inversion"), cfg, base)
    after = _state(base.pipe)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert len(base.pipe.tokenizer) == tok_len
    c = load_concept(res.path)
    keys = ["emb_params"] if family == "tiny" else ["clip_l", "clip_g"]
    assert sorted(c.tensors) == sorted(keys)
    for k, v0 in zip(keys, init):
        assert c.tensors[k].shape == (3, v0.shape[1])
        assert not torch.equal(c.tensors[k], v0)  # it moved
    assert len(res.losses) == 4 and all(np.isfinite(res.losses))
    assert c.base["family"] == base.family and c.train["num_vectors"] == 3


def test_file_is_small_and_a1111_shaped(tiny, images, tmp_path):
    res = train(get_trainer("textual-inversion"), _cfg(images, tmp_path / "c.safetensors", steps=1), tiny)
    from safetensors import safe_open

    with safe_open(str(res.path), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
    # 2 vectors × 32-d × 4 bytes of tensors; the rest is metadata
    assert res.path.stat().st_size < 2 * 4096


def test_cross_init_starts_from_encoder_outputs(tiny, images):
    cfg = _cfg(images, "x.safetensors")
    v = initial_vectors(tiny.pipe, cfg)[0]
    ids = tiny.pipe.tokenizer("cat cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny.pipe.text_encoder(ids)[0][0]
    torch.testing.assert_close(v, out[1:3])
    plain = initial_vectors(tiny.pipe, _cfg(images, "x.safetensors", init="plain", num_vectors=1))[0]
    row = tiny.pipe.text_encoder.get_input_embeddings().weight[tiny.pipe.tokenizer.convert_tokens_to_ids("cat</w>")]
    torch.testing.assert_close(plain[0], row.detach())


def test_multi_token_initializer_is_explained(tiny, images):
    with pytest.raises(TrainingError, match="'teddybear' is 2 tokens"):
        initial_vectors(tiny.pipe, _cfg(images, "x.safetensors", init="plain", init_words="teddybear"))


def test_names_initialisation(tiny, images, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("Ada Lovelace\nAlan Turing\nGrace Hopper\n")
    v = initial_vectors(tiny.pipe, _cfg(images, "x.safetensors", init="names", names_file=str(names)))[0]
    assert v.shape == (2, 32) and torch.isfinite(v).all()
    assert len(tiny.pipe.tokenizer) == 49408  # the probe tokens were removed


def test_diffusers_load_textual_inversion_gives_the_same_image(images, tmp_path):
    from studio.models import load_base

    tiny = load_base("tiny", device="cpu")  # diffusers' loader resizes the embedding: use a private base
    res = train(get_trainer("textual-inversion"), _cfg(images, tmp_path / "c.safetensors", steps=2), tiny)
    studio = Studio(library=tmp_path / "lib", base=tiny)
    ours = studio.generate(GenerateConfig(prompt="a photo of <cat> on grass", steps=3, seed=5,
                                          concepts=[ConceptUse(str(res.path))]))[0]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny.pipe.components)  # a plain pipeline over the same weights
    pipe.tokenizer = __import__("copy").deepcopy(tiny.pipe.tokenizer)
    pipe.load_textual_inversion(str(res.path), token="<cat>")
    try:
        theirs = pipe(prompt="a photo of <cat> on grass", num_inference_steps=3,
                      generator=torch.Generator().manual_seed(5), guidance_scale=7.5).images[0]
    finally:
        pipe.unload_textual_inversion()
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_sdxl_concept_loads_in_diffusers_with_two_calls(images, tmp_path):
    from studio.models import load_base

    base = load_base("tiny-sdxl", device="cpu")
    res = train(get_trainer("textual-inversion"), _cfg(images, tmp_path / "c.safetensors", steps=2), base)
    studio = Studio(library=tmp_path / "lib", base=base)
    ours = studio.generate(GenerateConfig(prompt="a photo of <cat>", steps=3, seed=5,
                                          concepts=[ConceptUse(str(res.path))]))[0]
    import copy

    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    comps = dict(base.pipe.components)
    comps["tokenizer"], comps["tokenizer_2"] = copy.deepcopy(comps["tokenizer"]), copy.deepcopy(comps["tokenizer_2"])
    pipe = StableDiffusionXLPipeline(**comps)
    sd = load_file(str(res.path))
    pipe.load_textual_inversion(sd["clip_l"], token="<cat>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token="<cat>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    theirs = pipe(prompt="a photo of <cat>", num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                  guidance_scale=7.5).images[0]
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


class _StopAt(TrainControl):
    def __init__(self, step, what="cancel"):
        self.n, self.step, self.what = 0, step, what

    def poll(self):
        self.n += 1
        return self.what if self.n == self.step else None


def test_resume_between_checkpoints_is_bit_identical(tiny, images, tmp_path):
    entry = get_trainer("textual-inversion")
    full = train(entry, _cfg(images, tmp_path / "full.safetensors", steps=6), tiny)
    cfg = _cfg(images, tmp_path / "part.safetensors", steps=6, checkpoint_every=2)
    with pytest.raises(TrainingStopped) as stop:
        train(entry, cfg, tiny, control=_StopAt(3))  # dies after step 3; last checkpoint is step 2
    assert stop.value.step == 3 and not (tmp_path / "part.safetensors").exists()
    resumed = train(entry, _cfg(images, tmp_path / "part.safetensors", steps=6, checkpoint_every=2,
                                resume="latest"), tiny)
    assert torch.equal(load_concept(full.path).tensors["emb_params"], load_concept(resumed.path).tensors["emb_params"])


def test_resume_with_other_settings_is_refused(tiny, images, tmp_path):
    entry = get_trainer("textual-inversion")
    train(entry, _cfg(images, tmp_path / "a.safetensors", steps=2, checkpoint_every=1), tiny)
    with pytest.raises(TrainingError, match="other settings"):
        train(entry, _cfg(images, tmp_path / "a.safetensors", steps=4, lr=1e-3, resume="latest"), tiny)


def test_nan_guard_stops_and_names_the_last_checkpoint(tiny, images, tmp_path):
    from trainers.loop import run_training
    from trainers.textual_inversion import TextualInversionTrainer

    class Diverging(TextualInversionTrainer):
        calls = 0

        def extra_loss(self):
            self.calls += 1
            return torch.tensor(float("nan")) if self.calls == 3 else None

    cfg = _cfg(images, tmp_path / "n.safetensors", steps=6, checkpoint_every=1)
    with pytest.raises(TrainingError, match="became nan at step 3.*step-000002"):
        run_training(tiny, Diverging(tiny, cfg, "<cat>"), cfg, method="textual_inversion")
    assert not (tmp_path / "n.safetensors").exists()
    assert len(tiny.pipe.tokenizer) == 49408  # the pipeline was restored


def test_cli_train_then_generate(images, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "studio", *a], cwd=REPO, capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    res = run("train", "textual-inversion", "--base", "tiny", "--images", str(images), "--class-word", "cat",
              "--token", "<kitty>", "--steps", "2", "--batch-size", "1", "--library", str(tmp_path / "lib"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "lib" / "kitty.safetensors").is_file()
    res = run("generate", "--base", "tiny", "--prompt", "a photo of <kitty:0.7>", "--concept", "kitty",
              "--steps", "2", "--library", str(tmp_path / "lib"), "--out", str(tmp_path / "k.png"))
    assert res.returncode == 0, res.stderr
    res = run("train", "textual-inversion", "--base", "tiny", "--images", str(tmp_path / "none"),
              "--class-word", "cat", "--out", str(tmp_path / "x.safetensors"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_accelerate_two_processes_equal_one_with_double_batch(images, tmp_path):
    import os

    script = REPO / "tests" / "scripts" / "train_ti.py"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, str(script), str(images), str(tmp_path / "one.safetensors"), "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torchrun is what `accelerate launch --multi_gpu` delegates to; on CPU, accelerate 1.15's
    # `launch --cpu --num_processes 2` starts a single process unless an MPI hostfile is given.
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), str(script), str(images), str(tmp_path / "two.safetensors"), "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_concept(tmp_path / "one.safetensors").tensors["emb_params"]
    b = load_concept(tmp_path / "two.safetensors").tensors["emb_params"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert load_concept(tmp_path / "two.safetensors").train["processes"] == 2
