"""The concept library: a folder of ``NAME.safetensors`` files with ``NAME.preview.png`` sidecars.

Every write is atomic; names are sanitised (no path can leave the folder); nothing is
overwritten without ``force``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from studio.atomic import atomic_path
from studio.concept import Concept, read_header
from studio.errors import ConceptFormatError, StudioError
from studio.methods import load_concept, save_concept

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,79}$")
SUFFIX = ".safetensors"
PREVIEW = ".preview.png"
DEFAULT_LIBRARY = "concepts"


@dataclass
class ConceptInfo:
    """What the library knows about a file from its header alone (cheap to list)."""

    name: str
    path: Path
    method: str = ""
    tokens: list[str] = field(default_factory=list)
    class_word: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    strength: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    size: int = 0
    preview: Path | None = None
    error: str = ""  # set when the file is unreadable; listing never fails because of one file

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "trigger": " ".join(self.tokens),
                "class_word": self.class_word, "base": self.base.get("name", ""),
                "family": self.base.get("family", ""), "strength": self.strength,
                "size_kb": round(self.size / 1024, 1), "error": self.error}


def check_name(name: str) -> str:
    """A safe concept name (letters, digits, space, ``_ - .``; no path separators, no leading dot)."""
    name = name.strip()
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not _NAME.match(name) or ".." in name:
        raise StudioError(f"Concept name {name!r} is not allowed; use letters, digits, spaces, '_', '-' or '.' "
                          "(at most 80 characters, no slashes).")
    return name


class Library:
    """Concepts stored in ``folder`` (default ``concepts/``)."""

    def __init__(self, folder: str | os.PathLike[str] = DEFAULT_LIBRARY):
        self.folder = Path(folder).expanduser()

    # -- paths -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{SUFFIX}"

    def preview_path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{PREVIEW}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    # -- reading -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}") if not p.name.startswith("."))

    def list(self) -> list[ConceptInfo]:
        return [self.info(n) for n in self.names()]

    def info(self, name: str) -> ConceptInfo:
        path = self._existing(name)
        preview = self.preview_path(name)
        info = ConceptInfo(name=name, path=path, size=path.stat().st_size,
                           preview=preview if preview.is_file() else None)
        try:
            _, md = read_header(path)
            info.method = md.get("studio.method", "")
            info.tokens = json.loads(md.get("studio.tokens") or "[]")
            info.class_word = md.get("studio.class_word", "")
            info.base = json.loads(md.get("studio.base") or "{}")
            info.metrics = json.loads(md.get("studio.metrics") or "{}")
            info.strength = float(md["studio.strength"]) if md.get("studio.strength") else None
            if "studio.format" not in md:
                info.error = "not a studio concept (import it)"
        except (ConceptFormatError, ValueError, json.JSONDecodeError) as err:
            info.error = str(err)
        return info

    def load(self, name: str) -> Concept:
        return load_concept(self._existing(name))

    def resolve(self, source: str) -> Path:
        """A concept given as a file path or a library name → its file."""
        p = Path(source).expanduser()
        if p.is_file():
            return p
        if not p.suffix or p.suffix != SUFFIX or p.parent == Path("."):
            try:
                if self.exists(source):
                    return self.path(source)
            except StudioError:
                pass
        raise StudioError(f"No concept {source!r}: it is neither a file nor a name in the library {self.folder} "
                          f"(known: {', '.join(self.names()) or 'none'}).")

    def _existing(self, name: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            raise StudioError(f"No concept named {name!r} in {self.folder} (known: {', '.join(self.names()) or 'none'}).")
        return path

    # -- writing -----------------------------------------------------------------------------
    def add(self, concept: Concept, name: str | None = None, *, force: bool = False,
            preview: Image.Image | None = None) -> Path:
        """Save ``concept`` as ``name`` (default: its own name); refuses to overwrite unless ``force``."""
        name = check_name(name or concept.name or concept.trigger.strip("<>"))
        target = self.path(name)
        if target.exists() and not force:
            raise StudioError(f"A concept named {name!r} already exists in {self.folder}; pass --force to replace it "
                              "or choose another name.")
        concept.name = name
        save_concept(concept, target)
        if preview is not None:
            self.set_preview(name, preview)
        return target

    def set_preview(self, name: str, image: Image.Image) -> Path:
        path = self.preview_path(name)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        return path

    def rename(self, old: str, new: str, *, force: bool = False, token: str | None = None) -> Path:
        """Rename a concept (file, sidecar and its stored name); ``token`` also changes its trigger."""
        from studio.prompts import normalize_token

        src = self._existing(old)
        new = check_name(new)
        dst = self.path(new)
        if dst.exists() and new != old and not force:
            raise StudioError(f"A concept named {new!r} already exists; pass --force to replace it.")
        concept = load_concept(src)
        concept.name = new
        if token:
            concept.tokens = [normalize_token(token)] + concept.tokens[1:]
        save_concept(concept, dst)
        old_preview, new_preview = self.preview_path(old), self.preview_path(new)
        if old_preview.is_file() and new != old:
            os.replace(old_preview, new_preview)
        if new != old:
            src.unlink()
        return dst

    def delete(self, name: str) -> None:
        path = self._existing(name)
        path.unlink()
        self.preview_path(name).unlink(missing_ok=True)

    def export(self, name: str, out: str | os.PathLike[str], fmt: str = "studio", *, force: bool = False) -> Path:
        """Copy a concept out of the library, as a studio file or converted (see :mod:`studio.methods.interop`)."""
        from studio.methods.interop import export_concept

        out_path = Path(out).expanduser()
        if out_path.exists() and not force:
            raise StudioError(f"{out_path} exists; pass --force to overwrite it.")
        if fmt == "studio":
            src = self._existing(name)
            with atomic_path(out_path) as tmp:
                shutil.copyfile(src, tmp)
            return out_path
        return export_concept(self.load(name), out_path, fmt)

    def import_file(self, path: str | os.PathLike[str], name: str | None = None, *, token: str | None = None,
                    class_word: str | None = None, force: bool = False) -> Path:
        """Bring a studio, A1111, diffusers, Cross-Initialization (or, with those methods, LoRA) file in."""
        from studio.methods.interop import import_concept

        concept = import_concept(Path(path).expanduser(), token=token, class_word=class_word)
        return self.add(concept, name or concept.name, force=force)
