"""Subject segmenters for :mod:`studio.dataset.mask`: images → binary masks (white = subject).

A :class:`Segmenter` turns a list of PIL images and a text prompt into one mode "L" mask per image,
of the image's own size, 255 on the subject and 0 elsewhere. Two implementations:

* :class:`GrabCutSegmenter` (``"grabcut"``, the default) — offline and classical: OpenCV's GrabCut
  seeded from the image border (a band along the four edges is *sure background*, the rest *probable
  foreground*), a few iterations, then :func:`clean_mask`. It ignores the prompt and needs no model;
  it works where the background is plain or gently graded and differs in colour from the subject
  (product photos, the learnable world). Deterministic (OpenCV's random generator is seeded per image).
* :class:`CLIPSegSegmenter` — transformers' CLIPSeg (``CIDAS/clipseg-rd64-refined``, or a folder
  holding a CLIPSeg model, its tokenizer and its image processor): the prompt ("the dog") names the
  subject; the sigmoid of its logits is upsampled to the image size, thresholded (Otsu's threshold of
  the probability map, never below :data:`MIN_THRESHOLD`) and cleaned with :func:`clean_mask`.
  Preprocessing uses transformers' PIL image processor: torchvision is never needed.

:func:`load_segmenter` picks one from a spec: ``grabcut``, ``clipseg`` (the default CLIPSeg hub id),
a hub id or a folder. Loading a hub id tries the local Hugging Face cache first; offline, a model that
is not cached is one sentence of error, never a traceback or a hang.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from studio.errors import StudioError

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
"""The CLIPSeg checkpoint ``--model clipseg`` loads (ViT-B/16 CLIP with the refined 64-d decoder)."""
MIN_THRESHOLD = 0.25
"""CLIPSeg's probability threshold never goes below this: on an image without the subject every
probability is low and Otsu would split noise; a floor turns that into an empty mask (a warning)."""
KEEP_RATIO = 0.2
""":func:`clean_mask` keeps every connected component at least this fraction of the largest one's area."""

NEEDS_PROMPT = ("CLIPSeg segments what a text prompt names; pass --prompt (e.g. \"the dog\") or --class-word, "
                "or use --model grabcut.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer, processor


@runtime_checkable
class Segmenter(Protocol):
    """Images → subject masks."""

    @property
    def name(self) -> str:
        """What made the masks (``"grabcut"``, ``"clipseg:CIDAS/clipseg-rd64-refined"``)."""
        ...

    def segment(self, images: list[Image.Image], prompt: str) -> list[Image.Image]:
        """One mode "L" mask per image (``image.size``; 255 = subject, 0 = background).

        ``prompt`` names the subject ("the dog"); segmenters that need no text ignore it.
        """
        ...


# ----------------------------------------------------------------------------------------------
# Cleanup shared by both segmenters
# ----------------------------------------------------------------------------------------------


def _kernel_size(height: int, width: int) -> int:
    """Odd side of the morphological kernel: 1 (none) below 192 px, 3 at 256 px, 9 at 1024 px."""
    return 2 * round(min(height, width) / 256) + 1


def clean_mask(binary: np.ndarray, keep_ratio: float = KEEP_RATIO) -> np.ndarray:
    """Morphological cleanup of a binary mask: ``(H, W)`` bool → ``(H, W)`` bool.

    1. an opening then a closing with an elliptical kernel that scales with the image (none below
       192 px: at 32 px one pixel is a star's tip);
    2. keep the largest 8-connected component and every other one of at least ``keep_ratio`` × its area
       (a subject in two pieces survives; specks do not);
    3. fill holes (background regions that do not touch the image border): a subject's white marks on
       a white background are still the subject.
    """
    import cv2

    mask = binary.astype(np.uint8)
    k = _kernel_size(*mask.shape)
    if k > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = np.asarray(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), dtype=np.uint8)
        mask = np.asarray(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), dtype=np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= keep_ratio * areas.max())
    subject = np.isin(labels, keep)
    # holes: components of the background that touch no border
    n_bg, bg_labels = cv2.connectedComponents((~subject).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]]))
    holes = (bg_labels > 0) & ~np.isin(bg_labels, border)
    return subject | holes


def to_mask_image(binary: np.ndarray) -> Image.Image:
    """``(H, W)`` bool → a mode "L" image, 255 = subject."""
    return Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), mode="L")


def _rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image → ``(H, W, 3)`` uint8 RGB (transparency composited on white, as the trainers do)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# GrabCut
# ----------------------------------------------------------------------------------------------


@dataclass
class GrabCutSegmenter:
    """OpenCV GrabCut seeded from the border (see the module docstring).

    Args:
        band: width of the sure-background border band, as a fraction of the shorter side (at least
            one pixel). The subject must not reach into it.
        iterations: GrabCut's EM iterations.
        work_size: images are segmented at most this many pixels on the longer side (GrabCut is slow
            on 12-megapixel photos); the mask is scaled back to the image's size.
        keep_ratio: :func:`clean_mask`'s component rule.
    """

    band: float = 0.04
    iterations: int = 5
    work_size: int = 384
    keep_ratio: float = KEEP_RATIO
    name: str = field(default="grabcut", init=False)

    def segment(self, images: list[Image.Image], prompt: str = "") -> list[Image.Image]:
        """One mask per image, each of its image's size; ``prompt`` is ignored."""
        return [to_mask_image(self.segment_array(_rgb_array(image))) for image in images]

    def segment_array(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB → ``(H, W)`` bool subject mask."""
        import cv2

        height, width = rgb.shape[:2]
        scale = min(1.0, self.work_size / max(height, width))
        small = rgb
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        h, w = small.shape[:2]
        b = max(1, round(self.band * min(h, w)))
        if min(h, w) <= 2 * b + 1:
            return np.zeros((height, width), dtype=bool)  # nothing but border
        seeds = np.full((h, w), cv2.GC_PR_FGD, dtype=np.uint8)
        seeds[:b], seeds[-b:], seeds[:, :b], seeds[:, -b:] = (cv2.GC_BGD,) * 4
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's GMMs start from k-means, which draws from OpenCV's generator
        try:
            # the rectangle is unused when initialising from the mask
            cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), seeds, (0, 0, 0, 0), bgd, fgd, self.iterations,
                        cv2.GC_INIT_WITH_MASK)
        except cv2.error:  # a degenerate image (e.g. one flat colour): no subject to find
            return np.zeros((height, width), dtype=bool)
        binary = clean_mask((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD), self.keep_ratio)
        if scale < 1.0:
            binary = cv2.resize(binary.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5
        return np.asarray(binary, dtype=bool)


# ----------------------------------------------------------------------------------------------
# CLIPSeg
# ----------------------------------------------------------------------------------------------


def otsu_threshold(probabilities: np.ndarray, floor: float = MIN_THRESHOLD) -> float:
    """Otsu's threshold of a probability map ``(H, W)`` in [0, 1] (on 256 levels), at least ``floor``."""
    import cv2

    levels = np.clip(np.rint(probabilities * 255.0), 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return max(float(t) / 255.0, floor)


class CLIPSegSegmenter:
    """Text-prompted masks from a CLIPSeg model (``CLIPSegForImageSegmentation`` + ``CLIPSegProcessor``).

    Build one with :meth:`load`; ``model``/``processor`` may also be passed already loaded.

    Args:
        threshold: a fixed probability threshold, or None for Otsu's (never below :data:`MIN_THRESHOLD`).
        batch_size: images per forward pass.
    """

    def __init__(self, model: Any, processor: Any, *, name: str = "clipseg", threshold: float | None = None,
                 batch_size: int = 8, keep_ratio: float = KEEP_RATIO) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.threshold = threshold
        self.batch_size = batch_size
        self.keep_ratio = keep_ratio

    @classmethod
    def load(cls, spec: str | os.PathLike[str] = DEFAULT_CLIPSEG, *, device: str | None = None,
             dtype: str | None = None, **kwargs: Any) -> CLIPSegSegmenter:
        """Load CLIPSeg from a hub id (cache first; downloaded once when online) or a local folder.

        ``device``/``dtype``: default CUDA fp16 → MPS fp16 → CPU fp32 (:mod:`studio.devices`).
        ``kwargs`` go to the constructor (``threshold``, ``batch_size``)."""
        from studio.devices import pick_device, pick_dtype

        folder, label = _resolve(spec)
        _check_clipseg_folder(folder, label)
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
        from transformers.utils import logging as hf_logging

        dev = pick_device(device)
        dt = pick_dtype(dev, dtype)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a CLI prints results, not "Loading weights" bars
        model: Any  # transformers' wrapped ``.to`` does not type-check as a method
        try:
            model = CLIPSegForImageSegmentation.from_pretrained(str(folder), dtype=dt, local_files_only=True)
            processor = CLIPSegProcessor.from_pretrained(str(folder), backend="pil", local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise StudioError(f"Cannot load the CLIPSeg model {label} ({_first_line(err)}); pass a folder holding "
                              "a CLIPSeg model, its tokenizer and its image processor.") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return cls(model.to(dev), processor, name=f"clipseg:{label}", **kwargs)

    def probabilities(self, images: list[Image.Image], prompt: str) -> list[np.ndarray]:
        """Per image, the subject's probability ``(H, W)`` float32 in [0, 1] at the image's own size."""
        import torch
        import torch.nn.functional as F

        if not prompt.strip():
            raise StudioError(NEEDS_PROMPT)
        rgb = [Image.fromarray(_rgb_array(image)) for image in images]
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out: list[np.ndarray] = []
        for start in range(0, len(rgb), self.batch_size):
            batch = rgb[start:start + self.batch_size]
            inputs = self.processor(text=[prompt] * len(batch), images=batch, padding=True, return_tensors="pt")
            inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            logits = logits.reshape(len(batch), 1, *logits.shape[-2:])
            for image, row in zip(batch, logits):
                up = F.interpolate(row[None], size=(image.height, image.width), mode="bilinear", align_corners=False)
                out.append(torch.sigmoid(up)[0, 0].cpu().numpy())
        return out

    def segment(self, images: list[Image.Image], prompt: str) -> list[Image.Image]:
        """One mask per image: probability ≥ threshold, then :func:`clean_mask`."""
        masks = []
        for prob in self.probabilities(images, prompt):
            t = self.threshold if self.threshold is not None else otsu_threshold(prob)
            masks.append(to_mask_image(clean_mask(prob >= t, self.keep_ratio)))
        return masks


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(err).__name__


def _check_clipseg_folder(folder: Path, label: str) -> None:
    import json

    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise StudioError(f"{label} has no readable config.json, so it is not a CLIPSeg model; pass a CLIPSeg "
                          f"folder or hub id (e.g. {DEFAULT_CLIPSEG}), or --model grabcut.") from None
    if model_type != "clipseg":
        raise StudioError(f"{label} holds a {model_type!r} model, not CLIPSeg; pass a CLIPSeg folder or hub id "
                          f"(e.g. {DEFAULT_CLIPSEG}), or --model grabcut.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve(spec: str | os.PathLike[str]) -> tuple[Path, str]:
    """``(folder, label)`` of a CLIPSeg spec: an existing folder, or a hub id's cached (or downloaded) snapshot."""
    from studio.models.loading import hub_offline

    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, str(path)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise StudioError(f"Segmenter {text!r} is not 'grabcut', an existing folder or a hub id such as "
                          f"{DEFAULT_CLIPSEG}; check the path.")
    from huggingface_hub import snapshot_download

    try:
        cached = Path(snapshot_download(text, local_files_only=True, allow_patterns=_HUB_FILES))
        if (cached / "config.json").is_file():
            return cached, text
    except Exception:  # noqa: BLE001 - any cache miss (no refs, no snapshot) means "not cached"
        pass
    hint = "download it once with network access, pass a local folder, or use --model grabcut (offline)"
    if hub_offline():
        raise StudioError(f"{text} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading "
                          f"it; {hint}.")
    if not _hub_reachable():
        raise StudioError(f"{text} is not in the local Hugging Face cache and the hub cannot be reached (no network); "
                          f"{hint}.")
    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_FILES)), text
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; report one line
        raise StudioError(f"Could not download {text} from the hub ({_first_line(err)}); {hint}.") from None


def load_segmenter(spec: str = "grabcut", *, device: str | None = None, dtype: str | None = None) -> Segmenter:
    """``"grabcut"`` (offline, the default), ``"clipseg"`` (:data:`DEFAULT_CLIPSEG`), or a CLIPSeg hub id / folder."""
    text = os.fspath(spec).strip()
    if text.lower() == "grabcut":
        return GrabCutSegmenter()
    if text.lower() == "clipseg":
        text = DEFAULT_CLIPSEG
    return CLIPSegSegmenter.load(text, device=device, dtype=dtype)
