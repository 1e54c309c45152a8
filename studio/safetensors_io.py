"""The one validating reader of every ``.safetensors`` file the studio reads: concepts of every
method, foreign files brought in with ``concepts import``, training checkpoints.

Core layer: imports nothing from :mod:`studio.methods`, :mod:`studio.models` or :mod:`trainers`;
what a method allows (dtypes, total tensor bytes, value bound) comes in as :class:`Limits`.

Everything is checked before a byte of tensor data is allocated:

* the header: its declared length (at most :data:`MAX_HEADER`), UTF-8, JSON nesting no deeper than
  a safetensors header needs (scanned *before* :func:`json.loads`, so a ``[[[[…`` header cannot
  recurse), no duplicate keys, every string encodable as UTF-8 (no lone surrogates);
* every tensor entry: exactly ``dtype`` / ``shape`` / ``data_offsets``; the dtype a known name and
  in the caller's allow-list; the shape a list of non-negative ints; the offsets two ints in order
  whose span is exactly ``numel × itemsize``; the entries contiguous, non-overlapping and covering
  the data region to the last byte of the file; their total within the caller's byte cap;
* ``__metadata__``: a flat object of string → string.

Then each tensor is read straight from the file into its own buffer (peak memory = the tensor bytes,
nothing else) and float tensors are checked finite. Every failure raises the caller's
:class:`~studio.errors.StudioError` subclass (:class:`~studio.errors.ConceptFormatError` by default)
with one line that names the file and the field.

:func:`loads_json` parses the JSON held in metadata values with the same depth guard, and
:func:`check_values` is the dtype / finiteness / magnitude check each method's ``validate`` uses.

What each kind of file may hold (declared where the knowledge lives: ``file_limits`` / ``max_abs``
on each method class, ``LIMITS`` in :mod:`trainers.checkpoint`; the reasons are next to them):

======================  =====================  ===============  ==========
file                    dtypes                 tensor bytes     ``|x|`` ≤
======================  =====================  ===============  ==========
textual inversion       F16 BF16 F32           64 MiB           1e4
LoRA                    F16 BF16 F32           4 GiB            1e4
Perfusion               F16 BF16 F32           64 MiB           1e4
NeTI                    F16 BF16 F32           256 MiB          1e4
zero-shot               F16 BF16 F32           1 GiB            1e4
``ref.*`` embeddings    F16 BF16 F32           (the method's)   1e4
foreign imports         F16 BF16 F32           4 GiB            the method's, after import
IP-Adapter weights      F16 BF16 F32           8 GiB            finite
checkpoints             F16 BF16 F32 F64, ints 256 GiB          finite (+ sha256 checksum)
======================  =====================  ===============  ==========
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.errors import ConceptFormatError, StudioError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MAX_HEADER = 32 * MIB  # kohya files with large ss_* metadata are a few MB; safetensors itself allows 100 MB
MAX_TENSORS = 100_000  # a full SDXL fine-tune checkpoint (weights + Adam state) has ~5,000
MAX_DIM = 1 << 40
MAX_NDIM = 8  # weights are at most 5-d (conv3d); torch itself stops at 64
HEADER_DEPTH = 3  # {name: {"shape": [..]}} — nothing in a valid header nests deeper
JSON_DEPTH = 16  # JSON inside metadata values (training config, metric curves): a few levels in practice

# safetensors dtype name -> (torch dtype, bytes per element). Every name safetensors knows, so a
# "dtype lie" is reported as "not allowed here" rather than "unknown".
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
for _name, _attr, _size in (("U16", "uint16", 2), ("U32", "uint32", 4), ("U64", "uint64", 8),
                            ("F8_E4M3", "float8_e4m3fn", 1), ("F8_E5M2", "float8_e5m2", 1),
                            ("F8_E4M3FNUZ", "float8_e4m3fnuz", 1), ("F8_E5M2FNUZ", "float8_e5m2fnuz", 1),
                            ("C64", "complex64", 8)):
    if hasattr(torch, _attr):
        DTYPES[_name] = (getattr(torch, _attr), _size)
DTYPE_NAMES: dict[torch.dtype, str] = {t: n for n, (t, _) in DTYPES.items()}

# What learned weights and embeddings may be stored as. No fp8 (lossy, and torch cannot even test
# it for NaN), no float64 (nothing the studio writes uses it), no integers / bool / complex.
FLOATS = frozenset({"F16", "BF16", "F32"})


@dataclass(frozen=True)
class Limits:
    """What one kind of file may hold: dtype names (``None``: any known dtype), the total tensor
    bytes (checked from the header, before any allocation) and the number of tensors."""

    dtypes: frozenset[str] | None = FLOATS
    max_bytes: int = 4 * GIB
    max_tensors: int = MAX_TENSORS


@dataclass(frozen=True)
class Entry:
    """One tensor of a validated header; ``start``/``end`` are offsets into the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int  # file offset of the data region (8 + header length)
    size: int  # file size

    @property
    def tensor_bytes(self) -> int:
        return self.size - self.data_start


def label(path: str | os.PathLike[str]) -> str:
    """A path fit for a one-line message (escaped if it holds newlines or undecodable bytes)."""
    s = str(path)
    return s if s.isprintable() else ascii(s)


def one_line(text: str) -> str:
    """``text`` with newlines and other unprintable characters escaped (an error message is one line)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def q(text: Any, limit: int = 80) -> str:
    """A quoted, escaped, shortened string for a message (``repr`` escapes lone surrogates)."""
    s = text if isinstance(text, str) else str(text)
    return repr(s[:limit] + "…") if len(s) > limit else repr(s)


# -- JSON with a depth guard ---------------------------------------------------------------------------
_IS_BRACKET = np.zeros(256, dtype=bool)
_IS_BRACKET[list(b"[]{}")] = True
_SQUARE = bytes.maketrans(b"{}", b"[]")  # depth only: {…} counts as […] (mismatched pairs fail json.loads)
_CHUNK = 4 * MIB


def _brackets_outside_strings(raw: bytes) -> bytes:
    """The ``[]{}`` of a JSON text that lie outside its strings, in order. C/numpy speed, linear, in
    4 MiB chunks: escaped backslashes and quotes are dropped first (escape pairs read left to right,
    as JSON does), then a running XOR of the quotes marks what is inside a string."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    out, inside = [], 0
    for i in range(0, len(text), _CHUNK):
        a = np.frombuffer(text, dtype=np.uint8, count=min(_CHUNK, len(text) - i), offset=i)
        parity = np.bitwise_xor.accumulate((a == 34).view(np.uint8)) ^ inside  # 1 inside a string
        out.append(a[(parity == 0) & _IS_BRACKET[a]].tobytes())
        inside = int(parity[-1])
    return b"".join(out).translate(_SQUARE)


def json_nesting(raw: bytes, max_depth: int) -> str:
    """``"ok"`` if the JSON text ``raw`` nests at most ``max_depth`` arrays/objects, ``"deep"`` if
    more, ``"invalid"`` if its brackets do not balance. Linear in ``len(raw)`` and without recursion
    (so :func:`json.loads` never sees a ``[[[[…`` text): the brackets outside strings are kept and
    each of ``max_depth`` passes removes the innermost pairs. Where the text is not valid JSON the
    count may differ from what :func:`json.loads` reads past that point, but it stops there."""
    brackets = _brackets_outside_strings(raw)
    if brackets.count(b"[") != brackets.count(b"]"):
        return "invalid"
    for _ in range(max_depth):
        if not brackets:
            return "ok"
        brackets = brackets.replace(b"[]", b"")  # one level per pass
    return "deep" if brackets else "ok"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _encodable(value: Any, depth: int = 0) -> bool:
    """Every string (and key) inside ``value`` encodes as UTF-8 (JSON ``\\ud800`` escapes decode to
    lone surrogates, which no file, terminal or safetensors writer accepts)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_encodable(k, depth + 1) and _encodable(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v, depth + 1) for v in value)
    return True


def loads_json(raw: str | bytes, *, where: str, error: type[StudioError] = ConceptFormatError,
               max_depth: int = JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted text: depth-limited before parsing, duplicate keys refused,
    every string UTF-8 encodable. ``where`` ("FILE: metadata KEY") starts the error message."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    nesting = json_nesting(data, max_depth)
    if nesting == "invalid":
        raise error(f"{where} is not valid JSON.")
    if nesting == "deep":
        raise error(f"{where} nests JSON deeper than {max_depth} levels.")
    try:
        value = json.loads(data.decode("utf-8", "surrogatepass"), object_pairs_hook=_no_duplicates)
    except _Duplicate as dup:
        raise error(f"{where} repeats the key {q(dup.key)}.") from None
    except (ValueError, RecursionError):  # JSONDecodeError, over-long integers
        raise error(f"{where} is not valid JSON.") from None
    if not _encodable(value):
        raise error(f"{where} holds a string that is not valid Unicode (a lone surrogate).")
    return value


# -- the header ------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str | os.PathLike[str], *, error: type[StudioError] = ConceptFormatError,
                limits: Limits | None = None) -> Header:
    """Read and validate a safetensors header (see the module doc); no tensor data is read.
    With ``limits``, the dtype allow-list, byte cap and tensor count are checked too."""
    p = Path(path)
    where = label(p)
    if not p.is_file():
        raise error(f"No file at {where}.")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{where} is empty or truncated (not a safetensors file).")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                hint = (" (a pickled .pt/.bin file? import it with `concepts import`)"
                        if head[:2] == b"PK" or head[:1] == b"\x80" else "")
                raise error(f"{where} is corrupt or truncated: its safetensors header length ({n} bytes) does not "
                            f"fit the file ({size} bytes){hint}.")
            raw = f.read(n)
    except OSError as err:
        raise error(f"{where} could not be read ({err.strerror or err}).") from None
    if len(raw) != n:
        raise error(f"{where} is truncated: its header is cut short.")
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise error(f"{where} is corrupt: its safetensors header is not a JSON object.")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{where} is corrupt: its safetensors header is not UTF-8.") from None
    header = loads_json(raw, where=f"{where}: the safetensors header", error=error, max_depth=HEADER_DEPTH)
    if not isinstance(header, dict):
        raise error(f"{where} is corrupt: its safetensors header is not a JSON object.")
    metadata = _metadata(header.pop("__metadata__", {}), where, error)
    if len(header) > (limits.max_tensors if limits else MAX_TENSORS):
        raise error(f"{where} declares {len(header)} tensors, more than the {limits.max_tensors if limits else MAX_TENSORS} "
                    "allowed.")
    data_start = 8 + n
    entries = {name: _entry(name, info, where, error) for name, info in header.items()}
    _check_layout(entries, size - data_start, where, error)
    out = Header(entries=entries, metadata=metadata, data_start=data_start, size=size)
    if limits is not None:
        check_limits(out, limits, where, error)
    return out


def _metadata(md: Any, where: str, error: type[StudioError]) -> dict[str, str]:
    if md is None:
        return {}
    if not isinstance(md, dict):
        raise error(f"{where} is corrupt: __metadata__ must be a JSON object of strings, not {type(md).__name__}.")
    for k, v in md.items():
        if not isinstance(v, str):
            raise error(f"{where} is corrupt: metadata {q(k)} must be a string, not {type(v).__name__}.")
    return dict(md)


def _entry(name: str, info: Any, where: str, error: type[StudioError]) -> Entry:
    field = f"{where}: tensor {q(name)}"
    if not name:
        raise error(f"{where} is corrupt: a tensor has an empty name.")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        got = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise error(f"{field} must have exactly dtype, shape and data_offsets (has {q(got)}).")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise error(f"{field} has an unknown dtype {q(dtype)}.")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)
            or math.prod(d for d in shape if d) > MAX_DIM):  # strides must fit in 64 bits, even when empty
        raise error(f"{field} has an invalid shape {q(shape)} (at most {MAX_NDIM} non-negative integers, "
                    f"at most {MAX_DIM} elements).")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise error(f"{field} has invalid data_offsets {q(offsets)} (two integers, start ≤ end).")
    numel = math.prod(shape)
    want = numel * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != want:
        raise error(f"{field} spans {offsets[1] - offsets[0]} bytes but its shape {tuple(shape)} of {dtype} needs "
                    f"{want}.")
    return Entry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(entries: dict[str, Entry], data_size: int, where: str, error: type[StudioError]) -> None:
    """Contiguous, non-overlapping, covering the data region exactly (as safetensors writes it)."""
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != pos:
            what = "overlaps the previous tensor" if e.start < pos else f"leaves a gap at byte {pos}"
            raise error(f"{where} is corrupt: tensor {q(e.name)} at data_offsets [{e.start}, {e.end}] {what}.")
        pos = e.end
        if pos > data_size:
            raise error(f"{where} is truncated: tensor {q(e.name)} ends at byte {pos} of the data but the file holds "
                        f"{data_size}.")
    if pos != data_size:
        raise error(f"{where} is corrupt: its tensors cover {pos} bytes but the file holds {data_size} after the header.")


def check_limits(header: Header, limits: Limits, where: str, error: type[StudioError] = ConceptFormatError) -> None:
    """The dtype allow-list and the byte cap, from the header alone."""
    if len(header.entries) > limits.max_tensors:
        raise error(f"{where} holds {len(header.entries)} tensors, more than the {limits.max_tensors} allowed.")
    if limits.dtypes is not None:
        for e in header.entries.values():
            if e.dtype not in limits.dtypes:
                raise error(f"{where}: tensor {q(e.name)} is {e.dtype}; allowed here: {', '.join(sorted(limits.dtypes))}.")
    total = sum(e.nbytes for e in header.entries.values())
    if total > limits.max_bytes:
        raise error(f"{where} holds {total:,} bytes of tensors, more than the {limits.max_bytes:,} allowed for this "
                    "kind of file.")


# -- tensors ---------------------------------------------------------------------------------------------
def read_tensors(header: Header, path: str | os.PathLike[str], *,
                 error: type[StudioError] = ConceptFormatError) -> dict[str, torch.Tensor]:
    """The tensors of a validated header, each read straight into its own buffer; float tensors
    must be finite."""
    where = label(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != header.size:
                raise error(f"{where} changed while it was read.")
            for e in sorted(header.entries.values(), key=lambda e: e.start):
                torch_dtype, _ = DTYPES[e.dtype]
                buf = torch.empty(e.nbytes, dtype=torch.uint8)
                if e.nbytes:
                    f.seek(header.data_start + e.start)
                    # ignore: numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (mypy checks 3.11)
                    if f.readinto(memoryview(buf.numpy())) != e.nbytes:  # type: ignore[arg-type]
                        raise error(f"{where} is truncated: tensor {q(e.name)} is cut short.")
                tensors[e.name] = buf.view(torch_dtype).reshape(e.shape)
    except OSError as err:
        raise error(f"{where} could not be read ({err.strerror or err}).") from None
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.dtype in _TESTABLE and not bool(torch.isfinite(t).all()):
            raise error(f"{where}: tensor {q(name)} holds NaN or infinite values.")
    return tensors


_TESTABLE = {torch.float16, torch.bfloat16, torch.float32, torch.float64, getattr(torch, "complex64", torch.float32)}


def read_file(path: str | os.PathLike[str], limits: Limits | Callable[[dict[str, str]], Limits], *,
              error: type[StudioError] = ConceptFormatError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate the header, then the limits (``limits`` may be a function of the metadata — the
    method a concept file names), then read the tensors. → ``(tensors, metadata)``."""
    header = read_header(path, error=error)
    lim = limits(header.metadata) if callable(limits) else limits
    check_limits(header, lim, label(path), error)
    return read_tensors(header, path, error=error), header.metadata


# -- values ----------------------------------------------------------------------------------------------
def check_values(tensors: dict[str, torch.Tensor], where: str, *, dtypes: frozenset[str] = FLOATS,
                 max_abs: float | None = None, error: type[StudioError] = ConceptFormatError) -> None:
    """Every tensor of an allowed dtype, finite, and (with ``max_abs``) ``|x| ≤ max_abs``."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise error(f"{where}: {q(name)} is a {type(t).__name__}, not a tensor.")
        dname = DTYPE_NAMES.get(t.dtype, str(t.dtype))
        if dname not in dtypes:
            raise error(f"{where}: tensor {q(name)} is {dname}; allowed: {', '.join(sorted(dtypes))}.")
        if t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            raise error(f"{where}: tensor {q(name)} holds NaN or infinite values.")
        if max_abs is not None:
            lo, hi = torch.aminmax(t.detach())  # no |t| copy
            peak = max(-float(lo), float(hi))
            if peak > max_abs:
                raise error(f"{where}: tensor {q(name)} holds values up to {peak:.3g}, beyond the ±{max_abs:g} a "
                            "valid file holds.")


def check_strings(values: dict[str, str], where: str, *, error: type[StudioError] = ConceptFormatError) -> None:
    """Metadata about to be written: string → string, every string UTF-8 encodable."""
    for k, v in values.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise error(f"{where}: metadata {q(k)} must map a string to a string.")
        if not (_encodable(k) and _encodable(v)):
            raise error(f"{where}: metadata {q(k)} holds a string that is not valid Unicode (a lone surrogate).")
