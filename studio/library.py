"""The concept library: a folder of ``NAME.safetensors`` files with ``NAME.preview.png`` sidecars.

Every write is atomic; names are sanitised (no path can leave the folder); nothing is
overwritten without ``force``.
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from studio.atomic import atomic_path, remove_stale_temporaries
from studio.concept import Concept, concept_fields, read_header
from studio.errors import StudioError
from studio.methods import load_concept, save_concept

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,79}$")
SUFFIX = ".safetensors"
PREVIEW = ".preview.png"
DEFAULT_LIBRARY = "concepts"
MODELS = "models"  # whole fine-tuned models (diffusers folders) trained from the UI


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
    # One line saying why the file cannot be used (unreadable, corrupt, unknown method, tensors its
    # method refuses …); listing never fails because of one file, and broken concepts are not applied.
    error: str = ""

    @property
    def usable(self) -> bool:
        return not self.error

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "trigger": " ".join(str(t) for t in self.tokens),
                "class_word": self.class_word, "base": _text(self.base.get("name")),
                "family": _text(self.base.get("family")), "strength": self.strength,
                "size_kb": round(self.size / 1024, 1), "error": self.error}


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, StudioError) else f"{type(err).__name__}: {text}"


# Names Windows reserves for devices, with or without an extension (``CON``, ``nul.txt``, ``COM1``, ``LPT1.x``).
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))})


def check_name(name: str) -> str:
    """A safe concept name (letters, digits, space, ``_ - .``; no path separators, no leading dot).

    A name never ends in ``.safetensors``: every such suffix is dropped (``x.safetensors.safetensors``
    → ``x``), so the name shown is always the file's name minus one suffix, and it leads back to that file."""
    name = name.strip()
    while name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)].strip()
    if not _NAME.match(name) or ".." in name:
        raise StudioError(f"Concept name {name!r} is not allowed; use letters, digits, spaces, '_', '-' or '.' "
                          "(at most 80 characters, no slashes).")
    if name.split(".")[0].rstrip(" ").upper() in _RESERVED:
        raise StudioError(f"Concept name {name!r} is not allowed: {name.split('.')[0].rstrip(' ').upper()} is a "
                          "device name on Windows (CON, PRN, AUX, NUL, COM0–9, LPT0–9, with or without an "
                          "extension); choose another name.")
    return name


def _valid(name: str) -> bool:
    try:
        return check_name(name) == name
    except StudioError:
        return False


class Library:
    """Concepts stored in ``folder`` (default ``concepts/``)."""

    def __init__(self, folder: str | os.PathLike[str] = DEFAULT_LIBRARY):
        self.folder = Path(folder).expanduser()
        # path -> ((size, mtime_ns), error or ""): a file is fully validated once per version
        self._checked: dict[Path, tuple[tuple[int, int], str]] = {}
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files that writers killed mid-save left (:func:`studio.atomic.remove_stale_temporaries`:
        never one of a live process); done when the library is opened and listed."""
        return [*remove_stale_temporaries(self.folder), *remove_stale_temporaries(self.folder / MODELS)]

    # -- paths -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{SUFFIX}"

    def preview_path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{PREVIEW}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    # -- reading -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The concepts' names: files ``NAME.safetensors`` whose NAME is a valid name (:func:`check_name`;
        a file copied in under another name, e.g. ``x.safetensors.safetensors``, is left out: import it)."""
        if not self.folder.is_dir():
            return []
        self.remove_stale_temporaries()
        return sorted(n for n in (p.name[: -len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}")
                                  if not p.name.startswith(".")) if _valid(n))

    def list(self) -> list[ConceptInfo]:
        """Every concept file, broken ones included (with :attr:`ConceptInfo.error` set): one bad
        file never stops the listing."""
        out = []
        for n in self.names():
            try:
                out.append(self.info(n))
            except Exception as err:  # noqa: BLE001 - a name the library refuses, a file gone meanwhile …
                out.append(ConceptInfo(name=n, path=self.folder / f"{n}{SUFFIX}", error=_one_line(err)))
        return out

    def usable_names(self) -> builtins.list[str]:
        """Names of the concepts that can be applied (what generation offers; broken files are left out)."""
        return [i.name for i in self.list() if i.usable]

    def info(self, name: str) -> ConceptInfo:
        """What the header says about ``name``, and in ``error`` why it cannot be used, if it cannot:
        the header's metadata is type-checked, and the whole file is validated as :meth:`load`
        would (once per file version; the result is cached)."""
        path = self._existing(name)
        preview = self.preview_path(name)
        stat = path.stat()
        info = ConceptInfo(name=name, path=path, size=stat.st_size, preview=preview if preview.is_file() else None)
        try:
            _, md = read_header(path)
            if "studio.format" not in md:
                info.error = "not a studio concept (import it)"
                return info
            fields = concept_fields(md, path)  # the metadata schema, type-checked
            info.method, info.tokens, info.class_word = fields.method, fields.tokens, fields.class_word
            info.base, info.metrics, info.strength = fields.base, fields.metrics, fields.strength
            info.error = self._validate(path, (stat.st_size, stat.st_mtime_ns))
        except Exception as err:  # noqa: BLE001 - the listing reports any unreadable file, never raises
            info.error = _one_line(err)
        return info

    def _validate(self, path: Path, version: tuple[int, int]) -> str:
        """``""`` when :func:`~studio.methods.load_concept` accepts the file, else its one-line reason."""
        cached = self._checked.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            load_concept(path)
            error = ""
        except Exception as err:  # noqa: BLE001 - reported, not raised
            error = _one_line(err)
        self._checked[path] = (version, error)
        return error

    def load(self, name: str) -> Concept:
        return load_concept(self._existing(name))

    def resolve(self, source: str) -> Path:
        """A concept given as a file path or a library name → its file."""
        p = Path(source).expanduser()
        if p.suffix != SUFFIX and _valid(source) and self.exists(source):
            return self.path(source)  # a library name wins over a same-named file in the working directory
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
