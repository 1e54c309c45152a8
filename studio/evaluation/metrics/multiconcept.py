"""CP-CLIP on one image: detect -> best box per label -> crop -> score (Gen4Gen §3.5).

Choices the paper leaves open, made here:

- detection threshold: the detector's own (OWL-ViT 0.1; Haar cascades ``min_neighbors``), see
  :mod:`studio.evaluation.metrics.detectors`;
- crop padding: each kept box grows by ``padding`` (default 10%) of its width/height per side,
  clipped to the image;
- concepts sharing a class label share one box (the paper keeps one box per *label*), so two dogs
  in one prompt can reach at most 1/2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from studio.errors import StudioError
from studio.evaluation.metrics.detectors import DEFAULT_CROP_PADDING, Detections, Detector, best_box_per_label, crop_box
from studio.evaluation.metrics.formulas import CPClipScore, cp_clip
from studio.evaluation.metrics.scorers import Scorer


@dataclass(frozen=True)
class CPClipImage:
    """CP-CLIP of one image, with what led to it."""

    score: float  # sum_i S_i / |O'|
    requested: tuple[str, ...]  # names of the requested concepts O' (columns of s_ij)
    labels: tuple[str, ...]  # their detector labels
    kept: Detections  # one box per label at most (rows of s_ij)
    detail: CPClipScore

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary: score, requested concepts, kept boxes with S_i and best concept."""
        crops = []
        for k, item in enumerate(self.kept.to_list()):
            item["s_i"] = float(self.detail.s_i[k])
            item["best_concept"] = self.requested[self.detail.best_concept[k]]
            item["s_ij"] = [float(v) for v in self.detail.s_ij[k]]
            crops.append(item)
        return {"score": self.score, "requested": list(self.requested), "crops": crops}


def cp_clip_image(
    image: Image.Image,
    labels: Sequence[str],
    reference_embeds: Sequence[torch.Tensor],
    scorer: Scorer,
    detector: Detector,
    *,
    names: Sequence[str] | None = None,
    padding: float = DEFAULT_CROP_PADDING,
) -> CPClipImage:
    """CP-CLIP of ``image`` for the requested concepts ``O'``.

    Args:
        image: the generated image.
        labels: detector label (class noun) of each requested concept, ``J`` entries.
        reference_embeds: ``J`` tensors ``(R_j, D)``: each concept's reference-image embeddings from
            ``scorer``.
        scorer: embeds the crops (same backbone as ``reference_embeds``).
        detector: ``(image, labels) -> Detections``.
        names: display names of the concepts (default: the labels).
        padding: crop padding, fraction of the box size per side.
    """
    if len(labels) != len(reference_embeds) or not labels:
        raise StudioError(
            f"CP-CLIP needs one label per requested concept with references, got {len(labels)} labels "
            f"and {len(reference_embeds)} reference sets."
        )
    names = tuple(names) if names is not None else tuple(labels)
    unique = list(dict.fromkeys(labels))
    # 1. Detect, 2. keep the best box of each requested label (|B| <= |O'|).
    found = detector(image, unique)
    kept = best_box_per_label(found, [label for label in unique])
    # 3. Crop (padded) and embed: (K, D).
    if kept.labels:
        crop_embeds = scorer.embed_images([crop_box(image, box, padding) for box in kept.boxes])
    else:
        crop_embeds = torch.zeros(0, reference_embeds[0].shape[-1])
    # 4. S_ij, S_i = max_j S_ij, sum_i S_i / |O'|.
    detail = cp_clip(crop_embeds, reference_embeds)
    return CPClipImage(detail.score, names, tuple(labels), kept, detail)
