"""What the job queue needs from a database (docs/architecture.md, "Jobs"), and nothing more.

:class:`~studio.jobs.queue.JobQueue` holds the queue's rules (states, claims, leases, recovery)
once, as SQL both dialects accept (``?`` placeholders, ``COALESCE``, partial indexes). A backend
supplies what differs:

* connections and transactions — :meth:`QueueBackend.read` and :meth:`QueueBackend.write`;
* how a transaction keeps out of another's way: SQLite has one writer at a time (``BEGIN
  IMMEDIATE``), so :meth:`Transaction.serialize` and the row-lock clauses are empty there;
  PostgreSQL locks rows (``FOR UPDATE``; a claim takes the first queued row nobody holds with
  ``FOR UPDATE SKIP LOCKED``) and serializes the few decisions that read a whole table (name
  reservation) with a transaction-scoped advisory lock;
* how an insert returns its key (:meth:`Transaction.insert`);
* versioned schema migrations (:mod:`studio.jobs.schema`, applied by :meth:`QueueBackend.migrate`);
* how other processes learn of a change — :meth:`QueueBackend.wait_for_change`: SQLite wakes only
  this process's waiters (others look again after a growing pause); PostgreSQL sends a ``NOTIFY``
  with every committed change and every process ``LISTEN``\\ s, so waiters wake at once, anywhere.

Events are buffered by the transaction and inserted last, just before the commit, under a lock
that makes their sequence numbers follow commit order — a reader that has seen ``seq`` *n* has seen
every event before it, so following a job by ``seq > after`` never skips one.

Implementations: :mod:`studio.jobs.sqlite_backend` (the embedded default) and
:mod:`studio.jobs.postgres_backend` (``postgresql://…``; psycopg is imported only there).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, Protocol

from studio.jobs.records import JobEvent


class QueueConflict(Exception):
    """A unique index refused a write: another process won a race (e.g. two claims for one device)."""


class Rows(Protocol):
    """What :meth:`Transaction.execute` returns (a DB-API cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Reader(Protocol):
    """A connection for reads outside a transaction (each statement sees the latest commits)."""

    def execute(self, sql: str, args: Any = (), /) -> Rows: ...


class Transaction(ABC):
    """One write transaction. Rows read from it are mappings (``row["id"]``, ``dict(row)``)."""

    #: appended to a ``SELECT`` that reads rows the transaction will update ("" where one writer runs at a time)
    lock_rows: str = ""
    #: appended to a ``SELECT`` that takes the first row no other transaction holds (claims)
    skip_locked: str = ""

    def __init__(self) -> None:
        self.events: list[JobEvent] = []  # with their seq once committed
        self._pending: list[tuple[int, str, dict[str, Any], float]] = []
        self.changed = False  # something a waiter cares about changed (set by every event)

    @abstractmethod
    def execute(self, sql: str, args: Iterable[Any] = ()) -> Rows:
        """Run one statement (``?`` placeholders); a unique-index violation raises :class:`QueueConflict`."""

    @abstractmethod
    def insert(self, sql: str, args: Iterable[Any], key: str) -> int:
        """Run an ``INSERT`` and return the new row's ``key`` column (its generated id)."""

    def serialize(self, topic: str) -> None:
        """Wait until no other transaction that serialized on ``topic`` is open (held to the commit).
        Nothing to do where one writer runs at a time."""
        del topic

    def touch(self) -> None:
        """Wake waiters at the commit although no event was added (e.g. a job was removed)."""
        self.changed = True

    def event(self, job: int, kind: str, data: dict[str, Any], when: float | None = None) -> None:
        """Add an event to the job's log (inserted at the commit, in the order added)."""
        self._pending.append((int(job), kind, data, time.time() if when is None else when))
        self.changed = True

    def flush_events(self) -> None:
        """Insert the buffered events; the backend calls it last before committing, under its event-order lock."""
        for job, kind, data, when in self._pending:
            seq = self.insert("INSERT INTO events (job, time, kind, data) VALUES (?, ?, ?, ?)",
                              (job, when, kind, json.dumps(data, default=str)), "seq")
            self.events.append(JobEvent(seq, job, when, kind, data))
        self._pending = []


class ChangeSignal:
    """A counter of changes and a condition to wait on it: :meth:`QueueBackend.wait_for_change`'s part
    that every backend shares. ``since`` closes the gap between looking at the queue and waiting."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    @property
    def count(self) -> int:
        """Changes so far."""
        with self._cond:
            return self._count

    def bump(self) -> None:
        """Count a change and wake every waiter."""
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def wait(self, timeout: float, since: int | None = None) -> bool:
        """Wait up to ``timeout`` s for a change after ``since`` (default: now); True when one came."""
        with self._cond:
            start = self._count if since is None else since
            return self._cond.wait_for(lambda: self._count != start, max(0.0, timeout))


class QueueBackend(ABC):
    """A database the queue lives in. Safe to share between threads; each process opens its own."""

    #: ``"sqlite"`` or ``"postgresql"`` (the key of :data:`studio.jobs.schema.MIGRATIONS`)
    dialect: str
    #: whether other processes' changes wake :meth:`wait_for_change` (else waiters look again now and then)
    pushes_changes: bool = False

    def __init__(self) -> None:
        self.signal = ChangeSignal()

    @property
    @abstractmethod
    def where(self) -> str:
        """The database, for messages (a file path, or the URL without its password)."""

    @abstractmethod
    def migrate(self) -> int:
        """Bring the schema to :data:`~studio.jobs.schema.SCHEMA_VERSION` (refusing a newer one); return it."""

    @abstractmethod
    def read(self) -> contextlib.AbstractContextManager[Reader]:
        """A connection for reads."""

    @abstractmethod
    def write(self) -> contextlib.AbstractContextManager[Transaction]:
        """A write transaction: committed when the block ends, rolled back when it raises."""

    def changes(self) -> int:
        """The number of changes this process has seen so far (pass it to :meth:`wait_for_change`)."""
        return self.signal.count

    def notify(self) -> None:
        """Wake this process's waiters (a worker being stopped; a change committed here)."""
        self.signal.bump()

    def wait_for_change(self, timeout: float, since: int | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on a change after ``since``; True when woken by one."""
        return self.signal.wait(timeout, since)

    def close(self) -> None:
        """Release connections and threads (the backend must not be used afterwards); waiters wake."""
        self.signal.bump()
