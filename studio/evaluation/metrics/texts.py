"""Which text is scored: CLIP-T's prompt text and TI-CLIP's context text.

The number CLIP-T reports depends heavily on the text it scores (see docs/metrics.md), so the rule is
an explicit argument, :data:`TextMode`:

- ``"class_noun"`` (default): each trigger is replaced by its concept's class noun, and an
  immediately repeated class noun is collapsed, so DreamBench's ``"a <hrt> dog in the snow"`` (or
  ``"a sks dog ..."``) is scored as ``"a dog in the snow"``;
- ``"remove"``: each trigger is deleted (``"a dog in the snow"`` again, but ``"a photo of <hrt>"``
  becomes ``"a photo of"``);
- ``"keep"``: the prompt exactly as written (the trigger is text the scoring CLIP never learned).

A trigger written ``<name>`` also matches the composer's strength form ``<name:0.8>``; any other
trigger (``sks``) matches as a whole word.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Literal

TextMode = Literal["class_noun", "remove", "keep"]
TEXT_MODES: tuple[str, ...] = ("class_noun", "remove", "keep")

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_ARTICLE = r"(?i:a|an|the|my|our|your|this|that)"
_PLACEHOLDER = "\x00"
# Words and marks that join a concept phrase to the rest of a prompt.
_CONNECTOR = r"(?:,|&|(?<!\w)(?:and|plus|with|together with|next to|beside|alongside)(?!\w))"


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    """Regex matching ``trigger`` in a prompt (``<tok>`` also matches ``<tok:0.8>``)."""
    if len(trigger) > 2 and trigger.startswith("<") and trigger.endswith(">"):
        return re.compile(rf"<{re.escape(trigger[1:-1])}(?::\s*{_NUMBER}\s*)?>")
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)")


def mentions(prompt: str, trigger: str) -> bool:
    """Whether ``prompt`` contains ``trigger`` (in either form)."""
    return trigger_pattern(trigger).search(prompt) is not None


def _literal(text: str) -> Callable[[re.Match[str]], str]:
    """A ``re.sub`` replacement that inserts ``text`` as is (a string would have its backslashes read)."""
    return lambda _m: text


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip()


def clip_t_text(prompt: str, class_nouns: Mapping[str, str], mode: TextMode = "class_noun") -> str:
    """The text CLIP-T scores for an image generated from ``prompt``.

    Args:
        prompt: the generation prompt, e.g. ``"a <hrt:0.8> dog on the beach"``.
        class_nouns: trigger -> class noun for each concept that may appear, e.g. ``{"<hrt>": "dog"}``.
        mode: ``"class_noun"``, ``"remove"`` or ``"keep"`` (module docstring).

    Returns:
        e.g. ``"a dog on the beach"`` for ``mode="class_noun"``.
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"mode must be one of {TEXT_MODES}, got {mode!r}")
    if mode == "keep":
        return prompt
    text = prompt
    for trigger, noun in class_nouns.items():
        replacement = noun if mode == "class_noun" else ""
        text = trigger_pattern(trigger).sub(_literal(replacement), text)
        if mode == "class_noun" and noun.strip():
            word = re.escape(noun.strip())
            text = re.sub(rf"(?<!\w)({word})(?:\s+{word})+(?!\w)", r"\1", text, flags=re.IGNORECASE)
    return _tidy(text)


def context_text(prompt: str, class_nouns: Mapping[str, str]) -> str | None:
    """TI-CLIP's text: ``prompt`` with the concept objects removed (Gen4Gen §3.5, Eq. 4).

    Rule: each concept phrase — an optional article, the trigger, and its class noun when it
    directly follows (``"a <c1> cat"``) — is removed; phrases joined by ``,``/``and``/``with``/
    ``next to`` ... collapse into one gap, and the connectors touching a gap are dropped.
    ``"a <c1> cat and a <c2> dog on the beach"`` -> ``"on the beach"``;
    ``"a photo of <c1> cat, <c2> dog and a lamp"`` -> ``"a photo of a lamp"``.

    Returns:
        The context text, or ``None`` when nothing is left (the prompt only names the concepts).
    """
    text = prompt
    for trigger, noun in class_nouns.items():
        noun_part = rf"(?:\s+{re.escape(noun.strip())}(?!\w))?" if noun.strip() else ""
        pattern = rf"(?:(?<!\w){_ARTICLE}\s+)?{trigger_pattern(trigger).pattern}{noun_part}"
        text = re.sub(pattern, _PLACEHOLDER, text)
    gap, conn = _PLACEHOLDER, _CONNECTOR
    text = re.sub(rf"{gap}(?:\s*(?:{conn}\s*)*{gap})+", gap, text)  # adjacent phrases: one gap
    text = re.sub(rf"{gap}\s*(?:{conn}\s*)+", gap, text)  # "<gap> and a lamp" -> "<gap> a lamp"
    text = re.sub(rf"(?:\s*{conn})+\s*{gap}", gap, text)  # "playing with <gap>" -> "playing <gap>"
    text = _tidy(text.replace(gap, " "))
    text = _tidy(re.sub(rf"^(?:{conn}\s*)+|(?:\s*{conn})+$", "", text))
    return text if re.search(r"\w", text) else None
