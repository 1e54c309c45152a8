"""The persistent job queue: SQLite beside the library, one folder per job (docs/architecture.md, "Jobs").

State lives only in the database and the job folders, so the queue survives a crash or a restart
of every process that uses it::

    <library>/.jobs/jobs.sqlite          the queue (WAL mode: readers never block the worker)
    <library>/.jobs/job-000007/          one folder per job (see :mod:`studio.jobs.execute`)

Life of a job::

    queued ──claim──▶ running ──▶ done
      ▲ │               │  ├────▶ failed      (error text; ``resume`` retries from the last checkpoint)
      │ └──pause──▶ paused ◀┤     (a running job pauses after the next step, with a checkpoint)
      │              │      └───▶ cancelled
      └────resume────┘

Cross-process rules, enforced by the database itself:

* every state change is one ``BEGIN IMMEDIATE`` transaction (one writer at a time), and a claim
  is ``UPDATE … WHERE state = 'queued'`` inside it, so two workers never take the same job;
* a partial unique index allows one running job per device;
* a running job carries its worker's id, pid, host and a heartbeat (a lease). A job whose
  heartbeat is older than the lease, or whose worker process is gone (same host), is recovered
  by the next claim or listing: back to ``queued`` (it resumes from its last checkpoint), or to
  ``failed`` once its worker died ``max_attempts`` times in a row without progress — no checkpoint
  beyond the ones it had when it was claimed (a job that kills its worker at the same step — out of
  memory — must not loop forever; one that checkpoints between deaths keeps going);
* a worker only writes a job it still holds (``… AND worker = ?``); when that matches nothing it
  has lost the lease and stops.

This module imports neither torch nor the trainers until a job is submitted: listing, claiming
and following events are cheap.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.jobs.records import (
    ACTIVE,
    DB_NAME,
    DEFAULT_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    JOBS_DIR,
    SCHEMA,
    SCHEMA_VERSION,
    STATES,
    TERMINAL,
    EventKind,
    Job,
    JobEvent,
    JobState,
    as_dict,
    device_key,
    host_id,
    pid_alive,
)

__all__ = ["JobQueue", "Job", "JobEvent", "JobState", "EventKind", "STATES", "TERMINAL", "as_dict", "device_key"]


class _Tx:
    """One write transaction; events are inserted with it and mirrored to files after the commit."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.events: list[JobEvent] = []

    def execute(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, tuple(args))

    def event(self, job: int, kind: str, data: dict[str, Any], when: float | None = None) -> None:
        when = time.time() if when is None else when
        cur = self.conn.execute("INSERT INTO events (job, time, kind, data) VALUES (?, ?, ?, ?)",
                                (job, when, kind, json.dumps(data, default=str)))
        self.events.append(JobEvent(int(cur.lastrowid or 0), job, when, kind, data))


class JobQueue:
    """The training-job queue of a library.

    >>> queue = JobQueue("concepts")
    >>> job = queue.submit("textual-inversion", {"images": "photos/", "class_word": "cat", "steps": 200},
    ...                    base={"base": "tiny"})
    >>> Worker(queue).run(once=True)          # or: python -m studio jobs work --once
    >>> queue.get(job.id).state
    'done'

    Safe to share between threads (each call opens its own connection) and between processes.
    ``lease`` is how long a running job may go without a heartbeat before it is taken back.
    """

    def __init__(self, library: str | os.PathLike[str] | Any = "concepts", *, root: str | os.PathLike[str] | None = None,
                 lease: float = DEFAULT_LEASE, max_attempts: int = DEFAULT_MAX_ATTEMPTS):
        folder = getattr(library, "folder", library)  # a studio.library.Library or a path
        self.library_folder = Path(folder).expanduser().resolve()
        self.root = Path(root).expanduser().resolve() if root else self.library_folder / JOBS_DIR
        self.db_path = self.root / DB_NAME
        if lease <= 0 or max_attempts < 1:
            raise StudioError(f"lease must be > 0 and max_attempts ≥ 1, got {lease} and {max_attempts}.")
        self.lease, self.max_attempts = float(lease), int(max_attempts)
        self.host = host_id()
        self._changed = threading.Condition()
        self._init_db()

    @property
    def library(self) -> Any:
        """The :class:`~studio.library.Library` jobs publish to (imported lazily: it needs torch)."""
        from studio.library import Library

        return Library(self.library_folder)

    # -- storage ---------------------------------------------------------------------------
    def _init_db(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StudioError(f"Cannot create the job folder {self.root} ({err.strerror}); check the library path "
                              "and its permissions.") from err
        with self._connection() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StudioError(f"The job queue {self.db_path} was made by a newer studio (schema {version}); "
                                  "upgrade the studio to use it.")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        for staging in self.root.glob(".staging-*"):  # inputs copied by a submit that died an hour ago
            with contextlib.suppress(OSError):
                if staging.stat().st_mtime < time.time() - 3600:
                    shutil.rmtree(staging, ignore_errors=True)
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files that killed writers left in the job folders (never one of a live
        process: :func:`studio.atomic.remove_stale_temporaries`); done when the queue is opened."""
        from studio.atomic import remove_stale_temporaries
        from studio.jobs.prepare import CHECKPOINTS, PREVIEWS

        removed = []
        for folder in self.root.glob("job-*"):
            for sub in (folder, folder / PREVIEWS, folder / CHECKPOINTS):
                removed += remove_stale_temporaries(sub)
        return removed

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as err:
            raise StudioError(f"Cannot open the job queue {self.db_path} ({err}).") from err
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")
            yield conn
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise StudioError(f"The job queue {self.db_path} stayed locked for 30 s; another process holds it "
                                  "(is the library on a network drive? SQLite needs a local disk).") from err
            raise
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Tx]:
        """One IMMEDIATE transaction (the database's write lock is taken at BEGIN)."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            tx = _Tx(conn)
            try:
                yield tx
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        self._mirror(tx.events)
        self.notify()

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

    def notify(self) -> None:
        """Wake this process's waiters (other processes notice on their next poll)."""
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, waking early when this process changes the queue."""
        with self._changed:
            self._changed.wait(timeout)

    def job_folder(self, job_id: int) -> Path:
        return self.root / f"job-{int(job_id):06d}"

    def _job(self, row: sqlite3.Row) -> Job:
        d = dict(row)
        for key in ("base", "config", "inputs"):
            d[key] = json.loads(d[key])
        d["destination"] = Path(d["destination"])
        return Job(folder=self.job_folder(d["id"]), **d)

    # -- user actions ----------------------------------------------------------------------
    def submit(self, trainer: str, config: Any, base: Any = None, *, preset: str | None = None,
               priority: int = 0) -> Job:
        """Queue a training job and return it.

        Args:
            trainer: a :class:`~trainers.TrainerEntry` CLI name (``"textual-inversion"``) or method name.
            config: the method's config dataclass, or a dict of its fields (completed from ``preset``,
                default: the method's default preset; a dataclass is taken as is). ``images`` is
                required; ``out`` (optional) sends the concept to a file instead of the library;
                ``checkpoint_every`` 0 becomes :func:`~studio.jobs.prepare.default_checkpoint_every`.
            base: :class:`~studio.service.BaseSettings`, a dict of its fields, or a base spec string.
            priority: higher runs first; equal priorities run in submission order.

        The config is validated now (errors raise :class:`StudioError`); the image folder and the
        files the config names are copied into the job folder, so later edits do not change the job.
        """
        from studio.jobs.prepare import prepare_job, reserve_name

        prepared = prepare_job(trainer, config, base, preset=preset)
        staging = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        folder: Path | None = None
        try:
            prepared.stage(staging)
            now = time.time()
            with self._write() as tx:
                used = [(r["name"], r["token"], r["destination"]) for r in tx.execute(
                    f"SELECT name, token, destination FROM jobs WHERE state IN ({_marks(ACTIVE)})", sorted(ACTIVE))]
                name, token, destination = reserve_name(prepared, self.library, used)
                prepared.config.update(name=name, token=token)
                cur = tx.execute(
                    "INSERT INTO jobs (trainer, name, token, destination, state, priority, device, base, config, "
                    "inputs, source, total, created, updated) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (prepared.trainer, name, token, str(destination), int(priority),
                     device_key(prepared.base.get("device")), json.dumps(prepared.base),
                     json.dumps(prepared.config, default=str), json.dumps(prepared.inputs), prepared.source,
                     int(prepared.config["steps"]), now, now))
                job_id = int(cur.lastrowid or 0)
                folder = self.job_folder(job_id)
                if self.job_folder(job_id).exists():  # left by a submit that died before its commit
                    shutil.rmtree(self.job_folder(job_id))
                folder = self.job_folder(job_id)
                os.replace(staging, folder)
                prepared.write_manifest(folder, job_id, name, token, destination)
                tx.event(job_id, "state", {"state": "queued", "message": f"submitted ({prepared.trainer}, "
                                           f"{prepared.config['steps']} steps, concept {name!r} {token})"})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if folder is not None:  # the row was rolled back: no job owns the folder
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return self.get(job_id)

    def get(self, job_id: int) -> Job:
        with self._connection() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise StudioError(f"No job {job_id} in {self.root} (see `python -m studio jobs list`).")
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

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued or paused job now; a running one stops after its current step."""
        with self._write() as tx:
            job = self._locked_get(tx, job_id)
            if job.state in ("queued", "paused"):
                self._set_state(tx, job, "cancelled", "cancelled by the user")
            elif job.state == "running":
                tx.execute("UPDATE jobs SET request = 'cancel', updated = ? WHERE id = ?", (time.time(), job.id))
                tx.event(job.id, "log", {"message": "cancel requested; stopping after the current step"})
            else:
                raise StudioError(f"Job {job.id} is {job.state}; only queued, paused or running jobs can be cancelled.")
        self.recover()  # a running job whose worker is dead is cancelled right away
        return self.get(job_id)

    def pause(self, job_id: int) -> Job:
        """Hold a queued job; a running one saves a checkpoint after its current step and stops."""
        with self._write() as tx:
            job = self._locked_get(tx, job_id)
            if job.state == "queued":
                self._set_state(tx, job, "paused", "paused by the user")
            elif job.state == "running":
                tx.execute("UPDATE jobs SET request = 'pause', updated = ? WHERE id = ?", (time.time(), job.id))
                tx.event(job.id, "log", {"message": "pause requested; stopping after the current step"})
            elif job.state != "paused":
                raise StudioError(f"Job {job.id} is {job.state}; only queued or running jobs can be paused.")
        self.recover()
        return self.get(job_id)

    def resume(self, job_id: int) -> Job:
        """Queue a paused, failed or cancelled job again; it continues from its last checkpoint."""
        from studio.jobs.prepare import check_destination_free

        with self._write() as tx:
            job = self._locked_get(tx, job_id)
            if job.state == "running" and job.request == "pause":
                tx.execute("UPDATE jobs SET request = NULL, updated = ? WHERE id = ?", (time.time(), job.id))
                tx.event(job.id, "log", {"message": "pause request withdrawn"})
            elif job.state in ("paused", "failed", "cancelled"):
                if job.state == "cancelled":
                    others = [(r["name"], r["destination"]) for r in tx.execute(
                        f"SELECT name, destination FROM jobs WHERE id != ? AND state IN ({_marks(ACTIVE)})",
                        [job.id, *sorted(ACTIVE)])]
                    check_destination_free(job, others)
                tx.execute("UPDATE jobs SET state = 'queued', request = NULL, error = NULL, attempts = 0, eta = NULL, "
                           "finished = NULL, updated = ? WHERE id = ?", (time.time(), job.id))
                tx.event(job.id, "state", {"state": "queued", "message": f"resumed by the user (from {job.state}); "
                                           f"continues from step {job.step}'s latest checkpoint"})
            elif job.state == "done":
                raise StudioError(f"Job {job.id} is done; its concept is {job.result}.")
        return self.get(job_id)

    def remove(self, job_id: int) -> None:
        """Delete a job that is not running: its row, its events and its folder (dataset copy, checkpoints)."""
        with self._write() as tx:
            job = self._locked_get(tx, job_id)
            if job.state == "running":
                raise StudioError(f"Job {job.id} is running; cancel it first.")
            tx.execute("DELETE FROM events WHERE job = ?", (job.id,))
            tx.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
        shutil.rmtree(self.job_folder(job_id), ignore_errors=True)

    # -- reading progress ------------------------------------------------------------------
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
        """Like :meth:`events`, but blocks up to ``timeout`` seconds until there is at least one
        (polling with a growing interval, woken at once by changes made in this process)."""
        deadline = time.monotonic() + max(0.0, timeout)
        delay = 0.05
        while True:
            found = self.events(job_id, after)
            left = deadline - time.monotonic()
            if found or left <= 0:
                return found
            self.wait_for_change(min(delay, left))
            delay = min(delay * 1.5, 1.0)

    def wait(self, job_id: int, states: Iterable[str] = TERMINAL, timeout: float | None = None) -> Job:
        """Block until the job is in one of ``states`` (default: done, failed or cancelled) and return it;
        raise :class:`TimeoutError` after ``timeout`` seconds."""
        wanted = set(states)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            job = self.get(job_id)
            if job.state in wanted:
                return job
            if job.state == "running" and self._abandoned(job, time.time()):
                self.recover()
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout} s")
            self.wait_for_change(delay if left is None else min(delay, left))
            delay = min(delay * 1.5, 1.0)

    def loss_curve(self, job_id: int) -> builtins.list[tuple[int, float]]:
        """``(step, loss)`` of every step trained so far (a step re-run after a crash counts once)."""
        by_step = {e.data["step"]: float(e.data["loss"]) for e in self.events(job_id, kinds=["progress"])}
        return sorted(by_step.items())

    # -- worker side -------------------------------------------------------------------------
    def claim(self, worker: str, device: str, *, pid: int | None = None) -> Job | None:
        """Atomically take the next queued job this worker may run on ``device`` (None if there is
        none, or if ``device`` already runs a job). Abandoned jobs are recovered first."""
        run_device = device_key(device) or "cpu"
        now = time.time()
        with self._write() as tx:
            self._recover(tx, now)
            if tx.execute("SELECT 1 FROM jobs WHERE state = 'running' AND run_device = ?", (run_device,)).fetchone():
                return None
            row = tx.execute("SELECT id FROM jobs WHERE state = 'queued' AND (device IS NULL OR device = ?) "
                             "ORDER BY priority DESC, id LIMIT 1", (run_device,)).fetchone()
            if row is None:
                return None
            cur = tx.execute(
                "UPDATE jobs SET state = 'running', request = NULL, error = NULL, worker = ?, worker_pid = ?, "
                "worker_host = ?, run_device = ?, heartbeat = ?, attempts = attempts + 1, eta = NULL, "
                "started = COALESCE(started, ?), updated = ? WHERE id = ? AND state = 'queued'",
                (worker, os.getpid() if pid is None else pid, self.host, run_device, now, now, now, row["id"]))
            if cur.rowcount != 1:
                return None
            tx.event(row["id"], "state", {"state": "running", "message": f"claimed by worker {worker} on {run_device}"})
            job_id = int(row["id"])
        return self.get(job_id)

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
            running = [self._job(r) for r in conn.execute("SELECT * FROM jobs WHERE state = 'running'")]
        now = time.time()
        if not any(self._abandoned(j, now) for j in running):
            return []
        with self._write() as tx:
            return self._recover(tx, now)

    def _abandoned(self, job: Job, now: float) -> str | None:
        if job.heartbeat is None or now - job.heartbeat > self.lease:
            return f"worker {job.worker} sent no heartbeat for {self.lease:.0f} s"
        if job.worker_host == self.host and job.worker_pid and not pid_alive(job.worker_pid):
            return f"worker {job.worker} (pid {job.worker_pid}) is gone"
        return None

    def _recover(self, tx: _Tx, now: float) -> builtins.list[int]:
        recovered = []
        for row in tx.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall():
            job = self._job(row)
            why = self._abandoned(job, now)
            if why is None:
                continue
            error, attempts = None, None
            if job.request == "cancel":
                state, message = "cancelled", f"{why}; cancelled as requested"
            elif job.request == "pause":
                state, message = "paused", f"{why}; paused as requested, at its last checkpoint"
            elif (progress := self._checkpointed_since_claim(tx, job.id)) is not None:
                state, message = "queued", (f"{why}; it had checkpointed step {progress} since it was claimed, "
                                            "so it is queued again and resumes from there")
                attempts = 0  # deaths in a row without progress: none
            elif job.attempts >= self.max_attempts:
                state = "failed"
                error = message = (f"The worker stopped unexpectedly {job.attempts} times in a row without progress "
                                   f"(no new checkpoint since step {self._last_checkpoint(tx, job.id)}; last: {why}); "
                                   "it may run out of memory — lower the batch size or resolution, "
                                   f"then `python -m studio jobs resume {job.id}`.")
            else:
                state, message = "queued", f"{why}; queued again, it resumes from its last checkpoint"
            tx.execute("UPDATE jobs SET state = ?, request = NULL, error = ?, worker = NULL, worker_pid = NULL, "
                       "worker_host = NULL, run_device = NULL, heartbeat = NULL, eta = NULL, updated = ?, "
                       "attempts = COALESCE(?, attempts), "
                       "finished = CASE WHEN ? IN ('failed', 'cancelled') THEN ? ELSE NULL END "
                       "WHERE id = ? AND state = 'running' AND worker IS ?",
                       (state, error, now, attempts, state, now, job.id, job.worker))
            tx.event(job.id, "state", {"state": state, "message": message} | ({"error": error} if error else {}))
            recovered.append(job.id)
        return recovered

    @staticmethod
    def _checkpoints(tx: _Tx, job_id: int) -> builtins.list[tuple[int, int]]:
        """``(seq, step)`` of the job's checkpoint events, oldest first."""
        return [(r["seq"], int(json.loads(r["data"]).get("step", 0))) for r in tx.execute(
            "SELECT seq, data FROM events WHERE job = ? AND kind = 'checkpoint' ORDER BY seq", (job_id,))]

    def _last_checkpoint(self, tx: _Tx, job_id: int) -> int:
        return max((step for _, step in self._checkpoints(tx, job_id)), default=0)

    def _checkpointed_since_claim(self, tx: _Tx, job_id: int) -> int | None:
        """The step of a checkpoint written since the job's latest claim and beyond every checkpoint
        before it (progress a resume keeps), or None when it made none."""
        claim = 0
        for r in tx.execute("SELECT seq, data FROM events WHERE job = ? AND kind = 'state' ORDER BY seq DESC",
                            (job_id,)):
            if json.loads(r["data"]).get("state") == "running":
                claim = int(r["seq"])
                break
        checkpoints = self._checkpoints(tx, job_id)
        before = max((step for seq, step in checkpoints if seq < claim), default=0)
        after = max((step for seq, step in checkpoints if seq > claim), default=0)
        return after if after > before else None

    def request(self, job_id: int) -> str | None:
        """What the user asked of a running job: ``"pause"``, ``"cancel"`` or None."""
        with self._connection() as conn:
            row = conn.execute("SELECT request FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        return row["request"] if row else "cancel"

    def heartbeat(self, job_id: int, worker: str) -> bool:
        """Renew the lease; False when this worker no longer holds the job."""
        with self._write() as tx:
            cur = tx.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = 'running' AND worker = ?",
                             (time.time(), int(job_id), worker))
            return cur.rowcount == 1

    def progress(self, job_id: int, worker: str, points: builtins.list[tuple[int, float, float]], total: int,
                 eta: float | None) -> bool:
        """Record steps ``(step, loss, seconds)`` (also renews the lease); False when the lease is lost."""
        if not points:
            return self.heartbeat(job_id, worker)
        now = time.time()
        with self._write() as tx:
            step, loss, _ = points[-1]
            cur = tx.execute("UPDATE jobs SET step = ?, total = ?, loss = ?, eta = ?, heartbeat = ?, updated = ? "
                             "WHERE id = ? AND state = 'running' AND worker = ?",
                             (step, total, loss, eta, now, now, int(job_id), worker))
            if cur.rowcount != 1:
                return False
            for s, lo, sec in points:
                tx.event(job_id, "progress", {"step": s, "total": total, "loss": lo, "seconds": round(sec, 3)}, now)
        return True

    def log(self, job_id: int, kind: str, data: dict[str, Any], *, preview: str | None = None) -> None:
        """Add a ``log``, ``checkpoint`` or ``preview`` event (``preview`` also becomes the job's latest preview)."""
        with self._write() as tx:
            if preview is not None:
                tx.execute("UPDATE jobs SET preview = ?, updated = ? WHERE id = ?", (preview, time.time(), int(job_id)))
            tx.event(int(job_id), kind, data)

    def finish(self, job_id: int, worker: str, result: str, note: str = "") -> bool:
        """Mark the job done with its published concept (``note``: e.g. the training's verdict, shown with
        the state); False when this worker no longer held it."""
        return self._end(job_id, worker, "done", f"published {result}" + (f"; {note}" if note else ""), result=result)

    def fail(self, job_id: int, worker: str, error: str) -> bool:
        return self._end(job_id, worker, "failed", error, error=error)

    def release(self, job_id: int, worker: str, state: str, message: str) -> bool:
        """Give a running job back as ``queued``, ``paused`` or ``cancelled`` (after a pause/cancel/stop)."""
        if state not in ("queued", "paused", "cancelled"):
            raise ValueError(f"release to {state!r}")
        return self._end(job_id, worker, state, message)

    def _end(self, job_id: int, worker: str, state: str, message: str, *, result: str | None = None,
             error: str | None = None) -> bool:
        now = time.time()
        with self._write() as tx:
            cur = tx.execute(
                "UPDATE jobs SET state = ?, request = NULL, worker = NULL, worker_pid = NULL, worker_host = NULL, "
                "run_device = NULL, heartbeat = NULL, eta = NULL, result = COALESCE(?, result), error = ?, "
                "attempts = CASE WHEN ? IN ('queued', 'paused') THEN 0 ELSE attempts END, "
                "step = CASE WHEN ? = 'done' THEN total ELSE step END, updated = ?, "
                "finished = CASE WHEN ? IN ('done', 'failed', 'cancelled') THEN ? ELSE NULL END "
                "WHERE id = ? AND state = 'running' AND worker = ?",
                (state, result, error, state, state, now, state, now, int(job_id), worker))
            if cur.rowcount != 1:
                return False
            tx.event(int(job_id), "state", {"state": state, "message": message} | ({"error": error} if error else {}))
        return True

    # -- helpers ---------------------------------------------------------------------------
    def _locked_get(self, tx: _Tx, job_id: int) -> Job:
        row = tx.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise StudioError(f"No job {job_id} in {self.root} (see `python -m studio jobs list`).")
        return self._job(row)

    def _set_state(self, tx: _Tx, job: Job, state: str, message: str) -> None:
        now = time.time()
        tx.execute("UPDATE jobs SET state = ?, request = NULL, updated = ?, "
                   "finished = CASE WHEN ? IN ('done', 'failed', 'cancelled') THEN ? ELSE NULL END WHERE id = ?",
                   (state, now, state, now, job.id))
        tx.event(job.id, "state", {"state": state, "message": message})


def _marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)
