"""The metrics as pure functions of embeddings (no models, no images).

Every score is a plain cosine ``<a, b> / (|a| |b|)`` in [-1, 1] (inputs are normalised here, so
callers may pass raw features). Nothing is clamped or rescaled (torchmetrics' ``CLIPScore`` is
``max(100 * mean cos, 0)``; ours is the cosine itself). Notation below: ``N`` generated images,
``M`` reference images, ``D`` embedding width, ``K`` crops, ``J`` requested concepts.

DreamBooth / DreamBench (Ruiz et al. 2023, §4.1):

- CLIP-T = mean_g <f(g), t(prompt_g)>  — matched pairs only (each image with its own prompt).
- CLIP-I = mean_{g, r} <f(g), f(r)>    — all N x M pairs of generated and reference images.
- DINO   = CLIP-I with DINO ViT-S/16 CLS features.

Gen4Gen (Yen et al. 2024, §3.5, Eqs. 1-4), for one image whose prompt requests concepts O':

- S_ij = mean_{x in refs(o_j)} <f(crop_i), f(x)>   (Eq. 2)
- S_i  = max_j S_ij                                 (Eq. 3)
- CP-CLIP = sum_i S_i / |O'|                         (Eq. 4; a missing concept scores 0)
- TI-CLIP = <f(image), t(prompt without the concept objects)>
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from studio.errors import StudioError


@dataclass(frozen=True)
class MetricSummary:
    """One metric over a set of images: mean and population std of the per-image scores."""

    metric: str  # "clip_t", "clip_i", "dino", "cp_clip", "ti_clip", ...
    backbone: str  # the scorer name that produced the embeddings ("" when unknown)
    mean: float
    std: float
    count: int  # number of per-image scores averaged

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "metric": self.metric,
            "backbone": self.backbone,
            "mean": self.mean,
            "std": self.std,
            "count": self.count,
        }


@dataclass(frozen=True)
class Scores:
    """Per-image scores ``(N,)`` and their summary."""

    per_image: torch.Tensor  # (N,) float32
    summary: MetricSummary

    @property
    def mean(self) -> float:
        """The metric's value (``summary.mean``)."""
        return self.summary.mean


def summarize(metric: str, values: torch.Tensor | Sequence[float], backbone: str = "") -> MetricSummary:
    """Mean and population std (``ddof=0``) of ``values`` ``(N,)``; an empty set gives NaN."""
    tensor = torch.as_tensor(values, dtype=torch.float64).flatten()
    if tensor.numel() == 0:
        return MetricSummary(metric, backbone, float("nan"), float("nan"), 0)
    return MetricSummary(metric, backbone, float(tensor.mean()), float(tensor.std(unbiased=False)), tensor.numel())


def _unit(embeds: torch.Tensor, what: str) -> torch.Tensor:
    if embeds.ndim != 2 or embeds.shape[0] == 0:
        raise StudioError(f"{what} must be a non-empty (N, D) tensor, got shape {tuple(embeds.shape)}.")
    return F.normalize(embeds.to(torch.float32), dim=-1)


def _same_width(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise StudioError(
            f"{what}: embedding widths differ ({a.shape[-1]} vs {b.shape[-1]}); both sides must come from one backbone."
        )


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosines of matched pairs: ``a (N, D)``, ``b (N, D)`` -> ``(N,)``."""
    a, b = _unit(a, "first embeddings"), _unit(b, "second embeddings")
    _same_width(a, b, "matched cosine")
    if a.shape[0] != b.shape[0]:
        raise StudioError(f"matched cosine needs as many rows on both sides, got {a.shape[0]} and {b.shape[0]}.")
    return (a * b).sum(-1)


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All cosines: ``a (N, D)``, ``b (M, D)`` -> ``(N, M)`` with entry ``[g, r] = <a_g, b_r>``."""
    a, b = _unit(a, "first embeddings"), _unit(b, "second embeddings")
    _same_width(a, b, "pairwise cosine")
    return a @ b.T


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor, backbone: str = "") -> Scores:
    """CLIP-T: each generated image against the text of its own prompt.

    Args:
        image_embeds: ``(N, D)`` CLIP image embeddings of the generated images.
        text_embeds: ``(N, D)`` CLIP text embeddings, row ``g`` = the scored text of image ``g``'s
            prompt (see :func:`studio.evaluation.metrics.texts.clip_t_text` for which text).
    Returns:
        per-image ``<f(g), t(prompt_g)>`` ``(N,)`` and their mean.
    """
    per_image = matched_cosine(image_embeds, text_embeds)
    return Scores(per_image, summarize("clip_t", per_image, backbone))


def _all_pairs(metric: str, generated: torch.Tensor, references: torch.Tensor, backbone: str) -> Scores:
    pairs = pairwise_cosine(generated, references)  # (N, M)
    per_image = pairs.mean(dim=1)  # (N,): each image's mean over all references
    summary = summarize(metric, per_image, backbone)
    # The mean over the N x M pairs equals the mean of the row means (every row has M entries).
    summary = MetricSummary(metric, backbone, float(pairs.double().mean()), summary.std, summary.count)
    return Scores(per_image, summary)


def clip_i(generated: torch.Tensor, references: torch.Tensor, backbone: str = "") -> Scores:
    """CLIP-I: mean over all pairs (generated ``(N, D)``, reference ``(M, D)``) of the cosine.

    Per-image score = that image's mean over the ``M`` references ``(N,)``; the summary mean is the
    mean over all ``N x M`` pairs (not over matched pairs).
    """
    return _all_pairs("clip_i", generated, references, backbone)


def dino(generated: torch.Tensor, references: torch.Tensor, backbone: str = "") -> Scores:
    """DINO: :func:`clip_i` computed on DINO CLS features ``(N, D)`` / ``(M, D)``."""
    return _all_pairs("dino", generated, references, backbone)


def ti_clip(image_embeds: torch.Tensor, context_embeds: torch.Tensor, backbone: str = "") -> Scores:
    """TI-CLIP: each whole image ``(N, D)`` against its prompt's context text ``(N, D)`` (concepts removed)."""
    per_image = matched_cosine(image_embeds, context_embeds)
    return Scores(per_image, summarize("ti_clip", per_image, backbone))


@dataclass(frozen=True)
class CPClipScore:
    """CP-CLIP of one image (Gen4Gen Eqs. 2-4)."""

    score: float  # sum_i S_i / |O'|
    s_ij: torch.Tensor  # (K, J): crop i vs concept j, mean over the concept's references
    s_i: torch.Tensor  # (K,): max_j S_ij
    best_concept: tuple[int, ...]  # argmax_j per crop
    num_requested: int  # |O'|


def cp_clip(crop_embeds: torch.Tensor, concept_refs: Sequence[torch.Tensor]) -> CPClipScore:
    """CP-CLIP of one image from its crops' and the requested concepts' reference embeddings.

    Args:
        crop_embeds: ``(K, D)`` embeddings of the kept crops (at most one per detector label);
            ``K = 0`` (nothing detected) is allowed and scores 0.
        concept_refs: one ``(R_j, D)`` tensor per requested concept ``o_j`` — ``J = |O'|`` entries.
    Returns:
        ``score = sum_i max_j mean_r <crop_i, ref_jr> / J``. Dividing by the number of *requested*
        concepts penalises a missing concept; an extra crop adds its best S_i (not penalised).
    """
    if not concept_refs:
        raise StudioError("CP-CLIP needs at least one requested concept with reference embeddings.")
    num = len(concept_refs)
    if crop_embeds.ndim != 2:
        raise StudioError(f"crop embeddings must be (K, D), got shape {tuple(crop_embeds.shape)}.")
    if crop_embeds.shape[0] == 0:
        empty = torch.zeros(0, num)
        return CPClipScore(0.0, empty, torch.zeros(0), (), num)
    columns = [pairwise_cosine(crop_embeds, refs).mean(dim=1) for refs in concept_refs]  # J x (K,)
    s_ij = torch.stack(columns, dim=1)  # (K, J)
    s_i, best = s_ij.max(dim=1)  # (K,)
    return CPClipScore(float(s_i.double().sum() / num), s_ij, s_i, tuple(int(j) for j in best), num)
