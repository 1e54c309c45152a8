"""``EvaluateConfig``: every evaluation option, once — the ``evaluate`` CLI flags
(:func:`studio.configs.add_arguments`), the Evaluate tab's defaults and choices, and the keyword
options of :func:`~studio.evaluation.evaluate_concepts` / :func:`~studio.evaluation.sweep_strength`
all come from it.

``None`` in a field means "the base's": the protocol, judge, sampler steps and guidance follow the
loaded base's :class:`~studio.models.profile.BaseProfile` (:meth:`EvaluateConfig.for_base`). What is
evaluated (the concepts, their reference photos) is not an option and is passed beside the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from studio.configs import option
from studio.errors import StudioError
from studio.evaluation.metrics.scorers import DEFAULT_CLIP
from studio.evaluation.metrics.texts import TEXT_MODES
from studio.evaluation.protocols import PROTOCOLS
from studio.methods.decor import DEFAULT_STRENGTH as DECOR_STRENGTH
from studio.methods.decor import STRENGTH_HELP as DECOR_STRENGTH_HELP
from studio.methods.decor import WORDS_HELP as DECOR_WORDS_HELP
from studio.methods.decor import check_settings as check_decor

SCORERS = ("clip", "oracle")
FIDELITY_KEYS = ("clip_i", "dino")


@dataclasses.dataclass
class EvaluateConfig:
    """How concepts are evaluated (see the module docstring; ``None`` = the base's)."""

    prompts: str | list[str] | None = option(
        None, "file of prompts, one per line, {} where the concept goes (Python: also a list of prompts); "
        "not with --protocol", group="prompts", path="file")
    protocol: str | None = option(
        None, "named prompt list (default: the base's — world on the demo world, else dreambench: live for cat/dog "
        "concepts, object otherwise; several concepts: four shared prompts)", choices=list(PROTOCOLS), group="prompts")
    seeds: int | None = option(None, "images per prompt (default: the protocol's, 4)", group="prompts")
    seed: int = option(0, "image i of each prompt uses seed + i", group="prompts")
    steps: int | None = option(None, "sampler steps (default: the base's — 30; 20 on the demo world)",
                               group="sampling")
    guidance: float | None = option(None, "CFG scale (default: the base's — 7.5; 4 on the demo world)",
                                    group="sampling")
    batch_size: int = option(8, "images per pipeline call", group="sampling")
    decor_words: list[str] = option([], DECOR_WORDS_HELP, group="DECOR")  # as GenerateConfig's (studio.methods.decor)
    decor_strength: float = option(DECOR_STRENGTH, DECOR_STRENGTH_HELP, group="DECOR")
    scorer: str | None = option(
        None, "judge — clip: CLIP/DINO metrics; oracle: the demo world's oracle (fidelity, editability); default: "
        "the base's (oracle on the demo world for one concept, else clip)", choices=list(SCORERS), group="judges")
    clip_model: str = option(DEFAULT_CLIP, "CLIP hub id or folder", group="judges", path="model")
    dino_model: str | None = option(None, "add DINO (e.g. facebook/dino-vits16): hub id or folder", group="judges",
                                     path="model")
    detector: str | None = option(
        None, "CP-CLIP detector for several concepts: OWL-ViT hub id or folder (default google/owlvit-base-patch32), "
        "or haar (offline; faces of people and cats)", flag="--detector-model", group="judges",
        path="model", names=("haar",))
    text_mode: str = option("class_noun", "text CLIP-T scores: the trigger replaced by the class noun, removed, "
                            "or kept", choices=list(TEXT_MODES), flag="--clip-t-text", group="judges")
    fidelity: str | None = option(None, "fidelity score of a sweep (default clip_i; the oracle's on the oracle)",
                                  choices=list(FIDELITY_KEYS), group="judges")
    sweep: str | None = option(None, "score these strengths, e.g. 0,0.25,0.5,0.75,1,1.25, and store the recommended "
                               "one (S1,S2,...)", group="sweep")
    store_refs: bool = option(False, "store the reference photos' embeddings in the concept, to re-score it later "
                              "without the photos", group="output")
    write_back: bool = option(True, "write the scores into the concept file", flag="--write", group="output")
    save_images: bool = option(True, "write the generated images", group="output")
    out_dir: str | None = option(None, "output folder (report.json, contact_sheet.png, scatter.png …)", flag="--out",
                                 group="output")

    def __post_init__(self) -> None:
        if self.prompts is not None and self.protocol is not None:
            raise StudioError("Give prompts or a protocol, not both.")
        if self.batch_size < 1:
            raise StudioError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.text_mode not in TEXT_MODES:
            raise StudioError(f"text_mode must be one of {', '.join(TEXT_MODES)}, got {self.text_mode!r}.")
        self.strengths()  # a malformed --sweep fails here, before anything loads
        self.decor_words = check_decor(self.decor_words, self.decor_strength)

    def strengths(self) -> list[float] | None:
        """The strengths of :attr:`sweep` (``None`` when no sweep is asked for)."""
        if self.sweep is None:
            return None
        try:
            return [float(s) for s in str(self.sweep).split(",") if s.strip()]
        except ValueError:
            raise StudioError(f"--sweep takes comma-separated strengths such as 0,0.5,1; got {self.sweep!r}.") from None

    def with_options(self, **options: Any) -> EvaluateConfig:
        """A copy with keyword options (field names) replaced; an unknown name is an error naming the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"Unknown evaluation option {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return dataclasses.replace(self, **options) if options else self

    def for_base(self, profile: Any, *, concepts: int = 1) -> EvaluateConfig:
        """This config with "the base's" filled in from ``profile`` (a
        :class:`~studio.models.profile.BaseProfile`): protocol (one concept, no prompts given), judge
        (the oracle only for one concept), steps and guidance."""
        protocol = self.protocol
        if protocol is None and self.prompts is None and concepts == 1:
            protocol = profile.protocol
        scorer = self.scorer or ("oracle" if profile.judge == "oracle" and concepts == 1 else "clip")
        return dataclasses.replace(
            self, protocol=protocol, scorer=scorer, steps=self.steps or profile.steps,
            guidance=self.guidance if self.guidance is not None else profile.guidance)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
