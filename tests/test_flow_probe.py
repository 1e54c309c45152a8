"""The probe on SD 3 / FLUX bases (trainers/probe.py with trainers/flow.py): its held-out loss is the
flow-matching objective of training at fixed noise levels σ; the verdict and ``--budget auto`` run on
DreamBooth-LoRA and textual inversion, deterministically, and an lr-0 run is "not learned"."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import write_square_photos
from trainers import get_trainer
from trainers.flow import FlowFit, loss_weights
from trainers.runner import train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_square_photos(tmp_path_factory.mktemp("flow-probe-imgs"))


def _config(method: str, images, tmp_path, **overrides):
    entry = get_trainer(method)
    extra = dict(num_class_images=2, class_steps=1, class_batch_size=2, class_cache_dir=str(tmp_path / "cc")) \
        if method == "dreambooth" else dict(batch_size=2)
    return entry, entry.resolve(images=str(images), class_word="dog", log_every=0, seed=0, **(extra | overrides))


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_the_probe_measures_the_flow_objective_at_fixed_sigmas(tiny_bases, images, tmp_path, name):
    from diffusers import DDPMScheduler

    from trainers.latents import encode_examples
    from trainers.loop import _templates, load_training_images
    from trainers.precision import Precision
    from trainers.probe import DenoisingProbe

    base = tiny_bases(name)
    entry, cfg = _config("textual-inversion", images, tmp_path, steps=1, init="plain")
    examples = load_training_images(cfg, base)
    fit = FlowFit.for_base(base, cfg, Precision.for_run("no", base.device))
    trainer = entry.make_trainer(base, cfg, "<dog-x>")
    try:
        cache = encode_examples(base.pipe.vae, examples, base.device, base.pipe.vae.dtype)
        probe = DenoisingProbe(base.pipe, cache, DDPMScheduler(), examples, _templates(cfg.templates),
                               class_text="dog", resolution=base.native_size, seed=0, flow=fit)
        s = probe.samples
        # the σ of each row: the training density (SD 3: shifted by 3) at the row's stratified draw — increasing
        assert probe.sigmas is not None and torch.equal(probe.sigmas, fit.sigmas(s.timesteps))
        sigmas = probe.sigmas.tolist()
        assert sigmas == sorted(set(sigmas)) and sigmas[-1] - sigmas[0] > 0.6
        measured = probe.loss(trainer)
        assert probe.loss(trainer) == measured  # fixed samples: the same number every time
        # the same number from the objective written out: w(σ)·‖v̂(x_σ) − (ε − x₀)‖², x_σ = (1 − σ)x₀ + σε
        total = 0.0
        with torch.no_grad():
            for rows in s.groups:
                sl = torch.tensor(rows)
                x0 = cache.sample(s.idx[sl], s.flips[sl], torch.stack([s.eps_lat[r] for r in rows]))
                eps = torch.stack([s.noise[r] for r in rows])
                sigma = probe.sigmas[sl].view(-1, 1, 1, 1)
                prompts = trainer.prompts([s.templates[r] for r in rows], [examples[int(i)] for i in s.idx[sl]])
                pred = fit.predict((1 - sigma) * x0 + sigma * eps, probe.sigmas[sl], trainer.conditioning(prompts, base.native_size))
                per = ((pred - (eps - x0)) ** 2).mean(dim=(1, 2, 3)) * loss_weights(probe.sigmas[sl], fit.weighting)
                total += float(per.sum())
        assert measured == pytest.approx(total / len(s.timesteps), rel=1e-5)
        assert fit.weighting == ("precondition" if name == "tiny-sd3" else "none")
    finally:
        trainer.teardown()


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
@pytest.mark.parametrize("method", ["dreambooth", "textual-inversion"])
def test_verdict_and_auto_budget_on_flow_bases(tiny_bases, images, tmp_path, name, method):
    """lr 0: the gain never moves from its start, the verdict is "not learned" and the auto budget runs to the
    cap; a second run measures the very same curve."""
    base = tiny_bases(name)
    runs = []
    for k in range(2):
        entry, cfg = _config(method, images, tmp_path, out=str(tmp_path / f"c{k}.safetensors"), steps=4, lr=0.0,
                             budget="auto", probe_every=2)
        runs.append(train(entry, cfg, base))
    v = runs[0].concept.metrics["verdict"]
    assert v["verdict"] == "not learned" and v["gain"] == v["gain_start"]
    assert v["budget"]["curve"] == [[2, v["gain"]], [4, v["gain"]]] and runs[0].steps == 4
    assert runs[1].concept.metrics["verdict"] == v  # deterministic


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_the_gain_rises_when_textual_inversion_learns(tiny_bases, images, tmp_path, name):
    """The control of the lr-0 test: the same probe sees training move the concept's loss below the class's."""
    entry, cfg = _config("textual-inversion", images, tmp_path, out=str(tmp_path / "c.safetensors"), steps=6,
                         lr=0.1, budget="auto", probe_every=2)
    v = train(entry, cfg, tiny_bases(name)).concept.metrics["verdict"]
    gains = [g for _, g in v["budget"]["curve"]]
    assert v["gain"] - v["gain_start"] > 0.005 and gains == sorted(gains)
