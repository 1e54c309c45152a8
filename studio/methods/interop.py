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

from studio.concept import Concept, read_concept, read_header, split_refs, write_concept
from studio.errors import ConceptFormatError, StudioError
from studio.methods.registry import METHODS, get_method
from studio.prompts import normalize_token

Importer = Callable[[dict[str, torch.Tensor], dict[str, str], Path], "Concept | None"]
Exporter = Callable[[Concept, Path], Path]


def load_concept(path: str | os.PathLike[str]) -> Concept:
    """Read a studio concept file (:func:`studio.concept.read_concept`) and validate its tensors
    against its method. No compatibility check with a base (see :func:`studio.concept.check_compatible`)."""
    concept = read_concept(path)
    get_method(concept.method).validate(concept)
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
        raise StudioError(f"No file at {path}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _, md = read_header(path)
        try:
            return load_file(str(path), device="cpu"), md
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for corrupt data
            raise ConceptFormatError(f"{path} is corrupt: {err}.") from None
    if path.suffix in (".pt", ".bin", ".ckpt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling errors vary; report one line
            raise ConceptFormatError(f"{path} could not be read as a weights-only pickle ({str(err).splitlines()[0]}); "
                                     "files holding code or arbitrary objects are refused.") from None
        if not isinstance(obj, dict):
            raise ConceptFormatError(f"{path} does not hold a dictionary of tensors.")
        return obj, {}
    raise StudioError(f"{path.name}: unsupported file type {path.suffix!r}; use .safetensors, or .pt/.bin.")


def import_concept(path: Path, *, token: str | None = None, class_word: str | None = None) -> Concept:
    """Read any supported concept file; a studio concept is returned as is (token/class word
    overridable)."""
    if path.suffix == ".safetensors":
        _, md = read_header(path)
        if "studio.format" in md:
            concept = load_concept(path)
            return _override(concept, token, class_word)
    tensors, md = read_tensors(path)
    for importer in (imp for m in METHODS.values() for imp in m.importers):
        concept = importer(tensors, md, path)
        if concept is not None:
            concept.meta.setdefault("studio.imported_from", path.name)
            return _override(concept, token and normalize_token(token), class_word)
    raise ConceptFormatError(f"{path.name} is not a concept format the studio knows (tensors: "
                             f"{', '.join(list(tensors)[:5])}{'…' if len(tensors) > 5 else ''}).")


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
