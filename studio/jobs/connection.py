"""Opening a job queue and reading it: the database, the job folders, jobs, events and waiting.

:class:`QueueConnection` is the part of :class:`~studio.jobs.queue.JobQueue` that only looks: it
opens the database for a URL (:func:`open_backend`: SQLite beside the library by default, or
PostgreSQL), applies its migrations, knows where job folders are (:class:`~studio.jobs.storage.JobStorage`),
reads jobs and events, waits for changes, and recovers jobs whose worker is gone
(:mod:`studio.jobs.recovery`) so that nothing reads a dead job as running. The queue's actions —
submitting, pausing, claiming, finishing — are in :mod:`studio.jobs.queue`.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from studio.errors import StudioError
from studio.jobs import recovery
from studio.jobs.backend import QueueBackend, Transaction
from studio.jobs.records import (
    DB_NAME,
    DEFAULT_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    JOBS_DIR,
    STATES,
    TERMINAL,
    Job,
    JobEvent,
    device_key,
    host_id,
)
from studio.jobs.storage import JobStorage

_Self = TypeVar("_Self", bound="QueueConnection")
POLL_MAX = 1.0  # seconds: the longest pause between looks while waiting on a queue that cannot push changes


def open_backend(url: str | None, root: Path) -> QueueBackend:
    """The database for ``url``: None/empty → SQLite in ``root`` (``jobs.sqlite``), ``sqlite:///PATH``,
    or ``postgresql://…`` / ``postgres://…``."""
    text = (url or "").strip()
    if not text:
        from studio.jobs.sqlite_backend import SqliteBackend

        return SqliteBackend(root / DB_NAME)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme == "sqlite":
        from studio.jobs.sqlite_backend import SqliteBackend

        return SqliteBackend(Path(text.split("://", 1)[1]).expanduser())
    if scheme in ("postgresql", "postgres"):
        from studio.jobs.postgres_backend import PostgresBackend

        return PostgresBackend(text)
    raise StudioError(f"Unknown queue URL {text.split('://', 1)[0]}://…; use postgresql://user@host/db, "
                      "sqlite:///path, or none for the library's own queue.")


class QueueConnection:
    """A job queue opened for reading (see :class:`~studio.jobs.queue.JobQueue`, which adds the actions).

    Args:
        library: the library jobs publish to (a :class:`~studio.library.Library` or a folder).
        url: the database (see :func:`open_backend`); default: SQLite in ``root``.
        root: the local queue folder (default ``<library>/.jobs``): the SQLite file, staging of submissions.
        storage: where job folders go (a path or an fsspec URL; default ``root``) — shared by all
            workers when they run on several machines.
        work_dir: where this machine keeps working copies of jobs in remote storage.
        lease: how long a running job of this process's workers may go without a heartbeat before it
            is taken back (recorded with the job, so every machine judges it alike).
        max_attempts: deaths in a row without progress before a job fails.
        host: the name of this machine in the queue (default :func:`studio.atomic.host_id`): one job
            per device per machine name; process ids are only checked for this name.
    """

    def __init__(self, library: str | os.PathLike[str] | Any = "concepts", *, root: str | os.PathLike[str] | None = None,
                 url: str | None = None, storage: str | os.PathLike[str] | None = None,
                 work_dir: str | os.PathLike[str] | None = None, lease: float = DEFAULT_LEASE,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, host: str | None = None):
        folder = getattr(library, "folder", library)  # a studio.library.Library or a path
        self.library_folder = Path(folder).expanduser().resolve()
        self.root = Path(root).expanduser().resolve() if root else self.library_folder / JOBS_DIR
        self.db_path = self.root / DB_NAME  # the SQLite file (when the queue is SQLite's)
        if lease <= 0 or max_attempts < 1:
            raise StudioError(f"lease must be > 0 and max_attempts ≥ 1, got {lease} and {max_attempts}.")
        self.lease, self.max_attempts = float(lease), int(max_attempts)
        self.host = host or host_id()
        self.url = (url or "").strip() or None
        self.storage = JobStorage(storage or self.root, work_dir=work_dir)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StudioError(f"Cannot create the job folder {self.root} ({err.strerror}); check the library path "
                              "and its permissions.") from err
        self.backend = open_backend(self.url, self.root)
        try:
            self.backend.migrate()
        except BaseException:
            self.backend.close()
            raise
        for staging in self.root.glob(".staging-*"):  # inputs copied by a submit that died an hour ago
            with contextlib.suppress(OSError):
                if staging.stat().st_mtime < time.time() - 3600:
                    shutil.rmtree(staging, ignore_errors=True)
        self.remove_stale_temporaries()

    @property
    def library(self) -> Any:
        """The :class:`~studio.library.Library` jobs publish to (imported lazily: it needs torch)."""
        from studio.library import Library

        return Library(self.library_folder)

    @property
    def where(self) -> str:
        """The queue's database, for messages (a file, or a URL without its password)."""
        return self.backend.where

    def close(self) -> None:
        """Release the database connections (and PostgreSQL's listener thread)."""
        self.backend.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files that killed writers left in the job folders (never one of a live
        process: :func:`studio.atomic.remove_stale_temporaries`); done when the queue is opened."""
        from studio.atomic import remove_stale_temporaries
        from studio.jobs.prepare import CHECKPOINTS, PREVIEWS

        removed: list[Path] = []
        if self.storage.remote:
            return removed
        for folder in Path(self.storage.url).glob("job-*"):
            for sub in (folder, folder / PREVIEWS, folder / CHECKPOINTS):
                removed += remove_stale_temporaries(sub)
        return removed

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        with self.backend.read() as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Transaction]:
        """One write transaction (committed with its events, which are then mirrored to files)."""
        with self.backend.write() as tx:
            yield tx
        self._mirror(tx.events)

    def _mirror(self, events: list[JobEvent]) -> None:
        """Append events to ``<job>/events.jsonl`` (a readable log; the database is the source of truth)."""
        by_job: dict[int, list[str]] = {}
        for e in events:
            by_job.setdefault(e.job, []).append(json.dumps({"seq": e.seq, "time": e.time, "kind": e.kind,
                                                            "data": e.data}, default=str))
        for job, lines in by_job.items():
            folder = self.job_folder(job)
            if folder.is_dir():
                with contextlib.suppress(OSError), open(folder / "events.jsonl", "a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")

    def changes(self) -> int:
        """A count of the changes this process has seen: pass it to :meth:`wait_for_change` as ``since``."""
        return self.backend.changes()

    def notify(self) -> None:
        """Wake this process's waiters (other processes are woken by the database, or look again)."""
        self.backend.notify()

    def wait_for_change(self, timeout: float, since: int | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on a change (after ``since`` when given): any
        change on PostgreSQL (LISTEN/NOTIFY), one made in this process on SQLite."""
        return self.backend.wait_for_change(timeout, since)

    @property
    def pushes_changes(self) -> bool:
        """Whether other processes' changes wake :meth:`wait_for_change` (PostgreSQL) — else waiters poll."""
        return self.backend.pushes_changes

    def job_folder(self, job_id: int) -> Path:
        """Where a job of this queue's storage keeps its files on this machine."""
        return self.storage.folder(job_id)

    def _job(self, row: Any) -> Job:
        d = dict(row)
        for key in ("base", "config", "inputs"):
            d[key] = json.loads(d[key])
        d["destination"] = Path(d["destination"])
        return Job(folder=self.storage.folder(d["id"], d.get("location")), **d)

    # -- reading ---------------------------------------------------------------------------
    def get(self, job_id: int) -> Job:
        """The job as it is now (a :class:`StudioError` naming ``jobs list`` when there is none)."""
        with self._connection() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise StudioError(f"No job {job_id} in {self._named()} (see `python -m studio jobs list`).")
        return self._job(row)

    def list(self, states: Iterable[str] | None = None) -> list[Job]:
        """Jobs in queue order (running first, then queued by priority, then the rest, newest last).

        Running jobs whose worker is gone are recovered first, so the list never shows a dead job as running."""
        self.recover()
        wanted = sorted(set(states)) if states else list(STATES)
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE state IN ({_marks(wanted)}) ORDER BY "
                "CASE state WHEN 'running' THEN 0 WHEN 'queued' THEN 1 WHEN 'paused' THEN 2 ELSE 3 END, "
                "CASE WHEN state = 'queued' THEN -priority ELSE 0 END, id", wanted).fetchall()
        return [self._job(r) for r in rows]

    def events(self, job_id: int | None = None, after: int = 0, *, kinds: Iterable[str] | None = None,
               limit: int | None = None) -> builtins.list[JobEvent]:
        """Events with ``seq > after`` (of one job or all), oldest first. Poll with the last ``seq`` seen."""
        args: builtins.list[int | str]
        sql, args = "SELECT * FROM events WHERE seq > ?", [int(after)]
        if job_id is not None:
            sql, args = sql + " AND job = ?", [*args, int(job_id)]
        if kinds:
            k = sorted(set(kinds))
            sql, args = sql + f" AND kind IN ({_marks(k)})", [*args, *k]
        sql += " ORDER BY seq" + (f" LIMIT {int(limit)}" if limit else "")
        with self._connection() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [JobEvent(r["seq"], r["job"], r["time"], r["kind"], json.loads(r["data"])) for r in rows]

    def wait_events(self, job_id: int | None = None, after: int = 0, timeout: float = 30.0) -> builtins.list[JobEvent]:
        """Like :meth:`events`, but blocks up to ``timeout`` seconds until there is at least one (woken
        by the database's notifications on PostgreSQL; on SQLite looking again after a growing pause,
        woken at once by changes made in this process)."""
        deadline = time.monotonic() + max(0.0, timeout)
        delay = 0.05
        while True:
            seen = self.changes()
            found = self.events(job_id, after)
            left = deadline - time.monotonic()
            if found or left <= 0:
                return found
            self.wait_for_change(left if self.pushes_changes else min(delay, left), since=seen)
            delay = min(delay * 1.5, POLL_MAX)

    def wait(self, job_id: int, states: Iterable[str] = TERMINAL, timeout: float | None = None) -> Job:
        """Block until the job is in one of ``states`` (default: done, failed or cancelled) and return it;
        raise :class:`TimeoutError` after ``timeout`` seconds."""
        wanted = set(states)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            seen = self.changes()
            job = self.get(job_id)
            if job.state in wanted:
                return job
            if job.state == "running" and recovery.abandoned(job, time.time(), host=self.host, lease=self.lease):
                self.recover()
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout} s")
            # A worker that dies sends nothing: look again within its lease even when changes are pushed.
            pause = (job.lease or self.lease) / 2 if self.pushes_changes else delay
            self.wait_for_change(pause if left is None else min(pause, left), since=seen)
            delay = min(delay * 1.5, POLL_MAX)

    def loss_curve(self, job_id: int) -> builtins.list[tuple[int, float]]:
        """``(step, loss)`` of every step trained so far (a step re-run after a crash counts once)."""
        by_step = {e.data["step"]: float(e.data["loss"]) for e in self.events(job_id, kinds=["progress"])}
        return sorted(by_step.items())

    def has_queued(self, device: str | None = None) -> bool:
        """Whether a queued job could run on ``device`` (any device when None)."""
        with self._connection() as conn:
            if device is None:
                return conn.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is not None
            return conn.execute("SELECT 1 FROM jobs WHERE state = 'queued' AND (device IS NULL OR device = ?) LIMIT 1",
                                (device_key(device) or "cpu",)).fetchone() is not None

    def recover(self) -> builtins.list[int]:
        """Take back running jobs whose worker is gone; return their ids."""
        with self._connection() as conn:
            running = [self._job(r) for r in conn.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()]
        now = time.time()
        if not any(recovery.abandoned(j, now, host=self.host, lease=self.lease) for j in running):
            return []
        with self._write() as tx:
            return self._recover(tx, now)

    def _recover(self, tx: Transaction, now: float) -> builtins.list[int]:
        return recovery.recover(tx, now, to_job=self._job, host=self.host, lease=self.lease,
                                max_attempts=self.max_attempts)

    def last_checkpoint(self, job_id: int) -> str | None:
        """The folder name (``step-NNNNNN``) of the job's newest recorded checkpoint, or None."""
        found = self.events(job_id, kinds=["checkpoint"])
        return Path(str(found[-1].data.get("path", ""))).name or None if found else None

    def request(self, job_id: int) -> str | None:
        """What the user asked of a running job: ``"pause"``, ``"cancel"`` or None."""
        with self._connection() as conn:
            row = conn.execute("SELECT request FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        return row["request"] if row else "cancel"

    def _named(self) -> str:
        return str(self.root) if self.url is None else self.where

    def _locked_get(self, tx: Transaction, job_id: int) -> Job:
        row = tx.execute(f"SELECT * FROM jobs WHERE id = ?{tx.lock_rows}", (int(job_id),)).fetchone()
        if row is None:
            raise StudioError(f"No job {job_id} in {self._named()} (see `python -m studio jobs list`).")
        return self._job(row)


def _marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)
