"""A minimal, honest textual inversion — the harness's validation tool and negative control.

One ``(1, D)`` embedding ``e`` is spliced into the text encoder's input at the placeholder's
position (forward hooks on the token-embedding module; no row is added to the matrix, nothing
else changes) and optimised with Adam on the diffusion loss

    L = ‖y − ŷ(z_t, t, TE(prompt with e))‖²,   z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε,

(y = ε, or v = √ᾱ_t ε − √(1 − ᾱ_t) z_0 when the base's scheduler predicts v)

over the cached VAE posteriors of the training photos and a few "a photo of a <hrt> circle"
templates. ``e`` starts at the class word's embedding, so ``lr_scale = 0`` is exactly the class
word — the negative control.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.world.score import pipeline_generator
from tests.learning.harness import Trained, base_pipeline

PLACEHOLDER = "<hrt>"
TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a rendering of a {}", "a {}")


@contextlib.contextmanager
def spliced(text_encoder, token_id: int, vector: torch.Tensor) -> Iterator[None]:
    """Within the block, input id ``token_id`` embeds as ``vector`` ``(D,)`` (differentiable)."""
    embedding = text_encoder.get_input_embeddings()
    state: dict[str, torch.Tensor] = {}

    def pre(module, args):
        ids = args[0]
        state["mask"] = ids == token_id
        return (ids.masked_fill(state["mask"], 0),)

    def post(module, args, out):
        return torch.where(state["mask"][..., None], vector.to(out.dtype), out)

    handles = [embedding.register_forward_pre_hook(pre), embedding.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _load_images(images_dir: Path) -> torch.Tensor:
    paths = sorted(Path(images_dir).glob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((32, 32)), dtype=np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_mini_ti(
    images_dir: Path,
    seed: int,
    lr_scale: float = 1.0,
    class_word: str = "circle",
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 2e-2,
) -> Trained:
    """Textual inversion of one vector on the images in ``images_dir``; see the module doc."""
    from diffusers import DDPMScheduler

    pipe = base_pipeline()
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tokenizer = copy.deepcopy(tokenizer)  # the pipeline's own tokenizer stays untouched
    tokenizer.add_tokens([PLACEHOLDER])
    token_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)  # 49408: outside the embedding matrix
    gen = torch.Generator().manual_seed(seed)

    def ids_of(prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(
            list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    with torch.no_grad():
        init = text_encoder.get_input_embeddings().weight[tokenizer(class_word, add_special_tokens=False).input_ids[0]]
        posterior = vae.encode(_load_images(images_dir)).latent_dist
    vector = torch.nn.Parameter(init.detach().clone())
    optimizer = torch.optim.Adam([vector], lr=lr * lr_scale)
    subject = f"{PLACEHOLDER} {class_word}"
    template_ids = ids_of([t.format(subject) for t in TEMPLATES])
    sf = vae.config.scaling_factor
    n = posterior.mean.shape[0]

    for p in list(text_encoder.parameters()) + list(unet.parameters()):
        p.requires_grad_(False)
    for _ in range(steps):
        pick = torch.randint(0, n, (batch_size,), generator=gen)
        z0 = (posterior.mean[pick] + posterior.std[pick] * torch.randn(posterior.mean[pick].shape, generator=gen)) * sf
        ids = template_ids[torch.randint(0, len(TEMPLATES), (batch_size,), generator=gen)]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        with spliced(text_encoder, token_id, vector):
            prompt_embeds = text_encoder(ids)[0]
        pred = unet(scheduler.add_noise(z0, noise, t), t, prompt_embeds).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    learned = vector.detach().clone()

    def encode(prompts: list[str]) -> torch.Tensor:
        with spliced(text_encoder, token_id, learned):
            return text_encoder(ids_of(prompts))[0]

    return Trained(subject=subject, generate=pipeline_generator(pipe, encode=encode))
