"""The queue on a PostgreSQL server: many workers on many machines (``--queue-url postgresql://…``).

* **Claims** take the first queued row no other transaction holds — ``SELECT … ORDER BY priority
  DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED`` — so concurrent claims never wait on each other and
  never take one job twice; a unique index on ``(worker_host, run_device) WHERE state = 'running'``
  keeps one running job per device per machine (the loser of a race gets :class:`QueueConflict`).
* **Other writes** lock the rows they change (``FOR UPDATE``); name reservation, which reads the
  whole table to decide, is serialized by a transaction-scoped advisory lock.
* **Events** are inserted last in their transaction under an advisory lock held to the commit, so
  their ``seq`` follows commit order; every committing change sends ``NOTIFY`` on the queue's
  channel, and a listener thread per process (one connection, ``LISTEN``) wakes the waiters —
  workers idle, ``jobs show --follow`` and the UI's event streams sleep until something happens.
* **Migrations** are recorded in ``studio_schema`` (one row per version), applied under an advisory
  lock when a queue opens.

The tables live in the connection's current schema (``?options=-csearch_path%3Dteam_a`` in the URL
gives a team its own); the channel and lock keys are derived from it, so queues in different schemas
of one database never wake or block each other. psycopg 3 is imported only here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from studio.errors import StudioError
from studio.jobs.backend import QueueBackend, QueueConflict, Reader, Rows, Transaction
from studio.jobs.schema import SCHEMA_VERSION, pending, too_new

LISTEN_CHECK = 1.0  # seconds: how often the listener thread looks whether its queue was closed
IDLE_CONNECTIONS = 4  # connections kept open per process for the next call


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as err:
        raise StudioError("A postgresql:// queue needs psycopg: pip install 'psycopg[binary]' "
                          "(see requirements.txt).") from err
    return psycopg


def _sql(sql: str) -> str:
    """``?`` placeholders → psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class _PgCursor:
    """Adapts a psycopg connection to :class:`~studio.jobs.backend.Reader` (``?`` placeholders)."""

    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, sql: str, args: Iterable[Any] = ()) -> Rows:
        cur: Rows = self.conn.execute(_sql(sql), tuple(args))
        return cur


class _PgTx(Transaction):
    lock_rows = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, conn: Any, lock_key: Callable[[str], int]):
        super().__init__()
        self.conn, self.lock_key = conn, lock_key
        self._serialized: set[str] = set()

    def execute(self, sql: str, args: Iterable[Any] = ()) -> Rows:
        psycopg = _psycopg()
        try:
            cur: Rows = self.conn.execute(_sql(sql), tuple(args))
            return cur
        except psycopg.errors.UniqueViolation as err:
            raise QueueConflict(str(err).splitlines()[0]) from err

    def insert(self, sql: str, args: Iterable[Any], key: str) -> int:
        row = self.execute(f"{sql} RETURNING {key}", args).fetchone()
        return int(row[key])

    def serialize(self, topic: str) -> None:
        if topic not in self._serialized:
            self.execute("SELECT pg_advisory_xact_lock(?)", (self.lock_key(topic),))
            self._serialized.add(topic)


class PostgresBackend(QueueBackend):
    """The queue in the PostgreSQL database at ``url`` (``postgresql://user:pass@host:5432/db``, or a
    socket folder: ``postgresql://user@/db?host=/run/postgresql``)."""

    dialect = "postgresql"
    pushes_changes = True

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        self.namespace = "public"  # the schema the tables are in (read by migrate)

    @property
    def where(self) -> str:
        return redact(self.url)

    @property
    def channel(self) -> str:
        """The NOTIFY channel of this queue (one per schema)."""
        return "studio_jobs_" + hashlib.sha1(self.namespace.encode()).hexdigest()[:12]

    def lock_key(self, topic: str) -> int:
        """A 63-bit advisory-lock key for ``topic`` in this queue's schema."""
        return int.from_bytes(hashlib.sha1(f"{self.namespace}/{topic}".encode()).digest()[:8], "big") >> 1

    # -- connections -------------------------------------------------------------------------
    def _connect(self) -> Any:
        psycopg = _psycopg()
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.Error as err:
            raise StudioError(f"Cannot reach the job queue {self.where} ({str(err).strip().splitlines()[0]}); "
                              "check --queue-url and that the server runs.") from err

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        psycopg = _psycopg()
        with self._lock:
            if self._pid != os.getpid():  # a forked child never shares its parent's sockets
                self._idle, self._pid = [], os.getpid()
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = self._connect()
        try:
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if conn.closed or conn.broken:
                raise StudioError(f"Lost the connection to the job queue {self.where} ({first}); check that the "
                                  "server runs, then try again.") from err
            raise StudioError(f"The job queue {self.where} refused a change ({first}); try again.") from err
        finally:
            idle = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            with self._lock:
                keep = idle and not self._closed.is_set() and len(self._idle) < IDLE_CONNECTIONS
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[Reader]:
        with self._connection() as conn:
            yield _PgCursor(conn)

    @contextlib.contextmanager
    def write(self) -> Iterator[Transaction]:
        with self._connection() as conn:
            conn.execute("BEGIN")
            tx = _PgTx(conn, self.lock_key)
            try:
                yield tx
                if tx._pending:
                    tx.serialize("events")  # seq in commit order: taken last, held to the commit
                tx.flush_events()
                if tx.changed:
                    tx.execute("SELECT pg_notify(?, '')", (self.channel,))
            except BaseException:
                if not conn.closed:
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        if tx.changed:
            self.notify()

    def migrate(self) -> int:
        with self._connection() as conn:
            self.namespace = str(conn.execute("SELECT current_schema() AS s").fetchone()["s"] or "public")
            conn.execute("BEGIN")
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key("migrate"),))
                conn.execute("CREATE TABLE IF NOT EXISTS studio_schema (version INTEGER PRIMARY KEY, "
                             "applied DOUBLE PRECISION NOT NULL)")
                version = int(conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM studio_schema")
                              .fetchone()["v"])
                if version > SCHEMA_VERSION:
                    raise StudioError(too_new(self.where, version))
                for number, sql in pending(self.dialect, version):
                    for statement in (s.strip() for s in sql.split(";")):
                        if statement:
                            conn.execute(statement)
                    conn.execute("INSERT INTO studio_schema (version, applied) VALUES (%s, %s)", (number, time.time()))
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return SCHEMA_VERSION

    # -- LISTEN / NOTIFY -----------------------------------------------------------------------
    def changes(self) -> int:
        self._listen()
        return super().changes()

    def wait_for_change(self, timeout: float, since: int | None = None) -> bool:
        self._listen()
        return super().wait_for_change(timeout, since)

    def _listen(self) -> None:
        """Start the listener thread (once); return when it listens, so no later change is missed."""
        if self._closed.is_set():
            return
        if self._listener is None or not self._listener.is_alive():
            with self._lock:
                if self._listener is None or not self._listener.is_alive():
                    self._listening.clear()
                    self._listener = threading.Thread(target=self._listen_loop, name="studio-queue-listen",
                                                      daemon=True)
                    self._listener.start()
        self._listening.wait(15.0)

    def _listen_loop(self) -> None:
        psycopg = _psycopg()
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    self.signal.bump()  # (re)connected: a waiter looks again, whatever it missed meanwhile
                    self._listening.set()
                    while not self._closed.is_set():
                        for _ in conn.notifies(timeout=LISTEN_CHECK):
                            self.signal.bump()
            except psycopg.Error:
                self._listening.set()  # waiters fall back to their timeouts until the server is back
                self._closed.wait(1.0)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
        super().close()
