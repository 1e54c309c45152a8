"""Shared fixtures: tiny bases built once per session, a temporary library, helpers."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Photos' latents are kept on disk across runs (trainers/latents.py): the tests keep theirs in a folder of
# their own per process, never in the user's cache.
os.environ.setdefault("STUDIO_LATENT_CACHE", tempfile.mkdtemp(prefix="studio-test-latents-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the toy models are too small to gain from two, subprocess workers run on one (so
# results are bit-comparable across processes), and two threads that wait on each other are
# several times slower on a loaded 2-core CI machine.
torch.set_num_threads(1)

# The job queue's databases (SQLite, a throw-away PostgreSQL cluster), as fixtures for every test module.
from tests.jobs_backends import make_queue, pg_url, postgres_server, queue_url  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    """``slow`` tests are opt-in: deselected (not skipped) unless the ``-m`` expression names them
    (``pytest -m slow tests/…``)."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def tiny_bases():
    """Lazily built tiny bases, one per name, shared by the session (tests must leave them clean)."""
    from studio.models import load_base

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_base(name, device="cpu")
        return cache[name]

    return get


@pytest.fixture
def tiny(tiny_bases):
    return tiny_bases("tiny")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP judge folder (:func:`tests.helpers.write_tiny_clip`), built once per session."""
    from tests.helpers import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture
def library(tmp_path):
    from studio.library import Library

    return Library(tmp_path / "lib")


def render(base, prompt: str = "a photo of a cat", seed: int = 0, steps: int = 2, **kw) -> np.ndarray:
    """Run the pipeline directly (float output, no PNG rounding): ``(H, W, 3)`` float32."""
    gen = torch.Generator().manual_seed(seed)
    out = base.pipe(prompt=prompt, num_inference_steps=steps, generator=gen, output_type="np",
                    guidance_scale=kw.pop("guidance_scale", 5.0), **kw)
    return out.images[0]
