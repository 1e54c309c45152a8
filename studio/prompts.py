"""Trigger tokens in prompts: ``<tok>`` or ``<tok:0.8>`` (a strength inside the brackets), and
``FILE:0.8`` concept specs (the suffix after the last colon, when it is a number)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from studio.errors import StudioError

TRIGGER = re.compile(r"<(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?::(?P<strength>[-+]?\d*\.?\d+))?>")
MAX_STRENGTH = 2.0


@dataclass(frozen=True)
class TriggerUse:
    token: str  # with brackets, as the concept stores it: "<hrt>"
    strength: float | None
    start: int
    end: int


def normalize_token(token: str) -> str:
    """``hrt`` or ``<hrt>`` → ``<hrt>``; refuses characters a prompt could not carry."""
    name = token.strip()
    if name.startswith("<") and name.endswith(">"):
        name = name[1:-1]
    if not TRIGGER.fullmatch(f"<{name}>") or ":" in name:
        raise StudioError(f"Token {token!r} is not valid; use letters, digits, '_', '-' or '.', e.g. <my-dog>.")
    return f"<{name}>"


def find_triggers(prompt: str) -> list[TriggerUse]:
    uses = []
    for m in TRIGGER.finditer(prompt):
        s = m.group("strength")
        strength = None if s is None else check_strength(float(s), where=m.group(0))
        uses.append(TriggerUse(f"<{m.group('name')}>", strength, m.start(), m.end()))
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


def split_concept_spec(spec: str) -> tuple[str, float | None]:
    """``dog.safetensors:0.8`` → ``("dog.safetensors", 0.8)``; ``dog`` → ``("dog", None)``."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, check_strength(float(tail), where=spec)
        except ValueError:
            pass
    return spec, None
