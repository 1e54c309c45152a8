"""Parity of the studio's CoRe (``--core`` of textual inversion) with the official code.

Reference: github.com/pangy9/CoRe (Wu et al. 2025) — ``utils.get_context_embedding_loss``,
``modules/hook.py`` (``UNetCrossAttentionHooker``), ``modules/my_clip/clip_model.py`` and ``train.py``,
imported or run from the checkout given with ``--ref``, never copied. Checked at commit
308f55baf4e78081bb25e2ab94e63becb6052298.

Where the official code departs from the paper (the studio follows the paper; docs/methods.md, "CoRe"):

* **Context embedding loss, cosine axis.** The code takes ``F.cosine_similarity(…, dim=1)`` on
  ``(1, n_ctx, D)`` tensors: a cosine per *feature channel across the context tokens*, averaged over
  channels. Paper Eq. 3 is a cosine per *token over its features*. The "corrected" runs below put the
  feature axis into their call (a run-time shim of ``F.cosine_similarity`` in their ``utils`` module:
  ``dim=-1``); the "as published" table shows the difference (explained).
* **Normalisation of L_emb.** Their mean (and the paper's ``1/(n−1)``) runs over every context token,
  the ones before the concept included; the text encoder is causal, so those have the same outputs in
  both prompts and add exactly 0 to the sum. The studio averages over the tokens after the concept only,
  so its L_emb is their (corrected) one times ``n_ctx / n_after`` — a per-template factor (9/4 for "a
  photo of a {} in the jungle"). The rows multiply the studio's value by ``n_after / n_ctx``; the
  training run gives the studio ``λ_emb · n_after / n_ctx`` (one template, so one factor).
* **L_attn, batch.** Their attention loss is a *sum* over the batch of per-sample MSEs; the studio's is
  the mean. The training run gives the studio ``λ_attn · B``.
* **L_attn, layers.** Theirs averages the per-layer squared differences over the layers; the paper's
  Eq. 4 (and the studio) squares the difference of the layer-averaged means. These agree when one
  layer is read; the training run therefore uses a tiny UNet whose only cross-attention layer is
  the mid block's (the per-layer maps of the 7-layer tiny UNet are compared at function level).

Run-time shims (for the run only): the encoder of their ``CLIPTextModel`` gets today's mask interface
(``crossinit._CompatEncoder``), ``torchvision.transforms`` stand-ins for their dataset (the replayed
batches replace its images), the Hub names of ``legacy_library_shims``. The base is ``tiny-v``
(SD 2.x-like, pads with "!", like the official SD 2.1 default): their ``eot_index = (ids == 49407)
.nonzero().item()`` raises on a tokenizer that pads with end-of-text (SD 1.x's), where it finds 77−k
matches.

Compared:

1. function level on the 7-layer ``tiny-v``: L_emb and its gradient wrt the token vector, theirs
   ``get_context_embedding_loss`` vs the studio's ``context_embedding_loss`` (through the TI trainer's
   own encoding), for three templates, as published (explained) and corrected; each layer's per-token
   attention means for the class and concept prompts, their ``UNetCrossAttentionHooker`` vs the
   studio's ``AttentionCapture``;
2. ``--steps`` training steps of their ``train.py --train_ti`` (diffusion + CoRe terms, rescaling window
   ``--rescale-start``…``--rescale-stop``) against the studio's ``--core`` TI on the studio's draws: the
   three UNet passes of every step (inputs and predictions), the total loss, the gradient of the
   token vector, the vector after each optimizer step and entering the next one (after the rescaling).

Run (a few minutes on 2 shared CPU cores)::

    git clone https://github.com/pangy9/CoRe /tmp/CoRe
    python -m bench.parity.core --ref /tmp/CoRe
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.parity.common import (
    DrawReplay,
    Row,
    StepRecorder,
    build_tiny_folder,
    compare,
    isolated_imports,
    legacy_library_shims,
    patched,
    print_table,
    record_ti_training,
    ref_label,
    require_file,
    run_script,
    torchvision_standins,
    whole,
    write_images,
)
from bench.parity.crossinit import _CompatEncoder

REPO = "github.com/pangy9/CoRe"
TOKEN = "<parity>"
THEIR_TOKEN = "<core>"  # their --object_token; the placeholder is <core>_v0, the first added id (49408)
TEMPLATES = ["a photo of a {} in the jungle", "a {} on a wooden table next to a red apple", "{} swimming"]
TRAIN_TEMPLATE = "a painting of a {} on the beach at sunset"
CLASS = "dog"


# ----------------------------------------------------------------------------- shims and models


@contextlib.contextmanager
def reference_shims(ref: Path, *, feature_cosine: bool) -> Any:
    """Their modules importable on today's libraries; ``feature_cosine``: their ``utils.F.cosine_similarity``
    takes the cosine over the feature axis (paper Eq. 3) instead of their ``dim=1``."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_imports([ref]))
        stack.enter_context(legacy_library_shims())
        stack.enter_context(torchvision_standins())
        import modules.my_clip.clip_model as clip_model
        import utils as their_utils

        stack.enter_context(patched(clip_model, "CLIPEncoder", _CompatEncoder))
        if feature_cosine:
            cosine = F.cosine_similarity
            f_ns = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
            f_ns.cosine_similarity = lambda a, b, dim=1, eps=1e-8: cosine(a, b, dim=-1, eps=eps)
            stack.enter_context(patched(their_utils, "F", f_ns))
        yield types.SimpleNamespace(utils=their_utils, clip=clip_model)


def one_layer_folder(folder: Path, seed: int = 0) -> Path:
    """Replace ``folder``'s UNet with one whose only cross-attention layer is the mid block's (same
    widths, down/up blocks without attention): one layer, where the official and the paper's
    attention loss are the same formula."""
    from diffusers import UNet2DConditionModel

    cfg = dict(UNet2DConditionModel.load_config(str(folder / "unet")))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    n = len(cfg["down_block_types"])
    cfg["down_block_types"] = ["DownBlock2D"] * n
    cfg["up_block_types"] = ["UpBlock2D"] * n
    torch.manual_seed(seed)
    unet: Any = UNet2DConditionModel(**cfg)
    unet.save_pretrained(str(folder / "unet"))
    return folder


def ti_trainer(folder: Path, images: Path, **overrides: Any) -> tuple[Any, Any, Any]:
    """The studio's base, TI config and trainer (one vector from 'dog', CoRe on)."""
    from studio.models import load_base
    from trainers.textual_inversion import TextualInversionConfig, TextualInversionTrainer

    base = load_base(str(folder), device="cpu", dtype="float32")
    kw: dict[str, Any] = dict(images=str(images), token=TOKEN, class_word=CLASS, init="plain", init_words=CLASS,
                              num_vectors=1, flip=False, weight_decay=1e-2, reg_weight=0.0, probe=False,
                              budget="fixed", log_every=0, core=True)
    kw.update(overrides)
    cfg = TextualInversionConfig(**kw)
    return base, cfg, TextualInversionTrainer(base, cfg, TOKEN)


def their_encoder(mod: Any, folder: Path) -> tuple[Any, Any, int]:
    """Their ``CLIPTextModel`` and tokenizer with ``<core>_v0`` added and its row set to 'dog''s, as their
    ``train.py`` does; returns the placeholder's id."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    tok.add_tokens([f"{THEIR_TOKEN}_v0"])
    te = mod.clip.CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
    te.resize_token_embeddings(len(tok))
    pid = tok.convert_tokens_to_ids(f"{THEIR_TOKEN}_v0")
    init = mod.utils.get_token_embeds([CLASS], tok, te)
    te.get_input_embeddings().weight.data[pid] = init[0]
    te.requires_grad_(False)
    return te, tok, pid


# ----------------------------------------------------------------------------- 1. function level


def function_level(ref: Path, folder: Path, images: Path) -> tuple[list[Row], list[Row]]:
    """(as-published rows (explained), corrected rows): L_emb values and gradients, and the attention maps."""
    from studio.methods.attention import unet_layers
    from trainers.conditioning import encode_prompts
    from trainers.core import AttentionCapture, capturing, context_embedding_loss, encoder_states, make_pairs

    base, cfg, trainer = ti_trainer(folder, images, core_attention_weight=0.0, steps=1)
    published: list[Row] = []
    corrected: list[Row] = []
    try:
        p = trainer.params[0]
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # a trained-looking vector: 'dog' plus a perturbation of its own size
            p.add_(0.5 * p.norm() * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        v_star = p.detach().clone()
        pipe = base.pipe
        ours: dict[str, tuple[float, torch.Tensor, int, int]] = {}
        for template in TEMPLATES:
            pair = make_pairs(pipe, [template], trainer.text(), CLASS)[0]
            p.grad = None
            cond = encode_prompts(pipe, [pair.concept], resolution=32, device=torch.device("cpu"))
            with torch.no_grad():
                klass = encode_prompts(pipe, [pair.klass], resolution=32, device=torch.device("cpu"))
            loss = context_embedding_loss(encoder_states(pipe, cond), encoder_states(pipe, klass), [pair])
            loss.backward()
            assert p.grad is not None
            n_before, n_after = len(pair.before), len(pair.concept_after)
            ours[template] = (float(loss), p.grad.detach().clone(), n_before, n_after)
        # the attention maps, per layer, with the studio's capture (class and concept prompt, batch 2)
        pair = make_pairs(pipe, [TEMPLATES[0]], trainer.text(), CLASS)[0]
        unet = pipe.unet
        n_layers = len(unet_layers(unet))
        noisy = torch.randn(2, 4, 16, 16, generator=gen)
        ts = torch.tensor([150, 700])
        maps_ours = {}
        with torch.no_grad():
            for kind, prompt in (("class", pair.klass), ("concept", pair.concept)):
                cond = encode_prompts(pipe, [prompt] * 2, resolution=32, device=torch.device("cpu"))
                with capturing(unet, AttentionCapture(range(n_layers))) as cap:
                    cap.active = True
                    unet(noisy, ts, cond.encoder_hidden_states)
                    maps_ours[kind] = torch.stack([cap.maps[i] for i in range(n_layers)])  # (L, B, T)
    finally:
        trainer.teardown()

    from diffusers import UNet2DConditionModel

    for feature_cosine in (False, True):
        with reference_shims(ref, feature_cosine=feature_cosine) as mod:
            te, tok, pid = their_encoder(mod, folder)
            for template in TEMPLATES:
                v = torch.nn.Parameter(v_star.clone())
                out = mod.utils.get_context_embedding_loss([f"{THEIR_TOKEN}_v0"], [CLASS], v, tok, te, template, 1.0,
                                                          weight_dtype=torch.float32)
                out["context_embedding_loss"].backward()
                value, grad, n_before, n_after = ours[template]
                n_ctx = n_before + n_after  # their context: [0, start) ∪ (start, eot]
                if feature_cosine:
                    factor = n_after / n_ctx
                    corrected += [
                        compare(f"L_emb '{template}' (studio × n_after/n_ctx = {n_after}/{n_ctx})", value * factor,
                                float(out["context_embedding_loss"]), atol=1e-7, rtol=1e-5),
                        compare(f"∂L_emb/∂v* '{template}' (studio × {n_after}/{n_ctx})", grad * factor, v.grad,
                                atol=1e-9, rtol=1e-4),
                    ]
                else:
                    published += [
                        compare(f"L_emb '{template}', as published (cosine over tokens, dim=1)", value,
                                float(out["context_embedding_loss"]), explained=True,
                                note="their cosine axis: tokens, not features"),
                        compare(f"∂L_emb/∂v* '{template}', as published", grad, v.grad, explained=True),
                    ]
            if feature_cosine:  # their hooker's per-layer maps on the same inputs
                unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
                from modules.hook import UNetCrossAttentionHooker

                te.get_input_embeddings().weight.data[pid] = v_star[0]  # the studio's capture ran with v*
                hooker = UNetCrossAttentionHooker(True)
                unet.set_attn_processor(hooker)
                for kind, prompt in (("class", pair.klass), ("concept", pair.concept)):
                    text = prompt.replace(trainer.text(), f"{THEIR_TOKEN}_v0")
                    ids = tok(text, padding="max_length", truncation=True, max_length=tok.model_max_length,
                              return_tensors="pt").input_ids
                    with torch.no_grad():
                        hidden = te(input_ids=ids)[0].repeat(2, 1, 1)
                        unet(noisy, ts, hidden)
                    theirs = torch.stack([m.mean((2, 3)) for m in hooker.cross_attn_maps])  # (L, B, T)
                    hooker.clear()
                    corrected.append(compare(f"per-layer token attention means μ, {kind} prompt, {n_layers} layers "
                                             "(their hooker vs the studio's capture)", maps_ours[kind], theirs,
                                             atol=1e-7, rtol=1e-5))
    return published, corrected


# ----------------------------------------------------------------------------- 2. training


def studio_run(folder: Path, images: Path, prompt_file: Path, factor: float, args: argparse.Namespace) -> dict[str, Any]:
    """The studio's ``--core`` TI through its own loop, weights rescaled to their normalisation."""
    base, cfg, trainer = ti_trainer(
        folder, images, steps=args.steps, lr=args.lr, batch_size=args.batch, seed=args.seed,
        core_embedding_weight=args.lambda_emb * factor, core_attention_weight=args.lambda_attn * args.batch,
        core_prompts_file=str(prompt_file), core_layers="all",
        core_rescale_start=args.rescale_start / args.steps, core_rescale_end=args.rescale_stop / args.steps)
    out = record_ti_training(base, cfg, trainer)
    out["window"] = (trainer.window.start, trainer.window.end) if trainer.window else None
    return out


def official_run(ref: Path, folder: Path, images: Path, prompt_file: Path, studio: dict[str, Any],
                 args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Their ``train.py --train_ti`` on the studio's draws (feature-axis cosine shim)."""
    from accelerate import Accelerator
    from transformers import CLIPTokenizer

    script = require_file(ref, "train.py", REPO)
    name = f"{THEIR_TOKEN}_v0"
    tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    tok.add_tokens([name])
    batches = []
    for prompts, lat in zip(studio["draws"].prompts, studio["draws"].latents):
        mapped = [p.replace(studio["text"], name) for p in prompts]
        t = tok(mapped, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt")
        batches.append({"input_ids": t.input_ids, "attention_mask": t.attention_mask,
                        "pixel_values": torch.zeros(lat.shape[0], 3, args.resolution, args.resolution)})
    replay = DrawReplay(studio["draws"].latents, studio["draws"].noise, studio["draws"].timesteps, batches,
                        studio["scaling"])
    rec = StepRecorder(select=lambda opt: whole(opt.param_groups[0]["params"][0]))
    argv = ["--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(images),
            "--instance_prompt", "a photo of a {}", "--output_dir", str(out), "--seed", str(args.seed),
            "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
            "--max_train_steps", str(args.steps), "--learning_rate", str(args.lr), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--train_ti", "--object_token", THEIR_TOKEN, "--n_object_embedding", "1",
            "--initialize_token", CLASS, "--prompts_file_path", str(prompt_file),
            "--embedding_cosine_weight", str(args.lambda_emb), "--attention_mean_weight", str(args.lambda_attn),
            "--rescale_start_step", str(args.rescale_start), "--rescale_stop_step", str(args.rescale_stop),
            "--flip_p", "0", "--save_step", "1000000", "--checkpointing_steps", "1000000", "--report_to", "all"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(reference_shims(ref, feature_cosine=True))
        stack.enter_context(replay.install())
        stack.enter_context(rec.install(backward_owner=Accelerator))
        run_script(script, argv)
    return {"rec": rec, "used": replay.used}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help="root of a checkout of github.com/pangy9/CoRe")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3, help="the paper's stage-1 rate")
    ap.add_argument("--lambda-emb", type=float, default=0.5,
                    help="λ_emb (the paper's 1.5e-4 leaves the term below float noise on a 4-step tiny run)")
    ap.add_argument("--lambda-attn", type=float, default=2e4,
                    help="λ_attn (the paper's 0.05 likewise: the tiny UNet's attention means differ by ~1e-5, so a "
                    "large weight makes the term move the gradient visibly)")
    ap.add_argument("--rescale-start", type=int, default=1)
    ap.add_argument("--rescale-stop", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-commit", help="the checkout's commit, for the title when --ref is a copy without .git")
    args = ap.parse_args(argv)
    args.resolution = 32
    require_file(args.ref, "utils.py", REPO)
    ref = args.ref.resolve()
    commit = ref_label(args.ref, args.ref_commit)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = build_tiny_folder("tiny-v", tmp / "base")
        images = write_images(tmp / "images", n=3, size=args.resolution)
        published, corrected = function_level(ref, folder, images)
        t1 = time.monotonic()
        print_table(f"CoRe L_emb as published — studio (paper Eq. 3) vs pangy9/CoRe@{commit} utils.py — tiny-v "
                    f"(explained: their cosine runs over the token axis)", published)
        ok = print_table(f"CoRe function level, corrected — studio vs pangy9/CoRe@{commit} (their cosine over "
                         f"features; studio L_emb × n_after/n_ctx) — tiny-v ({t1 - t0:.0f} s)", corrected)

        one = one_layer_folder(build_tiny_folder("tiny-v", tmp / "one"))
        prompt_file = tmp / "prompts.txt"
        prompt_file.write_text(TRAIN_TEMPLATE + "\n")
        from studio.models import load_base
        from trainers.core import make_pairs

        base = load_base(str(one), device="cpu", dtype="float32")
        from trainers.textual_inversion import placeholder_tokens

        pair = make_pairs(base.pipe, [TRAIN_TEMPLATE], " ".join(placeholder_tokens(TOKEN, 1)), CLASS)[0]
        factor = len(pair.concept_after) / (len(pair.before) + len(pair.concept_after))
        del base
        ours = studio_run(one, images, prompt_file, factor, args)
        theirs = official_run(ref, one, images, prompt_file, ours, args, tmp / "official")
        # controls: the studio without one of the CoRe terms, on the same draws — how far each term moves
        # the gradient (the parity rows must be far below that)
        controls = {}
        for label, change in (("L_emb", {"lambda_emb": 0.0}), ("L_attn", {"lambda_attn": 0.0})):
            ctl = studio_run(one, images, prompt_file, factor, argparse.Namespace(**(vars(args) | change)))
            controls[label] = ctl["rec"].grads
    o, t = ours["rec"], theirs["rec"]
    if len(t.after) != args.steps or theirs["used"]["noise"] != args.steps or len(t.unet) != 3 * args.steps:
        print(f"their loop took {len(t.after)} steps, {len(t.unet)} UNet passes, replayed {theirs['used']}; "
              f"expected {args.steps} steps, {3 * args.steps} passes")
        return 1
    rows = [compare("initial vector (embedding of 'dog')", ours["init"], t.before[0], atol=0, rtol=1e-6)]
    for k in range(args.steps):
        s = f"step {k + 1}: "
        for j, what in enumerate(("diffusion pass", "class-prompt pass (L_attn)", "concept-prompt pass (L_attn)")):
            a, b = o.unet[3 * k + j], t.unet[3 * k + j]
            rows += [compare(s + f"{what}: text conditioning", a["hidden"], b["hidden"], atol=1e-6, rtol=1e-5),
                     compare(s + f"{what}: UNet prediction", a["pred"], b["pred"], atol=1e-6, rtol=1e-5)]
        rows += [
            compare(s + "total loss (diffusion + λ_emb·L_emb + λ_attn·L_attn)", ours["losses"][k], t.losses[k],
                    atol=1e-7, rtol=1e-5),
            compare(s + "gradient of the vector", o.grads[k], t.grads[k], atol=1e-9, rtol=1e-4),
            compare(s + "vector after the optimizer step", o.after[k], t.after[k], atol=1e-8, rtol=1e-5),
        ]
        if k + 1 < args.steps:
            rows.append(compare(s + "vector entering the next step (after the norm rescaling)", o.before[k + 1],
                                t.before[k + 1], atol=1e-8, rtol=1e-5))
    rows += [compare(f"control: the studio without {label}, gradients of all steps (must differ)",
                     torch.stack(grads), torch.stack(t.grads), explained=True, note="sensitivity, not a check")
             for label, grads in controls.items()]
    norms = [float(v.norm()) for v in t.before[1:]] + [float(t.after[-1].norm())]
    rows += [compare(f"update after {args.steps} steps (vector − init)", o.after[-1] - ours["init"],
                     t.after[-1] - t.before[0], atol=1e-8, rtol=1e-3),
             compare("saved vector (emb_params) vs their last vector", ours["final"], t.after[-1], atol=1e-8,
                     rtol=1e-5)]
    title = (f"CoRe training — studio --core TI vs pangy9/CoRe@{commit} train.py --train_ti — tiny-v with one "
             f"cross-attention layer, {args.steps} steps, batch {args.batch}, lr {args.lr:g}, λ_emb {args.lambda_emb:g} "
             f"(studio × {factor:.3f}), λ_attn {args.lambda_attn:g} (studio × {args.batch}), rescaling window "
             f"{args.rescale_start}–{args.rescale_stop} (studio {ours['window']}), their cosine over features "
             f"({time.monotonic() - t0:.0f} s)")
    ok = print_table(title, rows) and ok
    print(f"\nnorm of the vector entering steps 2…{args.steps} and after the last: "
          + ", ".join(f"{n:.6f}" for n in norms))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
