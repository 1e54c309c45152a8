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

    def preset_values(self, preset: str | None = None) -> dict[str, Any]:
        """The values preset ``preset`` sets (``None``: the default preset; ``""``: none)."""
        name = self.default_preset if preset is None else preset
        if name and name not in self.presets:
            raise StudioError(f"Unknown preset {name!r} for {self.cli_name}; "
                              f"presets: {', '.join(self.presets) or 'none'}.")
        return dict(self.presets.get(name, {})) if name else {}

    def resolve(self, preset: str | None = None, **overrides: Any) -> Any:
        """``config_cls`` from the dataclass defaults, then preset ``preset``, then ``overrides``."""
        return self.config_cls(**(self.preset_values(preset) | overrides))
