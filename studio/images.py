"""Opening a user's image file, safely: :func:`open_image` is the one way the studio reads a photo
(training folders, uploads, zero-shot and generation reference images, evaluation references).

* the pixel count is read from the header *before* anything is decoded: an image over
  :data:`MAX_PIXELS` (8192×8192 ≈ 67 megapixels) is refused with a one-line error naming the
  file, its size and the limit — a 48 KB PNG may claim 20000×20000 pixels (a "decompression bomb");
* the file is checked and decoded (a corrupt or truncated file is an error naming it);
* EXIF orientation is applied; an animated image (GIF, APNG, WebP) gives its first frame;
* modes are normalised: CMYK, YCbCr, 1-bit → RGB or L; 16-bit and 32-bit grey → 8-bit L (scaled,
  not clipped); palette and grey+alpha → RGB or RGBA (transparency kept as alpha).

Errors name only the file's base name, never its folder (an upload's folder is a server path).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import DatasetError

MAX_PIXELS = 8192 * 8192  # ≈ 67 megapixels; below PIL's own warning (~89 MP) and error (~179 MP) limits
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def header_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header, without decoding it (and without PIL's own bomb
    check, which raises before the size can be reported); None when no image format recognises it."""
    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            try:
                if accept is not None:
                    accepted = accept(prefix)
                    if not accepted or isinstance(accepted, str):
                        continue
                fp.seek(0)
                im = factory(fp, str(path))  # parses the header only
                return im.size
            except Exception:  # noqa: BLE001 — a format that does not take this file: try the next
                continue
    return None


def check_size(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> tuple[int, int] | None:
    """Refuse an image whose header claims more than ``max_pixels`` pixels (see the module docstring)."""
    name = Path(path).name
    try:
        size = header_size(path)
    except OSError as err:
        raise DatasetError(f"{name} cannot be read ({err.strerror or err}).") from None
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        raise DatasetError(f"{name} is {w}×{h} pixels ({w * h / 1e6:.0f} megapixels); images are limited to "
                           f"{_limit(max_pixels)} — resize it.")
    return size


def open_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A user's image file → a decoded PIL image in mode RGB, RGBA or L (see the module docstring).

    Raises :class:`~studio.errors.DatasetError` (one line, naming the file) for a file that is too
    large, corrupt, truncated or not an image."""
    path = Path(path)
    check_size(path, max_pixels=max_pixels)
    try:
        with Image.open(path) as probe:
            probe.verify()  # structure check (PNG CRCs, ...); the image must be reopened afterwards
        with Image.open(path) as im:
            im.seek(0)  # an animated image: its first frame
            im.load()
            img = ImageOps.exif_transpose(im)  # a new image, detached from the file
    except DatasetError:
        raise
    except Image.DecompressionBombError:  # a header the size check could not read, yet PIL could
        raise DatasetError(f"{path.name} is larger than the limit of {_limit(max_pixels)}; resize it.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise DatasetError(f"{path.name} is corrupt or not an image ({err}); replace or remove it.") from None
    return normalize_mode(img)


def _limit(max_pixels: int) -> str:
    side = int(max_pixels ** 0.5)
    return f"{max_pixels / 1e6:.0f} megapixels" + (f" ({side}×{side})" if side * side == max_pixels else "")


def normalize_mode(img: Image.Image) -> Image.Image:
    """RGB, RGBA and L stay; everything else becomes one of them (alpha/transparency → RGBA)."""
    mode = img.mode
    if mode in ("RGB", "RGBA", "L"):
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in img.info):
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, P without transparency
