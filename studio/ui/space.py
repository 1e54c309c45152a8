"""Hugging Face Spaces: ``spaces.GPU`` when the ``spaces`` package is importable, a no-op otherwise.

On ZeroGPU a GPU is attached only while a function decorated with ``@spaces.GPU(duration=…)``
runs, so the app decorates exactly the calls that run the pipeline (generation, evaluation, a chunk
of training) — module-level functions in ``app.py`` — and returns CPU results (PIL images). Long
training does not fit in one call: on ZeroGPU the app runs queued jobs in chunks (:func:`run_jobs_for`)
that stop with a checkpoint and resume at the next chunk.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def on_space() -> bool:
    """Running as a Hugging Face Space (the runtime sets ``SPACE_ID``)."""
    return bool(os.environ.get("SPACE_ID"))


def zero_gpu() -> bool:
    """Running on ZeroGPU hardware (GPU only inside ``spaces.GPU`` calls)."""
    return on_space() and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(duration: int = 60) -> Callable[[F], F]:
    """``@gpu(duration=120)``: ``spaces.GPU(duration=…)`` when ``spaces`` is importable, else the function itself.

    ``spaces`` is imported when the decorator is applied (at the import of the module defining the
    function, as ZeroGPU requires), not when this module is imported."""

    def decorate(fn: F) -> F:
        try:
            import spaces
        except ImportError:
            return fn
        return spaces.GPU(duration=duration)(fn)

    return decorate


def run_jobs_for(queue: Any, seconds: float, *, device: str | None = None) -> str:
    """Run queued training jobs for at most ``seconds``: a job still running then checkpoints and
    goes back to the queue (the next call resumes it). Returns a one-line summary."""
    from studio.jobs import Worker

    stop = threading.Event()
    timer = threading.Timer(max(1.0, float(seconds)), stop.set)
    lines: list[str] = []
    worker = Worker(queue, device=device, report=lines.append)
    timer.start()
    try:
        worker.run(once=True, stop_event=stop)
    finally:
        timer.cancel()
    return "; ".join(lines) or "no queued job"
