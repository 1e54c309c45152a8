"""The persistent job queue (docs/architecture.md, "Jobs"): its rules, on either database.

State lives only in the database and the job folders, so the queue survives a crash or a restart
of every process that uses it. The database is SQLite beside the library by default, or a
PostgreSQL server shared by workers on many machines (``url="postgresql://…"``;
:mod:`studio.jobs.backend` says what differs); job folders live in shared storage
(:mod:`studio.jobs.storage`: a path, by default ``<library>/.jobs``, or an fsspec URL)::

    <library>/.jobs/jobs.sqlite          the SQLite queue (WAL mode: readers never block the worker)
    <library>/.jobs/job-000007/          one folder per job (see :mod:`studio.jobs.execute`)

Life of a job::

    queued ──claim──▶ running ──▶ done
      ▲ │               │  ├────▶ failed      (error text; ``resume`` retries from the last checkpoint)
      │ └──pause──▶ paused ◀┤     (a running job pauses after the next step, with a checkpoint)
      │              │      └───▶ cancelled
      └────resume────┘

Cross-process rules, enforced by the database itself:

* every state change is one transaction with its event; a claim is ``UPDATE … WHERE state =
  'queued'`` on the first queued row (on PostgreSQL the first one no other claim holds: ``FOR
  UPDATE SKIP LOCKED``), so two workers never take the same job;
* a partial unique index allows one running job per device per machine;
* a running job carries its worker's id, pid, machine, lease and heartbeat; a job whose worker is
  gone is recovered by the next claim or listing (:mod:`studio.jobs.recovery`);
* a worker only writes a job it still holds (``… AND worker = ?``); when that matches nothing it
  has lost the lease and stops.

This module imports neither torch nor the trainers until a job is submitted (nor psycopg unless the
queue is on PostgreSQL): listing, claiming and following events are cheap.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import shutil
import time
import uuid
from typing import Any

from studio.errors import StudioError
from studio.jobs.backend import QueueConflict, Transaction
from studio.jobs.connection import QueueConnection, _marks, open_backend
from studio.jobs.records import (
    ACTIVE,
    STATES,
    TERMINAL,
    EventKind,
    Job,
    JobEvent,
    JobState,
    as_dict,
    device_key,
)

__all__ = ["JobQueue", "Job", "JobEvent", "JobState", "EventKind", "STATES", "TERMINAL", "as_dict", "device_key",
           "open_backend"]


class JobQueue(QueueConnection):
    """The training-job queue of a library.

    >>> queue = JobQueue("concepts")                                   # SQLite beside the library
    >>> queue = JobQueue("concepts", url="postgresql://studio@db/studio", storage="/mnt/shared/jobs")
    >>> job = queue.submit("textual-inversion", {"images": "photos/", "class_word": "cat", "steps": 200},
    ...                    base={"base": "tiny"})
    >>> Worker(queue).run(once=True)          # or: python -m studio jobs work --once
    >>> queue.get(job.id).state
    'done'

    Safe to share between threads and between processes. The arguments are :class:`QueueConnection`'s.
    """

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
        stored: tuple[int, str] | None = None
        try:
            prepared.stage(staging)
            now = time.time()
            with self._write() as tx:
                tx.serialize("names")  # two submissions never reserve one name
                used = [(r["name"], r["token"], r["destination"]) for r in tx.execute(
                    f"SELECT name, token, destination FROM jobs WHERE state IN ({_marks(ACTIVE)})",
                    sorted(ACTIVE)).fetchall()]
                name, token, destination = reserve_name(prepared, self.library, used)
                prepared.config.update(name=name, token=token)
                job_id = tx.insert(
                    "INSERT INTO jobs (trainer, name, token, destination, state, priority, device, base, config, "
                    "inputs, source, total, created, updated) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (prepared.trainer, name, token, str(destination), int(priority),
                     device_key(prepared.base.get("device")), json.dumps(prepared.base),
                     json.dumps(prepared.config, default=str), json.dumps(prepared.inputs), prepared.source,
                     int(prepared.config["steps"]), now, now), "id")
                location = self.storage.location(job_id)
                tx.execute("UPDATE jobs SET location = ? WHERE id = ?", (location, job_id))
                prepared.write_manifest(staging, job_id, name, token, destination)
                stored = (job_id, location)
                self.storage.store(staging, location)
                tx.event(job_id, "state", {"state": "queued", "message": f"submitted ({prepared.trainer}, "
                                           f"{prepared.config['steps']} steps, concept {name!r} {token})"})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if stored is not None:  # the row was rolled back: no job owns the folder
                with contextlib.suppress(Exception):
                    self.storage.delete(*stored)
            raise
        return self.get(job_id)

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
                    tx.serialize("names")
                    others = [(r["name"], r["destination"]) for r in tx.execute(
                        f"SELECT name, destination FROM jobs WHERE id != ? AND state IN ({_marks(ACTIVE)})",
                        [job.id, *sorted(ACTIVE)]).fetchall()]
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
            tx.touch()
        self.storage.delete(job.id, job.location)

    # -- worker side -------------------------------------------------------------------------
    def claim(self, worker: str, device: str, *, pid: int | None = None) -> Job | None:
        """Atomically take the next queued job this worker may run on ``device`` (None if there is
        none, or if ``device`` of this machine already runs a job). Abandoned jobs are recovered first."""
        run_device = device_key(device) or "cpu"
        now = time.time()
        try:
            with self._write() as tx:
                self._recover(tx, now)
                if tx.execute("SELECT 1 FROM jobs WHERE state = 'running' AND worker_host = ? AND run_device = ?",
                              (self.host, run_device)).fetchone():
                    return None
                row = tx.execute("SELECT id FROM jobs WHERE state = 'queued' AND (device IS NULL OR device = ?) "
                                 f"ORDER BY priority DESC, id LIMIT 1{tx.skip_locked}", (run_device,)).fetchone()
                if row is None:
                    return None
                cur = tx.execute(
                    "UPDATE jobs SET state = 'running', request = NULL, error = NULL, worker = ?, worker_pid = ?, "
                    "worker_host = ?, run_device = ?, heartbeat = ?, lease = ?, attempts = attempts + 1, eta = NULL, "
                    "started = COALESCE(started, ?), updated = ? WHERE id = ? AND state = 'queued'",
                    (worker, os.getpid() if pid is None else pid, self.host, run_device, now, self.lease, now, now,
                     row["id"]))
                if cur.rowcount != 1:
                    return None
                tx.event(row["id"], "state", {"state": "running",
                                              "message": f"claimed by worker {worker} on {run_device}"})
                job_id = int(row["id"])
        except QueueConflict:  # another worker of this machine took the device a moment earlier
            return None
        return self.get(job_id)

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
        """Mark the job failed with ``error`` (one line); False when this worker no longer held it."""
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
    def _set_state(self, tx: Transaction, job: Job, state: str, message: str) -> None:
        now = time.time()
        tx.execute("UPDATE jobs SET state = ?, request = NULL, updated = ?, "
                   "finished = CASE WHEN ? IN ('done', 'failed', 'cancelled') THEN ? ELSE NULL END WHERE id = ?",
                   (state, now, state, now, job.id))
        tx.event(job.id, "state", {"state": state, "message": message})
