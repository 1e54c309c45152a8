"""The scene world: two objects in one picture — a shape inside a frame — for multi-concept methods.

The learnable world (:mod:`studio.world.render`) draws one centred shape, so it cannot show a method
that learns several concepts from one image, one per masked region (Break-A-Scene). A *scene* is
48×48 px:

* the **band** — the outer 8 px — is either a *frame* (a colour of the world's ``COLOURS``; plain,
  striped (white bars across the band) or dotted (white dots along it)) or just the background;
* the **interior** — the centre 32×32 — is exactly the world's render
  (:func:`studio.world.render.render`: shape, colour, pattern, background, size, jitter), or, with no
  shape, the background alone.

Why a frame rather than two shapes side by side: a base trained on 2 CPU cores for under an hour
never learnt position words (see :mod:`studio.world.render`); a frame and an interior are told apart
by where they are with no word for it, and a conv net finds the picture's border from its padding.

Captions extend the world's grammar: ``"a large purple dotted circle on a pink background in an orange
striped frame"``, ``"an orange striped frame on a pink background"`` (empty interior), or the world's
own caption (no frame). :data:`SCENE_TASK` holds two concepts the scene base never saw — the world's
purple dotted circle and a yellow dotted frame — with their training photos (both in one picture, a
mask each: :func:`scene_photos`) and evaluation prompts; :func:`read_scene` / :func:`score_scene`
read generations with the world's oracle (on the interior) and the scene oracle (on the whole
picture: frame, frame colour and pattern, background, is there a shape).

The scene base (``scripts/build_world.py --variant world-scene``) is committed in
``studio/assets/world_scene/``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from studio.errors import StudioError
from studio.world.oracle import Oracle, load_checkpoint, load_oracle, to_tensor
from studio.world.render import (
    _PREFIXES,
    BACKGROUNDS,
    COLOURS,
    PATTERN_RGB,
    PATTERNS,
    RESOLUTION,
    VOCABULARY,
    Attributes,
    _article,
    describe,
    render,
    render_mask,
    sample_attributes,
)

SCENE_RESOLUTION = 48
"""Side of every scene image, in pixels."""
BAND = (SCENE_RESOLUTION - RESOLUTION) // 2
"""Width of the outer band (the frame's place), in pixels: 8."""
INTERIOR = (BAND, BAND, BAND + RESOLUTION, BAND + RESOLUTION)
"""The interior's box ``(left, top, right, bottom)`` in scene pixels: the world's 32×32 render."""

_SS = 4  # supersampling of the frame's marks
_PERIOD = 8.0  # spacing of the frame's bars and dots along the band, in scene pixels
_BAR = 4.0  # width of a striped frame's white bars
_DOT = 2.2  # radius of a dotted frame's white dots

SCENE_DIR = Path(__file__).resolve().parents[1] / "assets" / "world_scene"
SCENE_ORACLE_PATH = SCENE_DIR / "scene_oracle.safetensors"

SCENE_VOCABULARY: dict[str, tuple[str, ...]] = {
    "frame": ("none", "frame"),
    "frame_colour": tuple(COLOURS),
    "frame_pattern": PATTERNS,
    "background": tuple(BACKGROUNDS),
    "inner": ("empty", "shape"),
}
"""The scene oracle's heads and their values (``frame_colour``/``frame_pattern`` mean something only
where there is a frame)."""


@dataclass(frozen=True)
class Frame:
    """A frame: its colour (one of the world's ``COLOURS``) and pattern (plain, striped, dotted)."""

    colour: str
    pattern: str = "plain"

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown frame colour {self.colour!r}; the world knows {', '.join(COLOURS)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown frame pattern {self.pattern!r}; the world knows {', '.join(PATTERNS)}")

    def words(self) -> str:
        """``"yellow dotted frame"``."""
        return f"{self.colour} {self.pattern} frame"


@dataclass(frozen=True)
class SceneAttributes:
    """A complete description of one scene: a background, a shape (or none), a frame (or none).

    ``shape`` is the interior's world :class:`~studio.world.render.Attributes`; its ``background`` is
    the scene's. A scene has a shape, a frame or both.
    """

    background: str
    shape: Attributes | None = None
    frame: Frame | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; the world knows {', '.join(BACKGROUNDS)}")
        if self.shape is None and self.frame is None:
            raise ValueError("a scene needs a shape, a frame or both")
        if self.shape is not None and self.shape.background != self.background:
            raise ValueError(
                f"the shape's background {self.shape.background!r} is not the scene's {self.background!r}"
            )

    @classmethod
    def of(cls, shape: Attributes | None = None, frame: Frame | None = None, background: str | None = None
           ) -> SceneAttributes:
        """A scene from its parts; the background defaults to the shape's."""
        if background is None:
            if shape is None:
                raise ValueError("a scene without a shape needs its background")
            background = shape.background
        elif shape is not None:
            shape = shape.replace(background=background)
        return cls(background=background, shape=shape, frame=frame)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _band_box_mask() -> Image.Image:
    """The band, supersampled: mode "L", 192×192, 255 in the outer 8 px (scene pixels), 0 inside."""
    size = SCENE_RESOLUTION * _SS
    mask = Image.new("L", (size, size), 255)
    ImageDraw.Draw(mask).rectangle([BAND * _SS, BAND * _SS, (BAND + RESOLUTION) * _SS - 1,
                                    (BAND + RESOLUTION) * _SS - 1], fill=0)
    return mask


def _frame_offset(jitter: int | None) -> tuple[float, float]:
    """The frame marks' shift along the band ``(dx, dy)``, scene pixels (±1.5, like the shape's jitter)."""
    if jitter is None:
        return 0.0, 0.0
    rng = random.Random(f"frame-jitter/{jitter}")
    return rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)


def _frame_marks(pattern: str, jitter: int | None) -> Image.Image | None:
    """The frame's white marks, supersampled (mode "L", 192×192), clipped to the band; None for "plain".

    "striped": bars ``_BAR`` px wide across the band, every ``_PERIOD`` px along it; "dotted": dots of
    radius ``_DOT`` px on the band's centre line, every ``_PERIOD`` px. Both are laid on a grid centred
    on the picture and shifted by the jitter, coarse enough to survive a 4-px-per-cell latent.
    """
    if pattern == "plain":
        return None
    side = SCENE_RESOLUTION * _SS
    dx, dy = _frame_offset(jitter)
    centre = SCENE_RESOLUTION / 2
    marks = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(marks)
    n = int(SCENE_RESOLUTION // _PERIOD) + 2
    steps = [centre + _PERIOD * (k + 0.5) for k in range(-n, n)]
    if pattern == "striped":
        h = _BAR / 2
        for x in steps:  # bars across the top and bottom sides
            x += dx
            for y0, y1 in ((0, BAND), (SCENE_RESOLUTION - BAND, SCENE_RESOLUTION)):
                draw.rectangle([(x - h) * _SS, y0 * _SS, (x + h) * _SS - 1, y1 * _SS - 1], fill=255)
        for y in steps:  # and across the left and right sides, between the corners
            y += dy
            for x0, x1 in ((0, BAND), (SCENE_RESOLUTION - BAND, SCENE_RESOLUTION)):
                y_lo, y_hi = max(y - h, BAND), min(y + h, SCENE_RESOLUTION - BAND)
                if y_hi > y_lo:
                    draw.rectangle([x0 * _SS, y_lo * _SS, x1 * _SS - 1, y_hi * _SS - 1], fill=255)
    elif pattern == "dotted":
        r = _DOT
        line = (BAND / 2, SCENE_RESOLUTION - BAND / 2)
        for x in steps:
            for y in line:
                draw.ellipse([(x + dx - r) * _SS, (y - r) * _SS, (x + dx + r) * _SS, (y + r) * _SS], fill=255)
        for y in steps:
            if not BAND + r <= y + dy <= SCENE_RESOLUTION - BAND - r:
                continue  # the corners belong to the top and bottom rows
            for x in line:
                draw.ellipse([(x - r) * _SS, (y + dy - r) * _SS, (x + r) * _SS, (y + dy + r) * _SS], fill=255)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    clipped = Image.new("L", (side, side), 0)
    clipped.paste(marks, (0, 0), _band_box_mask())
    return clipped


def render_scene(attributes: SceneAttributes, jitter: int | None = 0) -> Image.Image:
    """Draw ``attributes`` as a 48×48 RGB image.

    The interior (``INTERIOR``, 32×32) is ``render(attributes.shape, jitter)`` pixel for pixel, or the
    background when there is no shape; the band is the frame (its colour, white marks shifted by the
    jitter) or the background. Deterministic: the result depends only on the arguments.
    """
    side = SCENE_RESOLUTION * _SS
    big = Image.new("RGB", (side, side), BACKGROUNDS[attributes.background])
    frame = attributes.frame
    if frame is not None:
        big.paste(COLOURS[frame.colour], (0, 0, side, side), _band_box_mask())
        marks = _frame_marks(frame.pattern, jitter)
        if marks is not None:
            big.paste(PATTERN_RGB, (0, 0, side, side), marks)
    image = big.resize((SCENE_RESOLUTION, SCENE_RESOLUTION), Image.Resampling.BOX)
    if attributes.shape is not None:
        image.paste(render(attributes.shape, jitter=jitter), INTERIOR[:2])
    return image


def band_mask() -> Image.Image:
    """The band's mask: a 48×48 mode "L" image, 255 in the outer 8 px, 0 in the interior."""
    return _band_box_mask().resize((SCENE_RESOLUTION, SCENE_RESOLUTION), Image.Resampling.BOX)


def scene_masks(attributes: SceneAttributes, jitter: int | None = 0) -> dict[str, Image.Image]:
    """The true mask of each object of ``render_scene(attributes, jitter)``: 48×48 mode "L" images.

    ``"shape"`` (when there is one): the world's :func:`~studio.world.render.render_mask` placed in
    the interior (anti-aliased at the edge, marks included); ``"frame"`` (when there is one): the band.
    Keys are the names of :data:`SCENE_TASK`'s concepts; threshold at 128 for binary masks.
    """
    masks: dict[str, Image.Image] = {}
    if attributes.shape is not None:
        mask = Image.new("L", (SCENE_RESOLUTION, SCENE_RESOLUTION), 0)
        mask.paste(render_mask(attributes.shape, jitter=jitter), INTERIOR[:2])
        masks["shape"] = mask
    if attributes.frame is not None:
        masks["frame"] = band_mask()
    return masks


def interior(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The 32×32 interior of each scene (box-resized to 48×48 first when another size)."""
    out = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (SCENE_RESOLUTION, SCENE_RESOLUTION):
            image = image.resize((SCENE_RESOLUTION, SCENE_RESOLUTION), Image.Resampling.BOX)
        out.append(image.crop(INTERIOR))
    return out


# ----------------------------------------------------------------------------------------------
# Sampling and captions
# ----------------------------------------------------------------------------------------------

SCENE_MIX = {"shape+frame": 0.5, "shape": 0.35, "frame": 0.15}
"""Share of each kind of scene in the base's training set (frame only = an empty interior)."""


def sample_scene(rng: random.Random, kind: str | None = None) -> SceneAttributes:
    """A random scene: its kind drawn from :data:`SCENE_MIX` (or given), every attribute uniform."""
    if kind is None:
        u, kind = rng.random(), ""
        for name, share in SCENE_MIX.items():
            kind = name
            u -= share
            if u < 0:
                break
    if kind not in SCENE_MIX:
        raise ValueError(f"unknown scene kind {kind!r}; one of {', '.join(SCENE_MIX)}")
    shape = sample_attributes(rng)
    frame = Frame(rng.choice(tuple(COLOURS)), rng.choice(PATTERNS)) if "frame" in kind else None
    return SceneAttributes(shape.background, shape if "shape" in kind else None, frame)


def frame_phrase(colour: str | None = None, pattern: str | None = None, *, noun: str = "frame",
                 article: str | None = None) -> str:
    """``"an orange striped frame"``; ``None`` leaves a word unsaid; ``noun`` replaces "frame"
    (``"<frm> frame"`` for a concept prompt); ``article`` as in :func:`~studio.world.render.describe`."""
    phrase = " ".join(w for w in (colour, pattern, noun) if w)
    determiner = _article(phrase) if article is None else article
    return f"{determiner} {phrase}" if determiner else phrase


def describe_scene(
    shape: str | None = None,
    colour: str | None = None,
    pattern: str | None = None,
    background: str | None = None,
    size: str | None = None,
    *,
    frame_colour: str | None = None,
    frame_pattern: str | None = None,
    has_shape: bool = True,
    has_frame: bool = False,
    noun: str | None = None,
    frame_noun: str | None = None,
    prefix: str = "a photo of",
    article: str | None = None,
) -> str:
    """The scene grammar: the world's :func:`~studio.world.render.describe` plus ``" in a … frame"``.

    With ``has_shape=False`` the frame is the subject (``"a photo of an orange striped frame on a pink
    background"``). ``noun`` / ``frame_noun`` replace "circle" / "frame" (concept prompts); a frame
    noun implies ``has_frame``. Example: ``describe_scene("circle", "purple", "dotted", "pink", "large",
    frame_colour="orange", frame_pattern="striped", has_frame=True)`` → ``"a photo of a large purple
    dotted circle on a pink background in an orange striped frame"``.
    """
    has_frame = has_frame or frame_noun is not None or frame_colour is not None or frame_pattern is not None
    frame = frame_phrase(frame_colour, frame_pattern, noun=frame_noun or "frame")
    if not has_shape:
        if not has_frame:
            raise ValueError("a scene description needs a shape, a frame or both")
        head = frame_phrase(frame_colour, frame_pattern, noun=frame_noun or "frame", article=article)
        head = f"{prefix} {head}" if prefix else head
        return f"{head} on {_article(background)} {background} background" if background else head
    text = describe(shape, colour, pattern, background, size, noun=noun, prefix=prefix, article=article)
    return f"{text} in {frame}" if has_frame else text


def scene_caption(attributes: SceneAttributes, rng: random.Random, p_drop: float = 0.25) -> str:
    """A random caption of ``attributes``: each attribute unsaid with probability ``p_drop``.

    The frame itself is always said when there is one (its colour and pattern may be unsaid: "in a
    striped frame", "in a frame"), so that a caption without a frame means a picture without one; a
    shape is always said too (its noun may become "shape", as in the world), so a frame-only caption
    means an empty interior. Framing words and articles vary as the world's captions do.
    """
    def maybe(value: str) -> str | None:
        return value if rng.random() >= p_drop else None

    background = maybe(attributes.background)
    frame = attributes.frame
    frame_words: dict[str, str | None] = {}
    if frame is not None:
        frame_words = {"frame_colour": maybe(frame.colour), "frame_pattern": maybe(frame.pattern)}
    shape = attributes.shape
    said: dict[str, str | None] = {}
    if shape is not None:
        said = {name: maybe(getattr(shape, name)) for name in VOCABULARY if name != "background"}
    article = rng.choice(("the", "my", "one", "")) if rng.random() < 0.3 else None
    return describe_scene(
        **said, background=background, **frame_words, has_shape=shape is not None, has_frame=frame is not None,
        prefix=rng.choice(_PREFIXES), article=article,
    )


def full_caption(attributes: SceneAttributes, prefix: str = "a photo of") -> str:
    """The caption that says every attribute of ``attributes`` (the base's vocabulary check)."""
    shape, frame = attributes.shape, attributes.frame
    words: dict[str, str | None] = {}
    if shape is not None:
        words = {name: getattr(shape, name) for name in VOCABULARY if name != "background"}
    return describe_scene(
        **words, background=attributes.background,
        frame_colour=frame.colour if frame else None, frame_pattern=frame.pattern if frame else None,
        has_shape=shape is not None, has_frame=frame is not None, prefix=prefix,
    )


# ----------------------------------------------------------------------------------------------
# The scene oracle
# ----------------------------------------------------------------------------------------------


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class SceneOracle(nn.Module):
    """``(B, 3, 48, 48)`` scenes in [-1, 1] → logits per head of :data:`SCENE_VOCABULARY` (``(B, n)``).

    Three conv blocks take the scene to a 6×6 grid of 8×8-px cells, whose outer ring is exactly the
    band; features are mean- and max-pooled over the ring and over the interior separately (``4·4w``
    numbers), so the frame heads read the band wherever the marks fall, and the weights stay few.
    """

    ring: torch.Tensor  # (6, 6) bool: the cells of the band

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        w = width
        self.width = w
        self.features = nn.Sequential(
            _block(3, w), nn.MaxPool2d(2),  # 24×24
            _block(w, 2 * w), nn.MaxPool2d(2),  # 12×12
            _block(2 * w, 4 * w), nn.MaxPool2d(2),  # 6×6
        )
        ring = torch.ones(6, 6, dtype=torch.bool)
        ring[1:-1, 1:-1] = False
        self.register_buffer("ring", ring, persistent=False)
        self.trunk = nn.Sequential(nn.Linear(16 * w, 64), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(64, len(v)) for name, v in SCENE_VOCABULARY.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)  # (B, 4w, 6, 6)
        if f.shape[-2:] != (6, 6):
            raise ValueError(f"the scene oracle reads 48×48 scenes, got {tuple(images.shape[-2:])}")
        band, inside = f[:, :, self.ring], f[:, :, ~self.ring]  # (B, 4w, 20), (B, 4w, 16)
        h = torch.cat([band.mean(-1), band.amax(-1), inside.mean(-1), inside.amax(-1)], dim=1)
        h = self.trunk(h)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities per head, ``(B, n_values)``. ``images``: PIL images (box-resized to 48×48) or a
        ``(B, 3, H, W)`` tensor in [-1, 1] (area-resized when not 48×48)."""
        was_training = self.training
        self.eval()
        x = images if isinstance(images, torch.Tensor) else scenes_to_tensor(images)
        if x.shape[-2:] != (SCENE_RESOLUTION, SCENE_RESOLUTION):
            x = torch.nn.functional.adaptive_avg_pool2d(x.float(), SCENE_RESOLUTION)
        device = next(self.parameters()).device
        logits = self(x.to(device=device, dtype=torch.float32))
        self.train(was_training)
        return {k: v.softmax(-1).cpu() for k, v in logits.items()}


def scenes_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images → ``(B, 3, 48, 48)`` float32 in [-1, 1] (box-resized when not 48×48)."""
    return to_tensor(images, SCENE_RESOLUTION)


def scene_targets(attributes: Sequence[SceneAttributes]) -> dict[str, torch.Tensor]:
    """Each head's class index per scene, ``(B,)`` int64; -100 (ignored) for a frame head without a frame."""
    def index(name: str, value: str | None) -> int:
        return -100 if value is None else SCENE_VOCABULARY[name].index(value)

    return {
        "frame": torch.tensor([int(a.frame is not None) for a in attributes]),
        "frame_colour": torch.tensor([index("frame_colour", a.frame.colour if a.frame else None) for a in attributes]),
        "frame_pattern": torch.tensor([index("frame_pattern", a.frame.pattern if a.frame else None)
                                       for a in attributes]),
        "background": torch.tensor([index("background", a.background) for a in attributes]),
        "inner": torch.tensor([int(a.shape is not None) for a in attributes]),
    }


def load_scene_oracle(device: torch.device | str = "cpu", path: Path | None = None) -> SceneOracle:
    """The committed, trained scene oracle (fp16 on disk, fp32 here) in eval mode on ``device``."""
    path = Path(path) if path is not None else SCENE_ORACLE_PATH
    if not path.is_file():
        raise StudioError(
            f"The scene oracle is missing at {path}; run `python scripts/build_world.py --variant world-scene`."
        )
    return load_checkpoint(path, "studio.world.scene_oracle", lambda width: SceneOracle(width=width), 12, device)


# ----------------------------------------------------------------------------------------------
# The two-concept task
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneConcept:
    """One concept of a scene: the region it owns (``name``: ``"shape"`` or ``"frame"``, the key of its
    mask in :func:`scene_masks`), its class word, and the features that make it itself.

    ``identity`` holds world attributes for the shape (``shape``, ``colour``, ``pattern``) and
    ``colour``/``pattern`` for the frame; no scene the base model learnt from has them together.
    """

    name: str
    class_word: str
    identity: dict[str, str]

    def description(self) -> str:
        """The concept in the world's words: ``"purple dotted circle"``, ``"yellow dotted frame"``."""
        return f"{self.identity['colour']} {self.identity['pattern']} {self.class_word}"

    def is_identity(self, scene: SceneAttributes) -> bool:
        """Does ``scene`` show this concept?"""
        if self.name == "frame":
            frame = scene.frame
            return frame is not None and (frame.colour, frame.pattern) == (
                self.identity["colour"], self.identity["pattern"])
        shape = scene.shape
        return shape is not None and all(getattr(shape, k) == v for k, v in self.identity.items())


@dataclass(frozen=True)
class ScenePrompt:
    """An evaluation prompt: a template with ``{shape}`` and/or ``{frame}`` fields (filled with each
    concept's subject, ``"<s1> circle"``, or its class word for the baseline), the concepts it shows,
    and the ``(attribute, value)`` pairs the oracles must read in the image (names of
    :data:`SCENE_VOCABULARY` or of the world's ``VOCABULARY``; ``frame=none`` / ``inner=empty`` say that
    the other concept must stay out of a one-concept prompt)."""

    template: str
    concepts: tuple[str, ...]
    targets: tuple[tuple[str, str], ...]

    def format(self, subjects: dict[str, str]) -> str:
        missing = [c for c in self.concepts if c not in subjects]
        if missing:
            raise ValueError(f"prompt {self.template!r} needs a subject for {', '.join(missing)}")
        return self.template.format(**{c: subjects[c] for c in self.concepts})


def _scene_prompts(backgrounds: Sequence[str]) -> tuple[ScenePrompt, ...]:
    """Each concept alone in unseen contexts, both together, and each with another partner."""
    prompts: list[ScenePrompt] = []
    for bg in backgrounds:  # the shape alone: no frame
        prompts.append(ScenePrompt(describe(noun="{shape}", background=bg), ("shape",),
                                   (("background", bg), ("frame", "none"))))
    prompts.append(ScenePrompt(describe(noun="{shape}", size="small"), ("shape",),
                               (("size", "small"), ("frame", "none"))))
    for bg in backgrounds:  # the frame alone: an empty interior
        prompts.append(ScenePrompt(describe_scene(background=bg, frame_noun="{frame}", has_shape=False), ("frame",),
                                   (("background", bg), ("inner", "empty"))))
    for bg in backgrounds:  # both, in a new context
        prompts.append(ScenePrompt(describe_scene(noun="{shape}", background=bg, frame_noun="{frame}"),
                                   ("shape", "frame"), (("background", bg),)))
    prompts.append(ScenePrompt(describe_scene(noun="{shape}", size="small", frame_noun="{frame}"),
                               ("shape", "frame"), (("size", "small"),)))
    # each with another partner (Break-A-Scene's recombination)
    prompts.append(ScenePrompt(describe_scene(noun="{shape}", frame_colour="green", frame_pattern="striped"),
                               ("shape",), (("frame_colour", "green"), ("frame_pattern", "striped"))))
    prompts.append(ScenePrompt(describe_scene("square", "red", "plain", frame_noun="{frame}"),
                               ("frame",), (("shape", "square"), ("colour", "red"), ("inner", "shape"))))
    return tuple(prompts)


@dataclass(frozen=True)
class SceneTask:
    """Two concepts in one picture (:data:`SCENE_TASK`): their training photos and evaluation prompts.

    Attributes:
        concepts: the shape concept and the frame concept.
        train_backgrounds / train_size: the contexts of the training photos (both concepts in each).
        eval_prompts: contexts absent from the photos, each with its targets.
    """

    concepts: tuple[SceneConcept, ...]
    train_backgrounds: tuple[str, ...] = ("white", "gray")
    train_size: str = "large"
    eval_prompts: tuple[ScenePrompt, ...] = _scene_prompts(("black", "pink", "brown", "teal"))

    def __post_init__(self) -> None:
        for prompt in self.eval_prompts:
            for attribute, value in prompt.targets:
                if (attribute, value) in (("size", self.train_size),) or (
                        attribute == "background" and value in self.train_backgrounds):
                    raise ValueError(f"evaluation prompt {prompt.template!r} asks for {attribute} {value!r}, "
                                     "which the training photos already show")

    def concept(self, name: str) -> SceneConcept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"no concept {name!r}; the task has {', '.join(c.name for c in self.concepts)}")

    def class_words(self) -> dict[str, str]:
        """The baseline's subjects: ``{"shape": "circle", "frame": "frame"}``."""
        return {c.name: c.class_word for c in self.concepts}

    def descriptions(self) -> dict[str, str]:
        """The concepts said in words (never seen by the base): ``{"shape": "purple dotted circle", …}``."""
        return {c.name: c.description() for c in self.concepts}

    def shows_held_out(self, scene: SceneAttributes) -> bool:
        """Does ``scene`` show either concept? (The base model never learns from such a scene.)"""
        return any(c.is_identity(scene) for c in self.concepts)

    def scene(self, background: str | None = None, size: str | None = None) -> SceneAttributes:
        """Both concepts in one scene (defaults: the first training background, the training size)."""
        shape, frame = self.concept("shape").identity, self.concept("frame").identity
        background = background or self.train_backgrounds[0]
        inner = Attributes(shape["shape"], shape["colour"], shape["pattern"], background, size or self.train_size)
        return SceneAttributes(background, inner, Frame(frame["colour"], frame["pattern"]))

    def photos(self, n: int = 1, seed: int = 0) -> list[tuple[Image.Image, dict[str, Image.Image]]]:
        """``n`` photos showing both concepts (training backgrounds in turn, jittered by ``seed``), each
        with the mask of every concept (``{"shape": …, "frame": …}``, 48×48 mode "L")."""
        if n < 1:
            raise StudioError(f"A scene task needs at least one photo; n={n} was asked.")
        rng = random.Random(f"scene-photos/{seed}")
        out = []
        for i in range(n):
            scene = self.scene(self.train_backgrounds[i % len(self.train_backgrounds)])
            jitter = rng.randrange(2**31)
            out.append((render_scene(scene, jitter), scene_masks(scene, jitter)))
        return out

    def prompts(self, subjects: dict[str, str]) -> list[str]:
        """The evaluation prompts with each concept's subject in place."""
        return [p.format(subjects) for p in self.eval_prompts]

    def real_images(self, per_prompt: int = 4, seed: int = 0) -> list[Image.Image]:
        """Renders of what each evaluation prompt asks for (the upper bound), prompt-major."""
        rng = random.Random(f"scene-real/{seed}")
        shape_id, frame_id = self.concept("shape").identity, self.concept("frame").identity
        images = []
        for prompt in self.eval_prompts:
            for _ in range(per_prompt):
                want = dict(prompt.targets)
                background = want.get("background") or rng.choice(tuple(BACKGROUNDS))
                inner = None
                if "shape" in prompt.concepts:
                    inner = Attributes(**{**shape_id, "background": background,
                                          "size": want.get("size") or rng.choice(("small", "large"))})
                elif want.get("inner") == "shape":
                    inner = sample_attributes(rng, **{k: want[k] for k in ("shape", "colour") if k in want},
                                              background=background)
                frame = None
                if "frame" in prompt.concepts:
                    frame = Frame(frame_id["colour"], frame_id["pattern"])
                elif "frame_colour" in want:
                    frame = Frame(want["frame_colour"], want.get("frame_pattern", "plain"))
                images.append(render_scene(SceneAttributes(background, inner, frame), rng.randrange(2**31)))
        return images


SCENE_TASK = SceneTask(concepts=(
    SceneConcept("shape", "circle", {"shape": "circle", "colour": "purple", "pattern": "dotted"}),
    SceneConcept("frame", "frame", {"colour": "yellow", "pattern": "dotted"}),
))
"""The scene world's task: the world's purple dotted circle inside a yellow dotted frame — two concepts
in one picture, neither ever seen by the scene base."""


def scene_photos(n: int = 1, seed: int = 0) -> list[tuple[Image.Image, dict[str, Image.Image]]]:
    """The photos a creator gives a multi-concept method: ``SCENE_TASK.photos(n, seed)`` — both concepts
    in each 48×48 picture, with a mask per concept (``{"shape": …, "frame": …}``)."""
    return SCENE_TASK.photos(n, seed)


# ----------------------------------------------------------------------------------------------
# Reading and scoring
# ----------------------------------------------------------------------------------------------

_ORACLES: dict[str, nn.Module] = {}


def _oracles(world: Oracle | None, scene: SceneOracle | None) -> tuple[Oracle, SceneOracle]:
    if world is None:
        if "world" not in _ORACLES:
            _ORACLES["world"] = load_oracle("cpu")
        world = _ORACLES["world"]  # type: ignore[assignment]
    if scene is None:
        if "scene" not in _ORACLES:
            _ORACLES["scene"] = load_scene_oracle("cpu")
        scene = _ORACLES["scene"]  # type: ignore[assignment]
    return world, scene  # type: ignore[return-value]


@dataclass(frozen=True)
class SceneReading:
    """What the oracles read in one scene.

    ``values``: the most probable value of every scene-oracle head (``frame``, ``frame_colour``,
    ``frame_pattern``, ``background``, ``inner``) and of the world oracle's heads on the interior
    (``shape``, ``colour``, ``pattern``, ``size``; the world's ``background`` is the scene's).
    ``identity``: per concept, the probability that the scene shows it — the world oracle's identity
    head on the interior for the shape; p(frame) · p(colour) · p(pattern) for the frame.
    """

    values: dict[str, str]
    identity: dict[str, float] = field(default_factory=dict)

    def has(self, targets: Sequence[tuple[str, str]]) -> bool:
        """Does the scene show every ``(attribute, value)`` of ``targets``?"""
        return all(self.values[name] == value for name, value in targets)


def read_scene(images: Sequence[Image.Image], task: SceneTask = SCENE_TASK, world_oracle: Oracle | None = None,
               scene_oracle: SceneOracle | None = None) -> list[SceneReading]:
    """Read every image (48×48 scenes; other sizes box-resized) with both oracles."""
    if not images:
        return []
    world, scene = _oracles(world_oracle, scene_oracle)
    s = scene.read(images)
    w = world.read(interior(images))
    frame_id = task.concept("frame").identity
    frame_p = (s["frame"][:, 1] * s["frame_colour"][:, SCENE_VOCABULARY["frame_colour"].index(frame_id["colour"])]
               * s["frame_pattern"][:, SCENE_VOCABULARY["frame_pattern"].index(frame_id["pattern"])])
    readings = []
    for i in range(len(images)):
        values = {name: SCENE_VOCABULARY[name][int(s[name][i].argmax())] for name in SCENE_VOCABULARY}
        values.update({name: VOCABULARY[name][int(w[name][i].argmax())] for name in ("shape", "colour", "pattern",
                                                                                      "size")})
        readings.append(SceneReading(values, {"shape": float(w["identity"][i]), "frame": float(frame_p[i])}))
    return readings


@dataclass(frozen=True)
class SceneScores:
    """Scores of a two-concept generation set.

    ``shape_fidelity`` / ``frame_fidelity``: mean probability that a concept is shown, over the images
    whose prompt asks for it; ``both_present``: fraction of two-concept images showing both (each
    probability > 0.5); ``editability``: fraction of images showing every target of their prompt.
    """

    shape_fidelity: float
    frame_fidelity: float
    both_present: float
    editability: float
    n_images: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        return (f"shape fidelity {self.shape_fidelity:.3f}, frame fidelity {self.frame_fidelity:.3f}, both "
                f"{self.both_present:.3f}, editability {self.editability:.3f} (n={self.n_images})")


def score_scene(images: Sequence[Image.Image], prompts: Sequence[ScenePrompt], task: SceneTask = SCENE_TASK,
                world_oracle: Oracle | None = None, scene_oracle: SceneOracle | None = None) -> SceneScores:
    """Score ``images[i]``, generated for ``prompts[i]`` (one :class:`ScenePrompt` per image)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if not images:
        raise ValueError("scores of no images")
    readings = read_scene(images, task, world_oracle, scene_oracle)

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    shape = [r.identity["shape"] for r, p in zip(readings, prompts) if "shape" in p.concepts]
    frame = [r.identity["frame"] for r, p in zip(readings, prompts) if "frame" in p.concepts]
    both = [float(r.identity["shape"] > 0.5 and r.identity["frame"] > 0.5)
            for r, p in zip(readings, prompts) if set(p.concepts) >= {"shape", "frame"}]
    edit = [float(r.has(p.targets)) for r, p in zip(readings, prompts)]
    return SceneScores(mean(shape), mean(frame), mean(both), mean(edit), len(images))


def evaluate_scene(generate, subjects: dict[str, str], task: SceneTask = SCENE_TASK, per_prompt: int = 4,
                   seed: int = 0, world_oracle: Oracle | None = None,
                   scene_oracle: SceneOracle | None = None) -> SceneScores:
    """Generate ``per_prompt`` images per evaluation prompt (``generate(prompts, seed) -> images``, as
    :func:`studio.world.score.pipeline_generator` makes), each concept's subject in place, and score."""
    prompts = [p for p in task.eval_prompts for _ in range(per_prompt)]
    images = generate([p.format(subjects) for p in prompts], seed)
    if len(images) != len(prompts):
        raise ValueError(f"the generator returned {len(images)} images for {len(prompts)} prompts")
    return score_scene(images, prompts, task, world_oracle, scene_oracle)


def scene_baseline(generate, task: SceneTask = SCENE_TASK, per_prompt: int = 4, seed: int = 0,
                   world_oracle: Oracle | None = None, scene_oracle: SceneOracle | None = None) -> SceneScores:
    """The base model prompted with the class words ("circle", "frame"): fidelity without the concepts."""
    return evaluate_scene(generate, task.class_words(), task, per_prompt, seed, world_oracle, scene_oracle)


def scene_upper_bound(task: SceneTask = SCENE_TASK, per_prompt: int = 4, seed: int = 0,
                      world_oracle: Oracle | None = None, scene_oracle: SceneOracle | None = None) -> SceneScores:
    """Real renders of what each prompt asks for: the best a method can score."""
    prompts = [p for p in task.eval_prompts for _ in range(per_prompt)]
    return score_scene(task.real_images(per_prompt, seed), prompts, task, world_oracle, scene_oracle)
