"""Training jobs: a persistent queue that survives crashes and restarts, with true resume.

* :class:`JobQueue` — submit, list, pause, resume, cancel, follow events (SQLite beside the library,
  or PostgreSQL for workers on several machines: :mod:`studio.jobs.backend`);
* :class:`Worker` — claims jobs and trains them, one per device per machine (``python -m studio jobs work``);
* :mod:`studio.jobs.execute` — how one job trains with checkpoints and publishes its concept once;
* :mod:`studio.jobs.prepare` — validating a request and copying its inputs into the job folder;
* :mod:`studio.jobs.storage` — where job folders live (a path, or an fsspec URL mirrored per machine);
* :mod:`studio.jobs.recovery` — leases: when a running job is abandoned and what becomes of it;
* :mod:`studio.jobs.records` — states, :class:`Job` and :class:`JobEvent`; :mod:`studio.jobs.schema` the tables.

Importing this package does not import torch (nor psycopg); the worker loads the trainers when a job runs.
"""

from studio.jobs.queue import JobQueue
from studio.jobs.records import STATES, TERMINAL, Job, JobEvent, JobState
from studio.jobs.worker import Worker, start_worker_process

__all__ = ["JobQueue", "Job", "JobEvent", "JobState", "STATES", "TERMINAL", "Worker", "start_worker_process"]
