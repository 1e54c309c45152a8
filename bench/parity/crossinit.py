"""Parity of the studio's textual inversion with Cross Initialization against the official code.

Reference: github.com/lyuPang/CrossInitialization (Pang et al., CVPR 2024), ``train_cross_init.py``
with its ``utils.token_cross_init`` and ``models/clip_model.py`` — imported from the checkout given
with ``--ref``, never copied. Checked at commit 0b1e39a6740a0152ad78a07b5ef99c9967687ad1.

Both sides train a tiny SD 2.x-like base (``tiny-v``: v-prediction, like the official default SD 2.1)
for ``--steps`` optimizer steps with 2 vectors initialised from the encoder's output for
"dog dog" (``--initialize_tokens dog dog`` / ``init="cross"``), λ = 1e-5, AdamW with the official
defaults (weight decay 1e-2), a constant rate, no flips. The studio's loop draws the latents, noise,
timesteps and prompts; the official loop is handed the same draws (bench/parity/common.py).

Compared: the initial vectors, the text conditioning with the concept applied, the UNet prediction,
the loss (diffusion + regulariser), the gradients of the trained vectors at every step, the vectors
after every step and the saved ``learned_embeds.bin`` against the studio's ``emb_params``.

Run (a few seconds on a CPU)::

    git clone https://github.com/lyuPang/CrossInitialization /tmp/CrossInitialization
    git -C /tmp/CrossInitialization checkout 0b1e39a6740a0152ad78a07b5ef99c9967687ad1
    python -m bench.parity.crossinit --ref /tmp/CrossInitialization
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

from bench.parity.common import (
    DrawReplay,
    StepRecorder,
    build_tiny_folder,
    checkout_commit,
    compare,
    isolated_imports,
    legacy_library_shims,
    load_module,
    patched,
    print_table,
    record_ti_training,
    require_file,
    rows_of,
    run_script,
    write_images,
)

REPO = "github.com/lyuPang/CrossInitialization"
TESTED_COMMIT = "0b1e39a6740a0152ad78a07b5ef99c9967687ad1"
TOKEN = "<parity>"


def studio_run(folder: Path, images: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train with the studio's own loop, recording its draws and every step."""
    from studio.models import load_base
    from trainers.textual_inversion import TextualInversionConfig, TextualInversionTrainer

    base = load_base(str(folder), device="cpu", dtype="float32")
    cfg = TextualInversionConfig(images=str(images), token=TOKEN, class_word="dog", init="cross", init_words="dog",
                                 num_vectors=2, steps=args.steps, lr=args.lr, batch_size=args.batch, flip=False,
                                 seed=args.seed, weight_decay=1e-2, reg_weight=args.reg_weight, probe=False,
                                 budget="fixed", log_every=0)
    return record_ti_training(base, cfg, TextualInversionTrainer(base, cfg, TOKEN))


class _CompatEncoder:
    """Builds the official ``CLIPTextTransformer``'s encoder on today's ``transformers``: its call passes the
    causal mask as ``causal_attention_mask``, which today's ``CLIPEncoder`` no longer takes (it would
    be dropped silently and attention would stop being causal), so the two masks are added into the
    one additive ``attention_mask`` it does take — what the old encoder did with them."""

    def __new__(cls, config: Any) -> Any:
        from transformers.models.clip.modeling_clip import CLIPEncoder

        class Encoder(CLIPEncoder):
            def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        causal_attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
                mask = causal_attention_mask
                if attention_mask is not None:
                    mask = attention_mask if mask is None else mask + attention_mask
                return super().forward(inputs_embeds, attention_mask=mask)

        return Encoder(config)


def official_run(ref: Path, folder: Path, images: Path, studio: dict[str, Any], args: argparse.Namespace,
                 out: Path, *, exact_norm: bool) -> dict[str, Any]:
    """Run the official ``train_cross_init.py`` on the studio's draws. With ``exact_norm`` its regulariser's
    ``F.pairwise_distance`` gets ``eps=0``: the paper's ``‖e − e_init‖₂`` (README: the one deviation)."""
    from accelerate import Accelerator
    from transformers import CLIPTokenizer

    script = require_file(ref, "train_cross_init.py", REPO)
    n = 2
    names = [f"{TOKEN}_v{i}" for i in range(n)]  # the official script's placeholder names
    tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    first = len(tok)
    tok.add_tokens(names)
    ids = [first + i for i in range(n)]
    draws = studio["draws"]
    batches = []
    for prompts, lat in zip(draws.prompts, draws.latents):
        mapped = [p.replace(studio["text"], " ".join(names)) for p in prompts]
        input_ids = tok(mapped, padding="max_length", truncation=True, max_length=tok.model_max_length,
                        return_tensors="pt").input_ids
        batches.append({"input_ids": input_ids, "pixel_values": torch.zeros(lat.shape[0], 3, args.resolution,
                                                                             args.resolution)})
    replay = DrawReplay(draws.latents, draws.noise, draws.timesteps, batches, studio["scaling"])
    rec = StepRecorder(select=lambda opt: rows_of(opt.param_groups[0]["params"][0], ids))
    # Their dataset module needs torchvision and is replaced by the replayed batches anyway.
    dataset_stub = types.ModuleType("textual_inversion_dataset")
    dataset_stub.TextualInversionDataset = lambda **kw: list(range(len(batches) * args.batch))  # type: ignore[attr-defined]
    argv = ["--pretrained_model_name_or_path", str(folder), "--train_data_dir", str(images),
            "--placeholder_token", TOKEN, "--initialize_tokens", "dog", "dog", "--n_persudo_tokens", str(n),
            "--reg_weight", str(args.reg_weight), "--output_dir", str(out), "--seed", str(args.seed),
            "--resolution", str(args.resolution), "--train_batch_size", str(args.batch),
            "--max_train_steps", str(args.steps), "--learning_rate", str(args.lr), "--lr_scheduler", "constant",
            "--only_save_embeds", "--report_to", "all", "--save_steps", "1000000", "--checkpointing_steps", "1000000"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_imports([ref]))
        stack.enter_context(legacy_library_shims())
        stack.enter_context(patched(sys.modules, "textual_inversion_dataset", dataset_stub))
        import models.clip_model as clip_model  # the official text encoder class (needs the shims above)

        stack.enter_context(patched(clip_model, "CLIPEncoder", _CompatEncoder))
        stack.enter_context(replay.install())
        stack.enter_context(rec.install(backward_owner=Accelerator))
        if exact_norm:
            pairwise = torch.nn.functional.pairwise_distance

            def exact(x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0, eps: float = 1e-6,
                      keepdim: bool = False) -> torch.Tensor:
                return pairwise(x1, x2, p=p, eps=0.0, keepdim=keepdim)

            stack.enter_context(patched(torch.nn.functional, "pairwise_distance", exact))
        run_script(script, argv)
    saved = torch.load(out / "learned_embeds.bin", weights_only=True)
    return {"rec": rec, "final": torch.stack([saved[k] for k in names]), "used": replay.used}


def names_init(ref: Path, folder: Path, tmp: Path) -> list[Any]:
    """The face variant's start (``--celeb_path``): the official ``utils.celeb_names_cross_init`` against
    the studio's ``init="names"`` on the official list of names. The official columns are the first
    two *BPE tokens* of each name; the studio's are the first token of the first and of the last word
    (docs/methods.md). The two agree on names whose words are one token each, so both sides are also
    run on that subset of the list, where they must match."""
    from transformers import CLIPTokenizer

    from studio.models import load_base
    from trainers.textual_inversion import TextualInversionConfig, initial_vectors

    names_file = require_file(ref, "examples/wiki_names_v2.txt", REPO)
    tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    names = [ln.strip() for ln in names_file.read_text(encoding="utf-8").splitlines() if ln.strip()]

    def same_columns(name: str) -> bool:
        words = name.split()
        ids = tok(name, add_special_tokens=False).input_ids
        return len(words) >= 2 and ids[:2] == [tok(words[0], add_special_tokens=False).input_ids[0],
                                                tok(words[-1], add_special_tokens=False).input_ids[0]]

    subset = tmp / "names_one_token_words.txt"
    subset.write_text("\n".join(n for n in names if same_columns(n)) + "\n", encoding="utf-8")
    n_subset = len(subset.read_text(encoding="utf-8").split("\n")) - 1
    base = load_base(str(folder), device="cpu", dtype="float32")
    out = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_imports([ref]))
        stack.enter_context(legacy_library_shims())
        import models.clip_model as clip_model

        stack.enter_context(patched(clip_model, "CLIPEncoder", _CompatEncoder))
        utils = load_module(ref / "utils.py", "utils")
        te = clip_model.CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
        for path, label, must in ((names_file, f"all {len(names)} names", False),
                                  (subset, f"the {n_subset} names whose words are one token each", True)):
            cfg = TextualInversionConfig(init="names", names_file=str(path), num_vectors=2)
            ours = initial_vectors(base.pipe, cfg, "names")[0]
            theirs = utils.celeb_names_cross_init(str(path), tok, te, 2)
            out.append(compare(f"names init ({label})", ours, theirs, atol=1e-6, rtol=1e-5,
                               note="" if must else "token vs word columns", explained=not must))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help=f"root of a checkout of {REPO}")
    ap.add_argument("--base", default="tiny-v", choices=["tiny", "tiny-v"], help="tiny base both sides load")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3, help="the paper's effective rate")
    ap.add_argument("--reg-weight", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.resolution = 32
    require_file(args.ref, "train_cross_init.py", REPO)  # before any training: fail fast
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = build_tiny_folder(args.base, tmp / "base")
        images = write_images(tmp / "images", n=3, size=args.resolution)
        ours = studio_run(folder, images, args)
        ref = args.ref.resolve()
        published = official_run(ref, folder, images, ours, args, tmp / "published", exact_norm=False)
        exact = official_run(ref, folder, images, ours, args, tmp / "exact", exact_norm=True)
        names = names_init(ref, folder, tmp)
    for theirs in (published, exact):
        if len(theirs["rec"].after) != args.steps or theirs["used"]["noise"] != args.steps:
            print(f"the official loop took {len(theirs['rec'].after)} steps and replayed {theirs['used']}; "
                  f"expected {args.steps}")
            return 1
    commit = checkout_commit(args.ref)
    head = (f"Cross Initialization — studio vs {REPO}@{commit[:12]} — base {args.base}, {args.steps} steps, batch "
            f"{args.batch}, lr {args.lr:g}")
    # 1. The official code as published: its F.pairwise_distance adds eps = 1e-6 to e − e_init, so at the
    #    first step (e = e_init) the regulariser has the gradient λ/(n·√D)·(1, …, 1) per vector, where the
    #    exact norm has none. The studio's first gradient must differ from theirs by exactly that.
    n, dim = ours["init"].shape
    eps_grad = torch.full((n, dim), args.reg_weight / (n * dim ** 0.5))
    o, t = ours["rec"], published["rec"]
    rows = [
        compare("step 1: loss", ours["losses"][0], t.losses[0], atol=0, rtol=1e-5),
        compare("step 1: their gradient − ours = λ/(n√D)·1 (their eps)", t.grads[0] - o.grads[0], eps_grad,
                atol=1e-9, rtol=1e-3),
    ]
    raw = compare("step 1: gradient of the vectors", o.grads[0], t.grads[0])
    ok_published = print_table(head + " — the official code as published", rows)
    print(f"(their step-1 gradient differs from ours by {raw.max_abs:.3e}, {raw.rel:.2e} of its largest entry: "
          "the eps term above; Adam's second step amplifies it on small-gradient entries)")
    ok_names = print_table("Cross Initialization — the face variant's start from a list of names", names)
    # 2. The same code with eps = 0 in its regulariser (the paper's ‖e − e_init‖₂): everything must match.
    ok_exact = print_table(head + f" — official regulariser with eps = 0 ({time.monotonic() - t0:.0f} s)",
                           _rows(ours, exact, args.steps))
    ok = ok_exact and ok_published and ok_names
    print(f"\nverdict: {'PARITY' if ok else 'MISMATCH'} — training: the studio matches the official code up to the eps "
          "of F.pairwise_distance in its regulariser; names init: equal where its columns (first token of the "
          "first and last word) coincide with the official ones (the first two BPE tokens) (README)")
    return 0 if ok else 1


def _rows(ours: dict[str, Any], theirs: dict[str, Any], steps: int) -> list[Any]:
    o, t = ours["rec"], theirs["rec"]
    rows = [compare("initial vectors (Cross Init of 'dog dog')", ours["init"], t.before[0], atol=1e-6, rtol=1e-5)]
    for k in range(steps):
        s = f"step {k + 1}: "
        rows += [
            compare(s + "UNet input (noisy latents)", o.unet[k]["noisy"], t.unet[k]["noisy"], atol=1e-6, rtol=1e-5),
            compare(s + "text conditioning with the concept", o.unet[k]["hidden"], t.unet[k]["hidden"], atol=1e-6,
                    rtol=1e-5),
            compare(s + "UNet prediction", o.unet[k]["pred"], t.unet[k]["pred"], atol=1e-6, rtol=1e-5),
            compare(s + "loss (diffusion + λ·reg)", ours["losses"][k], t.losses[k], atol=0, rtol=1e-5),
            compare(s + "gradient of the vectors", o.grads[k], t.grads[k], atol=0, rtol=1e-4),
            compare(s + "vectors after the step", o.after[k], t.after[k], atol=0, rtol=1e-5),
        ]
    rows += [
        compare(f"update after {steps} steps (vectors − init)", o.after[-1] - ours["init"], t.after[-1] - t.before[0],
                atol=0, rtol=1e-3),
        compare("saved vectors (emb_params vs learned_embeds.bin)", ours["final"], theirs["final"], atol=0, rtol=1e-5),
    ]
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
