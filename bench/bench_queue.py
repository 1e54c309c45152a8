"""The job queue under load: 1,000 jobs drained by 8 worker processes, on SQLite and on PostgreSQL.

Jobs are submitted the normal way (``JobQueue.submit``: validated, inputs copied, a name reserved)
and run by real :class:`~studio.jobs.Worker` loops — claim, lease, heartbeat thread, progress,
finish, waiting for changes — with a **no-op trainer**: each job reports one step and is marked done,
so what is measured is the queue, not training. Each worker process acts as its own machine
(``host``), so all eight may hold a job at once (one job per device per machine).

Reported per backend: jobs/s from the moment the workers start to the last job done, claim latency
(one ``claim()`` call that got a job: its recovery scan, transaction and event) p50/p99, and
duplicates — jobs claimed or finished more than once (must be 0).

    python bench/bench_queue.py                          # 1,000 jobs, 8 workers, both backends
    python bench/bench_queue.py --backends postgres --jobs 200
    python bench/bench_queue.py --queue-url postgresql://user@host/db   # an existing server (its own schema!)

Without ``--queue-url`` the PostgreSQL run starts a throw-away cluster (Debian's ``postgresql``;
tests/jobs_backends.py) with durability off, as the test-suite does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TI = "textual-inversion"


def child(args: argparse.Namespace) -> None:
    """One worker process: a Worker whose jobs do nothing, timing its claims."""
    from studio.jobs import JobQueue, Worker
    from studio.jobs.worker import resolve_device

    queue = JobQueue(args.library, url=args.queue_url or None, host=f"bench-machine-{args.index}")
    latencies: list[float] = []
    claimed: list[int] = []
    claim = queue.claim

    def timed_claim(worker: str, device: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        job = claim(worker, device, **kw)
        if job is not None:
            latencies.append(time.perf_counter() - t0)
            claimed.append(job.id)
        return job

    queue.claim = timed_claim  # type: ignore[method-assign]

    class NoopWorker(Worker):
        def run_job(self, job: Any) -> str:
            if not self.queue.progress(job.id, self.id, [(1, 0.0, 0.001)], 1, 0.0):
                return "lost"
            return "done" if self.queue.finish(job.id, self.id, "no-op") else "lost"

    worker = NoopWorker(queue, device="cpu")
    resolve_device("cpu")  # imports torch now, not on the clock
    queue.has_queued()  # opens the connection pool (and PostgreSQL's listener) before the start
    queue.changes()
    folder = Path(args.out).parent
    (folder / f"ready-{args.index}").touch()
    while not (folder / "go").is_file():
        time.sleep(0.01)
    time.sleep(max(0.0, float((folder / "go").read_text()) - time.time()))
    ran = worker.run(once=True)
    Path(args.out).write_text(json.dumps({"ran": ran, "latencies": latencies, "claimed": claimed,
                                          "end": time.time()}))
    queue.close()


def submit_jobs(library: Path, url: str | None, n: int, images: Path) -> list[int]:
    from studio.jobs import JobQueue

    with JobQueue(library, url=url) as queue:
        cfg = {"images": str(images), "class_word": "cat", "steps": 1, "batch_size": 1}
        return [queue.submit(TI, cfg | {"name": f"job{i:05d}"}, "tiny").id for i in range(n)]


def drain(library: Path, url: str | None, workers: int, folder: Path) -> dict[str, Any]:
    procs = []
    for i in range(workers):
        cmd = [sys.executable, __file__, "--child", "--index", str(i), "--library", str(library),
               "--queue-url", url or "", "--out", str(folder / f"w{i}.json")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")))
    while not all((folder / f"ready-{i}").is_file() for i in range(workers)):  # all warmed up
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit("a worker failed to start")
        time.sleep(0.05)
    start = time.time() + 0.5
    (folder / "go").write_text(repr(start))
    for p in procs:
        if p.wait(3600) != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
    results = [json.loads((folder / f"w{i}.json").read_text()) for i in range(workers)]
    return {"start": start, "results": results}


def check(library: Path, url: str | None, ids: list[int], claimed: list[int]) -> int:
    """Duplicates: claims beyond one per job, plus jobs not done exactly once."""
    from studio.jobs import JobQueue

    with JobQueue(library, url=url) as queue:
        states = [e.data["state"] for e in queue.events(kinds=["state"])]
        running, done = states.count("running"), states.count("done")
        jobs = queue.list()
    extra_claims = len(claimed) - len(set(claimed))
    not_done = sum(1 for j in jobs if j.state != "done")
    return extra_claims + abs(running - len(ids)) + abs(done - len(ids)) + not_done


def run_backend(name: str, url: str | None, n: int, workers: int) -> dict[str, Any]:
    from tests.helpers import write_photos

    with tempfile.TemporaryDirectory(prefix=f"bench-queue-{name}-") as tmp:
        folder = Path(tmp)
        images = folder / "photos"
        write_photos(images, n=1, size=8)
        library = folder / "lib"
        t0 = time.perf_counter()
        ids = submit_jobs(library, url, n, images)
        submit_s = time.perf_counter() - t0
        out = drain(library, url, workers, folder)
        latencies = sorted(x for r in out["results"] for x in r["latencies"])
        claimed = [i for r in out["results"] for i in r["claimed"]]
        wall = max(r["end"] for r in out["results"]) - out["start"]
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        return {"backend": name, "jobs": n, "workers": workers, "submit_jobs_per_s": round(n / submit_s, 1),
                "drain_s": round(wall, 2), "jobs_per_s": round(n / wall, 1),
                "claim_p50_ms": round(q[49] * 1000, 2), "claim_p99_ms": round(q[98] * 1000, 2),
                "per_worker": [r["ran"] for r in out["results"]],
                "duplicates": check(library, url, ids, claimed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--queue-url", default=None, help="an existing PostgreSQL queue (default: a throw-away cluster)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--library", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for name in args.backends.split(","):
        if name == "sqlite":
            rows.append(run_backend("sqlite", None, args.jobs, args.workers))
        elif args.queue_url:
            rows.append(run_backend("postgres", args.queue_url, args.jobs, args.workers))
        else:
            from tests.jobs_backends import PostgresCluster, postgres_bin, postgres_missing

            missing = postgres_missing()
            if missing:
                raise SystemExit(missing)
            cluster = PostgresCluster(postgres_bin()).start()  # type: ignore[arg-type]
            try:
                rows.append(run_backend("postgres", cluster.new_schema(), args.jobs, args.workers))
            finally:
                cluster.stop()
        print(json.dumps(rows[-1]), flush=True)
    print("\n| backend | jobs | workers | jobs/s | claim p50 | claim p99 | duplicates |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['jobs']:,} | {r['workers']} | {r['jobs_per_s']} | {r['claim_p50_ms']} ms "
              f"| {r['claim_p99_ms']} ms | {r['duplicates']} |")


if __name__ == "__main__":
    main()
