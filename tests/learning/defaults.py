"""Every trainer with its *default* settings on a learnable base, as a new user would run it.

A base is loaded from its folder with :func:`studio.models.load_base` (the path a user types), the
trainer's config comes from ``entry.resolve`` with no preset and a profile that knows nothing about
the base (so the world's hand-written ``demo-world`` presets never apply), and the concept is
rendered through its method's ``apply`` with the trigger in the prompt — the file → method →
prompt path users take. ``lr_scale`` multiplies every learning rate the method has (0 = the
negative control: every rate is 0, the trained tensors stay at their initialisation, so it runs
one step).

The two bases share nothing of their shape (the demo world: 32 px, 4×8×8 latents, CLIP's 49,408-token
vocabulary, a 64-wide 2-layer text encoder, a three-level UNet; world-b: 48 px, 4×12×12 latents, a
665-token learnt vocabulary, a 96-wide 3-layer text encoder, a two-level UNet); the defaults adapt by
measurement (docs/methods.md, "Measured defaults"). Used by ``tests/learning/test_defaults_*.py`` (one
file per trainer, so parallel test workers share them out) and ``bench/world_defaults.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from studio.world import DEMO_BASE_DIR, WORLD_B_BASE_DIR
from tests.learning.harness import Trained, concept_bytes

BASES: dict[str, Path] = {"world": Path(DEMO_BASE_DIR), "world-b": Path(WORLD_B_BASE_DIR)}
"""The learnable bases by name: the demo world and the second base (other widths, depth,
vocabulary, latent size and resolution; ``scripts/build_world.py --variant world-b``)."""

METHODS = ("textual-inversion", "dreambooth", "neti", "perfusion", "prospect", "custom-diffusion")
"""Trainers whose defaults are tested (the IP-Adapter fine-tune trains an adapter for a base, not a
concept: it is tested with the world's own adapter in test_adapter_learns.py)."""

TOKEN = "<hrt>"

# Rate fields per trainer config: optimizer rates (None = derived) and rates in the base's units.
_RATES = ("lr", "lr_v", "text_encoder_lr")
_SCALES = ("lr_scale",)


@functools.lru_cache(maxsize=2)
def load(base: str) -> Any:
    """The base ``base`` ("world" / "world-b") loaded from its folder on CPU in float32."""
    from studio.models import load_base

    return load_base(str(BASES[base]), device="cpu", dtype="fp32")


def default_config(method: str, base: Any, images_dir: Path, seed: int, lr_scale: float, workdir: Path,
                   **overrides: Any) -> tuple[Any, Any]:
    """``(entry, cfg)``: the trainer's defaults (no preset, no profile) for the world's concept."""
    from studio.models.profile import GENERIC
    from studio.world import CONCEPT
    from trainers import get_trainer

    entry = get_trainer(method)
    values: dict[str, Any] = dict(images=str(images_dir), class_word=CONCEPT.class_word, seed=seed, log_every=0,
                                  out=str(workdir / f"{method}-{seed}-{lr_scale:g}.safetensors"))
    names = {f.name for f in dataclasses.fields(entry.config_cls)}
    if "class_cache_dir" in names:
        values["class_cache_dir"] = str(workdir / "class-images")
    if method != "dreambooth":
        values["token"] = TOKEN
    cfg = entry.resolve(profile=GENERIC, **values, **overrides)
    if lr_scale != 1.0:
        for name in _RATES + _SCALES:
            value = getattr(cfg, name, None)
            if value is not None:
                setattr(cfg, name, value * lr_scale)
        if lr_scale == 0.0 and getattr(cfg, "lr", 0.0) is None:
            cfg.lr = 0.0
    return entry, cfg


def train_default(method: str, base_name: str, workdir: Path, **overrides: Any):
    """A harness ``TrainFn`` ``(images_dir, seed, lr_scale) -> Trained`` for ``method``'s defaults on ``base_name``."""

    def run(images_dir: Path, seed: int, lr_scale: float) -> Trained:
        from trainers.runner import train

        base = load(base_name)
        # At learning rate 0 nothing the optimizer holds changes, however long it runs: the control
        # trains one step (its concept is the method's initialisation, measured choice included).
        extra = {"steps": 1} if lr_scale == 0.0 else {}
        entry, cfg = default_config(method, base, images_dir, seed, lr_scale, workdir, **(overrides | extra))
        result = train(entry, cfg, base)
        run.last = result  # type: ignore[attr-defined]  # the bench reads the record (steps, verdict)
        verdict = result.concept.metrics.get("verdict", {})
        budget = verdict.get("budget") or {}
        report(f"[{method} defaults on {base_name}, seed {seed}, lr ×{lr_scale:g}] steps run "
               f"{budget.get('steps_run', cfg.steps)} (kept {budget.get('kept_step', 'last')}), verdict "
               f"{verdict.get('verdict')} ({verdict.get('gain', float('nan')):+.3f}), init "
               f"{result.concept.train.get('init_chosen', '—')}, lr {result.concept.train.get('lr_effective', cfg.lr)}")
        return trained(base, result.concept)

    return run


def trained(base: Any, concept: Any) -> Trained:
    """Render with ``concept`` applied through its method; the prompt names it by its trigger."""
    from studio.methods import get_method
    from studio.prompts import rewrite
    from studio.world.score import pipeline_generator

    plain = pipeline_generator(base.pipe)

    def generate(prompts, gen_seed):
        handle = get_method(concept.method).apply(base, concept, strength=1.0)
        try:
            return plain([rewrite(p, {concept.trigger: handle.prompt_text()}) for p in prompts], gen_seed)
        finally:
            handle.remove()

    return Trained(subject=concept.trigger, generate=generate, size_bytes=concept_bytes(concept))


def lora_trained(base: Any, concept: Any) -> Trained:
    """Render with the DreamBooth-LoRA ``concept`` applied through the LoRA method; its identifier is a plain
    word, so the prompts name the subject as ``"<identifier> <class word>"`` without a rewrite."""
    from studio.methods import get_method
    from studio.world.score import pipeline_generator

    plain = pipeline_generator(base.pipe)

    def generate(prompts, gen_seed):
        handle = get_method("lora").apply(base, concept, strength=1.0)
        try:
            return plain(prompts, gen_seed)
        finally:
            handle.remove()

    return Trained(subject=f"{concept.trigger.strip('<>')} {concept.class_word}", generate=generate,
                   size_bytes=concept_bytes(concept))


def report(line: str) -> None:
    """Print ``line``, and append it to the file ``$STUDIO_LEARNING_LOG`` names (parallel test workers'
    prints are not shown: the README's numbers are read from that file)."""
    import os

    print(line, flush=True)
    path = os.environ.get("STUDIO_LEARNING_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _where(base: str) -> dict[str, Any]:
    from studio.world import WORLD_B_RESOLUTION

    return {} if base == "world" else {"base_dir": BASES[base], "size": WORLD_B_RESOLUTION}


def check_learns(method: str, base: str, workdir: Path, seeds: tuple[int, ...] = (0, 1)) -> None:
    """The learning bars on ``seeds`` for ``method``'s defaults on ``base``."""
    from tests.learning.harness import assert_learns

    work = workdir / base / method
    scores = assert_learns(train_default(method, base, work), work, seeds=seeds, name=f"{method} defaults on {base}",
                           **_where(base))
    for seed, sc in zip(seeds, scores):
        report(f"[{method} defaults on {base}, seed {seed}] fidelity {sc.fidelity:.3f}, editability {sc.editability:.3f}")


def check_control(method: str, base: str, workdir: Path) -> None:
    """The same defaults at learning rate 0 miss the fidelity bar."""
    from tests.learning.harness import assert_does_not_learn

    work = workdir / base / method
    sc = assert_does_not_learn(train_default(method, base, work), work, name=f"{method} defaults on {base}",
                               **_where(base))
    report(f"[{method} defaults on {base}, lr 0] fidelity {sc.fidelity:.3f}, editability {sc.editability:.3f}")
