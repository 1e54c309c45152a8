"""How Perfusion's ``sim/energy`` on held-out prompts converges as the caption corpus grows.

For a base (default: the ``tiny`` offline base) this script

1. encodes a large *reference* corpus (generated with another seed than the corpora under test)
   and builds ``C_ref⁻¹``;
2. for each corpus size ``N``, builds ``C_N⁻¹`` from the first ``N`` generated captions
   (``studio.methods.perfusion.covariance.generated_captions``, seed 0 — the default corpus);
3. on held-out prompts (a third seed) takes ``i*`` = the context state at a noun of a prompt
   (a stand-in for a concept encoding) and compares ``r = sim/energy = eᵀC⁻¹i* / i*ᵀC⁻¹i*`` at
   every real token ``e`` of the held-out prompts under ``C_N⁻¹`` and ``C_ref⁻¹``;
4. sweeps the ridge ``λ`` at the largest ``N`` (condition number of ``C_λ`` and the change of ``r``).

Columns: ``tokens/D`` (real tokens per context dimension), ``mean|Δr|``, ``p99|Δr|``, ``max|Δr|``,
``max|Δgate|`` with the inference gate ``σ((r − 0.7)/0.15)``, and ``r@i*`` (mean ``r`` at the tokens
that produced each ``i*``, ≈ 1 by construction — a sanity check) vs ``r p99 other`` (the 99th
percentile of ``r`` elsewhere: how selective the similarity is).

``--width 768`` adds a random CLIP-like encoder of that width (two layers, random weights) to see
how the needed corpus size scales with ``D`` (covariance estimates converge with tokens per
dimension). Run::

    python scripts/perfusion_corpus_convergence.py                 # tiny base, ~1 min on 1 CPU
    python scripts/perfusion_corpus_convergence.py --base tiny-sdxl
    python scripts/perfusion_corpus_convergence.py --width 768 --sizes 2000,5000,10000,20000,40000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.methods.perfusion.covariance import (  # noqa: E402
    DEFAULT_RIDGE,
    accumulate_covariance,
    context_tokens,
    generated_captions,
    regularised_inverse,
)

BETA, TAU = 0.7, 0.15


class _Pipe:
    """A stand-in pipeline exposing one tokenizer + text encoder (what perfusion_cov reads)."""

    def __init__(self, tokenizer: Any, text_encoder: Any):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder


def random_clip(width: int, layers: int = 2) -> _Pipe:
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.models.tiny import load_clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=max(1, width // 64), max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return _Pipe(load_clip_tokenizer(), CLIPTextModel(cfg).eval())


def held_out(pipe: Any, n_prompts: int, n_stars: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Real-token states ``E (M, D)`` of held-out prompts, ``i* (S, D)`` and the row of each i* in E."""
    captions = generated_captions(n_prompts, seed=987_654)
    states, real = context_tokens(pipe, captions)
    rows, stars, star_rows = [], [], []
    offset = 0
    for b in range(states.shape[0]):
        e = states[b][real[b]]  # (L, D)
        if len(stars) < n_stars and e.shape[0] > 4:
            pos = e.shape[0] - 2  # the token before EOS: usually a noun or a place word
            stars.append(e[pos])
            star_rows.append(offset + pos)
        rows.append(e)
        offset += e.shape[0]
    return torch.cat(rows).double(), torch.stack(stars).double(), star_rows


def ratios(e: torch.Tensor, stars: torch.Tensor, c_inv: torch.Tensor) -> torch.Tensor:
    """``r[m, s] = e_mᵀ C⁻¹ i*_s / (i*_sᵀ C⁻¹ i*_s)`` — legend: m token, s concept, i/j feature."""
    u = torch.einsum("ij,sj->si", c_inv, stars)  # C⁻¹ i*
    energy = torch.einsum("si,si->s", stars, u)
    return torch.einsum("mi,si->ms", e, u) / energy


def gate(r: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid((r - BETA) / TAU)


def study(name: str, pipe: Any, sizes: list[int], ref_size: int, ridge: float, n_prompts: int, n_stars: int) -> None:
    t0 = time.monotonic()
    d = None
    e, stars, star_rows = held_out(pipe, n_prompts, n_stars)
    d = e.shape[1]
    ref_c, ref_n = accumulate_covariance(pipe, generated_captions(ref_size, seed=424_242), batch_size=128)
    r_ref = ratios(e, stars, regularised_inverse(ref_c, ridge))
    mask = torch.ones_like(r_ref, dtype=torch.bool)
    for s, row in enumerate(star_rows):
        mask[row, s] = False
    print(f"\n## {name}: D = {d}, reference corpus {ref_size} captions = {ref_n} tokens "
          f"({ref_n / d:.0f} tokens/D), ridge λ = {ridge:g}, held-out: {e.shape[0]} tokens × {len(star_rows)} i*")
    print(f"reference: r@i* = {r_ref[~mask].mean():.3f}, r p99 other = {r_ref[mask].quantile(0.99):.3f}, "
          f"gate p99 other = {gate(r_ref[mask]).quantile(0.99):.3f}")
    print("| captions | tokens | tokens/D | mean|Δr| | p99|Δr| | max|Δr| | max|Δgate| | r p99 other |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    captions = generated_captions(max(sizes), seed=0)
    total: torch.Tensor | None = None
    count, done = 0, 0
    for size in sorted(sizes):  # accumulate incrementally: corpus N is a prefix of corpus N' > N
        part, n = accumulate_covariance(pipe, captions[done:size], batch_size=128)
        total = part * n if total is None else total + part * n
        count += n
        done = size
        r = ratios(e, stars, regularised_inverse(total / count, ridge))
        dr = (r - r_ref).abs()
        dg = (gate(r) - gate(r_ref)).abs()
        print(f"| {size} | {count} | {count / d:.0f} | {dr.mean():.4f} | {dr.flatten().quantile(0.99):.4f} | "
              f"{dr.max():.4f} | {dg.max():.4f} | {r[mask].quantile(0.99):.3f} |")
    assert total is not None
    c = total / count
    print(f"\nridge sweep at {done} captions (Δr against λ = 1e-6):")
    print("| λ | cond(C_λ) | mean|Δr| | max|Δr| | max|Δgate| |")
    print("|---:|---:|---:|---:|---:|")
    r_small = ratios(e, stars, regularised_inverse(c, 1e-6))
    for lam in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        reg = c.double() + lam * torch.trace(c.double()) / d * torch.eye(d, dtype=torch.float64)
        ev = torch.linalg.eigvalsh(reg)
        r = ratios(e, stars, regularised_inverse(c, lam))
        dr = (r - r_small).abs()
        print(f"| {lam:g} | {float(ev.max() / ev.min()):.3g} | {dr.mean():.4f} | {dr.max():.4f} | "
              f"{(gate(r) - gate(r_small)).abs().max():.4f} |")
    print(f"({time.monotonic() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny", help="a studio base spec (tiny, tiny-sdxl, a folder …)")
    ap.add_argument("--width", type=int, default=0, help="also study a random CLIP-like encoder of this width")
    ap.add_argument("--sizes", default="250,500,1000,2000,5000,10000,20000,40000")
    ap.add_argument("--ref-size", type=int, default=80_000)
    ap.add_argument("--ridge", type=float, default=DEFAULT_RIDGE)
    ap.add_argument("--prompts", type=int, default=300, help="held-out prompts")
    ap.add_argument("--stars", type=int, default=16, help="held-out i* vectors")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.base:
        from studio.models import load_base

        base = load_base(args.base, device="cpu")
        study(f"base {args.base}", base.pipe, sizes, args.ref_size, args.ridge, args.prompts, args.stars)
    if args.width:
        study(f"random CLIP-like encoder, width {args.width}", random_clip(args.width), sizes, args.ref_size,
              args.ridge, args.prompts, args.stars)


if __name__ == "__main__":
    main()
