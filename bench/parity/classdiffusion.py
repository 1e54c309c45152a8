"""Parity of the studio's ClassDiffusion term (``classdiffusion_weight`` of DreamBooth-LoRA) with the official code.

Reference: github.com/Rbrq03/ClassDiffusion — ``utils/semantic_preservation_loss.py`` (``SPL`` and
``forward_with_custom_embeddings``, which their ``train_class_diffusion.py`` binds to the text model),
imported from the checkout given with ``--ref``, never copied. Checked at commit
06a1d2ec201a78c461209e95c28da8932c2b8663.

The official method is Custom Diffusion (K/V + a modifier-token embedding) with the semantic
preservation loss; the studio adds the same loss to DreamBooth-LoRA, where it reaches the
text-encoder LoRA (and would reach a trained token). The trained tensors differ, so the loss is
compared at function level, on one text encoder both sides evaluate:

1. ``L_SPL = 1 − cos(f(p), f(q))`` (``f``: the pooled end-of-text state after the final layer norm) for
   the pairs ("a photo of a sks dog", "a photo of a dog") and two more, through the studio's
   ``semantic_preservation_loss`` and their ``SPL`` — on the tiny text encoder with the studio's
   text-encoder LoRA attached (its B matrices drawn non-zero, so the LoRA acts);
2. its gradient with respect to every text-encoder LoRA tensor (what the studio trains) and with
   respect to the identifier's row of the token-embedding table (what theirs trains).

**A bug in the reference, corrected for the comparison.** Their ``forward_with_custom_embeddings``
runs the embedding layer (token + *position* embedding) and then overwrites the modifier token's
position with the raw row of the token table (``hidden_states[0, modifier_index, :] = …``): the
modifier token enters the encoder without its position embedding. (The row written is the table's
own row, so the splice changes nothing else.) The studio encodes the prompt as the text encoder
does. The "as published" rows show the difference (explained: 18 % of L_SPL for "a photo of a sks
dog" on the tiny encoder); the "corrected" rows hand their ``SPL`` a table whose modifier row is the
token's row plus its position's embedding — their code otherwise unchanged — and must agree.

Their prompts are tokenized with ``padding="longest"`` and pooled at the first end-of-text token;
the studio's are padded to 77. The encoder is causal, so the pooled state does not depend on the
padding after it: that is part of what is compared. Batch: theirs splices the modifier embedding
into batch row 0 only and runs one pair per call; the studio runs its pairs as a batch (mean of the
per-pair terms): the rows compare the studio's batch mean with the mean of their per-pair calls.

**The reference's silent disabling.** Their loss is ``if with_prior_preservation: … elif use_spl: …``
(train_class_diffusion.py, the loss branch of the training loop): with prior preservation on, the
semantic preservation loss is never computed, without a warning. The studio adds both
(``L = L_inst + w_prior·L_class + λ·L_SPL``); it is the corrected behaviour, and the term compared
here is the one theirs computes when prior preservation is off. Row 3 runs the studio's trainer for
one step with prior preservation *and* the loss on, and checks that its total loss is the diffusion
loss plus λ times the SPL value their ``SPL`` gives on the same encoder.

Run-time shims (for the run only): their ``forward_with_custom_embeddings`` calls
``self.encoder(…, causal_attention_mask=…)``; today's ``CLIPEncoder`` takes one additive mask (and
would ignore that argument silently: attention would stop being causal), so it is bound to a view
of the model whose encoder call adds the two masks (as crossinit.py does), and ``text_model`` —
folded into ``CLIPTextModel`` by today's ``transformers`` — is that view.

Run (about a minute on 2 shared CPU cores)::

    git clone https://github.com/Rbrq03/ClassDiffusion /tmp/ClassDiffusion
    python -m bench.parity.classdiffusion --ref /tmp/ClassDiffusion
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bench.parity.common import (
    Row,
    build_tiny_folder,
    compare,
    isolated_imports,
    patched,
    print_table,
    ref_label,
    require_file,
    write_images,
)

REPO = "github.com/Rbrq03/ClassDiffusion"
FILE = "utils/semantic_preservation_loss.py"
TOKEN = "sks"
CLASS = "dog"
PAIRS = [("a photo of a sks dog", "a photo of a dog"),
         ("a sks dog wearing headphones on the beach", "a dog wearing headphones on the beach"),
         ("sks dog", "dog")]


class _TextModelView:
    """What their ``forward_with_custom_embeddings`` reads from the old ``CLIPTextTransformer``, on
    today's flattened ``CLIPTextModel``: its config, embeddings, final norm and end-of-text id, and an
    encoder call that adds ``causal_attention_mask`` to ``attention_mask`` (today's single additive mask)."""

    def __init__(self, model: Any):
        self.config = model.config
        self.embeddings = model.embeddings
        self.final_layer_norm = model.final_layer_norm
        self.eos_token_id = model.config.eos_token_id
        self._encoder = model.encoder

    def encoder(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                causal_attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        mask = causal_attention_mask
        if attention_mask is not None:
            mask = attention_mask if mask is None else mask + attention_mask
        return self._encoder(inputs_embeds, attention_mask=mask)


def _grads(params: Mapping[str, torch.Tensor], emb: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    lora = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params.values()])
    assert emb.grad is not None
    return lora.clone(), emb.grad[row].clone()


def function_level(ref: Path, folder: Path, images: Path, args: argparse.Namespace) -> tuple[list[Row], float]:
    """Rows 1–2 of the module docstring, and row 3 (a studio step with prior preservation and SPL)."""
    from bench.parity.diffusers_lora import lora_params
    from studio.models import load_base
    from trainers.classdiffusion import semantic_preservation_loss
    from trainers.loop import load_training_images, run_training
    from trainers.lora import ADAPTER, DreamBoothConfig, DreamBoothLoRATrainer

    base = load_base(str(folder), device="cpu", dtype="float32")
    cfg = DreamBoothConfig(images=str(images), token=TOKEN, class_word=CLASS, steps=1, lr=args.lr, batch_size=2,
                           flip=False, seed=args.seed, probe=False, budget="fixed", log_every=0, rank=4,
                           train_text_encoder=True, classdiffusion_weight=args.weight, prior_preservation=False)
    trainer = DreamBoothLoRATrainer(base, cfg, TOKEN)
    pipe = base.pipe
    te, tok = pipe.text_encoder, pipe.tokenizer
    params = lora_params({"te": te}, ADAPTER)
    gen = torch.Generator().manual_seed(args.seed + 5)
    with torch.no_grad():  # a trained-looking LoRA: B ≠ 0 (B = 0 at the start makes the A gradients vanish)
        for name, prm in params.items():
            if "lora_B" in name:
                prm.copy_(0.3 * torch.randn(prm.shape, generator=gen))
    emb = te.get_input_embeddings().weight
    emb.requires_grad_(True)
    row = tok.convert_tokens_to_ids(tok.tokenize(TOKEN))[0]
    if len(tok.tokenize(TOKEN)) != 1:
        raise SystemExit(f"{TOKEN!r} is not one token of this tokenizer")
    rows: list[Row] = []
    try:
        # the studio: all pairs as one batch
        loss = semantic_preservation_loss(pipe, [p for p, _ in PAIRS], [q for _, q in PAIRS], torch.device("cpu"))
        loss.backward()
        ours_lora, ours_row = _grads(params, emb, row)
        ours_value = float(loss.detach())
        per_pair = []
        for p, q in PAIRS:
            with torch.no_grad():
                per_pair.append(float(semantic_preservation_loss(pipe, [p], [q], torch.device("cpu"))))
        for prm in params.values():
            prm.grad = None
        emb.grad = None
        # theirs: one SPL call per pair, as their training loop does per concept, averaged
        with contextlib.ExitStack() as stack:
            stack.enter_context(isolated_imports([ref]))
            import utils.semantic_preservation_loss as spl_module

            view = _TextModelView(te)
            view.forward_with_custom_embeddings = types.MethodType(  # type: ignore[attr-defined]
                spl_module.forward_with_custom_embeddings, view)
            te.text_model = view  # removed below; their SPL reads text_encoder.text_model
            try:
                spl = spl_module.SPL(text_encoder=te)
                pos = te.embeddings.position_embedding.weight.detach()
                for corrected in (False, True):
                    theirs_terms = []
                    for p, q in PAIRS:
                        t_p = tok(p, padding="longest", return_tensors="pt")
                        t_q = tok(q, padding="longest", return_tensors="pt")
                        table = emb
                        if corrected:  # their splice drops the position embedding: hand it the row plus its own
                            where = int((t_p.input_ids[0] == row).nonzero()[0])
                            table = torch.cat([emb[:row], emb[row:row + 1] + pos[where], emb[row + 1:]])
                        theirs_terms.append(spl(table, torch.tensor(row), t_p, t_q).mean())
                    theirs = torch.stack(theirs_terms).mean()
                    theirs.backward()
                    theirs_lora, theirs_row = _grads(params, emb, row)
                    for prm in params.values():
                        prm.grad = None
                    emb.grad = None
                    how = "corrected (position embedding kept)" if corrected else "as published"
                    flag = {"explained": not corrected}
                    if not corrected:
                        flag["note"] = "their splice drops the token's position embedding"  # type: ignore[assignment]
                    rows += [compare(f"{how}: L_SPL '{p}' vs '{q}'", per_pair[i], float(theirs_terms[i]), atol=1e-7,
                                     rtol=1e-5, **flag) for i, (p, q) in enumerate(PAIRS)]  # type: ignore[arg-type]
                    rows += [
                        compare(f"{how}: L_SPL, mean over the {len(PAIRS)} pairs (studio batch vs their per-pair "
                                "calls)", ours_value, float(theirs), atol=1e-7, rtol=1e-5, **flag),  # type: ignore[arg-type]
                        compare(f"{how}: ∂L_SPL/∂(text-encoder LoRA), {ours_lora.numel()} entries", ours_lora,
                                theirs_lora, atol=1e-9, rtol=1e-4, **flag),  # type: ignore[arg-type]
                        compare(f"{how}: ∂L_SPL/∂(embedding row of '{TOKEN}')", ours_row, theirs_row, atol=1e-9,
                                rtol=1e-4, **flag),  # type: ignore[arg-type]
                    ]
            finally:
                del te.text_model
    finally:
        emb.requires_grad_(False)
        emb.grad = None
        trainer.teardown()
    # 3. one studio step with prior preservation and the loss both on: the total it backpropagates
    classes = write_images(images.parent / "classes", n=2, size=32, seed=1)
    base = load_base(str(folder), device="cpu", dtype="float32")
    cfg = DreamBoothConfig(images=str(images), token=TOKEN, class_word=CLASS, steps=1, lr=args.lr, batch_size=2,
                           flip=False, seed=args.seed, probe=False, budget="fixed", log_every=0, rank=4,
                           train_text_encoder=True, classdiffusion_weight=args.weight, prior_preservation=True,
                           class_images=str(classes), prior_weight=1.0, class_prompt="a photo of a dog")
    trainer = DreamBoothLoRATrainer(base, cfg, TOKEN)
    seen: dict[str, Any] = {}
    extra = trainer.extra_loss

    def record_extra() -> Any:
        pairs = trainer._spl_pairs
        out = extra()
        seen["pairs"], seen["extra"] = pairs, out
        return out

    trainer.extra_loss = record_extra  # type: ignore[method-assign]
    examples = load_training_images(cfg, base)
    import trainers.loop as loop

    per_sample = loop._Fit.per_sample
    diffusion: list[torch.Tensor] = []

    def record_per_sample(fit: Any, *a: Any, **k: Any) -> torch.Tensor:
        out = per_sample(fit, *a, **k)
        diffusion.append(out.detach())
        return out

    with patched(loop._Fit, "per_sample", record_per_sample):
        result = run_training(base, trainer, cfg, method="dreambooth", examples=examples, save=False)
    if seen.get("extra") is None or seen.get("pairs") is None:
        raise SystemExit("the studio's step with prior preservation computed no SPL term")
    concept_prompts, class_prompts = seen["pairs"]
    per = torch.cat(diffusion)
    n_inst = len(concept_prompts)
    l_diff = float(per[:n_inst].mean() + per[n_inst:].mean())
    # the SPL value their code gives for the same pairs on the studio's encoder at that step: the
    # step ran before the update, so recompute on the initial LoRA (B = 0 → the plain encoder)
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_imports([ref]))
        import utils.semantic_preservation_loss as spl_module
        from diffusers import StableDiffusionPipeline

        fresh = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                        requires_safety_checker=False)
        te2 = fresh.text_encoder
        view = _TextModelView(te2)
        view.forward_with_custom_embeddings = types.MethodType(spl_module.forward_with_custom_embeddings, view)  # type: ignore[attr-defined]
        te2.text_model = view
        spl = spl_module.SPL(text_encoder=te2)
        row2 = fresh.tokenizer.convert_tokens_to_ids(fresh.tokenizer.tokenize(TOKEN))[0]
        table0 = te2.get_input_embeddings().weight.detach()
        pos2 = te2.embeddings.position_embedding.weight.detach()
        terms = []
        with torch.no_grad():
            for p, q in zip(concept_prompts, class_prompts):
                t_p = fresh.tokenizer(p, padding="longest", return_tensors="pt")
                where = int((t_p.input_ids[0] == row2).nonzero()[0])
                table = table0.clone()
                table[row2] += pos2[where]  # corrected splice, as in rows 1–2
                terms.append(spl(table, torch.tensor(row2), t_p,
                                 fresh.tokenizer(q, padding="longest", return_tensors="pt")).mean())
        theirs_spl = float(torch.stack(terms).mean())
    rows += [
        compare("step with prior preservation: the studio's λ·L_SPL vs λ × their SPL on the same pairs and encoder",
                float(seen["extra"].detach()), args.weight * theirs_spl, atol=1e-7, rtol=1e-5),
        compare("step with prior preservation: total loss = L_inst + w_prior·L_class + λ·L_SPL", result.losses[0],
                l_diff + args.weight * theirs_spl, atol=1e-7, rtol=1e-5),
    ]
    return rows, args.weight * theirs_spl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help="root of a checkout of github.com/Rbrq03/ClassDiffusion")
    ap.add_argument("--weight", type=float, default=1.0, help="λ_SPL (their --spl_weight default)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-commit", help="the checkout's commit, for the title when --ref is a copy without .git")
    args = ap.parse_args(argv)
    require_file(args.ref, FILE, REPO)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        folder = build_tiny_folder("tiny", tmp / "base")
        images = write_images(tmp / "images", n=2, size=32)
        rows, spl_term = function_level(args.ref.resolve(), folder, images, args)
    commit = ref_label(args.ref, args.ref_commit)
    ok = print_table(f"ClassDiffusion semantic preservation loss — studio (DreamBooth-LoRA classdiffusion_weight) vs "
                     f"Rbrq03/ClassDiffusion@{commit} {FILE} — base tiny (SD 1.x-like), text-encoder LoRA rank 4 "
                     f"({time.monotonic() - t0:.0f} s)", rows)
    print(f"\nin that step the studio's λ·L_SPL was {spl_term:.3e}; their train_class_diffusion.py with "
          "--with_prior_preservation --use_spl adds 0 (the elif branch)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
