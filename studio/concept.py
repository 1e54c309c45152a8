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
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.atomic import atomic_path
from studio.errors import ConceptFormatError, IncompatibleConceptError

FORMAT_VERSION = 1
REF_PREFIX = "ref."
_MAX_HEADER = 100 * 1024 * 1024


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


def write_concept(concept: Concept, path: str | os.PathLike[str]) -> Path:
    """Write ``concept`` atomically to ``path`` (a ``.safetensors`` file) and return the path.

    The format alone: validating the tensors against the concept's method is
    :func:`studio.methods.save_concept`, which every caller outside the methods uses."""
    from safetensors.torch import save_file

    method_tensors, refs = split_refs(concept.tensors)
    refs.update(concept.refs)
    _check_refs(refs, Path(path))
    final = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in method_tensors.items()}
    tensors.update({REF_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in refs.items()})
    with atomic_path(final) as tmp:
        save_file(tensors, str(tmp), metadata=concept.metadata())
    return final


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and validate a safetensors header without loading tensors.

    Returns ``(entries, metadata)`` where ``entries[name] = {"dtype", "shape", "data_offsets"}``.
    Raises :class:`ConceptFormatError` for anything that is not a complete safetensors file.
    """
    p = Path(path)
    if not p.is_file():
        raise ConceptFormatError(f"No concept file at {p}.")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConceptFormatError(f"{p} is empty or truncated (not a safetensors file).")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            hint = " (a pickled .pt/.bin file? import it with `concepts import`)" if head[:2] == b"PK" or head[:1] == b"\x80" else ""
            raise ConceptFormatError(f"{p} is corrupt or truncated: its safetensors header is unreadable{hint}.")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConceptFormatError(f"{p} is corrupt: its safetensors header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise ConceptFormatError(f"{p} is corrupt: its safetensors header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            end = max(end, int(stop))
        except (KeyError, TypeError, ValueError):
            raise ConceptFormatError(f"{p} is corrupt: tensor {name!r} has no valid data offsets.") from None
    if 8 + n + end > size:
        raise ConceptFormatError(f"{p} is truncated: it holds {size} bytes but its tensors need {8 + n + end}.")
    return header, {str(k): str(v) for k, v in metadata.items()}


def read_concept(path: str | os.PathLike[str]) -> Concept:
    """Read a studio concept file and check its format (header, metadata types, finite tensors).

    The format alone: :func:`studio.methods.load_concept` also validates the tensors against the
    concept's method, and is what every caller outside the methods uses."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    _, md = read_header(p)
    if "studio.format" not in md:
        raise ConceptFormatError(f"{p} is a safetensors file but not a studio concept; bring A1111, diffusers "
                                 "or kohya files in with `python -m studio concepts import`.")
    try:
        version = int(md["studio.format"])
    except ValueError:
        raise ConceptFormatError(f"{p} has an invalid format version {md['studio.format']!r}.") from None
    if version > FORMAT_VERSION:
        raise ConceptFormatError(f"{p} uses concept format {version}, newer than this studio's {FORMAT_VERSION}; "
                                 "upgrade the studio to read it.")
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ConceptFormatError(f"{p} is corrupt: {err}.") from None
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConceptFormatError(f"{p} is corrupt: tensor {k!r} holds NaN or infinite values.")
    tensors, refs = split_refs(tensors)
    _check_refs(refs, p)
    concept = Concept(
        method=md.get("studio.method", ""),
        tokens=_json(md, "studio.tokens", p, list),
        tensors=tensors,
        class_word=md.get("studio.class_word", ""),
        name=md.get("studio.name", "") or p.stem,
        base=_json(md, "studio.base", p, dict),
        train=_json(md, "studio.train", p, dict),
        metrics=_json(md, "studio.metrics", p, dict),
        strength=_strength(md.get("studio.strength", ""), p),
        meta={k: v for k, v in md.items() if not k.startswith("studio.")},
        refs=refs,
        ref_models=_json(md, "studio.ref_model", p, dict),
    )
    return concept


def split_refs(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(method tensors, reference embeddings)``: ``ref.<role>`` tensors go to the second dict as ``role``."""
    method = {k: v for k, v in tensors.items() if not k.startswith(REF_PREFIX)}
    refs = {k[len(REF_PREFIX):]: v for k, v in tensors.items() if k.startswith(REF_PREFIX)}
    return method, refs


def _check_refs(refs: dict[str, torch.Tensor], path: Path) -> None:
    for role, t in refs.items():
        if not role or t.ndim != 2 or t.shape[0] < 1 or not t.is_floating_point():
            raise ConceptFormatError(f"{path}: reference embeddings ref.{role} must be a float (N, D) tensor, "
                                     f"got {t.dtype} {tuple(t.shape)}.")


def check_compatible(concept: Concept, base: Any, *, source: str = "") -> str | None:
    """Refuse a concept whose base architecture differs from ``base`` (a :class:`BaseModel`).

    Returns a note (not an error) when the architecture matches but the weights differ — e.g. an
    SD 1.5 concept applied to an SD 1.5 fine-tune, which users expect to work.
    """
    label = source or concept.name or concept.trigger
    want = concept.base.get("compat")
    if not want:
        return None
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


def _json(md: dict[str, str], key: str, path: Path, kind: type) -> Any:
    raw = md.get(key, "")
    if not raw:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ConceptFormatError(f"{path} is corrupt: metadata {key} is not valid JSON.") from None
    if not isinstance(value, kind):
        raise ConceptFormatError(f"{path} is corrupt: metadata {key} should be a {kind.__name__}.")
    return value


def _strength(raw: str, path: Path) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConceptFormatError(f"{path} has an invalid recommended strength {raw!r}.") from None
    if not math.isfinite(value):
        raise ConceptFormatError(f"{path} has a non-finite recommended strength.")
    return value
