"""What a trainer declares about itself (:class:`TrainerEntry`) and the one way to turn a preset and
overrides into its config (:meth:`TrainerEntry.resolve`), used by the CLI, the UI, the job queue and
Python callers alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from studio.errors import StudioError


@dataclass(frozen=True)
class TrainerEntry:
    """A trainer: CLI name, the concept method it produces, its config dataclass and presets.

    The config dataclass's defaults *are* the method's default settings: ``config_cls()`` and
    ``resolve()`` give the same config (tested). Presets are named overrides of those defaults."""

    cli_name: str  # "textual-inversion"
    method: str  # the concept method it produces ("textual_inversion")
    help: str
    config_cls: type  # a subclass of trainers.loop.CommonTrainConfig
    make_trainer: Callable[[Any, Any, str], Any]  # (base, config, token) -> MethodTrainer
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_preset: str | None = None  # the preset whose values are the config's defaults (its name, for display)
    min_images: int = 1
    # The run names one token per concept itself (Break-A-Scene's --concepts) and writes one file per token:
    # callers pass no --token, and a queued job publishes the files as "<name>-<concept>".
    tokens_per_concept: bool = False
    # One line for a creator choosing a method: what the concept is (size), how long it trains, and what
    # it learns, with the measured numbers it rests on (README "Defaults that learn" / "Measured").
    gives: str = ""

    def preset_values(self, preset: str | None = None) -> dict[str, Any]:
        """The values preset ``preset`` sets (``None``: the default preset; ``""``: none)."""
        name = self.default_preset if preset is None else preset
        if name and name not in self.presets:
            raise StudioError(f"Unknown preset {name!r} for {self.cli_name}; "
                              f"presets: {', '.join(self.presets) or 'none'}.")
        return dict(self.presets.get(name, {})) if name else {}

    def preset_name(self, preset: str | None = None, profile: Any = None) -> str | None:
        """The preset a run uses: ``preset`` when given (``""``: none), else the one the base's profile
        names for this trainer (the demo world's measured presets), else :attr:`default_preset`."""
        if preset is not None:
            return preset
        chosen = profile.preset_for(self.cli_name, self.presets) if profile is not None else None
        return chosen or self.default_preset

    def resolve(self, preset: str | None = None, *, profile: Any = None, **overrides: Any) -> Any:
        """The one way to make a config: the dataclass defaults, then the preset (:meth:`preset_name`),
        then ``overrides``. ``profile`` is the base's :class:`~studio.models.BaseProfile`, if known."""
        return self.config_cls(**(self.preset_values(self.preset_name(preset, profile)) | overrides))
