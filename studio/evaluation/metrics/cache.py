"""Embedding cache: never encode the same image (or text) twice with the same backbone.

Keys are ``(scorer.name, kind, content hash)``: the backbone name identifies the weights (see
:mod:`studio.evaluation.metrics.scorers`), the content hash is a sha256 of the RGB pixels and size (images) or
of the UTF-8 text. Entries live in memory and, when a folder is given, on disk as one small
safetensors file per embedding (``<folder>/<backbone slug>/<kind>/<hash[:2]>/<hash>.safetensors``),
written atomically so concurrent evaluations can share a folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from studio.errors import StudioError
from studio.evaluation.metrics.scorers import Scorer

Kind = Literal["image", "text"]


def image_key(image: Image.Image) -> str:
    """sha256 hex digest of an image's RGB pixels and size (mode and metadata do not matter)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def text_key(text: str) -> str:
    """sha256 hex digest of a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _slug(name: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class EmbeddingCache:
    """In-memory (and optionally on-disk) store of ``(D,)`` float32 embeddings.

    Args:
        folder: on-disk cache folder (created on first write); ``None`` keeps entries in memory only.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._memory: dict[tuple[str, str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._memory)

    def _path(self, backbone: str, kind: Kind, key: str) -> Path:
        return Path(self.folder or ".") / _slug(backbone) / kind / key[:2] / f"{key}.safetensors"

    def get(self, backbone: str, kind: Kind, key: str) -> torch.Tensor | None:
        """The cached ``(D,)`` embedding, or ``None``."""
        entry = self._memory.get((backbone, kind, key))
        if entry is not None or self.folder is None:
            return entry
        path = self._path(backbone, kind, key)
        if not path.is_file():
            return None
        try:
            entry = load_file(str(path))["embedding"]
        except (SafetensorError, OSError, KeyError):
            return None  # a truncated or foreign file is a miss; it is rewritten on the next put
        self._memory[(backbone, kind, key)] = entry
        return entry

    def put(self, backbone: str, kind: Kind, key: str, embedding: torch.Tensor) -> None:
        """Store a ``(D,)`` embedding (copied to float32 CPU)."""
        entry = embedding.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        self._memory[(backbone, kind, key)] = entry
        if self.folder is None:
            return
        path = self._path(backbone, kind, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"embedding": entry}, str(tmp), metadata={"backbone": backbone, "kind": kind})
            os.replace(tmp, path)
        except OSError as err:
            raise StudioError(f"Cannot write to the embedding cache folder '{self.folder}' ({err}).") from None


class CachedScorer:
    """A :class:`Scorer` that looks every input up in an :class:`EmbeddingCache` first.

    Misses are encoded in one call of the wrapped scorer (which batches them); duplicates within a
    call are encoded once. ``hits`` and ``misses`` count looked-up items.
    """

    def __init__(self, scorer: Scorer, cache: EmbeddingCache | None = None) -> None:
        self.scorer = scorer
        self.cache = cache if cache is not None else EmbeddingCache()
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        """The wrapped scorer's backbone name."""
        return self.scorer.name

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> ``(N, D)`` unit rows, from the cache where possible."""
        return self._embed("image", list(images), [image_key(image) for image in images])

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ``(N, D)`` unit rows, from the cache where possible."""
        return self._embed("text", list(texts), [text_key(text) for text in texts])

    def _embed(self, kind: Kind, items: list, keys: list[str]) -> torch.Tensor:
        if not items:
            raise StudioError(f"No {kind}s were given to the {self.name} encoder.")
        name = self.scorer.name
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, Any] = {}  # key → image or text (as ``kind`` says)
        for key, item in zip(keys, items):
            if key in found or key in missing:
                continue
            entry = self.cache.get(name, kind, key)
            if entry is None:
                missing[key] = item
            else:
                found[key] = entry
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        if missing:
            encode = self.scorer.embed_images if kind == "image" else self.scorer.embed_texts
            fresh = encode(list(missing.values()))  # (M, D)
            for key, row in zip(missing, fresh):
                self.cache.put(name, kind, key, row)
                found[key] = self.cache.get(name, kind, key)  # type: ignore[assignment]
        return torch.stack([found[key] for key in keys])  # (N, D)
