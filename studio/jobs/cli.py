"""``python -m studio jobs {submit,list,show,pause,resume,cancel,rm,work}`` and ``train … --queue``.

``studio/cli.py`` owns the shared flags (base model, library) and passes its helpers in, so the
job commands take exactly the flags of ``train METHOD``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

Flags = Callable[[argparse.ArgumentParser], None]


def queue_flags(p: argparse.ArgumentParser) -> None:
    """``--queue-url`` and ``--storage``: where the queue and the job folders are (default: beside the library)."""
    p.add_argument("--queue-url", default=os.environ.get("STUDIO_QUEUE_URL") or None, metavar="URL",
                   help="the job queue's database: postgresql://user@host/db for workers on several machines "
                        "(default: STUDIO_QUEUE_URL, else SQLite in LIBRARY/.jobs)")
    p.add_argument("--storage", default=os.environ.get("STUDIO_STORAGE") or None, metavar="PATH_OR_URL",
                   help="where job folders (datasets, checkpoints) go: a path every worker can reach, or an fsspec "
                        "URL such as s3://bucket/jobs (default: STUDIO_STORAGE, else LIBRARY/.jobs)")


def open_queue(ns: argparse.Namespace, **kw: Any) -> Any:
    """The :class:`~studio.jobs.queue.JobQueue` the flags name."""
    from studio.jobs.queue import JobQueue

    return JobQueue(ns.library, url=getattr(ns, "queue_url", None), storage=getattr(ns, "storage", None), **kw)


def add_parser(sub: Any, *, base_flags: Flags, library_flag: Flags) -> None:
    """Add the ``jobs`` command group to the top-level subparsers ``sub``."""
    from trainers import trainer_registry
    from trainers.runner import add_cli_arguments

    j = sub.add_parser("jobs", help="the training queue: runs jobs one after another, survives restarts")
    jsub = j.add_subparsers(dest="action", required=True)

    s = jsub.add_parser("submit", help="queue a training job (the flags of `train METHOD`)")
    ssub = s.add_subparsers(dest="method", required=True)
    for entry in trainer_registry().values():
        p = ssub.add_parser(entry.cli_name, help=entry.help, description=entry.help)
        base_flags(p)
        library_flag(p)
        queue_flags(p)
        p.add_argument("--priority", type=int, default=0, help="higher runs first (default: 0, submission order)")
        add_cli_arguments(entry, p)

    p = jsub.add_parser("list", help="list jobs")
    library_flag(p)
    queue_flags(p)
    p.add_argument("--state", action="append", default=None, help="only jobs in this state (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = jsub.add_parser("show", help="one job: settings, progress, recent log")
    library_flag(p)
    queue_flags(p)
    p.add_argument("id", type=int)
    p.add_argument("--follow", action="store_true", help="print its events as they happen, until it ends")

    for action, helptext in (("pause", "pause jobs (a running one stops after a checkpoint)"),
                             ("resume", "queue paused, failed or cancelled jobs again (from their last checkpoint)"),
                             ("cancel", "cancel jobs (a running one stops after its current step)"),
                             ("rm", "delete jobs that are not running, with their folders")):
        p = jsub.add_parser(action, help=helptext)
        library_flag(p)
        queue_flags(p)
        p.add_argument("ids", type=int, nargs="+", metavar="ID")

    p = jsub.add_parser("work", help="run queued jobs on one device (headless; Ctrl-C or SIGTERM stop cleanly)")
    library_flag(p)
    queue_flags(p)
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: best available)")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty instead of waiting for jobs")
    p.add_argument("--lease", type=float, default=None, metavar="SECONDS",
                   help="a job this worker runs is taken back after this long without a heartbeat (default: 60)")
    p.add_argument("--machine", default=None, metavar="NAME",
                   help="this machine's name in the queue: one job per device per machine (default: the host name)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="local working copies of jobs kept in URL storage (default: ~/.cache/studio/jobs)")


def submit(entry: Any, ns: argparse.Namespace, settings: Any) -> int:
    """``jobs submit METHOD …`` and ``train METHOD … --queue``: print the new job's id."""
    from trainers.runner import config_from_cli

    cfg = config_from_cli(entry, ns, settings)
    with open_queue(ns) as queue:
        job = queue.submit(entry.cli_name, cfg, settings, priority=getattr(ns, "priority", 0) or 0)
    print(job.id)
    where = f" --queue-url {queue.where}" if queue.url else ""
    print(f"queued job {job.id}: {job.name} {job.token}, {job.total} steps on {job.base['base']} "
          f"(run the queue with `python -m studio jobs work --library {queue.library.folder}{where}`)", file=sys.stderr)
    return 0


def run(ns: argparse.Namespace, settings: Any = None) -> int:
    if ns.action == "submit":
        from trainers import get_trainer

        return submit(get_trainer(ns.method), ns, settings)
    if ns.action == "work":
        extra = {"work_dir": ns.work_dir, "host": ns.machine} | ({"lease": ns.lease} if ns.lease else {})
        with open_queue(ns, **extra) as queue:
            return _work(queue, ns)
    with open_queue(ns) as queue:
        if ns.action == "list":
            return _list(queue, ns)
        if ns.action == "show":
            return _show(queue, ns.id, ns.follow)
        for job_id in ns.ids:
            if ns.action == "rm":
                queue.remove(job_id)
                print(f"removed job {job_id}")
                continue
            job = getattr(queue, ns.action)(job_id)
            print(f"job {job.id}: {job.state}" + (f" ({job.request} requested)" if job.request else ""))
    return 0


def _list(queue: Any, ns: argparse.Namespace) -> int:
    jobs = queue.list(ns.state)
    rows = [j.row() for j in jobs]
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no jobs in {queue.root if queue.url is None else queue.where}")
        return 0
    cols = ["id", "state", "method", "name", "trigger", "progress", "loss", "eta_s", "base"]
    text = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r, t in zip(rows, text):
        line = "  ".join(v.ljust(w) for v, w in zip(t, widths))
        print(line + (f"  ! {r['error']}" if r["error"] else ""))
    return 0


def _show(queue: Any, job_id: int, follow: bool) -> int:
    job = queue.get(job_id)
    if not follow:
        data = job.to_dict()
        curve = queue.loss_curve(job_id)
        data["loss_curve_tail"] = curve[-10:]
        data["log_tail"] = [e.text() for e in queue.events(job_id, kinds=["log", "state"])][-10:]
        print(json.dumps(data, indent=2, default=str))
        return 0
    after = 0
    while True:
        for event in queue.wait_events(job_id, after, timeout=5.0):
            after = event.seq
            print(f"[job {job_id}] {event.text()}", flush=True)
        job = queue.get(job_id)
        if job.terminal and not queue.events(job_id, after):
            print(job.result or job.error or job.state)
            return 0 if job.state == "done" else 1


def _work(queue: Any, ns: argparse.Namespace) -> int:
    from studio.jobs.worker import Worker
    from trainers.runner import PrintCallbacks

    worker = Worker(queue, device=ns.device, callbacks=PrintCallbacks(), report=lambda m: print(m, file=sys.stderr))

    def stop(signum: int, frame: Any) -> None:
        print("stopping: the running job saves a checkpoint after its current step and goes back to the queue "
              "(Ctrl-C again quits at once)", file=sys.stderr)
        worker.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    saved = {}
    if threading.current_thread() is threading.main_thread():
        saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"worker {worker.id}: {queue.root if queue.url is None else queue.where}", file=sys.stderr)
    try:
        ran = worker.run(once=ns.once)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    print(f"worker {worker.id} ran {ran} job(s)", file=sys.stderr)
    return 0

