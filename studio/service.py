"""``Studio``: the one facade the CLI, the UI and Python users call (no gradio here)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from studio.concept import Concept
from studio.errors import StudioError
from studio.generation import GenerateConfig, generate
from studio.jobs import JobQueue
from studio.library import DEFAULT_LIBRARY, Library
from studio.methods import load_concept
from studio.models import BaseModel, BaseSettings
from studio.request_paths import allowed_folders, check_base, check_concept_name, check_model


class Studio:
    """A base model (loaded on first use) + a concept library.

    >>> studio = Studio(BaseSettings(base="tiny"), library="concepts")
    >>> images = studio.generate(GenerateConfig(prompt="a photo of a cat", seed=3))
    """

    def __init__(self, settings: BaseSettings | None = None, library: str | Path = DEFAULT_LIBRARY,
                 base: BaseModel | None = None, allowed_paths: Sequence[str | Path] = (), *,
                 queue_url: str | None = None, jobs_storage: str | None = None):
        self.settings = settings or BaseSettings()
        self.library = Library(library)
        # The training queue's database and job storage (default: SQLite and folders beside the library).
        self.queue_url, self.jobs_storage = queue_url, jobs_storage
        # Local paths a web request may name for a model or base (app.py --allow-path; default: none).
        self.allowed_paths: tuple[Path, ...] = allowed_folders(allowed_paths)
        self._base = base
        self._lock = threading.RLock()  # one pipeline: one call at a time
        self.notes: list[str] = []
        self._jobs: JobQueue | None = None
        # fits(): file -> ((size, mtime_ns, base identity, base compatibility), reason)
        self._fits: dict[Path, tuple[tuple[int, int, str, str], str]] = {}

    @property
    def base(self) -> BaseModel:
        with self._lock:
            if self._base is None:
                self._base = self.settings.load()
            return self._base

    @property
    def jobs(self) -> JobQueue:
        """The library's training-job queue (run it with ``Worker(studio.jobs).start()`` or
        ``python -m studio jobs work``)."""
        with self._lock:
            if self._jobs is None:
                self._jobs = JobQueue(self.library, url=self.queue_url, storage=self.jobs_storage)
            return self._jobs

    def switch_base(self, settings: BaseSettings) -> BaseModel:
        """Load another base; when it cannot be loaded, the previous base stays (and the error is raised)."""
        with self._lock:
            previous = (self.settings, self._base)
            self.settings = settings
            self._base = None
            try:
                return self.base
            except BaseException:
                self.settings, self._base = previous
                raise

    # -- what a web request may name (studio.request_paths; the UI handlers call these) -----------
    def check_request_model(self, value: str, *, label: str, names: Sequence[str] = (),
                            hub_parts: int | None = None) -> str:
        """A model a request names (a CLIP judge, an IP-Adapter …): one of ``names``, a hub id, or a path under
        :attr:`allowed_paths` (made absolute); anything else is refused before it is opened."""
        return check_model(value, label=label, allowed=self.allowed_paths, names=names, hub_parts=hub_parts)

    def check_request_base(self, spec: str) -> str:
        """The Base box: a named base, a hub id, or a path under :attr:`allowed_paths`."""
        return check_base(spec, allowed=self.allowed_paths)

    def check_request_concept(self, source: str) -> str:
        """A concept a request names: a name in the library, never a file path."""
        return check_concept_name(source, self.library.names())

    def load_concept(self, source: str) -> Concept:
        """A file path or a library name → the validated concept."""
        return load_concept(self.library.resolve(source))

    def fits(self, name: str) -> str:
        """``""`` when the library concept ``name`` can be applied to the loaded base, else a short reason
        to show on its card: ``"for another base (demo world)"``.

        The file's header alone decides (:func:`studio.concept.check_compatible` on its ``studio.base``): cheap
        enough for every card of a listing, and cached per file version and base. A concept trained on other
        weights of the same architecture fits (generation adds a note); one for another architecture stays
        listed, and generation refuses it (:class:`~studio.errors.IncompatibleConceptError`). A file whose
        header cannot be read gets its one-line error (the listing's ``error`` says why it is unusable).
        The base is loaded if it is not yet; a generation in progress does not hold this up."""
        path = self.library.path(name)
        base = self._base if self._base is not None else self.base
        try:
            stat = path.stat()
        except OSError:
            return f"not in the library {self.library.folder}"
        key = (stat.st_size, stat.st_mtime_ns, base.identity, base.compat_id)
        cached = self._fits.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        reason = _fit_reason(path, name, base)
        self._fits[path] = (key, reason)
        return reason

    def generate(self, cfg: GenerateConfig, callback: Any = None) -> list[Image.Image]:
        concepts = [(self.load_concept(c.source), c.strength, c.source, c.stages) for c in cfg.concepts]
        with self._lock:
            self.notes = []
            return generate(self.base, cfg, concepts, notes=self.notes, callback=callback)

    def create_zeroshot(self, images: list[str], adapter: str, *, image_encoder: str | None = None,
                        out: str | None = None, name: str | None = None, token: str | None = None,
                        class_word: str = "", scale: float = 1.0, average: bool = False,
                        layer_scales: float | dict | None = None, mask: str | None = None,
                        force: bool = False) -> Path:
        """Encode reference images with an IP-Adapter's image encoder into a zero-shot concept,
        saved to ``out`` or into the library (under ``name``, default the first folder's name).
        Needs no base model: the image encoder runs on the CPU unless the base is already loaded."""
        from studio.methods.zeroshot import make_zeroshot_concept

        if not images:
            raise StudioError("Give at least one reference image or folder (--images).")
        loaded = self._base
        concept = make_zeroshot_concept(
            images, adapter, image_encoder=image_encoder, average=average, scale=scale, layer_scales=layer_scales,
            mask=mask,
            name=name or Path(images[0]).expanduser().resolve().stem, token=token, class_word=class_word,
            device=loaded.device if loaded is not None else "cpu",
            dtype=loaded.dtype if loaded is not None else torch.float32)
        if out:
            from studio.methods import save_concept

            target = Path(out).expanduser()
            if target.suffix != ".safetensors":
                raise StudioError(f"--out {target} must end in .safetensors.")
            if target.exists() and not force:
                raise StudioError(f"{target} exists; pass --force to replace it.")
            return save_concept(concept, target)
        return self.library.add(concept, name, force=force)

    def evaluate(self, concepts: list[Any], config: Any = None, **options: Any) -> Any:
        """Generate, score and report concepts (files, library names or ``ConceptUse``); the summary is
        written into each concept file. ``config``: an :class:`~studio.evaluation.EvaluateConfig` (default:
        its defaults, ``None`` fields following this base), ``options``: its fields as keywords (and
        ``references``, ``judges``). Result: :func:`studio.evaluation.evaluate_concepts`."""
        from studio.evaluation import evaluate_concepts

        with self._lock:
            return evaluate_concepts(self, concepts, config, **options)

    def sweep(self, concept: Any, strengths: list[float] | None = None, config: Any = None, **options: Any) -> Any:
        """Score one concept across strengths (default: ``config.sweep``) and store its recommended strength
        (:func:`studio.evaluation.sweep_strength`; ``config`` and ``options`` as :meth:`evaluate`)."""
        from studio.evaluation import sweep_strength

        with self._lock:
            return sweep_strength(self, concept, strengths, config, **options)

    def compare(self, arms: Sequence[Any], config: Any = None, **options: Any) -> Any:
        """An A/B comparison: the arms (:class:`~studio.compare.Arm` — concepts, one concept at several
        strengths, the base alone) rendered with the same prompts and seeds, scored by the same judges, side
        by side (:func:`studio.compare.compare`; ``config`` and ``options`` as :meth:`evaluate`, plus
        ``references`` and ``judges``). Nothing is written into the concept files."""
        from studio.compare import compare

        with self._lock:
            return compare(self, arms, config, **options)

    # -- training from uploads (the UI; the CLI passes folders) ----------------------------------
    def training_methods(self) -> dict[str, TrainingMethod]:
        """Every registered trainer with its presets and the options a user sets (see :class:`TrainingMethod`)."""
        from trainers import trainer_registry

        return {name: TrainingMethod(e) for name, e in trainer_registry().items()}

    def stage_training_images(self, images: list[str | Path], *, masks: Sequence[str | Path] = (),
                              captions: dict[str, str] | None = None, min_images: int = 1,
                              folder: str | Path | None = None) -> Path:
        """Copy uploaded files into a fresh folder laid out as :mod:`trainers.data` reads it, and validate it.

        ``images`` may also hold ``name.txt`` captions and ``name.mask.png`` masks; ``masks`` are matched to
        images by file stem (``dog.png`` or ``dog.mask.png`` → ``dog.jpg``); ``captions`` maps an image's
        file name or stem to its caption. Count, size and type are checked first, then every image is
        decoded by :func:`trainers.data.load_image_folder` (errors name the file)."""
        import shutil
        import tempfile

        from studio.errors import DatasetError
        from trainers.data import IMAGE_SUFFIXES, load_image_folder

        files = check_uploads(list(images) + list(masks), suffixes=IMAGE_SUFFIXES | {".txt"})
        upload, mask_files = files[: len(images)], files[len(images):]
        out = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="studio-upload-"))
        out.mkdir(parents=True, exist_ok=True)
        try:
            stems: dict[str, str] = {}
            for src in upload:
                name = safe_filename(src.name)
                low = name.lower()
                if low.endswith(".mask.png") or low.endswith(".txt"):
                    continue
                stem = Path(name).stem
                if stem in stems:
                    raise DatasetError(f"Two uploaded images are named {stem!r} ({stems[stem]}, {name}); rename one.")
                stems[stem] = name
                shutil.copyfile(src, out / name)
            if len(stems) < min_images:
                raise DatasetError(f"{len(stems)} image(s) uploaded; this method needs at least {min_images} "
                                   "(3–20 photos of the subject work best).")
            sidecars = [(f, "mask") for f in mask_files] + [
                (f, "mask" if f.name.lower().endswith(".mask.png") else "caption")
                for f in upload if f.name.lower().endswith((".mask.png", ".txt"))]
            for src, kind in sidecars:
                name = safe_filename(src.name)
                stem = name[: -len(".mask.png")] if name.lower().endswith(".mask.png") else Path(name).stem
                if stem not in stems:
                    raise DatasetError(f"{kind.capitalize()} {name} matches no uploaded image (name it like its image, "
                                       f"e.g. {next(iter(stems))[:40]}.{'mask.png' if kind == 'mask' else 'txt'}).")
                shutil.copyfile(src, out / (f"{stem}.mask.png" if kind == "mask" else f"{stem}.txt"))
            for key, text in (captions or {}).items():
                stem = key if key in stems else Path(key).stem
                if stem not in stems:
                    raise DatasetError(f"The caption for {key!r} matches no uploaded image "
                                       f"(images: {', '.join(sorted(stems))}).")
                (out / f"{stem}.txt").write_text(text.strip() + "\n", encoding="utf-8")
            load_image_folder(out, 64, min_images=min_images, max_images=MAX_UPLOAD_FILES)
        except BaseException as err:
            if folder is None:
                shutil.rmtree(out, ignore_errors=True)
            if isinstance(err, StudioError):  # name the files as uploaded, never a server path
                raise hide_upload_paths(err, files, {} if folder else {out: "the uploaded images"}) from None
            if isinstance(err, OSError):
                raise DatasetError(f"Could not store the uploaded images ({err.strerror or err}); free some space "
                                   "and upload them again.") from None
            raise
        return out

    def submit_training(self, trainer: str, values: dict[str, Any], images: list[str | Path], *,
                        masks: Sequence[str | Path] = (), captions: dict[str, str] | None = None,
                        preset: str | None = None, files: Mapping[str, Sequence[str | Path]] | None = None,
                        trusted: bool = False) -> Any:
        """Validate uploads and settings, then queue a job on the current base; returns the
        :class:`~studio.jobs.Job`. Paths a job manages itself (:data:`JOB_MANAGED`) are refused; a
        whole-model fine-tune goes to ``<library>/models/<name>/``.

        This is the web UI's entry point, so it takes no server path in ``values``: the inputs a setting
        reads (``path="file"`` / ``"folder"`` fields, e.g. ``eval_prompts``, ``class_images``) arrive as
        uploads in ``files`` (``{field: [uploaded files]}``; one file for a file field) and are copied into the
        job; a model setting (``path="model"``, e.g. ``eval_model``, ``adapter``) is a hub id, one of its named
        values, or a path under :attr:`allowed_paths` (:mod:`studio.request_paths`). ``trusted=True`` (the
        operator's own code) lets ``values`` name server paths as the CLI does."""
        import shutil
        import time as _time

        from studio.configs import path_fields
        from studio.library import check_name

        method = self.training_methods().get(trainer) or next(
            (m for m in self.training_methods().values() if m.method == trainer), None)
        if method is None:
            raise StudioError(f"Unknown training method {trainer!r}; available: "
                              f"{', '.join(self.training_methods())}.")
        import dataclasses

        files = {k: list(v) for k, v in (files or {}).items() if v}
        unknown = sorted((set(values) | set(files)) - {f.name for f in dataclasses.fields(method.config_cls)})
        if unknown:
            raise StudioError(f"{method.name} has no setting {', '.join(unknown)}.")
        managed = sorted(k for k in (*values, *files) if k in JOB_MANAGED or k.endswith("_dir"))
        if managed:
            raise StudioError(f"{', '.join(managed)} cannot be set here: the job keeps its images, checkpoints and "
                              "output in its own folder.")
        kinds = path_fields(method.config_cls)
        values = dict(values)
        for key in sorted(set(values) | set(files)):
            kind, names = kinds.get(key, (None, ()))
            if key in files and kind not in ("file", "folder"):
                raise StudioError(f"{key} is a setting, not an uploaded file.")
            if key in files and kind == "file" and len(files[key]) != 1:
                raise StudioError(f"{key} is one uploaded file; {len(files[key])} were given.")
            value = values.get(key)
            if trusted or value is None or value == "" or value == []:
                continue
            if kind in ("file", "folder"):
                raise StudioError(f"{key} is uploaded as a file, not typed: upload it in its box on the form.")
            if kind == "model":
                values[key] = self.check_request_model(str(value), label=key, names=names)
        if preset is None:
            preset = method.preset_name(self.settings.profile())
        config = method.preset_values(preset) | values
        uploads = {k: check_uploads(v, suffixes=None if kinds[k][0] == "file" else IMAGE_UPLOADS | {".txt"})
                   for k, v in files.items()}  # count, size and type, before anything reads them
        # validate the settings before copying anything (an upload stands for its field)
        probe = method.config_cls(**{**config, **{k: str(v[0]) for k, v in uploads.items()}, "images": ""})
        if probe.writes_folder():
            default = f"{config.get('class_word') or 'model'}-{_time.strftime('%Y%m%d-%H%M%S')}"
            stem = check_name(config.get("name") or default)
            config["out"] = str(self.library.folder / "models" / stem)
        staged: list[Path] = []
        try:
            for key, paths in uploads.items():  # a file: copied into the job by prepare_job; a folder: staged here
                if kinds[key][0] == "file":
                    config[key] = str(paths[0])
                else:
                    staged.append(self.stage_training_images(list(paths), min_images=1))
                    config[key] = str(staged[-1])
            staged.append(self.stage_training_images(images, masks=masks, captions=captions,
                                                     min_images=method.min_images))
            config["images"] = str(staged[-1])
            try:
                return self.jobs.submit(method.name, config, _settings_dict(self.settings), preset=preset)
            except StudioError as err:  # the files as uploaded, never their server paths
                raise hide_upload_paths(err, [p for v in uploads.values() for p in v],
                                        {f: "the uploaded images" for f in staged}) from None
        finally:
            for folder in staged:
                shutil.rmtree(folder, ignore_errors=True)

    def merge_concepts(self, sources: Sequence[str], out: str, *, captions: str | None = None,
                       force: bool = False) -> tuple[Path, str]:
        """Merge Custom Diffusion concepts (files or library names) into one in closed form, on the loaded
        base (:mod:`studio.methods.custom_diffusion.merge`); ``out`` is a library name or a ``.safetensors``
        file, ``captions`` a file of regularisation captions (one per line; default: generic captions).
        Returns the written path and a one-line summary of the constraint residuals."""
        from studio.methods import save_concept
        from studio.methods.custom_diffusion.merge import merge_concepts
        from studio.methods.perfusion.covariance import read_corpus

        reg = read_corpus(captions) if captions else None
        with self._lock:
            concepts = [self.load_concept(s) for s in sources]
            target = Path(out).expanduser()
            name = target.stem if target.suffix == ".safetensors" else out
            concept, report = merge_concepts(self.base, concepts, name=name, captions=reg)
            if target.suffix == ".safetensors":
                if target.exists() and not force:
                    raise StudioError(f"{target} exists; pass --force to replace it.")
                return save_concept(concept, target), report.summary()
            return self.library.add(concept, out, force=force), report.summary()

    def import_upload(self, path: str | Path, name: str | None = None, *, token: str | None = None,
                      class_word: str | None = None) -> Path:
        """Import an uploaded concept file (studio, A1111 ``.pt``, diffusers, kohya) into the library."""
        src = check_uploads([path], suffixes=CONCEPT_SUFFIXES, max_bytes=MAX_CONCEPT_BYTES)[0]
        try:
            return self.library.import_file(src, name or None, token=token or None, class_word=class_word or None)
        except StudioError as err:  # the file as uploaded, never its server path
            raise hide_upload_paths(err, [src]) from None

    def capabilities(self) -> dict[str, bool]:
        """The optional extras and assets this install has (the UI notes the missing ones):
        the demo world's committed weights, xformers, open-clip, bitsandbytes."""
        import importlib.util

        from studio.world import DEMO_BASE_DIR, ORACLE_PATH

        world = (Path(DEMO_BASE_DIR) / "model_index.json").is_file() and Path(ORACLE_PATH).is_file()
        extras = {name: importlib.util.find_spec(module) is not None
                  for name, module in (("xformers", "xformers"), ("open_clip", "open_clip"),
                                       ("bitsandbytes", "bitsandbytes"))}
        return {"demo_world": world, **extras}


def _fit_reason(path: Path, name: str, base: BaseModel) -> str:
    """:meth:`Studio.fits` for one file version: ``""`` or why the concept does not apply to ``base``."""
    from studio.concept import check_compatible, concept_fields, read_header
    from studio.errors import IncompatibleConceptError

    def one_line(err: BaseException) -> str:
        text = " ".join(str(err).split()) or type(err).__name__
        return text if isinstance(err, StudioError) else f"{type(err).__name__}: {text}"

    try:
        _, md = read_header(path)
        if "studio.format" not in md:
            return "not a studio concept (import it)"
        fields = concept_fields(md, path)
    except Exception as err:  # noqa: BLE001 - a card shows the reason, a listing never fails
        return one_line(err)
    try:
        check_compatible(Concept(method=fields.method, tokens=fields.tokens, tensors={}, name=name,
                                 base=fields.base), base)
    except IncompatibleConceptError:
        return f"for another base ({_base_label(fields.base)})"
    except StudioError as err:  # a corrupt compatibility entry
        return one_line(err)
    return ""


def _base_label(fingerprint: dict[str, Any]) -> str:
    """A concept's base in a few words: ``demo world``, else its name (or family)."""
    name = str(fingerprint.get("name") or "")
    if name == "demo":
        return "demo world"
    family = fingerprint.get("family")
    compat = fingerprint.get("compat")
    family = family or (compat.get("family") if isinstance(compat, dict) else None)
    return name or str(family or "unknown")


# -- uploads ----------------------------------------------------------------------------------------
MAX_UPLOAD_FILES = 200  # images (+ captions and masks) of one training upload
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # per uploaded image
MAX_CONCEPT_BYTES = 512 * 1024**2  # per uploaded concept file (a LoRA can be large; the app's upload limit too)
CONCEPT_SUFFIXES = frozenset({".safetensors", ".pt", ".bin"})
IMAGE_UPLOADS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
JOB_MANAGED = ("images", "out", "checkpoint_dir", "resume")  # a job sets these itself


def safe_filename(name: str) -> str:
    """The last path component of an uploaded file's name, reduced to ``[A-Za-z0-9._ -]`` (never hidden)."""
    import re

    base = re.split(r"[\\/]", name)[-1]
    clean = re.sub(r"[^A-Za-z0-9._ -]", "_", base).strip(" .") or "file"
    return clean[:120]


def hide_upload_paths(err: StudioError, uploads: list[Path], folders: dict[Path, str] | None = None) -> StudioError:
    """``err`` with every server path of an upload replaced by the file's own name (and each of
    ``folders`` by its text): what a user sees names what they uploaded, not ``/tmp/gradio/…``."""
    names: dict[str, str] = {}
    for p in uploads:
        for form in {str(p), str(Path(p).resolve())}:
            names[form] = Path(p).name
            names[str(Path(form).parent)] = "the upload folder"
    for folder, text in (folders or {}).items():
        names[str(folder)] = names[str(Path(folder).resolve())] = text
    message = str(err)
    for path in sorted(names, key=len, reverse=True):  # a file before its folder
        if len(path) > 1:
            message = message.replace(path, names[path])
    message = message.replace("the upload folder/", "").replace("the uploaded images/", "")
    return err if message == str(err) else type(err)(message)


def check_uploads(paths: Sequence[str | Path], *, suffixes: Any, max_files: int = MAX_UPLOAD_FILES,
                  max_bytes: int = MAX_UPLOAD_BYTES) -> list[Path]:
    """Uploaded files: how many, how big, which type (by suffix; ``suffixes=None``: any), before anything reads them."""
    from studio.errors import DatasetError

    if len(paths) > max_files:
        raise DatasetError(f"{len(paths)} files were uploaded; at most {max_files} are accepted at once.")
    out = []
    for raw in paths:
        p = Path(raw)
        if not p.is_file():
            raise DatasetError(f"The upload {p.name} is missing (it may have expired); upload it again.")
        name = p.name.lower()
        if suffixes is not None and not any(name.endswith(s) for s in suffixes) and not name.endswith(".mask.png"):
            raise DatasetError(f"{p.name} is not an accepted file type ({', '.join(sorted(suffixes))}).")
        size = p.stat().st_size
        if size > max_bytes:
            raise DatasetError(f"{p.name} is {size / 2**20:.1f} MB; files up to {max_bytes / 2**20:.0f} MB are accepted.")
        out.append(p)
    return out


def _settings_dict(settings: BaseSettings) -> dict[str, Any]:
    return settings.to_dict()


class TrainingMethod:
    """A trainer as a form: its options (:func:`~studio.configs.field_specs` of its config dataclass,
    minus what a job manages), presets and the values a preset gives every option."""

    def __init__(self, entry: Any):
        self.entry = entry
        self.name: str = entry.cli_name
        self.method: str = entry.method
        self.help: str = entry.help
        self.config_cls: type = entry.config_cls
        self.presets: dict[str, dict[str, Any]] = dict(entry.presets)
        self.default_preset: str | None = entry.default_preset
        self.min_images: int = entry.min_images
        self.gives: str = entry.gives

    def fields(self) -> list[Any]:
        from studio.configs import field_specs

        return [f for f in field_specs(self.config_cls) if f.name not in JOB_MANAGED and not f.name.endswith("_dir")]

    def preset_name(self, profile: Any = None) -> str | None:
        """The preset the form opens with on a base of ``profile`` (:meth:`trainers.entry.TrainerEntry.preset_name`)."""
        return self.entry.preset_name(None, profile)

    def preset_values(self, preset: str | None = None) -> dict[str, Any]:
        """Preset ``preset`` (default: the method's; ``""``: none) over the dataclass defaults, for the shown
        options — what :meth:`trainers.entry.TrainerEntry.resolve` would build, before validation."""
        import dataclasses

        values = {f.name: f.default for f in self.fields() if f.default is not dataclasses.MISSING}
        shown = set(values) | {f.name for f in self.fields()}
        values.update({k: v for k, v in self.entry.preset_values(preset).items() if k in shown})
        return values

    def cli_words(self, values: Mapping[str, Any], preset: str | None = None, profile: Any = None) -> list[str]:
        """The ``train`` command's words after ``train METHOD`` that build the same config as the form does
        (:meth:`Studio.submit_training`: ``preset`` — ``None`` for the base's, ``""`` for none — then ``values``):
        ``--preset`` when one is chosen, then a flag per value that differs from what the command would
        resolve to without it (:func:`studio.configs.to_flags`). Uploaded inputs (``path="file"`` /
        ``"folder"``) are left out: the command names their folders itself."""
        from studio.configs import path_fields, to_flags

        chosen = self.preset_name(profile) if preset is None else preset
        words = ["--preset", chosen] if chosen and chosen in self.presets else []
        # what ``train`` resolves to with those words and no other flag (TrainerEntry.resolve)
        reference = self.preset_values(chosen if words else (self.entry.preset_name(None, profile) or ""))
        uploads = tuple(k for k, (kind, _) in path_fields(self.config_cls).items() if kind in ("file", "folder"))
        return words + to_flags(self.config_cls, dict(values), reference, skip=(*JOB_MANAGED, *uploads))
