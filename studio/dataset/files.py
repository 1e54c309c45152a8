"""The files of a training folder, named the way :mod:`trainers.data` reads them.

* an image: a file whose suffix the trainers read (:data:`studio.images.IMAGE_SUFFIXES`); a GIF is
  read by the dataset steps too (its first frame) but not by the trainers, so steps that write
  images write it as PNG;
* ``name.mask.png`` beside ``name.EXT``: the subject mask of that image (white = subject);
* ``name.txt`` beside ``name.EXT``: its caption; ``.json`` / ``.md`` files are other sidecars the
  trainers ignore;
* hidden files (``.name``) and sub-folders are ignored, as the trainers ignore them; anything else
  is a file the trainers refuse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from studio.atomic import atomic_path, atomic_write_bytes
from studio.errors import DatasetError
from studio.images import IMAGE_SUFFIXES

TRAINABLE_SUFFIXES = frozenset(IMAGE_SUFFIXES)
READABLE_SUFFIXES = TRAINABLE_SUFFIXES | {".gif"}
MASK_SUFFIX = ".mask.png"
CAPTION_SUFFIX = ".txt"
OTHER_SIDECAR_SUFFIXES = frozenset({".json", ".md"})
MASK_LEVEL = 128
"""A mask pixel at or above this value (0–255) is subject. The trainers weigh the loss by the mask
value, so a pixel at least half-way to white counts as subject when a step needs a yes or no."""


def is_mask(path: Path) -> bool:
    """Whether ``path`` is a ``name.mask.png`` sidecar."""
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_path(image: Path) -> Path:
    """The mask sidecar of ``image`` (which may not exist)."""
    return image.with_name(image.stem + MASK_SUFFIX)


def caption_path(image: Path) -> Path:
    """The caption sidecar of ``image`` (which may not exist)."""
    return image.with_suffix(CAPTION_SUFFIX)


@dataclass
class Listing:
    """A folder's files by role, each list sorted by name."""

    folder: Path
    images: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    captions: list[Path] = field(default_factory=list)
    other_sidecars: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)

    def orphan_captions(self) -> list[Path]:
        """``.txt`` files that are the caption of no image."""
        stems = {p.stem for p in self.images}
        return [p for p in self.captions if p.stem not in stems]

    def orphan_masks(self) -> list[Path]:
        """``.mask.png`` files that are the mask of no image."""
        stems = {p.stem for p in self.images}
        return [p for p in self.masks if p.name[: -len(MASK_SUFFIX)] not in stems]


def list_folder(folder: str | os.PathLike[str]) -> Listing:
    """Sort the files of ``folder`` (not recursive) by role; a missing folder is a :class:`DatasetError`."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Image folder {root} does not exist or is not a folder.")
    listing = Listing(folder=root)
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if is_mask(p):
            listing.masks.append(p)
        elif suffix in READABLE_SUFFIXES:
            listing.images.append(p)
        elif suffix == CAPTION_SUFFIX:
            listing.captions.append(p)
        elif suffix in OTHER_SIDECAR_SUFFIXES:
            listing.other_sidecars.append(p)
        else:
            listing.others.append(p)
    return listing


def without_folder(message: str, path: Path) -> str:
    """``message`` with ``path``'s folder left out (PIL's errors quote the whole path)."""
    return message.replace(str(path), path.name)


def image_format(path: Path) -> str:
    """The PIL format that ``path``'s suffix names (``.png`` → ``"PNG"``); an unknown suffix is a
    :class:`DatasetError`."""
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path.name}: unknown image type {path.suffix!r}; use .png or .jpg.")
    return fmt


def check_output_image(path: Path, *, force: bool) -> None:
    """Refuse to write an image to ``path`` when its suffix is unknown, it is a folder, or it exists
    and ``force`` is not set."""
    image_format(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; give a file name such as sheet.png.")
    if path.exists() and not force:
        raise DatasetError(f"{path} already exists; pass --force to replace it.")


def save_image(img: Image.Image, path: Path, **params: Any) -> None:
    """Write ``img`` to ``path`` atomically (a temporary file renamed into place), in the format its
    suffix names; JPEG gets quality 95 and loses any alpha. ``params`` go to ``Image.save``."""
    fmt = image_format(path)
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if fmt in ("JPEG", "WEBP"):
        params.setdefault("quality", 95)
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **params)


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source``'s bytes to ``target`` atomically."""
    atomic_write_bytes(target, source.read_bytes())
