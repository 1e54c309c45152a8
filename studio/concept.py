"""The concept file: one ``.safetensors`` per concept — named tensors + versioned metadata.

Metadata keys (all strings, JSON where structured):

==========================  =====================================================================
``studio.format``           format version (an integer); files of a newer version are refused
``studio.method``           registered method name (``textual_inversion``, ``lora``, …)
``studio.name``             display name
``studio.tokens``           JSON list of trigger tokens, e.g. ``["<hrt>"]``
``studio.class_word``       the class noun (``dog``) or empty
``studio.base``             JSON fingerprint of the base it was trained on (name, family, identity,
                            compatibility key, prediction type)
``studio.train``            JSON training config
``studio.metrics``          JSON scores (evaluation, curves)
``studio.strength``         recommended strength (float) or empty
``studio.ref_model``        JSON ``{role: scorer name}`` of the reference embeddings (below), if any
``modelspec.*`` / ``ss_*``  interop keys (SAI ModelSpec, kohya) where they fit
==========================  =====================================================================

Tensor names are method-namespaced and chosen so other tools read our files (``emb_params``,
``clip_l``/``clip_g``, kohya LoRA keys …). Reading validates everything; nothing is unpickled.

Tensors named ``ref.<role>`` (``ref.clip``, ``ref.dino``: ``(N, D)`` float32 embeddings of the
training photos, see :mod:`studio.evaluation`) belong to no method: they are kept out of
:attr:`Concept.tensors` (in :attr:`Concept.refs`) and out of method validation, and written back
to the file, so a concept can be re-scored without its photos.

The tensor :data:`GUARD_TENSOR` (``_studio.not_an_embedding``, one float32 zero) is written into the
files of methods that are not embeddings but could be mistaken for one (Perfusion, NeTI: see
:func:`write_concept`'s ``guard``). Other tools' embedding loaders take a ``.safetensors`` file's
first tensor when it has no name they know (ComfyUI) or refuse a file with several (A1111); the
guard is the first tensor in every order a reader lists them in, and its width of 1 fits no text
encoder, so those loaders skip the file instead of loading a garbage embedding. Reading drops it;
files written before it existed read unchanged (docs/architecture.md, "The concept file").
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio import safetensors_io as sio
from studio.atomic import atomic_path
from studio.errors import ConceptFormatError, IncompatibleConceptError

FORMAT_VERSION = 1
REF_PREFIX = "ref."
# A reader that does not know the concept's method (the methods layer passes each method's own).
DEFAULT_LIMITS = sio.Limits(dtypes=sio.FLOATS, max_bytes=4 * sio.GIB)
# ref.<role>: (N, D) float32 image embeddings (CLIP / DINO features: |x| of a few units, normalised or
# not); 1e4 leaves two orders of magnitude and still refuses garbage.
REF_MAX_ABS = 1e4
# Marks a file as "not an embedding" for other tools' embedding loaders (module docstring). The name
# sorts before every method's tensor names ("_" precedes the lowercase letters they start with), and
# float32 is the widest dtype a concept file holds, so it is first in safetensors' name order and in
# its data order alike (load_file lists tensors by dtype width, then by name).
GUARD_TENSOR = "_studio.not_an_embedding"


@dataclass
class Concept:
    """A concept in memory. ``tensors`` are CPU tensors; ``meta`` holds extra string metadata
    (interop keys) written verbatim."""

    method: str
    tokens: list[str]
    tensors: dict[str, torch.Tensor]
    class_word: str = ""
    name: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    strength: float | None = None
    meta: dict[str, str] = field(default_factory=dict)
    # Reference embeddings of the training photos: role ("clip", "dino") -> (N, D) float32, saved as
    # tensors "ref.<role>"; ref_models[role] names the scorer that made them (scores of different
    # backbones never mix).
    refs: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_models: dict[str, str] = field(default_factory=dict)

    @property
    def trigger(self) -> str:
        return self.tokens[0] if self.tokens else ""

    def metadata(self) -> dict[str, str]:
        md = dict(self.meta)
        md.update({
            "studio.format": str(FORMAT_VERSION),
            "studio.method": self.method,
            "studio.name": self.name,
            "studio.tokens": json.dumps(self.tokens),
            "studio.class_word": self.class_word,
            "studio.base": json.dumps(self.base, sort_keys=True),
            "studio.train": json.dumps(self.train, sort_keys=True, default=str),
            "studio.metrics": json.dumps(self.metrics, sort_keys=True),
            "studio.strength": "" if self.strength is None else repr(float(self.strength)),
            "modelspec.title": self.name or self.trigger,
            "modelspec.trigger_phrase": self.trigger,
        })
        if self.refs or self.ref_models:
            md["studio.ref_model"] = json.dumps(self.ref_models, sort_keys=True)
        if self.base.get("family"):
            md.setdefault("modelspec.architecture", _ARCH.get(self.base["family"], self.base["family"]))
        return md


_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}


def write_concept(concept: Concept, path: str | os.PathLike[str], *, guard: bool = False) -> Path:
    """Write ``concept`` atomically to ``path`` (a ``.safetensors`` file) and return the path.

    ``guard``: also write :data:`GUARD_TENSOR`, so that other tools' embedding loaders skip the file
    (for methods whose files are not embeddings; the module docstring says how).

    The format alone: validating the tensors against the concept's method is
    :func:`studio.methods.save_concept`, which every caller outside the methods uses."""
    from safetensors.torch import save_file

    method_tensors, refs = split_refs(concept.tensors)
    refs.update(concept.refs)
    _check_refs(refs, Path(path))
    final = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in method_tensors.items()}
    tensors.update({REF_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in refs.items()})
    tensors.pop(GUARD_TENSOR, None)
    if guard:
        _check_guardable(tensors, final)
        tensors = {GUARD_TENSOR: torch.zeros(1, dtype=torch.float32)} | tensors
    metadata = concept.metadata()
    sio.check_strings(metadata | {k: "" for k in tensors}, sio.label(final))  # no lone surrogates reach the file
    with atomic_path(final) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return final


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and validate a safetensors header without loading tensors
    (:func:`studio.safetensors_io.read_header`: structure, offsets, metadata types).

    Returns ``(entries, metadata)`` where ``entries[name] = {"dtype", "shape", "data_offsets"}``.
    Raises :class:`ConceptFormatError` for anything that is not a complete, well-formed safetensors file.
    """
    header = sio.read_header(path)
    entries = {e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
               for e in header.entries.values()}
    return entries, header.metadata


@dataclass
class ConceptFields:
    """The ``studio.*`` metadata of a concept file, parsed and type-checked (see :func:`concept_fields`)."""

    version: int
    method: str
    name: str
    tokens: list[str]
    class_word: str
    base: dict[str, Any]
    train: dict[str, Any]
    metrics: dict[str, Any]
    strength: float | None
    ref_models: dict[str, str]


_VERSION = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits only: "-1", "0", "01", "١" (Arabic-Indic one) are refused
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def concept_fields(md: dict[str, str], path: str | os.PathLike[str]) -> ConceptFields:
    """Check a concept file's metadata against the schema of its format version and parse it.

    Version 1 (every value a string, JSON where structured): ``studio.format`` a plain integer in
    ASCII digits, 1 … :data:`FORMAT_VERSION`; ``studio.method`` non-empty; ``studio.tokens`` a JSON
    list of non-empty strings; ``studio.base`` / ``studio.train`` / ``studio.metrics`` JSON objects;
    ``studio.ref_model`` a JSON object of strings; ``studio.strength`` empty or a finite decimal
    number. JSON is parsed depth-limited (:func:`studio.safetensors_io.loads_json`)."""
    where = sio.label(path)
    if "studio.format" not in md:
        raise ConceptFormatError(f"{where} is a safetensors file but not a studio concept; bring A1111, diffusers "
                                 "or kohya files in with `python -m studio concepts import`.")
    raw = md["studio.format"]
    if not _VERSION.fullmatch(raw):
        raise ConceptFormatError(f"{where} has an invalid format version {sio.q(raw)} (metadata studio.format: a "
                                 f"whole number from 1 to {FORMAT_VERSION}).")
    version = int(raw)
    if version > FORMAT_VERSION:
        raise ConceptFormatError(f"{where} uses concept format {version}, newer than this studio's {FORMAT_VERSION}; "
                                 "upgrade the studio to read it.")
    method = md.get("studio.method", "")
    if not method:
        raise ConceptFormatError(f"{where} is corrupt: metadata studio.method is missing or empty.")
    tokens = _json(md, "studio.tokens", where, list)
    if not all(isinstance(t, str) and t for t in tokens):
        raise ConceptFormatError(f"{where} is corrupt: metadata studio.tokens must be a JSON list of non-empty strings.")
    ref_models = _json(md, "studio.ref_model", where, dict)
    if not all(isinstance(v, str) for v in ref_models.values()):
        raise ConceptFormatError(f"{where} is corrupt: metadata studio.ref_model must map roles to scorer names.")
    return ConceptFields(
        version=version, method=method, name=md.get("studio.name", ""), tokens=tokens,
        class_word=md.get("studio.class_word", ""), base=_json(md, "studio.base", where, dict),
        train=_json(md, "studio.train", where, dict), metrics=_json(md, "studio.metrics", where, dict),
        strength=_strength(md.get("studio.strength", ""), where), ref_models=ref_models)


def read_concept(path: str | os.PathLike[str], *,
                 limits: sio.Limits | Callable[[str], sio.Limits] | None = None) -> Concept:
    """Read a studio concept file and check its format: the header (:mod:`studio.safetensors_io`),
    the metadata schema (:func:`concept_fields`), dtypes and total size against ``limits`` before
    any tensor is allocated, finite values, reference embeddings.

    ``limits``: fixed, or a function of the method name (what :func:`studio.methods.load_concept`
    passes: each method's ``file_limits``); default :data:`DEFAULT_LIMITS`. The format alone:
    :func:`studio.methods.load_concept` also validates the tensors against the concept's method, and
    is what every caller outside the methods uses."""
    p = Path(path)
    header = sio.read_header(p)
    fields = concept_fields(header.metadata, p)
    lim = limits(fields.method) if callable(limits) else (limits or DEFAULT_LIMITS)
    sio.check_limits(header, lim, sio.label(p))
    tensors, refs = split_refs(sio.read_tensors(header, p))
    tensors.pop(GUARD_TENSOR, None)  # a marker for other tools (module docstring), not the method's
    _check_refs(refs, p)
    md = header.metadata
    return Concept(
        method=fields.method,
        tokens=fields.tokens,
        tensors=tensors,
        class_word=fields.class_word,
        name=fields.name or p.stem,
        base=fields.base,
        train=fields.train,
        metrics=fields.metrics,
        strength=fields.strength,
        meta={k: v for k, v in md.items() if not k.startswith("studio.")},
        refs=refs,
        ref_models=fields.ref_models,
    )


def split_refs(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(method tensors, reference embeddings)``: ``ref.<role>`` tensors go to the second dict as ``role``."""
    method = {k: v for k, v in tensors.items() if not k.startswith(REF_PREFIX)}
    refs = {k[len(REF_PREFIX):]: v for k, v in tensors.items() if k.startswith(REF_PREFIX)}
    return method, refs


def _check_guardable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The guard is only first in every listing order if no tensor sorts before it by name or by
    dtype width (safetensors orders data by width, widest first): refuse what would break that."""
    early = [k for k in tensors if k < GUARD_TENSOR]
    wide = [k for k, v in tensors.items() if v.element_size() > 4]
    if early or wide:
        name = (early or wide)[0]
        raise ConceptFormatError(f"{sio.label(path)}: tensor {sio.q(name)} would come before the "
                                 f"{GUARD_TENSOR} marker ({'its name sorts first' if early else 'it is wider than float32'}); "
                                 "name method tensors in lowercase and store them as float16/bfloat16/float32.")


def _check_refs(refs: dict[str, torch.Tensor], path: Path) -> None:
    for role, t in refs.items():
        if not role or t.ndim != 2 or min(t.shape) < 1 or not t.is_floating_point():
            raise ConceptFormatError(f"{sio.label(path)}: reference embeddings ref.{sio.q(role)} must be a float (N, D) "
                                     f"tensor, got {t.dtype} {tuple(t.shape)}.")
    sio.check_values({REF_PREFIX + k: v for k, v in refs.items()}, sio.label(path), dtypes=sio.FLOATS,
                     max_abs=REF_MAX_ABS)


def check_compatible(concept: Concept, base: Any, *, source: str = "") -> str | None:
    """Refuse a concept whose base architecture differs from ``base`` (a :class:`BaseModel`).

    Returns a note (not an error) when the architecture matches but the weights differ — e.g. an
    SD 1.5 concept applied to an SD 1.5 fine-tune, which users expect to work.
    """
    label = source or concept.name or concept.trigger
    want = concept.base.get("compat")
    if not want:
        return None
    if not isinstance(want, dict):
        raise ConceptFormatError(f"Concept {label} is corrupt: its studio.base compat entry should be an object.")
    have = base.compat
    if want != have:
        why = []
        if want.get("family") != have.get("family"):
            why.append(f"it was trained for {want.get('family')} and the loaded base is {have.get('family')}")
        if want.get("text_widths") != have.get("text_widths"):
            why.append(f"its text width is {want.get('text_widths')} and the base's is {have.get('text_widths')}")
        if not why:
            why.append("the UNet's cross-attention layout differs")
        raise IncompatibleConceptError(f"Concept {label} does not fit base {base.name}: {'; '.join(why)}. "
                                       f"Load a {want.get('family')} base made like {concept.base.get('name', '?')}.")
    if concept.base.get("identity") and concept.base["identity"] != base.identity:
        return (f"note: {label} was trained on {concept.base.get('name', '?')}; applying it to {base.name} "
                "(same architecture), results may differ.")
    return None


def _json(md: dict[str, str], key: str, where: str, kind: type) -> Any:
    raw = md.get(key, "")
    if not raw:
        return kind()
    value = sio.loads_json(raw, where=f"{where}: metadata {key}")
    if not isinstance(value, kind):
        raise ConceptFormatError(f"{where} is corrupt: metadata {key} should be a JSON "
                                 f"{'object' if kind is dict else 'list'}, not {type(value).__name__}.")
    return value


def _strength(raw: str, where: str) -> float | None:
    if not raw:
        return None
    if not _FLOAT.fullmatch(raw):
        raise ConceptFormatError(f"{where} has an invalid recommended strength {sio.q(raw)} (metadata studio.strength).")
    value = float(raw)
    if not math.isfinite(value):
        raise ConceptFormatError(f"{where} has a non-finite recommended strength (metadata studio.strength).")
    return value
