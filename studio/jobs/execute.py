"""Running one claimed job: train into its folder with checkpoints, then publish the concept once.

The job folder (``<library>/.jobs/job-NNNNNN/``, or the working copy of one in remote storage:
:mod:`studio.jobs.storage`)::

    job.json               what was submitted (trainer, base settings, full config)
    dataset/               the copy of the image folder the job trains on
    files/                 copies of other input files the config names (e.g. names_file)
    checkpoints/step-NNNNNN/state.safetensors   (removed once the job is done)
    previews/step-NNNNNN.png
    events.jsonl           a readable mirror of the job's events (the database is the source of truth)
    concept.safetensors    the finished concept, before it is published
    concept-<c>.safetensors + concepts.json   instead, a run's one file per token (Break-A-Scene) and their
                           list, written last: published as ``<name>-<c>.safetensors``
    model/                 instead, for a whole-model fine-tune (``cfg.writes_folder()``): the diffusers folder

Crash safety, step by step (a process may die between any two lines):

1. training always starts with ``resume="latest"`` on the job's ``checkpoints/`` (written under a
   temporary name and renamed, so the newest complete one is used; the loop makes the continuation
   bit-identical to an uninterrupted run);
2. the finished concept is written atomically to ``concept.safetensors``; once it is there, a
   restarted job skips training;
3. publishing copies it to a temporary file beside the destination and *hard-links* that into
   place — ``os.link`` fails when the name exists, so nothing is ever overwritten — and a restarted
   job that finds a byte-identical file at the destination knows the copy already happened (a
   model folder is copied to a temporary folder and renamed into place, compared file by file);
4. the job is marked done (one transaction with its final event).

So the library receives the concept exactly once, and a restart between 3 and 4 only completes
the bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from studio.errors import StudioError
from studio.jobs.prepare import CHECKPOINTS, PREVIEWS, default_checkpoint_every
from studio.jobs.queue import Job, JobQueue
from studio.jobs.storage import JobStorage

if TYPE_CHECKING:
    from trainers.loop import TrainCallbacks, TrainControl

CONCEPT = "concept.safetensors"
MODEL = "model"
CONCEPT_SET = "concepts.json"  # a run that writes one file per token (Break-A-Scene): the list, written last
PREVIEW_SUFFIX = ".preview.png"


class JobCallbacks:
    """The hooks of :class:`trainers.loop.TrainCallbacks` → job events. Steps are batched into one
    transaction every ``flush_every`` seconds (the loss curve stays complete; the UI lags at most
    that much), then forwarded to ``extra``."""

    def __init__(self, queue: JobQueue, job: Job, worker: str, lost: threading.Event,
                 extra: Any = None, flush_every: float = 0.5):
        self.queue, self.job, self.worker, self.lost, self.extra = queue, job, worker, lost, extra
        self.flush_every = flush_every
        self.points: list[tuple[int, float, float]] = []
        self.total, self.start = job.total, 0
        self.eta: float | None = None
        self._last_flush = 0.0

    def flush(self) -> None:
        points, self.points = self.points, []
        self._last_flush = time.monotonic()
        if not self.queue.progress(self.job.id, self.worker, points, self.total, self.eta):
            self.lost.set()

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.total, self.start = total_steps, start_step
        where = f"resuming at step {start_step}" if start_step else "starting"
        self.queue.log(self.job.id, "log", {"message": f"training {total_steps} steps, {where}"})
        self._forward("on_start", total_steps, start_step)

    def on_step(self, step: int, total: int, loss: float, seconds: float) -> None:
        self.total = total
        done_here = max(1, step - self.start)
        self.eta = seconds / done_here * (total - step)
        self.points.append((step, float(loss), float(seconds)))
        if step == total or time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()
        self._forward("on_step", step, total, loss, seconds)

    def on_preview(self, step: int, images: list[Any]) -> None:
        from studio.atomic import atomic_path

        self.flush()
        for i, image in enumerate(images):
            path = self.job.folder / PREVIEWS / (f"step-{step:06d}.png" if i == 0 else f"step-{step:06d}-{i}.png")
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            self.queue.storage.push(self.job.id, self.job.location, path)
            self.queue.log(self.job.id, "preview", {"step": step, "path": str(path)}, preview=str(path))
        self._forward("on_preview", step, images)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.flush()
        self.queue.storage.push(self.job.id, self.job.location, path)  # in shared storage before it is recorded
        self.queue.log(self.job.id, "checkpoint", {"step": step, "path": str(path)})
        self._forward("on_checkpoint", step, path)

    def on_log(self, message: str) -> None:
        self.flush()
        self.queue.log(self.job.id, "log", {"message": message})
        self._forward("on_log", message)

    def on_eval(self, step: int, concept: Any) -> None:
        self._forward("on_eval", step, concept)

    def _forward(self, hook: str, *args: Any) -> None:
        if self.extra is not None:
            getattr(self.extra, hook)(*args)


class JobControl:
    """A :class:`trainers.loop.TrainControl` polled by the loop between optimizer steps: the user's pause/cancel request (from the
    database), a worker shutting down (pause: checkpoint, then back to the queue), or a lost lease."""

    def __init__(self, queue: JobQueue, job: Job, lost: threading.Event, stop: threading.Event):
        self.queue, self.job, self.lost, self.stop = queue, job, lost, stop

    def poll(self) -> str | None:
        if self.lost.is_set():
            return "cancel"
        if self.stop.is_set():
            return "pause"
        return self.queue.request(self.job.id)


class Heartbeat:
    """Renews a running job's lease from a background thread (training steps and base loading
    may take longer than the lease). Sets ``lost`` when the job was taken back."""

    def __init__(self, queue: JobQueue, job: Job, worker: str, lost: threading.Event, every: float):
        self.queue, self.job, self.worker, self.lost, self.every = queue, job, worker, lost, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-job-{job.id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                alive = self.queue.heartbeat(self.job.id, self.worker)
            except StudioError:  # the database was busy: try again at the next beat
                continue
            if not alive:
                self.lost.set()
                return


def job_config(entry: Any, job: Job, warn: Callable[[str], None]) -> Any:
    """The job's config dataclass, pointed at its own folder (inputs, checkpoints, output)."""
    known = {f.name for f in dataclasses.fields(entry.config_cls)}
    values = {k: v for k, v in job.config.items() if k in known}
    dropped = sorted(set(job.config) - known)
    if dropped:
        warn(f"ignoring settings this version of {entry.cli_name} no longer has: {', '.join(dropped)}")
    for key, rel in job.inputs.items():
        values[key] = str(job.folder / rel)
    values.update(out=str(job.folder / CONCEPT), checkpoint_dir=str(job.folder / CHECKPOINTS), resume="latest",
                  name=job.name)
    if getattr(entry, "tokens_per_concept", False):  # Break-A-Scene names a token per concept itself
        values.pop("token", None)
    else:
        values["token"] = job.token
    cfg = entry.config_cls(**values)
    if whole_model(cfg):
        cfg.out = str(job.folder / MODEL)
    if not cfg.checkpoint_every:
        cfg.checkpoint_every = default_checkpoint_every(int(cfg.steps), whole_model=whole_model(cfg))
    return cfg


def whole_model(cfg: Any) -> bool:
    """Whether the config trains a whole model written as a folder (``cfg.writes_folder()``)."""
    return bool(cfg.writes_folder())


def finished_output(job: Job) -> Path | None:
    """The job's complete result in its folder, if training finished (a file or a non-empty folder)."""
    if (job.folder / CONCEPT).is_file():
        return job.folder / CONCEPT
    if (job.folder / CONCEPT_SET).is_file():
        return job.folder / CONCEPT_SET
    model = job.folder / MODEL
    if model.is_dir() and any(model.iterdir()):
        return model
    return None


def clean_temporaries(folder: Path) -> None:
    """Remove what an interrupted write left in a job folder (never a complete file or folder); called
    by the worker that holds the job, so no other writer is at work there."""
    leftovers = [*folder.glob(".*.tmp*"), *(folder / PREVIEWS).glob(".*.tmp*"),
                 *(folder / CHECKPOINTS).glob(".tmp-step-*")]
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def latest_preview(job: Job) -> Path | None:
    found = sorted((job.folder / PREVIEWS).glob("step-*.png"))
    return found[-1] if found else None


def train_job(queue: JobQueue, job: Job, *, base_for: Callable[[dict[str, Any]], Any], callbacks: JobCallbacks,
              control: JobControl) -> Path:
    """Steps 1–2: the finished concept in the job folder (trained, or found from before a restart). A job
    in remote storage is first brought to this machine (inputs, the newest recorded checkpoint, a finished result)."""
    from trainers import get_trainer
    from trainers.runner import train

    queue.storage.fetch(job.id, job.location, queue.last_checkpoint(job.id))
    clean_temporaries(job.folder)
    finished = finished_output(job)
    if finished is not None:
        queue.log(job.id, "log", {"message": "training had finished before the restart; publishing it"})
        return finished
    entry = get_trainer(job.trainer)
    cfg = job_config(entry, job, lambda m: queue.log(job.id, "log", {"message": m}))
    queue.log(job.id, "log", {"message": f"loading base {job.base.get('base')}"})
    base = base_for(job.base)
    # JobCallbacks / JobControl implement every hook of TrainCallbacks / TrainControl without subclassing
    # them: this module must not import torch (trainers.loop does).
    train(entry, cfg, base, library=None, callbacks=cast("TrainCallbacks", callbacks),
          control=cast("TrainControl", control))
    finished = finished_output(job) or _concept_set(job)
    if finished is None:
        raise StudioError(f"Training ended without writing {cfg.out}.")
    queue.storage.push(job.id, job.location, finished)
    return finished


def publish(job: Job, finished: Path) -> Path:
    """Step 3: copy the finished concept to ``job.destination`` exactly once (see the module docstring)."""
    dest = Path(job.destination)
    if finished.is_dir():
        return _publish_folder(job, finished, dest)
    if finished.name == CONCEPT_SET:  # one file per token: each beside the destination, "<name>-<concept>"
        import json

        files = [job.folder / f for f in json.loads(finished.read_text())["files"]]
        stem = CONCEPT[: -len(".safetensors")]
        return [_publish_file(job, f, dest.with_name(dest.stem + f.name[len(stem):])) for f in files][0]
    return _publish_file(job, finished, dest)


def _concept_set(job: Job) -> Path | None:
    """After a run that wrote one file per token (``concept-<token>.safetensors``, Break-A-Scene): the list
    of them, written atomically as the last step — so a restart publishes exactly the complete set."""
    import json

    from studio.atomic import atomic_write_bytes

    stem = CONCEPT[: -len(".safetensors")]
    files = sorted(p.name for p in job.folder.glob(f"{stem}-*.safetensors"))
    if not files:
        return None
    atomic_write_bytes(job.folder / CONCEPT_SET, json.dumps({"files": files}).encode())
    return job.folder / CONCEPT_SET


def _publish_file(job: Job, finished: Path, dest: Path) -> Path:
    """One concept file to ``dest``, exactly once (module docstring, step 3)."""
    from studio.atomic import _fsync_dir, atomic_path, temp_path

    if dest.exists():
        if filecmp.cmp(dest, finished, shallow=False):
            return dest  # copied before a restart
        raise StudioError(f"{dest} appeared while job {job.id} ran and it is another concept; the finished one is "
                          f"kept in {finished}. Rename or remove the other file, then "
                          f"`python -m studio jobs resume {job.id}` (it will not train again).")
    preview = latest_preview(job)
    if preview is not None:  # the sidecar first, so the concept never appears without its card image
        with atomic_path(dest.with_name(dest.name[: -len(dest.suffix)] + PREVIEW_SUFFIX)) as tmp:
            shutil.copyfile(preview, tmp)
    tmp = temp_path(dest, f"job-{job.id}")  # a dead worker's is recognised and removed (studio.atomic)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        shutil.copyfile(finished, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, dest)  # atomic, and never replaces an existing file
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            return _publish_file(job, finished, dest)
        except OSError:  # a filesystem without hard links
            if dest.exists():
                return _publish_file(job, finished, dest)
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as err:
        raise StudioError(f"Could not write {dest} ({err.strerror}); the finished concept is kept in {finished}; "
                          f"free space, then `python -m studio jobs resume {job.id}`.") from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return dest


def tidy_done(job: Job, storage: JobStorage | None = None) -> None:
    """After the job is marked done: drop what only a resume needed (checkpoints; a model folder's
    working copy — a full fine-tune's are gigabytes), also from shared storage. The concept file,
    dataset and previews stay."""
    if storage is not None:
        storage.drop(job.id, job.location, CHECKPOINTS, MODEL)
        return
    shutil.rmtree(job.folder / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(job.folder / MODEL, ignore_errors=True)


def _same_tree(a: Path, b: Path) -> bool:
    """Whether two folders hold the same files with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def _publish_folder(job: Job, finished: Path, dest: Path) -> Path:
    """A whole model: copied to a temporary folder beside ``dest``, then renamed into place."""
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        if dest.is_dir() and _same_tree(dest, finished):
            return dest  # copied before a restart
        raise StudioError(f"{dest} appeared while job {job.id} ran and holds something else; the finished model is "
                          f"kept in {finished}. Move the other folder away, then "
                          f"`python -m studio jobs resume {job.id}` (it will not train again).")
    from studio.atomic import temp_path

    tmp = temp_path(dest, f"job-{job.id}")
    try:
        shutil.copytree(finished, tmp)
        if dest.is_dir():
            dest.rmdir()  # an empty folder the user made for it
        os.rename(tmp, dest)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StudioError(f"Could not write {dest} ({err.strerror}); the finished model is kept in {finished}; "
                          f"free space, then `python -m studio jobs resume {job.id}`.") from err
    return dest
