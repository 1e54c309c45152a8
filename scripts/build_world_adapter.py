"""Build the demo world's IP-Adapter: a small CLIP image encoder and an adapter for the demo base.

    python scripts/build_world_adapter.py                       # → studio/assets/world_adapter/
    python scripts/build_world_adapter.py --base /tmp/w/base --out /tmp/wa --set adapter_steps=50
    python scripts/build_world_adapter.py --only-encoder --out /tmp/enc   # step 2 alone (needs no base)
    python scripts/build_world_adapter.py --encoder /tmp/enc             # reuse that encoder
    python scripts/build_world_adapter.py --encoder studio/assets/world_adapter/image_encoder   # the committed one

There are no pretrained image encoders or adapters for the world, so both are trained here:

1. render the encoder's training set (every purple dotted circle left out — the concept stays
   unseen, as for the base model);
2. train the image encoder, a ``CLIPVisionModelWithProjection`` (32 px, 4-px patches): linear
   heads on its ``image_embeds`` classify the *identity* attributes (shape, colour, pattern); the
   heads exist only during training. Identity only: the image prompt should carry the subject,
   the text the context (background, size);
3. render the adapter's training folder with captions that often leave the identity unsaid
   (so the image branch has to supply it);
4. train a new base-kind adapter with the studio's own trainer (``trainers/zeroshot.py``,
   ``--adapter new``: ``to_k_ip``/``to_v_ip`` start from the text ``to_k``/``to_v``);
5. save ``ip_adapter.safetensors`` + ``image_encoder/`` + ``studio_adapter.json`` (settings, this
   script's sha256, metrics) and verify: zero-shot fidelity of the concept from one of its photos
   vs the class-word baseline, scored by the world's oracle.

Same script, same settings, same machine → same weights (one thread, explicit generators).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
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

from studio.world import CONCEPT, DEMO_BASE_DIR, VOCABULARY, describe, render, sample_attributes  # noqa: E402

DEFAULT_OUT = ROOT / "studio" / "assets" / "world_adapter"
DEFAULT_BASE = DEMO_BASE_DIR
ENCODER_JSON = "encoder_build.json"  # beside a trained encoder: its settings and accuracy
IDENTITY = ("shape", "colour", "pattern")


@dataclass
class Settings:
    """Every knob of the build; recorded in ``studio_adapter.json``."""

    seed: int = 0
    threads: int = 1
    # image encoder (CLIP vision tower at toy size)
    encoder_images: int = 12_000
    encoder_width: int = 64
    encoder_layers: int = 3
    encoder_heads: int = 4
    encoder_projection: int = 32
    encoder_steps: int = 3000
    encoder_batch: int = 64
    encoder_lr: float = 2e-3
    # adapter (the studio's trainer)
    adapter_images: int = 1000  # the trainer's image-folder limit
    identity_p_drop: float = 0.7  # shape/colour/pattern unsaid in the caption with this probability
    context_p_drop: float = 0.25
    adapter_steps: int = 1500
    adapter_batch: int = 32
    adapter_lr: float = 1e-3
    num_tokens: int = 4
    # verification
    verify_per_prompt: int = 4
    reference_scale: float = 1.0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_concept(attrs) -> bool:
    return CONCEPT.is_identity(attrs)


def render_set(n: int, rng: random.Random) -> list:
    """``n`` random attributes (the concept excluded) with their renders."""
    out = []
    while len(out) < n:
        a = sample_attributes(rng)
        if not is_concept(a):
            out.append((a, render(a, jitter=rng.randrange(2**31))))
    return out


# -- 2. the image encoder ----------------------------------------------------------------------------------
def make_encoder(s: Settings):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=s.encoder_width, intermediate_size=2 * s.encoder_width,
                           projection_dim=s.encoder_projection, num_hidden_layers=s.encoder_layers,
                           num_attention_heads=s.encoder_heads, image_size=32, patch_size=4)
    torch.manual_seed(s.seed)
    return CLIPVisionModelWithProjection(cfg)


def pixels(images: list, image_size: int = 32) -> torch.Tensor:
    """PIL renders → CLIP-normalised (N, 3, 32, 32), exactly as the adapter's image processor."""
    from studio.methods.zeroshot.encoder import clip_processor

    return clip_processor(image_size)(images, return_tensors="pt").pixel_values


def train_encoder(s: Settings, data: list):
    encoder = make_encoder(s)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(s.encoder_projection, len(VOCABULARY[k])) for k in IDENTITY})
    x = pixels([im for _, im in data])
    y = {k: torch.tensor([a.index(k) for a, _ in data]) for k in IDENTITY}
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=s.encoder_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(s.seed)
    encoder.train()
    for step in range(s.encoder_steps):
        lr = s.encoder_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / s.encoder_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(data), (s.encoder_batch,), generator=g)
        emb = encoder(x[idx]).image_embeds
        loss = sum(F.cross_entropy(heads[k](emb), y[k][idx]) for k in IDENTITY)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, s.encoder_steps // 10) == 0 or step == s.encoder_steps - 1:
            print(f"  encoder step {step}: loss {float(loss.detach()):.4f}", flush=True)
    encoder.eval()
    return encoder, heads


@torch.no_grad()
def encoder_accuracy(encoder, heads, data: list) -> dict[str, float]:
    emb = encoder(pixels([im for _, im in data])).image_embeds
    return {k: float((heads[k](emb).argmax(-1) == torch.tensor([a.index(k) for a, _ in data])).float().mean())
            for k in IDENTITY}


@torch.no_grad()
def concept_accuracy(encoder, heads) -> dict[str, float]:
    """Does the encoder read the unseen concept's identity from its photos (compositional generalisation)?"""
    images = CONCEPT.training_images(n=8, seed=123)
    emb = encoder(pixels(images)).image_embeds
    return {k: float((heads[k](emb).argmax(-1) == VOCABULARY[k].index(CONCEPT.identity[k])).float().mean())
            for k in IDENTITY}


# -- 3./4. the adapter --------------------------------------------------------------------------------------
def write_adapter_folder(s: Settings, folder: Path, rng: random.Random) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (a, im) in enumerate(render_set(s.adapter_images, rng)):
        said = {k: (getattr(a, k) if rng.random() >= (s.identity_p_drop if k in IDENTITY else s.context_p_drop)
                    else None) for k in VOCABULARY}
        im.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(describe(**said), encoding="utf-8")


def train_adapter(s: Settings, base_dir: Path, images: Path, encoder_dir: Path, out: Path):
    from studio.models import load_base
    from trainers import get_trainer
    from trainers.runner import PrintCallbacks, train

    base = load_base(str(base_dir), device="cpu")
    entry = get_trainer("adapter")
    cfg = entry.resolve(images=str(images), adapter="new", image_encoder=str(encoder_dir), out=str(out),
                      steps=s.adapter_steps, batch_size=s.adapter_batch, lr=s.adapter_lr, seed=s.seed,
                      num_tokens=s.num_tokens, save_image_encoder=True, log_every=max(1, s.adapter_steps // 10))
    result = train(entry, cfg, base, callbacks=PrintCallbacks())
    return base, result


# -- 5. verification -----------------------------------------------------------------------------------------
def reference_generator(base, adapter_dir: Path, reference, scale: float):
    """A world generator (``prompts, seed → images``) with ``reference`` as the image prompt."""
    from studio.generation import ResolvedConcept, applied
    from studio.methods.attention import cfg_layout
    from studio.methods.zeroshot import make_zeroshot_concept
    from studio.world import pipeline_generator

    concept = make_zeroshot_concept([reference], str(adapter_dir), name="reference", pipe=base.pipe)
    plain = pipeline_generator(base.pipe)

    def generate(prompts, seed):
        with applied(base, [ResolvedConcept(concept, "reference", scale)]), cfg_layout(base.pipe.unet, guided=True):
            return plain(prompts, seed)

    return generate


def verify(s: Settings, base, adapter_dir: Path, base_dir: Path) -> dict:
    """Oracle scores (the world's own oracle, beside the base folder) of zero-shot generations."""
    from studio.world import baseline, evaluate, load_oracle, pipeline_generator

    oracle = load_oracle(path=base_dir.parent / "oracle.safetensors")

    reference = CONCEPT.training_images(n=1, seed=0)[0]
    base.pipe.set_progress_bar_config(disable=True)
    zero_shot = evaluate(reference_generator(base, adapter_dir, reference, s.reference_scale), CONCEPT.class_word,
                         per_prompt=s.verify_per_prompt, seed=0, oracle=oracle)
    other = render(CONCEPT.attributes().replace(shape="square", colour="red", pattern="striped"))
    control = evaluate(reference_generator(base, adapter_dir, other, s.reference_scale), CONCEPT.class_word,
                       per_prompt=s.verify_per_prompt, seed=0, oracle=oracle)
    base_scores = baseline(pipeline_generator(base.pipe), per_prompt=s.verify_per_prompt, seed=0, oracle=oracle)
    return {"zero_shot_from_a_concept_photo": zero_shot.as_dict(),
            "control_red_striped_square_reference": control.as_dict(), "baseline_class_word": base_scores.as_dict()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the world's diffusers folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output adapter folder (replaced)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--only-encoder", action="store_true", help="train the image encoder into --out and stop")
    parser.add_argument("--encoder", type=Path, default=None, help="reuse an encoder made with --only-encoder")
    args = parser.parse_args(argv)
    s = Settings()
    for item in args.set:
        key, _, value = item.partition("=")
        if not hasattr(s, key):
            parser.error(f"unknown setting {key!r}")
        setattr(s, key, type(getattr(s, key))(value))
    torch.set_num_threads(s.threads)
    if not args.only_encoder and not (args.base / "model_index.json").is_file():
        parser.error(f"no world base at {args.base}; build it first (scripts/build_world.py)")
    t0 = time.time()
    times: dict[str, float] = {}
    work = args.out.with_name(f".{args.out.name}.build")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def step(name: str, t: float) -> None:
        times[name] = round(time.time() - t, 1)
        print(f"[{time.time() - t0:7.1f}s] {name} done in {times[name]}s", flush=True)

    if args.encoder is not None:
        shutil.copytree(args.encoder, work / "encoder")
        built = args.encoder / ENCODER_JSON
        metrics = json.loads(built.read_text())["metrics"] if built.is_file() else {}
    else:
        t = time.time()
        data = render_set(s.encoder_images, random.Random(f"adapter-encoder/{s.seed}"))
        held_out = render_set(500, random.Random(f"adapter-encoder-heldout/{s.seed}"))
        step("1. render the encoder set", t)
        t = time.time()
        encoder, heads = train_encoder(s, data)
        metrics = {"encoder_heldout_accuracy": encoder_accuracy(encoder, heads, held_out),
                   "encoder_concept_accuracy": concept_accuracy(encoder, heads)}
        print(f"  {json.dumps(metrics)}", flush=True)
        encoder.save_pretrained(str(work / "encoder"))
        (work / "encoder" / ENCODER_JSON).write_text(json.dumps({"settings": dataclasses.asdict(s), "metrics": metrics,
                                                                "timings_s": times}, indent=2) + "\n")
        step("2. train the image encoder", t)
        if args.only_encoder:
            shutil.rmtree(args.out, ignore_errors=True)
            shutil.move(str(work / "encoder"), str(args.out))
            shutil.rmtree(work, ignore_errors=True)
            print(json.dumps({"timings_s": times, "metrics": metrics}, indent=2))
            return
    t = time.time()
    write_adapter_folder(s, work / "images", random.Random(f"adapter-images/{s.seed}"))
    step("3. render the adapter set", t)
    t = time.time()
    result_dir = work / "adapter"
    base, _ = train_adapter(s, args.base, work / "images", work / "encoder", result_dir)
    step("4. train the adapter", t)
    t = time.time()
    if not args.no_verify:
        metrics["verify"] = verify(s, base, result_dir, args.base)
        print(f"  {json.dumps(metrics['verify'])}", flush=True)
        step("5. verify", t)
    record_path = result_dir / "studio_adapter.json"
    record = json.loads(record_path.read_text())
    script = Path(__file__).resolve()
    record.update({"image_encoder": "image_encoder", "build": {
        "script": str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else script.name,
        "script_sha256": sha256(script), "settings": dataclasses.asdict(s),
        "base_dir": str(Path(args.base).resolve().relative_to(ROOT)) if Path(args.base).resolve().is_relative_to(ROOT)
        else Path(args.base).name,  # never a machine's absolute path
        "timings_s": times, "metrics": metrics}})
    record.pop("train", None)  # the trainer's record names temporary folders
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    if (work / "encoder" / ENCODER_JSON).is_file():  # keep the encoder reusable with --encoder
        shutil.copy(work / "encoder" / ENCODER_JSON, result_dir / "image_encoder" / ENCODER_JSON)
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.move(str(result_dir), str(args.out))
    shutil.rmtree(work, ignore_errors=True)
    sizes = {str(p.relative_to(args.out)): p.stat().st_size for p in sorted(args.out.rglob("*")) if p.is_file()}
    print(json.dumps({"timings_s": times, "total_s": round(time.time() - t0, 1), "bytes": sum(sizes.values()),
                      "metrics": metrics}, indent=2))


if __name__ == "__main__":
    main()
