"""Leases: when a running job counts as abandoned, and what becomes of it (docs/architecture.md, "Jobs").

A running job carries its worker's id, pid, machine, the lease the worker promised and its last
heartbeat. It is abandoned when the heartbeat is older than that lease, or — on the same machine —
when the worker's process is gone. Recovery puts it back in the queue (it resumes from its last
checkpoint), honours a pause or cancel the user asked for, or fails it once its worker died
``max_attempts`` times in a row without progress: no checkpoint beyond the ones it had when it
was claimed (a job that kills its worker at the same step must not loop forever; one that
checkpoints between deaths keeps going).

These functions run inside the caller's write transaction (:class:`~studio.jobs.backend.Transaction`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from studio.jobs.backend import Transaction
from studio.jobs.records import Job, pid_alive


def abandoned(job: Job, now: float, *, host: str, lease: float) -> str | None:
    """Why the running ``job`` counts as abandoned, or None. ``lease`` applies to jobs claimed
    before workers recorded their own; ``host`` is the machine judging (pids are only checked there)."""
    limit = job.lease or lease
    if job.heartbeat is None or now - job.heartbeat > limit:
        return f"worker {job.worker} sent no heartbeat for {limit:.0f} s"
    if job.worker_host == host and job.worker_pid and not pid_alive(job.worker_pid):
        return f"worker {job.worker} (pid {job.worker_pid}) is gone"
    return None


def recover(tx: Transaction, now: float, *, to_job: Callable[[Any], Job], host: str, lease: float,
            max_attempts: int) -> list[int]:
    """Take back the abandoned running jobs no other transaction is handling; return their ids."""
    recovered = []
    rows = tx.execute(f"SELECT * FROM jobs WHERE state = 'running' ORDER BY id{tx.skip_locked}").fetchall()
    for row in rows:
        job = to_job(row)
        why = abandoned(job, now, host=host, lease=lease)
        if why is None:
            continue
        error, attempts = None, None
        if job.request == "cancel":
            state, message = "cancelled", f"{why}; cancelled as requested"
        elif job.request == "pause":
            state, message = "paused", f"{why}; paused as requested, at its last checkpoint"
        elif (progress := checkpointed_since_claim(tx, job.id)) is not None:
            state, message = "queued", (f"{why}; it had checkpointed step {progress} since it was claimed, "
                                        "so it is queued again and resumes from there")
            attempts = 0  # deaths in a row without progress: none
        elif job.attempts >= max_attempts:
            state = "failed"
            error = message = (f"The worker stopped unexpectedly {job.attempts} times in a row without progress "
                               f"(no new checkpoint since step {last_checkpoint(tx, job.id)}; last: {why}); "
                               "it may run out of memory — lower the batch size or resolution, "
                               f"then `python -m studio jobs resume {job.id}`.")
        else:
            state, message = "queued", f"{why}; queued again, it resumes from its last checkpoint"
        cur = tx.execute("UPDATE jobs SET state = ?, request = NULL, error = ?, worker = NULL, worker_pid = NULL, "
                         "worker_host = NULL, run_device = NULL, heartbeat = NULL, eta = NULL, updated = ?, "
                         "attempts = COALESCE(?, attempts), "
                         "finished = CASE WHEN ? IN ('failed', 'cancelled') THEN ? ELSE NULL END "
                         "WHERE id = ? AND state = 'running' AND COALESCE(worker, '') = ?",
                         (state, error, now, attempts, state, now, job.id, job.worker or ""))
        if cur.rowcount != 1:  # its worker ended it meanwhile
            continue
        tx.event(job.id, "state", {"state": state, "message": message} | ({"error": error} if error else {}))
        recovered.append(job.id)
    return recovered


def checkpoints(tx: Transaction, job_id: int) -> list[tuple[int, int]]:
    """``(seq, step)`` of the job's checkpoint events, oldest first."""
    return [(r["seq"], int(json.loads(r["data"]).get("step", 0))) for r in tx.execute(
        "SELECT seq, data FROM events WHERE job = ? AND kind = 'checkpoint' ORDER BY seq", (job_id,)).fetchall()]


def last_checkpoint(tx: Transaction, job_id: int) -> int:
    """The step of the job's newest checkpoint (0: none)."""
    return max((step for _, step in checkpoints(tx, job_id)), default=0)


def checkpointed_since_claim(tx: Transaction, job_id: int) -> int | None:
    """The step of a checkpoint written since the job's latest claim and beyond every checkpoint
    before it (progress a resume keeps), or None when it made none."""
    claim = 0
    for r in tx.execute("SELECT seq, data FROM events WHERE job = ? AND kind = 'state' ORDER BY seq DESC",
                        (job_id,)).fetchall():
        if json.loads(r["data"]).get("state") == "running":
            claim = int(r["seq"])
            break
    found = checkpoints(tx, job_id)
    before = max((step for seq, step in found if seq < claim), default=0)
    after = max((step for seq, step in found if seq > claim), default=0)
    return after if after > before else None
