"""Trainers: one module per method. Each registers a :class:`TrainerEntry` (CLI name, config
dataclass, presets, how to build its :class:`~trainers.loop.MethodTrainer`) so the CLI, the job
queue and the UI list them without special cases. See :mod:`trainers.runner` to run one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainerEntry:
    cli_name: str  # "textual-inversion"
    method: str  # the concept method it produces ("textual_inversion")
    help: str
    config_cls: type  # a subclass of trainers.loop.CommonTrainConfig
    make_trainer: Callable[[Any, Any, str], Any]  # (base, config, token) -> MethodTrainer
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_preset: str | None = None
    min_images: int = 1


_TRAINERS: dict[str, TrainerEntry] = {}


def register_trainer(entry: TrainerEntry) -> TrainerEntry:
    _TRAINERS[entry.cli_name] = entry
    return entry


def trainer_registry() -> dict[str, TrainerEntry]:
    """All built-in trainers, by CLI name (imported here so that registration is explicit)."""
    from trainers import textual_inversion  # noqa: F401
    from trainers import dreambooth  # noqa: F401
    from trainers import neti  # noqa: F401
    from trainers import adapter  # noqa: F401
    from trainers import perfusion  # noqa: F401

    return dict(_TRAINERS)


def get_trainer(name: str) -> TrainerEntry:
    from studio.errors import StudioError

    reg = trainer_registry()
    by_method = {e.method: e for e in reg.values()}
    entry = reg.get(name) or by_method.get(name)
    if entry is None:
        raise StudioError(f"Unknown training method {name!r}; available: {', '.join(sorted(reg))}.")
    return entry
