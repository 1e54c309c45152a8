"""What every tab shares: the :class:`UIContext` (the studio, where result files go, the GPU-bound
calls), writing result PNGs with their parameters, and wiring plain handlers to gradio events.

Handlers in the tab modules are plain functions ``handler(ctx, form) -> values`` (``form``: a dict
of widget values by name); :func:`wire` adapts them to gradio (dict inputs, :class:`StudioError`
shown as an error popup, generators streamed), so they are tested without launching gradio.
"""

from __future__ import annotations

import inspect
import itertools
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from studio.errors import StudioError
from studio.generation import GenerateConfig, png_info

# One queue for everything that runs the pipeline (generation, grids, evaluation): one GPU, one at a time.
GPU_QUEUE = "studio-gpu"
KEEP_RESULTS_S = 24 * 3600  # result files (PNGs, reports, exports) are kept this long


@dataclass
class Runners:
    """The calls that run on the GPU. The app passes functions decorated with ``spaces.GPU``
    (:mod:`studio.ui.space`); by default they call the studio directly."""

    render: Callable[[GenerateConfig], list[Image.Image]]
    evaluate: Callable[[list[Any], dict[str, Any]], Any]
    sweep: Callable[[Any, list[float], dict[str, Any]], Any]
    train_chunk: Callable[[float], str] | None = None  # ZeroGPU: run queued jobs for N seconds
    compare: Callable[[list[Any], dict[str, Any]], Any] | None = None  # A/B: arms, options (None: the studio's)

    @classmethod
    def direct(cls, studio: Any) -> Runners:
        return cls(render=studio.generate,
                   evaluate=lambda concepts, options: studio.evaluate(concepts, **options),
                   sweep=lambda concept, strengths, options: studio.sweep(concept, strengths, **options),
                   compare=lambda arms, options: studio.compare(arms, **options))


@dataclass
class UIContext:
    """The studio a UI serves and where its result files go (a temporary folder gradio may serve).

    ``upload_roots``: the folders whose files count as uploads — gradio's upload cache and :attr:`out_dir`
    (a result downloaded and uploaded again). A handler takes a file only from there (:meth:`uploaded`),
    never a server path a request typed; gradio refuses other paths for a File input too."""

    studio: Any
    runners: Runners
    out_dir: Path
    banner: str = ""
    upload_roots: tuple[Path, ...] = ()
    _counter: Any = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, studio: Any, *, runners: Runners | None = None, out_dir: str | Path | None = None,
               banner: str = "", upload_roots: Sequence[str | Path] = ()) -> UIContext:
        """``upload_roots``: more folders whose files count as uploads (besides gradio's cache and ``out_dir``)."""
        folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="studio-ui-"))
        folder.mkdir(parents=True, exist_ok=True)
        roots = tuple(dict.fromkeys(Path(p).expanduser().resolve() for p in (gradio_upload_folder(), folder,
                                                                              *upload_roots)))
        return cls(studio=studio, runners=runners or Runners.direct(studio), out_dir=folder, banner=banner,
                   upload_roots=roots)

    def uploaded(self, value: Any) -> list[str]:
        """A gradio File/Files value → its file paths, each one an upload (inside :attr:`upload_roots`); a path
        anywhere else is refused without being opened."""
        paths = upload_paths(value)
        for p in paths:
            try:
                real = Path(p).expanduser().resolve()
            except (OSError, RuntimeError, ValueError):
                real = None
            if real is None or not any(real.is_relative_to(root) for root in self.upload_roots):
                raise StudioError(f"{Path(p).name or p!r} is not an uploaded file: upload it with the form's file box.")
        return paths

    def new_folder(self, kind: str) -> Path:
        """A fresh folder for one result (``generate-0003``, ``eval-0004`` …); result folders older
        than :data:`KEEP_RESULTS_S` are removed (gradio has copied what it served into its own cache)."""
        with self._lock:
            n = next(self._counter)
            if n % 20 == 1:
                self.prune()
        folder = self.out_dir / f"{kind}-{time.strftime('%H%M%S')}-{n:04d}"
        folder.mkdir(parents=True)
        return folder

    def prune(self, older_than: float = 0.0) -> None:
        import shutil

        limit = time.time() - (older_than or KEEP_RESULTS_S)
        for old in self.out_dir.iterdir():
            try:
                if old.is_dir() and old.stat().st_mtime < limit:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                continue


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as PNG with its ``parameters``/``studio`` texts (what A1111's PNG-info reads)."""
    image.save(path, format="PNG", pnginfo=png_info(image))
    return path


def image_name(image: Image.Image, index: int) -> str:
    import json

    try:
        seed = json.loads(image.info.get("studio", "{}")).get("seed")
    except ValueError:
        seed = None
    return f"{index:03d}" + (f"-seed{seed}" if seed is not None else "") + ".png"


def gradio_upload_folder() -> str:
    """Where gradio keeps uploaded files (``gradio.utils.get_upload_folder``, without importing gradio)."""
    import os

    return os.environ.get("GRADIO_TEMP_DIR") or str((Path(tempfile.gettempdir()) / "gradio").resolve())


def upload_paths(value: Any) -> list[str]:
    """A gradio File/Files value → file paths."""
    from studio.ui.forms import _path

    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [p for p in (_path(v) for v in items) if p]


def wire(ctx: UIContext, fn: Callable[..., Any], comps: dict[str, Any]) -> tuple[set[Any], Callable[..., Any]]:
    """``(inputs, handler)`` for a gradio event: the inputs as a set (gradio passes a dict), the
    handler calling ``fn(ctx, {name: value})`` and turning :class:`StudioError` into ``gr.Error``."""
    import gradio as gr

    names = {comp: name for name, comp in comps.items()}

    def form_of(data: dict[Any, Any]) -> dict[str, Any]:
        return {names[c]: v for c, v in data.items() if c in names}

    if inspect.isgeneratorfunction(fn):
        def gen_handler(data: dict[Any, Any]) -> Any:
            try:
                yield from fn(ctx, form_of(data))
            except StudioError as err:
                raise gr.Error(str(err)) from None

        return set(comps.values()), gen_handler

    def handler(data: dict[Any, Any]) -> Any:
        try:
            return fn(ctx, form_of(data))
        except StudioError as err:
            raise gr.Error(str(err)) from None

    return set(comps.values()), handler


def on(event: Any, ctx: UIContext, fn: Callable[..., Any], comps: dict[str, Any], outputs: Any, **kwargs: Any) -> Any:
    """``event(handler, inputs, outputs)`` with :func:`wire`; ``kwargs`` go to the event listener."""
    if not comps:
        def call() -> Any:
            return wire(ctx, fn, {})[1]({})
        return event(call, None, outputs, **kwargs)
    inputs, handler = wire(ctx, fn, comps)
    return event(handler, inputs, outputs, **kwargs)


def note(text: str) -> str:
    """A 'not available yet' note in the UI's style."""
    return f"> ⓘ **Not available yet.** {text}"
