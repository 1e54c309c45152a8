"""Parity of the studio's Perfusion K/V edit with the most used open re-implementation (there is no official code).

Reference: github.com/ChenDarYen/Key-Locked-Rank-One-Editing-for-Text-to-Image-Personalization,
``perfusion/roe.py`` (``ROELinear``: the gated rank-one edit of one K or V projection), imported
from the checkout given with ``--ref``, never copied. Checked at commit
542b91532f2780749ea6e024690b11ed136d7203.

Function level (that code is a latent-diffusion / PyTorch-Lightning fork; its training loop needs
its own LDM checkpoints): for every cross-attention layer of a tiny SD 1.x-like UNet, an
``ROELinear`` gets the layer's ``to_k`` / ``to_v`` weight, and the studio's ``PerfusionHook.edit_kv``
runs on the same layer with one concept. Both get the same encoder states ``e`` (B, 77, D) of real
prompts from the tiny text encoder, the same ``i*`` (the encoding of the concept word), ``C⁻¹``
(the inverse of a ridge-regularised uncentred covariance of encoder states) and (β, τ). Compared:
the edited keys and values ``W e_⊥ + σ((eᵀC⁻¹i*/i*ᵀC⁻¹i* − β)/τ) · o*`` (Tewel et al. 2023, Eq. 5–7)
and, for values, the gradients of the trained target ``o*_V`` and of the encoder states under
the same upstream gradient.

**Where that re-implementation departs from the paper** (and how this script handles it):

* its targets are a table of ``77`` rows (``target_output``: one output per token *position*,
  initialised to ``W`` times the batch-mean of the superclass prompt's encoding at each position),
  where the paper's ``o*`` is one vector per layer (``o*_K = W_K i*_super``, locked). The gate picks
  the row of the position the concept sits at, so the same concept at another position in the
  prompt meets another target, and the file is 77× larger. The script fills every row of their
  table with the studio's single ``o*`` (keys: ``W_K i*_super``; values: the trained ``o*_V``), which
  makes their edit the paper's; the gradient of the studio's ``o*_V`` is then the sum of the
  gradients of their 77 tied rows, and is compared so;
* the row of their initialisation at the concept word's position is also printed against the
  studio's ``o*_K = W_K i*_super``: they agree exactly when that position holds the class word
  in every initialisation prompt (shown), and differ otherwise (not a check).

Global locking (keys from the superclass prompt: their ``input_super``, the studio's
``SuperclassContexts``) replaces the input of the same formula and is not compared here.

Run (under a minute on a CPU)::

    git clone https://github.com/ChenDarYen/Key-Locked-Rank-One-Editing-for-Text-to-Image-Personalization /tmp/perfusion
    python -m bench.parity.perfusion --ref /tmp/perfusion
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

from bench.parity.common import build_tiny_folder, compare, load_module, print_table, ref_label, require_file

REPO = "github.com/ChenDarYen/Key-Locked-Rank-One-Editing-for-Text-to-Image-Personalization"
ROE = "perfusion/roe.py"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help=f"root of a checkout of {REPO}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-commit", help="the checkout's commit, for the title when --ref is a copy without .git")
    args = ap.parse_args(argv)
    roe = load_module(require_file(args.ref, ROE, REPO), "parity_roe")
    t0 = time.monotonic()
    from studio.methods.attention import unet_layers
    from studio.methods.perfusion.hook import PerfusionHook, PerfusionTarget
    from studio.models import load_base

    with tempfile.TemporaryDirectory() as tmp_s:
        folder = build_tiny_folder("tiny", Path(tmp_s) / "base")
        base = load_base(str(folder), device="cpu", dtype="float32")
    pipe = base.pipe
    tok, te = pipe.tokenizer, pipe.text_encoder
    g = torch.Generator().manual_seed(args.seed)

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0]  # (B, 77, D)

    corpus = ["a photo of a cat", "a red car on a street", "a bowl of fruit on a table", "a man riding a horse",
              "an oil painting of a mountain lake", "two dogs playing in the snow", "a cup of coffee", "a city at night"]
    states = encode(corpus).reshape(-1, te.config.hidden_size).double()
    cov = states.T @ states / states.shape[0]
    c_inv = torch.linalg.inv(cov + 1e-3 * torch.eye(cov.shape[0], dtype=torch.float64))
    prompts = ["a photo of a dog on a beach", "a watercolor painting of a dog"]
    e = encode(prompts)  # (2, 77, D)
    dog = tok("dog", add_special_tokens=False).input_ids[0]
    pos = [tok(p).input_ids.index(dog) for p in prompts]
    i_super = e[0, pos[0]].clone()  # the class word's encoding
    i_star = i_super + 0.3 * i_super.norm() / i_super.numel() ** 0.5 * torch.randn(i_super.shape, generator=g)
    # the concept: prompts whose concept-word row is i* (sim/energy = 1 there), everything else as encoded
    e[0, pos[0]], e[1, pos[1]] = i_star, i_star
    rows: list[Any] = []
    hook = PerfusionHook()
    for beta, tau in ((0.75, 0.1), (0.6, 0.15)):
        for layer in unet_layers(pipe.unet):
            attn = pipe.unet.get_submodule(layer.name)
            o_k = torch.nn.functional.linear(i_super, attn.to_k.weight).detach()
            o_v = (torch.nn.functional.linear(i_super, attn.to_v.weight)
                   + 0.1 * torch.randn(attn.to_v.out_features, generator=g)).detach()
            # theirs: one ROELinear per projection, every row of the target table = the paper's single o*
            lin_k = roe.ROELinear(in_features=layer.context_dim, out_features=layer.inner_dim, bias=False, lock=True)
            lin_v = roe.ROELinear(in_features=layer.context_dim, out_features=layer.inner_dim, bias=False, lock=False)
            with torch.no_grad():
                lin_k.weight.copy_(attn.to_k.weight)
                lin_v.weight.copy_(attn.to_v.weight)
                lin_k.target_output.copy_(o_k.expand(77, -1))
                lin_v.target_output.copy_(o_v.expand(77, -1))
            e_theirs = e.clone().requires_grad_(True)
            ci = c_inv.float()
            k_theirs = lin_k(e_theirs, i_star, ci, beta=beta, tau=tau)
            v_theirs = lin_v(e_theirs, i_star, ci, beta=beta, tau=tau)
            # ours: the hook on the real layer, one concept, o*_V trainable
            o_v_ours = o_v.clone().requires_grad_(True)
            target = PerfusionTarget(i_star=i_star, i_super=i_super, v_targets=[o_v_ours], beta=beta, tau=tau,
                                     c_inv=c_inv)
            hook.targets.clear()
            hook.add("parity", target)
            e_ours = e.clone().requires_grad_(True)
            info = types.SimpleNamespace(index=0)
            k_ours, v_ours = hook.edit_kv(None, info, attn, e_ours, e_ours, attn.to_k(e_ours),  # type: ignore[arg-type]
                                          attn.to_v(e_ours), slice(0, e.shape[0]))
            up = torch.randn(v_ours.shape, generator=g)
            (v_theirs * up).sum().backward()
            (v_ours * up).sum().backward()
            s = f"β {beta:g}, τ {tau:g}, {layer.name.split('.transformer_blocks')[0]}: "
            rows += [
                compare(s + "edited keys (key-locked)", k_ours, k_theirs, atol=1e-6, rtol=1e-5),
                compare(s + "edited values", v_ours, v_theirs, atol=1e-6, rtol=1e-5),
                compare(s + "grad of o*_V (theirs: sum over their 77 tied rows)", o_v_ours.grad,
                        lin_v.target_output.grad.sum(0), atol=1e-6, rtol=1e-5),
                compare(s + "grad of the encoder states through the value edit", e_ours.grad, e_theirs.grad,
                        atol=1e-6, rtol=1e-5),
            ]
    # their per-position initialisation vs the paper's single o*_K (printed; the departure above)
    layer = unet_layers(pipe.unet)[0]
    attn = pipe.unet.get_submodule(layer.name)
    lin = roe.ROELinear(in_features=layer.context_dim, out_features=layer.inner_dim, bias=False, lock=True)
    with torch.no_grad():
        lin.weight.copy_(attn.to_k.weight)
    init_prompts = ["a photo of a dog", "a picture of a dog", "a drawing of a dog"]
    same_pos = [tok(p).input_ids.index(dog) for p in init_prompts]
    lin.initialize_target_output(encode(init_prompts))
    word = encode(init_prompts)[torch.arange(len(init_prompts)), torch.tensor(same_pos)].mean(0)
    ours_ok = torch.nn.functional.linear(word, attn.to_k.weight)
    init_rows = [compare(f"their o*_K table, row {same_pos[0]} (the class word in every prompt) vs W_K·mean i*_super",
                         ours_ok, lin.target_output[same_pos[0]], atol=1e-6, rtol=1e-5)]
    other = [p + 1 for p in same_pos]
    init_rows.append(compare(f"their o*_K table, row {other[0]} (the token after the word) vs W_K·mean i*_super",
                             ours_ok, lin.target_output[other[0]], atol=1e-6, rtol=1e-5, explained=True,
                             note="per-position table: not the paper's"))
    title = (f"Perfusion K/V edit — studio vs {REPO.split('/')[1]}@{ref_label(args.ref, args.ref_commit)} {ROE} — "
             f"tiny UNet, {len(unet_layers(pipe.unet))} layers ({time.monotonic() - t0:.0f} s)")
    ok = print_table(title, rows)
    ok_init = print_table("Perfusion — their per-position target initialisation vs the paper's single o*_K",
                          init_rows)
    return 0 if ok and ok_init else 1


if __name__ == "__main__":
    sys.exit(main())
