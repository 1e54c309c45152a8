"""Prompts and protocols: named prompt lists, prompt files, and ``{}`` → each concept as its method was trained.

:func:`load_protocol` reads ``dreambench-object`` / ``dreambench-live`` (``assets/protocols/dreambench.json``,
built by ``scripts/build_protocols.py``) or ``world`` (the demo world's evaluation prompts);
:func:`build_prompts` names the concepts by trigger (:func:`subject`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.concept import Concept
from studio.errors import StudioError
from studio.methods import get_method
from studio.prompts import find_triggers

PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "assets" / "protocols"
PROTOCOLS = ("dreambench", "dreambench-object", "dreambench-live", "world")
# Prompts for several concepts when none are given: every prompt names all of them ({} = "a <a> cat and <b> dog").
MULTI_PROMPTS = ("a photo of {}", "{} on the beach", "{} in the snow", "{} in a living room")
# Held-out prompts scored during training (a DreamBench subset: places, and a change of colour).
TRAINING_PROMPTS = ("a {} in the jungle", "a {} in the snow", "a {} with a city in the background", "a red {}")


@dataclass(frozen=True)
class Protocol:
    """A named prompt list: ``templates`` hold ``{}`` where the concept goes."""

    name: str
    templates: tuple[str, ...]
    images_per_prompt: int = 4
    source: str = ""


def load_protocol(name: str, class_word: str = "") -> Protocol:
    """``dreambench-object`` / ``dreambench-live`` (25 prompts each, from ``assets/protocols/dreambench.json``),
    ``dreambench`` (live for a ``cat``/``dog`` class word, object otherwise, as in the paper) or
    ``world`` (the demo world's evaluation prompts)."""
    if name == "world":
        from studio.world import CONCEPT

        return Protocol("world", tuple(p.template for p in CONCEPT.eval_prompts), 4, "studio.world.CONCEPT")
    if name not in PROTOCOLS:
        raise StudioError(f"Unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}.")
    path = PROTOCOL_DIR / "dreambench.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise StudioError(f"The DreamBench protocol file {path} is unreadable ({err}); run "
                          "python scripts/build_protocols.py.") from None
    kind = name.removeprefix("dreambench-") if name != "dreambench" else (
        "live" if class_word.strip().lower() in data["live_classes"] else "object")
    return Protocol(f"dreambench-{kind}", tuple(data["prompts"][kind]), int(data["images_per_prompt"]), data["source"])


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (``{}`` = the concept, or literal triggers); blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise StudioError(f"Cannot read the prompt file {path} ({err}).") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise StudioError(f"The prompt file {path} holds no prompts (one per line, {{}} where the concept goes).")
    return prompts


def training_prompts(prompt_file: str | None, base: Any) -> list[str]:
    """Held-out templates for ``--eval-every``: the file's; else those of the base's protocol when it is
    not DreamBench (the world's on the demo world), else :data:`TRAINING_PROMPTS` (a DreamBench subset)."""
    if prompt_file:
        return read_prompt_file(prompt_file)
    protocol = base.profile.protocol
    if not protocol.startswith("dreambench"):
        return list(load_protocol(protocol).templates)
    return list(TRAINING_PROMPTS)


def subject(concept: Concept) -> str:
    """What ``{}`` becomes for one concept, as its method was trained: the trigger alone where it
    names the whole subject (textual inversion, NeTI, Perfusion: ``"a photo of <tok>"``), else
    ``"<trigger> class"`` (DreamBench's ``"sks dog"``)."""
    if concept.method and getattr(get_method(concept.method), "trigger_is_subject", False):
        return concept.trigger
    return f"{concept.trigger} {concept.class_word}".strip()


def build_prompts(templates: Sequence[str], concepts: Sequence[Concept]) -> list[str]:
    """Prompts naming the concepts by trigger: ``{}`` → every concept (joined by "and"), ``{0}``,
    ``{1}`` … → one each; a template already holding every trigger (in any written form: ``<tok:0.8>``,
    ``<tok@0-4>``) is kept. Duplicates are dropped."""
    joint = " and ".join(subject(c) for c in concepts)
    out: list[str] = []
    for template in templates:
        if "{}" in template:
            prompt = template.replace("{}", joint)
        elif re.search(r"\{\d+\}", template):
            try:
                prompt = template.format(*(subject(c) for c in concepts))
            except (IndexError, KeyError, ValueError):
                raise StudioError(f"Prompt {template!r} names a concept number that was not given "
                                  f"({len(concepts)} concept(s)).") from None
        else:
            prompt = template
        named = {use.token for use in find_triggers(prompt)}  # <tok>, <tok:0.8>, <tok@0-4> …
        missing = [c.trigger for c in concepts if c.trigger not in named and c.trigger not in prompt]
        if missing:
            raise StudioError(f"Prompt {template!r} does not name {', '.join(missing)}; write {{}} where the "
                              "concept goes.")
        if prompt not in out:
            out.append(prompt)
    return out


def dedupe_class(text: str, nouns: Sequence[str]) -> str:
    """``"a sks dog dog"`` → ``"a sks dog"`` (methods whose prompt text already carries the class noun)."""
    for noun in {n.strip() for n in nouns if n.strip()}:
        text = re.sub(rf"(?<!\w)({re.escape(noun)})(?:\s+{re.escape(noun)})+(?!\w)", r"\1", text)
    return text
