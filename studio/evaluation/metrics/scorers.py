"""Encoders that turn images and texts into L2-normalised embeddings.

Every metric in this package is a cosine between rows produced by a :class:`Scorer`. Scores from
different backbones are not comparable, so each scorer carries a ``name`` identifying its weights
(hub id and commit, or a content hash of a local folder); reports and caches record it.

Backends:

- :class:`ClipScorer` — transformers CLIP-like models (``get_image_features`` /
  ``get_text_features``), by hub id or local folder; default ``openai/clip-vit-base-patch32`` (the
  ViT-B/32 the DreamBooth reimplementations use).
- :class:`DinoScorer` — transformers ViT/DINO models; the embedding is the CLS token
  ``last_hidden_state[:, 0]`` (never ``pooler_output``); default ``facebook/dino-vits16``.
- :class:`OpenClipScorer` — open_clip models, when the optional ``open_clip_torch`` is installed.
- :class:`OracleScorer` — adapts any callable ``images -> features`` (e.g. the learnable world's
  oracle classifier) to the same interface.

Image preprocessing uses transformers' PIL image processors (``backend="pil"``), so torchvision is
never needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from studio.errors import StudioError
from studio.evaluation.metrics._loading import load_pretrained, model_identity

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_OPEN_CLIP = ("ViT-B-32", "openai")


@runtime_checkable
class Scorer(Protocol):
    """An image (and optionally text) encoder producing L2-normalised float32 CPU embeddings."""

    @property
    def name(self) -> str:
        """Identifies the backbone (model and weights); embeddings of different names never mix."""
        ...

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> ``(N, D)`` float32, each row of unit L2 norm."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ``(N, D)`` float32, unit rows, in the same space as the images.

        Image-only backbones raise :class:`StudioError`.
        """
        ...


def normalize_rows(features: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` -> float32 CPU ``(N, D)`` with unit L2 rows (zero rows stay zero)."""
    if features.ndim != 2:
        raise StudioError(f"An encoder returned features of shape {tuple(features.shape)}; expected (N, D).")
    return F.normalize(features.detach().to(device="cpu", dtype=torch.float32), dim=-1)


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise StudioError(f"Expected PIL images to score, got {type(image).__name__}.")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


def _batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def _features(output: Any) -> torch.Tensor:
    """transformers < 5 returns a tensor from ``get_*_features``; 5.x an output with ``pooler_output``."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise StudioError("The model's get_*_features returned no pooled output; it is not a CLIP-like model.")
    return pooled


class _BatchedScorer:
    """Shared batching: subclasses implement ``_encode_images`` / ``_encode_texts`` on one batch."""

    name: str
    batch_size: int

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> ``(N, D)`` float32 unit rows, encoded ``batch_size`` at a time."""
        images = _rgb(images)
        if not images:
            raise StudioError(f"No images were given to the {self.name} encoder.")
        with torch.inference_mode():
            parts = [self._encode_images(list(batch)) for batch in _batches(images, self.batch_size)]
        return normalize_rows(torch.cat(parts))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ``(N, D)`` float32 unit rows, encoded ``batch_size`` at a time."""
        if not texts:
            raise StudioError(f"No texts were given to the {self.name} encoder.")
        with torch.inference_mode():
            parts = [self._encode_texts(list(batch)) for batch in _batches(list(texts), self.batch_size)]
        return normalize_rows(torch.cat(parts))

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise StudioError(f"The {self.name} encoder has no text tower; use a CLIP scorer for text scores.")


def load_image_processor(spec: str | os.PathLike[str], what: str, **hub: Any) -> Any:
    """The model's image processor, PIL backend (``hub``: ``revision`` / ``cache_dir``)."""
    from transformers import AutoImageProcessor

    # backend="pil": the torchvision-backed default falls back with a warning when torchvision is
    # missing; ask for the PIL processor explicitly.
    return load_pretrained(AutoImageProcessor.from_pretrained, spec, f"{what} image processor", backend="pil", **hub)


class ClipScorer(_BatchedScorer):
    """transformers CLIP (or any model with ``get_image_features``/``get_text_features``).

    Args:
        model: hub id or local folder holding the model, its tokenizer and its image processor.
        device, dtype: where and how to run the encoder (outputs are float32 on CPU regardless).
        batch_size: images or texts per forward pass.
        revision, cache_dir: hub revision (branch, tag or commit) and Hugging Face cache folder.

    Texts longer than the text tower's context (77 tokens for CLIP) are truncated, as in the papers.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_CLIP,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1:
            raise StudioError(f"batch_size must be at least 1, got {batch_size}.")
        hub: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
        self.model = load_pretrained(AutoModel.from_pretrained, model, "CLIP model", is_model=True, dtype=dtype, **hub)
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise StudioError(f"'{os.fspath(model)}' is not a CLIP-like model (it has no image and text towers).")
        self.model.to(device).eval()
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model, "CLIP tokenizer", **hub)
        self.processor = load_image_processor(model, "CLIP", **hub)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        text_config = getattr(self.model.config, "text_config", None)
        positions = getattr(text_config, "max_position_embeddings", None) or 77
        self.max_length = min(int(getattr(self.tokenizer, "model_max_length", positions) or positions), positions)
        self.name = model_identity("clip", model, **hub)

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)  # (B, 3, H, W)
        return _features(self.model.get_image_features(pixel_values=pixel_values))  # (B, D)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)  # input_ids: (B, T <= 77)
        return _features(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        )  # (B, D)


class DinoScorer(_BatchedScorer):
    """transformers ViT / DINO image encoder; the embedding is the CLS token ``last_hidden_state[:, 0]``.

    DreamBench's DINO metric uses the self-supervised ViT-S/16 CLS feature, not ``pooler_output``
    (a randomly initialised or classification-tuned dense+tanh head on top of CLS). The image
    processor is the checkpoint's own (``facebook/dino-vits16``: resize to 224 x 224, ImageNet
    mean/std). Arguments as :class:`ClipScorer`.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_DINO,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModel

        if batch_size < 1:
            raise StudioError(f"batch_size must be at least 1, got {batch_size}.")
        hub: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
        config = load_pretrained(AutoConfig.from_pretrained, model, "DINO model config", **hub)
        # The pooler is unused and absent from DINO checkpoints; do not build it (no init warning).
        extra: dict[str, Any] = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        self.model = load_pretrained(
            AutoModel.from_pretrained, model, "DINO model", is_model=True, dtype=dtype, **extra, **hub
        )
        self.model.to(device).eval()
        self.processor = load_image_processor(model, "DINO", **hub)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.name = model_identity("dino", model, **hub)

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)  # (B, 3, H, W)
        hidden = self.model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, D)
        return hidden[:, 0]  # CLS token, (B, D)


class OpenClipScorer(_BatchedScorer):
    """open_clip model (optional dependency ``open_clip_torch``), e.g. ``("ViT-B-32", "openai")``.

    ``pretrained`` is an open_clip tag or a path to a checkpoint file; loading follows open_clip's own
    caching. (open_clip itself depends on torchvision; this backend is only for installs that have it.)
    """

    def __init__(
        self,
        model: str = DEFAULT_OPEN_CLIP[0],
        pretrained: str | None = DEFAULT_OPEN_CLIP[1],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        try:
            import open_clip  # optional extra; imported only when this backend is chosen
        except ImportError:
            raise StudioError(
                "The open_clip backend needs the optional package open_clip_torch; install it "
                "(pip install open_clip_torch) or use the transformers CLIP scorer."
            ) from None
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model, pretrained=pretrained, device=device
            )
        except (OSError, RuntimeError, ValueError) as err:
            raise StudioError(f"Cannot load the open_clip model {model}/{pretrained} ({err}).") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = f"open_clip:{model}:{pretrained}"

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)  # (B, 3, H, W)
        return self.model.encode_image(pixels)  # (B, D)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))  # (B, D)


OracleOutput = Literal["features", "probabilities"]


class OracleScorer(_BatchedScorer):
    """Adapts any callable ``images -> (N, D)`` to a :class:`Scorer` (e.g. the learnable world's oracle).

    Args:
        fn: maps a list of PIL images to an ``(N, D)`` tensor or array.
        name: identifies the oracle (and its weights) in reports and caches.
        output: ``"features"`` — rows are normalised as they are, scores are cosines;
            ``"probabilities"`` — rows are identity probabilities (non-negative, summing to 1); they
            are mapped to ``sqrt(p)`` before normalising, so the cosine of two rows is their
            Bhattacharyya coefficient ``Σ_k sqrt(p_k q_k)`` in [0, 1] (1 iff the distributions match).
        text_fn: optional ``texts -> (N, D)`` in the same space (for CLIP-T-like scores).
        batch_size: images per call of ``fn``.
    """

    def __init__(
        self,
        fn: Callable[[list[Image.Image]], torch.Tensor | np.ndarray],
        *,
        name: str,
        output: OracleOutput = "features",
        text_fn: Callable[[list[str]], torch.Tensor | np.ndarray] | None = None,
        batch_size: int = 64,
    ) -> None:
        if output not in ("features", "probabilities"):
            raise StudioError(f"output must be 'features' or 'probabilities', got {output!r}.")
        self.fn = fn
        self.text_fn = text_fn
        self.output = output
        self.name = f"oracle:{name}"
        self.batch_size = batch_size

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        features = torch.as_tensor(self.fn(images), dtype=torch.float32)  # (B, D)
        if features.ndim != 2 or features.shape[0] != len(images):
            raise StudioError(
                f"The oracle {self.name} returned shape {tuple(features.shape)} for {len(images)} images; "
                "expected (N, D)."
            )
        if self.output == "probabilities":
            if bool((features < 0).any()):
                raise StudioError(f"The oracle {self.name} returned negative probabilities.")
            features = features.sqrt()
        return features

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        if self.text_fn is None:
            return super()._encode_texts(texts)
        return torch.as_tensor(self.text_fn(texts), dtype=torch.float32)
