"""``Studio``: the one facade the CLI, the UI and Python users call (no gradio here)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from studio.concept import Concept, load_concept
from studio.generation import GenerateConfig, generate
from studio.jobs import JobQueue
from studio.library import DEFAULT_LIBRARY, Library
from studio.models import BaseModel, load_base


@dataclass
class BaseSettings:
    """How to load the base (shared by the CLI flags and the UI)."""

    base: str = "demo"
    device: str | None = None  # auto: cuda → mps → cpu
    dtype: str | None = None  # auto: fp16 on GPU, fp32 on CPU
    attention: str = "sdpa"
    prediction_type: str | None = None
    offload: bool = False


class Studio:
    """A base model (loaded on first use) + a concept library.

    >>> studio = Studio(BaseSettings(base="tiny"), library="concepts")
    >>> images = studio.generate(GenerateConfig(prompt="a photo of a cat", seed=3))
    """

    def __init__(self, settings: BaseSettings | None = None, library: str | Path = DEFAULT_LIBRARY,
                 base: BaseModel | None = None):
        self.settings = settings or BaseSettings()
        self.library = Library(library)
        self._base = base
        self._lock = threading.RLock()  # one pipeline: one call at a time
        self.notes: list[str] = []
        self._jobs: JobQueue | None = None

    @property
    def base(self) -> BaseModel:
        with self._lock:
            if self._base is None:
                s = self.settings
                self._base = load_base(s.base, device=s.device, dtype=s.dtype, attention=s.attention,
                                       prediction_type=s.prediction_type, offload=s.offload)
            return self._base

    @property
    def jobs(self) -> JobQueue:
        """The library's training-job queue (run it with ``Worker(studio.jobs).start()`` or
        ``python -m studio jobs work``)."""
        with self._lock:
            if self._jobs is None:
                self._jobs = JobQueue(self.library)
            return self._jobs

    def switch_base(self, settings: BaseSettings) -> BaseModel:
        with self._lock:
            self.settings = settings
            self._base = None
            return self.base

    def load_concept(self, source: str) -> Concept:
        """A file path or a library name → the validated concept."""
        return load_concept(self.library.resolve(source))

    def generate(self, cfg: GenerateConfig, callback: Any = None) -> list[Image.Image]:
        concepts = [(self.load_concept(c.source), c.strength, c.source) for c in cfg.concepts]
        with self._lock:
            self.notes = []
            return generate(self.base, cfg, concepts, notes=self.notes, callback=callback)
