"""Import foreign concept files and export ours to other tools' formats.

Also the validating reader and writer of studio concept files (:func:`load_concept`,
:func:`save_concept`): the file format alone is :mod:`studio.concept`; checking the tensors against
the method that made them needs the method registry, which lives at this layer.

Importers are tried in order; each recognises a file by its tensor names and returns a
:class:`~studio.concept.Concept` or ``None``. Each method declares its own importers and exporters
(textual inversion: A1111 / diffusers / Cross-Initialization; LoRA: kohya / PEFT …).

Pickled files (``.pt``, ``.bin``) are read only here — an explicit ``concepts import`` — and only
with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from studio import safetensors_io as sio
from studio.concept import Concept, read_concept, read_header, split_refs, write_concept
from studio.errors import ConceptFormatError, StudioError
from studio.methods.registry import METHODS, get_method
from studio.prompts import normalize_token

Importer = Callable[[dict[str, torch.Tensor], dict[str, str], Path], "Concept | None"]
Exporter = Callable[[Concept, Path], Path]

# Other tools' files: float weights only (their fp8 / integer variants are refused, not converted),
# at most 4 GiB of tensors (checked from the header or the file size, before loading).
FOREIGN_LIMITS = sio.Limits(dtypes=sio.FLOATS, max_bytes=4 * sio.GIB)


def _method_limits(method: str) -> sio.Limits:
    return get_method(method).file_limits


def _validate(concept: Concept) -> None:
    """The method's own checks (names, ranks, dtypes, finite and bounded values) and its byte cap."""
    method = get_method(concept.method)
    method.validate(concept)
    total = sum(t.numel() * t.element_size() for t in concept.tensors.values())
    if total > method.file_limits.max_bytes:  # what load_concept refuses, import does not let in
        raise ConceptFormatError(f"{concept.method} concept holds {total:,} bytes of tensors, more than the "
                                 f"{method.file_limits.max_bytes:,} allowed.")


def _named(err: StudioError, path: str | os.PathLike[str]) -> StudioError:
    """``err`` as one line that names the file (the method checks do not know it)."""
    text = sio.one_line(str(err))
    if sio.label(path) not in text and sio.label(Path(path).name) not in text:
        text = f"{sio.label(path)}: {text}"
    return type(err)(text)


def load_concept(path: str | os.PathLike[str]) -> Concept:
    """Read a studio concept file (:func:`studio.concept.read_concept`, with the dtype allow-list and
    byte cap of the method the file names) and validate its tensors against its method. No
    compatibility check with a base (see :func:`studio.concept.check_compatible`). Every problem is
    a :class:`ConceptFormatError` of one line naming the file."""
    try:
        concept = read_concept(path, limits=_method_limits)
        _validate(concept)
    except ConceptFormatError as err:
        raise _named(err, path) from None
    return concept


def save_concept(concept: Concept, path: str | os.PathLike[str]) -> Path:
    """Validate ``concept`` against its method, then write it atomically (:func:`studio.concept.write_concept`)."""
    method_tensors, _ = split_refs(concept.tensors)
    get_method(concept.method).validate(replace(concept, tensors=method_tensors))  # ref.* belong to no method
    return write_concept(concept, path)


def export_formats(method: str) -> list[str]:
    """``studio`` and the formats ``method`` declares exporters for."""
    return ["studio"] + sorted(get_method(method).exporters)


def read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file, or of a pickle loaded weights-only."""
    if not path.is_file():
        raise StudioError(f"No file at {sio.label(path)}.")
    if path.suffix == ".safetensors":
        return sio.read_file(path, FOREIGN_LIMITS)
    if path.suffix in (".pt", ".bin", ".ckpt", ".pth"):
        if path.stat().st_size > FOREIGN_LIMITS.max_bytes:
            raise ConceptFormatError(f"{sio.label(path)} is larger than the {FOREIGN_LIMITS.max_bytes:,} bytes a concept "
                                     "file may hold.")
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling errors vary; report one line
            detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise ConceptFormatError(f"{sio.label(path)} could not be read as a weights-only pickle "
                                     f"({sio.label(detail)}); files holding code or arbitrary objects are refused.") from None
        if not isinstance(obj, dict):
            raise ConceptFormatError(f"{sio.label(path)} does not hold a dictionary of tensors.")
        return obj, {}
    raise StudioError(f"{path.name}: unsupported file type {path.suffix!r}; use .safetensors, or .pt/.bin.")


def import_concept(path: Path, *, token: str | None = None, class_word: str | None = None) -> Concept:
    """Read any supported concept file; a studio concept is returned as is (token/class word
    overridable). What is returned passed its method's ``validate``; every problem is a
    :class:`StudioError` of one line naming the file."""
    try:
        return _import(Path(path), token, class_word)
    except StudioError as err:
        raise _named(err, path) from None


def _import(path: Path, token: str | None, class_word: str | None) -> Concept:
    if path.suffix == ".safetensors":
        _, md = read_header(path)
        if "studio.format" in md:
            concept = load_concept(path)
            return _override(concept, token, class_word)
    tensors, md = read_tensors(path)
    for method, importer in ((m, imp) for m in METHODS.values() for imp in m.importers):
        try:
            concept = importer(tensors, md, path)
        except StudioError:
            raise
        except (ArithmeticError, AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as err:
            # The file parsed, but its tensors do not have the shapes this format needs (a 0-d
            # embedding, a ragged list …): refuse it in one line rather than with a traceback.
            detail = (str(err).splitlines() or ["?"])[0][:200]
            raise ConceptFormatError(f"{sio.label(path)} looks like a {method.name} file but its tensors do not fit "
                                     f"that format ({type(err).__name__}: {sio.label(detail)}).") from None
        if concept is not None:
            concept.meta.setdefault("studio.imported_from", path.name.encode("utf-8", "replace").decode())
            concept = _override(concept, token and normalize_token(token), class_word)
            _validate(concept)  # an imported concept is held to the same checks as a loaded one
            return concept
    names = [sio.q(k, 60) for k in list(tensors)[:5]]
    raise ConceptFormatError(f"{sio.label(path.name)} is not a concept format the studio knows (tensors: "
                             f"{', '.join(names)}{'…' if len(tensors) > 5 else ''}).")


def _override(concept: Concept, token: str | None, class_word: str | None) -> Concept:
    if token:
        concept.tokens = [normalize_token(token)] + concept.tokens[1:]
    if class_word is not None:
        concept.class_word = class_word
    return concept


def export_concept(concept: Concept, out: Path, fmt: str) -> Path:
    try:
        fn = get_method(concept.method).exporters[fmt]
    except KeyError:
        raise StudioError(f"A {concept.method} concept cannot be exported as {fmt!r}; "
                          f"formats: {', '.join(export_formats(concept.method))}.") from None
    return fn(concept, out)
