"""The embedded queue database: one SQLite file beside the library (``<library>/.jobs/jobs.sqlite``).

WAL mode (readers never block the worker); every write is one ``BEGIN IMMEDIATE`` transaction, so
one writer runs at a time and a claim — ``UPDATE … WHERE state = 'queued'`` inside it — can never
be taken twice. Right for one machine; over a network filesystem SQLite's locks are unsafe, so
several machines share a PostgreSQL queue instead (:mod:`studio.jobs.postgres_backend`).
Other processes' changes are noticed by looking again (:attr:`pushes_changes` is False).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.jobs.backend import QueueBackend, QueueConflict, Reader, Transaction
from studio.jobs.schema import SCHEMA_VERSION, pending, too_new


class _SqliteTx(Transaction):
    def __init__(self, conn: sqlite3.Connection):
        super().__init__()
        self.conn = conn

    def execute(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, tuple(args))
        except sqlite3.IntegrityError as err:
            if "UNIQUE" in str(err):
                raise QueueConflict(str(err)) from err
            raise

    def insert(self, sql: str, args: Iterable[Any], key: str) -> int:
        return int(self.execute(sql, args).lastrowid or 0)


class SqliteBackend(QueueBackend):
    """The queue in the SQLite file ``path`` (created with its folder when missing)."""

    dialect = "sqlite"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def where(self) -> str:
        return str(self.path)

    def migrate(self) -> int:
        with self._connection() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise StudioError(too_new(self.where, version))
                for number, sql in pending(self.dialect, version):
                    for statement in _statements(sql):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {int(number)}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return SCHEMA_VERSION

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as err:
            raise StudioError(f"Cannot open the job queue {self.path} ({err}).") from err
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")
            yield conn
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise StudioError(f"The job queue {self.path} stayed locked for 30 s; another process holds it "
                                  "(is the library on a network drive? SQLite needs a local disk).") from err
            raise
        finally:
            conn.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[Reader]:
        with self._connection() as conn:
            yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Transaction]:
        """One IMMEDIATE transaction (the database's write lock is taken at BEGIN)."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            tx = _SqliteTx(conn)
            try:
                yield tx
                tx.flush_events()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        self.notify()


def _statements(script: str) -> list[str]:
    """A migration's statements (``--`` comments dropped; no statement of ours holds a ``;``)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
