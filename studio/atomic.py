"""Atomic file writes: a temp file in the target folder, fsync, then ``os.replace``.

A crash or a full disk in the middle of a write never leaves a half-written file under the final
name, and never destroys the previous version.

Temporary files are named ``.NAME.PID-HOST-XXXXXXXX.studio.tmp`` (:func:`temp_path`): the writer's
pid and a tag of its host (and pid namespace) say whose they are, so what a killed process left
behind can be recognised and removed (:func:`remove_stale_temporaries`, run when a library is
opened or listed and when a job starts) while the temporary file of a live writer never is.
Files get the mode a plain ``open(..., "w")`` gives (``0o666`` minus the umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from studio.errors import StudioError

TEMP_SUFFIX = ".studio.tmp"
STALE_AFTER = 6 * 3600.0  # seconds: a temporary file of another host (or an old-style one) older than this is stale
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[^.]*" + re.escape(TEMP_SUFFIX) + "$")
# Temporary names from before the pid tag (mkstemp's ``.NAME.XXXXXXXX.tmp``, ``.NAME.tmp-PID``, ``.NAME.PID.tmp``,
# the checkpoints' ``.tmp-step-N-PID``): only their age says they are stale.
_OLD_TEMP = re.compile(r"^\..+(\.tmp|\.tmp-\d+)$|^\.tmp-step-\d+-\d+$")


def host_id() -> str:
    """This machine (and pid namespace, so containers sharing a volume never judge each other's pids)."""
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        return f"{host}#pidns:{os.stat('/proc/self/ns/pid').st_ino}"
    return host


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie counts as gone)."""
    if os.name == "nt":  # os.kill would terminate it; rely on the heartbeat there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


@functools.lru_cache(maxsize=1)
def host_tag() -> str:
    """Six hex digits naming :func:`host_id` in temporary file names."""
    return hashlib.sha1(host_id().encode()).hexdigest()[:6]


def _read_umask() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # read once, at import (before any thread writes files)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def file_mode() -> int:
    """The mode a new file gets from a plain ``open()``: ``0o666`` minus the umask."""
    return 0o666 & ~_UMASK


def temp_path(final: str | os.PathLike[str], tag: str = "") -> Path:
    """A fresh, unused temporary name beside ``final`` (nothing is created): ``.NAME[.TAG].PID-HOST-RANDOM.studio.tmp``."""
    final = Path(final)
    mid = f".{tag}" if tag else ""
    return final.with_name(f".{final.name}{mid}.{os.getpid()}-{host_tag()}-{os.urandom(4).hex()}{TEMP_SUFFIX}")


def is_stale_temporary(path: Path, *, now: float | None = None, max_age: float = STALE_AFTER) -> bool:
    """Whether ``path`` is a temporary file (or folder) whose writer is gone: its pid is not alive
    on this host, or — another host's, or an old-style name without a pid — it is older than ``max_age``."""
    m = _TEMP.match(path.name)
    if m is None and not _OLD_TEMP.match(path.name):
        return False
    if m is not None and m["host"] == host_tag():
        return int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    return age > max_age


def remove_stale_temporaries(folder: str | os.PathLike[str], *, max_age: float = STALE_AFTER) -> list[Path]:
    """Delete what writers that died left in ``folder`` (not recursive); returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if not is_stale_temporary(path, now=now, max_age=max_age):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}-{host_tag()}-", suffix=TEMP_SUFFIX,
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a saved file gets what any new file gets
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == 28:  # ENOSPC
            raise StudioError(f"The disk is full while writing {final}; free some space and try again "
                              "(nothing was overwritten).") from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
