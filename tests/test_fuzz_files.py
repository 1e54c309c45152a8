"""Fuzzing every file the studio reads (issue 25): concepts of every method, foreign files brought
in with ``concepts import``, training checkpoints.

A seeded mutator starts from real files — small valid concepts of every method made on the tiny
base (TI with reference embeddings, LoRA, Perfusion, NeTI, zero-shot), their A1111 / diffusers /
kohya exports, an A1111 ``.pt`` pickle, and a real two-step training checkpoint — and produces
truncations, byte flips, random bytes, header JSON mutations (deep nesting, wrong types, huge /
negative / overlapping offsets, dtype lies incl. F8_E4M3 / I64 / BOOL / C64, shape lies, lone
surrogates, format versions, metadata schema violations), tensor values (NaN, inf, near float max)
and splices of two files.

Each case must end in one of two ways: a valid result (a concept that passes its method's
``validate`` with finite, bounded tensors of an allowed dtype, and that saves and loads again; a
checkpoint whose restored state equals what was saved) or a :class:`StudioError` of one line that
names the file. Anything else — another exception, a hang (pytest-timeout), an invalid file
accepted, the listing disagreeing with ``load_concept`` — fails the run, which reports the cases.

The default run has 2,200 cases (< 60 s on 2 cores); ``pytest -m slow tests/test_fuzz_files.py -s``
runs 50,000 with other seeds and prints its numbers.
"""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from studio.errors import StudioError, TrainingError
from studio.library import Library
from studio.methods import export_concept, get_method, import_concept, load_concept, save_concept
from trainers.checkpoint import (
    STATE,
    checksum,
    last_good_checkpoint,
    load_checkpoint,
    read_checkpoint,
    resolve_resume,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {torch.float16, torch.bfloat16, torch.float32}
MAX_ABS = 1e4  # every method's bound (see each Method.max_abs)
DEFAULT_CASES = 2_200
SLOW_CASES = 50_000
MAX_CASE_SECONDS = 10.0


# -- seed files ----------------------------------------------------------------------------------------
@dataclass
class Seed:
    name: str
    kind: str  # "concept" (a studio file), "foreign" (for concepts import) or "checkpoint"
    suffix: str
    data: bytes
    header: dict | None = None  # parsed safetensors header (None for pickles)
    body: bytes = b""


@dataclass
class CheckpointState:
    params: dict[str, torch.Tensor]
    optim: dict
    rng: torch.Tensor


@dataclass
class Corpus:
    seeds: list[Seed]
    states: dict[int, CheckpointState] = field(default_factory=dict)  # step -> what was saved
    pristine_step1: bytes = b""


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _ckpt_model():
    p = torch.nn.Parameter(torch.zeros(2, 8))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p, b], lr=0.1)
    return {"emb": p, "bias": b}, opt, torch.Generator().manual_seed(0)


def _state_of(params, opt, rng) -> CheckpointState:
    sd = opt.state_dict()
    optim = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for i, st in sd["state"].items()}
    return CheckpointState({k: v.detach().clone() for k, v in params.items()}, {"state": optim,
                           "param_groups": json.loads(json.dumps(sd["param_groups"]))}, rng.get_state().clone())


@pytest.fixture(scope="module")
def corpus(tiny_bases, tmp_path_factory) -> Corpus:
    from studio.methods.neti import random_concept
    from tests.method_cases import make_lora, make_perfusion, make_ti, make_zeroshot

    tiny = tiny_bases("tiny")
    d = tmp_path_factory.mktemp("seeds")
    ti = make_ti(tiny, "<ti>", 0)
    ti.refs, ti.ref_models = {"clip": torch.randn(2, 8, generator=torch.Generator().manual_seed(1))}, {"clip": "test"}
    ti.strength, ti.train, ti.metrics = 0.8, {"steps": 5, "lr": 0.005}, {"clip_i": 0.5, "curve": [[1, 0.1]]}
    concepts = {
        "ti": ti,
        "lora": make_lora(tiny, "<lo>", 1, rank=1, text_encoder=False),
        "perfusion": make_perfusion(tiny, "<pf>", 2),
        "neti": random_concept(tiny, "<nt>", 3, n_fourier=8, hidden=8),
        "zeroshot": make_zeroshot(tiny, "<zs>", 4),
    }
    seeds: list[Seed] = []
    for name, c in concepts.items():
        path = save_concept(c, d / f"{name}.safetensors")
        seeds.append(Seed(name, "concept", ".safetensors", path.read_bytes()))
    for name, concept, fmt in (("a1111_ti", ti, "a1111"), ("diffusers_ti", ti, "diffusers"),
                               ("kohya_lora", concepts["lora"], "kohya"), ("diffusers_lora", concepts["lora"], "diffusers")):
        path = export_concept(concept, d / f"{name}.safetensors", fmt)
        seeds.append(Seed(name, "foreign", ".safetensors", Path(path).read_bytes()))
    pt = d / "a1111.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "pt", "step": 3}, pt)
    seeds.append(Seed("a1111_pt", "foreign", ".pt", pt.read_bytes()))

    # A real checkpoint after two AdamW steps (step-000001 stays pristine: the fallback).
    params, opt, rng = _ckpt_model()
    states, folder = {}, d / "ckpt"
    for step in (1, 2):
        torch.randn(5, generator=rng)
        loss = sum(((v - torch.randn(v.shape, generator=rng)) ** 2).sum() for v in params.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        save_checkpoint(folder, step, params, opt, rng, {"method": "fuzz"}, keep=0)
        states[step] = _state_of(params, opt, rng)
    seeds.append(Seed("checkpoint", "checkpoint", ".safetensors", (folder / "step-000002" / STATE).read_bytes()))
    for s in seeds:
        if s.suffix == ".safetensors":
            s.header, s.body = _split(s.data)
    return Corpus(seeds, states, (folder / "step-000001" / STATE).read_bytes())


# -- the mutator ---------------------------------------------------------------------------------------
def _pack(header: object, body: bytes, *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


SPECIAL_FLOATS = [float("nan"), float("inf"), -float("inf"), 3.3e38, -3.0e38, 1e5, -2e4, 65504.0, 1e-40]
DTYPES = ["F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "F64", "F16", "BF16", "F32", "U16",
          "U32", "U64", "F8_E4M3FNUZ", "XYZ", "f32", "", 7, None, ["F32"]]
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "C64": 8, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1}
BAD_NUMBERS = [-1, -(2 ** 63), 2 ** 64, 2 ** 70, 10 ** 30, 1.5, 2.0, "8", None, True, False, [], {}, [1]]
FORMATS = ["-1", "0", "١", "01", " 1", "1 ", "1.0", "2", "1e0", "+1", "１", "", "999999999999", "١٢", "x", "\u0661", "0x1"]
TOKENS = ['"<x>"', "[1]", '[["<x>"]]', '[""]', "{}", "[null]", "null", "[", '["<x>", 2]', _deep(5000, '"a"'),
          '["\\ud800"]', '["<x>", "<y>"]', "[true]", '{"a": "<x>"}', "1e999"]
JSONS = ["[]", '"x"', "1", "null", "true", "[1, 2]", _deep(100_000), '{"a": ' * 3000 + "1" + "}" * 3000, "{",
         '{"a": 1, "a": 2}', '{"\\ud800": 1}', '{"name": "\\udfff"}', "NaN", '{"x": NaN}', "1" * 5000]
STRENGTHS = ["nan", "inf", "-inf", "1e999", "abc", "١", "1.5.2", "-0.5", "1e308", "0x10", " 1", "٣", "1_0", "∞"]
STRINGS = ["\ud800", "a\udfffb", "\n", "x" * 10_000, "", "<x>\u0000", "\u202e"]


class Mutator:
    """Seeded mutations of one seed file; each returns (bytes, description)."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus

    def __call__(self, rng: random.Random, seed: Seed) -> tuple[bytes, str]:
        fams = [self.truncate, self.flip, self.random_bytes, self.splice]
        if seed.suffix == ".pt":
            fams += [self.pickle] * 4
        if seed.header is not None:
            fams += [self.header_text, self.entry, self.entry, self.dtype_lie, self.dtype_lie, self.shape_lie,
                     self.offsets, self.metadata, self.metadata, self.metadata, self.values, self.values,
                     self.big_claim, self.surrogate]
        return rng.choice(fams)(rng, seed)

    # byte-level
    def truncate(self, rng, seed):
        n = len(seed.data)
        cut = rng.randrange(min(n, 64 + rng.randrange(n))) if rng.random() < 0.4 else rng.randrange(n)
        return seed.data[:cut], f"truncate at {cut}/{n}"

    def flip(self, rng, seed):
        data = bytearray(seed.data)
        hlen = 8 + struct.unpack("<Q", seed.data[:8])[0] if seed.header is not None else len(data)
        spots = []
        for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
            i = rng.randrange(min(hlen, len(data))) if rng.random() < 0.6 else rng.randrange(len(data))
            data[i] ^= rng.randrange(1, 256)
            spots.append(i)
        return bytes(data), f"flip bytes {spots}"

    def random_bytes(self, rng, seed):
        k = rng.choice([0, 1, 7, 8, 9, 16, 100, 1000])
        junk = bytes(rng.randrange(256) for _ in range(k))
        if rng.random() < 0.5 and k:
            junk = struct.pack("<Q", rng.choice([k, k // 2, 2, 0, 2 ** 63, max(len(junk) - 8, 0)])) + junk
        return junk, f"random {len(junk)} bytes"

    def splice(self, rng, seed):
        other = rng.choice(self.corpus.seeds)
        if seed.header is None or other.header is None:
            cut = rng.randrange(len(seed.data))
            return seed.data[:cut] + other.data[rng.randrange(len(other.data)):], f"splice with {other.name}"
        if rng.random() < 0.5:
            return _pack(seed.header, other.body), f"header of {seed.name} + data of {other.name}"
        md = dict(other.header.get("__metadata__", {}))
        h = dict(seed.header)
        h["__metadata__"] = md
        return _pack(h, seed.body), f"metadata of {other.name}"

    def pickle(self, rng, seed):
        """A well-formed weights-only pickle with contents an importer does not expect."""
        import io

        t = rng.choice([torch.tensor(1.0), torch.zeros(2, 32, dtype=torch.int64), torch.zeros(2, 32, dtype=torch.bool),
                        torch.zeros(2, 32, dtype=torch.complex64), torch.zeros(0, 32), torch.zeros(2, 3, 4),
                        torch.full((2, 32), float("nan")), torch.full((1, 32), 3e38), torch.zeros(2, 32).half(),
                        torch.zeros(2, 32, dtype=torch.float64), torch.zeros(32), "x", 5, None, [torch.zeros(2)]])
        obj = rng.choice([{"string_to_param": {"*": t}, "name": rng.choice(["pt", 5, "", "a b", "\ud800"])},
                          {"string_to_param": rng.choice([[], {}, t, {"a": "b"}])}, {"emb_params": t},
                          {"clip_l": t, "clip_g": torch.zeros(1, 16)}, {"<t>_v0": torch.zeros(1, 32), "<t>_v1": t},
                          {"lora_unet_a.lora_down.weight": t, "lora_unet_a.lora_up.weight": torch.zeros(4, 1)},
                          {"tok": t}, {1: t}, [t], t, {"a": {"b": {"c": t}}}])
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue(), f"pickle {type(obj).__name__} of {type(t).__name__}"

    # header
    def header_text(self, rng, seed):
        raw = json.dumps(seed.header, separators=(",", ":")).encode()
        choice = rng.randrange(7)
        if choice == 0:
            raw = _deep(rng.choice([4, 50, 1000, 100_000])).encode()
        elif choice == 1:
            i = rng.randrange(len(raw))
            raw = raw[:i] + rng.choice([b"[", b"{", b"]", b"}", b'"', b",", b":", b"\\", b"\xff", b"\xed\xa0\x80",
                                        b"1", b"-", b"e", b" "]) + raw[i + 1:]
        elif choice == 2:  # a duplicated key (the first entry again, with other offsets)
            k = next(iter(seed.header))
            raw = raw[:-1] + b"," + json.dumps(k).encode() + b":" + json.dumps(seed.header[k]).encode() + b"}"
        elif choice == 3:
            raw = raw.replace(b"[", b"[" * rng.choice([2, 3, 500]), 1)
        elif choice == 4:
            raw = raw.replace(b'"data_offsets":[', b'"data_offsets":[' + rng.choice([b"Infinity,", b"1e400,", b"-0,",
                                                                                     b"NaN,", b"1e2,"]), 1)
        elif choice == 5:
            raw = b"\xef\xbb\xbf" + raw  # BOM
        else:
            raw = raw[: rng.randrange(len(raw))]
        return _pack(None, seed.body, raw=raw), f"header text #{choice}"

    def _pick(self, rng, seed) -> str:
        return rng.choice([k for k in seed.header if k != "__metadata__"])

    def entry(self, rng, seed):
        h = json.loads(json.dumps(seed.header))
        k = self._pick(rng, seed)
        what = rng.randrange(8)
        if what == 0:
            h[k] = rng.choice([None, [], "x", 1, [1, 2], {"dtype": "F32"}])
        elif what == 1:
            h[k]["extra"] = 1
        elif what == 2:
            del h[k][rng.choice(["dtype", "shape", "data_offsets"])]
        elif what == 3:
            h["__metadata__"] = rng.choice([[], "x", 1, None, {"a": 1}, {"a": ["b"]}, {"a": {"b": "c"}}, {"a": None}])
        elif what == 4:
            h[k]["shape"] = rng.choice(["2", {"a": 1}, [[2]], [2.0], [True], [-1], None, 3])
        elif what == 5:
            del h[k]  # a missing tensor: offsets no longer cover the data
        elif what == 6:
            h[rng.choice(["", "x" * 300, "a\nb", "rng", "param.x", "optim.x", "emb_params", "clip_l", "clip_g",
                          "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha",
                          "lora_te_b.alpha", "unet.a.lora_A.weight", "unet.a.lora_B.weight", "<t>_v0", "<t>_v1",
                          "ref.clip", "ref.", "neti.w", "perfusion.i_star", "zeroshot.mask"])] = h.pop(k)
        else:
            h[k]["data_offsets"] = rng.choice([None, "0,4", [0], [0, 1, 2], [1.5, 2], [True, False], {}])
        return _pack(h, seed.body), f"entry {k!r} mutation #{what}"

    def dtype_lie(self, rng, seed):
        h = json.loads(json.dumps(seed.header))
        k = self._pick(rng, seed)
        new = rng.choice(DTYPES)
        old = h[k]["dtype"]
        h[k]["dtype"] = new
        shape = h[k]["shape"]
        if rng.random() < 0.7 and isinstance(new, str) and new in SIZES and shape:
            nbytes = h[k]["data_offsets"][1] - h[k]["data_offsets"][0]  # keep sizes consistent: a believable lie
            if nbytes % SIZES[new] == 0:
                rest = math.prod(shape[:-1]) or 1
                last = nbytes // SIZES[new] // rest if (nbytes // SIZES[new]) % rest == 0 else None
                h[k]["shape"] = shape[:-1] + [last] if last is not None else [nbytes // SIZES[new]]
        return _pack(h, seed.body), f"dtype {k!r} {old} -> {new}"

    def shape_lie(self, rng, seed):
        h = json.loads(json.dumps(seed.header))
        k = self._pick(rng, seed)
        shape = list(h[k]["shape"])
        numel = math.prod(shape)
        what = rng.randrange(8)
        if what == 0:
            shape = []  # 0-d (size lie unless numel was 1)
        elif what == 6:
            shape = [1] * rng.choice([7, 9, 65, 200]) + shape  # more dims than torch (or any weight) has
        elif what == 7:
            shape = rng.choice([[0, 2 ** 40, 2 ** 40], [0, 2 ** 62], [2 ** 40, 0, 2 ** 30]])  # empty, huge strides
        elif what == 1:
            shape = [numel]  # flattened: same bytes
        elif what == 2:
            shape = [1] + shape  # an extra dim
        elif what == 3 and shape:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([0, shape[i] + 1, max(shape[i] - 1, 0), 2 ** 40, 2 ** 62])
        elif what == 4 and numel % 2 == 0 and numel:
            shape = [2, numel // 2] if rng.random() < 0.5 else [numel // 2, 2]
        else:
            shape = shape[::-1]
        h[k]["shape"] = shape
        return _pack(h, seed.body), f"shape {k!r} -> {shape}"

    def offsets(self, rng, seed):
        h = json.loads(json.dumps(seed.header))
        k = self._pick(rng, seed)
        a, b = h[k]["data_offsets"]
        other = h[self._pick(rng, seed)]["data_offsets"]
        h[k]["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a - 4, b], [a + 4, b + 4], list(other), [0, b - a],
                                           [a, 2 ** 64], [-4, b], [a, 2 ** 40], [2 ** 63, 2 ** 63 + b - a],
                                           [a, 10 ** 30], [len(seed.body), len(seed.body) + b - a]])
        return _pack(h, seed.body), f"offsets {k!r} {a, b} -> {h[k]['data_offsets']}"

    def metadata(self, rng, seed):
        h = json.loads(json.dumps(seed.header))
        md = h.setdefault("__metadata__", {})
        keys = list(md) or ["studio.format"]
        studio = {"studio.format": FORMATS, "studio.tokens": TOKENS, "studio.base": JSONS, "studio.train": JSONS,
                  "studio.metrics": JSONS, "studio.ref_model": JSONS + ['{"clip": 1}'], "studio.strength": STRENGTHS,
                  "studio.method": ["", "lora", "textual_inversion", "perfusion", "neti", "zeroshot", "x" * 1000,
                                    "__class__", "Lora"],
                  "studio.name": STRINGS, "studio.class_word": STRINGS,
                  "neti.config": JSONS + ['{"widths": [32], "layers": ["a"], "class_norms": [1.0], "hidden": 8.0}'],
                  "zeroshot.adapter": JSONS + ['{"source": 1}', '{"source": ""}'],
                  "zeroshot.layer_scales": JSONS + ['{"down": NaN}', "1e999"],
                  "perfusion.beta": STRENGTHS, "perfusion.tau": ["0", "-1"] + STRENGTHS,
                  "perfusion.locking": ["", "globl", "\ud800"],
                  "step": ["-1", "١", "abc", "", "99"], "param_groups": JSONS, "meta": JSONS, "checksum": ["", "sha256:0"],
                  "lora_adapter_metadata": JSONS}
        what = rng.randrange(5)
        if what <= 2:
            key = rng.choice([k for k in keys if k in studio] or keys)
            md[key] = rng.choice(studio.get(key, JSONS + STRINGS))
            desc = f"metadata {key} = {md[key][:40]!r}"
        elif what == 3:
            key = rng.choice(keys)
            md.pop(key, None)
            desc = f"metadata {key} removed"
        else:
            key = rng.choice(list(studio))
            md[key] = rng.choice(studio[key])
            desc = f"metadata {key} added = {md[key][:40]!r}"
        return _pack(h, seed.body), desc

    def values(self, rng, seed):
        k = self._pick(rng, seed)
        e = seed.header[k]
        a, b = e["data_offsets"]
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(e["dtype"])
        if dtype is None or a == b:
            return self.flip(rng, seed)
        body = bytearray(seed.body)
        t = torch.frombuffer(body[a:b], dtype=dtype).clone()
        v = rng.choice(SPECIAL_FLOATS)
        idx = rng.randrange(t.numel())
        t[idx] = v
        body[a:b] = t.view(torch.uint8).numpy().tobytes()
        return _pack(seed.header, bytes(body)), f"value {k!r}[{idx}] = {v}"

    def big_claim(self, rng, seed):
        h = json.loads(json.dumps(seed.header))
        k = self._pick(rng, seed)
        n = rng.choice([2 ** 28, 2 ** 30, 2 ** 40, 2 ** 61])
        h[k] = {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}
        if rng.random() < 0.5:
            h = {"__metadata__": h.get("__metadata__", {}), k: h[k]}
        return _pack(h, seed.body), f"claim {4 * n} bytes in {k!r}"

    def surrogate(self, rng, seed):
        h = json.loads(json.dumps(seed.header))
        k = self._pick(rng, seed)
        s = rng.choice(["\ud800", "\udc80", "x\udfff"])
        where = rng.randrange(3)
        if where == 0:
            h[k + s] = h.pop(k)
        else:
            md = h.setdefault("__metadata__", {})
            key = rng.choice(list(md) or ["studio.name"])
            if where == 1:
                md[key] = md.get(key, "") + s
            else:
                md[key + s] = md.pop(key, "")
        return _pack(h, seed.body), f"lone surrogate #{where}"


# -- the oracle ----------------------------------------------------------------------------------------
class Invalid(AssertionError):
    pass


def _one_line(err: BaseException, *names: str) -> None:
    msg = str(err)
    if not msg or "\n" in msg or "\r" in msg:
        raise Invalid(f"message not one line: {msg!r}")
    msg.encode("utf-8")  # printable on any terminal
    if names and not any(n in msg for n in names):
        raise Invalid(f"message does not name the file: {msg!r}")


def assert_valid(concept, scratch: Path) -> None:
    from studio.methods.neti import mapper_from_concept

    method = get_method(concept.method)
    method.validate(concept)
    every = dict(concept.tensors) | {f"ref.{k}": v for k, v in concept.refs.items()}
    for k, t in every.items():
        if t.dtype not in ALLOWED:
            raise Invalid(f"{k} is {t.dtype}")
        if t.ndim == 0 and not (concept.method == "lora" and k.endswith(".alpha")):
            raise Invalid(f"{k} is 0-d")
        if t.numel() and not (bool(torch.isfinite(t).all()) and float(t.abs().max()) <= MAX_ABS):
            raise Invalid(f"{k} holds non-finite or out-of-range values")
    if not concept.tokens or not all(isinstance(x, str) and x for x in concept.tokens):
        raise Invalid(f"tokens {concept.tokens!r}")
    for s in [concept.name, concept.class_word, *concept.tokens, *concept.meta, *concept.meta.values()]:
        s.encode("utf-8")
    if concept.strength is not None and not math.isfinite(concept.strength):
        raise Invalid("strength")
    if concept.method == "neti":
        mapper_from_concept(concept)
    back = load_concept(save_concept(concept, scratch / "resaved.safetensors"))
    if set(back.tensors) != set(concept.tensors):
        raise Invalid("does not round-trip")


@dataclass
class Tally:
    cases: int = 0
    accepted: int = 0
    refused: int = 0
    crashes: list = field(default_factory=list)
    invalid: list = field(default_factory=list)
    slowest: float = 0.0
    kinds: Counter = field(default_factory=Counter)

    def line(self) -> str:
        return (f"{self.cases} cases: {self.accepted} accepted (valid), {self.refused} refused with a StudioError, "
                f"{len(self.crashes)} crashes, {len(self.invalid)} invalid accepted; slowest case "
                f"{self.slowest:.2f} s; by seed {dict(self.kinds)}")


def _fresh_checkpoint_target():
    params, opt, rng = _ckpt_model()
    return params, opt, rng


def _same_state(params, opt, rng, want: CheckpointState) -> bool:
    got = _state_of(params, opt, rng)
    if got.params.keys() != want.params.keys() or not all(torch.equal(got.params[k], want.params[k]) for k in got.params):
        return False
    if not torch.equal(got.rng, want.rng) or got.optim["param_groups"] != want.optim["param_groups"]:
        return False
    for i, st in want.optim["state"].items():
        for k, v in st.items():
            g = got.optim["state"].get(i, {}).get(k)
            if not (torch.equal(g, v) if isinstance(v, torch.Tensor) else g == v):
                return False
    return True


def run_case(corpus: Corpus, seed: Seed, data: bytes, work: Path, tally: Tally) -> None:
    """One mutated file through every reader that takes it; raises Invalid for a wrong outcome."""
    if seed.kind == "checkpoint":
        folder = work / "ckpts"
        (folder / "step-000002").mkdir(parents=True, exist_ok=True)
        (folder / "step-000001").mkdir(parents=True, exist_ok=True)
        (folder / "step-000001" / STATE).write_bytes(corpus.pristine_step1)
        (folder / "step-000002" / STATE).write_bytes(data)
        ok = True
        try:
            params, opt, rng = _fresh_checkpoint_target()
            step, _ = load_checkpoint(folder / "step-000002", params, opt, rng)
            if step != 2 or not _same_state(params, opt, rng, corpus.states[2]):
                raise Invalid("a corrupt checkpoint was accepted (restored state differs)")
        except StudioError as err:
            _one_line(err, "step-000002")
            ok = False
        notes: list[str] = []
        found = resolve_resume("latest", folder, log=notes.append)
        want = 2 if ok else 1
        if found is None or found.name != f"step-{want:06d}" or (not ok and not notes):
            raise Invalid(f"resume latest chose {found} (notes {notes}) for a {'good' if ok else 'bad'} step 2")
        params, opt, rng = _fresh_checkpoint_target()
        load_checkpoint(found, params, opt, rng)
        if not _same_state(params, opt, rng, corpus.states[want]):
            raise Invalid("resume latest restored another state")
        if last_good_checkpoint(folder) != found:
            raise Invalid("last_good_checkpoint disagrees with resume latest")
        tally.accepted += ok
        tally.refused += not ok
        return

    lib = work / "lib"
    lib.mkdir(exist_ok=True)
    path = lib / f"case{seed.suffix}"
    path.write_bytes(data)
    loaded = None
    try:
        loaded = load_concept(path)
    except StudioError as err:
        _one_line(err, path.name)
    if loaded is not None:  # (a foreign file given a concept's metadata may well be a valid concept)
        assert_valid(loaded, work)
    if seed.suffix == ".safetensors":
        infos = Library(lib).list()
        if len(infos) != 1 or bool(infos[0].error) != (loaded is None):
            raise Invalid(f"the listing says {[(i.name, i.error) for i in infos]} but load_concept "
                          f"{'accepted' if loaded is not None else 'refused'} the file")
        if infos[0].error:
            _one_line(Exception(infos[0].error))
    imported = None
    try:
        imported = import_concept(path)
    except StudioError as err:
        _one_line(err, path.name)
    if imported is not None:
        assert_valid(imported, work)
    tally.accepted += loaded is not None or imported is not None
    tally.refused += loaded is None and imported is None


def fuzz(corpus: Corpus, n: int, base_seed: int, work: Path) -> Tally:
    tally = Tally()
    mutate = Mutator(corpus)
    for i in range(n):
        rng = random.Random(base_seed * 1_000_003 + i)
        seed = corpus.seeds[i % len(corpus.seeds)]
        data, desc = mutate(rng, seed)
        t0 = time.perf_counter()
        try:
            run_case(corpus, seed, data, work, tally)
        except Invalid as bad:
            tally.invalid.append(f"#{i} {seed.name} [{desc}]: {bad}")
        except Exception as err:  # noqa: BLE001 - what the fuzzer is looking for
            tally.crashes.append(f"#{i} {seed.name} [{desc}]: {type(err).__name__}: {str(err)[:300]}")
        tally.slowest = max(tally.slowest, time.perf_counter() - t0)
        tally.cases += 1
        tally.kinds[seed.name] += 1
    return tally


def _report(tally: Tally) -> str:
    return "\n".join([tally.line(), *tally.crashes[:15], *tally.invalid[:15]])


def test_seed_files_are_valid(corpus, tmp_path):
    tally = Tally()
    for seed in corpus.seeds:
        run_case(corpus, seed, seed.data, tmp_path, tally)
    assert tally.accepted == len(corpus.seeds) and tally.refused == 0


@pytest.mark.timeout(600)
def test_fuzz_every_reader(corpus, tmp_path):
    t0 = time.perf_counter()
    tally = fuzz(corpus, DEFAULT_CASES, base_seed=25, work=tmp_path)
    print(f"fuzz: {tally.line()} in {time.perf_counter() - t0:.1f} s")
    assert tally.cases >= 2000
    assert not tally.crashes and not tally.invalid, _report(tally)
    assert tally.slowest < MAX_CASE_SECONDS, _report(tally)
    assert tally.refused > tally.cases // 2  # the mutations do reach the checks


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_every_reader_long(corpus, tmp_path):
    t0 = time.perf_counter()
    tally = fuzz(corpus, SLOW_CASES, base_seed=2025, work=tmp_path)
    print(f"\nslow fuzz: {tally.line()} in {time.perf_counter() - t0:.1f} s")
    assert not tally.crashes and not tally.invalid, _report(tally)
    assert tally.slowest < MAX_CASE_SECONDS, _report(tally)


# -- the issue's findings, one by one ------------------------------------------------------------------
def _ti_file(path: Path, tensors_header: dict, body: bytes, **md: str) -> Path:
    meta = {"studio.format": "1", "studio.method": "textual_inversion", "studio.tokens": '["<x>"]'} | md
    path.write_bytes(_pack({"__metadata__": meta, **tensors_header}, body))
    return path


def _emb(dtype: str = "F32", shape=(1, 4), body: bytes | None = None) -> tuple[dict, bytes]:
    n = math.prod(shape) * SIZES[dtype]
    return {"emb_params": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, n]}}, body or bytes(n)


@pytest.mark.parametrize("case", [
    "nested_header", "metadata_list", "base_list", "infinite_offset", "fp8", "tokens_string", "tokens_nested",
    "surrogate_name", "surrogate_token", "int_embedding", "bool_embedding", "complex_embedding", "near_float_max",
    "version_minus_one", "version_zero", "version_arabic", "overlapping", "strength_nan",
])
def test_issue_findings_are_refused_in_one_line(tmp_path, case):
    p = tmp_path / "c.safetensors"
    head, body = _emb()
    if case == "nested_header":
        p.write_bytes(_pack(None, b"", raw=_deep(100_000).encode()))
    elif case == "metadata_list":
        p.write_bytes(_pack({"__metadata__": ["a"], **head}, body))
    elif case == "base_list":
        _ti_file(p, head, body, **{"studio.base": "[1]"})
    elif case == "infinite_offset":
        raw = json.dumps({"emb_params": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 1]}})
        p.write_bytes(_pack(None, body, raw=raw.replace("[0, 1]", "[0, Infinity]").encode()))
    elif case == "fp8":
        _ti_file(p, *_emb("F8_E4M3", (1, 16)))
    elif case == "tokens_string":
        _ti_file(p, head, body, **{"studio.tokens": '"<x>"'})
    elif case == "tokens_nested":
        _ti_file(p, head, body, **{"studio.tokens": '[["<x>"]]'})
    elif case == "surrogate_name":
        _ti_file(p, head, body, **{"studio.name": "\ud800"})
    elif case == "surrogate_token":
        _ti_file(p, head, body, **{"studio.tokens": '["\\udc80"]'})
    elif case == "int_embedding":
        _ti_file(p, *_emb("I64", (1, 4)))
    elif case == "bool_embedding":
        _ti_file(p, *_emb("BOOL", (1, 4)))
    elif case == "complex_embedding":
        _ti_file(p, *_emb("C64", (1, 4)))
    elif case == "near_float_max":
        _ti_file(p, *_emb(body=torch.full((1, 4), 3.0e38).numpy().tobytes()))
    elif case.startswith("version"):
        _ti_file(p, head, body, **{"studio.format": {"version_minus_one": "-1", "version_zero": "0",
                                                     "version_arabic": "١"}[case]})
    elif case == "overlapping":
        two = {"clip_l": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
               "clip_g": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]}}
        _ti_file(p, two, bytes(16))
    elif case == "strength_nan":
        _ti_file(p, head, body, **{"studio.strength": "nan"})
    for reader in (load_concept, import_concept):
        with pytest.raises(StudioError) as err:
            reader(p)
        _one_line(err.value, p.name)
    info = Library(tmp_path).info("c")
    assert info.error and "\n" not in info.error


@pytest.mark.parametrize("text", [b"[" * (8 << 20), b'"' + b"a" * (8 << 20), b'"\\' * (4 << 20), b"[]" * (4 << 20),
                                  b'"a' * (4 << 20), b'{"a":"' + b"\\" * (8 << 20)])
def test_the_header_scan_is_linear_on_adversarial_8_mib_headers(tmp_path, text):
    from studio.errors import ConceptFormatError
    from studio.safetensors_io import read_header

    p = tmp_path / "h.safetensors"
    p.write_bytes(_pack(None, b"", raw=b'{"k":' + text))
    t0 = time.perf_counter()
    with pytest.raises(ConceptFormatError):
        read_header(p)
    assert time.perf_counter() - t0 < 5  # a backtracking or per-character scan takes minutes here


def test_zero_d_lora_tensors_are_refused(tiny, tmp_path):
    from tests.method_cases import make_lora

    c = make_lora(tiny, "<lo>", 0, rank=1, text_encoder=False)
    down = next(k for k in c.tensors if k.endswith("lora_down.weight"))
    c.tensors[down] = torch.tensor(0.5)
    with pytest.raises(StudioError, match="lora_down"):
        save_concept(c, tmp_path / "l.safetensors")


def _checkpoint(folder: Path, steps=(1, 2)):
    params, opt, rng = _ckpt_model()
    for step in steps:
        loss = sum((v - 1).pow(2).sum() for v in params.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        save_checkpoint(folder, step, params, opt, rng, {"method": "x"}, keep=0)
    return params, opt, rng


def _rewrite(path: Path, edit) -> None:
    """Change a checkpoint's tensors / metadata and re-sign it (a checksum that matches)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path / STATE), framework="pt") as f:
        md, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, md)
    md["checksum"] = checksum(tensors, md)
    save_file(tensors, str(path / STATE), metadata=md)


def test_checkpoint_flipped_byte_is_refused_and_resume_falls_back(tmp_path):
    _checkpoint(tmp_path)
    state = tmp_path / "step-000002" / STATE
    data = bytearray(state.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight (or of the generator state)
    state.write_bytes(bytes(data))
    params, opt, rng = _ckpt_model()
    with pytest.raises(TrainingError, match="checksum") as err:
        load_checkpoint(tmp_path / "step-000002", params, opt, rng)
    _one_line(err.value, "step-000002")
    notes: list[str] = []
    assert resolve_resume("latest", tmp_path, log=notes.append) == tmp_path / "step-000001"
    assert len(notes) == 1 and "step-000002" in notes[0] and "falling back" in notes[0]
    assert load_checkpoint(tmp_path / "step-000001", params, opt, rng)[0] == 1


@pytest.mark.parametrize("drop", ["rng", "param_groups", "checksum", "step"])
def test_checkpoint_missing_parts_are_a_clear_error(tmp_path, drop):
    _checkpoint(tmp_path, steps=(1,))

    def edit(tensors, md):
        (tensors if drop == "rng" else md).pop(drop)

    _rewrite(tmp_path / "step-000001", edit)
    if drop == "checksum":  # _rewrite re-signs; take the signature away again
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(tmp_path / "step-000001" / STATE), framework="pt") as f:
            md, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        md.pop("checksum")
        save_file(tensors, str(tmp_path / "step-000001" / STATE), metadata=md)
    params, opt, rng = _ckpt_model()
    with pytest.raises(TrainingError, match="incomplete" if drop != "step" else "incomplete|step") as err:
        load_checkpoint(tmp_path / "step-000001", params, opt, rng)
    _one_line(err.value, "step-000001")
    with pytest.raises(TrainingError, match="No usable checkpoint"):
        resolve_resume("latest", tmp_path)
    assert torch.equal(params["emb"], torch.zeros(2, 8))  # nothing was applied


def test_nan_checkpoint_is_refused_and_never_named_good(tmp_path):
    params, opt, rng = _checkpoint(tmp_path, steps=(1, 2, 3))

    def poison(tensors, md):
        tensors["param.emb"][0, 0] = float("nan")

    _rewrite(tmp_path / "step-000003", poison)  # a NaN checkpoint with a matching checksum
    with pytest.raises(TrainingError, match="NaN"):
        read_checkpoint(tmp_path / "step-000003")
    assert last_good_checkpoint(tmp_path) == tmp_path / "step-000002"
    from trainers.loop import _last_good

    assert _last_good(tmp_path) == f"; the last good checkpoint is {tmp_path / 'step-000002'}"
    with torch.no_grad():
        params["emb"][0, 0] = float("nan")
    with pytest.raises(TrainingError, match="NaN"):
        save_checkpoint(tmp_path, 4, params, opt, rng, {}, keep=0)
    assert not (tmp_path / "step-000004").exists()


# -- memory: a huge claim is refused before allocation ---------------------------------------------------
_MEMORY_SCRIPT = r"""
import json, struct, sys
from pathlib import Path
import torch
from studio.errors import StudioError
from studio.library import Library
from studio.methods import import_concept, load_concept
from trainers.checkpoint import read_checkpoint


def peak_kb():  # the high-water mark of resident memory since the last reset
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])


d = Path(sys.argv[1])
Library(d).list()  # warm up every import the readers make
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM: what follows is measured from here
before = peak_kb()
errors = []
for name in ("small.safetensors", "sparse.safetensors"):
    for reader in (load_concept, import_concept):
        try:
            reader(d / name)
            errors.append("accepted")
        except StudioError as err:
            errors.append(str(err))
errors += [i.error for i in Library(d).list()]
try:
    read_checkpoint(d / "ckpt")
    errors.append("accepted")
except StudioError as err:
    errors.append(str(err))
after = peak_kb()
probe = torch.ones(32 << 20)  # 128 MiB touched: shows that the measurement sees an allocation
control = peak_kb()
print(json.dumps({"before_kb": before, "after_kb": after, "control_kb": control, "errors": errors}))
"""


def test_huge_tensor_claims_are_refused_before_allocation(tmp_path):
    """1 GiB claims (in a 200-byte file, and in a sparse 1 GiB file a TI may not be) are refused
    from the header: the peak resident memory (Linux VmHWM, reset first) grows by less than 64 MB."""
    gib = 1 << 30
    claim = {"emb_params": {"dtype": "F32", "shape": [1, gib // 4], "data_offsets": [0, gib]}}
    _ti_file(tmp_path / "small.safetensors", claim, bytes(64))  # a 1 GiB claim in a ~200-byte file
    sparse = _ti_file(tmp_path / "sparse.safetensors", claim, b"")  # a real, sparse 1 GiB data region
    with open(sparse, "r+b") as f:
        f.truncate(sparse.stat().st_size + gib)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / STATE).write_bytes(_pack({"__metadata__": {"step": "1"}, "rng": claim["emb_params"]}, bytes(8)))
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["errors"]) == 7 and "accepted" not in out["errors"], out["errors"]
    assert all(e and "\n" not in e for e in out["errors"])
    grew_mb = (out["after_kb"] - out["before_kb"]) / 1024
    assert grew_mb < 64, f"peak memory grew by {grew_mb:.0f} MB reading 1 GiB claims"
    assert (out["control_kb"] - out["after_kb"]) / 1024 > 100  # the probe's 128 MiB did show up


def test_training_resumes_from_the_previous_good_checkpoint_bit_identically(tiny, tmp_path):
    """End to end: the newest checkpoint is corrupted; ``resume latest`` says so, continues from the
    one before, and the result equals an uninterrupted run."""
    from PIL import Image

    from trainers import get_trainer
    from trainers.loop import TrainCallbacks
    from trainers.runner import train

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (200, 50 + 60 * i, 40)).save(images / f"{i}.png")
    entry = get_trainer("textual-inversion")

    def cfg(out, **kw):
        values = dict(images=str(images), out=str(out), class_word="cat", steps=4, batch_size=1, lr=5e-2, log_every=0,
                      seed=0)
        return entry.resolve(**(values | kw))

    full = train(entry, cfg(tmp_path / "full.safetensors"), tiny)
    part = tmp_path / "part.safetensors"
    train(entry, cfg(part, steps=3, checkpoint_every=1), tiny)  # checkpoints at steps 1 and 2
    newest = part.with_suffix(".checkpoints") / "step-000002" / STATE
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10
    newest.write_bytes(bytes(data))

    class Log(TrainCallbacks):
        lines: list[str] = []

        def on_log(self, message: str) -> None:
            self.lines.append(message)

    resumed = train(entry, cfg(part, resume="latest"), tiny, callbacks=Log())
    assert any("step-000002" in line and "falling back" in line for line in Log.lines), Log.lines
    assert any("resumed from" in line and "step-000001" in line for line in Log.lines), Log.lines
    assert torch.equal(load_concept(full.path).tensors["emb_params"], load_concept(resumed.path).tensors["emb_params"])
