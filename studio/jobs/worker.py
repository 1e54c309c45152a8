"""The worker: claims queued jobs and runs them one at a time on one device, headless.

Start one per device — ``python -m studio jobs work [--once] [--device cuda:1]``, or from Python
(the app runs one in a thread)::

    worker = Worker(JobQueue("concepts"))
    thread = worker.start()        # or worker.run(once=True) to drain the queue and return
    ...
    worker.stop()                  # the running job checkpoints after its step and goes back to the queue

A job that fails is marked failed with its error and the worker goes on with the next one. The
base model of the last job is kept loaded while jobs keep coming (consecutive jobs on one base do
not reload it) and released when the queue is empty or a job failed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.jobs.execute import Heartbeat, JobCallbacks, JobControl, publish, tidy_done, train_job
from studio.jobs.queue import Job, JobQueue, device_key

BaseLoader = Callable[[dict[str, Any], str], Any]  # (base settings, device) -> studio.models.BaseModel


def load_job_base(settings: dict[str, Any], device: str) -> Any:
    """The default :data:`BaseLoader`: :func:`studio.models.load_base` with the job's settings on ``device``."""
    from studio.models import BaseSettings

    return BaseSettings.from_dict(settings).load(device)


def resolve_device(requested: str | None) -> str:
    """The worker's device as a lock key (``cuda:0``, ``mps``, ``cpu``); checks that it exists."""
    from studio.devices import pick_device

    return device_key(str(pick_device(requested))) or "cpu"


class Worker:
    """Runs jobs from ``queue`` on ``device`` (default: the best available).

    Args:
        callbacks: extra :class:`~trainers.loop.TrainCallbacks` called after the job's own (e.g. a
            progress printer).
        load_base: how to load a job's base (default :func:`load_job_base`; tests pass a cached one).
        heartbeat_every: seconds between lease renewals (default: a quarter of the queue's lease).
        poll_max: the longest sleep between looks at an empty queue (the sleep grows from 50 ms). On
            PostgreSQL a change wakes the worker at once, and it looks again at least every quarter
            lease (a worker that dies elsewhere sends nothing).
        report: called with one line when a job starts and ends (the CLI prints it).
    """

    def __init__(self, queue: JobQueue, *, device: str | None = None, worker_id: str | None = None,
                 callbacks: Any = None, load_base: BaseLoader | None = None, heartbeat_every: float | None = None,
                 poll_max: float = 2.0, report: Callable[[str], None] | None = None):
        self.queue = queue
        self.requested_device = device
        self.device: str | None = None  # resolved when run() starts
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.callbacks = callbacks
        self.load_base = load_base or load_job_base
        self.heartbeat_every = heartbeat_every or min(10.0, queue.lease / 4)
        self.poll_max = poll_max
        self.idle_max = max(poll_max, min(30.0, queue.lease / 4)) if queue.pushes_changes else poll_max
        self.report = report or (lambda message: None)
        self.current: int | None = None  # the job being run
        self._stop = threading.Event()
        self._base: tuple[str, Any] | None = None

    # -- control ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to stop: a running job pauses after its current step (with a checkpoint)
        and goes back to the queue; an idle worker returns at once."""
        self._stop.set()
        self.queue.notify()

    def start(self, *, once: bool = False) -> threading.Thread:
        """Run in a daemon thread (for the app); :meth:`stop` ends it."""
        self._stop = threading.Event()
        thread = threading.Thread(target=self.run, kwargs={"once": once}, name=f"studio-worker-{self.id}", daemon=True)
        thread.start()
        return thread

    # -- the loop --------------------------------------------------------------------------
    def run(self, *, once: bool = False, stop_event: threading.Event | None = None, max_jobs: int | None = None) -> int:
        """Claim and run jobs until stopped; with ``once``, return when no queued job is left for this
        device. Returns how many jobs were run (whatever their outcome)."""
        if stop_event is not None:
            self._stop = stop_event
        self.device = resolve_device(self.requested_device)
        ran, delay = 0, 0.05
        try:
            while not self._stop.is_set():
                seen = self.queue.changes()
                try:  # look before taking the write lock: an idle worker only reads
                    wanted = self.queue.has_queued(self.device) or self.queue.recover()
                    job = self.queue.claim(self.id, self.device) if wanted else None
                except StudioError as err:  # the database is unreachable or busy for a moment: wait, look again
                    self.report(f"cannot read the queue ({err}); trying again in {self.idle_max:.0f} s")
                    self._stop.wait(self.idle_max)
                    continue
                if job is None:
                    self._release_base()  # idle: give the memory back
                    if once and not self.queue.has_queued(self.device):
                        break
                    # Woken by a change (any process's on PostgreSQL, this process's on SQLite).
                    self.queue.wait_for_change(delay, since=seen)
                    delay = min(delay * 2, self.idle_max)
                    continue
                delay = 0.05
                self.report(f"job {job.id} ({job.trainer}, {job.name}): running on {self.device}")
                outcome = self.run_job(job)
                after = self.queue.get(job.id)
                self.report(f"job {job.id}: {outcome}" + (f" -> {after.result}" if outcome == "done" else
                                                          f": {after.error}" if outcome == "failed" else ""))
                ran += 1
                if max_jobs is not None and ran >= max_jobs:
                    break
        finally:
            self._release_base()
        return ran

    def run_job(self, job: Job) -> str:
        """Run one claimed job to its end; return the state it ended in (``"lost"`` if another worker took it)."""
        from trainers.loop import TrainingStopped

        lost = threading.Event()
        callbacks = JobCallbacks(self.queue, job, self.id, lost, extra=self.callbacks)
        control = JobControl(self.queue, job, lost, self._stop)
        self.current = job.id
        try:
            with Heartbeat(self.queue, job, self.id, lost, self.heartbeat_every):
                finished = train_job(self.queue, job, base_for=self._base_for, callbacks=callbacks, control=control)
                callbacks.flush()
                if lost.is_set():
                    return self._lost(job)
                dest = publish(job, finished)
                if not self.queue.finish(job.id, self.id, str(dest), note=published_verdict(dest)):
                    return self._lost(job)
                tidy_done(job, self.queue.storage)
                return "done"
        except TrainingStopped as stopped:
            callbacks.flush()
            if stopped.checkpoint is not None and self.queue.storage.remote and not lost.is_set():
                callbacks.on_checkpoint(stopped.step, stopped.checkpoint)  # uploaded, so another machine resumes it
            return self._stopped(job, stopped.reason, stopped.step, lost)
        except Exception as err:  # continue-on-error: the job fails, the worker goes on
            self._release_base()  # a failure may leave the pipeline half-modified
            if lost.is_set():
                return self._lost(job)
            if isinstance(err, StudioError):
                message = str(err)
            else:
                message = f"{type(err).__name__}: {err}"
                self.queue.log(job.id, "log", {"message": traceback.format_exc()})
            self.queue.fail(job.id, self.id, message)
            return "failed"
        except BaseException:  # KeyboardInterrupt, SystemExit: give the job back, then stop
            self._release_base()
            with contextlib.suppress(Exception):
                self.queue.release(job.id, self.id, "queued",
                                   "the worker was interrupted; queued again, it resumes from its last checkpoint")
            raise
        finally:
            self.current = None

    def _stopped(self, job: Job, reason: str, step: int, lost: threading.Event) -> str:
        if lost.is_set():
            return self._lost(job)
        request = self.queue.request(job.id)
        if reason == "cancelled" or request == "cancel":
            self.queue.release(job.id, self.id, "cancelled", f"cancelled at step {step}")
            return "cancelled"
        if request == "pause":
            self.queue.release(job.id, self.id, "paused", f"paused at step {step} (checkpoint saved)")
            return "paused"
        self.queue.release(job.id, self.id, "queued",
                           f"the worker stopped; queued again at step {step} (checkpoint saved)")
        return "queued"

    def _lost(self, job: Job) -> str:
        self.queue.log(job.id, "log", {"message": f"worker {self.id} lost the job's lease and stopped working on it"})
        return "lost"

    # -- the base model --------------------------------------------------------------------
    def _base_for(self, settings: dict[str, Any]) -> Any:
        key = json.dumps(settings, sort_keys=True)
        if self._base is None or self._base[0] != key:
            self._release_base()
            self._base = (key, self.load_base(settings, self.device or "cpu"))
        return self._base[1]

    def _release_base(self) -> None:
        if self._base is None:
            return
        self._base = None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def start_worker_process(library: str | os.PathLike[str], *, device: str | None = None, once: bool = False,
                         queue_url: str | None = None, storage: str | None = None, machine: str | None = None,
                         lease: float | None = None, **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``python -m studio jobs work`` for ``library`` in a subprocess (``queue_url``, ``storage``,
    ``machine``, ``lease``: its flags; ``popen``: extra :class:`subprocess.Popen` arguments, e.g.
    ``stdout``). Stop it with ``proc.terminate()``: the running job checkpoints and goes back to the queue."""
    cmd = [sys.executable, "-m", "studio", "jobs", "work", "--library", str(Path(library).expanduser().resolve())]
    for flag, value in (("--device", device), ("--queue-url", queue_url), ("--storage", storage),
                        ("--machine", machine), ("--lease", lease)):
        if value:
            cmd += [flag, str(value)]
    if once:
        cmd.append("--once")
    env = dict(popen.pop("env", None) or os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen(cmd, env=env, **popen)


def published_verdict(published: Path) -> str:
    """``"verdict: …"`` of a published concept file (``""`` for a model folder or a file without one)."""
    import json

    from studio.concept import read_header
    from trainers.probe import verdict_of

    if published.suffix != ".safetensors":
        return ""
    try:
        _, md = read_header(published)
        word = verdict_of(json.loads(md.get("studio.metrics") or "{}"))
    except (StudioError, ValueError):
        return ""
    return f"verdict: {word}" if word else ""
