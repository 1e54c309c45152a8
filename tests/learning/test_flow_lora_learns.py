"""A FLUX LoRA learns in the flow-matching setting (tiny-flux, random weights, CPU).

Teacher: tiny-flux plus a fixed random rank-4 delta on the LoRA's own target modules (so the student
can represent it exactly). Its samples of "a photo of sks dog" are the training photos. The studio's
DreamBooth-LoRA trainer (prior preservation off, transformer only) must lower the flow-matching loss
of those photos on **held-out** noises and noise levels (16 fixed (ε, σ) pairs, σ on a grid, never
drawn in training) by the stated margin; the lr-0 control leaves it exactly where it was.

Measured (README, "SD 3 and FLUX"): 30 steps at lr 2e-3 → held-out loss ratio 0.954; lr 0 → 1.000.
The distance of the student's velocity to the *teacher's* on the same inputs did not shrink (ratio
1.90): fitting six samples does not recover the teacher's whole field, so it is not the bar here.
"""

from __future__ import annotations

import pytest
import torch

from studio.concept import Concept
from studio.methods.lora import LoRA
from studio.methods.lora.flow_keys import FLOW_PREFIX, default_targets
from studio.methods.lora.keys import LoraModule, _io, base_modules, kohya_tensors
from studio.models import load_base
from trainers import get_trainer
from trainers.data import load_image_folder
from trainers.flow import FlowFit, encode_flow_prompts
from trainers.latents import encode_examples
from trainers.precision import Precision
from trainers.runner import train

pytestmark = pytest.mark.learning
PROMPT = "a photo of sks dog"
MARGIN = 0.97  # trained: held-out loss below 97 % of the base's (measured 0.954)


def _teacher(base, rank: int = 4) -> Concept:
    mods = base_modules(base.pipe)
    targets = [t.replace(".", "_") for t in default_targets(base.family)]
    g = torch.Generator().manual_seed(123)
    chosen = {n: _io(m) for n, m in mods.items()
              if n.startswith(FLOW_PREFIX) and _io(m) and any(n.endswith("_" + t) for t in targets)}
    modules = {n: LoraModule(torch.randn(rank, i, generator=g) / i ** 0.5, torch.randn(o, rank, generator=g) * 0.5,
                             float(rank)) for n, (i, o) in chosen.items()}
    return Concept(method="lora", tokens=["<sks>"], tensors=kohya_tensors(modules), class_word="dog")


def test_flux_lora_fits_held_out_noises_and_lr0_does_not(tmp_path):
    torch.set_num_threads(2)
    photos = tmp_path / "photos"
    photos.mkdir()
    base = load_base("tiny-flux", device="cpu")
    handle = LoRA().apply(base, _teacher(base), strength=1.0)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    for i, im in enumerate(base.pipe(prompt=[PROMPT] * 6, num_inference_steps=8, generator=gens,
                                     output_type="pil").images):
        im.save(photos / f"{i}.png")
    handle.remove()
    # held-out (x₀, ε, σ): fixed, never drawn by training
    g = torch.Generator().manual_seed(999)
    examples = load_image_folder(str(photos), base.native_size)
    cache = encode_examples(base.pipe.vae, examples, torch.device("cpu"), torch.float32)
    n = 16
    idx = torch.arange(n) % len(examples)
    x0 = cache.sample(idx, torch.zeros(n, dtype=torch.long), torch.randn((n, *cache.shape(0)), generator=g))
    eps = torch.randn(x0.shape, generator=g)
    sigma = (torch.arange(n) + 0.5) / n
    fit = FlowFit.for_base(base, object(), Precision.for_run("no", torch.device("cpu")))

    @torch.no_grad()
    def held_out() -> float:
        cond = encode_flow_prompts(base.pipe, [PROMPT] * n, torch.device("cpu"))
        s = sigma.view(-1, 1, 1, 1)
        v = fit.predict((1 - s) * x0 + s * eps, sigma, cond)
        return float(((v - (eps - x0)) ** 2).mean())

    start = held_out()
    entry = get_trainer("dreambooth")
    ratios = {}
    for lr in (2e-3, 0.0):
        cfg = entry.resolve(images=str(photos), out=str(tmp_path / f"s{lr}.safetensors"), class_word="dog",
                            steps=30, lr=lr, log_every=0, seed=0, prior_preservation=False,
                            train_text_encoder=False, rank=4, batch_size=2, flip=False,
                            use_templates=False)  # this world's one prompt
        result = train(entry, cfg, base)
        applied = LoRA().apply(base, result.concept, strength=1.0)
        ratios[lr] = held_out() / start
        applied.remove()
    assert ratios[2e-3] < MARGIN, ratios
    assert abs(ratios[0.0] - 1.0) < 1e-6, ratios
