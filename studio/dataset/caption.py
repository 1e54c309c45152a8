"""Caption a training folder: ``name.txt`` beside each image, with the trigger and class word in it.

``python -m studio dataset caption DIR [--model ID_OR_DIR] [--kind blip|tags] [--trigger TOKEN]
[--class-word WORD] [--force] [--dry-run]``

* a :class:`Captioner` turns images into captions: an image-to-text model (BLIP, BLIP-2, Florence-2:
  :class:`~studio.dataset.captioners.HFCaptioner`) or CLIP zero-shot tags
  (:class:`~studio.dataset.captioners.TagCaptioner`); :func:`load_captioner` picks one from the
  checkpoint's ``config.json``;
* :func:`insert_trigger` puts ``<trigger> <class word>`` into each caption;
* :func:`caption_folder` writes the sidecars — atomically, UTF-8 — where :mod:`trainers.data` reads
  them (``photo.jpg`` → ``photo.txt``). An existing caption is never replaced without ``force``;
  ``dry_run`` writes nothing. A file that is not an image, or an image that cannot be read, is
  skipped with the reason (the other images are still captioned).

Files are chosen as the trainers choose them (:mod:`studio.dataset.files`): PNG, JPEG, WebP, BMP and
TIFF images (and GIF, whose caption the crop step carries to its PNG), sorted by name; hidden files,
caption/notes sidecars (``.txt``, ``.json``, ``.md``), masks (``name.mask.png``) and sub-folders are
left alone.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

from studio.atomic import atomic_path
from studio.dataset import files
from studio.errors import DatasetError, StudioError
from studio.images import open_image

HELP = ("caption every image with BLIP / BLIP-2 / Florence-2 (or CLIP tags), insert the trigger and class word, "
        "write name.txt sidecars")
KINDS = ("auto", "blip", "tags")
MAX_SIDE = 1024  # images are shrunk to this before captioning (the models see ≤ 768 px); saves memory
# Nouns a captioner says instead of the class word: when the class word is one of a group, the first
# word of the group found in a caption is replaced (e.g. --class-word person: "a man on a bench" →
# "a sks person on a bench").
NOUN_GROUPS: tuple[tuple[str, ...], ...] = (
    ("person", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "lady", "guy", "gentleman"),
    ("dog", "puppy", "pup"),
    ("cat", "kitten", "kitty"),
)
Status = Literal["written", "replaced", "kept", "dry-run", "skipped"]


@runtime_checkable
class Captioner(Protocol):
    """Images → captions. ``name`` says which model (``"blip:Salesforce/…"``); an optional ``style``
    attribute ``"tags"`` makes :func:`caption_folder` insert the trigger as the first tag."""

    name: str

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (PIL images of any size; RGB)."""
        ...


@dataclass(frozen=True)
class CaptionResult:
    """What happened to one file of the folder.

    status: ``written`` (new sidecar), ``replaced`` (``force``), ``kept`` (a caption existed; ``caption``
    is its text), ``dry-run`` (``caption`` would have been written), ``skipped`` (``reason`` says why).
    """

    image: Path
    sidecar: Path
    status: Status
    caption: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        """False when the file was skipped because of a problem with it."""
        return self.status != "skipped"


# ---------------------------------------------------------------- trigger and class word


def _word_pattern(word: str) -> str:
    """``word`` (spaces match any whitespace) with an optional plural ``s``/``es``, on word boundaries."""
    body = r"\s+".join(re.escape(part) for part in word.split())
    return rf"(?<![\w<]){body}(?P<plural>e?s)?(?![\w>])"


def _has_token(text: str, token: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(token)}(?![\w>])", text, flags=re.IGNORECASE) is not None


def check_trigger(trigger: str | None, class_word: str | None) -> tuple[str | None, str | None]:
    """Normalised ``(trigger, class_word)``: whitespace collapsed, empty → None; a trigger with spaces,
    or either with a comma or newline, is a :class:`DatasetError`."""
    trigger = " ".join(trigger.split()) if trigger else None
    class_word = " ".join(class_word.split()) if class_word else None
    if trigger and " " in trigger:
        raise DatasetError(f"The trigger {trigger!r} has a space; use one word (e.g. sks or <sks>) and put the "
                           "noun in --class-word.")
    for what, value in (("trigger", trigger), ("class word", class_word)):
        if value and ("," in value or "\n" in value):
            raise DatasetError(f"The {what} {value!r} has a comma; captions and tags are comma-separated, remove it.")
    return trigger or None, class_word or None


def insert_trigger(caption: str, trigger: str | None, class_word: str | None = None, *, tags: bool = False) -> str:
    """``caption`` with ``"<trigger> <class word>"`` in it.

    Sentences: the first occurrence of the class word (case-insensitive, whole words; a plural made
    with ``s``/``es`` counts and keeps its ending — "dogs" → "sks dogs"; irregular plurals such as
    "people" do not) becomes ``"<trigger> <class word>"``. When it is absent and the class word
    belongs to one of :data:`NOUN_GROUPS`, the first noun of that group is replaced instead. Otherwise
    ``"a photo of <trigger> <class word>, "`` is prepended (``"a photo of <trigger>, "`` without a class
    word). A caption that already holds the trigger is returned as is, so running twice changes nothing.

    Tags (``tags=True``): the trigger becomes the first tag and the class word the second (moved there
    when already a tag).

    Without a trigger the caption is returned unchanged (whitespace collapsed).
    """
    caption = " ".join(caption.split())
    trigger, class_word = check_trigger(trigger, class_word)
    if not trigger:
        return caption
    if tags:
        return _insert_tag(caption, trigger, class_word)
    if _has_token(caption, trigger):
        return caption
    if class_word:
        for noun in _candidates(class_word):
            match = re.search(_word_pattern(noun), caption, flags=re.IGNORECASE)
            if match:
                plural = match["plural"] or ""  # "dogs" → "sks dogs"
                return f"{caption[: match.start()]}{trigger} {class_word}{plural}{caption[match.end():]}"
    subject = f"{trigger} {class_word}" if class_word else trigger
    return f"a photo of {subject}, {caption}" if caption else f"a photo of {subject}"


def _candidates(class_word: str) -> list[str]:
    word = class_word.lower()
    for group in NOUN_GROUPS:
        if word in group:
            return [word] + [noun for noun in group if noun != word]
    return [word]


def _insert_tag(caption: str, trigger: str, class_word: str | None) -> str:
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    drop = {trigger.casefold()} | ({class_word.casefold()} if class_word else set())
    rest = [t for t in tags if t.casefold() not in drop]
    return ", ".join([trigger] + ([class_word] if class_word else []) + rest)


# ---------------------------------------------------------------- the folder


def scan_folder(folder: str | os.PathLike[str], *, force: bool = False) -> tuple[list[CaptionResult], list[Path]]:
    """``(settled, pending)``: results for the files that need no captioner (not images, duplicate
    sidecar names, existing captions without ``force``) and the images to caption, sorted by name
    (files by role as :func:`studio.dataset.files.list_folder` sorts them; a GIF is captioned too —
    the crop step turns it into a PNG and copies its caption).

    A missing folder, or one without images, is a :class:`DatasetError`."""
    listing = files.list_folder(folder)
    if not listing.images:
        raise DatasetError(f"{listing.folder} holds no images to caption (PNG, JPEG, WebP, BMP or TIFF).")
    settled = [CaptionResult(path, files.caption_path(path), "skipped", reason=(
        f"{path.name} is not an image the trainers read (PNG, JPEG, WebP, BMP, TIFF), a caption (.txt) or a mask "
        "(.mask.png): move it out of the folder.")) for path in listing.others]
    pending: list[Path] = []
    owners: dict[Path, Path] = {}
    for path in listing.images:
        sidecar = files.caption_path(path)
        if sidecar in owners:
            settled.append(CaptionResult(path, sidecar, "skipped", reason=(
                f"{path.name} and {owners[sidecar].name} share the caption file {sidecar.name}; rename one.")))
            continue
        owners[sidecar] = path
        if os.path.lexists(sidecar) and not force:
            settled.append(CaptionResult(path, sidecar, "kept", caption=_read_caption(sidecar),
                                         reason=f"{sidecar.name} exists (pass --force to replace it)"))
        else:
            pending.append(path)
    return sorted(settled, key=lambda r: r.image.name), pending


def _read_caption(sidecar: Path) -> str | None:
    try:
        return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _open(path: Path) -> Image.Image:
    from studio.dataset.captioners import rgb  # (imports torch: not at module level, --help stays fast)

    image = open_image(path)  # DatasetError naming the file when corrupt, too large or not an image
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return rgb(image)


def caption_folder(folder: str | os.PathLike[str], captioner: Captioner, *, trigger: str | None = None,
                   class_word: str | None = None, force: bool = False, dry_run: bool = False,
                   on_result: Callable[[CaptionResult], None] | None = None) -> list[CaptionResult]:
    """Caption every image of ``folder`` with ``captioner`` and write ``name.txt`` sidecars.

    Args:
        trigger, class_word: inserted by :func:`insert_trigger` (as tags when ``captioner.style`` is
            ``"tags"``).
        force: replace existing captions (else they are kept and reported).
        dry_run: compute the captions, write nothing.
        on_result: called with each result as soon as it is known (progress).

    Returns one :class:`CaptionResult` per file, sorted by file name. Images are read and captioned
    ``captioner.batch_size`` (default 8) at a time; a corrupt image is skipped with the reason.
    """
    trigger, class_word = check_trigger(trigger, class_word)
    settled, pending = scan_folder(folder, force=force)
    results = list(settled)
    if on_result is not None:
        for result in settled:
            on_result(result)
    tags = getattr(captioner, "style", "sentence") == "tags"
    chunk = max(1, int(getattr(captioner, "batch_size", 8) or 8))
    for start in range(0, len(pending), chunk):
        batch: list[tuple[Path, Image.Image]] = []
        for path in pending[start : start + chunk]:
            try:
                batch.append((path, _open(path)))
            except DatasetError as err:
                reason = files.without_folder(str(err), path)
                _emit(results, on_result, CaptionResult(path, files.caption_path(path), "skipped", reason=reason))
            except MemoryError:
                reason = f"{path.name} is too large to decode in memory; resize it."
                _emit(results, on_result, CaptionResult(path, files.caption_path(path), "skipped", reason=reason))
        if not batch:
            continue
        captions = captioner.caption([image for _, image in batch])
        if len(captions) != len(batch) or not all(isinstance(c, str) for c in captions):
            raise StudioError(f"The captioner {captioner.name} returned {len(captions)} captions for {len(batch)} "
                              "images; it is broken.")
        for (path, _), text in zip(batch, captions):
            _emit(results, on_result, _finish(path, insert_trigger(text, trigger, class_word, tags=tags),
                                              force=force, dry_run=dry_run))
    return sorted(results, key=lambda r: r.image.name)


def _emit(results: list[CaptionResult], on_result: Callable[[CaptionResult], None] | None,
          result: CaptionResult) -> None:
    results.append(result)
    if on_result is not None:
        on_result(result)


def _finish(path: Path, caption: str, *, force: bool, dry_run: bool) -> CaptionResult:
    sidecar = files.caption_path(path)
    if not caption:
        return CaptionResult(path, sidecar, "skipped", reason=f"the captioner returned an empty caption for {path.name}")
    if dry_run:
        return CaptionResult(path, sidecar, "dry-run", caption=caption)
    existed = os.path.lexists(sidecar)
    if existed and not force:  # appeared while the model ran
        return CaptionResult(path, sidecar, "kept", caption=_read_caption(sidecar),
                             reason=f"{sidecar.name} exists (pass --force to replace it)")
    try:
        with atomic_path(sidecar) as tmp:
            tmp.write_text(caption + "\n", encoding="utf-8")
    except OSError as err:
        return CaptionResult(path, sidecar, "skipped",
                             reason=f"{sidecar.name} cannot be written ({err.strerror or err}).")
    return CaptionResult(path, sidecar, "replaced" if existed else "written", caption=caption)


# ---------------------------------------------------------------- models


def load_captioner(spec: str | os.PathLike[str] | None = None, *, kind: str = "auto", device: str | None = None,
                   dtype: str | None = None, batch_size: int = 8, max_new_tokens: int = 40, num_beams: int = 3,
                   prompt: str | None = None) -> Captioner:
    """A captioner from a hub id or local folder, chosen by its ``config.json``.

    kind: ``blip`` — an image-to-text model (BLIP, BLIP-2 or Florence-2; default
    ``Salesforce/blip-image-captioning-base``); ``tags`` — a CLIP-like model tagging over a vocabulary
    (default ``openai/clip-vit-base-patch32``); ``auto`` — whichever the checkpoint is (default: BLIP).
    ``prompt``, ``max_new_tokens``, ``num_beams``: image-to-text models only (:class:`~studio.dataset.captioners.HFCaptioner`).

    A hub id that is not in the local cache while ``HF_HUB_OFFLINE=1`` is set, or without network,
    is a one-line :class:`StudioError` saying how to get it.
    """
    from studio.dataset import captioners as models

    if kind not in KINDS:
        raise StudioError(f"Unknown captioner kind {kind!r}; use one of {', '.join(KINDS)}.")
    if spec is None or not os.fspath(spec).strip():
        spec = models.DEFAULT_TAG_MODEL if kind == "tags" else models.DEFAULT_CAPTION_MODEL
    config = models.read_model_config(spec)
    model_type = str(config.get("model_type", "")) or "unknown"
    name = os.fspath(spec)
    if model_type in models.CAPTION_FAMILIES:
        if kind == "tags":
            raise StudioError(f"'{name}' is a {model_type} captioning model; --kind tags needs a CLIP model such as "
                              f"{models.DEFAULT_TAG_MODEL} (or drop --kind tags).")
        return models.HFCaptioner(spec, device=device, dtype=dtype, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, num_beams=num_beams, prompt=prompt, config=config)
    if kind == "blip" or not (config.get("text_config") is not None and config.get("vision_config") is not None):
        raise StudioError(f"'{name}' is a {model_type} model, not a captioner; pass a BLIP, BLIP-2 or Florence-2 "
                          f"checkpoint (e.g. {models.DEFAULT_CAPTION_MODEL}) or a CLIP model with --kind tags.")
    if prompt:
        raise StudioError("--prompt applies to BLIP, BLIP-2 and Florence-2 captioners, not to tags; drop it.")
    return models.TagCaptioner(spec, device=device, dtype=dtype, batch_size=batch_size)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dataset caption`` flags."""
    parser.add_argument("folder", metavar="DIR", help="the folder of training images")
    parser.add_argument("--model", metavar="ID_OR_DIR", default=None,
                        help="hub id or local folder (default: Salesforce/blip-image-captioning-base; "
                             "openai/clip-vit-base-patch32 with --kind tags)")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="blip: sentences from an image-to-text model (BLIP, BLIP-2, Florence-2); "
                             "tags: comma-separated CLIP tags; auto: whichever --model is")
    parser.add_argument("--trigger", metavar="TOKEN", default=None, help="the concept's trigger word, e.g. sks")
    parser.add_argument("--class-word", metavar="WORD", default=None, help="the subject's class noun, e.g. dog")
    parser.add_argument("--force", action="store_true", help="replace existing name.txt captions")
    parser.add_argument("--dry-run", action="store_true", help="print the captions, write nothing")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per model call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=40, metavar="N",
                        help="caption length limit in tokens (default 40)")
    parser.add_argument("--num-beams", type=int, default=3, metavar="N", help="beam search width (default 3)")
    parser.add_argument("--prompt", default=None,
                        help='BLIP/BLIP-2: a prefix the caption continues ("a photo of"); Florence-2: a task, '
                             "<CAPTION> (default), <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on a GPU, fp32 on CPU)")


_VERBS: dict[str, str] = {"written": "wrote", "replaced": "replaced", "kept": "kept", "dry-run": "would write",
                          "skipped": "skipped"}


def _line(result: CaptionResult) -> str:
    verb = _VERBS[result.status]
    if result.status == "skipped":
        return f"{verb:11} {result.image.name}: {result.reason}"
    if result.status == "kept":
        return f"{verb:11} {result.sidecar.name}: {result.caption or ''}  ({result.reason})"
    return f"{verb:11} {result.sidecar.name}: {result.caption}"


def summarize(results: Sequence[CaptionResult]) -> str:
    """One line: how many captions were written, replaced, kept, previewed and skipped."""
    counts = {status: sum(r.status == status for r in results) for status in _VERBS}
    parts = [f"{counts['written']} written", f"{counts['replaced']} replaced"]
    if counts["kept"]:
        parts.append(f"{counts['kept']} kept (pass --force to replace)")
    if counts["dry-run"]:
        parts.append(f"{counts['dry-run']} previewed (--dry-run: nothing written)")
    if counts["skipped"]:
        parts.append(f"{counts['skipped']} skipped")
    return ", ".join(parts) + "."


def run(ns: argparse.Namespace) -> int:
    """``python -m studio dataset caption``: 0 when every image has a caption (or would, with
    ``--dry-run``), 1 when a file was skipped."""
    trigger, class_word = check_trigger(ns.trigger, ns.class_word)
    settled, pending = scan_folder(ns.folder, force=ns.force)  # folder errors before a model loads
    if pending:
        captioner = load_captioner(ns.model, kind=ns.kind, device=ns.device, dtype=ns.dtype,
                                   batch_size=ns.batch_size, max_new_tokens=ns.max_new_tokens, num_beams=ns.num_beams,
                                   prompt=ns.prompt)
        print(f"captioning {len(pending)} image(s) with {captioner.name}", file=sys.stderr)
        results = caption_folder(ns.folder, captioner, trigger=trigger, class_word=class_word, force=ns.force,
                                 dry_run=ns.dry_run, on_result=lambda r: print(_line(r), flush=True))
    else:
        results = sorted(settled, key=lambda r: r.image.name)
        for result in results:
            print(_line(result))
    print(summarize(results))
    return 0 if all(r.ok for r in results) else 1
