"""Trainers: one module per method. Each registers a :class:`TrainerEntry` (CLI name, config
dataclass, run function) so the CLI, the job queue and the UI list them without special cases."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainerEntry:
    cli_name: str  # "textual-inversion"
    method: str  # the concept method it produces ("textual_inversion")
    help: str
    config_cls: type
    add_cli_arguments: Callable[[Any], None]
    run_cli: Callable[[Any, Any], int]


_TRAINERS: dict[str, TrainerEntry] = {}


def register_trainer(entry: TrainerEntry) -> TrainerEntry:
    _TRAINERS[entry.cli_name] = entry
    return entry


def trainer_registry() -> dict[str, TrainerEntry]:
    """All built-in trainers (imported here so that registration is explicit)."""
    return dict(_TRAINERS)
