"""A learnable test world: synthetic text-to-image data, a base model trained on it, an oracle.

The world is 32×32 pictures of one centred shape described by five attributes (shape, colour,
pattern, background, size; see :mod:`studio.world.render`). Built from it by
``scripts/build_world.py`` and committed:

* :data:`DEMO_BASE_DIR` — a real diffusers ``StableDiffusionPipeline`` folder trained on the world
  (VAE, CLIP text encoder with the real BPE tokenizer, cross-attention UNet, scheduler): the
  studio's offline demo base (``--base demo``);
* :data:`ORACLE_PATH` — a classifier that reads every attribute and the concept's identity from an
  image (:func:`load_oracle`).

:data:`CONCEPT` is the personalization task (a purple dotted circle the base never saw) and
:mod:`studio.world.score` turns generations into fidelity and editability.
"""

from __future__ import annotations

from pathlib import Path

from studio.world.oracle import ORACLE_PATH, Oracle, load_oracle
from studio.world.render import (
    RESOLUTION,
    VOCABULARY,
    Attributes,
    caption,
    describe,
    render,
    render_mask,
    sample_attributes,
)
from studio.world.score import (
    Scores,
    baseline,
    editability,
    evaluate,
    fidelity,
    pipeline_generator,
    score_images,
    upper_bound,
)
from studio.world.task import CONCEPT, HARD_CONCEPT, ConceptTask, EvalPrompt

WORLD_DIR = Path(__file__).resolve().parents[1] / "assets" / "world"
DEMO_BASE_DIR = WORLD_DIR / "base"
"""The committed diffusers folder of the world's base model."""
WORLD_B_DIR = Path(__file__).resolve().parents[1] / "assets" / "world_b"
WORLD_B_BASE_DIR = WORLD_B_DIR / "base"
"""The second learnable base (``scripts/build_world.py --variant world-b``): the same world drawn at
48 px through a 4×12×12 latent, a small learnt vocabulary, a 96-wide 3-layer text encoder and a
two-level UNet — nothing of its shape is the demo base's. Scored by the same oracle."""
WORLD_B_RESOLUTION = 48
"""Side of the second base's images (its concept photos are drawn at this size)."""
WORLD_SCENE_DIR = Path(__file__).resolve().parents[1] / "assets" / "world_scene"
WORLD_SCENE_BASE_DIR = WORLD_SCENE_DIR / "base"
"""The third learnable base (``scripts/build_world.py --variant world-scene``): world-b's shape of model
trained on 48-px *scenes* — the world's shape inside a frame (:mod:`studio.world.scene`) — for methods
that learn several concepts from one picture. Read by the world's oracle (interior) and the scene
oracle in :data:`WORLD_SCENE_DIR`."""
WORLD_SCENE_RESOLUTION = 48
"""Side of the scene base's images."""
WORLD_ADAPTER_DIR = Path(__file__).resolve().parents[1] / "assets" / "world_adapter"
"""The committed IP-Adapter folder trained for the world's base (``scripts/build_world_adapter.py``)."""

__all__ = [
    "WORLD_ADAPTER_DIR",
    "WORLD_B_BASE_DIR",
    "WORLD_B_DIR",
    "WORLD_B_RESOLUTION",
    "WORLD_SCENE_BASE_DIR",
    "WORLD_SCENE_DIR",
    "WORLD_SCENE_RESOLUTION",
    "CONCEPT",
    "HARD_CONCEPT",
    "DEMO_BASE_DIR",
    "ORACLE_PATH",
    "RESOLUTION",
    "VOCABULARY",
    "WORLD_DIR",
    "Attributes",
    "ConceptTask",
    "EvalPrompt",
    "Oracle",
    "Scores",
    "baseline",
    "caption",
    "describe",
    "editability",
    "evaluate",
    "fidelity",
    "load_oracle",
    "pipeline_generator",
    "render",
    "render_mask",
    "sample_attributes",
    "score_images",
    "upper_bound",
]
