"""Trainers: one module per method, named like the method's folder under ``studio/methods/``
(``trainers/lora.py`` trains ``studio/methods/lora``). Each declares a :class:`~trainers.entry.TrainerEntry`
(CLI name, config dataclass, presets, how to build its :class:`~trainers.loop.MethodTrainer`);
:mod:`trainers.registry` lists them, so the CLI, the job queue and the UI need no special cases.
See :mod:`trainers.runner` to run one."""

from trainers.entry import TrainerEntry
from trainers.registry import get_trainer, trainer_registry

__all__ = ["TrainerEntry", "get_trainer", "trainer_registry"]
