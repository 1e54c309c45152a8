"""Build the studio's learnable test world: a Stable Diffusion base model and an oracle.

    python scripts/build_world.py                      # full build into studio/assets/world/
    python scripts/build_world.py --variant world-b    # the second base, into studio/assets/world_b/
    python scripts/build_world.py --variant world-scene  # scenes (a shape in a frame), into studio/assets/world_scene/
    python scripts/build_world.py --out /tmp/w --set unet_steps=300 --set n_images=4000

Two variants share the world (renderer, grammar, concept, oracle) and differ in everything a base
can differ in: ``world`` is 32-px images, a 4×8×8 latent (VAE ÷4… ÷8 stack of three blocks), the
real 49,408-token CLIP vocabulary, a 64-wide 2-layer text encoder and a three-level UNet;
``world-b`` is 48-px images, a 4×12×12 latent (VAE ÷4), a small BPE vocabulary learnt from the
world's captions, a 96-wide 3-layer text encoder and a two-level UNet with attention at every
level. ``world-b`` reuses the world's oracle (reading its images box-resized to 32 px) and records
the oracle's accuracy on its renders and VAE reconstructions.

``world-scene`` is world-b's shape of model trained on *scenes* (:mod:`studio.world.scene`): the
world's 32-px render in the centre of a 48-px picture whose outer band is a frame or the background,
captions such as "a purple dotted circle on a pink background in an orange striped frame". Two
concepts are left out of its data (``SCENE_TASK``: the purple dotted circle and a yellow dotted
frame). Its VAE is world-b's fine-tuned on scenes (world-b's alone blurs frames); it reads the
interior with the world's oracle and trains a small scene oracle (frame, frame colour and pattern,
background, is there a shape) saved as ``scene_oracle.safetensors``.

Steps (each seeded, single-threaded data generation, printed with its time):

1. render the base model's training set (every purple dotted circle left out — the concept);
2. train the VAE (AutoencoderKL, 32×32 RGB ↔ 4×8×8 latents) and cache the latents;
3. train the oracle on renders and on their VAE reconstructions;
4. train the CLIP text encoder (real 49,408-token BPE vocabulary) and the UNet jointly on
   captions from the world's grammar, with 10 % empty captions for classifier-free guidance;
5. save the diffusers folder ``base/`` and ``oracle.safetensors``, with this script's sha256 and
   settings in ``world_build.json`` and in every safetensors header;
6. verify: oracle accuracy on held-out renders, the base model's vocabulary accuracy, the
   concept's baseline and upper bound.

Same script, same settings, same machine → same weights (``torch.use_deterministic_algorithms``,
fixed thread count, explicit generators).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.world.oracle import Oracle  # noqa: E402
from studio.world.render import (  # noqa: E402
    VOCABULARY,
    Attributes,
    caption,
    describe,
    render,
    sample_attributes,
)
from studio.world.task import CONCEPT  # noqa: E402

TOKENIZER_DIR = ROOT / "studio" / "assets" / "clip_tokenizer"
DEFAULT_OUT = ROOT / "studio" / "assets" / "world"
WORLD_ORACLE = DEFAULT_OUT / "oracle.safetensors"

VARIANTS: dict[str, tuple[Path, dict[str, object]]] = {
    "world": (DEFAULT_OUT, {}),
    # The second learnable base: nothing of its shape is the world's (see the module docstring).
    "world-b": (ROOT / "studio" / "assets" / "world_b", {
        "resolution": 48, "tokenizer": "small", "oracle_from": str(WORLD_ORACLE), "store_fp16": "all",
        "vae_channels": (16, 32, 32), "vae_steps": 2500,
        "text_width": 96, "text_layers": 3, "text_heads": 4, "text_ff": 192,
        "unet_channels": (32, 64), "unet_plain_levels": 0, "unet_heads": 2,
        "unet_steps": 4000, "unet_batch": 64,
    }),
    # Scenes (a shape in a frame) for multi-concept methods: world-b's shape of model, world-b's VAE
    # fine-tuned on scenes, the world's oracle on the interior and a scene oracle on the whole picture.
    "world-scene": (ROOT / "studio" / "assets" / "world_scene", {
        "world": "scene", "resolution": 48, "tokenizer": "small", "oracle_from": str(WORLD_ORACLE),
        "store_fp16": "all",
        "vae_channels": (16, 32, 32), "vae_from": str(ROOT / "studio" / "assets" / "world_b" / "base" / "vae"),
        "vae_ref_pixel": 8, "vae_steps": 1500, "vae_lr": 1e-3,
        "text_width": 96, "text_layers": 3, "text_heads": 4, "text_ff": 192,
        "unet_channels": (32, 64), "unet_plain_levels": 0, "unet_heads": 2,
        "unet_steps": 3000, "unet_batch": 64,
        "oracle_width": 12, "oracle_images": 12_000, "oracle_steps": 1500,
        # one thread: built on a machine shared with other work, where two threads ran 7× slower
        "threads": 1,
    }),
}


@dataclass
class Settings:
    """Every knob of the build; all of it is recorded in the weights' metadata."""

    seed: int = 0
    world: str = "world"  # "world": one centred shape; "scene": a shape in a frame (studio.world.scene)
    resolution: int = 32  # image side in pixels
    tokenizer: str = "clip"  # "clip": the committed CLIP vocabulary; "small": a BPE learnt from captions
    small_vocab_merges: int = 400  # upper bound on merges of the "small" vocabulary
    oracle_from: str = ""  # reuse this oracle file instead of training one (step 3)
    store_fp16: str = "token_embedding"  # which weights are stored in fp16: "token_embedding" | "all"
    # Fixed so that float reductions, hence weights, are reproducible. Two threads (the CI
    # machine's cores) build in ≈ 35 min; on a machine shared with other work use --set threads=1.
    threads: int = 2
    # data
    n_images: int = 40_000  # base training renders (the concept excluded)
    caption_p_drop: float = 0.25  # each attribute unsaid with this probability
    p_empty_caption: float = 0.1  # classifier-free guidance dropout
    # VAE: 32×32×3 ↔ 8×8×4
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 1e-6
    vae_from: str = ""  # fine-tune this diffusers VAE folder instead of training one from scratch
    vae_ref_pixel: int = 0  # the loss weights pixels unlike this (diagonal) pixel, the background, 5×
    # text encoder (CLIP, real vocabulary) + UNet
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 256
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_plain_levels: int = 1  # deepest levels without cross-attention
    unet_heads: int = 2
    unet_steps: int = 4000
    unet_batch: int = 96
    unet_lr: float = 1e-3
    unet_warmup: int = 200
    snr_gamma: float = 5.0  # Min-SNR loss weighting
    ema_decay: float = 0.999
    # oracle
    oracle_images: int = 24_000
    oracle_width: int = 16
    oracle_steps: int = 1500
    oracle_batch: int = 64
    oracle_lr: float = 2e-3
    # verification
    verify_images: int = 240


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.t0 = time.time()

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.start = time.time()
                print(f"[{time.time() - timer.t0:7.1f}s] {name} …", flush=True)

            def __exit__(self, *exc):
                timer.times[name] = round(time.time() - self.start, 1)
                print(f"[{time.time() - timer.t0:7.1f}s] {name} done in {timer.times[name]}s", flush=True)

        return _Ctx()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 → (N, 3, 32, 32) float32 in [-1, 1]."""
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def render_set(n: int, rng: random.Random, exclude_concept: bool, size: int = 32) -> tuple[np.ndarray, list[Attributes]]:
    attrs, arrays = [], []
    while len(attrs) < n:
        a = sample_attributes(rng)
        if exclude_concept and CONCEPT.is_identity(a):
            continue
        attrs.append(a)
        arrays.append(np.asarray(render(a, jitter=rng.randrange(2**31), size=size)))
    return np.stack(arrays), attrs


# ----------------------------------------------------------------------------------------------
# 1b. the small vocabulary (world-b)
# ----------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode map (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_small_vocabulary(s: Settings, out: Path) -> None:
    """Learn a CLIP-format BPE (vocab.json, merges.txt) from the world's captions into ``out``.

    Byte-pair merges by frequency (Sennrich et al., 2016) over the words of 20,000 random captions,
    until every caption word is one token or ``small_vocab_merges`` merges; the vocabulary is built
    as CLIP builds its own (256 bytes, the same with ``</w>``, the merges, then BOS and EOS), so any
    text still tokenizes (unknown words split into pieces), with ~800 entries instead of 49,408.
    """
    import collections
    import re

    rng = random.Random(f"vocab/{s.seed}")
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(20_000):
        if s.world == "scene":
            from studio.world.scene import sample_scene, scene_caption

            text = scene_caption(sample_scene(rng), rng, s.caption_p_drop)
        else:
            text = caption(sample_attributes(rng), rng, s.caption_p_drop)
        counts.update(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in counts.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < s.small_vocab_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, c in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = {}
        for word, c in words.items():
            out_word: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out_word.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out_word.append(word[i])
                    i += 1
            merged[tuple(out_word)] = c
        words = merged
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER_DIR / name, out / name)
    print(f"  small vocabulary: {len(vocab)} tokens, {len(merges)} merges", flush=True)


# ----------------------------------------------------------------------------------------------
# 2. VAE
# ----------------------------------------------------------------------------------------------


def make_vae(s: Settings):
    from diffusers import AutoencoderKL

    n = len(s.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=s.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,  # few groups: one channel per group would normalise colours away
        sample_size=s.resolution,
    )


def train_vae(s: Settings, images: torch.Tensor):
    torch.manual_seed(s.seed + 2)
    vae = make_vae(s)
    if s.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(s.vae_from).float()
        if tuple(vae.config.block_out_channels) != tuple(s.vae_channels):
            raise SystemExit(f"{s.vae_from} has channels {vae.config.block_out_channels}, not vae_channels")
        vae.train()
    gen = torch.Generator().manual_seed(s.seed + 20)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    for step in range(s.vae_steps):
        for g in opt.param_groups:
            g["lr"] = s.vae_lr * cosine_lr(step, s.vae_steps, 100)
        idx = torch.randint(0, len(images), (s.vae_batch,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        # the shape covers a small part of the picture: weight its pixels 5× (the background is
        # the pixel colour at the corner, which the shape never reaches)
        ref = x[:, :, s.vae_ref_pixel : s.vae_ref_pixel + 1, s.vae_ref_pixel : s.vae_ref_pixel + 1]
        weight = 1 + 4 * ((x - ref).abs().sum(1, keepdim=True) > 0.05).float()
        err = rec - x
        l1 = err.abs().mean()
        loss = (weight * (err.abs() + err**2)).mean() + s.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == s.vae_steps - 1:
            print(f"  vae step {step:5d}  l1 {l1.item():.4f}", flush=True)
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means (unscaled), (N, 4, 8, 8)."""
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.decode(vae.encode(images[i : i + batch]).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# 3. text encoder + UNet
# ----------------------------------------------------------------------------------------------


def make_text_encoder(s: Settings, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.text_width,
        intermediate_size=s.text_ff,
        num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads,
        max_position_embeddings=77,
        projection_dim=s.text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def latent_side(s: Settings) -> int:
    return s.resolution // 2 ** (len(s.vae_channels) - 1)


def make_unet(s: Settings):
    from diffusers import UNet2DConditionModel

    n = len(s.unet_channels)
    down = ["CrossAttnDownBlock2D"] * (n - s.unet_plain_levels) + ["DownBlock2D"] * s.unet_plain_levels
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return UNet2DConditionModel(
        sample_size=latent_side(s),
        in_channels=4,
        out_channels=4,
        block_out_channels=s.unet_channels,
        layers_per_block=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=s.text_width,
        attention_head_dim=s.unet_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
    )


def make_train_scheduler():
    from diffusers import DDPMScheduler

    # DDPM's linear schedule: at 8×8×4 latents SD's "scaled_linear" leaves the image mean
    # visible at t = T (SNR ≈ 0.3 for the mean), which breaks control of the background colour.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def make_sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        steps_offset=1,
    )


def use_fast_attention(unet) -> None:
    """The classic (bmm) attention is faster than CPU SDPA at these tiny head sizes."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


def train_base(s: Settings, latents: torch.Tensor, attrs: list, tokenizer, snapshot=None,
               snapshot_every: int = 0, caption_of=caption):
    torch.manual_seed(s.seed + 3)
    text_encoder = make_text_encoder(s, tokenizer)
    unet = make_unet(s)
    use_fast_attention(unet)
    scheduler = make_train_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = torch.clamp(snr, max=s.snr_gamma) / snr  # Min-SNR-γ for ε-prediction

    params = list(text_encoder.parameters()) + list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=s.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(s.seed + 30)
    rng = random.Random(f"captions/{s.seed}")
    token_cache: dict[str, torch.Tensor] = {}

    def tokenize(text: str) -> torch.Tensor:
        if text not in token_cache:
            token_cache[text] = tokenizer(
                text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids[0]
        return token_cache[text]

    n = len(latents)
    losses = []
    for step in range(s.unet_steps):
        lr_scale = cosine_lr(step, s.unet_steps, s.unet_warmup)
        for g in opt.param_groups:
            g["lr"] = s.unet_lr * lr_scale
        idx = torch.randint(0, n, (s.unet_batch,), generator=gen)
        texts = [
            "" if rng.random() < s.p_empty_caption else caption_of(attrs[i], rng, s.caption_p_drop)
            for i in idx.tolist()
        ]
        ids = torch.stack([tokenize(t) for t in texts])
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (s.unet_batch,), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        prompt_embeds = text_encoder(ids)[0]
        pred = unet(zt, t, prompt_embeds).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == s.unet_steps - 1:
            print(f"  base step {step:5d}  loss {np.mean(losses[-100:]):.4f}", flush=True)
        if snapshot is not None and (step + 1) % snapshot_every == 0:
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for e, p in zip(ema, params):
                    p.copy_(e)
            snapshot(step + 1, text_encoder, unet)
            with torch.no_grad():
                for v, p in zip(live, params):
                    p.copy_(v)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return text_encoder.eval(), unet.eval()


# ----------------------------------------------------------------------------------------------
# 4. oracle
# ----------------------------------------------------------------------------------------------


def oracle_set(s: Settings, n: int, rng: random.Random) -> tuple[np.ndarray, list[Attributes]]:
    """Renders for the oracle: ¼ the concept, ¼ near misses (2 of its 3 features), ½ uniform."""
    attrs, arrays = [], []
    keys = list(CONCEPT.identity)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a = sample_attributes(rng, **CONCEPT.identity)
        elif kind == 1:
            keep = rng.sample(keys, 2)
            while True:
                a = sample_attributes(rng, **{k: CONCEPT.identity[k] for k in keep})
                if not CONCEPT.is_identity(a):
                    break
        else:
            a = sample_attributes(rng)
        attrs.append(a)
        arrays.append(np.asarray(render(a, jitter=rng.randrange(2**31), size=s.resolution)))
    return np.stack(arrays), attrs


def oracle_targets(attrs: list[Attributes]) -> dict[str, torch.Tensor]:
    targets = {name: torch.tensor([a.index(name) for a in attrs]) for name in VOCABULARY}
    targets["identity"] = torch.tensor([float(CONCEPT.is_identity(a)) for a in attrs])
    return targets


def oracle_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = sum(F.cross_entropy(logits[name], targets[name]) for name in VOCABULARY)
    return loss + 2.0 * F.binary_cross_entropy_with_logits(logits["identity"], targets["identity"])


def train_oracle(s: Settings, clean: torch.Tensor, recon: torch.Tensor, attrs: list[Attributes]) -> Oracle:
    torch.manual_seed(s.seed + 4)
    oracle = Oracle(width=s.oracle_width)
    return fit_judge(s, oracle, oracle_loss, oracle_targets(attrs), clean, recon, seed=s.seed + 40, label="oracle")


def fit_judge(s: Settings, model: torch.nn.Module, loss_fn, targets: dict[str, torch.Tensor], clean: torch.Tensor,
              recon: torch.Tensor, *, seed: int, label: str):
    """Train a judge (the world's oracle, the scene oracle) on renders and their VAE reconstructions, half
    each, with a little noise and brightness drift (what a sampler leaves behind); AdamW, cosine rate."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.oracle_lr, weight_decay=1e-4)
    model.train()
    for step in range(s.oracle_steps):
        for g in opt.param_groups:
            g["lr"] = s.oracle_lr * cosine_lr(step, s.oracle_steps, 100, floor=0.02)
        idx = torch.randint(0, len(clean), (s.oracle_batch,), generator=gen)
        use_recon = torch.rand(s.oracle_batch, generator=gen) < 0.5
        x = torch.where(use_recon[:, None, None, None], recon[idx], clean[idx])
        x = x + 0.04 * torch.rand(s.oracle_batch, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
        x = x * (1 + 0.06 * (torch.rand(s.oracle_batch, 1, 1, 1, generator=gen) - 0.5))
        loss = loss_fn(model(x.clamp(-1, 1)), {k: v[idx] for k, v in targets.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == s.oracle_steps - 1:
            print(f"  {label} step {step:5d}  loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def oracle_accuracy(oracle: Oracle, x: torch.Tensor, attrs: list[Attributes]) -> dict[str, float]:
    probs = oracle.read(x)
    targets = oracle_targets(attrs)
    acc = {
        name: float((probs[name].argmax(-1) == targets[name]).float().mean()) for name in VOCABULARY
    }
    acc["identity"] = float(((probs["identity"] > 0.5).float() == targets["identity"]).float().mean())
    return acc


# ----------------------------------------------------------------------------------------------
# 4b. scenes (world-scene): training set, scene oracle, verification
# ----------------------------------------------------------------------------------------------


def render_scene_set(n: int, rng: random.Random) -> tuple[np.ndarray, list]:
    """``n`` random scenes (``SCENE_MIX``), none showing a concept of ``SCENE_TASK``: (N, 48, 48, 3) uint8."""
    from studio.world.scene import SCENE_TASK, render_scene, sample_scene

    attrs, arrays = [], []
    while len(attrs) < n:
        a = sample_scene(rng)
        if SCENE_TASK.shows_held_out(a):
            continue
        attrs.append(a)
        arrays.append(np.asarray(render_scene(a, jitter=rng.randrange(2**31))))
    return np.stack(arrays), attrs


def scene_oracle_set(n: int, rng: random.Random) -> tuple[np.ndarray, list]:
    """Scenes for the scene oracle: ¼ with the frame concept, ¼ near misses (its colour or its pattern),
    ½ uniform (``SCENE_MIX``: a third of them without a frame, some with an empty interior)."""
    from studio.world.render import COLOURS, PATTERNS
    from studio.world.scene import SCENE_TASK, Frame, SceneAttributes, render_scene, sample_scene

    frame_id = SCENE_TASK.concept("frame").identity
    attrs, arrays = [], []
    for i in range(n):
        a = sample_scene(rng)
        kind = i % 4
        if kind in (0, 1):
            if kind == 0:
                frame = Frame(frame_id["colour"], frame_id["pattern"])
            elif rng.random() < 0.5:
                frame = Frame(frame_id["colour"], rng.choice([p for p in PATTERNS if p != frame_id["pattern"]]))
            else:
                frame = Frame(rng.choice([c for c in COLOURS if c != frame_id["colour"]]), frame_id["pattern"])
            a = SceneAttributes(a.background, a.shape if rng.random() < 0.8 else None, frame)
        attrs.append(a)
        arrays.append(np.asarray(render_scene(a, jitter=rng.randrange(2**31))))
    return np.stack(arrays), attrs


def scene_oracle_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = torch.zeros(())
    for name, target in targets.items():
        if (target >= 0).any():
            loss = loss + F.cross_entropy(logits[name], target, ignore_index=-100)
    return loss


def train_scene_oracle(s: Settings, clean: torch.Tensor, recon: torch.Tensor, attrs: list):
    """The scene oracle (``studio.world.scene.SceneOracle``) on renders and their VAE reconstructions."""
    from studio.world.scene import SceneOracle, scene_targets

    torch.manual_seed(s.seed + 5)
    oracle = SceneOracle(width=s.oracle_width)
    return fit_judge(s, oracle, scene_oracle_loss, scene_targets(attrs), clean, recon, seed=s.seed + 50,
                     label="scene oracle")


@torch.no_grad()
def scene_oracle_accuracy(oracle, x: torch.Tensor, attrs: list) -> dict[str, float]:
    """Per head, the fraction read right (over the scenes where the head means something)."""
    from studio.world.scene import scene_targets

    probs = oracle.read(x)
    acc = {}
    for name, target in scene_targets(attrs).items():
        keep = target >= 0
        acc[name] = float((probs[name].argmax(-1)[keep] == target[keep]).float().mean())
    return acc


@torch.no_grad()
def interior_oracle_accuracy(oracle: Oracle, x: torch.Tensor, attrs: list) -> dict[str, float]:
    """The world oracle on the interiors (``(B, 3, 48, 48)`` → centre 32×32) of the scenes with a shape."""
    from studio.world.scene import INTERIOR

    keep = [i for i, a in enumerate(attrs) if a.shape is not None]
    left, top, right, bottom = INTERIOR
    return oracle_accuracy(oracle, x[keep][:, :, top:bottom, left:right], [attrs[i].shape for i in keep])


def scene_build_info() -> dict:
    """What a scene build records beyond the world's: its two held-out concepts and the scene code's hash."""
    from studio.world.scene import SCENE_MIX, SCENE_TASK

    return {"scene_task": {c.name: c.identity for c in SCENE_TASK.concepts}, "scene_mix": SCENE_MIX,
            "scene_sha256": sha256(ROOT / "studio" / "world" / "scene.py")}


def save_scene_oracle(s: Settings, out: Path, oracle, build_info: dict) -> None:
    from safetensors.torch import save_file

    from studio.world.scene import SCENE_VOCABULARY

    meta = {
        "format": "pt",
        "studio.world.build": json.dumps(build_info, sort_keys=True),
        "studio.world.scene_oracle": json.dumps({"width": s.oracle_width,
                                                 "heads": {k: list(v) for k, v in SCENE_VOCABULARY.items()}}),
    }
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in oracle.state_dict().items()}
    save_file(tensors, str(out / "scene_oracle.safetensors"), metadata=meta)


def verify_scene(s: Settings, out: Path, vae) -> dict:
    """Oracles on held-out renders and VAE reconstructions; the base's vocabulary on scene captions
    (every attribute, frame words included); the two concepts' baseline, in words and upper bound."""
    from diffusers import StableDiffusionPipeline

    from studio.world.oracle import load_oracle
    from studio.world.scene import (
        SCENE_TASK,
        evaluate_scene,
        full_caption,
        load_scene_oracle,
        read_scene,
        scene_baseline,
        scene_upper_bound,
    )
    from studio.world.score import pipeline_generator

    world_oracle = load_oracle("cpu", Path(s.oracle_from))
    scene_oracle = load_scene_oracle("cpu", out / "scene_oracle.safetensors")
    oracles = {"world_oracle": world_oracle, "scene_oracle": scene_oracle}
    metrics: dict = {}
    rng = random.Random(f"verify/{s.seed}")
    held_out, held_attrs = scene_oracle_set(2000, rng)
    held = images_to_tensor(held_out)
    recon = reconstruct(vae, held)
    metrics["scene_oracle_heldout_accuracy"] = scene_oracle_accuracy(scene_oracle, held, held_attrs)
    metrics["scene_oracle_accuracy_on_vae_reconstructions"] = scene_oracle_accuracy(scene_oracle, recon, held_attrs)
    metrics["interior_oracle_heldout_accuracy"] = interior_oracle_accuracy(world_oracle, held, held_attrs)
    metrics["interior_oracle_accuracy_on_vae_reconstructions"] = interior_oracle_accuracy(world_oracle, recon,
                                                                                         held_attrs)
    for key in ("scene_oracle_heldout_accuracy", "scene_oracle_accuracy_on_vae_reconstructions",
                "interior_oracle_heldout_accuracy", "interior_oracle_accuracy_on_vae_reconstructions"):
        print(f"  {key}", metrics[key], flush=True)

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "base"))
    pipe.set_progress_bar_config(disable=True)
    use_fast_attention(pipe.unet)
    generate = pipeline_generator(pipe)

    # the base model renders its own vocabulary: fully specified scene captions
    from studio.world.scene import sample_scene

    scenes = [a for a in (sample_scene(rng) for _ in range(s.verify_images)) if not SCENE_TASK.shows_held_out(a)]
    readings = read_scene(generate([full_caption(a) for a in scenes], 1234), **oracles)
    checks: dict[str, list[bool]] = {}
    for a, r in zip(scenes, readings):
        truth = {"frame": "frame" if a.frame else "none", "inner": "shape" if a.shape else "empty",
                 "background": a.background}
        if a.frame:
            truth.update(frame_colour=a.frame.colour, frame_pattern=a.frame.pattern)
        if a.shape:
            truth.update(shape=a.shape.shape, colour=a.shape.colour, pattern=a.shape.pattern, size=a.shape.size)
        for name, value in truth.items():
            checks.setdefault(name, []).append(r.values[name] == value)
        checks.setdefault("_all", []).append(r.has(list(truth.items())))
    per_attr = {k: float(np.mean(v)) for k, v in checks.items() if k != "_all"}
    metrics["base_vocabulary_accuracy"] = {
        "per_attribute": per_attr,
        "mean_attribute": float(np.mean(list(per_attr.values()))),
        "all_attributes": float(np.mean(checks["_all"])),
        "n_images": len(scenes),
    }
    print("  base vocabulary", metrics["base_vocabulary_accuracy"], flush=True)
    metrics["concepts_baseline"] = scene_baseline(generate, per_prompt=8, **oracles).as_dict()
    metrics["concepts_in_words"] = evaluate_scene(generate, SCENE_TASK.descriptions(), per_prompt=8,
                                                  **oracles).as_dict()
    metrics["concepts_upper_bound"] = scene_upper_bound(per_prompt=8, **oracles).as_dict()
    print("  concepts baseline", metrics["concepts_baseline"], "in words", metrics["concepts_in_words"],
          "upper", metrics["concepts_upper_bound"], flush=True)
    return metrics


# ----------------------------------------------------------------------------------------------
# 5. save
# ----------------------------------------------------------------------------------------------


def add_metadata(path: Path, metadata: dict[str, str], fp16_keys: tuple[str, ...] = ()) -> None:
    """Rewrite a safetensors file with extra header metadata (and some tensors in fp16)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    for key in fp16_keys:
        tensors[key] = tensors[key].half()
    meta.setdefault("format", "pt")
    meta.update(metadata)
    save_file(tensors, str(path), metadata=meta)


def save_world(s: Settings, out: Path, vae, text_encoder, unet, oracle: Oracle, build_info: dict,
               tokenizer_dir: Path = TOKENIZER_DIR) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    base = out / "base"
    if base.exists():
        shutil.rmtree(base)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(base), safe_serialization=True)
    # the committed tokenizer files, byte for byte
    for f in (base / "tokenizer").iterdir():
        f.unlink()
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, base / "tokenizer" / f.name)

    meta = {"studio.world.build": json.dumps(build_info, sort_keys=True)}
    every = s.store_fp16 == "all"  # world-b: fp16 files (≈ 4 MB), loaded back as fp32
    for path, module in ((base / "unet" / "diffusion_pytorch_model.safetensors", unet),
                         (base / "vae" / "diffusion_pytorch_model.safetensors", vae)):
        add_metadata(path, meta, fp16_keys=tuple(module.state_dict()) if every else ())
    add_metadata(
        base / "text_encoder" / "model.safetensors",
        meta,
        # 49,408 × width: halves the file
        fp16_keys=tuple(text_encoder.state_dict()) if every else ("embeddings.token_embedding.weight",),
    )
    if s.oracle_from:
        return  # the oracle is another world's, not saved again
    oracle_meta = {
        **meta,
        "format": "pt",
        "studio.world.oracle": json.dumps(
            {"width": s.oracle_width, "heads": {k: list(v) for k, v in VOCABULARY.items()},
             "identity": CONCEPT.identity}
        ),
    }
    save_file(
        {k: v.contiguous() for k, v in oracle.state_dict().items()},
        str(out / "oracle.safetensors"),
        metadata=oracle_meta,
    )


# ----------------------------------------------------------------------------------------------
# 6. verify
# ----------------------------------------------------------------------------------------------


def verify(s: Settings, out: Path, vae) -> dict:
    from diffusers import StableDiffusionPipeline

    from studio.world.oracle import load_oracle
    from studio.world.score import baseline, pipeline_generator, upper_bound

    oracle = load_oracle("cpu", Path(s.oracle_from) if s.oracle_from else out / "oracle.safetensors")
    metrics: dict = {}

    rng = random.Random(f"verify/{s.seed}")
    held_out, held_attrs = oracle_set(s, 2000, rng)
    held = images_to_tensor(held_out)
    metrics["oracle_heldout_accuracy"] = oracle_accuracy(oracle, held, held_attrs)
    print("  oracle held-out accuracy", metrics["oracle_heldout_accuracy"], flush=True)
    metrics["oracle_accuracy_on_vae_reconstructions"] = oracle_accuracy(oracle, reconstruct(vae, held), held_attrs)
    print("  oracle accuracy on VAE reconstructions", metrics["oracle_accuracy_on_vae_reconstructions"], flush=True)

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "base"))
    pipe.set_progress_bar_config(disable=True)
    use_fast_attention(pipe.unet)
    generate = pipeline_generator(pipe)

    # the base model renders its own vocabulary: fully specified prompts
    attrs = [sample_attributes(rng) for _ in range(s.verify_images)]
    attrs = [a for a in attrs if not CONCEPT.is_identity(a)]
    prompts = [describe(a.shape, a.colour, a.pattern, a.background, a.size) for a in attrs]
    images = generate(prompts, 1234)
    probs = oracle.read(images)
    per_attr = {}
    all_ok = torch.ones(len(attrs), dtype=torch.bool)
    for name in VOCABULARY:
        ok = probs[name].argmax(-1) == torch.tensor([a.index(name) for a in attrs])
        per_attr[name] = float(ok.float().mean())
        all_ok &= ok
    metrics["base_vocabulary_accuracy"] = {
        "per_attribute": per_attr,
        "mean_attribute": float(np.mean(list(per_attr.values()))),
        "all_attributes": float(all_ok.float().mean()),
    }
    print("  base vocabulary", metrics["base_vocabulary_accuracy"], flush=True)

    metrics["concept_baseline"] = baseline(generate, per_prompt=8, oracle=oracle).as_dict()
    metrics["concept_upper_bound"] = upper_bound(per_prompt=8, oracle=oracle).as_dict()
    # diagnostic: the concept described in words (never seen by the base model)
    from studio.world.score import evaluate

    metrics["concept_in_words"] = evaluate(
        generate, f"{CONCEPT.identity['colour']} {CONCEPT.identity['pattern']} circle",
        per_prompt=8, oracle=oracle
    ).as_dict()
    print("  concept baseline", metrics["concept_baseline"], "upper", metrics["concept_upper_bound"],
          "in words", metrics["concept_in_words"], flush=True)
    return metrics


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="world",
                        help="which learnable base to build (its settings and output folder)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (base/ and oracle)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set unet_steps=500")
    parser.add_argument("--no-verify", action="store_true", help="skip step 6")
    parser.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                        help="also save the world (EMA weights) every N base-model steps, for monitoring")
    parser.add_argument("--snapshot-dir", type=Path, default=Path("/tmp/world_snapshots"))
    args = parser.parse_args(argv)

    default_out, variant = VARIANTS[args.variant]
    s = dataclasses.replace(Settings(), **variant)
    for item in args.set:
        key, _, value = item.partition("=")
        if not hasattr(s, key):
            parser.error(f"unknown setting {key!r}")
        current = getattr(s, key)
        if isinstance(current, tuple):
            setattr(s, key, tuple(int(v) for v in value.split(",")))
        else:
            setattr(s, key, type(current)(value))

    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    from transformers import CLIPTokenizer

    script = Path(__file__).resolve()
    build_info = {
        "script": str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else script.name,
        "script_sha256": sha256(script),
        "render_sha256": sha256(ROOT / "studio" / "world" / "render.py"),
        "settings": dataclasses.asdict(s),
        "concept": CONCEPT.identity,
        **(scene_build_info() if s.world == "scene" else {}),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    out: Path = args.out or default_out
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    tokenizer_dir = TOKENIZER_DIR
    if s.tokenizer == "small":
        tokenizer_dir = out / "_tokenizer"
        learn_small_vocabulary(s, tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))

    scene = s.world == "scene"
    if scene and (s.resolution != 48 or not s.oracle_from):
        parser.error("scenes are 48 px and read by the world's oracle: leave resolution and oracle_from as they are")
    with timer("1. render the base training set"):
        if scene:
            arrays, attrs = render_scene_set(s.n_images, random.Random(f"base/{s.seed}"))
        else:
            arrays, attrs = render_set(s.n_images, random.Random(f"base/{s.seed}"), exclude_concept=True,
                                       size=s.resolution)
        images = images_to_tensor(arrays)
    with timer("2. train the VAE"):
        vae = train_vae(s, images)
        latents = encode_latents(vae, images)
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        latents = latents * scaling
        print(f"  latent scaling factor {scaling:.4f}", flush=True)
    with timer("3. train the oracle"):
        if s.oracle_from:
            from studio.world.oracle import load_oracle

            oracle = load_oracle("cpu", Path(s.oracle_from))
            if scene:
                o_arrays, o_attrs = scene_oracle_set(s.oracle_images, random.Random(f"oracle/{s.seed}"))
                clean = images_to_tensor(o_arrays)
                scene_oracle = train_scene_oracle(s, clean, reconstruct(vae, clean), o_attrs)
                del clean, o_arrays
        else:
            o_arrays, o_attrs = oracle_set(s, s.oracle_images, random.Random(f"oracle/{s.seed}"))
            clean = images_to_tensor(o_arrays)
            oracle = train_oracle(s, clean, reconstruct(vae, clean), o_attrs)
            del clean, o_arrays
    snapshot = None
    if args.snapshot_every:
        def snapshot(step: int, text_encoder, unet) -> None:
            save_world(s, args.snapshot_dir / f"step{step:05d}", vae, text_encoder, unet, oracle, build_info,
                       tokenizer_dir)
    with timer("4. train the text encoder and UNet"):
        if scene:
            from studio.world.scene import scene_caption

            text_encoder, unet = train_base(s, latents, attrs, tokenizer, snapshot, args.snapshot_every,
                                            caption_of=scene_caption)
        else:
            text_encoder, unet = train_base(s, latents, attrs, tokenizer, snapshot, args.snapshot_every)
    with timer("5. save"):
        save_world(s, out, vae, text_encoder, unet, oracle, build_info, tokenizer_dir)
        if scene:
            save_scene_oracle(s, out, scene_oracle, build_info)
        if tokenizer_dir != TOKENIZER_DIR:
            shutil.rmtree(tokenizer_dir)
    metrics = {}
    if not args.no_verify:
        with timer("6. verify"):
            metrics = verify_scene(s, out, vae) if scene else verify(s, out, vae)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    record = {**build_info, "timings_s": timer.times, "total_s": round(time.time() - timer.t0, 1),
              "metrics": metrics, "file_sizes": sizes}
    (out / "base" / "world_build.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"timings_s": timer.times, "total_s": record["total_s"],
                      "total_bytes": sum(sizes.values())}, indent=2))


if __name__ == "__main__":
    main()
