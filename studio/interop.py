"""Import foreign concept files and export ours to other tools' formats.

Importers are tried in order; each recognises a file by its tensor names and returns a
:class:`~studio.concept.Concept` or ``None``. Methods register their own importers and exporters
(textual inversion: A1111 / diffusers / Cross-Initialization; LoRA: kohya / PEFT …).

Pickled files (``.pt``, ``.bin``) are read only here — an explicit ``concepts import`` — and only
with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from studio.concept import Concept, load_concept, read_header
from studio.errors import ConceptFormatError, StudioError

Importer = Callable[[dict[str, torch.Tensor], dict[str, str], Path], "Concept | None"]
Exporter = Callable[[Concept, Path], Path]

_IMPORTERS: list[Importer] = []
_EXPORTERS: dict[tuple[str, str], Exporter] = {}


def register_importer(fn: Importer) -> Importer:
    _IMPORTERS.append(fn)
    return fn


def register_exporter(method: str, fmt: str) -> Callable[[Exporter], Exporter]:
    def deco(fn: Exporter) -> Exporter:
        _EXPORTERS[(method, fmt)] = fn
        return fn
    return deco


def export_formats(method: str) -> list[str]:
    return ["studio"] + sorted(f for m, f in _EXPORTERS if m == method)


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
    import studio.methods  # noqa: F401  (registers the methods' importers)
    from studio.prompts import normalize_token

    if path.suffix == ".safetensors":
        _, md = read_header(path)
        if "studio.format" in md:
            concept = load_concept(path)
            return _override(concept, token, class_word)
    tensors, md = read_tensors(path)
    for importer in _IMPORTERS:
        concept = importer(tensors, md, path)
        if concept is not None:
            concept.meta.setdefault("studio.imported_from", path.name)
            return _override(concept, token and normalize_token(token), class_word)
    raise ConceptFormatError(f"{path.name} is not a concept format the studio knows (tensors: "
                             f"{', '.join(list(tensors)[:5])}{'…' if len(tensors) > 5 else ''}).")


def _override(concept: Concept, token: str | None, class_word: str | None) -> Concept:
    from studio.prompts import normalize_token

    if token:
        concept.tokens = [normalize_token(token)] + concept.tokens[1:]
    if class_word is not None:
        concept.class_word = class_word
    return concept


def export_concept(concept: Concept, out: Path, fmt: str) -> Path:
    try:
        fn = _EXPORTERS[(concept.method, fmt)]
    except KeyError:
        raise StudioError(f"A {concept.method} concept cannot be exported as {fmt!r}; "
                          f"formats: {', '.join(export_formats(concept.method))}.") from None
    return fn(concept, out)
