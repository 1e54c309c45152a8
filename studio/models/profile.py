"""What depends on the loaded base beyond its architecture, decided once when it loads.

A :class:`BaseProfile` hangs on every :class:`~studio.models.BaseModel` (``base.profile``): sampling
defaults, the evaluation protocol and judge, the training preset each trainer starts from, and the
IP-Adapter that reference images use. Code reads the profile; nothing compares a base's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
DEFAULT_PROTOCOL = "dreambench"


@dataclass(frozen=True)
class BaseProfile:
    """Defaults that follow the base (see the module docstring).

    ``judge`` is ``"clip"`` (the evaluation's default CLIP model) or ``"oracle"`` (the demo world's
    attribute classifier); ``presets`` maps a trainer's CLI name to the preset it opens with on this
    base (trainers without an entry use their own default); ``adapter`` is an IP-Adapter preset
    name, file or folder, or None for the family's usual hub adapter."""

    kind: str = "generic"  # "generic" | "world" | "random": what the base is, for labels and tests
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    protocol: str = DEFAULT_PROTOCOL
    judge: str = "clip"
    presets: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    adapter: str | None = None
    # What the Generate tab opens with and offers as examples: prompts this base draws well, and
    # ``concept_prompt`` ({} = a concept's trigger and class word) for the examples with concepts.
    examples: tuple[str, ...] = ("a photo of a cat", "a watercolor painting of a lighthouse at dusk",
                                 "a red bicycle leaning on a brick wall")
    concept_prompt: str = "a photo of {} on the beach"

    def preset_for(self, trainer: str, available: Any) -> str | None:
        """The preset trainer ``trainer`` opens with here, if it has one of that name; else None (its default)."""
        name = self.presets.get(trainer)
        return name if name and name in available else None


GENERIC = BaseProfile()
RANDOM = BaseProfile(kind="random")

# Sampling defaults of the flow families, per variant: the model cards' (SD 3 medium: 28 steps, CFG 7;
# SD 3.5 large: 28 / 3.5; SD 3.5 medium: 40 / 4.5; FLUX.1-dev: 28 steps, embedded guidance 3.5;
# FLUX.1-schnell: 4 steps, no guidance input).
FLOW_DEFAULTS = {"sd3-medium": (28, 7.0), "sd3.5-large": (28, 3.5), "sd3.5-medium": (40, 4.5),
                 "flux-dev": (28, 3.5), "flux-schnell": (4, 0.0)}


def flow_variant(family: str, pipe: Any) -> str:
    """The variant of a loaded SD 3 / FLUX pipeline, read from its transformer's config (structure, not
    size): ``sd3.5-medium`` with dual-attention blocks, ``sd3.5-large`` with q/k norms, else
    ``sd3-medium``; ``flux-dev`` with the guidance embedding, else ``flux-schnell``."""
    cfg = pipe.transformer.config
    if family == "flux":
        return "flux-dev" if cfg.get("guidance_embeds") else "flux-schnell"
    if cfg.get("dual_attention_layers"):
        return "sd3.5-medium"
    return "sd3.5-large" if cfg.get("qk_norm") else "sd3-medium"


def flow_profile(family: str, pipe: Any, *, kind: str = "generic") -> BaseProfile:
    """The profile of an SD 3 / FLUX base: its variant's steps and guidance (:data:`FLOW_DEFAULTS`)."""
    steps, guidance = FLOW_DEFAULTS[flow_variant(family, pipe)]
    return BaseProfile(kind=kind, steps=steps, guidance=guidance)


def world_profile() -> BaseProfile:
    """The demo world's profile: the world's own sampling settings, its protocol and oracle judge, and
    its committed IP-Adapter. No training presets: every trainer opens on its own defaults, which
    adapt to the base by measurement (the learning tests run them on this base and on world-b); the
    hand-tuned ``demo-world`` presets stay available by name (``--preset demo-world``), as quick looks."""
    from studio.world import WORLD_ADAPTER_DIR
    from studio.world.render import describe
    from studio.world.score import GUIDANCE_SCALE, NUM_STEPS

    examples = (describe("star", "red", "striped", "pink"), describe("circle", "blue", "plain", "teal", "small"),
                describe("triangle", "yellow", "dotted", "black"), describe("square", "green", "plain", "white"))
    return BaseProfile(kind="world", steps=NUM_STEPS, guidance=GUIDANCE_SCALE, protocol="world", judge="oracle",
                       adapter=str(WORLD_ADAPTER_DIR), examples=examples,
                       concept_prompt=describe(noun="{}", background="teal"))


def profile_for_folder(folder: Path) -> BaseProfile:
    """The profile of a diffusers folder: the world's for the world's committed base, wherever it is
    named from (``--base demo`` or its path), else the generic one."""
    from studio.world import DEMO_BASE_DIR

    try:
        same = folder.resolve() == Path(DEMO_BASE_DIR).resolve()
    except OSError:
        same = False
    return world_profile() if same else GENERIC


def profile_for_spec(spec: str) -> BaseProfile:
    """The profile a ``--base`` value will have once loaded, known without loading it (the CLI and the
    queue resolve presets before any weights load). :func:`studio.models.load_base` sets the same."""
    from studio.models.tiny import FLOW_TINY_NAMES, TINY_NAMES
    from studio.world import DEMO_BASE_DIR

    if spec in FLOW_TINY_NAMES:  # the tiny SD 3 imitates SD 3.5 medium, the tiny FLUX FLUX.1-dev
        steps, guidance = FLOW_DEFAULTS["sd3.5-medium" if spec == "tiny-sd3" else "flux-dev"]
        return BaseProfile(kind="random", steps=steps, guidance=guidance)
    if spec in TINY_NAMES:
        return RANDOM
    if spec == "demo":
        return profile_for_folder(Path(DEMO_BASE_DIR))
    path = Path(spec).expanduser()
    return profile_for_folder(path) if path.is_dir() else GENERIC
