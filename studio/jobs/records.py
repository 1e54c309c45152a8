"""The job queue's data model: states, :class:`Job` and :class:`JobEvent`, and the host/process
helpers a lease is judged with (from :mod:`studio.atomic`); the tables are in :mod:`studio.jobs.schema`.
No torch, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from studio.atomic import host_id, pid_alive  # noqa: F401  (the lease is judged with them)
from studio.errors import StudioError

JobState = Literal["queued", "running", "paused", "done", "failed", "cancelled"]
STATES: tuple[str, ...] = ("queued", "running", "paused", "done", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"queued", "running", "paused", "failed"})  # hold their concept name
EventKind = Literal["state", "progress", "log", "preview", "checkpoint"]

JOBS_DIR = ".jobs"
DB_NAME = "jobs.sqlite"
DEFAULT_LEASE = 60.0  # seconds without a heartbeat before a running job counts as abandoned
DEFAULT_MAX_ATTEMPTS = 3


def device_key(device: str | None) -> str | None:
    """A canonical device name for locking: ``cuda`` → ``cuda:0``, ``cpu:3`` → ``cpu``; None/auto → None."""
    if device is None or not str(device).strip() or str(device).strip().lower() == "auto":
        return None
    d = str(device).strip().lower()
    if d == "cuda":
        return "cuda:0"
    if d.split(":")[0] in ("cpu", "mps"):
        return d.split(":")[0]
    return d


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event log. ``data`` by ``kind``:

    * ``state``: ``{"state", "message"}`` (+ ``"error"`` when failed);
    * ``progress``: ``{"step", "total", "loss", "seconds"}`` — one per optimizer step (the loss curve);
    * ``log``: ``{"message"}``; ``preview``: ``{"step", "path"}``; ``checkpoint``: ``{"step", "path"}``.
    """

    seq: int
    job: int
    time: float
    kind: str
    data: dict[str, Any]

    def text(self) -> str:
        d = self.data
        if self.kind == "progress":
            return f"step {d['step']}/{d['total']}  loss {d['loss']:.4f}"
        if self.kind == "state":
            return f"{d['state']}: {d.get('message', '')}".rstrip(": ")
        if self.kind in ("preview", "checkpoint"):
            return f"{self.kind} at step {d['step']}: {d['path']}"
        return str(d.get("message", d))


@dataclass(frozen=True)
class Job:
    """A snapshot of one job (re-read it with :meth:`JobQueue.get` to see progress)."""

    id: int
    trainer: str
    name: str
    token: str
    destination: Path
    state: str
    request: str | None
    priority: int
    device: str | None
    base: dict[str, Any]
    config: dict[str, Any]
    inputs: dict[str, str]
    source: str
    folder: Path
    worker: str | None
    worker_pid: int | None
    worker_host: str | None
    run_device: str | None
    heartbeat: float | None
    attempts: int
    step: int
    total: int
    loss: float | None
    eta: float | None
    preview: str | None
    result: str | None
    error: str | None
    created: float
    started: float | None
    updated: float
    finished: float | None
    lease: float | None = None  # the lease its worker promised (seconds between heartbeats at most)
    location: str | None = None  # where its files live in shared storage: a path or an fsspec URL

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def row(self) -> dict[str, Any]:
        """A short summary for tables (CLI ``jobs list``, the UI's queue view)."""
        state = self.state + (f" ({self.request} requested)" if self.request else "")
        return {"id": self.id, "state": state, "method": self.trainer, "name": self.name, "trigger": self.token,
                "progress": f"{self.step}/{self.total}", "loss": None if self.loss is None else round(self.loss, 4),
                "eta_s": None if self.eta is None or self.state != "running" else round(self.eta),
                "base": self.base.get("base", ""), "error": self.error or ""}

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["destination"], d["folder"] = str(self.destination), str(self.folder)
        return d


def as_dict(value: Any) -> dict[str, Any]:
    """A dataclass or mapping → a plain dict."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise StudioError(f"Expected a config dataclass or a dict, got {type(value).__name__}.")
