"""Parity of the studio's Custom Diffusion (training and the closed-form merge) with the reference code.

References, imported or run from checkouts, never copied:

* training — github.com/huggingface/diffusers ``examples/custom_diffusion/train_custom_diffusion.py``
  (the port of the authors' training to diffusers; ``--diffusers`` points at the diffusers checkout),
  checked at 58eb52c0803ea9af3abec60841c2a093bdf1f951;
* merge — github.com/adobe-research/custom-diffusion ``src/diffusers_composenW.py``
  (``gdupdateWexact``, the constrained least-squares solve; ``--ref``), checked at
  7c19c9a7820d07389f5390e09d7b85d702bafd7b.

1. **Training**, ``--steps`` steps on the studio's draws (latents, noise, timesteps, prompts), prior
   preservation on (2 + 2 class images, one batch on both sides), the modifier token ``<new1>`` from
   ``pll`` (one token here), K/V of every cross-attention layer, clip 1.0: per step the text conditioning and the UNet
   prediction, the loss, the gradients
   of the token's row and of every ``W_k``/``W_v``, and the weights after the step (the studio's
   ``W₀ + ΔW`` vs the example's full ``to_k_custom_diffusion``/``to_v_custom_diffusion``); the saved
   concept's K/V and token vs the example's last state.
   The example runs with ``--noaug`` (its random-scale augmentation changes pixels, mask and prompt,
   and the studio does not port it: trainers/custom_diffusion.py) and ``--adam_weight_decay 0``:
   AdamW's decoupled decay acts on the example's full ``W`` (and on every row of the whole embedding
   table, whose other rows' gradients it zeroes) and on the studio's ``ΔW``, so with decay the two
   differ by ``lr · wd · W₀`` per step. A second table shows that difference at the example's default
   1e-2 (explained; the studio's own default decay is 0).
2. **Merge**: two Custom Diffusion concepts on the same base — the concept trained in part 1 and a
   second one (``<new2>`` cat, its K/V and token drawn near the first's) — merged by the studio's
   ``merge_concepts`` with ridge 0, against their ``gdupdateWexact`` per layer and projection on the
   same regularisation features, target features and target values (the studio's
   ``caption_features`` / ``target_features``); with the studio's default ridge (1e-6·tr(M)/D) as an
   explained row.

Their ``compose`` itself needs CUDA and fp16 and reshapes features to 768 columns (SD 1.x's width), so
the script calls their solver, not ``compose``. How their ``compose`` builds the features, from
reading it: regularisation captions lose BOS, and those with "photo of a" within their first 15
characters lose their first 4 tokens (for "a photo of a dog" that keeps "a dog" and EOS); target
phrases are "V* class" and "photo of a V* class" from the modifier token on. The studio takes every
real token after BOS of every caption and the same target rows; the script's captions avoid "photo
of a", where the two definitions agree.

Run (about 2 minutes on 2 shared CPU cores)::

    git clone https://github.com/huggingface/diffusers /tmp/diffusers
    git clone https://github.com/adobe-research/custom-diffusion /tmp/custom-diffusion
    python -m bench.parity.custom_diffusion --diffusers /tmp/diffusers --ref /tmp/custom-diffusion
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
    Row,
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

SCRIPT = "examples/custom_diffusion/train_custom_diffusion.py"
MERGE = "src/diffusers_composenW.py"
TOKEN = "<new1>"
CLASS = "dog"
CLASS_PROMPT = "photo of a dog"
INIT = "pll"  # one token in the tiny base's tokenizer ("ktn", the paper's, is two there)
CAPTIONS = ["a dog running on the beach", "a red car parked near a house", "an old man reading a book",
            "two cats sleeping on a sofa", "a bowl of fruit on a wooden table", "a mountain lake at sunrise",
            "a child flying a kite in a park", "a city street at night with lights", "a bird sitting on a branch",
            "a plate of pasta with tomato sauce", "a boat on a calm river", "a woman riding a bicycle",
            "a snowy forest in winter", "a cup of coffee next to a laptop", "a horse in a green field",
            "a lighthouse on a rocky coast", "a painting of flowers in a vase", "a train crossing a bridge",
            "a group of people at a concert", "a small house in the mountains"]


def trained_final_norm(folder: Path, seed: int = 0) -> Path:
    """Give the tiny text encoder's final LayerNorm a drawn scale and shift, as a trained one has. A fresh
    LayerNorm (scale 1, shift 0) puts every output in the (D−1)-dimensional subspace orthogonal to
    (1, …, 1), so the merge's ``C_regᵀ C_reg`` is singular: with no ridge both solvers blow up."""
    from safetensors.torch import load_file, save_file

    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(seed + 17)
    for key in [k for k in state if k.endswith("final_layer_norm.weight")]:
        state[key] = state[key] * (1 + 0.2 * torch.randn(state[key].shape, generator=gen))
        bias = key[: -len("weight")] + "bias"
        state[bias] = state[bias] + 0.2 * torch.randn(state[bias].shape, generator=gen)
    save_file(state, str(path), metadata={"format": "pt"})
    return folder


def _vector(token: torch.Tensor, token_grad: torch.Tensor | None, kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
            kv_grad: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]) -> torch.Tensor:
    """[token row, then W_k, W_v of every layer in name order] flat, gradient attached (StepRecorder)."""
    names = sorted(kv)
    vec = torch.cat([token.reshape(-1)] + [w.reshape(-1) for n in names for w in kv[n]]).detach().clone()
    grads = [token_grad] + [g for n in names for g in kv_grad[n]]
    vec._parity_grad = None if any(g is None for g in grads) else torch.cat(  # type: ignore[attr-defined]
        [g.reshape(-1) for g in grads if g is not None]).detach().clone()
    return vec


def studio_run(folder: Path, images: Path, classes: Path, args: argparse.Namespace, wd: float) -> dict[str, Any]:
    """The studio's Custom Diffusion trainer through its own loop, draws and steps recorded."""
    from studio.methods.custom_diffusion.hook import base_weight
    from studio.models import load_base
    from trainers.custom_diffusion import CustomDiffusionConfig, CustomDiffusionTrainer
    from trainers.loop import load_training_images, run_training

    base = load_base(str(folder), device="cpu", dtype="float32")
    cfg = CustomDiffusionConfig(images=str(images), token=TOKEN, class_word=CLASS, steps=args.steps, lr=args.lr,
                                batch_size=args.batch, flip=False, seed=args.seed, probe=False, budget="fixed",
                                log_every=0, weight_decay=wd, max_grad_norm=1.0, init_token=INIT,
                                instance_prompt="photo of a {}", prior_preservation=True, class_images=str(classes),
                                prior_weight=1.0, class_prompt=CLASS_PROMPT, scale_lr=False)
    trainer = CustomDiffusionTrainer(base, cfg, TOKEN)
    unet = base.pipe.unet
    w0 = {n: (base_weight(unet.get_submodule(n).to_k).detach().clone(),
              base_weight(unet.get_submodule(n).to_v).detach().clone()) for n in trainer.deltas}

    def select(opt: Any) -> torch.Tensor:
        tok = trainer.embeddings[0]
        kv = {n: (w0[n][0] + dk.detach(), w0[n][1] + dv.detach()) for n, (dk, dv) in trainer.deltas.items()}
        grads = {n: (dk.grad, dv.grad) for n, (dk, dv) in trainer.deltas.items()}
        return _vector(tok.detach(), tok.grad, kv, grads)

    examples = load_training_images(cfg, base)
    rec = StepRecorder(select=select)
    with rec.install(), record_studio_draws(trainer) as draws:
        result = run_training(base, trainer, cfg, method="custom_diffusion", examples=examples, save=False)
    return {"rec": rec, "draws": draws, "losses": result.losses, "concept": result.concept,
            "scaling": float(base.pipe.vae.config.scaling_factor), "layers": sorted(trainer.deltas)}


def official_run(ref: Path, folder: Path, images: Path, classes: Path, studio: dict[str, Any],
                 args: argparse.Namespace, out: Path, wd: float, channel_mask: bool) -> dict[str, Any]:
    """The diffusers example on the studio's draws. ``channel_mask``: the replayed valid-region mask
    ``(B, C, h, w)`` (broadcast over the latent channels) instead of the ``(B, 1, h, w)`` its collate
    builds — their ``(loss·mask).sum([1,2,3]) / mask.sum([1,2,3])`` is then the per-element mean."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    script = require_file(ref, SCRIPT, "github.com/huggingface/diffusers")
    tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    tok.add_tokens(TOKEN)
    tid = tok.convert_tokens_to_ids(TOKEN)
    d = studio["draws"]
    lat, noise, ts = d.latents, d.noise, d.timesteps  # per step: instance rows, then class rows
    batches = []
    for k, prompts in enumerate(d.prompts):
        n_class = lat[k].shape[0] - len(prompts)
        ids = tok(prompts + [CLASS_PROMPT] * n_class, padding="max_length", truncation=True,
                  max_length=tok.model_max_length, return_tensors="pt").input_ids
        batches.append({"input_ids": ids, "pixel_values": torch.zeros(lat[k].shape[0], 3, 32, 32),
                        "mask": torch.ones(lat[k].shape[0], lat[k].shape[1] if channel_mask else 1,
                                           *lat[k].shape[-2:])})
    # the example's dataset asks the VAE for the latent size once, before training: a first, dummy latent
    replay = DrawReplay([torch.zeros(1, *lat[0].shape[1:])] + lat, noise, ts, batches, studio["scaling"])
    held: dict[str, Any] = {}
    set_procs = UNet2DConditionModel.set_attn_processor

    def keep(unet: Any, processor: Any) -> Any:
        held["unet"] = unet
        return set_procs(unet, processor)

    def select(opt: Any) -> torch.Tensor:
        table = opt.param_groups[0]["params"][0]  # the whole token-embedding table comes first
        procs = held["unet"].attn_processors
        kv, grads = {}, {}
        for name, proc in procs.items():
            if hasattr(proc, "to_k_custom_diffusion") and proc.train_kv:
                layer = name[: -len(".processor")]
                k_w, v_w = proc.to_k_custom_diffusion.weight, proc.to_v_custom_diffusion.weight
                kv[layer], grads[layer] = (k_w.detach(), v_w.detach()), (k_w.grad, v_w.grad)
        return _vector(table.detach()[tid:tid + 1], None if table.grad is None else table.grad[tid:tid + 1], kv, grads)

    rec = StepRecorder(select=select)
    argv = ["--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(images),
            "--instance_prompt", f"photo of a {TOKEN} {CLASS}", "--class_data_dir", str(classes),
            "--class_prompt", CLASS_PROMPT, "--with_prior_preservation", "--prior_loss_weight", "1.0",
            "--num_class_images", str(len(list(classes.iterdir()))), "--output_dir", str(out),
            "--seed", str(args.seed), "--resolution", "32", "--train_batch_size", str(args.batch),
            "--max_train_steps", str(args.steps), "--learning_rate", str(args.lr), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--modifier_token", TOKEN, "--initializer_token", INIT, "--noaug",
            "--adam_weight_decay", str(wd), "--max_grad_norm", "1.0", "--checkpointing_steps", "1000000",
            "--report_to", "all", "--no_safe_serialization"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_imports([script.parent]))
        stack.enter_context(diffusers_example_shims())
        stack.enter_context(patched(UNet2DConditionModel, "set_attn_processor", keep))
        stack.enter_context(replay.install())
        stack.enter_context(rec.install(backward_owner=Accelerator))
        run_script(script, argv)
    return {"rec": rec, "used": replay.used}


def training_rows(ours: dict[str, Any], theirs: dict[str, Any], args: argparse.Namespace, *,
                  explained: str = "") -> list[Row]:
    o, t = ours["rec"], theirs["rec"]
    if len(t.after) != args.steps or theirs["used"]["noise"] != args.steps:
        raise SystemExit(f"the example took {len(t.after)} steps and replayed {theirs['used']}; expected {args.steps}")
    width = int(ours["concept"].tensors["custom_diffusion.embedding"].numel())
    parts = {"token row": slice(0, width), "K/V weights": slice(width, None)}
    kw: dict[str, Any] = {"explained": True, "note": explained} if explained else {}
    rows = []
    for k in range(args.steps):
        s = f"step {k + 1}: "
        pred, hidden = o.unet[k]["pred"], o.unet[k]["hidden"]
        rows += [compare(s + "text conditioning (instance + class)", hidden, t.unet[k]["hidden"], atol=1e-6, rtol=1e-5,
                         **kw),
                 compare(s + "UNet prediction (instance + class)", pred, t.unet[k]["pred"], atol=1e-6, rtol=1e-5, **kw),
                 compare(s + "loss (masked instance + prior)", ours["losses"][k], t.losses[k], atol=1e-7, rtol=1e-5,
                         **kw)]
        for label, sl in parts.items():
            rows += [compare(s + f"gradient of the {label} (clipped)", o.grads[k][sl], t.grads[k][sl], atol=1e-9,
                             rtol=1e-4, **kw),
                     compare(s + f"{label} after the step", o.after[k][sl], t.after[k][sl], atol=1e-7, rtol=1e-5,
                             **kw)]
    for label, sl in parts.items():
        # Adam's step is lr·m/(√v + ε): entries whose gradient is ≲ ε amplify rounding (README, "Adam near ε");
        # the full update is shown (explained) and the entries whose |g| never fell in (0, 100ε) are checked
        g_abs = torch.stack([t.grads[j][sl].abs() for j in range(args.steps)])
        big = ~((g_abs > 0) & (g_abs < 1e-6)).any(0)
        rows += [compare(f"{label}: update after {args.steps} steps, all entries", o.after[-1][sl] - o.before[0][sl],
                         t.after[-1][sl] - t.before[0][sl], atol=1e-8, rtol=1e-4, explained=True,
                         note=explained or "Adam near ε"),
                 compare(f"{label}: update after {args.steps} steps, {int(big.sum())}/{big.numel()} entries whose |g| "
                         "was never in (0, 100ε)", (o.after[-1][sl] - o.before[0][sl])[big],
                         (t.after[-1][sl] - t.before[0][sl])[big], atol=1e-8, rtol=1e-4, **kw)]
    return rows


def merge_rows(ref: Path, folder: Path, trained: Any, args: argparse.Namespace) -> tuple[list[Row], str]:
    """Part 2: the studio's merge (ridge 0 and default) against their ``gdupdateWexact``."""
    from studio.concept import Concept
    from studio.methods.custom_diffusion import concept_tensors
    from studio.methods.custom_diffusion.files import concept_embeddings, kv_layers
    from studio.methods.custom_diffusion.hook import base_weight
    from studio.methods.custom_diffusion.merge import (
        DEFAULT_RIDGE,
        _unique_rows,
        caption_features,
        merge_concepts,
        target_features,
    )
    from studio.methods.runtime import token_table
    from studio.models import load_base

    require_file(ref, MERGE, "github.com/adobe-research/custom-diffusion")
    base = load_base(str(folder), device="cpu", dtype="float32")
    trained.base = base.fingerprint()
    gen = torch.Generator().manual_seed(args.seed + 9)
    kv1 = kv_layers(trained.tensors)
    w0s = {n: (base_weight(base.pipe.unet.get_submodule(n).to_k).detach().float(),
               base_weight(base.pipe.unet.get_submodule(n).to_v).detach().float()) for n in kv1}
    # the second concept's update: minus half the first's (a random update makes the tiny encoder's nearly
    # collinear target rows ask for values no W can give: the solve blows up, on both sides)
    kv2 = {n: tuple(w0 - 0.5 * (w - w0) for w, w0 in zip(pair, w0s[n])) for n, pair in kv1.items()}
    emb1 = concept_embeddings(trained)
    emb2 = [e + 0.3 * e.norm() / e.shape[-1] ** 0.5 * torch.randn(e.shape, generator=gen) for e in emb1]
    second = Concept(method=trained.method, tokens=["<new2>"], tensors=concept_tensors(kv2, emb2),  # type: ignore[arg-type]
                     class_word="cat", name="second", base=trained.base)
    merged0, _ = merge_concepts(base, [trained, second], captions=CAPTIONS, ridge=0.0)
    merged_r, report = merge_concepts(base, [trained, second], captions=CAPTIONS, ridge=DEFAULT_RIDGE)
    # the same inputs for their solver: C_reg, C_tgt (both tokens in the encoder), V_tgt
    pipe = base.pipe
    c_reg = caption_features(pipe, CAPTIONS)
    table = token_table(pipe)
    table.set("parity-merge", ["<new1>", "<new2>"], [torch.cat([emb1[0], emb2[0]]).float()])
    try:
        tgt = [_unique_rows(target_features(pipe, "<new1>", CLASS)), _unique_rows(target_features(pipe, "<new2>", "cat"))]
    finally:
        table.drop("parity-merge")
    c_tgt = torch.cat(tgt)
    rows: list[Row] = []
    with isolated_imports([ref]):
        import importlib.util

        spec = importlib.util.spec_from_file_location("parity_composenW", ref / MERGE)
        assert spec is not None and spec.loader is not None
        src_pkg = type(sys)("src")
        src_pkg.diffusers_sample = type(sys)("src.diffusers_sample")  # type: ignore[attr-defined]  # sampling only
        with patched(sys.modules, "src", src_pkg), patched(sys.modules, "src.diffusers_sample", src_pkg.diffusers_sample):
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        m0, mr = kv_layers(merged0.tensors), kv_layers(merged_r.tensors)
        worst0 = worst_r = 0.0
        theirs_all, ours0_all, oursr_all = [], [], []
        for layer in sorted(kv1):
            attn = pipe.unet.get_submodule(layer)
            for j, proj in enumerate(("to_k", "to_v")):
                w0 = base_weight(getattr(attn, proj)).detach().double()
                values = (w0 @ c_reg.T).T
                v_tgt = torch.cat([(kv1[layer][j].double() @ tgt[0].T).T, (kv2[layer][j].double() @ tgt[1].T).T])
                theirs = mod.gdupdateWexact(c_reg, values, c_tgt, v_tgt, w0.clone(), device="cpu")
                theirs_all.append(theirs.reshape(-1))
                ours0_all.append(m0[layer][j].double().reshape(-1))
                oursr_all.append(mr[layer][j].double().reshape(-1))
                worst0 = max(worst0, float((m0[layer][j].double() - theirs).abs().max()))
                worst_r = max(worst_r, float((mr[layer][j].double() - theirs).abs().max()))
        theirs_v, ours0_v, oursr_v = torch.cat(theirs_all), torch.cat(ours0_all), torch.cat(oursr_all)
        w0_v = torch.cat([base_weight(getattr(pipe.unet.get_submodule(n), p)).detach().double().reshape(-1)
                          for n in sorted(kv1) for p in ("to_k", "to_v")])
        n_proj = 2 * len(kv1)
        rows += [
            compare(f"merged W_k/W_v, {n_proj} projections (studio merge_concepts, ridge 0, float32 file vs their "
                    "gdupdateWexact, float64)", ours0_v, theirs_v, atol=1e-6, rtol=1e-5),
            compare("merge update W* − W₀ (ridge 0)", ours0_v - w0_v, theirs_v - w0_v, atol=1e-6, rtol=1e-4),
            compare(f"merged W_k/W_v with the studio's default ridge {DEFAULT_RIDGE:g}·tr(M)/D", oursr_v, theirs_v,
                    atol=1e-6, rtol=1e-5, explained=True, note="ridge: the studio's default"),
        ]
    info = (f"merge inputs: {c_reg.shape[0]} regularisation rows from {len(CAPTIONS)} captions, {c_tgt.shape[0]} target "
            f"rows; studio report: {report.summary()}")
    return rows, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--diffusers", type=Path, required=True, help="root of a checkout of github.com/huggingface/diffusers")
    ap.add_argument("--ref", type=Path, required=True, help="root of a checkout of github.com/adobe-research/custom-diffusion")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3, help="a rate that moves the tiny model's K/V visibly in 3 steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-decay-table", dest="decay_table", action="store_false",
                    help="skip the second run at the example's default weight decay 1e-2")
    ap.add_argument("--diffusers-commit", help="the diffusers checkout's commit (a copy without .git)")
    ap.add_argument("--ref-commit", help="the custom-diffusion checkout's commit (a copy without .git)")
    args = ap.parse_args(argv)
    require_file(args.diffusers, SCRIPT, "github.com/huggingface/diffusers")
    require_file(args.ref, MERGE, "github.com/adobe-research/custom-diffusion")
    t0 = time.monotonic()
    ok = True
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = trained_final_norm(build_tiny_folder("tiny", tmp / "base"), args.seed)
        images = write_images(tmp / "images", n=3, size=32)
        classes = write_images(tmp / "classes", n=4, size=32, seed=1)
        dcommit = ref_label(args.diffusers, args.diffusers_commit)
        head = (f"Custom Diffusion training — studio vs huggingface/diffusers@{dcommit} {SCRIPT} — base tiny, "
                f"{{layers}} cross-attention layers, {args.steps} steps, batch {args.batch}(+{args.batch} class), "
                f"lr {args.lr:g}, clip 1.0, --noaug")
        ours = studio_run(folder, images, classes, args, wd=0.0)  # the studio detaches token 0 as the reference does
        theirs = official_run(args.diffusers.resolve(), folder, images, classes, ours, args, tmp / "official",
                              wd=0.0, channel_mask=True)
        ok = print_table(head.format(layers=len(ours["layers"])) + ", weight decay 0, their mask over the latent "
                         "channels (the per-element mean); both stop the gradient at the start-of-text token "
                         f"({time.monotonic() - t0:.0f} s)", training_rows(ours, theirs, args))
        pub = official_run(args.diffusers.resolve(), folder, images, classes, ours, args, tmp / "pub", wd=0.0,
                           channel_mask=False)
        print_table(head.format(layers=len(ours["layers"])) + ", weight decay 0, as published: their (B, 1, h, w) "
                    "mask makes the instance term C = 4 × the per-element mean (explained; studio as it is)",
                    training_rows(ours, pub, args, explained="instance term × C"))
        if args.decay_table:
            ours_d = studio_run(folder, images, classes, args, wd=1e-2)
            theirs_d = official_run(args.diffusers.resolve(), folder, images, classes, ours_d, args, tmp / "off-wd",
                                    wd=1e-2, channel_mask=True)
            print_table(head.format(layers=len(ours["layers"])) + ", the example's default weight decay 1e-2, mask "
                        "over the channels (explained: AdamW decays the example's full W and "
                        "the studio's ΔW)", training_rows(ours_d, theirs_d, args, explained="decay on W vs on ΔW"))
        mrows, info = merge_rows(args.ref.resolve(), folder, ours["concept"], args)
    commit = ref_label(args.ref, args.ref_commit)
    ok = print_table(f"Custom Diffusion closed-form merge — studio merge_concepts vs adobe-research/custom-diffusion@"
                     f"{commit} {MERGE} gdupdateWexact — 2 concepts ({time.monotonic() - t0:.0f} s)", mrows) and ok
    print(f"\n{info}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
