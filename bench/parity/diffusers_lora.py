"""Parity of the studio's DreamBooth-LoRA trainer with diffusers' example ``train_dreambooth_lora.py``.

Reference: github.com/huggingface/diffusers, ``examples/dreambooth/train_dreambooth_lora.py`` — run
from the checkout given with ``--ref``, never copied. Checked at commit
58eb52c0803ea9af3abec60841c2a093bdf1f951.

Both sides train rank-``--rank`` PEFT LoRA adapters (``init_lora_weights="gaussian"``, α = r) on the
UNet's ``to_q, to_k, to_v, to_out.0`` and the text encoder's ``q_proj, k_proj, v_proj, out_proj``
of a tiny SD 1.x-like base (``tiny``, ε) for ``--steps`` optimizer steps, with prior preservation
(``[instance ; class]`` in one forward, ``L = L_inst + w·L_class``, w = 1), AdamW with the example's
defaults (β = (0.9, 0.999), ε = 1e-8, weight decay 1e-2), gradient clipping at norm 1 (the example's
default; the studio's ``max_grad_norm`` is set to it), a constant rate, no flips.

The studio's loop draws the latents, noise, timesteps, prompts and the LoRA's starting values
(its own seeded generator); the example is handed the same draws (bench/parity/common.py) and the
same starting LoRA values (copied into its adapters right after its ``add_adapter`` calls, which
draw theirs from the global generator).

Compared, per step: the text conditioning (the trained text-encoder LoRA acts on it from step 2),
the UNet prediction with the LoRA applied, the loss (instance + prior), the gradients of the UNet
and text-encoder LoRA tensors (after clipping) and those tensors after the step. After training:
the studio's exported kohya file applied by the studio's loader against the example's saved
``pytorch_lora_weights.safetensors`` loaded by diffusers' ``load_lora_weights`` — the UNet output
and the text conditioning of the trigger prompt on a fresh pipeline.

Run (a few minutes on 2 shared CPU cores)::

    git clone https://github.com/huggingface/diffusers /tmp/diffusers
    python -m bench.parity.diffusers_lora --ref /tmp/diffusers
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.parity.common import (
    DrawReplay,
    StepRecorder,
    build_tiny_folder,
    compare,
    diffusers_example_shims,
    isolated_imports,
    patched,
    print_table,
    record_studio_draws,
    ref_label,
    require_file,
    run_script,
    write_images,
)

REPO = "github.com/huggingface/diffusers (examples/dreambooth/train_dreambooth_lora.py)"
SCRIPT = "examples/dreambooth/train_dreambooth_lora.py"
TOKEN = "sks"
CLASS_PROMPT = "a photo of a dog"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def canonical(component: str, name: str, adapter: str) -> str:
    """``unet|te`` + the PEFT parameter name with the adapter's name replaced: the same key on both sides."""
    return f"{component}:{name.replace(f'.{adapter}.', '.*.')}"


def lora_params(models: dict[str, Any], adapter: str) -> dict[str, torch.nn.Parameter]:
    """Every LoRA parameter of ``models`` (``{"unet": unet, "te": text_encoder}``) by canonical name, sorted."""
    out = {canonical(c, n, adapter): p for c, m in models.items() for n, p in m.named_parameters()
           if f".{adapter}." in n and ".lora_" in n}
    return dict(sorted(out.items()))


def flat(params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    """All tensors in key order as one vector, its gradient attached as ``._parity_grad`` (StepRecorder)."""
    vec = torch.cat([p.detach().reshape(-1) for p in params.values()]).clone()
    grads = [p.grad for p in params.values() if p.grad is not None]
    grad = torch.cat([g.detach().reshape(-1) for g in grads]).clone() if len(grads) == len(params) else None
    vec._parity_grad = grad  # type: ignore[attr-defined]
    return vec


def studio_run(folder: Path, images: Path, classes: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train with the studio's loop, recording its draws and every step."""
    from studio.models import load_base
    from trainers.loop import load_training_images, run_training
    from trainers.lora import ADAPTER, DreamBoothConfig, DreamBoothLoRATrainer

    base = load_base(str(folder), device="cpu", dtype="float32")
    cfg = DreamBoothConfig(images=str(images), token=TOKEN, class_word="dog", steps=args.steps, lr=args.lr,
                           batch_size=args.batch, flip=False, seed=args.seed, weight_decay=1e-2, max_grad_norm=1.0,
                           probe=False, budget="fixed", log_every=0, rank=args.rank, target_modules=UNET_TARGETS,
                           train_text_encoder=True, prior_preservation=args.prior, class_images=str(classes),
                           prior_weight=1.0, class_prompt=CLASS_PROMPT)
    trainer = DreamBoothLoRATrainer(base, cfg, TOKEN)
    models = {"unet": base.pipe.unet, "te": base.pipe.text_encoder}
    params = lora_params(models, ADAPTER)
    if len(params) != len(trainer.params):
        raise SystemExit(f"found {len(params)} of the trainer's {len(trainer.params)} LoRA tensors")
    init = {k: p.detach().clone() for k, p in params.items()}
    examples = load_training_images(cfg, base)
    rec = StepRecorder(select=lambda opt: flat(params))
    with rec.install(), record_studio_draws(trainer) as draws:
        result = run_training(base, trainer, cfg, method="dreambooth", examples=examples, save=False)
    return {"rec": rec, "draws": draws, "init": init, "losses": result.losses, "concept": result.concept,
            "scaling": float(base.pipe.vae.config.scaling_factor), "sizes": {k: p.numel() for k, p in params.items()}}


@contextlib.contextmanager
def same_start(init: dict[str, torch.Tensor], models: dict[str, Any]) -> Any:
    """After the example's ``unet.add_adapter`` / ``text_encoder.add_adapter`` (PEFT's gaussian init from the
    global generator), overwrite its LoRA tensors with the studio's starting values; ``models`` collects
    the adapted models."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    def wrap(cls: Any, component: str) -> Any:
        original = cls.add_adapter

        def add_adapter(model: Any, *a: Any, **k: Any) -> Any:
            out = original(model, *a, **k)
            models[component] = model
            with torch.no_grad():
                for key, p in lora_params({component: model}, "default").items():
                    p.copy_(init[key])
            return out

        return add_adapter

    with patched(UNet2DConditionModel, "add_adapter", wrap(UNet2DConditionModel, "unet")), \
            patched(CLIPTextModel, "add_adapter", wrap(CLIPTextModel, "te")):
        yield


def official_run(ref: Path, folder: Path, images: Path, classes: Path, studio: dict[str, Any],
                 args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the example on the studio's draws and starting values."""
    from accelerate import Accelerator
    from transformers import CLIPTokenizer

    script = require_file(ref, SCRIPT, REPO)
    tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    draws = studio["draws"]
    batches = []
    for prompts, lat in zip(draws.prompts, draws.latents):
        # the recorder sees the trainer's instance prompts; the loop appends the class prompt per class image
        prompts = prompts + [CLASS_PROMPT] * (lat.shape[0] - len(prompts))
        # the example's tokenize_prompt: padded to the model's length, truncated; its collate_fn puts the
        # class rows after the instance rows, as the studio's batch does
        t = tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt")
        batches.append({"input_ids": t.input_ids, "attention_mask": t.attention_mask,
                        "pixel_values": torch.zeros(lat.shape[0], 3, args.resolution, args.resolution)})
    replay = DrawReplay(draws.latents, draws.noise, draws.timesteps, batches, studio["scaling"])
    models: dict[str, Any] = {}
    rec = StepRecorder(select=lambda opt: flat(lora_params(models, "default")))
    argv = ["--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(images),
            "--instance_prompt", f"a photo of a {TOKEN} dog", "--output_dir", str(out), "--seed", str(args.seed),
            "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
            "--max_train_steps", str(args.steps), "--learning_rate", str(args.lr), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--rank", str(args.rank), "--train_text_encoder",
            "--report_to", "all", "--checkpointing_steps", "1000000"]
    if args.prior:
        argv += ["--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", CLASS_PROMPT,
                 "--num_class_images", str(len(list(classes.iterdir()))), "--prior_loss_weight", "1.0"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_imports([script.parent]))
        stack.enter_context(diffusers_example_shims())
        stack.enter_context(same_start(studio["init"], models))
        stack.enter_context(replay.install())
        stack.enter_context(rec.install(backward_owner=Accelerator))
        run_script(script, argv)
    return {"rec": rec, "used": replay.used, "file": out / "pytorch_lora_weights.safetensors"}


@torch.no_grad()
def applied_outputs(folder: Path, studio: dict[str, Any], official: dict[str, Any],
                    probe: dict[str, torch.Tensor]) -> tuple[list[Any], float]:
    """The trained LoRAs applied for inference on fresh pipelines: the studio's concept (kohya keys) through
    the studio's loader vs the example's file through diffusers' ``load_lora_weights``. Compared: the text
    conditioning of the trigger prompt and the UNet output on ``probe``'s noisy latents and timesteps.
    Also returns max |UNet output with the example's LoRA − without| (how much the LoRA acts: context)."""
    from diffusers import StableDiffusionPipeline

    from studio.methods.registry import get_method
    from studio.models import load_base
    from trainers.conditioning import encode_prompts

    prompt = [f"a photo of a {TOKEN} dog"] * probe["noisy"].shape[0]
    base = load_base(str(folder), device="cpu", dtype="float32")
    applied = get_method("lora").apply(base, studio["concept"], strength=1.0)
    ours_h = encode_prompts(base.pipe, prompt, resolution=32, device=torch.device("cpu")).encoder_hidden_states
    ours = base.pipe.unet(probe["noisy"], probe["timesteps"], ours_h).sample
    applied.remove()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(official["file"].parent), weight_name=official["file"].name)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    theirs_h = pipe.text_encoder(ids)[0]
    theirs = pipe.unet(probe["noisy"], probe["timesteps"], theirs_h).sample
    plain = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    plain_pred = plain.unet(probe["noisy"], probe["timesteps"], plain.text_encoder(ids)[0]).sample
    return [
        compare("saved LoRA applied: text conditioning of the trigger prompt", ours_h, theirs_h, atol=1e-6, rtol=1e-5),
        compare("saved LoRA applied: UNet output", ours, theirs, atol=1e-6, rtol=1e-5),
    ], float((theirs - plain_pred).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help="root of a checkout of github.com/huggingface/diffusers")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="a rate that moves the tiny model's LoRA visibly in 4 steps")
    ap.add_argument("--no-prior", dest="prior", action="store_false", help="without prior preservation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-commit", help="the checkout's commit, for the title when --ref is a copy without .git")
    args = ap.parse_args(argv)
    args.resolution = 32
    require_file(args.ref, SCRIPT, REPO)  # before any training: fail fast
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = build_tiny_folder("tiny", tmp / "base")
        images = write_images(tmp / "images", n=3, size=args.resolution)
        classes = write_images(tmp / "classes", n=4, size=args.resolution, seed=1)
        ours = studio_run(folder, images, classes, args)
        theirs = official_run(args.ref.resolve(), folder, images, classes, ours, args, tmp / "official")
        o, t = ours["rec"], theirs["rec"]
        if len(t.after) != args.steps or theirs["used"]["noise"] != args.steps:
            print(f"the example took {len(t.after)} steps and replayed {theirs['used']}; expected {args.steps}")
            return 1
        final, effect = applied_outputs(folder, ours, theirs, o.unet[0])
    n_unet = sum(v for k, v in ours["sizes"].items() if k.startswith("unet:"))
    init = torch.cat([v.reshape(-1) for v in ours["init"].values()])
    # canonical keys sort "te:" before "unet:": the text encoder's tensors come first in the vectors
    n_te = init.numel() - n_unet
    parts = {"text-encoder LoRA": slice(0, n_te), "UNet LoRA": slice(n_te, None)}
    rows = []
    for k in range(args.steps):
        s = f"step {k + 1}: "
        rows += [
            compare(s + "UNet input (noisy latents, instance + class)", o.unet[k]["noisy"], t.unet[k]["noisy"],
                    atol=1e-6, rtol=1e-5),
            compare(s + "text conditioning (text-encoder LoRA applied)", o.unet[k]["hidden"], t.unet[k]["hidden"],
                    atol=1e-6, rtol=1e-5),
            compare(s + "UNet prediction (LoRA applied)", o.unet[k]["pred"], t.unet[k]["pred"], atol=1e-6, rtol=1e-5),
            compare(s + "loss (instance + prior)", ours["losses"][k], t.losses[k], atol=0, rtol=1e-5),
        ]
        for label, sl in parts.items():
            # Adam's step is lr·m/(√v + ε) per entry: where |g| ≲ ε (1e-8) it is lr·g/ε, so float-rounding
            # differences of such gradients are amplified ~lr/ε. The full vector is shown (explained) and the
            # entries whose gradient was never in (0, 100·ε) so far are checked (exact zeros — the LoRA A
            # matrices at step 1, while B = 0 — are zero on both sides and are kept).
            g_abs = torch.stack([t.grads[j][sl].abs() for j in range(k + 1)])
            big = ~((g_abs > 0) & (g_abs < 1e-6)).any(0)
            rows += [
                compare(s + f"gradient of the {label} (clipped)", o.grads[k][sl], t.grads[k][sl], atol=1e-9,
                        rtol=1e-4),
                compare(s + f"{label} after the step, all entries", o.after[k][sl], t.after[k][sl], atol=1e-7,
                        rtol=1e-5, explained=True, note="Adam: entries with |g| ≲ ε amplify rounding"),
                compare(s + f"{label} after the step, {int(big.sum())}/{big.numel()} entries whose |g| was never in (0, 100ε)",
                        o.after[k][sl][big], t.after[k][sl][big], atol=1e-7, rtol=1e-5),
            ]
    for label, sl in parts.items():
        rows.append(compare(f"{label}: starting values (before step 1)", o.before[0][sl], t.before[0][sl], atol=0,
                            rtol=0))
        rows.append(compare(f"{label}: update after {args.steps} steps", o.after[-1][sl] - init[sl],
                            t.after[-1][sl] - init[sl], atol=1e-8, rtol=1e-3, explained=True,
                            note="all entries; Adam near ε, see the per-step rows"))
    rows += final
    commit = ref_label(args.ref, args.ref_commit)
    title = (f"DreamBooth-LoRA — studio vs huggingface/diffusers@{commit} {SCRIPT} — base tiny, rank {args.rank}, "
             f"UNet + text encoder, prior preservation {'on' if args.prior else 'off'}, {args.steps} steps, batch "
             f"{args.batch}(+{args.batch} class), lr {args.lr:g}, clip 1.0 ({time.monotonic() - t0:.0f} s)")
    ok = print_table(title, rows)
    print(f"\nthe trained LoRA changes the UNet output by up to {effect:.3e} (max |with − without|, example's file)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
