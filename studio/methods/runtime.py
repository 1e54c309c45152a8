"""Per-pipeline runtime state shared by the methods (no globals: it hangs on the pipeline).

:class:`TokenTable` owns every extra token row of every text encoder. Each encoder's input
embedding is wrapped once by :class:`SplicedEmbedding`, which looks up ids below the original
vocabulary size in the untouched original matrix and ids above it in a small extra table; with no
extra tokens left, the original module and the original tokenizer are put back, so ``remove``
restores the base bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class SplicedEmbedding(nn.Module):
    """An input embedding = frozen original rows ``(V, D)`` + extra rows ``(N, D)``.

    ``forward(input_ids: (B, T) long) -> (B, T, D)``. Only ``extra`` can receive gradients when it
    is a Parameter — the original matrix is never copied or trained.
    """

    def __init__(self, original: nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.original = original
        self.num_original = int(original.num_embeddings)
        if isinstance(extra, nn.Parameter):
            self.extra = extra
        else:  # a buffer follows .to(device, dtype) with the rest of the pipeline
            self.register_buffer("extra", extra, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # some callers read .weight (shape checks, dtype, device)
        return torch.cat([self.original.weight, self.extra.to(self.original.weight.dtype)], dim=0)

    @property
    def num_embeddings(self) -> int:
        return self.num_original + int(self.extra.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.original.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_extra = input_ids >= self.num_original
        base = self.original(torch.where(is_extra, torch.zeros_like(input_ids), input_ids))
        if not bool(is_extra.any()):
            return base
        extra_ids = (input_ids - self.num_original).clamp(min=0)
        extra = nn.functional.embedding(extra_ids, self.extra).to(base.dtype)
        return torch.where(is_extra.unsqueeze(-1), extra, base)


def text_encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """``[(tokenizer, text_encoder), …]`` of the CLIP encoders — one pair for SD 1/2, two for SDXL and SD 3
    (CLIP-L, then bigG), one for FLUX (CLIP-L; its ``text_encoder_2`` is T5, which no method trains)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    te2 = getattr(pipe, "text_encoder_2", None)
    if te2 is not None and not type(te2).__name__.startswith("T5"):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def check_embedding_widths(label: str, widths: list[int], base: Any) -> None:
    """Refuse a concept whose token embeddings (``widths``: one ``D_e`` per text encoder it holds) do not
    fit ``base``'s CLIP text encoders — one per encoder, each of that encoder's width."""
    from studio.errors import IncompatibleConceptError

    want = [int(te.config.hidden_size) for _, te in text_encoders(base.pipe)]
    if list(widths) != want:
        raise IncompatibleConceptError(
            f"{label} has token embeddings {list(widths)}-d but base {base.name}'s text encoders are {want}-d; it "
            "was made for another model family.")


@dataclass
class _Entry:
    tokens: list[str]
    vectors: list[torch.Tensor]  # per encoder, (n, D_e)


_TOKENIZERS = ("tokenizer", "tokenizer_2")  # the pipeline attribute of each encoder's tokenizer


@dataclass(frozen=True)
class TableState:
    """What :meth:`TokenTable.snapshot` saw: the entries, and per encoder ``(tokenizer, input embedding)``."""

    entries: dict[str, _Entry]
    modules: list[tuple[Any, Any]]


@dataclass
class TokenTable:
    """Extra tokens of all active concepts, per encoder."""

    pipe: Any
    pristine_tokenizers: list[Any] = field(default_factory=list)
    original_embeddings: list[nn.Embedding] = field(default_factory=list)
    entries: dict[str, _Entry] = field(default_factory=dict)
    # the pipeline's own tokenizer objects, put back (by identity) when the last extra token leaves
    original_tokenizers: list[Any] = field(default_factory=list, repr=False)
    _vocabs: list[frozenset[str]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for tok, te in text_encoders(self.pipe):
            self.original_tokenizers.append(tok)
            self.pristine_tokenizers.append(copy.deepcopy(tok))
            self.original_embeddings.append(te.get_input_embeddings())

    def set(self, key: str, tokens: list[str], vectors: list[torch.Tensor]) -> None:
        """Add or replace the tokens of ``key``; ``vectors[e]`` is ``(len(tokens), D_e)``.

        Transactional: tokens or vectors that do not fit (not strings, a clash with the vocabulary
        or another entry's tokens, a wrong width, non-finite values) raise ``ValueError`` and leave
        the table, the tokenizers and the input embeddings exactly as they were."""
        tokens = list(tokens)
        vectors = list(vectors)
        self._check(key, tokens, vectors)
        state = self.snapshot()
        self.entries[key] = _Entry(tokens, [v.detach() for v in vectors])
        self._commit(state, f"the tokens {tokens}")

    def drop(self, key: str) -> None:
        state = self.snapshot()
        self.entries.pop(key, None)
        self._commit(state, f"the tokens of {key}")

    def snapshot(self) -> TableState:
        """The entries and the installed tokenizers / input embeddings (by identity), for :meth:`restore`."""
        return TableState(dict(self.entries),
                          [(tok, te.get_input_embeddings()) for tok, te in text_encoders(self.pipe)])

    def restore(self, state: TableState) -> None:
        """Put back what :meth:`snapshot` saw: the same entries, tokenizer and embedding objects."""
        self.entries.clear()
        self.entries.update(state.entries)
        for name, (tok, emb), (_, te) in zip(_TOKENIZERS, state.modules, text_encoders(self.pipe)):
            setattr(self.pipe, name, tok)
            te.set_input_embeddings(emb)

    def token_ids(self, token: str) -> list[int]:
        """Ids of ``token`` in each tokenizer (after a rebuild)."""
        return [tok.convert_tokens_to_ids(token) for tok, _ in text_encoders(self.pipe)]

    def _commit(self, state: TableState, what: str) -> None:
        try:
            self._rebuild()
        except BaseException as err:
            self.restore(state)
            if isinstance(err, ValueError) or not isinstance(err, Exception):
                raise
            raise ValueError(f"the text encoder cannot take {what} ({type(err).__name__}: {err})") from err

    def _check(self, key: str, tokens: list[Any], vectors: list[Any]) -> None:
        """Refuse (``ValueError``) an entry the rebuild could not take or that would misbehave later."""
        if not tokens:
            raise ValueError("no tokens given")
        bad = [t for t in tokens if not isinstance(t, str) or not t.strip() or t != t.strip()]
        if bad:
            raise ValueError(f"tokens must be non-empty strings without surrounding spaces, got {bad!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"the tokens {tokens} repeat one another")
        taken = {t: k for k, e in self.entries.items() if k != key for t in e.tokens}
        shared = sorted(t for t in tokens if t in taken)
        if shared:
            raise ValueError(f"tokens {shared} are already added by {taken[shared[0]]}")
        for vocab in self._pristine_vocabs():
            clash = [t for t in tokens if t in vocab]
            if clash:
                raise ValueError(f"tokens already in the vocabulary: {clash}")
        if len(vectors) != len(self.original_embeddings):
            raise ValueError(f"{len(vectors)} vector sets for {len(self.original_embeddings)} text encoder(s)")
        for i, (v, original) in enumerate(zip(vectors, self.original_embeddings)):
            width = int(getattr(original, "embedding_dim", 0) or original.weight.shape[-1])
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or tuple(v.shape) != (len(tokens), width):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"text encoder {i + 1} takes ({len(tokens)}, {width}) float vectors, got {got}")
            if not bool(torch.isfinite(v.detach()).all()):
                raise ValueError(f"the vectors for text encoder {i + 1} hold NaN or infinite values")

    def _pristine_vocabs(self) -> list[frozenset[str]]:
        if self._vocabs is None:  # the pristine tokenizers never change: read their vocabularies once
            self._vocabs = [frozenset(tok.get_vocab()) for tok in self.pristine_tokenizers]
        return self._vocabs

    def _rebuild(self) -> None:
        """Make every encoder's tokenizer and spliced embedding first, then install them all."""
        all_tokens = [t for e in self.entries.values() for t in e.tokens]
        built: list[tuple[Any, nn.Module]] = []  # (tokenizer, input embedding) per encoder
        for i, (pristine, original) in enumerate(zip(self.pristine_tokenizers, self.original_embeddings)):
            if not all_tokens:
                built.append((self.original_tokenizers[i], original))
                continue
            tok = copy.deepcopy(pristine)
            added = tok.add_tokens(all_tokens, special_tokens=False)
            if added != len(all_tokens):
                clash = [t for t in all_tokens if t in pristine.get_vocab()]
                raise ValueError(f"tokens already in the vocabulary: {clash or all_tokens}")
            vecs = torch.cat([e.vectors[i] for e in self.entries.values()], dim=0)
            vecs = vecs.to(original.weight.device, original.weight.dtype)
            built.append((tok, SplicedEmbedding(original, vecs)))
        for name, (tok, emb), (_, te) in zip(_TOKENIZERS, built, text_encoders(self.pipe)):
            setattr(self.pipe, name, tok)
            te.set_input_embeddings(emb)


def token_table(pipe: Any) -> TokenTable:
    """The pipeline's :class:`TokenTable`, created on first use."""
    table = getattr(pipe, "_studio_tokens", None)
    if table is None:
        table = TokenTable(pipe)
        pipe._studio_tokens = table
    return table
