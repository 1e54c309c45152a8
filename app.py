"""The studio in the browser (Gradio) — also the Hugging Face Space entry point.

    python app.py [--base B] [--library DIR] [--port P] [--listen] [--share] [--auth user:pass]
                  [--allow-path DIR ...] [--queue-url postgresql://…] [--storage PATH_OR_URL]

Environment (what a Space sets instead of flags): ``STUDIO_BASE``, ``STUDIO_LIBRARY``, ``PORT`` /
``GRADIO_SERVER_PORT``, ``STUDIO_AUTH`` (``user:pass``), ``STUDIO_WORKER=0`` (no background
training worker), ``STUDIO_MAX_FILE_SIZE`` (upload limit, default ``512mb``), ``STUDIO_ALLOW_PATHS``
(``--allow-path`` folders separated by ``os.pathsep``), ``STUDIO_QUEUE_URL`` / ``STUDIO_STORAGE``
(``--queue-url`` / ``--storage``: a shared PostgreSQL job queue and job storage, README "Queue on PostgreSQL").

The page names no server path: files arrive as uploads, concepts by library name, and a base or a
model (CLIP judge, IP-Adapter …) is a hub id, a named one (``demo``, ``tiny``, the adapter presets)
or a local path under a folder allowed here with ``--allow-path DIR`` (none by default; the
``--base`` the app starts with is allowed as well). See :mod:`studio.request_paths`.

Safe by default: the server binds 127.0.0.1; ``--listen`` (all interfaces) and ``--share`` (a public
gradio.live link) must be asked for, optionally with ``--auth``. When the base cannot be loaded
(offline, say) the app starts on an offline base with a banner saying so; the base can be switched
from the page. A job worker thread runs submitted training jobs (one per device); jobs left by a
previous run resume from their checkpoints.

``demo`` is importable (``import app; app.demo``): built on first access, or at import when running
as a Space (``SPACE_ID`` set), so the models load before the first request. The functions below that
run the pipeline are decorated with ``spaces.GPU`` when the ``spaces`` package is importable.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from studio.errors import StudioError  # noqa: E402
from studio.models import BaseSettings  # noqa: E402
from studio.request_paths import allowed_from_env  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.ui.space import gpu, on_space, run_jobs_for, zero_gpu  # noqa: E402

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # offline: the demo world, with a banner
OFFLINE_BASES = ("demo", "tiny")


def make_studio(base: str | None = None, library: str | None = None,
                allow_paths: Sequence[str] | None = None, *, queue_url: str | None = None,
                storage: str | None = None) -> tuple[Studio, str]:
    """Load the requested base; when it cannot be loaded, fall back to an offline base and say why
    (the returned banner is empty when the requested base loaded). ``allow_paths`` (default:
    ``STUDIO_ALLOW_PATHS``): the folders under which a request may name a local base or model; the
    requested base itself, when it is a local path, is allowed too (exactly that file or folder).
    ``queue_url`` / ``storage`` (default: ``STUDIO_QUEUE_URL`` / ``STUDIO_STORAGE``, else beside the
    library): the training queue's database and job storage."""
    wanted = base or os.environ.get("STUDIO_BASE") or DEFAULT_BASE
    lib = library or os.environ.get("STUDIO_LIBRARY") or "concepts"
    queue = {"queue_url": queue_url or os.environ.get("STUDIO_QUEUE_URL") or None,
             "jobs_storage": storage or os.environ.get("STUDIO_STORAGE") or None}
    allowed = list(allowed_from_env() if allow_paths is None else allow_paths)
    if os.path.exists(os.path.expanduser(wanted)):  # the operator's own --base, e.g. a local checkpoint
        allowed.append(wanted)
    errors: list[str] = []
    for spec in dict.fromkeys([wanted, *OFFLINE_BASES]):
        studio = Studio(BaseSettings(base=spec), library=lib, allowed_paths=allowed, **queue)
        try:
            _ = studio.base
        except StudioError as err:
            errors.append(f"{spec!r}: {err}")
            continue
        if spec == wanted:
            return studio, ""
        return studio, (f"Could not load base {wanted!r} ({errors[0].split(': ', 1)[1]}) Running on the offline base "
                        f"{spec!r}: {studio.base.label}. Choose a real base below, or start with --base "
                        "(or STUDIO_BASE) set to a hub id, a diffusers folder or a .safetensors file.")
    raise SystemExit("No base could be loaded: " + "; ".join(errors))


# -- the calls that run on the GPU (module level, as ZeroGPU requires) ------------------------------
_SERVED: dict[str, Any] = {}  # the studio this process serves (set by create())


def _studio() -> Studio:
    if "studio" not in _SERVED:
        raise RuntimeError("app.create() has not run; import app and use app.demo, or run python app.py.")
    return _SERVED["studio"]


@gpu(duration=120)
def render(cfg: Any) -> list[Any]:
    """One generation (a :class:`~studio.generation.GenerateConfig`) → PIL images (CPU)."""
    return _studio().generate(cfg)


@gpu(duration=300)
def evaluate(concepts: list[Any], options: dict[str, Any]) -> Any:
    return _studio().evaluate(concepts, **options)


@gpu(duration=300)
def sweep(concept: Any, strengths: list[float], options: dict[str, Any]) -> Any:
    return _studio().sweep(concept, strengths, **options)


@gpu(duration=300)
def compare(arms: list[Any], options: dict[str, Any]) -> Any:
    """An A/B comparison (:meth:`~studio.service.Studio.compare`): arms → a :class:`~studio.compare.Comparison`."""
    return _studio().compare(arms, **options)


@gpu(duration=290)
def train_chunk(seconds: float) -> str:
    """ZeroGPU: run queued training jobs for ``seconds`` (they checkpoint and continue at the next chunk)."""
    return run_jobs_for(_studio().jobs, min(float(seconds), 280.0))


# -- building and serving ----------------------------------------------------------------------------
def create(base: str | None = None, library: str | None = None, *, worker: bool | None = None,
           allow_paths: Sequence[str] | None = None, queue_url: str | None = None,
           storage: str | None = None) -> Any:
    """Load the studio, build the UI and (unless ``worker`` is False or ``STUDIO_WORKER=0``, or on
    ZeroGPU where jobs run in GPU chunks) start the job worker thread. Returns the gradio Blocks.
    ``allow_paths``, ``queue_url``, ``storage``: see :func:`make_studio`."""
    from studio.ui import Runners, build_app

    studio, banner = make_studio(base, library, allow_paths, queue_url=queue_url, storage=storage)
    _SERVED["studio"] = studio
    runners = Runners(render=render, evaluate=evaluate, sweep=sweep, train_chunk=train_chunk if zero_gpu() else None,
                      compare=compare)
    demo = build_app(studio, banner=banner, runners=runners)
    if worker is None:
        worker = os.environ.get("STUDIO_WORKER", "1") != "0" and not zero_gpu()
    if worker:
        start_worker(studio)
    return demo


def start_worker(studio: Studio) -> Any:
    """A background :class:`~studio.jobs.Worker` for the studio's queue (one job at a time on its device)."""
    from studio.jobs import Worker

    if "worker" not in _SERVED:
        w = Worker(studio.jobs, report=lambda line: print(f"[jobs] {line}", file=sys.stderr, flush=True))
        _SERVED["worker"], _SERVED["worker_thread"] = w, w.start()
    return _SERVED["worker"]


def stop_worker(timeout: float = 60.0) -> None:
    """Stop the worker: a running job checkpoints after its step and goes back to the queue."""
    w, thread = _SERVED.pop("worker", None), _SERVED.pop("worker_thread", None)
    if w is not None:
        w.stop()
        if isinstance(thread, threading.Thread):
            thread.join(timeout)


def server_name(listen: bool) -> str:
    """``--listen`` → all interfaces; else ``GRADIO_SERVER_NAME`` when set (a Space sets it); else loopback."""
    if listen:
        return "0.0.0.0"
    return os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """``user:pass`` (several separated by commas) → gradio's auth list."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth takes user:password (got {item.strip()!r}).")
        pairs.append((user, password))
    return pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="The personalization studio in the browser.")
    ap.add_argument("--base", default=None, help=f"base model (default: STUDIO_BASE or {DEFAULT_BASE}); falls back "
                    "to an offline base when it cannot be loaded")
    ap.add_argument("--library", default=None, help="concept library folder (default: STUDIO_LIBRARY or concepts/)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT")
                                                     or 7860))
    ap.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (all interfaces) instead of 127.0.0.1")
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link (use --auth)")
    ap.add_argument("--auth", default=os.environ.get("STUDIO_AUTH"), help="user:password required to open the page")
    ap.add_argument("--no-worker", action="store_true", help="do not run training jobs in this process "
                    "(run `python -m studio jobs work` elsewhere)")
    ap.add_argument("--allow-path", action="append", dest="allow_paths", metavar="DIR", default=None,
                    help="a folder under which the page may name a local base or model (a diffusers folder, a "
                    ".safetensors file, a CLIP or IP-Adapter folder); repeatable (default: STUDIO_ALLOW_PATHS, "
                    f"folders separated by {os.pathsep!r}; else none: hub ids, demo / tiny and uploads only)")
    ap.add_argument("--queue-url", default=None, metavar="URL", help="the training queue's database: "
                    "postgresql://user@host/db, shared with workers on other machines (default: STUDIO_QUEUE_URL, "
                    "else SQLite beside the library)")
    ap.add_argument("--storage", default=None, metavar="PATH_OR_URL", help="where job folders go: a path every "
                    "worker reaches, or an fsspec URL such as s3://bucket/jobs (default: STUDIO_STORAGE, else "
                    "LIBRARY/.jobs)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    auth = parse_auth(args.auth)
    if (args.listen or args.share) and not auth:
        print("warning: the studio is reachable by others (--listen/--share) without --auth.", file=sys.stderr)
    from studio.ui import CSS

    demo = create(args.base, args.library, worker=False if args.no_worker else None, allow_paths=args.allow_paths,
                  queue_url=args.queue_url, storage=args.storage)

    def terminate(signum: int, frame: Any) -> None:
        worker = _SERVED.get("worker")
        if worker is not None:
            worker.stop()  # at once: the running job checkpoints after its current step
        raise KeyboardInterrupt  # then gradio closes the server and the worker thread is joined below

    signal.signal(signal.SIGTERM, terminate)
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=server_name(args.listen), server_port=args.port, share=args.share, auth=auth,
            max_file_size=os.environ.get("STUDIO_MAX_FILE_SIZE", "512mb"), footer_links=["api", "settings"],
            show_error=True, css=CSS)
    except KeyboardInterrupt:
        pass
    finally:
        stop_worker()


def __getattr__(name: str) -> Any:
    """``app.demo``: the studio's Blocks, built (and the worker started) on first access."""
    if name == "demo":
        if "demo" not in _SERVED:
            _SERVED["demo"] = create()
        return _SERVED["demo"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if on_space() and __name__ != "__main__":
    demo = _SERVED["demo"] = create()  # a Space imports the app: load the models now, not at the first request

if __name__ == "__main__":
    main()
