"""Run a trainer: pick the token, build the method's trainer, run the shared loop, save.

Used by ``python -m studio train METHOD`` (foreground), by the job queue and by the UI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from studio.configs import add_arguments, from_namespace
from studio.errors import StudioError
from studio.library import Library, check_name
from studio.prompts import normalize_token
from trainers import TrainerEntry
from trainers.data import load_image_folder
from trainers.loop import CommonTrainConfig, TrainCallbacks, TrainControl, TrainResult, run_training


def make_config(entry: TrainerEntry, preset: str | None = None, **values: Any) -> CommonTrainConfig:
    """``entry.config_cls`` from a preset (default: the method's) overridden by ``values``."""
    name = preset or entry.default_preset
    base = dict(entry.presets.get(name, {})) if name else {}
    if name and name not in entry.presets:
        raise StudioError(f"Unknown preset {name!r} for {entry.cli_name}; presets: {', '.join(entry.presets) or 'none'}.")
    base.update(values)
    return entry.config_cls(**base)


def choose_token(cfg: CommonTrainConfig, library: Library | None) -> str:
    """The user's token, or ``<name>`` / ``<class-word>``, made unique within the library."""
    if cfg.token:
        return normalize_token(cfg.token)
    stem = cfg.name or (cfg.class_word.replace(" ", "-") if cfg.class_word else "concept")
    token = normalize_token(stem)
    used = {t for info in (library.list() if library else []) for t in info.tokens}
    i = 2
    candidate = token
    while candidate in used:
        candidate = f"{token[:-1]}-{i}>"
        i += 1
    return candidate


def train(entry: TrainerEntry, cfg: CommonTrainConfig, base: Any, *, library: Library | None = None,
          callbacks: TrainCallbacks | None = None, control: TrainControl | None = None) -> TrainResult:
    """Train ``cfg`` on ``base`` (a loaded :class:`~studio.models.BaseModel`) and save the concept
    to ``cfg.out`` or, when that is empty, into ``library`` under ``cfg.name`` / the token."""
    token = choose_token(cfg, library)
    if not cfg.out:
        if library is None:
            raise StudioError("Say where the concept goes: --out FILE.safetensors, or a library.")
        name = check_name(cfg.name or token.strip("<>"))
        cfg.out = str(library.path(name))
        cfg.name = name
    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        raise StudioError(f"--out {out} must end in .safetensors.")
    resolution = cfg.resolution or base.native_size
    examples = load_image_folder(cfg.images, resolution, min_images=entry.min_images)
    trainer = entry.make_trainer(base, cfg, token)
    result = run_training(base, trainer, cfg, method=entry.method, examples=examples, callbacks=callbacks,
                          control=control)
    return result


class PrintCallbacks(TrainCallbacks):
    """Foreground progress on stderr."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def on_step(self, step: int, total: int, loss: float, seconds: float) -> None:
        if step == total or step % max(1, total // 20) == 0:
            eta = seconds / max(1, step) * (total - step)
            print(f"step {step}/{total}  loss {loss:.4f}  eta {eta:.0f}s", file=sys.stderr)

    def on_checkpoint(self, step: int, path: Path) -> None:
        print(f"checkpoint {path}", file=sys.stderr)

    def on_log(self, message: str) -> None:
        if not message.startswith("step "):
            print(message, file=sys.stderr)


def add_cli_arguments(entry: TrainerEntry, parser: argparse.ArgumentParser) -> None:
    if entry.presets:
        parser.add_argument("--preset", choices=sorted(entry.presets), default=None,
                            help=f"settings preset (default: {entry.default_preset})")
    add_arguments(parser, entry.config_cls, suppress_defaults=True)


def run_cli(entry: TrainerEntry, ns: argparse.Namespace, settings: Any) -> int:
    from studio.models import load_base

    preset = getattr(ns, "preset", None) or entry.default_preset
    cfg = from_namespace(entry.config_cls, ns, base=dict(entry.presets.get(preset, {})) if preset else {})
    if not cfg.images:
        raise StudioError("--images DIR is required: the folder of training images.")
    base = load_base(settings.base, device=settings.device, dtype=settings.dtype, attention=settings.attention,
                     prediction_type=settings.prediction_type)
    result = train(entry, cfg, base, library=Library(ns.library), callbacks=PrintCallbacks())
    print(result.path)
    print(f"trained {result.steps} steps in {result.seconds:.1f}s", file=sys.stderr)
    return 0
