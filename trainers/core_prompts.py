"""CoRe's context prompts (docs/methods.md, "CoRe"): templates with ``{}`` where the concept — or, for
the reference, its class word — goes, and words **after** it. CLIP's text encoders are causal, so
only the tokens after the concept can be changed by its embedding; every template here has some.

Two sets, chosen per base by :func:`trainers.core.context_prompts`:

* :data:`GENERIC_PROMPTS` — our own English wording of everyday contexts (places, weather, actions,
  styles), for CLIP-vocabulary bases (Stable Diffusion 1/2, SDXL);
* :func:`world_prompts` — the demo world's caption grammar (:func:`studio.world.render.describe`):
  the only contexts its small text encoder was trained on, so the regulariser compares words the
  encoder knows (on a generic set it would compare its untrained rows).
"""

from __future__ import annotations

GENERIC_PROMPTS: tuple[str, ...] = (
    "a photo of a {} in the jungle",
    "a photo of a {} in the snow",
    "a photo of a {} on the beach",
    "a photo of a {} on a cobblestone street",
    "a photo of a {} on top of pink fabric",
    "a photo of a {} on top of a wooden floor",
    "a photo of a {} with a city in the background",
    "a photo of a {} with a mountain in the background",
    "a photo of a {} with a blue house in the background",
    "a photo of a {} on top of a purple rug in a forest",
    "a photo of a {} with a wheat field in the background",
    "a photo of a {} with a tree and autumn leaves in the background",
    "a photo of a {} with the eiffel tower in the background",
    "a photo of a {} floating on top of water",
    "a photo of a {} floating in an ocean of milk",
    "a photo of a {} on top of green grass with sunflowers around it",
    "a photo of a {} on top of a mirror",
    "a photo of a {} on top of the sidewalk in a crowded street",
    "a photo of a {} on top of a dirt road",
    "a photo of a {} on top of a white rug",
    "a photo of a red {} on a table",
    "a photo of a shiny {} at night",
    "a photo of a wet {} in the rain",
    "a photo of a {} under a starry sky",
    "a photo of a {} in a desert at sunset",
    "a photo of a {} next to a river",
    "a photo of a {} inside a kitchen",
    "a photo of a {} in a living room",
    "a photo of a {} on a bookshelf",
    "a photo of a {} in a garden full of flowers",
    "a photo of a {} on a snowy mountain top",
    "a photo of a {} in a busy market",
    "a photo of a {} in front of a brick wall",
    "a photo of a {} in a field of tulips",
    "a photo of a {} by a campfire",
    "a photo of a {} on a boat at sea",
    "a photo of a {} in a subway station",
    "a photo of a {} in a library",
    "a photo of a {} on the moon",
    "a photo of a {} in fog",
    "a close-up photo of a {} with soft lighting",
    "a close-up photo of a {} on a marble counter",
    "a painting of a {} in the style of van gogh",
    "a watercolor painting of a {} by a lake",
    "an oil painting of a {} in a golden frame",
    "a pencil sketch of a {} on paper",
    "a cartoon drawing of a {} with bright colors",
    "a pixel art image of a {} in a video game",
    "a 3d render of a {} in a studio",
    "a black and white photo of a {} in an old town",
    "a {} wearing a red hat",
    "a {} wearing sunglasses",
    "a {} in a chef outfit",
    "a {} in a police outfit",
    "a {} made of lego",
    "a {} made of gold",
    "a {} carved out of wood",
    "a {} seen from above",
    "a {} seen from the side",
    "a {} in the style of a stained glass window",
    "a {} next to a cup of coffee",
    "a {} next to a small dog",
    "a {} surrounded by balloons",
    "a {} under an umbrella",
    "a {} in a cardboard box",
    "a {} on a wooden chair",
    "a {} on a bed with white sheets",
    "a {} in a snow globe",
    "a {} at a birthday party",
    "a {} in a spaceship",
)
"""Everyday contexts in our own words, one ``{}`` each, always with words after it."""

_WORLD_PREFIXES = ("a photo of", "a picture of", "an image of", "a rendering of", "a snapshot of", "")


def world_prompts() -> tuple[str, ...]:
    """The demo world's contexts in its caption grammar: every background after the subject, with
    several framing words, and the size words before it (``"a photo of a {} on a teal background"``,
    ``"a photo of a small {} on a pink background"``)."""
    from studio.world.render import VOCABULARY, describe

    out = [describe(noun="{}", background=bg, prefix=prefix)
           for bg in VOCABULARY["background"] for prefix in _WORLD_PREFIXES]
    out += [describe(noun="{}", size=size, background=bg) for size in VOCABULARY["size"] for bg in VOCABULARY["background"]]
    return tuple(out)
