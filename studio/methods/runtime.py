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
    """``[(tokenizer, text_encoder), …]`` — one pair for SD 1/2, two for SDXL (CLIP-L, then bigG)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


@dataclass
class _Entry:
    tokens: list[str]
    vectors: list[torch.Tensor]  # per encoder, (n, D_e)


@dataclass
class TokenTable:
    """Extra tokens of all active concepts, per encoder."""

    pipe: Any
    pristine_tokenizers: list[Any] = field(default_factory=list)
    original_embeddings: list[nn.Embedding] = field(default_factory=list)
    entries: dict[str, _Entry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tok, te in text_encoders(self.pipe):
            self.pristine_tokenizers.append(copy.deepcopy(tok))
            self.original_embeddings.append(te.get_input_embeddings())

    def set(self, key: str, tokens: list[str], vectors: list[torch.Tensor]) -> None:
        """Add or replace the tokens of ``key``; ``vectors[e]`` is ``(len(tokens), D_e)``."""
        self.entries[key] = _Entry(list(tokens), [v.detach() for v in vectors])
        self._rebuild()

    def drop(self, key: str) -> None:
        self.entries.pop(key, None)
        self._rebuild()

    def token_ids(self, token: str) -> list[int]:
        """Ids of ``token`` in each tokenizer (after a rebuild)."""
        return [tok.convert_tokens_to_ids(token) for tok, _ in text_encoders(self.pipe)]

    def _rebuild(self) -> None:
        all_tokens = [t for e in self.entries.values() for t in e.tokens]
        names = ["tokenizer", "tokenizer_2"]
        for i, (pristine, original) in enumerate(zip(self.pristine_tokenizers, self.original_embeddings)):
            te = text_encoders(self.pipe)[i][1]
            if not all_tokens:
                setattr(self.pipe, names[i], pristine)
                te.set_input_embeddings(original)
                continue
            tok = copy.deepcopy(pristine)
            added = tok.add_tokens(all_tokens, special_tokens=False)
            if added != len(all_tokens):
                clash = [t for t in all_tokens if t in pristine.get_vocab()]
                raise ValueError(f"tokens already in the vocabulary: {clash}")
            vecs = torch.cat([e.vectors[i] for e in self.entries.values()], dim=0)
            vecs = vecs.to(original.weight.device, original.weight.dtype)
            setattr(self.pipe, names[i], tok)
            te.set_input_embeddings(SplicedEmbedding(original, vecs))


def token_table(pipe: Any) -> TokenTable:
    """The pipeline's :class:`TokenTable`, created on first use."""
    table = getattr(pipe, "_studio_tokens", None)
    if table is None:
        table = TokenTable(pipe)
        pipe._studio_tokens = table
    return table
