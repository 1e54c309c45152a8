"""Import foreign concept files and export ours to other tools' formats.

Also the validating reader and writer of studio concept files (:func:`load_concept`,
:func:`save_concept`): the file format alone is :mod:`studio.concept`; checking the tensors against
the method that made them needs the method registry, which lives at this layer.

Importers are tried in order; each recognises a file by its tensor names and returns a
:class:`~studio.concept.Concept` or ``None``. Each method declares its own importers and exporters
(textual inversion: A1111 / diffusers / Cross-Initialization; LoRA: kohya / PEFT …).

Pickled files (``.pt``, ``.bin``) are read only here — an explicit ``concepts import`` — and only
with ``torch.load(weights_only=True)``, which refuses arbitrary objects. Besides tensors, numbers and
plain containers, it is allowed exactly the classes of :data:`PICKLE_CLASSES` (old A1111 embeddings
keep their vectors in a ``torch.nn.ParameterDict``), for that call only.
"""

from __future__ import annotations

import os
import re
import threading
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
# What a weights-only load of a foreign pickle may build besides tensors, numbers and plain containers:
# A1111's textual-inversion .pt files saved by its first versions hold ``string_to_param`` as a
# ``torch.nn.ParameterDict`` (its state is plain data: an OrderedDict of Parameters). Nothing else.
PICKLE_CLASSES: tuple[type, ...] = (torch.nn.ParameterDict,)
# torch keeps its allow-list in a process-wide set: one weights-only load of ours at a time, so one
# call's cleanup never removes a class from under another call.
_PICKLE_LOCK = threading.Lock()
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", re.S)


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
    """Validate ``concept`` against its method, then write it atomically (:func:`studio.concept.write_concept`).

    A method whose files are not embeddings but could pass for one (``embedding_guard = True``:
    Perfusion, NeTI) gets the :data:`studio.concept.GUARD_TENSOR` marker, which makes A1111's and
    ComfyUI's embedding loaders skip the file (docs/architecture.md, "The concept file")."""
    method = get_method(concept.method)
    method_tensors, _ = split_refs(concept.tensors)
    method.validate(replace(concept, tensors=method_tensors))  # ref.* belong to no method
    return write_concept(concept, path, guard=bool(getattr(method, "embedding_guard", False)))


def export_formats(method: str) -> list[str]:
    """``studio`` and the formats ``method`` declares exporters for."""
    return ["studio"] + sorted(get_method(method).exporters)


def export_formats_by_method() -> dict[str, list[str]]:
    """Every method's export formats (:func:`export_formats`), in registry order — what
    ``concepts export --help`` and the README list."""
    return {name: export_formats(name) for name in METHODS}


def export_formats_help() -> str:
    """One line naming every export format and the methods it applies to, e.g. ``studio (any concept,
    the default); a1111 (textual_inversion); diffusers (textual_inversion, lora); kohya (lora)``."""
    by_format: dict[str, list[str]] = {}
    for method, formats in export_formats_by_method().items():
        for fmt in formats[1:]:  # "studio" applies to every concept
            by_format.setdefault(fmt, []).append(method)
    return "; ".join(["studio (any concept, the default)"] +
                     [f"{fmt} ({', '.join(methods)})" for fmt, methods in sorted(by_format.items())])


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
            obj = load_weights_only(path)
        except Exception as err:  # noqa: BLE001 - unpickling errors vary; report one line
            raise pickle_refusal(path, err) from None
        if not isinstance(obj, dict):
            raise ConceptFormatError(f"{sio.label(path)} does not hold a dictionary of tensors.")
        return {k: _parameter_dict(v, path) if isinstance(v, torch.nn.ParameterDict) else v for k, v in obj.items()}, {}
    raise StudioError(f"{path.name}: unsupported file type {path.suffix!r}; use .safetensors, or .pt/.bin.")


def load_weights_only(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with :data:`PICKLE_CLASSES` allowed for this
    call only (torch's allow-list is left as it was found, also on errors)."""
    with _PICKLE_LOCK:
        extra: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
            c for c in PICKLE_CLASSES if c not in torch.serialization.get_safe_globals()]
        with torch.serialization.safe_globals(extra):
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


def pickle_refusal(path: str | os.PathLike[str], err: BaseException) -> ConceptFormatError:
    """The one-line refusal of a pickle that a weights-only load rejected: torch's multi-line text
    (with terminal colour codes) reduced to the global it refused, or to its first fact, and what to do."""
    text = _ANSI.sub("", str(err))
    where = sio.label(path)
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        name = found.group(1).rstrip(".")
        return ConceptFormatError(
            f"{where} was refused: unpickling it needs {sio.q(name)}, which the weights-only loader does not allow "
            "(a pickle that builds arbitrary objects can run code); convert the file to .safetensors with the tool "
            "that made it and import that.")
    detail = _UNPICKLER_DETAIL.search(text)
    lines = [" ".join(line.split()) for line in (detail.group(1) if detail else text).splitlines()]
    first = next((line for line in lines if line), type(err).__name__)
    return ConceptFormatError(
        f"{where} could not be read as a weights-only pickle (torch: {sio.q(first, 160)}); it may be damaged, or hold "
        "code or objects other than tensors — convert it to .safetensors with the tool that made it and import that.")


def _parameter_dict(params: torch.nn.ParameterDict, path: Path) -> dict[str, torch.Tensor]:
    """An unpickled ``ParameterDict`` as a plain ``{name: tensor}``: read from its state (what the pickle
    set), never through its methods, and refused unless that state is names → tensors."""
    raw = vars(params).get("_parameters")
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise ConceptFormatError(f"{sio.label(path)} holds a torch ParameterDict that is not a map of names to "
                                 "tensors; re-save the embedding from the tool that made it.")
    return {k: v.detach() for k, v in raw.items()}


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
