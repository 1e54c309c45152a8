"""The built-in trainers, listed explicitly (the registry imports the trainers, never the reverse)."""

from __future__ import annotations

from studio.errors import StudioError
from trainers.break_a_scene import ENTRY as BREAK_A_SCENE
from trainers.custom_diffusion import ENTRY as CUSTOM_DIFFUSION
from trainers.entry import TrainerEntry
from trainers.lora import ENTRY as LORA
from trainers.neti import ENTRY as NETI
from trainers.perfusion import ENTRY as PERFUSION
from trainers.prospect import ENTRY as PROSPECT
from trainers.textual_inversion import ENTRY as TEXTUAL_INVERSION
from trainers.zeroshot import ENTRY as ZEROSHOT

# The order is the order the CLI and the UI list them.
_TRAINERS: tuple[TrainerEntry, ...] = (TEXTUAL_INVERSION, LORA, NETI, ZEROSHOT, PERFUSION, PROSPECT, CUSTOM_DIFFUSION,
                                        BREAK_A_SCENE)


def trainer_registry() -> dict[str, TrainerEntry]:
    """All built-in trainers, by CLI name (a new dict each call)."""
    return {e.cli_name: e for e in _TRAINERS}


def get_trainer(name: str) -> TrainerEntry:
    """A trainer by CLI name (``textual-inversion``) or by the method it produces (``textual_inversion``)."""
    reg = trainer_registry()
    by_method = {e.method: e for e in reg.values()}
    entry = reg.get(name) or by_method.get(name)
    if entry is None:
        raise StudioError(f"Unknown training method {name!r}; available: {', '.join(sorted(reg))}.")
    return entry
