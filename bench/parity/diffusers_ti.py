"""Parity of the studio's plain textual inversion with diffusers' example ``textual_inversion.py``.

Reference: github.com/huggingface/diffusers, ``examples/textual_inversion/textual_inversion.py`` (the
installed diffusers package does not ship the examples) — run from the checkout given with
``--ref``, never copied.

Both sides train a tiny SD 1.x-like base (``tiny``, ε-prediction) with ``--num-vectors`` vectors
initialised from the embedding of "dog" (``--initializer_token dog`` / ``init="plain"``), no
regulariser, AdamW with the example's defaults (weight decay 1e-2), a constant rate, no flips. The
studio's loop draws the latents, noise, timesteps and prompts; the example's loop is handed the
same draws (bench/parity/common.py). The example optimises the whole embedding matrix and copies
the other rows back after each step; the studio trains only the ``(n, D)`` rows — per-entry Adam
makes the two updates of those rows the same.

Compared: the initial vectors, the text conditioning with the concept applied, the UNet prediction,
the loss, the gradients of the trained vectors and the vectors after every step, and the saved
``learned_embeds.safetensors`` against the studio's ``emb_params``.

Run (about a minute on a CPU)::

    git clone https://github.com/huggingface/diffusers /tmp/diffusers
    python -m bench.parity.diffusers_ti --ref /tmp/diffusers
"""

from __future__ import annotations

import argparse
import contextlib
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
    record_ti_training,
    ref_label,
    require_file,
    rows_of,
    run_script,
    write_images,
)

REPO = "github.com/huggingface/diffusers (examples/textual_inversion/textual_inversion.py)"
SCRIPT = "examples/textual_inversion/textual_inversion.py"
TOKEN = "<parity>"


def studio_run(folder: Path, images: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train with the studio's loop (plain TI), recording its draws and every step."""
    from studio.models import load_base
    from trainers.textual_inversion import TextualInversionConfig, TextualInversionTrainer

    base = load_base(str(folder), device="cpu", dtype="float32")
    cfg = TextualInversionConfig(images=str(images), token=TOKEN, class_word="dog", init="plain", init_words="dog",
                                 num_vectors=args.num_vectors, steps=args.steps, lr=args.lr, batch_size=args.batch,
                                 flip=False, seed=args.seed, weight_decay=1e-2, reg_weight=0.0, probe=False,
                                 budget="fixed", log_every=0)
    return record_ti_training(base, cfg, TextualInversionTrainer(base, cfg, TOKEN))


@contextlib.contextmanager
def example_shims() -> Any:
    """What the example needs from libraries that this environment lacks or changed, for the run only
    (:func:`diffusers_example_shims` and one more):

    * ``torchvision.transforms`` stand-ins when it is not installed (``RandomHorizontalFlip`` is built by
      its dataset, which the replayed batches replace: no image is read through it);
    * ``CLIPTextModel.text_model`` — today's ``transformers`` flattened the model (``embeddings``,
      ``encoder``, ``final_layer_norm`` sit on the model itself); older examples freeze them through
      ``text_model``, so it is the model itself here;
    * ``check_min_version`` — examples on the main branch ask for the next diffusers release.
    """
    from transformers import CLIPTextModel

    with contextlib.ExitStack() as stack:
        stack.enter_context(diffusers_example_shims())
        if not hasattr(CLIPTextModel, "text_model"):
            stack.enter_context(patched(CLIPTextModel, "text_model", property(lambda self: self)))
        yield


def official_run(ref: Path, folder: Path, images: Path, studio: dict[str, Any], args: argparse.Namespace,
                 out: Path) -> dict[str, Any]:
    """Run the example on the studio's draws."""
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    script = require_file(ref, SCRIPT, REPO)
    n = args.num_vectors
    names = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, n)]  # the example's placeholder names
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
        batches.append({"input_ids": input_ids,
                        "pixel_values": torch.zeros(lat.shape[0], 3, args.resolution, args.resolution)})
    replay = DrawReplay(draws.latents, draws.noise, draws.timesteps, batches, studio["scaling"])
    rec = StepRecorder(select=lambda opt: rows_of(opt.param_groups[0]["params"][0], ids))
    argv = ["--pretrained_model_name_or_path", str(folder), "--train_data_dir", str(images),
            "--placeholder_token", TOKEN, "--initializer_token", "dog", "--num_vectors", str(n),
            "--output_dir", str(out), "--seed", str(args.seed), "--resolution", str(args.resolution),
            "--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps),
            "--learning_rate", str(args.lr), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--report_to", "all", "--save_steps", "1000000", "--checkpointing_steps", "1000000"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_imports([script.parent]))
        stack.enter_context(example_shims())
        stack.enter_context(replay.install())
        stack.enter_context(rec.install(backward_owner=Accelerator))
        run_script(script, argv)
    saved_file = out / "learned_embeds.safetensors"
    saved = load_file(str(saved_file))[TOKEN] if saved_file.is_file() else \
        torch.load(out / "learned_embeds.bin", weights_only=True)[TOKEN]
    return {"rec": rec, "final": saved.reshape(n, -1), "used": replay.used}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help="root of a checkout of github.com/huggingface/diffusers")
    ap.add_argument("--base", default="tiny", choices=["tiny", "tiny-v"], help="tiny base both sides load")
    ap.add_argument("--num-vectors", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-commit", help="the checkout's commit, for the title when --ref is a copy without .git")
    args = ap.parse_args(argv)
    args.resolution = 32
    require_file(args.ref, SCRIPT, REPO)  # before any training: fail fast
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = build_tiny_folder(args.base, tmp / "base")
        images = write_images(tmp / "images", n=3, size=args.resolution)
        ours = studio_run(folder, images, args)
        theirs = official_run(args.ref.resolve(), folder, images, ours, args, tmp / "official")
    o, t = ours["rec"], theirs["rec"]
    if len(t.after) != args.steps or theirs["used"]["noise"] != args.steps:
        print(f"the example took {len(t.after)} steps and replayed {theirs['used']}; expected {args.steps}")
        return 1
    rows = [compare("initial vectors (embedding of 'dog')", ours["init"], t.before[0], atol=0, rtol=1e-6)]
    for k in range(args.steps):
        s = f"step {k + 1}: "
        rows += [
            compare(s + "text conditioning with the concept", o.unet[k]["hidden"], t.unet[k]["hidden"], atol=1e-6,
                    rtol=1e-5),
            compare(s + "UNet prediction", o.unet[k]["pred"], t.unet[k]["pred"], atol=1e-6, rtol=1e-5),
            compare(s + "loss", ours["losses"][k], t.losses[k], atol=0, rtol=1e-5),
            compare(s + "gradient of the vectors", o.grads[k], t.grads[k], atol=0, rtol=1e-4),
            compare(s + "vectors after the step", o.after[k], t.after[k], atol=0, rtol=1e-5),
        ]
    rows += [
        compare(f"update after {args.steps} steps (vectors − init)", o.after[-1] - ours["init"],
                t.after[-1] - t.before[0], atol=0, rtol=1e-3),
        compare("saved vectors (emb_params vs learned_embeds)", ours["final"], theirs["final"], atol=0, rtol=1e-5),
    ]
    commit = ref_label(args.ref, args.ref_commit)
    title = (f"Textual inversion — studio vs huggingface/diffusers@{commit} {SCRIPT} — base {args.base}, "
             f"{args.num_vectors} vectors, {args.steps} steps, batch {args.batch}, lr {args.lr:g} "
             f"({time.monotonic() - t0:.0f} s)")
    return 0 if print_table(title, rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
