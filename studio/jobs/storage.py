"""Where job folders live: shared storage through fsspec (docs/architecture.md, "Jobs").

A job's files — its dataset copy, input files, checkpoints, previews and finished concept — sit in
one folder, ``job-NNNNNN/``, under a storage root, and the job's row records where (its
``location``), so any worker that can reach the root can run or resume any job:

* a **path** (the default: ``<library>/.jobs``) is used in place. On one machine that is a local
  disk; for workers on several machines, a network path every machine mounts (NFS, SMB, a
  cloud file share) — a worker resumes another's job from the checkpoints it finds there;
* an **fsspec URL** — ``s3://bucket/studio-jobs`` (needs ``s3fs``), ``hf://datasets/org/repo/jobs``
  (the Hugging Face Hub, through ``huggingface_hub``'s file system), ``gcs://…``, ``file:///…`` —
  is mirrored: a worker downloads the job's inputs and newest checkpoint into a local working copy
  when it takes the job, and uploads each checkpoint (before the checkpoint is recorded, so a
  recorded checkpoint is always in shared storage), each preview and the finished concept.

fsspec is imported only for URLs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from studio.errors import StudioError

CHECKPOINTS = "checkpoints"
DONE = ".complete"  # marks a folder (a whole model) uploaded in full


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names remote (or fsspec) storage rather than a plain path."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1  # "C://x" is a Windows path


def default_work_dir() -> Path:
    """Where a worker keeps working copies of jobs in remote storage: ``$XDG_CACHE_HOME/studio/jobs``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "studio" / "jobs"


def job_dir_name(job_id: int) -> str:
    """``job-000007``."""
    return f"job-{int(job_id):06d}"


class JobStorage:
    """Job folders under ``root`` (a path or an fsspec URL); working copies of remote ones in ``work_dir``."""

    def __init__(self, root: str | os.PathLike[str], *, work_dir: str | os.PathLike[str] | None = None):
        self.remote = is_url(root)
        self.url = str(root).rstrip("/") if self.remote else str(Path(root).expanduser().resolve())
        self.work_dir = Path(work_dir).expanduser().resolve() if work_dir else default_work_dir()

    def location(self, job_id: int) -> str:
        """Where a new job's folder goes."""
        return f"{self.url}/{job_dir_name(job_id)}" if self.remote else str(Path(self.url) / job_dir_name(job_id))

    def folder(self, job_id: int, location: str | None = None) -> Path:
        """The job's folder on this machine: the folder itself, or the working copy of a remote one."""
        location = location or self.location(job_id)
        if not is_url(location):
            return Path(location)
        return self.work_dir / hashlib.sha1(location.encode()).hexdigest()[:16] / job_dir_name(job_id)

    # -- submission and removal -----------------------------------------------------------------
    def store(self, staging: Path, location: str) -> None:
        """Move a staged job folder to its location (an upload for a URL; ``staging`` is removed)."""
        if not is_url(location):
            if Path(location).exists():  # left by a submit that died before its commit
                shutil.rmtree(location)
            Path(location).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging, location)
            except OSError:  # another file system (a network share): copied, then the staging folder removed
                shutil.copytree(staging, location)
                shutil.rmtree(staging, ignore_errors=True)
            return
        fs, path = _fs(location)
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.put(str(staging) + "/", path, recursive=True)
        except OSError as err:
            raise StudioError(f"Could not upload the job's inputs to {location} ({err}); check the storage URL "
                              "and its credentials.") from err
        shutil.rmtree(staging, ignore_errors=True)

    def delete(self, job_id: int, location: str | None) -> None:
        """Remove a job's folder (and this machine's working copy)."""
        location = location or self.location(job_id)
        if is_url(location):
            fs, path = _fs(location)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        shutil.rmtree(self.folder(job_id, location), ignore_errors=True)

    # -- a worker's working copy -------------------------------------------------------------------
    def fetch(self, job_id: int, location: str | None, checkpoint: str | None = None) -> Path:
        """Bring a remote job's folder up to date on this machine and return it: its inputs, the
        finished result if there is one, and ``checkpoint`` (the newest *recorded* checkpoint's folder
        name — a checkpoint is recorded only once uploaded, so a half-uploaded newer one is ignored);
        not previews or other checkpoints."""
        folder = self.folder(job_id, location)
        if not location or not is_url(location):
            return folder
        fs, root = _fs(location)
        try:
            listing = [_rel(p, root) for p in fs.find(root, withdirs=False)]
            complete = {rel[: -len(DONE)] for rel in listing if rel.endswith(DONE) and "/" not in rel}
            wanted = [rel for rel in listing if _wanted(rel, checkpoint, complete)]
            local = folder / CHECKPOINTS
            for d in (local.iterdir() if local.is_dir() else []):  # the shared copy decides which one resumes
                if d.name != checkpoint:
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            for rel in wanted:
                target = folder / rel
                if target.is_file() and target.stat().st_size == fs.size(f"{root}/{rel}"):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(target))
        except OSError as err:
            raise StudioError(f"Could not download job {job_id} from {location} ({err}); check the storage URL "
                              "and its credentials.") from err
        for sub in (CHECKPOINTS, "previews"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return folder

    def push(self, job_id: int, location: str | None, path: Path) -> None:
        """Upload ``path`` (a file or folder inside the working copy) to the job's remote folder. A file
        appears whole or not at all (uploaded under a temporary name, then moved); a folder is followed
        by a ``NAME.complete`` marker (a checkpoint is recorded in the queue instead) and a checkpoint
        removes the remote checkpoints the trainer no longer keeps. Nothing to do for a path."""
        if not location or not is_url(location):
            return
        folder = self.folder(job_id, location)
        rel = path.resolve().relative_to(folder.resolve()).as_posix()
        fs, root = _fs(location)
        try:
            if path.is_dir():
                fs.put(str(path) + "/", f"{root}/{rel}", recursive=True)
                if rel.startswith(CHECKPOINTS + "/"):
                    kept = {p.name for p in (folder / CHECKPOINTS).iterdir()}
                    for remote in fs.ls(f"{root}/{CHECKPOINTS}", detail=False):
                        if remote.rstrip("/").rsplit("/", 1)[-1] not in kept:
                            fs.rm(remote, recursive=True)
                else:
                    fs.pipe_file(f"{root}/{rel}{DONE}", b"")
            else:
                partial = f"{root}/{rel}.uploading"
                fs.put_file(str(path), partial)
                fs.mv(partial, f"{root}/{rel}")
        except OSError as err:
            raise StudioError(f"Could not upload {rel} of job {job_id} to {location} ({err}); check the storage "
                              "and its credentials.") from err

    def drop(self, job_id: int, location: str | None, *names: str) -> None:
        """Remove sub-folders only a resume needed (checkpoints, a model's working copy), here and in shared storage."""
        for name in names:
            shutil.rmtree(self.folder(job_id, location) / name, ignore_errors=True)
        if location and is_url(location):
            fs, root = _fs(location)
            for name in names:
                for rel in (name, name + DONE):
                    if fs.exists(f"{root}/{rel}"):
                        fs.rm(f"{root}/{rel}", recursive=True)


def _fs(url: str) -> tuple[Any, str]:
    """``(file system, path)`` for an fsspec URL."""
    try:
        import fsspec
    except ImportError as err:
        raise StudioError("Job storage at a URL needs fsspec: pip install fsspec (see requirements.txt).") from err
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise StudioError(f"Cannot open job storage {url} ({err}); install the file system's package "
                          "(s3fs for s3://, gcsfs for gcs://).") from err
    return fs, str(path).rstrip("/")


def _rel(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path


def _wanted(rel: str, checkpoint: str | None, complete: set[str]) -> bool:
    """Whether a remote file belongs in a working copy: not previews or partial uploads, only the
    recorded checkpoint, a result folder only once complete."""
    top = rel.split("/", 1)[0]
    if top == "previews" or rel.endswith(".uploading") or rel.endswith(DONE):
        return False
    if top == CHECKPOINTS:
        return rel.count("/") >= 2 and rel.split("/")[1] == checkpoint
    return "/" not in rel or top in complete or top in ("dataset", "files")
