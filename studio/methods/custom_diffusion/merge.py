"""Closed-form merge of several Custom Diffusion concepts into one (Kumari et al., CVPR 2023, §3.2,
"Multiple-concept compositional fine-tuning", the constrained least-squares problem and its
closed-form solution; docs/methods.md, "Custom Diffusion").

Per cross-attention layer and per projection ``W`` (``W_k`` and ``W_v`` separately, ``(out, D)``)::

    W* = argmin_W ‖W C_regᵀ − W₀ C_regᵀ‖²_F   subject to   W C_tgtᵀ = V_tgt

* ``C_reg`` ``(N, D)``: text features (the context the UNet reads) of a regularisation caption set —
  every real token after BOS, BOS itself excluded (its feature is the same in every caption);
* ``C_tgt`` ``(m, D)``: the features of each concept's target phrases ``"V*_n class_n"`` and ``"photo of a
  V*_n class_n"`` with every concept's token in the text encoder, from the modifier token to EOS
  (the rows before it do not depend on the concept, and two concepts would ask for different values
  there), exact duplicates removed;
* ``V_tgt = [W_n C_tgt,nᵀ]`` ``(out, m)``: each concept's own trained weights on its own targets.

With ``M = C_regᵀ C_reg`` (plus a ridge ``λ·tr(M)/D·I``, λ = 1e-6 by default, so a caption set with
fewer distinct features than ``D`` still gives an invertible ``M``) the Lagrangian gives the closed form

    d = C_tgt M⁻¹,   W* = W₀ + (V_tgt − W₀ C_tgtᵀ)(d C_tgtᵀ)⁻¹ d

(computed in float64; ``(d C_tgtᵀ)`` is ``m × m``). ``W₀`` is the loaded base's projection. The
regularisation captions default to :data:`DEFAULT_REG_CAPTIONS` drawn from the generic caption
generator the studio already uses for Perfusion's covariance (the paper's code used 200 captions of
its own retrieval set; any caption list can be passed instead).

The merged concept holds every source concept's token and class noun (``custom_diffusion.class_words``)
and the merged full weights of every layer any source trained (a source that did not train a layer
counts there as ``W₀``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from studio.errors import IncompatibleConceptError, StudioError
from studio.methods.custom_diffusion.files import (
    EMBEDDINGS,
    META_CLASS_WORDS,
    METHOD,
    class_words,
    concept_embeddings,
    kv_layers,
)
from studio.methods.custom_diffusion.hook import base_weight

DEFAULT_REG_CAPTIONS = 1000
DEFAULT_RIDGE = 1e-6


@dataclass
class MergeReport:
    """What the merge measured: per layer and projection, the largest relative residual of the
    constraint ``‖W* c − W_n c‖ / ‖W_n c‖`` over the target rows, and the mean relative change on the
    regularisation rows ``‖(W* − W₀) c‖ / ‖W₀ c‖``."""

    target_residual: dict[str, float] = field(default_factory=dict)
    reg_change: dict[str, float] = field(default_factory=dict)
    n_reg_rows: int = 0
    n_target_rows: int = 0

    def summary(self) -> str:
        worst = max(self.target_residual.values(), default=0.0)
        change = max(self.reg_change.values(), default=0.0)
        return (f"{self.n_target_rows} target rows reproduced to a relative error ≤ {worst:.2e}; regularisation "
                f"features ({self.n_reg_rows} rows) move by ≤ {change:.3f} of the base's output")


def regularization_captions(n: int = DEFAULT_REG_CAPTIONS, seed: int = 0) -> list[str]:
    """``n`` generic captions (the generated corpus of :mod:`studio.methods.perfusion.covariance`)."""
    from studio.methods.perfusion.covariance import generated_captions

    return generated_captions(n, seed)


@torch.no_grad()
def caption_features(pipe: Any, captions: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """``C_reg`` ``(N, D)`` float64: the UNet's text context at every real token of ``captions`` but BOS."""
    from studio.methods.perfusion.covariance import context_tokens

    rows = []
    for start in range(0, len(captions), batch_size):
        states, real = context_tokens(pipe, list(captions[start:start + batch_size]))
        real = real.clone()
        real[:, 0] = False  # BOS: one fixed feature in every caption
        rows.append(states[real].double())
    if not rows:
        raise StudioError("The regularisation caption set is empty; pass at least one caption.")
    return torch.cat(rows)


@torch.no_grad()
def target_features(pipe: Any, token: str, class_word: str) -> torch.Tensor:
    """``C_tgt`` rows ``(m, D)`` float64 of one token (already in the pipeline's token table): its phrases'
    context from the token to EOS."""
    from studio.methods.perfusion.covariance import context_tokens
    from studio.methods.runtime import text_encoders

    phrases = [f"{token} {class_word}".strip(), f"photo of a {token} {class_word}".strip()]
    states, real = context_tokens(pipe, phrases)
    tok = text_encoders(pipe)[0][0]
    tid = tok.convert_tokens_to_ids(token)
    rows = []
    for b, phrase in enumerate(phrases):
        ids = tok(phrase, truncation=True, max_length=tok.model_max_length).input_ids
        if tid not in ids:
            raise StudioError(f"The token {token} is not in the text encoder; apply it before encoding its targets.")
        start = ids.index(tid)
        rows.append(states[b, start:][real[b, start:]].double())
    return torch.cat(rows)


def _unique_rows(x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    for row in x:
        if not any(torch.equal(row, s) for s in seen):
            seen.append(row)
    return torch.stack(seen)


def solve_merge(w0: torch.Tensor, c_reg: torch.Tensor, targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
                ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """The closed form (module doc) for one projection: ``w0`` ``(out, D)``, ``c_reg`` ``(N, D)``,
    ``targets`` = ``[(W_n (out, D), C_tgt,n (m_n, D))]`` → ``W*`` ``(out, D)`` float64."""
    w0 = w0.double()
    d = c_reg.shape[1]
    m = c_reg.T @ c_reg  # (D, D)
    m = m + ridge * (torch.trace(m) / d) * torch.eye(d, dtype=m.dtype)
    c_tgt = torch.cat([c for _, c in targets])  # (m, D)
    v_tgt = torch.cat([w.double() @ c.T for w, c in targets], dim=1)  # (out, m)
    dd = torch.linalg.solve(m, c_tgt.T).T  # d = C_tgt M⁻¹ (M symmetric), (m, D)
    gram = dd @ c_tgt.T  # (m, m)
    rhs = v_tgt - w0 @ c_tgt.T  # (out, m)
    coef = torch.linalg.lstsq(gram.T, rhs.T).solution.T  # rhs · gram⁻¹ (least squares if singular)
    return w0 + coef @ dd


def merge_concepts(base: Any, concepts: Sequence[Any], *, name: str = "", captions: Sequence[str] | None = None,
                   ridge: float = DEFAULT_RIDGE) -> tuple[Any, MergeReport]:
    """Merge ``concepts`` (Custom Diffusion :class:`~studio.concept.Concept` objects, each checked
    against ``base``) into one concept holding every token; returns it and a :class:`MergeReport`."""
    from studio.concept import Concept
    from studio.methods.custom_diffusion import CustomDiffusion
    from studio.methods.runtime import token_table

    if len(concepts) < 2:
        raise StudioError("Merging needs at least two Custom Diffusion concepts.")
    method = CustomDiffusion()
    for c in concepts:
        if c.method != METHOD:
            raise IncompatibleConceptError(f"Concept {c.name or c.trigger} is a {c.method} concept; only Custom "
                                           "Diffusion concepts merge (their K/V weights are what is merged).")
        method.validate(c)
        method.check_base(c, base)
    tokens = [t for c in concepts for t in c.tokens]
    if len(set(tokens)) != len(tokens):
        raise StudioError(f"The concepts share a trigger ({tokens}); rename one with `concepts rename` first.")
    words = [w for c in concepts for w in class_words(c)]
    pipe, unet = base.pipe, base.pipe.unet
    per_concept = [kv_layers(c.tensors) for c in concepts]
    layers = sorted({n for kv in per_concept for n in kv})
    # 1. the features: C_reg from the plain base, C_tgt with every token in the text encoder.
    c_reg = caption_features(pipe, captions if captions is not None else regularization_captions())
    table = token_table(pipe)
    key = "custom_diffusion-merge"
    embeddings = [torch.cat([concept_embeddings(c)[e].float() for c in concepts]) for e in range(len(concept_embeddings(concepts[0])))]
    table.set(key, tokens, embeddings)
    try:
        c_tgt: list[torch.Tensor] = []
        i = 0
        for c in concepts:
            rows = [target_features(pipe, tok, w) for tok, w in zip(c.tokens, words[i:i + len(c.tokens)])]
            c_tgt.append(_unique_rows(torch.cat(rows)))
            i += len(c.tokens)
    finally:
        table.drop(key)
    # 2. the closed form per layer and projection.
    report = MergeReport(n_reg_rows=int(c_reg.shape[0]), n_target_rows=sum(int(c.shape[0]) for c in c_tgt))
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        attn = unet.get_submodule(layer)
        pair = []
        for j, proj in enumerate(("to_k", "to_v")):
            w0 = base_weight(getattr(attn, proj)).detach().to("cpu", torch.float64)
            ws = [kv[layer][j].double() if layer in kv else w0 for kv in per_concept]
            w = solve_merge(w0, c_reg, list(zip(ws, c_tgt)), ridge)
            residual = max(float((w @ c.T - wn @ c.T).norm(dim=0).div((wn @ c.T).norm(dim=0).clamp_min(1e-12)).max())
                           for wn, c in zip(ws, c_tgt))
            change = float(((w - w0) @ c_reg.T).norm(dim=0).mean() / (w0 @ c_reg.T).norm(dim=0).mean().clamp_min(1e-12))
            report.target_residual[f"{layer}.{proj}"] = residual
            report.reg_change[f"{layer}.{proj}"] = change
            pair.append(w.float())
        merged[layer] = (pair[0], pair[1])
    from studio.methods.custom_diffusion import concept_tensors

    tensors = concept_tensors(merged, embeddings)
    assert set(tensors) >= {EMBEDDINGS[0]}
    concept = Concept(method=METHOD, tokens=tokens, tensors=tensors, class_word=words[0],
                      name=name or "+".join(c.name or c.trigger.strip("<>") for c in concepts), base=base.fingerprint(),
                      meta={META_CLASS_WORDS: json.dumps(words),
                            "custom_diffusion.merged_from": json.dumps([c.name or c.trigger for c in concepts]),
                            "custom_diffusion.merge": json.dumps({"ridge": ridge, "reg_captions": len(captions) if captions is not None
                                                                  else DEFAULT_REG_CAPTIONS})})
    method.validate(concept)
    return concept, report
