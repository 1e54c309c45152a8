"""Prompt templates for concept training (our own wording). ``{}`` is the concept's text —
its trigger tokens, followed by the class word where the method uses one.

Unlike the original textual-inversion list, no template says "small" or "large": a template is
paired with every photo, so it would claim a size the photo may not have and teach the concept to
override size words (in the learnable world, training on large photos with "a photo of a small
<tok>" made "a small <tok>" render large)."""

from collections.abc import Sequence

OBJECT_TEMPLATES = [
    "a photo of {}", "a close-up photo of {}", "a cropped photo of {}", "a bright photo of {}",
    "a dark photo of {}", "a good photo of {}", "a photo of the {}", "a photo of one {}",
    "a rendering of {}", "a picture of {}",
    "an image of {}", "a clean photo of {}", "a blurry photo of {}", "a nice photo of {}",
    "a photo of my {}", "a snapshot of {}", "{}", "a studio photo of {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
    "an illustration in the style of {}", "a drawing in the style of {}", "artwork in the style of {}",
    "a landscape in the style of {}", "a portrait in the style of {}", "an image in the style of {}",
    "a still life in the style of {}",
]

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def fill_templates(templates: Sequence[str], captions: Sequence[str | None], token: str, text: str) -> list[str]:
    """The training prompt of each sample: its template with ``text`` (the concept's prompt text,
    e.g. ``"<tok> <tok>#1"`` or ``"sks dog"``) in place of ``{}``. A caption that names ``token`` is
    used instead (``token`` → ``text``); any other caption is appended after a comma."""
    out = []
    for template, caption in zip(templates, captions):
        prompt = template.format(text)
        if caption:
            prompt = caption.replace(token, text) if token in caption else f"{prompt}, {caption}"
        out.append(prompt)
    return out

