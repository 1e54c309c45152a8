"""The dataset every trainer reads: an image folder, validated up front.

* formats: PNG, JPEG, WebP, BMP, TIFF; opened with :func:`studio.images.open_image` (EXIF
  orientation applied, first frame of an animation, at most 8192×8192 pixels — checked from the
  header, so a decompression bomb is refused before it is decoded);
* RGBA alpha → the subject mask; ``name.mask.png`` sidecar → the mask (white = subject);
* ``name.txt`` sidecar → the caption of that image;
* resized (shorter side) and centre-cropped to the training resolution; or, with aspect-ratio
  buckets (``buckets=``, :mod:`trainers.buckets`), resized to cover the bucket of nearest aspect
  ratio and cropped to it (centred, or keeping the mask's bounding box inside), recording what
  SDXL's micro-conditioning needs (:meth:`Example.time_ids`); a mask follows its image through the
  same resize and crop;
* every file is opened and decoded before training starts: a corrupt, unreadable, tiny or
  non-image file is an error naming the file; too few images is an error too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.errors import DatasetError
from studio.images import MAX_PIXELS, open_image  # noqa: F401  (MAX_PIXELS: the limit, re-exported)
from trainers.buckets import Bucket, assign_bucket, cover_size, crop_offset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
SIDECAR_SUFFIXES = {".txt", ".json", ".md"}
MIN_SIDE = 16  # pixels; smaller files are almost certainly thumbnails or icons


@dataclass
class Example:
    """One training image, prepared at the training resolution.

    pixels: (3, H, W) float32 in [-1, 1]; mask: (1, H, W) float32 in [0, 1] or None. Square
    (``H = W = R``) without buckets; with buckets ``(H, W)`` is the image's bucket and
    ``original_size`` / ``resized_size`` (h, w) and ``crop_top_left`` (top, left, in the resized
    image's pixels) say how it was cut from the file (None without buckets).
    """

    path: Path
    pixels: torch.Tensor
    mask: torch.Tensor | None
    caption: str | None
    original_size: tuple[int, int] | None = None
    resized_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of :attr:`pixels`: the training size (the bucket, with buckets)."""
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])

    def time_ids(self, flipped: bool = False) -> tuple[int, int, int, int, int, int]:
        """SDXL's micro-conditioning of this example (or of its mirror image when ``flipped``):
        ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

        The order and meaning are diffusers': ``StableDiffusionXLPipeline._get_add_time_ids``
        builds ``original_size + crops_coords_top_left + target_size``, each (h, w), and its SDXL
        training examples (``examples/text_to_image/train_text_to_image_sdxl.py``,
        ``examples/dreambooth/train_dreambooth_lora_sdxl.py``) take ``original_size`` as the file's
        (height, width) before any resize and ``crop_top_left`` as (y1, x1) of the crop in the resized
        image — measured after the random flip, so the mirror's left offset is ``resized_w − left − W``.
        Without buckets (no recorded geometry) it is ``(H, W, 0, 0, H, W)``: what training has always
        passed, ``[R, R, 0, 0, R, R]``."""
        h, w = self.size
        if self.original_size is None or self.crop_top_left is None or self.resized_size is None:
            return (h, w, 0, 0, h, w)
        top, left = self.crop_top_left
        if flipped:
            left = self.resized_size[1] - left - w
        return (*self.original_size, top, left, h, w)


def _is_mask_sidecar(p: Path) -> bool:
    return p.name.lower().endswith(".mask.png")


def load_image_folder(folder: str | os.PathLike[str], resolution: int, *, min_images: int = 1,
                      max_images: int = 1000, buckets: list[Bucket] | None = None) -> list[Example]:
    """Validate and load every image of ``folder`` (sorted by name): square ``resolution`` crops,
    or, given ``buckets`` (:func:`trainers.buckets.make_buckets`), each at its bucket's size."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Image folder {root} does not exist or is not a folder.")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not _is_mask_sidecar(p)]
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES | SIDECAR_SUFFIXES and not _is_mask_sidecar(p):
            raise DatasetError(f"{p.name} in {root} is not an image (use PNG, JPEG, WebP, BMP or TIFF), "
                               "a caption (.txt) or a mask (.mask.png); move it out of the folder.")
    if len(images) < min_images:
        raise DatasetError(f"{root} holds {len(images)} image(s); this method needs at least {min_images} "
                           "(3–20 photos of the subject work best).")
    if len(images) > max_images:
        raise DatasetError(f"{root} holds {len(images)} images; at most {max_images} are accepted.")
    return [_load_example(p, resolution, buckets) for p in images]


def load_image_files(paths: list[Path], resolution: int) -> list[Example]:
    """Load exactly ``paths``, in this order, as :func:`load_image_folder` loads a folder's images (square
    ``resolution`` crops, sidecar captions and masks): e.g. the class images a run uses out of a cache
    folder that may hold more."""
    return [_load_example(Path(p), resolution) for p in paths]


def _open(path: Path) -> Image.Image:
    """Decoded, upright, in mode RGB/RGBA/L; too large (:data:`MAX_PIXELS`, checked from the header
    before decoding), corrupt or not an image → a :class:`DatasetError` naming the file."""
    return open_image(path)


def _load_example(path: Path, resolution: int, buckets: list[Bucket] | None = None) -> Example:
    img = _open(path)
    if min(img.size) < MIN_SIDE:
        raise DatasetError(f"{path.name} is only {img.width}×{img.height} pixels; use images at least "
                           f"{MIN_SIDE} px on each side (ideally ≥ {resolution}).")
    mask_img: Image.Image | None = None
    sidecar = path.with_name(path.stem + ".mask.png")
    if sidecar.is_file():
        mask_img = _open(sidecar).convert("L")
        if mask_img.size != img.size:
            raise DatasetError(f"{sidecar.name} is {mask_img.size} but {path.name} is {img.size}; a mask must "
                               "have the size of its image.")
    elif img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        mask_img = rgba.getchannel("A")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # composite on white
        img = Image.alpha_composite(background, rgba)
    rgb = img.convert("RGB")
    if mask_img is not None and mask_img.getbbox() is None:
        raise DatasetError(f"The mask of {path.name} is empty (all transparent/black); fix or remove it.")
    if buckets:
        return _load_bucketed(path, rgb, mask_img, buckets, _caption(path))
    pixels = _to_tensor(_fit(rgb, resolution, Image.Resampling.BICUBIC)) * 2 - 1
    mask = None
    if mask_img is not None:
        mask = _to_tensor(_fit(mask_img, resolution, Image.Resampling.BILINEAR))
        if float(mask.max()) <= 0:
            raise DatasetError(f"The mask of {path.name} is empty (all transparent/black); fix or remove it.")
    return Example(path=path, pixels=pixels, mask=mask, caption=_caption(path))


def _caption(path: Path) -> str | None:
    """The ``name.txt`` sidecar's text (stripped; empty → None)."""
    caption = None
    cap = path.with_suffix(".txt")
    if cap.is_file():
        try:
            caption = cap.read_text(encoding="utf-8").strip() or None
        except UnicodeDecodeError:
            raise DatasetError(f"{cap.name} is not UTF-8 text; save the caption as UTF-8.") from None
    return caption


def _load_bucketed(path: Path, rgb: Image.Image, mask_img: Image.Image | None, buckets: list[Bucket],
                   caption: str | None) -> Example:
    """``rgb`` (and its mask) resized to cover its bucket and cropped to it (module docstring)."""
    w, h = rgb.size
    bucket = assign_bucket(h, w, buckets)
    nh, nw = cover_size(h, w, bucket)
    subject_x = subject_y = None
    if mask_img is not None:  # the subject: the mask's bounding box (≥ half on), in resized pixels
        box = mask_img.point(lambda v: 255 if v >= 128 else 0).getbbox() or mask_img.getbbox()
        assert box is not None  # an empty mask was refused above
        x0, y0, x1, y1 = box
        subject_x = (math.floor(x0 * nw / w), math.ceil(x1 * nw / w))
        subject_y = (math.floor(y0 * nh / h), math.ceil(y1 * nh / h))
    top = crop_offset(nh, bucket.height, subject_y)
    left = crop_offset(nw, bucket.width, subject_x)
    box4 = (left, top, left + bucket.width, top + bucket.height)
    pixels = _to_tensor(rgb.resize((nw, nh), resample=Image.Resampling.BICUBIC).crop(box4)) * 2 - 1
    mask = None
    if mask_img is not None:
        mask = _to_tensor(mask_img.resize((nw, nh), resample=Image.Resampling.BILINEAR).crop(box4))
        if float(mask.max()) <= 0:
            raise DatasetError(f"The mask of {path.name} lies outside its {bucket.width}×{bucket.height} crop; "
                               "crop the photo closer to the subject.")
    return Example(path=path, pixels=pixels, mask=mask, caption=caption, original_size=(h, w),
                   resized_size=(nh, nw), crop_top_left=(top, left))


def _fit(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop to ``size × size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample=resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))
