"""The job queue's two databases for tests: SQLite, and a throw-away PostgreSQL cluster.

:class:`PostgresCluster` runs Debian's ``initdb`` and ``pg_ctl`` (``apt-get install postgresql``)
in a temporary folder, listening only on a unix socket there, with durability off (a test server
holds nothing worth keeping); as root it runs them as the ``postgres`` user, since ``initdb``
refuses root. The session fixture starts one for the whole run and stops it at the end. Each test
gets its own schema (so job ids start at 1) through the URL's ``search_path``.

Where PostgreSQL is not installed the ``postgres`` parameters skip with the reason, except where it
is required: ``.ci/run`` installs it and sets ``STUDIO_REQUIRE_POSTGRES=1``, and then they fail.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

BACKENDS = ("sqlite", "postgres")
_SCHEMAS = itertools.count(1)


def postgres_bin() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``: on the PATH, else the newest ``/usr/lib/postgresql/<ver>/bin``."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()])
    return Path(versions[-1]).parent if versions else None


class PostgresCluster:
    """A PostgreSQL server in a temporary folder, on a unix socket only. ``url(schema)`` connects to it."""

    def __init__(self, bindir: Path, *, user: str = "studio", database: str = "studio"):
        self.bindir, self.user, self.database = bindir, user, database
        self.folder = Path(tempfile.mkdtemp(prefix="studio-pg-"))  # short: a socket path has ~100 bytes
        self.port = 5432
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            shutil.chown(self.folder, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        out = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")

    def start(self) -> PostgresCluster:
        data = self.folder / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", self.user, "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        options = (f"-k {self.folder} -p {self.port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=400 -c shared_buffers=64MB")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.folder / "server.log"),
                  "-w", "-t", "60", "start")
        self.admin("postgres", f'CREATE DATABASE "{self.database}"')
        return self

    def stop(self) -> None:
        data = self.folder / "data"
        if data.is_dir():
            subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, schema: str | None = None, database: str | None = None) -> str:
        """A ``postgresql://`` URL (tables in ``schema`` when given: it must exist, see :meth:`new_schema`)."""
        url = f"postgresql://{self.user}@/{database or self.database}?host={quote(str(self.folder))}&port={self.port}"
        return url + (f"&options={quote(f'-csearch_path={schema}')}" if schema else "")

    def admin(self, database: str, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(database=database), autocommit=True) as conn:
            conn.execute(sql)

    def new_schema(self) -> str:
        """A fresh, empty schema: a queue of its own, whose job ids start at 1."""
        name = f"t{os.getpid()}_{next(_SCHEMAS)}"
        self.admin(self.database, f'CREATE SCHEMA "{name}"')
        return self.url(name)


def postgres_missing() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -r requirements.txt)"
    if postgres_bin() is None:
        return "PostgreSQL is absent: apt-get install -y postgresql to run the queue tests on it"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "initdb refuses root and runuser is missing"
    return None


def need_postgres(reason: str | None) -> None:
    """Skip (or fail, where ``STUDIO_REQUIRE_POSTGRES=1``) a PostgreSQL test that cannot run."""
    if reason is None:
        return
    if os.environ.get("STUDIO_REQUIRE_POSTGRES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster | str]:
    """The session's PostgreSQL cluster, or the reason there is none."""
    missing = postgres_missing()
    if missing:
        yield missing
        return
    bindir = postgres_bin()
    assert bindir is not None
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        cluster.stop()
        yield f"could not start a throw-away PostgreSQL cluster: {err}"
        return
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresCluster | str) -> str:
    """A fresh PostgreSQL queue URL (skips, or fails where required, without a server)."""
    need_postgres(postgres_server if isinstance(postgres_server, str) else None)
    assert isinstance(postgres_server, PostgresCluster)
    return postgres_server.new_schema()


@pytest.fixture(params=BACKENDS)
def queue_url(request: Any, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Each queue test runs on both databases: None (SQLite beside the library) or a fresh PostgreSQL
    schema's URL. ``STUDIO_QUEUE_URL`` is set to it (or removed), so the CLI and worker processes follow."""
    if request.param == "sqlite":
        monkeypatch.delenv("STUDIO_QUEUE_URL", raising=False)
        return None
    url = request.getfixturevalue("pg_url")
    monkeypatch.setenv("STUDIO_QUEUE_URL", url)
    return url


@pytest.fixture
def make_queue(queue_url: str | None) -> Iterator[Any]:
    """``make_queue(library, **kw)``: a :class:`~studio.jobs.JobQueue` on the test's database, closed afterwards."""
    from studio.jobs import JobQueue

    opened: list[Any] = []

    def make(library: Any, **kw: Any) -> Any:
        queue = JobQueue(library, url=queue_url, **kw)
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        queue.close()
