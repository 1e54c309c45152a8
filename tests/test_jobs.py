"""The training-job queue: order, failures, pause/resume, kill -9 and restart, concurrent workers.

Every test runs on both databases (``queue_url``: SQLite beside the library, PostgreSQL —
tests/jobs_backends.py); ``make_queue`` opens a queue on the test's one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from studio.errors import StudioError
from studio.jobs import Worker, start_worker_process
from studio.methods import load_concept
from tests.helpers import write_photos
from trainers import get_trainer
from trainers.loop import TrainCallbacks
from trainers.runner import train

REPO = Path(__file__).resolve().parents[1]
TI = "textual-inversion"
GHOST_PID = 2**22 + 12345  # above Linux's largest pid_max: never a live process


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("job-imgs")
    write_photos(d)
    return d


@pytest.fixture
def loader(tiny_bases):
    """A worker base loader that reuses the session's tiny bases (and counts its calls)."""
    calls = []

    def load(settings, device):
        calls.append(settings["base"])
        return tiny_bases(settings["base"])

    load.calls = calls
    return load


def _cfg(images, **kw):
    values = dict(images=str(images), class_word="cat", steps=3, batch_size=1, lr=5e-2, log_every=0, seed=0)
    values.update(kw)
    return values


def _reference(tiny, images, tmp_path, **kw):
    """The same training in the foreground, uninterrupted (trainers.runner.train), on one thread like
    the worker subprocesses (OMP_NUM_THREADS=1): CPU matmuls may round differently with more threads."""
    cfg = get_trainer(TI).resolve(**_cfg(images, out=str(tmp_path / "ref" / "ref.safetensors"), **kw))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(get_trainer(TI), cfg, tiny)
    finally:
        torch.set_num_threads(threads)


def _tensors(path):
    return load_concept(path).tensors


def _library_files(queue):
    return sorted(p.name for p in queue.library.folder.iterdir() if p.name != ".jobs")


def _state_events(queue, job_id, state):
    return [e for e in queue.events(job_id, kinds=["state"]) if e.data["state"] == state]


def test_jobs_run_in_order_and_cancel_and_failure_do_not_stop_the_queue(images, loader, tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib")
    source = tmp_path / "src"
    shutil.copytree(images, source)
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "3.png").write_bytes(b"this is not a PNG")

    a = queue.submit(TI, _cfg(source, name="a"), "tiny")
    b = queue.submit(TI, _cfg(broken, name="b"), "tiny")
    c = queue.submit(TI, _cfg(source, name="c"), "tiny")
    d = queue.submit(TI, _cfg(source, name="d"), "tiny")
    assert [j.state for j in queue.list()] == ["queued"] * 4
    assert queue.cancel(d.id).state == "cancelled"
    shutil.rmtree(source)  # the jobs train on their own copies

    assert Worker(queue, load_base=loader).run(once=True) == 3
    jobs = {j.id: j for j in queue.list()}
    assert [jobs[i].state for i in (a.id, b.id, c.id, d.id)] == ["done", "failed", "done", "cancelled"]
    assert "3.png" in jobs[b.id].error and "corrupt" in jobs[b.id].error
    assert _state_events(queue, b.id, "failed")[0].data["error"] == jobs[b.id].error
    started = [_state_events(queue, i, "running")[0].seq for i in (a.id, b.id, c.id)]
    assert started == sorted(started)  # submission order
    assert not _state_events(queue, d.id, "running")
    assert _library_files(queue) == ["a.safetensors", "c.safetensors"]
    assert jobs[a.id].result == str(queue.library.path("a"))
    assert [s for s, _ in queue.loss_curve(a.id)] == [1, 2, 3]
    assert loader.calls == ["tiny"] * 2  # b reused a's base; c reloaded it (a failure may leave it dirty)


def test_invalid_settings_are_refused_at_submit(images, tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib")
    with pytest.raises(StudioError, match="steps must be at least 1"):
        queue.submit(TI, _cfg(images, steps=0), "tiny")
    with pytest.raises(StudioError, match="no setting"):
        queue.submit(TI, _cfg(images, stepz=3), "tiny")
    with pytest.raises(StudioError, match="does not exist"):
        queue.submit(TI, _cfg(tmp_path / "nowhere"), "tiny")
    first = queue.submit(TI, _cfg(images), "tiny")
    second = queue.submit(TI, _cfg(images), "tiny")  # same class word: a free token and name are chosen
    assert (first.token, second.token) == ("<cat>", "<cat-2>")
    with pytest.raises(StudioError, match="already trains"):
        queue.submit(TI, _cfg(images, name="cat", token="<other>"), "tiny")
    assert queue.list() == [queue.get(first.id), queue.get(second.id)]


def test_pause_and_resume_continue_bit_identically(images, loader, tiny, tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib")
    job = queue.submit(TI, _cfg(images, name="p", steps=6, checkpoint_every=4, preview_every=3), "tiny")

    class PauseAtTwo(TrainCallbacks):
        def on_step(self, step, total, loss, seconds):
            if step == 2:
                queue.pause(job.id)  # as a user would, while the step runs

    Worker(queue, load_base=loader, callbacks=PauseAtTwo()).run(once=True)
    paused = queue.get(job.id)
    assert (paused.state, paused.step) == ("paused", 2)
    assert (paused.folder / "checkpoints" / "step-000002").is_dir()  # paused with a checkpoint
    assert not queue.library.names()

    assert queue.resume(job.id).state == "queued"
    Worker(queue, load_base=loader).run(once=True)
    done = queue.get(job.id)
    assert done.state == "done"
    assert any("resuming at step 2" in e.text() for e in queue.events(job.id, kinds=["log"]))
    ref = _reference(tiny, images, tmp_path, steps=6)
    assert torch.equal(_tensors(done.result)["emb_params"], _tensors(ref.path)["emb_params"])
    assert [loss for _, loss in queue.loss_curve(job.id)] == ref.losses
    previews = [e.data for e in queue.events(job.id, kinds=["preview"])]
    assert [p["step"] for p in previews] == [3, 6] and done.preview == previews[-1]["path"]
    assert Image.open(done.preview).size == (32, 32)
    assert _library_files(queue) == ["p.preview.png", "p.safetensors"]  # the last preview is the card image
    assert not (done.folder / "checkpoints").exists()  # only a resume needed them


def test_stopping_a_worker_puts_its_job_back_in_the_queue(images, loader, tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib")
    job = queue.submit(TI, _cfg(images, name="s", steps=4), "tiny")

    class StopAtTwo(TrainCallbacks):
        def on_step(self, step, total, loss, seconds):
            if step == 2:
                worker.stop()  # what SIGTERM / Ctrl-C do in `jobs work`

    worker = Worker(queue, load_base=loader, callbacks=StopAtTwo())
    worker.start().join(timeout=60)
    back = queue.get(job.id)
    assert (back.state, back.step, back.attempts) == ("queued", 2, 0)
    Worker(queue, load_base=loader).run(once=True)
    assert queue.get(job.id).state == "done"
    assert any("resuming at step 2" in e.text() for e in queue.events(job.id, kinds=["log"]))


def test_a_job_whose_worker_keeps_dying_fails_instead_of_looping(images, tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib", max_attempts=2)
    job = queue.submit(TI, _cfg(images, name="oom"), "tiny")
    for attempt in (1, 2):
        assert queue.claim("doomed", "cpu", pid=GHOST_PID).id == job.id  # then the process "dies"
        assert queue.get(job.id).attempts == attempt
        assert queue.list()[0].state == ("queued" if attempt == 1 else "failed")  # listing recovers it
    assert "stopped unexpectedly 2 times" in queue.get(job.id).error


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")


def test_kill_9_mid_job_then_restart_finishes_with_the_same_concept(images, loader, tiny, tmp_path, make_queue):
    lib = tmp_path / "lib"
    queue = make_queue(lib)
    job = queue.submit(TI, _cfg(images, name="k", steps=20, checkpoint_every=4), "tiny")
    proc = start_worker_process(lib, device="cpu", once=True, queue_url=queue.url, cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not queue.events(job.id, kinds=["checkpoint"]):  # the first checkpoint (step 4) is on disk
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the worker never reached its first checkpoint"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # wherever it is now: a step, a checkpoint, a transaction
        proc.wait()
    killed = queue.get(job.id)
    assert killed.state == "running" and 4 <= killed.step < 20, (killed.state, killed.step)

    # A new process tree: state is only in SQLite and the job folder (one thread, like the killed worker).
    queue = make_queue(lib)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert Worker(queue, load_base=loader).run(once=True) == 1
    finally:
        torch.set_num_threads(threads)
    done = queue.get(job.id)
    assert (done.state, done.attempts) == ("done", 1)  # it had checkpointed before the kill: not counted
    assert any("is gone" in e.text() for e in _state_events(queue, job.id, "queued"))
    assert any("resuming at step" in e.text() for e in queue.events(job.id, kinds=["log"]))
    ref = _reference(tiny, images, tmp_path, steps=20)
    assert torch.equal(_tensors(done.result)["emb_params"], _tensors(ref.path)["emb_params"])
    assert [loss for _, loss in queue.loss_curve(job.id)] == ref.losses
    assert _library_files(queue) == ["k.safetensors"]


def test_restart_after_training_or_publishing_completes_without_training_again(images, loader, tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib")
    job = queue.submit(TI, _cfg(images, name="once"), "tiny")
    Worker(queue, load_base=loader).run(once=True)
    published = Path(queue.get(job.id).result)
    original = published.read_bytes()

    def die_after(*, publish: bool):
        """The row as a worker that died before marking the job done leaves it."""
        if not publish:
            published.unlink()
        with queue.backend.write() as tx:
            tx.execute("UPDATE jobs SET state = 'running', worker = 'ghost', worker_pid = ?, worker_host = ?, "
                       "run_device = 'cpu', heartbeat = ?, result = NULL, finished = NULL WHERE id = ?",
                       (GHOST_PID, queue.host, time.time(), job.id))

    for publish in (True, False):
        die_after(publish=publish)
        restarted = make_queue(tmp_path / "lib")
        seen = max(e.seq for e in restarted.events(job.id))
        calls = len(loader.calls)
        Worker(restarted, load_base=loader).run(once=True)
        assert restarted.get(job.id).state == "done"
        assert len(loader.calls) == calls  # no base loaded: no training
        assert not restarted.events(job.id, seen, kinds=["progress"])
        assert published.read_bytes() == original
        assert _library_files(restarted) == ["once.safetensors"]


RACER = """
import json, sys, time
from studio.jobs.queue import JobQueue
queue, start, device = JobQueue(sys.argv[1], url=sys.argv[4] or None), float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, start - time.time()))
got = []
while (job := queue.claim("racer-" + device, device)) is not None:
    got.append(job.id)
    queue.finish(job.id, "racer-" + device, "-")
print(json.dumps(got))
"""


def test_workers_started_at_once_never_take_the_same_job(images, tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib")
    ids = [queue.submit(TI, _cfg(images, name=f"r{i}"), "tiny").id for i in range(12)]
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    start = time.time() + 1.5  # the racers import no torch: they start in well under that
    procs = [subprocess.Popen([sys.executable, str(script), str(queue.library.folder), str(start), f"dev{i}",
                               queue.url or ""],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    claimed = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        claimed.append(json.loads(out))
    flat = [i for got in claimed for i in got]
    assert sorted(flat) == ids  # every job exactly once
    assert all(j.attempts == 1 and j.state == "done" for j in queue.list())


def test_two_workers_on_one_device_take_turns(images, loader, tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib")
    ids = [queue.submit(TI, _cfg(images, name=f"t{i}", steps=2), "tiny").id for i in range(3)]
    workers = [Worker(make_queue(tmp_path / "lib"), device="cpu", load_base=loader) for _ in range(2)]
    threads = [threading.Thread(target=w.run, kwargs={"once": True}) for w in workers]
    for t in threads:
        t.start()
    assert all(queue.wait(i, timeout=120).state == "done" for i in ids)  # another connection: it polls
    for t in threads:
        t.join(timeout=120)
    spans = sorted((_state_events(queue, i, "running")[0].seq, _state_events(queue, i, "done")[0].seq) for i in ids)
    assert all(len(_state_events(queue, i, "running")) == 1 for i in ids)
    assert all(end < next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # never two at once


def test_cli_submit_queue_list_pause_cancel_and_work(images, tmp_path, capsys, queue_url):
    from studio.cli import main

    lib = str(tmp_path / "lib")
    flags = ["--base", "tiny", "--images", str(images), "--class-word", "cat", "--steps", "2", "--batch-size", "1",
             "--library", lib]
    assert main(["jobs", "submit", TI, *flags, "--name", "one"]) == 0
    assert main(["train", TI, *flags, "--name", "two", "--queue"]) == 0
    assert main(["jobs", "submit", TI, *flags, "--name", "three", "--steps", "0"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err
    assert main(["jobs", "pause", "2", "--library", lib]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "job 2: paused"
    assert main(["jobs", "list", "--library", lib, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["state"], r["name"]) for r in rows] == [(1, "queued", "one"), (2, "paused", "two")]
    assert main(["jobs", "work", "--once", "--device", "cpu", "--library", lib]) == 0
    assert main(["jobs", "cancel", "2", "--library", lib]) == 0
    assert main(["jobs", "resume", "2", "--library", lib]) == 0
    capsys.readouterr()
    assert main(["jobs", "show", "1", "--library", lib]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "done" and Path(shown["result"]).name == "one.safetensors"
    assert main(["jobs", "show", "2", "--library", lib]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "queued"
    assert main(["jobs", "show", "1", "--follow", "--library", lib]) == 0
    followed = capsys.readouterr().out.splitlines()
    assert "[job 1] step 2/2" in followed[-3] and followed[-1].endswith("one.safetensors")
    assert main(["jobs", "rm", "1", "--library", lib]) == 0
    assert not (tmp_path / "lib" / ".jobs" / "job-000001").exists()
    assert (tmp_path / "lib" / "one.safetensors").is_file()  # the concept stays in the library


def test_a_whole_model_job_publishes_its_folder_once(images, loader, tmp_path, make_queue):
    assert get_trainer("dreambooth").config_cls(class_word="dog", full=True).writes_folder()  # the whole-model trainer
    queue = make_queue(tmp_path / "lib")
    out = tmp_path / "models" / "dog"
    job = queue.submit("dreambooth", _cfg(images, class_word="dog", steps=2, full=True, prior_preservation=False,
                                          out=str(out)), "tiny")
    Worker(queue, load_base=loader).run(once=True)
    done = queue.get(job.id)
    assert (done.state, done.result) == ("done", str(out)), done.error
    assert (out / "model_index.json").is_file() and not (done.folder / "model").exists()
    assert not list(out.parent.glob(".*"))  # no temporary folder left beside it
