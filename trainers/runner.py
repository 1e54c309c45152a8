"""Run a trainer: pick the token, build the method's trainer, run the shared loop, save.

Used by ``python -m studio train METHOD`` (foreground), by the job queue and by the UI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from studio.configs import add_arguments, namespace_values
from studio.errors import StudioError
from studio.library import Library, check_name
from studio.prompts import normalize_token
from trainers import TrainerEntry
from trainers.loop import (
    CommonTrainConfig,
    TrainCallbacks,
    TrainControl,
    TrainResult,
    load_training_images,
    run_training,
)
from trainers.probe import verdict_text


def choose_token(cfg: CommonTrainConfig, library: Library | None) -> str:
    """The user's token; else the method's first candidate (``cfg.token_candidates()``) that no
    concept of the library uses; else ``<name>`` / ``<class-word>``, made unique within the library."""
    if cfg.token:
        return normalize_token(cfg.token)
    used = {t for info in (library.list() if library else []) for t in info.tokens}
    for candidate in map(normalize_token, cfg.token_candidates()):
        if candidate not in used:
            return candidate
    stem = cfg.name or (cfg.class_word.replace(" ", "-") if cfg.class_word else "concept")
    token = normalize_token(stem)
    i = 2
    candidate = token
    while candidate in used:
        candidate = f"{token[:-1]}-{i}>"
        i += 1
    return candidate


def train(entry: TrainerEntry, cfg: CommonTrainConfig, base: Any, *, library: Library | None = None,
          callbacks: TrainCallbacks | None = None, control: TrainControl | None = None,
          scorer: Any = None) -> TrainResult:
    """Train ``cfg`` on ``base`` (a loaded :class:`~studio.models.BaseModel`) and save the concept
    to ``cfg.out`` or, when that is empty, into ``library`` under ``cfg.name`` / the token. A
    whole-model config (``cfg.writes_folder()``) writes a diffusers folder to ``cfg.out`` instead.

    With ``cfg.eval_every`` the concept is scored along training (:class:`TrainingEvaluator`;
    ``scorer`` replaces the CLIP judge, e.g. in tests)."""
    token = choose_token(cfg, library)
    if cfg.writes_folder():
        _check_folder_out(cfg)
    else:
        if not cfg.out:
            if library is None:
                raise StudioError("Say where the concept goes: --out FILE.safetensors, or a library.")
            name = check_name(cfg.name or token.strip("<>"))
            cfg.out = str(library.path(name))
            cfg.name = name
        if Path(cfg.out).suffix != ".safetensors":
            raise StudioError(f"--out {cfg.out} must end in .safetensors.")
    examples = load_training_images(cfg, base, min_images=entry.min_images)  # square, or in buckets (--buckets)
    # The judges load before the trainer touches the pipeline: a missing model fails first.
    evaluator = TrainingEvaluator(base, cfg, token, scorer=scorer, callbacks=callbacks,
                                  method=entry.method) if cfg.eval_every else None
    trainer = entry.make_trainer(base, cfg, token)
    if evaluator is not None:
        evaluator.trainer = trainer
        callbacks = ChainedCallbacks(callbacks, evaluator)
    result = run_training(base, trainer, cfg, method=entry.method, examples=examples, callbacks=callbacks,
                          control=control)
    return evaluator.finish(result) if evaluator is not None else result


class ChainedCallbacks(TrainCallbacks):
    """Calls every hook of :class:`TrainCallbacks` on each part in turn (``None`` parts are skipped)."""

    def __init__(self, *parts: TrainCallbacks | None) -> None:
        self.parts = [p for p in parts if p is not None]


def _fan_out(name: str) -> Any:
    def hook(self: ChainedCallbacks, *args: Any) -> None:
        for part in self.parts:
            getattr(part, name)(*args)

    hook.__name__ = name
    return hook


for _hook in [n for n in vars(TrainCallbacks) if n.startswith("on_")]:
    setattr(ChainedCallbacks, _hook, _fan_out(_hook))


class TrainingEvaluator(TrainCallbacks):
    """``--eval-every``: at each evaluated step, render the held-out prompts with the concept as
    trained so far (``cfg.eval_images`` seeds each, the same seeds every time) and score them
    (:class:`studio.evaluation.CurveTracker`: CLIP-I vs the training photos and CLIP-T, or the demo
    world's oracle). :meth:`finish` writes the curve into the concept (``studio.metrics["curve"]``)
    with the training photos' CLIP embeddings (``ref.clip``), and with ``--keep-best`` exports the
    best evaluated step (:func:`studio.evaluation.metrics.best_checkpoint`) instead of the last."""

    def __init__(self, base: Any, cfg: CommonTrainConfig, token: str, *, scorer: Any = None,
                 callbacks: TrainCallbacks | None = None, method: str = "") -> None:
        from PIL import Image

        from studio.concept import Concept
        from studio.evaluation import (
            CurveTracker,
            build_prompts,
            load_reference_images,
            training_judges,
            training_prompts,
        )
        from studio.evaluation.metrics import EvalConcept

        if cfg.keep_best and cfg.writes_folder():
            raise StudioError("--keep-best keeps a concept file; a full fine-tune writes one model folder (use "
                              "--checkpoint-every and resume from the step you want).")
        self.base, self.cfg, self.token = base, cfg, token
        self.class_word = cfg.class_word or ""
        self.judges = training_judges(cfg.eval_model, base, scorer)
        self.references = (load_reference_images(cfg.images) if self.judges.kind == "clip"
                           else [Image.new("RGB", (1, 1))])  # the oracle needs no photos
        # the method decides how the held-out prompts name the concept (evaluation.subject)
        stub = Concept(method=method, tokens=[token], tensors={}, class_word=self.class_word)
        self.prompts = build_prompts(training_prompts(cfg.eval_prompts, base), [stub])
        self.tracker = CurveTracker(self.judges, EvalConcept(token, self.class_word or token.strip("<>"),
                                                             self.references, cfg.name or None),
                                    prompts=self.prompts, images_per_prompt=cfg.eval_images, steps=cfg.eval_steps)
        self.guidance = base.profile.guidance  # the base's sampling setting (the world's own on the demo world)
        self.trainer: Any = None
        self.log = callbacks.on_log if callbacks is not None else (lambda message: None)
        self.seconds = 0.0

    def on_eval(self, step: int, concept: Any) -> None:
        import json

        from studio.evaluation import live_text, render_batch

        t0 = time.monotonic()
        text = self.trainer.preview_prompt("{}")  # the concept's prompt text as the trainer has it now
        jobs = [(p, self.cfg.seed + i) for p in self.prompts for i in range(self.cfg.eval_images)]
        images = render_batch(self.base.pipe, [live_text(p, self.token, text, self.class_word) for p, _ in jobs],
                              [s for _, s in jobs], steps=self.cfg.eval_steps, guidance=self.guidance,
                              size=self.cfg.resolution or self.base.native_size)
        by_prompt: dict[str, list[Any]] = {p: [] for p in self.prompts}
        for (prompt, seed), image in zip(jobs, images):
            image.info["studio"] = json.dumps({"prompt": prompt, "seed": seed, "step": step})
            by_prompt[prompt].append(image)
        point = self.tracker.add(step, by_prompt, concept)
        self.seconds += time.monotonic() - t0
        t = self.tracker
        self.log(f"eval step {step}: {t.fidelity} {point.fidelity:.4f}, {t.editability} {point.editability:.4f} "
                 f"({time.monotonic() - t0:.1f}s)")

    def finish(self, result: TrainResult) -> TrainResult:
        """Store the curve (and the best step's concept with ``--keep-best``) in the saved concept."""
        from dataclasses import replace

        from studio.evaluation.metrics import CachedScorer
        from studio.methods import save_concept

        if not self.tracker.points:  # not the main process
            return result
        choice = self.tracker.best()
        concept = result.concept
        kept = int(self.tracker.points[-1].value)
        if self.cfg.keep_best and int(choice.value) != kept:
            kept = int(choice.value)
            concept = replace(self.tracker.best_concept(), train=dict(concept.train) | {"kept_step": kept},
                              base=concept.base)
        curve = self.tracker.to_metrics() | {"kept_step": kept, "eval_seconds": round(self.seconds, 3)}
        concept.metrics = dict(concept.metrics) | {"curve": curve}
        if self.judges.kind == "clip" and self.judges.clip is not None:
            clip = CachedScorer(self.judges.clip, self.judges.cache)
            concept.refs = dict(concept.refs) | {"clip": clip.embed_images(self.references)}
            concept.ref_models = dict(concept.ref_models) | {"clip": self.judges.clip.name}
        self.log(f"best evaluated step {int(choice.value)} ({choice.rule}); exported step {kept}")
        if result.path is not None and not self.cfg.writes_folder():
            save_concept(concept, result.path)
        return replace(result, concept=concept)


def _check_folder_out(cfg: CommonTrainConfig) -> None:
    """A whole model goes to a new diffusers folder (``--out DIR``), never into the concept library."""
    if not cfg.out:
        raise StudioError("A full fine-tune writes a whole model, not a concept: pass --out DIR (a new folder).")
    out = Path(cfg.out).expanduser()
    if out.suffix == ".safetensors":
        raise StudioError(f"--out {out}: a full fine-tune writes a diffusers folder; pass a folder path instead.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudioError(f"--out {out} exists and is not an empty folder; choose a new folder.")


class PrintCallbacks(TrainCallbacks):
    """Foreground progress on stderr."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def on_step(self, step: int, total: int, loss: float, seconds: float) -> None:
        if step == total or step % max(1, total // 20) == 0:
            eta = seconds / max(1, step) * (total - step)
            print(f"step {step}/{total}  loss {loss:.4f}  eta {eta:.0f}s", file=sys.stderr)

    def on_checkpoint(self, step: int, path: Path) -> None:
        print(f"checkpoint {path}", file=sys.stderr)

    def on_log(self, message: str) -> None:
        if not message.startswith("step "):
            print(message, file=sys.stderr)


def add_cli_arguments(entry: TrainerEntry, parser: argparse.ArgumentParser) -> None:
    """``--preset`` and one flag per field of the trainer's config (unset flags stay unset, so the
    preset fills them: see :meth:`TrainerEntry.resolve`)."""
    if entry.presets:
        parser.add_argument("--preset", choices=sorted(entry.presets), default=None,
                            help=f"settings preset (default: {entry.default_preset or 'none'}; a base's profile "
                                 "may name another)")
    add_arguments(parser, entry.config_cls, suppress_defaults=True)
    # CLI-only (not a config field: it is no setting of the training, so it stays out of concept records,
    # config hashes, job records and the UI form, which are all derived from the config's fields).
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved settings and the memory estimate (parameters, optimizer state, "
                             "activations, total; trainers/memory.py), then exit: no weights are loaded, nothing trains")


def config_from_cli(entry: TrainerEntry, ns: argparse.Namespace, settings: Any) -> CommonTrainConfig:
    """The config of ``train METHOD …`` / ``jobs submit METHOD …``: :meth:`TrainerEntry.resolve` with the
    preset flag, the profile of the base the settings name, and the flags the user passed. A queued job
    has no dry run: ``--dry-run`` is refused here (``train METHOD --dry-run`` goes through :func:`run_cli`)."""
    if getattr(ns, "dry_run", False):
        raise StudioError("--dry-run cannot be queued: run `python -m studio train METHOD … --dry-run` (without "
                          "--queue) to see the estimate, or drop --dry-run to queue the job.")
    return _resolve_cli(entry, ns, settings)


def _resolve_cli(entry: TrainerEntry, ns: argparse.Namespace, settings: Any) -> CommonTrainConfig:
    return entry.resolve(getattr(ns, "preset", None), profile=settings.profile(),
                         **namespace_values(entry.config_cls, ns))


def dry_run(entry: TrainerEntry, cfg: CommonTrainConfig, settings: Any) -> str:
    """``train METHOD … --dry-run``: the resolved settings and the memory estimate of training them on the
    base ``settings`` name (its configs only: nothing is downloaded, no weights are read)."""
    from trainers.memory import config_summary, estimate_text

    table = estimate_text(entry, settings.base, cfg, device=settings.device, weights_dtype=settings.dtype)
    return "\n".join([config_summary(entry, cfg), f"  base: {settings.base}", "", table])


def check_resumable(cfg: CommonTrainConfig, library: Library | None) -> Path:
    """An explicit ``--resume latest`` needs a checkpoint to continue from (a typo in ``--out`` must
    not quietly train from scratch); returns the checkpoint folder. A queued job, which always asks
    for ``latest``, starts from step 0 with a note instead (:func:`trainers.loop.run_training`)."""
    from trainers.checkpoint import list_checkpoints
    from trainers.loop import checkpoint_folder

    out = cfg.out
    if not out and library is not None and not cfg.writes_folder():
        out = str(library.path(check_name(cfg.name or choose_token(cfg, library).strip("<>"))))
    folder = checkpoint_folder(cfg.checkpoint_dir, out)
    if folder is None or not list_checkpoints(folder):
        raise StudioError(f"--resume latest: there is no checkpoint under {folder or '--checkpoint-dir'} to continue "
                          "from; drop --resume to start from step 0, or pass the --out / --checkpoint-dir of the run "
                          "to continue.")
    return folder


def run_cli(entry: TrainerEntry, ns: argparse.Namespace, settings: Any) -> int:
    if getattr(ns, "dry_run", False):
        print(dry_run(entry, _resolve_cli(entry, ns, settings), settings))
        return 0
    cfg = config_from_cli(entry, ns, settings)
    if not cfg.images:
        raise StudioError("--images DIR is required: the folder of training images.")
    library = Library(ns.library)
    if cfg.resume == "latest":
        check_resumable(cfg, library)
    base = settings.load()
    result = train(entry, cfg, base, library=library, callbacks=PrintCallbacks())
    print(result.path)
    print(f"trained {result.steps} steps in {result.seconds:.1f}s", file=sys.stderr)
    note = verdict_text(result.concept.metrics)
    if note:
        print(note, file=sys.stderr)
    return 0
