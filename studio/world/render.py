"""The world's renderer: attributes → a 32×32 RGB image, and attributes → a caption.

The world is a flat picture of one centred shape. Five attributes describe it completely:

========== ============================================== =============================
attribute  values                                         in a caption
========== ============================================== =============================
shape      circle, square, triangle, star                 the noun ("… circle")
colour     red, orange, yellow, green, blue, purple       adjective ("purple …")
pattern    plain, striped, dotted (white marks)           adjective ("dotted …")
background white, black, gray, pink, brown, teal          "on a pink background"
size       small, large                                   adjective ("small …")
========== ============================================== =============================

Rendering is deterministic: the same :class:`Attributes` and ``jitter`` seed give the same pixels
(PIL drawing at 4× supersampling, then a box filter down to 32×32). ``jitter`` moves the shape by
up to ±1.5 px and scales it by up to ±6 %, so that a world of renders is not a world of copies.
:func:`render_mask` draws the same geometry as the image's true subject mask (what automatic masks,
``python -m studio dataset mask``, are measured against: ``bench/dataset_masks.py``).

Why no position attribute: an earlier world placed the shape left/right/top/bottom too, and its
base model (trained on 2 CPU cores for < 1 hour) never learnt the position words — the oracle read
20 % correct, chance — while it learnt colour and background from the first thousand steps. The
UNet has to break the picture's symmetry from conv padding alone to obey "on the left"; big
models learn it from billions of images, ours could not. A centred shape also gives the shape
and its pattern every latent cell there is, which is what the concept's identity needs.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields

from PIL import Image, ImageDraw

RESOLUTION = 32
"""Side of every world image, in pixels."""

_SS = 4  # supersampling factor: draw at 128×128, box-filter to 32×32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 40),
    "green": (50, 165, 65),
    "blue": (45, 90, 225),
    "purple": (135, 60, 190),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (125, 125, 125),
    "pink": (245, 175, 200),
    "brown": (115, 75, 45),
    "teal": (30, 130, 135),
}
SIZES: tuple[str, ...] = ("small", "large")

PATTERN_RGB = (250, 250, 250)
_DIAMETER = {"small": 14.0, "large": 23.0}  # in output pixels

VOCABULARY: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
}
"""Every attribute and its values, in the order the oracle's heads use."""


@dataclass(frozen=True)
class Attributes:
    """A complete description of one world image."""

    shape: str
    colour: str
    pattern: str
    background: str
    size: str = "large"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value not in VOCABULARY[f.name]:
                raise ValueError(
                    f"unknown {f.name} {value!r}; the world knows {', '.join(VOCABULARY[f.name])}"
                )

    def replace(self, **changes: str) -> Attributes:
        return Attributes(**{**asdict(self), **changes})

    def index(self, name: str) -> int:
        """Position of this image's value of attribute ``name`` in ``VOCABULARY[name]``."""
        return VOCABULARY[name].index(getattr(self, name))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of ``shape`` inscribed in the circle (cx, cy, r); None for the circle itself."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.78  # a square of similar area to the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # upright equilateral triangle, centred on its centroid
        return [
            (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a)))
            for a in (90.0, 210.0, 330.0)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            a = math.radians(90.0 + 36.0 * k)
            points.append((cx + radius * math.cos(a), cy - radius * math.sin(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, cx: float, cy: float, r: float, side: int = RESOLUTION) -> Image.Image | None:
    """White marks in supersampled coordinates (mode "L", ``side·4`` square), or None for "plain".

    The marks scale with the shape and are coarse on purpose (legible through an 8×8 latent):
    "striped" is two horizontal bands, "dotted" four dots on a square around the centre.
    """
    if pattern == "plain":
        return None
    size = side * _SS
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    d = 2 * r * _SS  # diameter, supersampled
    x0, y0 = cx * _SS, cy * _SS
    if pattern == "striped":
        half = 0.085 * d  # band half-height
        for y in (y0 - 0.2 * d, y0 + 0.2 * d):
            draw.rectangle([x0 - d, y - half, x0 + d, y + half], fill=255)
    elif pattern == "dotted":
        dot = 0.11 * d  # dot radius
        for sx in (-1, 1):
            for sy in (-1, 1):
                x, y = x0 + sx * 0.2 * d, y0 + sy * 0.2 * d
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=255)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return mask


def _geometry(attributes: Attributes, jitter: int | None, side: int) -> tuple[float, float, float]:
    """The shape's centre and radius ``(cx, cy, r)`` in output pixels of a ``side``-px render."""
    unit = side / RESOLUTION  # output pixels per 32-px world pixel
    rng = random.Random(f"jitter/{jitter}")
    dx = dy = 0.0
    scale = 1.0
    if jitter is not None:
        dx, dy = rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)
        scale = rng.uniform(0.94, 1.06)
    r = _DIAMETER[attributes.size] / 2 * scale * unit
    return side / 2 + dx * unit, side / 2 + dy * unit, r


def _shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> Image.Image:
    """The shape's silhouette, supersampled: mode "L", ``side·4`` square, 255 inside, 0 outside."""
    size = side * _SS
    shape_mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(shape_mask)
    polygon = _shape_polygon(shape, cx * _SS, cy * _SS, r * _SS)
    if polygon is None:
        draw.ellipse([(cx - r) * _SS, (cy - r) * _SS, (cx + r) * _SS, (cy + r) * _SS], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    return shape_mask


def render(attributes: Attributes, jitter: int | None = 0, size: int = RESOLUTION) -> Image.Image:
    """Draw ``attributes`` as a ``size``×``size`` RGB image (32×32 by default).

    ``jitter`` seeds a small random offset (±1.5 px at 32 px) and scale (±6 %) of the shape; ``None``
    draws the canonical, unjittered image. Geometry scales with ``size`` (the second learnable base
    draws the same world at 48 px); at the default size the pixels are those the demo world was built
    on. The result depends only on the arguments.
    """
    side = size
    cx, cy, r = _geometry(attributes, jitter, side)

    size = side * _SS
    image = Image.new("RGB", (size, size), BACKGROUNDS[attributes.background])
    shape_mask = _shape_mask(attributes.shape, cx, cy, r, side)
    image.paste(COLOURS[attributes.colour], (0, 0, size, size), shape_mask)

    marks = _pattern_mask(attributes.pattern, cx, cy, r, side)
    if marks is not None:
        # marks only inside the shape
        inside = Image.new("L", (size, size), 0)
        inside.paste(marks, (0, 0), shape_mask)
        image.paste(PATTERN_RGB, (0, 0, size, size), inside)
    return image.resize((side, side), Image.Resampling.BOX)


def render_mask(attributes: Attributes, jitter: int | None = 0, size: int = RESOLUTION) -> Image.Image:
    """The true subject mask of ``render(attributes, jitter, size)``: a ``size``×``size`` mode "L" image.

    Same geometry as :func:`render` (the shape's silhouette at 4× supersampling, box-filtered), so each
    pixel holds the fraction of it the shape covers × 255: 255 inside, 0 on the background, anti-aliased
    at the edge like the render. The pattern's marks are part of the subject. Threshold at 128 for a
    binary mask; as it is, it is a ``name.mask.png`` sidecar the trainers read (white = subject).
    """
    side = size
    cx, cy, r = _geometry(attributes, jitter, side)
    return _shape_mask(attributes.shape, cx, cy, r, side).resize((side, side), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------------
# Sampling and captions
# ----------------------------------------------------------------------------------------------


def sample_attributes(rng: random.Random, **fixed: str) -> Attributes:
    """Uniformly random attributes; keywords in ``fixed`` pin attributes to given values."""
    values = {name: fixed.get(name) or rng.choice(options) for name, options in VOCABULARY.items()}
    return Attributes(**values)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(
    shape: str | None = None,
    colour: str | None = None,
    pattern: str | None = None,
    background: str | None = None,
    size: str | None = None,
    *,
    noun: str | None = None,
    prefix: str = "a photo of",
    article: str | None = None,
) -> str:
    """The world's caption grammar; ``None`` leaves an attribute unsaid.

    ``noun`` replaces the shape word (``"<hrt> circle"`` for a concept prompt); without a shape
    or noun the object is called "shape". ``article`` is the determiner ("the", "my", "" for
    none; default "a"/"an"). Example:
    ``describe("star", "red", "striped", "pink", "small")`` →
    ``"a photo of a small red striped star on a pink background"``.
    """
    words = [w for w in (size, colour, pattern) if w]
    words.append(noun or shape or "shape")
    phrase = " ".join(words)
    determiner = _article(phrase) if article is None else article
    head = f"{determiner} {phrase}" if determiner else phrase
    if prefix:
        head = f"{prefix} {head}"
    if not background:
        return head
    return f"{head} on {_article(background)} {background} background"


# Framing words that say nothing about the picture. Captions use them so that the text encoder
# learns to ignore them: textual-inversion templates ("a dark photo of {}", "a photo of my {}")
# then land on known, meaningless words instead of untrained token embeddings.
_PREFIXES = (
    "a photo of", "a picture of", "an image of", "a rendering of", "a close-up photo of",
    "a cropped photo of", "a bright photo of", "a dark photo of", "a good photo of",
    "a clean photo of", "a blurry photo of", "a nice photo of", "a snapshot of",
    "a studio photo of", "a drawing of", "",
)
_ARTICLES = ("the", "my", "one", "")


def caption(attributes: Attributes, rng: random.Random, p_drop: float = 0.25) -> str:
    """A random caption of ``attributes``: each attribute is said with probability 1 − p_drop.

    The base model learns that an unsaid attribute is free (uniformly random in the data), so
    prompts that leave the background unsaid draw any background.
    """
    said = {
        name: (getattr(attributes, name) if rng.random() >= p_drop else None)
        for name in VOCABULARY
    }
    article = rng.choice(_ARTICLES) if rng.random() < 0.3 else None
    return describe(
        **said,
        prefix=rng.choice(_PREFIXES),
        article=article,
    )
