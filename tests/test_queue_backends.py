"""The queue on its two databases (tests/jobs_backends.py): migrations, LISTEN/NOTIFY, job folders in
URL storage resumed by another machine, and four worker processes on four "machines" sharing one
PostgreSQL queue — every job done once, every concept published once, a ``kill -9`` resumed elsewhere.
(tests/test_jobs.py runs the queue's behaviour on both databases.)"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from studio.errors import StudioError
from studio.jobs import JobQueue, Worker, start_worker_process
from studio.jobs.schema import MIGRATIONS, SCHEMA_VERSION
from tests.test_jobs import TI, _cfg, _env, _reference, _state_events, _tensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tests.helpers import write_photos

    d = tmp_path_factory.mktemp("job-imgs")
    write_photos(d)
    return d


@pytest.fixture
def loader(tiny_bases):
    return lambda settings, device: tiny_bases(settings["base"])


# ----------------------------------------------------------------------------------------------
# Migrations
# ----------------------------------------------------------------------------------------------


def _schema_version(queue: JobQueue) -> int:
    with queue.backend.read() as conn:
        if queue.backend.dialect == "sqlite":
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        return int(conn.execute("SELECT MAX(version) AS v FROM studio_schema").fetchone()["v"])


def test_migrations_are_versioned_and_a_newer_database_is_refused(make_queue, tmp_path):
    queue = make_queue(tmp_path / "lib")
    assert _schema_version(queue) == SCHEMA_VERSION
    make_queue(tmp_path / "lib")  # opening again applies nothing
    assert _schema_version(queue) == SCHEMA_VERSION
    with queue.backend.write() as tx:  # what a newer studio leaves behind
        if queue.backend.dialect == "sqlite":
            tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        else:
            tx.execute("INSERT INTO studio_schema (version, applied) VALUES (?, ?)", (SCHEMA_VERSION + 1, time.time()))
    with pytest.raises(StudioError, match=f"made by a newer studio \\(schema {SCHEMA_VERSION + 1}\\); upgrade"):
        make_queue(tmp_path / "lib")


def test_a_version_1_sqlite_queue_is_migrated_with_its_jobs(images, loader, tmp_path):
    """A queue made before the PostgreSQL backend (schema 1) keeps its jobs, and they still run."""
    lib = tmp_path / "lib"
    with JobQueue(lib) as queue:
        job = queue.submit(TI, _cfg(images, name="old", steps=2), "tiny")
    db = lib / ".jobs" / "jobs.sqlite"
    with sqlite3.connect(db) as conn:  # rebuild it as schema 1 had it, with the job's row
        row = conn.execute("SELECT * FROM jobs").fetchone()
        cols = [d[0] for d in conn.execute("SELECT * FROM jobs").description]
        events = conn.execute("SELECT job, time, kind, data FROM events").fetchall()
    db.unlink()
    v1 = {c: v for c, v in zip(cols, row) if c not in ("lease", "location")}
    with sqlite3.connect(db) as conn:
        conn.executescript(MIGRATIONS["sqlite"][0] + "PRAGMA user_version = 1;")
        conn.execute(f"INSERT INTO jobs ({', '.join(v1)}) VALUES ({', '.join('?' for _ in v1)})", list(v1.values()))
        conn.executemany("INSERT INTO events (job, time, kind, data) VALUES (?, ?, ?, ?)", events)

    with JobQueue(lib) as queue:
        assert _schema_version(queue) == SCHEMA_VERSION
        old = queue.get(job.id)
        assert (old.state, old.location, old.folder) == ("queued", None, lib / ".jobs" / "job-000001")
        assert Worker(queue, load_base=loader).run(once=True) == 1
        assert queue.get(job.id).state == "done" and (lib / "old.safetensors").is_file()
    with sqlite3.connect(db) as conn:
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "jobs_one_running_per_machine_device" in indexes and "jobs_one_running_per_device" not in indexes


# ----------------------------------------------------------------------------------------------
# LISTEN / NOTIFY
# ----------------------------------------------------------------------------------------------

CHANGER = """
import sys, time
from studio.jobs.queue import JobQueue
queue = JobQueue(sys.argv[1], url=sys.argv[2])
time.sleep(float(sys.argv[4]))
queue.log(int(sys.argv[3]), "log", {"message": "hello from another process"})
queue.close()
"""


def test_postgres_wakes_a_waiter_in_another_process_without_polling(pg_url, images, tmp_path):
    queue = JobQueue(tmp_path / "lib", url=pg_url)
    try:
        job = queue.submit(TI, _cfg(images, name="n", steps=2), "tiny")
        after = queue.events(job.id)[-1].seq
        reads = []
        events = queue.events
        queue.events = lambda *a, **k: reads.append(a) or events(*a, **k)  # count the looks at the table
        script = tmp_path / "changer.py"
        script.write_text(CHANGER)
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "lib"), pg_url, str(job.id), "3"],
                                cwd=REPO, env=_env())
        start = time.monotonic()
        found = queue.wait_events(job.id, after, timeout=60)
        waited = time.monotonic() - start
        assert proc.wait(60) == 0
        assert [e.text() for e in found] == ["hello from another process"]
        assert 2.5 < waited < 15, waited  # woken when the other process committed, not at the timeout
        assert len(reads) <= 3, reads  # one look before sleeping, one when woken (+1 if the listener reconnected)
    finally:
        queue.close()


# ----------------------------------------------------------------------------------------------
# Job folders in URL storage (fsspec), resumed on another machine
# ----------------------------------------------------------------------------------------------


def test_a_job_in_url_storage_is_resumed_by_another_machine(make_queue, loader, images, tiny, tmp_path):
    """Two machines that share only the storage URL: the first trains to a checkpoint and stops, the
    second (an empty working copy) downloads it and finishes bit-identically."""
    from trainers.loop import TrainCallbacks

    shared = tmp_path / "shared"
    storage = f"file://{shared}"
    first = make_queue(tmp_path / "lib", storage=storage, work_dir=tmp_path / "machine-a", host="machine-a")
    job = first.submit(TI, _cfg(images, name="far", steps=6, checkpoint_every=2), "tiny")
    assert job.location == f"{storage}/job-000001" and (shared / "job-000001" / "dataset").is_dir()
    assert not (tmp_path / "lib" / ".jobs" / "job-000001").exists()  # only the database is beside the library

    class StopAtThree(TrainCallbacks):
        def on_step(self, step, total, loss, seconds):
            if step == 3:
                worker.stop()  # pauses after the step, with a checkpoint that is uploaded and recorded

    worker = Worker(first, load_base=loader, callbacks=StopAtThree())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker.start().join(timeout=120)
        stopped = first.get(job.id)
        assert (stopped.state, stopped.step) == ("queued", 3)
        assert sorted(p.name for p in (shared / "job-000001" / "checkpoints").iterdir()) == ["step-000002",
                                                                                           "step-000003"]
        assert first.last_checkpoint(job.id) == "step-000003"

        second = make_queue(tmp_path / "lib", storage=storage, work_dir=tmp_path / "machine-b", host="machine-b")
        assert Worker(second, load_base=loader).run(once=True) == 1
    finally:
        torch.set_num_threads(threads)
    done = second.get(job.id)
    assert done.state == "done" and done.folder.is_relative_to(tmp_path / "machine-b")
    assert any("resuming at step 3" in e.text() for e in second.events(job.id, kinds=["log"]))
    ref = _reference(tiny, images, tmp_path, steps=6)
    assert torch.equal(_tensors(done.result)["emb_params"], _tensors(ref.path)["emb_params"])
    assert [loss for _, loss in second.loss_curve(job.id)] == ref.losses
    remote = sorted(p.relative_to(shared / "job-000001").as_posix() for p in (shared / "job-000001").rglob("*")
                    if p.is_file())
    assert "concept.safetensors" in remote and not any(r.startswith("checkpoints/") for r in remote)
    assert not any(r.endswith(".uploading") for r in remote)
    assert {"far.safetensors"} <= {p.name for p in (tmp_path / "lib").iterdir()} <= {".jobs", "far.safetensors",
                                                                                    "far.preview.png"}


# ----------------------------------------------------------------------------------------------
# Four worker processes, four machines, one PostgreSQL queue
# ----------------------------------------------------------------------------------------------


def test_four_workers_on_four_machines_run_twelve_jobs_exactly_once(pg_url, images, tiny, tmp_path):
    lib = tmp_path / "lib"  # a folder every "machine" reaches, like a network share
    queue = JobQueue(lib, url=pg_url)
    long = queue.submit(TI, _cfg(images, name="long", steps=24, checkpoint_every=4), "tiny", priority=1)
    short = [queue.submit(TI, _cfg(images, name=f"s{i}", steps=2), "tiny").id for i in range(11)]
    ids = [long.id, *short]
    logs = [open(tmp_path / f"worker-{i}.log", "wb") for i in range(4)]  # noqa: SIM115
    procs = [start_worker_process(lib, device="cpu", queue_url=pg_url, machine=f"machine-{i}", lease=6, cwd=REPO,
                                  env=_env(), stdout=logs[i], stderr=subprocess.STDOUT) for i in range(4)]

    def tails() -> str:
        return "\n".join((tmp_path / f"worker-{i}.log").read_text(errors="replace")[-1500:] for i in range(4))

    try:
        deadline = time.monotonic() + 240
        while not queue.events(long.id, kinds=["checkpoint"]):  # the long job checkpointed step 4
            assert time.monotonic() < deadline, "the long job never checkpointed\n" + tails()
            assert all(p.poll() is None for p in procs), tails()
            time.sleep(0.1)
        victim = queue.get(long.id)
        assert victim.state == "running" and victim.worker_pid in [p.pid for p in procs]
        os.kill(victim.worker_pid, signal.SIGKILL)  # mid-job: a step, a checkpoint or a transaction
        for job_id in ids:
            assert queue.wait(job_id, timeout=300).state == "done", tails()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    killed = [p for p in procs if p.pid == victim.worker_pid][0]
    assert killed.returncode == -signal.SIGKILL
    assert all(p.returncode == 0 for p in procs if p is not killed), tails()

    jobs = {j.id: j for j in queue.list()}
    assert all(jobs[i].state == "done" for i in ids)
    for job_id in ids:  # every job done exactly once; only the killed one was claimed twice
        assert len(_state_events(queue, job_id, "done")) == 1
        assert len(_state_events(queue, job_id, "running")) == (2 if job_id == long.id else 1)
    claimed_by = {e.data["message"].split()[3] for i in ids for e in _state_events(queue, i, "running")}
    assert len(claimed_by) >= 3  # the workers shared the queue (the killed one, its heir, others)
    marks = sorted((e.seq, +1 if e.data["state"] == "running" else -1) for i in ids
                   for e in queue.events(i, kinds=["state"]) if e.data["state"] in ("running", "done", "queued")
                   and not e.data.get("message", "").startswith("submitted"))
    running = [sum(d for _, d in marks[: k + 1]) for k in range(len(marks))]
    assert max(running) >= 2  # side by side, on one device of four machines
    # every concept published exactly once, under its own name, nothing half-written left
    published = sorted(p.name for p in lib.iterdir() if p.suffix == ".safetensors")
    assert published == sorted(f"{jobs[i].name}.safetensors" for i in ids)
    assert sorted(str(jobs[i].result) for i in ids) == sorted(str(lib / n) for n in published)
    assert not [p for p in lib.iterdir() if p.name.startswith(".") and p.name != ".jobs"]
    # the killed job: taken back when its lease ran out, resumed from its checkpoint on another machine
    back = _state_events(queue, long.id, "queued")[-1].text()
    assert "sent no heartbeat for 6 s" in back and "checkpointed step" in back
    runs = _state_events(queue, long.id, "running")
    assert runs[0].data["message"] != runs[1].data["message"]  # another worker took it
    resumed = [e.text() for e in queue.events(long.id, kinds=["log"]) if "resuming at step" in e.text()]
    assert resumed and int(resumed[-1].split("resuming at step ")[1].split()[0]) >= 4
    ref = _reference(tiny, images, tmp_path, steps=24)
    assert torch.equal(_tensors(jobs[long.id].result)["emb_params"], _tensors(ref.path)["emb_params"])
    assert [loss for _, loss in queue.loss_curve(long.id)] == ref.losses
    queue.close()
