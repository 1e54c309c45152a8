"""Detectors for CP-CLIP: ``(image, labels) -> Detections(boxes, scores, labels)``.

A detector is any callable with that signature (:class:`Detector`), so tests and users can inject
their own. Two backends:

- :class:`OwlVitDetector` — open-vocabulary OWL-ViT (Gen4Gen used ViT-B/32), by hub id or folder.
  Each label is queried as ``"a photo of a {label}"``; boxes scoring below ``threshold = 0.1`` (the
  transformers post-processing default; the paper gives none) are dropped.
- :class:`HaarCascadeDetector` — OpenCV's Haar cascades (``opencv-python-headless<5``), offline and
  deterministic, for human and cat **faces** only (see :data:`HAAR_LABELS`).

Boxes are ``(K, 4)`` float32 ``(x0, y0, x1, y1)`` pixel coordinates of the input image, clipped to
it. Selection (:func:`best_box_per_label`) and cropping (:func:`crop_box`) are separate steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image

from studio.errors import StudioError
from studio.evaluation.metrics._loading import load_pretrained, model_identity

DEFAULT_OWL = "google/owlvit-base-patch32"
DEFAULT_CROP_PADDING = 0.1


class Detections(NamedTuple):
    """Detector output; unpacks as ``boxes, scores, labels``."""

    boxes: torch.Tensor  # (K, 4) float32, (x0, y0, x1, y1) in pixels
    scores: torch.Tensor  # (K,) float32, higher is more confident
    labels: list[str]  # K labels, each one of the queried labels

    @staticmethod
    def empty() -> Detections:
        """No detections."""
        return Detections(torch.zeros(0, 4), torch.zeros(0), [])

    def to_list(self) -> list[dict[str, object]]:
        """JSON-ready ``[{"label", "score", "box"}]``."""
        return [
            {"label": label, "score": float(score), "box": [round(float(v), 2) for v in box]}
            for box, score, label in zip(self.boxes, self.scores, self.labels)
        ]


class Detector(Protocol):
    """``(image, labels) -> Detections``: find instances of each label in a PIL image."""

    def __call__(self, image: Image.Image, labels: Sequence[str]) -> Detections: ...


def best_box_per_label(detections: Detections, labels: Sequence[str] | None = None) -> Detections:
    """Keep only the highest-scoring box of each label (Gen4Gen step 1, so ``|B| <= |O'|``).

    Args:
        detections: any detector output.
        labels: order of the result (labels without a box are skipped); default: first-seen order.
    Returns:
        At most one detection per label; ties keep the earlier box.
    """
    best: dict[str, int] = {}
    for index, (label, score) in enumerate(zip(detections.labels, detections.scores.tolist())):
        if label not in best or score > float(detections.scores[best[label]]):
            best[label] = index
    order = [label for label in (labels if labels is not None else list(best)) if label in best]
    order = list(dict.fromkeys(order))
    keep = [best[label] for label in order]
    if not keep:
        return Detections.empty()
    return Detections(detections.boxes[keep], detections.scores[keep], [detections.labels[i] for i in keep])


def padded_box(box: Sequence[float] | torch.Tensor, size: tuple[int, int], padding: float) -> tuple[int, int, int, int]:
    """Grow ``box`` (x0, y0, x1, y1) by ``padding`` x its width/height on each side, clip to ``size`` (W, H).

    Returns integer pixel bounds (floor/ceil), at least 1 x 1.
    """
    if padding < 0:
        raise StudioError(f"Crop padding must be >= 0, got {padding}.")
    x0, y0, x1, y1 = (float(v) for v in box)
    pad_x, pad_y = padding * max(x1 - x0, 0.0), padding * max(y1 - y0, 0.0)
    width, height = size
    left = min(max(math.floor(x0 - pad_x), 0), width - 1)
    top = min(max(math.floor(y0 - pad_y), 0), height - 1)
    right = max(min(math.ceil(x1 + pad_x), width), left + 1)
    bottom = max(min(math.ceil(y1 + pad_y), height), top + 1)
    return left, top, right, bottom


def crop_box(
    image: Image.Image, box: Sequence[float] | torch.Tensor, padding: float = DEFAULT_CROP_PADDING
) -> Image.Image:
    """The crop of ``image`` under ``box`` grown by ``padding`` (default 10% per side: detector boxes
    are tight, reference photos show the object with some surroundings)."""
    return image.crop(padded_box(box, image.size, padding))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best first. ``boxes (K, 4)``, ``scores (K,)``."""
    order = scores.argsort(descending=True).tolist()
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    kept: list[int] = []
    for i in order:
        ok = True
        for j in kept:
            w = (torch.minimum(boxes[i, 2], boxes[j, 2]) - torch.maximum(boxes[i, 0], boxes[j, 0])).clamp(min=0)
            h = (torch.minimum(boxes[i, 3], boxes[j, 3]) - torch.maximum(boxes[i, 1], boxes[j, 1])).clamp(min=0)
            inter = float(w * h)
            union = float(area[i] + area[j]) - inter
            if union > 0 and inter / union > iou_threshold:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


_FACE = "haarcascade_frontalface_default.xml"
_CAT_FACE = "haarcascade_frontalcatface.xml"
#: Label (lower case, leading article dropped) -> OpenCV cascade file. Human words find a frontal
#: human face, cat words a frontal cat face: the boxes (and so the crops) are faces, not bodies.
HAAR_LABELS: dict[str, str] = {
    **{
        word: _FACE
        for word in (
            "face",
            "person",
            "man",
            "woman",
            "boy",
            "girl",
            "child",
            "kid",
            "baby",
            "human",
            "people",
            "astronaut",
            "portrait",
            "human face",
        )
    },
    **{word: _CAT_FACE for word in ("cat", "cats", "kitten", "kitty", "cat face")},
}


def _normalise_label(label: str) -> str:
    words = label.strip().lower().split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


class HaarCascadeDetector:
    """Deterministic offline detector from OpenCV Haar cascades (frontal human / cat faces).

    Each image is scanned at several working sizes (long side scaled down to each of ``sizes``,
    never up) with a white border of ``border`` x the long side, so faces that fill the frame (common
    in close-up generations) still fit the cascade's window; boxes from all sizes are merged by NMS
    per label. With the default sizes a face must span at least ``min_size / 256`` (~9%) of the
    image's long side; add 512 to ``sizes`` for smaller faces (4x slower, more false positives).
    The score is ``sigmoid(level weight)`` of the cascade's last stage: it orders boxes but is not a
    probability; the gate is ``min_neighbors`` (OpenCV's grouping threshold).

    Args:
        sizes: long sides (pixels) of the working copies.
        border: white margin added around each working copy, as a fraction of its long side.
        scale_factor, min_neighbors, min_size: passed to ``detectMultiScale3``.
        cascades: extra or overriding ``label -> cascade file`` entries (a bare file name is looked up
            in ``cv2.data.haarcascades``).
    """

    def __init__(
        self,
        *,
        sizes: Sequence[int] = (128, 256),
        border: float = 0.25,
        scale_factor: float = 1.1,
        min_neighbors: int = 3,
        min_size: int = 24,
        cascades: Mapping[str, str] | None = None,
    ) -> None:
        try:
            import cv2  # optional: opencv-python-headless<5
            import cv2.data  # the cascade files (cv2's stubs do not declare this submodule)
        except ImportError:
            raise StudioError(
                "The Haar-cascade detector needs OpenCV; install it (pip install 'opencv-python-headless<5')."
            ) from None
        if not sizes or min(sizes) < min_size:
            raise StudioError(f"sizes must be non-empty and at least min_size={min_size}, got {tuple(sizes)}.")
        self._cv2 = cv2
        self.sizes = tuple(int(s) for s in sizes)
        self.border = border
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size = min_size
        self.label_cascades = dict(HAAR_LABELS)
        self.label_cascades.update({_normalise_label(k): v for k, v in (cascades or {}).items()})
        self._loaded: dict[str, Any] = {}
        self.name = "haar:" + ",".join(str(s) for s in self.sizes)

    def _cascade(self, label: str) -> Any:
        key = _normalise_label(label)
        if key not in self.label_cascades:
            known = ", ".join(sorted(self.label_cascades))
            raise StudioError(f"The Haar-cascade detector cannot find '{label}'; it knows: {known}.")
        file = self.label_cascades[key]
        path = file if os.path.isabs(file) else os.path.join(self._cv2.data.haarcascades, file)
        if path not in self._loaded:
            cascade = self._cv2.CascadeClassifier(path)
            if cascade.empty():
                raise StudioError(f"Cannot load the OpenCV cascade '{path}'.")
            self._loaded[path] = cascade
        return self._loaded[path]

    def __call__(self, image: Image.Image, labels: Sequence[str]) -> Detections:
        """Detect each label's face in ``image``; boxes in ``image`` pixels."""
        cv2 = self._cv2
        cascades = {label: self._cascade(label) for label in dict.fromkeys(labels)}  # validate first
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        boxes: list[list[float]] = []
        scores: list[float] = []
        found: list[str] = []
        scales = sorted({min(1.0, size / max(width, height)) for size in self.sizes})
        for scale in scales:
            small = cv2.resize(
                rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
            )
            pad = round(self.border * max(small.shape[:2]))
            gray = cv2.cvtColor(
                cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(255, 255, 255)),
                cv2.COLOR_RGB2GRAY,
            )
            for label, cascade in cascades.items():
                rects, _, weights = cascade.detectMultiScale3(
                    gray,
                    scaleFactor=self.scale_factor,
                    minNeighbors=self.min_neighbors,
                    minSize=(self.min_size, self.min_size),
                    outputRejectLevels=True,
                )
                for (x, y, w, h), weight in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
                    x0, y0 = max((x - pad) / scale, 0.0), max((y - pad) / scale, 0.0)
                    x1, y1 = min((x + w - pad) / scale, width), min((y + h - pad) / scale, height)
                    if x1 - x0 >= 1 and y1 - y0 >= 1:
                        boxes.append([x0, y0, x1, y1])
                        scores.append(1.0 / (1.0 + math.exp(-float(weight))))
                        found.append(label)
        if not boxes:
            return Detections.empty()
        all_boxes, all_scores = torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32)
        keep: list[int] = []
        for label in cascades:
            idx = [i for i, name in enumerate(found) if name == label]
            if idx:
                keep += [idx[k] for k in nms(all_boxes[idx], all_scores[idx])]
        return Detections(all_boxes[keep], all_scores[keep], [found[i] for i in keep])


class OwlVitDetector:
    """OWL-ViT / OWLv2 open-vocabulary detector (transformers), by hub id or local folder.

    Args:
        model: hub id or folder with the model, tokenizer and image processor.
        threshold: minimum box score (sigmoid of the best query logit); 0.1 by default.
        query_template: how a label becomes a text query.
        revision, cache_dir: hub revision and Hugging Face cache folder.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_OWL,
        *,
        threshold: float = 0.1,
        query_template: str = "a photo of a {}",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer

        from studio.evaluation.metrics.scorers import load_image_processor

        hub: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
        self.model = load_pretrained(
            AutoModelForZeroShotObjectDetection.from_pretrained,
            model,
            "OWL-ViT model",
            is_model=True,
            dtype=dtype,
            **hub,
        )
        self.model.to(device).eval()
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model, "OWL-ViT tokenizer", **hub)
        self.processor = load_image_processor(model, "OWL-ViT", **hub)
        self.threshold = threshold
        self.query_template = query_template
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 16))
        self.name = model_identity("owl", model, **hub)

    def __call__(self, image: Image.Image, labels: Sequence[str]) -> Detections:
        """Query every label on ``image``; each predicted box takes its best-scoring label."""
        labels = list(dict.fromkeys(labels))
        if not labels:
            return Detections.empty()
        image = image.convert("RGB")
        queries = [self.query_template.format(label) for label in labels]
        text = self.tokenizer(
            queries, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)  # input_ids: (Q, L)
        pixel_values = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)  # (1, 3, S, S)
        with torch.inference_mode():
            outputs = self.model(
                input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixel_values
            )
        # OWL-ViT resizes to a square, so boxes are relative to (H, W); OWLv2 pads to a square first.
        side = max(image.size)
        target = (side, side) if self.model.config.model_type == "owlv2" else (image.height, image.width)
        result = self.processor.post_process_object_detection(
            outputs=outputs, threshold=self.threshold, target_sizes=[target]
        )[0]
        boxes = result["boxes"].float().cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
        return Detections(boxes, result["scores"].float().cpu(), [labels[int(i)] for i in result["labels"]])
