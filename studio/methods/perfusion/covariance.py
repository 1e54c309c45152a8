"""Perfusion's ``C⁻¹``: the inverse (ridge-regularised) uncentered covariance of the text states
the UNet reads, one per base, computed once from a caption corpus and cached by the base's
identity key (Tewel et al. 2023; docs/methods.md §4) — and the other text-side helpers of Perfusion:
:func:`context_tokens` (the context the UNet reads), :func:`word_encoding` / :func:`token_encoding`
(the encodings ``i*_super`` and ``i*`` are made of).

``C = (1/N) Σ_n e_n e_nᵀ`` over every **real** token ``e_n`` ``(D,)`` of the corpus — from BOS up to
and including EOS, never padding — where ``e`` is what the cross-attention layers receive:

* SD 1 / SD 2: the text encoder's ``last_hidden_state`` (``D`` = 768 / 1024);
* SDXL: the concatenation of both encoders' penultimate hidden states, ``[h_L; h_G]`` (``D`` = 768 +
  1280 = 2048) — the context every SDXL cross-attention ``W_K``/``W_V`` multiplies. ``C`` is the full
  2048 × 2048 covariance of that vector, cross-encoder blocks included, so ``eᵀC⁻¹i*`` is the same
  Mahalanobis-type similarity the rank-one edit of a 2048-input projection needs (Perfusion's
  derivation holds for any input space of ``W``; nothing in it is CLIP-L specific).

BOS is counted: its encoding is the same in every caption (causal attention), one fixed direction
that ``C⁻¹`` then damps, which keeps ``sim`` at BOS small. Padding is not counted (docs/methods.md §4); the
edit still acts on padding rows at inference (they are ordinary context rows for the hook).

**Ridge.** ``C_λ = C + λ · (tr C / D) · I`` (λ relative to the mean eigenvalue, so ``sim / energy``
stays invariant to the scale of ``C`` — Perfusion only uses that ratio). Since ``λ_max(C) ≤ tr C``,
``cond(C_λ) ≤ 1 + D/λ`` for any corpus, also when ``C`` itself is singular — and it is close to
singular: a final LayerNorm puts the states near a hyperplane (the tiny base's is exactly singular,
a random 768-d CLIP measures cond(C + 1e-6·mean·I) = 4.3e8). Default ``λ = 1e-4``: measured
``cond(C_λ)`` = 2.2e5 (tiny, D = 32) and 4.3e6 (768-d), and the ridge moves ``sim/energy`` on held-out
prompts by at most 0.005 / 0.0008 — below the corpus noise at the default size (max 0.027 / 0.029);
λ = 1e-3 would move it by up to 0.049 on the tiny base. ``C`` and ``C_λ⁻¹`` are computed and cached in
float64 and ``C⁻¹ i*`` is formed in float64 (the hook then works in float32).

**Corpus.** No caption dataset can be downloaded here, so the default corpus is generated:
``DEFAULT_CAPTIONS`` = 20,000 captions (≈ 188k real tokens) drawn deterministically (seeded
``random.Random``) from the templates × nouns × attributes × places … of
``studio/assets/perfusion/corpus_words.json``. A user corpus (one caption per line, e.g. their own
captions or a COCO dump) replaces it with ``corpus=PATH``. The size is justified by
``scripts/perfusion_corpus_convergence.py`` (``sim/energy`` on held-out prompts against an independent
80k-caption reference): at 20k captions mean ``|Δr|`` = 0.0030 / 0.0025, p99 0.013 / 0.011, max gate
change 0.032 / 0.028 on the tiny base (D = 32) / a random 768-d CLIP encoder; the error falls like
``N^(-1/2)`` and depends on the caption count far more than on ``D`` (2k captions: 0.0086 / 0.0073),
so 20k holds for SD 1/2 and SDXL too. Cost: about 5 CPU-seconds on the tiny base, an estimated
~10 CPU-minutes for CLIP-L (seconds on a GPU) — once per base, then cached.

**Cache.** ``<cache dir>/<sha256 of (identity, corpus, λ, version)[:24]>.safetensors`` with tensors
``c`` and ``c_inv`` ``(D, D)`` float64 and the settings as metadata. The cache dir is
``$STUDIO_PERFUSION_CACHE``, else ``$XDG_CACHE_HOME/studio/perfusion`` (``~/.cache/studio/perfusion``);
a loaded base also keeps its ``C⁻¹`` in memory (``base.extra``). Two fine-tunes of one family have
different identity keys, so they never share a ``C⁻¹``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError
from studio.methods.runtime import text_encoders

CORPUS_WORDS = Path(__file__).resolve().parents[2] / "assets" / "perfusion" / "corpus_words.json"
DEFAULT_CAPTIONS = 20_000  # ≈ 188k real tokens; chosen by scripts/perfusion_corpus_convergence.py (module doc)
DEFAULT_RIDGE = 1e-4
CACHE_VERSION = 1  # bump when the computation changes: it is part of the cache key
_MEMORY_KEY = "perfusion.c_inv"


class PerfusionError(StudioError):
    """A Perfusion request cannot be carried out as asked (a class word without tokens, an unknown
    option …)."""


class CorpusError(PerfusionError):
    """A user caption corpus is missing or unusable."""


@dataclass(frozen=True)
class CovarianceSettings:
    """How ``C`` is estimated. Every field is part of the cache key."""

    n_captions: int = DEFAULT_CAPTIONS  # generated captions (ignored with a user corpus)
    ridge: float = DEFAULT_RIDGE  # λ relative to tr(C)/D
    seed: int = 0  # generator seed of the default corpus
    corpus: str | None = None  # a text file, one caption per line, instead of the generated corpus
    batch_size: int = 256  # captions per encoder forward (does not change the result)

    def __post_init__(self) -> None:
        if self.n_captions < 1:
            raise CorpusError(f"n_captions must be at least 1, got {self.n_captions}.")
        if not (self.ridge > 0 and self.ridge < 1):
            raise CorpusError(f"The ridge λ must be in (0, 1), got {self.ridge}.")
        if self.batch_size < 1:
            raise CorpusError(f"batch_size must be at least 1, got {self.batch_size}.")


# -- the corpus ------------------------------------------------------------------------------------
_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "old man": "old men", "mouse": "mice",
              "sheep": "sheep", "fish": "fish", "deer": "deer", "person": "people", "baby": "babies",
              "wolf": "wolves", "knife": "knives", "leaf": "leaves", "shelf": "shelves", "dice": "dice",
              "goose": "geese", "tooth": "teeth", "foot": "feet"}


def plural(noun: str) -> str:
    """English plural of a (possibly two-word) noun, good enough for captions."""
    head, _, last = noun.rpartition(" ")
    prefix = f"{head} " if head else ""
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if last in _IRREGULAR:
        return prefix + _IRREGULAR[last]
    if re.search(r"(s|x|z|ch|sh)$", last):
        return f"{prefix}{last}es"
    if re.search(r"[^aeiou]y$", last):
        return f"{prefix}{last[:-1]}ies"
    return f"{prefix}{last}s"


def load_words(path: str | os.PathLike[str] = CORPUS_WORDS) -> dict[str, list[str]]:
    """The word lists of the generated corpus (``templates``, ``nouns``, ``adjectives`` …)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if isinstance(v, list)}


def generated_captions(n: int, seed: int = 0, words: dict[str, list[str]] | None = None) -> list[str]:
    """``n`` captions drawn deterministically from the templates and word lists (same ``n`` and
    ``seed`` → the same list; a longer list starts with the shorter one)."""
    w = words or load_words()
    rng = random.Random(seed)
    slots: dict[str, Callable[[], str]] = {
        "a": lambda: rng.choice(("a", "a", "a", "the", "the", "my", "this", "one")),
        "a2": lambda: rng.choice(("a", "a", "the", "an old", "a big", "a little")),
        "adj": lambda: rng.choice(w["adjectives"]), "adj2": lambda: rng.choice(w["adjectives"]),
        "noun": lambda: rng.choice(w["nouns"]), "noun2": lambda: rng.choice(w["nouns"]),
        "nouns": lambda: plural(rng.choice(w["nouns"])), "nouns2": lambda: plural(rng.choice(w["nouns"])),
        "place": lambda: rng.choice(w["places"]), "action": lambda: rng.choice(w["actions"]),
        "style": lambda: rng.choice(w["styles"]), "style2": lambda: rng.choice(w["styles2"]),
        "light": lambda: rng.choice(w["lights"]), "time": lambda: rng.choice(w["times"]),
        "material": lambda: rng.choice(w["materials"]), "surface": lambda: rng.choice(w["surfaces"]),
        "colour": lambda: rng.choice(w["colours"]),
    }
    out = []
    for _ in range(n):
        template = rng.choice(w["templates"])
        text = re.sub(r"\{(\w+)\}", lambda m: slots[m.group(1)](), template)
        text = re.sub(r"\ba ([aeiou])", r"an \1", text)  # a apple → an apple
        out.append(text)
    return out


def read_corpus(path: str | os.PathLike[str]) -> list[str]:
    """A user corpus: one caption per line (blank lines and ``#`` comments skipped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CorpusError(f"No caption corpus at {p}; pass a text file with one caption per line.")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CorpusError(f"{p} is not UTF-8 text; save the captions as UTF-8, one per line.") from None
    captions = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if len(captions) < 100:
        raise CorpusError(f"{p} holds {len(captions)} captions; C needs at least 100 (thousands are better).")
    return captions


def corpus_captions(settings: CovarianceSettings) -> tuple[list[str], str]:
    """The captions and a digest naming them (part of the cache key)."""
    if settings.corpus:
        captions = read_corpus(settings.corpus)
        return captions, f"file:{hashlib.sha256(chr(10).join(captions).encode()).hexdigest()[:16]}"
    return generated_captions(settings.n_captions, settings.seed), corpus_digest(settings)


def corpus_digest(settings: CovarianceSettings) -> str:
    """A digest naming the corpus without encoding it: the generated corpus by its size, seed and
    word lists; a user corpus by its captions' hash."""
    if settings.corpus:
        return corpus_captions(settings)[1]
    words_digest = hashlib.sha256(CORPUS_WORDS.read_bytes()).hexdigest()[:12]
    return f"generated:{settings.n_captions}:{settings.seed}:{words_digest}"


def context_dim(pipe: Any) -> int:
    """``D``: the width of the text context the UNet reads (SDXL: both encoders together)."""
    return sum(int(te.config.hidden_size) for _, te in text_encoders(pipe))


# -- encoding ----------------------------------------------------------------------------------------
@torch.no_grad()
def context_tokens(pipe: Any, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's text context of ``captions`` and which positions are real tokens.

    Returns ``states (B, T, D)`` float32 — SD: ``last_hidden_state``; SDXL: ``[h_L[-2]; h_G[-2]]`` —
    and ``real (B, T)`` bool, True from BOS up to and including EOS. Sequences are padded only to
    the batch's longest caption: CLIP's causal attention makes real positions independent of
    padding, so the states equal those of the pipeline's 77-token encoding.
    """
    pairs = text_encoders(pipe)
    states, real = [], None
    for tok, te in pairs:
        enc = tok(list(captions), padding="longest", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt", return_attention_mask=True)
        ids = enc.input_ids.to(te.device)
        mask = enc.attention_mask.bool()
        real = mask if real is None else real & mask
        if len(pairs) == 1:
            states.append(te(ids)[0].float())
        else:
            states.append(te(ids, output_hidden_states=True).hidden_states[-2].float())
    width = min(s.shape[1] for s in states)
    return torch.cat([s[:, :width] for s in states], dim=-1).cpu(), real[:, :width]  # type: ignore[index]


@torch.no_grad()
def accumulate_covariance(pipe: Any, captions: Sequence[str], batch_size: int = 256,
                          progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, int]:
    """``C = (1/N) Σ_n e_n e_nᵀ`` ``(D, D)`` float64 over the real tokens of ``captions``, and ``N``.

    Einsum legend: ``n`` real token, ``i``/``j`` context feature.
    """
    total: torch.Tensor | None = None
    count = 0
    for start in range(0, len(captions), batch_size):
        states, real = context_tokens(pipe, captions[start:start + batch_size])
        e = states[real].double()  # (n, D)
        part = torch.einsum("ni,nj->ij", e, e)
        total = part if total is None else total + part
        count += int(e.shape[0])
        if progress is not None:
            progress(min(start + batch_size, len(captions)), len(captions))
    if total is None or count == 0:
        raise CorpusError("The caption corpus produced no tokens.")
    return total / count, count


def regularised_inverse(c: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """``C_λ⁻¹ = (C + λ·(tr C / D)·I)⁻¹`` ``(D, D)`` float64 (symmetric; computed by Cholesky)."""
    c = c.double()
    d = c.shape[0]
    reg = c + ridge * (torch.trace(c) / d) * torch.eye(d, dtype=c.dtype)
    reg = 0.5 * (reg + reg.T)
    chol = torch.linalg.cholesky(reg)
    inv = torch.cholesky_inverse(chol)
    return 0.5 * (inv + inv.T)


# -- encodings ------------------------------------------------------------------------------------
def _find_span(ids: list[int], span: list[int]) -> int:
    """Index of the last token of the last occurrence of ``span`` in ``ids`` (−1 if absent)."""
    for start in range(len(ids) - len(span), -1, -1):
        if ids[start:start + len(span)] == span:
            return start + len(span) - 1
    return -1


@torch.no_grad()
def word_encoding(pipe: Any, word: str, prompts: Sequence[str]) -> torch.Tensor:
    """Mean context state ``(D,)`` float32 at the last token of ``word`` in each of ``prompts``
    (which contain ``word``) — the superclass encoding ``i*_super`` when ``word`` is the class word.
    The context is the one the UNet reads (:func:`~studio.methods.perfusion.covariance.context_tokens`)."""
    tok = text_encoders(pipe)[0][0]
    span = tok(word, add_special_tokens=False).input_ids
    if not span:
        raise PerfusionError(f"The class word {word!r} has no tokens; pass a real word such as 'teddy'.")
    states, _ = context_tokens(pipe, list(prompts))
    rows = []
    for b, prompt in enumerate(prompts):
        pos = _find_span(tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids, span)
        if pos < 0:
            raise PerfusionError(f"The prompt {prompt!r} does not contain {word!r}.")
        rows.append(states[b, pos])
    return torch.stack(rows).mean(0)


@torch.no_grad()
def token_encoding(pipe: Any, trigger: str, embeddings: Sequence[torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
    """Mean context state ``(D,)`` at an added token ``trigger`` with input ``embeddings`` (one
    ``(D_in,)`` per encoder) in ``prompts`` — e.g. ``i*`` of a concept that is not trained."""
    from studio.methods.runtime import token_table

    table = token_table(pipe)
    key = f"perfusion-probe:{trigger}"
    table.set(key, [trigger], [e.reshape(1, -1).float() for e in embeddings])
    try:
        return word_encoding(pipe, trigger, prompts)
    finally:
        table.drop(key)


# -- the cache -------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$STUDIO_PERFUSION_CACHE`` or ``$XDG_CACHE_HOME/studio/perfusion`` (``~/.cache/studio/perfusion``)."""
    explicit = os.environ.get("STUDIO_PERFUSION_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "studio" / "perfusion"


def cache_key(identity: str, digest: str, settings: CovarianceSettings) -> str:
    blob = json.dumps({"identity": identity, "corpus": digest, "ridge": settings.ridge, "version": CACHE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(identity: str, settings: CovarianceSettings | None = None,
               cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``C⁻¹`` of the base with identity key ``identity`` is (or will be) cached."""
    s = settings or CovarianceSettings()
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / f"{cache_key(identity, corpus_digest(s), s)}.safetensors"


@dataclass
class Covariance:
    """``C`` and ``C_λ⁻¹`` ``(D, D)`` float64 of one base, and how they were made."""

    c: torch.Tensor
    c_inv: torch.Tensor
    n_tokens: int
    n_captions: int
    corpus: str
    ridge: float
    path: Path | None = None
    computed: bool = False  # True when this call encoded the corpus (not read from a cache)
    seconds: float = 0.0  # time spent encoding the corpus (0 when read from a cache)


def compute_covariance(pipe: Any, settings: CovarianceSettings | None = None,
                       progress: Callable[[int, int], None] | None = None) -> Covariance:
    """Encode the corpus with ``pipe``'s text encoder(s) and build ``C`` and ``C_λ⁻¹`` (no cache)."""
    s = settings or CovarianceSettings()
    t0 = time.monotonic()
    captions, digest = corpus_captions(s)
    c, n = accumulate_covariance(pipe, captions, s.batch_size, progress)
    return Covariance(c=c, c_inv=regularised_inverse(c, s.ridge), n_tokens=n, n_captions=len(captions),
                      corpus=digest, ridge=s.ridge, computed=True, seconds=time.monotonic() - t0)


def load_cached(path: Path) -> Covariance | None:
    """The cached covariance at ``path``, or None when absent or unreadable (it is then recomputed)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            c, c_inv = f.get_tensor("c"), f.get_tensor("c_inv")
        return Covariance(c=c.double(), c_inv=c_inv.double(), n_tokens=int(md["n_tokens"]),
                          n_captions=int(md["n_captions"]), corpus=md["corpus"], ridge=float(md["ridge"]), path=path)
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def save_cached(cov: Covariance, path: Path, identity: str) -> Path:
    """Write ``c`` and ``c_inv`` (float64: ``C_λ`` may have a condition number near ``1 + D/λ``, too
    many digits for float32) with their provenance as metadata."""
    from safetensors.torch import save_file

    from studio.atomic import atomic_path

    md = {"identity": identity, "n_tokens": str(cov.n_tokens), "n_captions": str(cov.n_captions),
          "corpus": cov.corpus, "ridge": repr(cov.ridge), "version": str(CACHE_VERSION)}
    with atomic_path(path) as tmp:
        save_file({"c": cov.c.double().contiguous(), "c_inv": cov.c_inv.double().contiguous()}, str(tmp), metadata=md)
    return path


def inverse_covariance(base: Any, settings: CovarianceSettings | None = None,
                       cache_dir: str | os.PathLike[str] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> Covariance:
    """``C`` / ``C_λ⁻¹`` of ``base`` (a :class:`~studio.models.BaseModel`): from memory, else from
    the cache file keyed by ``base.identity``, else computed from the corpus and cached.

    Writing the cache is best effort: a read-only cache folder costs a recomputation next time,
    not an error.
    """
    s = settings or CovarianceSettings()
    path = cache_path(base.identity, s, cache_dir)
    memory: dict[str, Covariance] = base.extra.setdefault(_MEMORY_KEY, {})
    if str(path) in memory:
        return memory[str(path)]
    cov = load_cached(path)
    if cov is None:
        cov = compute_covariance(base.pipe, s, progress)
        try:
            cov.path = save_cached(cov, path, base.identity)
        except (OSError, StudioError):
            cov.path = None
    memory[str(path)] = cov
    return cov
