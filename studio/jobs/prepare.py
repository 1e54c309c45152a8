"""Turning a training request into a self-contained job: validate the config now, copy its inputs.

A job must not change when the user later edits the image folder, a preset or the base settings'
defaults, so :func:`prepare_job` resolves the full config (preset + overrides) and
:meth:`PreparedJob.stage` copies its inputs into the job folder. Inputs are the fields the config
declares as paths (:func:`studio.configs.option`'s ``path``): ``images`` (the dataset) and the
``path="folder"`` fields (e.g. DreamBooth's own class images) are image folders, the ``path="file"``
fields (``names_file``, ``eval_prompts``, Perfusion's ``corpus``) are files. Models (``path="model"``)
are referenced, not copied; caches shared between runs (``class_cache_dir``) are not inputs. The
concept's name and trigger token are reserved at submission, so two queued jobs never publish to the
same file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import DatasetError, StudioError

DATASET = "dataset"
FILES = "files"
CHECKPOINTS = "checkpoints"
PREVIEWS = "previews"
MANIFEST = "job.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
JOB_OWNED = ("checkpoint_dir",)  # a job keeps these in its own folder


def default_checkpoint_every(steps: int, *, whole_model: bool = False) -> int:
    """About ten checkpoints per run, at most 250 steps apart (a crash loses at most that much);
    four for a whole-model fine-tune, whose checkpoints hold every weight and its optimizer state."""
    return max(1, min(250, math.ceil(steps / (4 if whole_model else 10))))


@dataclass
class PreparedJob:
    """A validated request, before it has an id."""

    trainer: str  # TrainerEntry.cli_name
    config: dict[str, Any]  # every field of the method's config dataclass
    base: dict[str, Any]  # BaseSettings fields
    source: str  # the image folder as given (absolute)
    inputs: dict[str, str] = field(default_factory=dict)  # config field -> path inside the job folder
    copies: list[tuple[Path, str]] = field(default_factory=list)  # (source file or folder, path in the job folder)
    out: Path | None = None  # an explicit destination instead of the library
    whole_model: bool = False  # the result is a diffusers folder (cfg.writes_folder()), not a concept file
    candidates: list[str] = field(default_factory=list)  # the method's default tokens (cfg.token_candidates())

    def stage(self, folder: Path) -> None:
        """Create the job folder's content under ``folder`` (a staging name, renamed once the job has an id).
        A folder input is copied flat (its files, not its subfolders — what the image loader reads)."""
        try:
            folder.mkdir(parents=True)
            for src, rel in self.copies:
                target = folder / rel
                if src.is_dir():
                    target.mkdir(parents=True)
                    for p in sorted(src.iterdir()):
                        if p.is_file() and not p.name.startswith("."):
                            shutil.copy2(p, target / p.name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
            (folder / CHECKPOINTS).mkdir()
            (folder / PREVIEWS).mkdir()
        except OSError as err:
            raise StudioError(f"Could not copy the job's inputs into {folder} ({err}); check the disk space "
                              "and permissions.") from err

    def write_manifest(self, folder: Path, job_id: int, name: str, token: str, destination: Path) -> None:
        """``job.json``: what was submitted, readable without the database."""
        from studio.atomic import atomic_write_bytes

        manifest = {"id": job_id, "trainer": self.trainer, "name": name, "token": token,
                    "destination": str(destination), "source": self.source, "base": self.base,
                    "config": self.config, "inputs": self.inputs, "created": time.time()}
        atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())


def base_settings(base: Any) -> dict[str, Any]:
    """``BaseSettings`` / dict / spec string → the settings dict stored with a job (local paths made absolute)."""
    from studio.jobs.records import as_dict
    from studio.models import BaseSettings

    values = {} if base is None else {"base": base} if isinstance(base, str) else as_dict(base)
    settings = BaseSettings.from_dict(values).to_dict()
    spec = Path(str(settings["base"])).expanduser()
    if spec.exists():
        settings["base"] = str(spec.resolve())
    return settings


def prepare_job(trainer: str, config: Any, base: Any, *, preset: str | None = None) -> PreparedJob:
    """Validate a request (raising :class:`StudioError` with the actual values) and plan its copies."""
    from studio.jobs.records import as_dict
    from trainers import get_trainer

    entry = get_trainer(trainer)
    # 1. the full config: a dataclass as is, or a dict completed from the preset.
    cfg: Any  # an entry.config_cls instance (a trainers.loop.CommonTrainConfig subclass)
    if isinstance(config, entry.config_cls):
        cfg = config
    else:
        values = as_dict(config)
        known = {f.name for f in dataclasses.fields(entry.config_cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise StudioError(f"{entry.cli_name} has no setting {', '.join(unknown)}; see "
                              f"`python -m studio train {entry.cli_name} --help`.")
        from studio.models import BaseSettings

        profile = BaseSettings.from_dict(base_settings(base)).profile()
        cfg = entry.resolve(preset, profile=profile, **values)
    values = dataclasses.asdict(cfg)
    whole_model = cfg.writes_folder()
    candidates = list(cfg.token_candidates())
    # 2. settings a job owns.
    if values.get("resume") not in (None, "", "latest"):
        raise StudioError("A job always resumes from its own checkpoints; drop --resume (or train in the "
                          "foreground to continue from another checkpoint).")
    for name in JOB_OWNED:
        if values.get(name):
            raise StudioError(f"A job keeps its checkpoints in its own folder; drop --{name.replace('_', '-')}.")
    values["resume"] = None
    if not values.get("checkpoint_every"):
        values["checkpoint_every"] = default_checkpoint_every(int(values["steps"]), whole_model=whole_model)
    # 3. the dataset: checked for images now (decoded when the job runs), copied by stage().
    if not values.get("images"):
        raise StudioError("A training job needs images: the folder of training images (--images DIR).")
    source = Path(str(values["images"])).expanduser().resolve()
    if not source.is_dir():
        raise DatasetError(f"Image folder {source} does not exist or is not a folder.")
    n_images = sum(1 for p in source.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.lower().endswith(".mask.png"))
    if n_images < entry.min_images:
        raise DatasetError(f"{source} holds {n_images} image(s); {entry.cli_name} needs at least {entry.min_images}.")
    values["images"] = str(source)
    prepared = PreparedJob(trainer=entry.cli_name, config=values, base=base_settings(base), source=str(source),
                           inputs={"images": DATASET}, copies=[(source, DATASET)], whole_model=whole_model,
                           candidates=candidates)
    # 4. other inputs the config declares (e.g. --class-images, --names-file, --eval-prompts) travel with the job.
    from studio.configs import path_fields

    kinds = {key: kind for key, (kind, _) in path_fields(entry.config_cls).items()}
    for key, value in values.items():
        if not (isinstance(value, str) and value) or key == "images" or kinds.get(key) not in ("file", "folder"):
            continue
        flag = f"--{key.replace('_', '-')}"
        path = Path(value).expanduser().resolve()
        if kinds[key] == "folder":
            if not path.is_dir():
                raise DatasetError(f"{flag} {value}: no such folder.")
            rel = f"{FILES}/{key}"
        else:
            if not path.is_file():
                raise StudioError(f"{flag} {value}: no such file.")
            rel = f"{FILES}/{key}-{path.name}"
        prepared.copies.append((path, rel))
        prepared.inputs[key] = rel
        values[key] = str(path)
    # 5. an explicit destination: a concept file, or the folder of a whole fine-tuned model.
    if whole_model:
        if not values.get("out"):
            raise StudioError("A full fine-tune writes a whole model, not a concept: pass --out DIR (a new folder).")
        out = Path(str(values["out"])).expanduser().resolve()
        if out.suffix == ".safetensors":
            raise StudioError(f"--out {out}: a full fine-tune writes a diffusers folder; pass a folder path instead.")
        prepared.out = out
    elif values.get("out"):
        out = Path(str(values["out"])).expanduser().resolve()
        if out.suffix != ".safetensors":
            raise StudioError(f"--out {out} must end in .safetensors.")
        prepared.out = out
    if prepared.out is not None:
        values["out"] = str(prepared.out)
    return prepared


def reserve_name(prepared: PreparedJob, library: Any, used: list[tuple[str, str, str]]) -> tuple[str, str, Path]:
    """(name, token, destination) for a new job, unique among the library and ``used`` — the
    ``(name, token, destination)`` of jobs that may still publish. Mirrors
    :func:`trainers.runner.choose_token`: the user's token, else ``<name>`` / ``<class-word>``,
    numbered until free."""
    from studio.library import check_name
    from studio.prompts import normalize_token

    cfg = prepared.config
    taken_tokens = {t for info in library.list() for t in info.tokens} | {t for _, t, _ in used}
    taken_names = set(library.names()) | {n for n, _, d in used if Path(d).parent == library.folder}
    taken_dest = {str(Path(d)) for _, _, d in used}
    name = check_name(cfg["name"]) if cfg.get("name") else None

    def free(token: str) -> bool:
        return token not in taken_tokens and (name is not None or prepared.out is not None
                                              or token.strip("<>") not in taken_names)

    if cfg.get("token"):
        token = normalize_token(cfg["token"])
    else:
        found = [t for t in map(normalize_token, prepared.candidates) if free(t)]
        if found:
            token = found[0]
        else:
            stem = cfg.get("name") or (cfg["class_word"].replace(" ", "-") if cfg.get("class_word") else "concept")
            first = token = normalize_token(stem)
            i = 2
            while not free(token):
                token = f"{first[:-1]}-{i}>"
                i += 1
    name = name or check_name(token.strip("<>"))
    destination = prepared.out or library.path(name)
    if prepared.whole_model and destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise StudioError(f"Cannot queue this job: --out {destination} exists and is not an empty folder; choose "
                          "a new folder.")
    if not prepared.whole_model and destination.exists():
        where = f"a concept named {name!r} is already in {library.folder}" if prepared.out is None else \
            f"{destination} already exists"
        raise StudioError(f"Cannot queue this job: {where}; choose another --name (or remove the old one).")
    if str(destination) in taken_dest:
        raise StudioError(f"Another queued job already trains {destination.name}; choose another --name.")
    return name, token, destination


def check_destination_free(job: Any, others: list[tuple[str, str]]) -> None:
    """Before a cancelled job is queued again: its destination must still be free."""
    dest = Path(job.destination)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise StudioError(f"Job {job.id} would publish {dest}, which exists now; remove or rename it first.")
    if any(Path(d) == dest for _, d in others):
        raise StudioError(f"Another job now trains {dest.name}; job {job.id} cannot be resumed under that name.")
