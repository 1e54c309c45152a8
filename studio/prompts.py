"""Trigger tokens in prompts: ``<tok>`` or ``<tok:0.8>`` (a strength inside the brackets), and
``FILE:0.8`` concept specs (the suffix after the last colon, when it is a number).

**Per-stage strengths** (concepts with denoising stages — ProSpect): stage 0 is the noisiest part of
sampling (the first steps: layout), the last stage the least noisy (the final steps: detail, material).

* ``<tok@0-3>`` — on at stages 0…3 at the concept's strength (``--concept FILE:s``, else its
  recommended one, else 1), off (strength 0) at every other stage; ``<tok@0-3:0.8>`` at 0.8;
  stages and ranges combine: ``<tok@0,2,5-9>``;
* ``<tok:1,1,1,0.5,0,0,0,0,0,0>`` — one strength per stage (as many as the concept has stages).

The same suffixes work on ``--concept`` specs: ``FILE@5-9``, ``FILE@5-9:0.8``, ``FILE:1,1,0.5,…``.
A strength written in the prompt replaces the whole ``--concept`` spec of its token. Methods
without stages refuse both forms."""

from __future__ import annotations

import re
from dataclasses import dataclass

from studio.errors import StudioError

_NUMBER = r"[-+]?\d*\.?\d+"
_STAGES = r"\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*"
TRIGGER = re.compile(r"<(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)"
                     rf"(?:@(?P<stages>{_STAGES}))?(?::(?P<strength>{_NUMBER}(?:,{_NUMBER})*))?>")
SPEC_SUFFIX = re.compile(rf"(?:@(?P<stages>{_STAGES}))?(?::(?P<strength>{_NUMBER}(?:,{_NUMBER})*))?")
MAX_STRENGTH = 2.0
MAX_STAGES = 1000


@dataclass(frozen=True)
class StageStrengths:
    """Per-stage strengths as written (see the module doc): ``values`` — one strength per stage
    (``<tok:1,1,0.5,…>``), or ``on`` — the stages that take the concept's strength (``<tok@0-3>``),
    all others 0. Exactly one of the two is set."""

    values: tuple[float, ...] | None = None
    on: tuple[int, ...] | None = None

    def resolve(self, n_stages: int, strength: float, *, where: str = "strength") -> tuple[float, ...]:
        """One strength per stage (``n_stages`` of them); ``strength`` is what the ``on`` stages get."""
        if self.values is not None:
            if len(self.values) != n_stages:
                raise StudioError(f"{where}: {len(self.values)} per-stage strengths for a concept with {n_stages} "
                                  f"stages; give {n_stages} comma-separated values (stage 0 = the noisiest) or "
                                  "select stages with @, e.g. @0-3.")
            return self.values
        on = set(self.on or ())
        beyond = sorted(i for i in on if i >= n_stages)
        if beyond:
            raise StudioError(f"{where}: stage {beyond[0]} does not exist; this concept has stages 0-{n_stages - 1}.")
        return tuple(strength if i in on else 0.0 for i in range(n_stages))

    def __str__(self) -> str:
        """As written in a prompt after the token's name: ``@0-3,7`` or ``:1,0.5,0``."""
        if self.values is not None:
            return ":" + ",".join(f"{v:g}" for v in self.values)
        runs: list[list[int]] = []
        for i in sorted(set(self.on or ())):
            if runs and i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        return "@" + ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class TriggerUse:
    token: str  # with brackets, as the concept stores it: "<hrt>"
    strength: float | None
    start: int
    end: int
    stages: StageStrengths | None = None  # per-stage strengths (<tok@0-3>, <tok:1,0.5,…>)


def parse_strengths(stages: str | None, strength: str | None, *, where: str
                    ) -> tuple[float | None, StageStrengths | None]:
    """The ``@STAGES`` and ``:S`` / ``:S0,S1,…`` parts of a trigger or concept spec (already matched by
    :data:`SPEC_SUFFIX`) → ``(strength, per-stage strengths)``."""
    values = [] if strength is None else [check_strength(float(v), where=where) for v in strength.split(",")]
    if stages is None:
        if len(values) > 1:
            return None, StageStrengths(values=tuple(values))
        return (values[0] if values else None), None
    if len(values) > 1:
        raise StudioError(f"{where}: give either stages with one strength (@0-3:0.8) or one strength per stage "
                          "(:1,1,0.5,…), not both.")
    on: set[int] = set()
    for part in stages.split(","):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if a > b or b >= MAX_STAGES:
            raise StudioError(f"{where}: stage range {part} is not valid; write low-high with low ≤ high, "
                              "e.g. @0-3 (stage 0 = the noisiest).")
        on.update(range(a, b + 1))
    return (values[0] if values else None), StageStrengths(on=tuple(sorted(on)))


def normalize_token(token: str) -> str:
    """``hrt`` or ``<hrt>`` → ``<hrt>``; refuses characters a prompt could not carry."""
    name = token.strip()
    if name.startswith("<") and name.endswith(">"):
        name = name[1:-1]
    if not TRIGGER.fullmatch(f"<{name}>") or ":" in name or "@" in name:
        raise StudioError(f"Token {token!r} is not valid; use letters, digits, '_', '-' or '.', e.g. <my-dog>.")
    return f"<{name}>"


def find_triggers(prompt: str) -> list[TriggerUse]:
    uses = []
    for m in TRIGGER.finditer(prompt):
        strength, stages = parse_strengths(m.group("stages"), m.group("strength"), where=m.group(0))
        uses.append(TriggerUse(f"<{m.group('name')}>", strength, m.start(), m.end(), stages))
    return uses


def rewrite(prompt: str, replacement: dict[str, str]) -> str:
    """Replace every trigger use by ``replacement[token]``; unknown tokens are an error."""
    out, pos = [], 0
    for use in find_triggers(prompt):
        if use.token not in replacement:
            known = ", ".join(sorted(replacement)) or "none (add one with --concept FILE)"
            raise StudioError(f"Unknown token {use.token} in the prompt; the loaded concepts are: {known}.")
        out += [prompt[pos:use.start], replacement[use.token]]
        pos = use.end
    out.append(prompt[pos:])
    return re.sub(r"\s{2,}", " ", "".join(out)).strip()


def check_strength(value: float, *, where: str = "strength") -> float:
    if not (0.0 <= value <= MAX_STRENGTH):
        raise StudioError(f"{where}: strength must be between 0 and {MAX_STRENGTH}, got {value}.")
    return value


def parse_concept_spec(spec: str) -> tuple[str, float | None, StageStrengths | None]:
    """``dog.safetensors:0.8`` → ``("dog.safetensors", 0.8, None)``; ``a.safetensors@5-9`` →
    ``("a.safetensors", None, StageStrengths(on=(5, …, 9)))``; ``a:1,1,0`` → one strength per stage.
    A suffix that does not parse is part of the name (``C:\\x.safetensors``)."""
    for cut in (spec.rfind("@"), spec.rfind(":")):
        m = SPEC_SUFFIX.fullmatch(spec[cut:]) if cut > 0 else None
        if m and (m.group("stages") or m.group("strength")):
            strength, stages = parse_strengths(m.group("stages"), m.group("strength"), where=spec)
            return spec[:cut], strength, stages
    return spec, None, None


def split_concept_spec(spec: str) -> tuple[str, float | None]:
    """``dog.safetensors:0.8`` → ``("dog.safetensors", 0.8)``; ``dog`` → ``("dog", None)``."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, check_strength(float(tail), where=spec)
        except ValueError:
            pass
    return spec, None
