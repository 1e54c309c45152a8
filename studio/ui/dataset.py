"""The Train tab's dataset step: the uploaded photos, prepared before training (:mod:`studio.dataset`).

Everything here runs on a *staging folder* (one per form, under the UI's result folder, which counts
as an upload root): the photos and masks are copied in by their safe names, then **inspect** reports
on them, **caption** writes ``name.txt`` sidecars (shown in an editable table: bulk edit, then train),
**masks** writes ``name.mask.png`` sidecars, and **crop** replaces the photos by subject-aware crops.
Start training then trains on the staged folder. Models are hub ids, named values or paths under
the operator's allowed folders (:meth:`~studio.service.Studio.check_request_model`), never a server
path a request types.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.ui.common import UIContext

CAPTION_KINDS = ("blip", "tags")
GRABCUT = "grabcut"


def stage(ctx: UIContext, form: dict[str, Any]) -> Path:
    """The staging folder of this form: made (and filled with the uploads) on first use, reused after,
    refilled when the uploads changed. ``form``: ``images``, ``masks`` (uploads) and ``staged`` (the
    folder a previous step made, or empty)."""
    from studio.service import IMAGE_UPLOADS, check_uploads, safe_filename

    images = ctx.uploaded(form.get("images"))
    if not images:
        raise StudioError("Upload the training images first (3–20 photos of the subject work best).")
    names = sorted(safe_filename(Path(p).name) for p in images)
    staged = str(form.get("staged") or "")
    if staged:
        folder = Path(staged)
        if folder.is_dir() and folder.resolve().is_relative_to(ctx.out_dir.resolve()):
            if (folder / ".uploads").is_file() and (folder / ".uploads").read_text() == "\n".join(names):
                return folder
    uploads = check_uploads(images, suffixes=IMAGE_UPLOADS | {".txt"})
    masks = check_uploads(ctx.uploaded(form.get("masks")), suffixes=IMAGE_UPLOADS)
    folder = ctx.new_folder("dataset")
    for path in uploads:
        shutil.copyfile(path, folder / safe_filename(path.name))
    stems = {Path(n).stem for n in names}
    for path in masks:
        stem = path.name.split(".")[0]
        if stem not in stems:
            raise StudioError(f"Mask {path.name} matches no photo (name it like its photo: dog.png or dog.mask.png).")
        shutil.copyfile(path, folder / f"{safe_filename(stem)}.mask.png")
    (folder / ".uploads").write_text("\n".join(names))
    return folder


def staged_files(folder: str | Path | None) -> list[str]:
    """Every file of a staging folder that training reads (photos, ``.txt`` captions, ``.mask.png`` masks)."""
    if not folder:
        return []
    return [str(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")]


def inspect(ctx: UIContext, form: dict[str, Any]) -> tuple[str, Any, str]:
    """``(report as markdown, contact sheet image, staging folder)`` (:func:`studio.dataset.inspect.inspect_folder`)."""
    from studio.dataset.inspect import inspect_folder

    folder = stage(ctx, form)
    report = inspect_folder(folder, resolution=int(form.get("resolution") or 512))
    warnings = "\n".join(f"- ⚠️ {w}" for w in report.warnings) or "- no warnings"
    return f"**{len(report.images)} image(s)**\n\n{warnings}\n\n```\n{report.text()}\n```", \
        report.contact_sheet(), str(folder)


def caption(ctx: UIContext, form: dict[str, Any]) -> tuple[list[list[str]], str, str]:
    """Caption every staged photo (replacing earlier captions): ``(table rows [file, caption], summary,
    staging folder)``. ``model``: empty for the kind's default model, else a hub id or allowed path."""
    from studio.dataset.caption import caption_folder, load_captioner, summarize

    folder = stage(ctx, form)
    kind = str(form.get("caption_kind") or "blip")
    if kind not in CAPTION_KINDS:
        raise StudioError(f"Caption kind must be one of {', '.join(CAPTION_KINDS)}.")
    spec = str(form.get("caption_model") or "").strip()
    model = ctx.studio.check_request_model(spec, label="captioner") if spec else None
    captioner = load_captioner(model, kind=kind, device=ctx.studio.settings.device)
    results = caption_folder(folder, captioner, trigger=str(form.get("trigger") or "").strip() or None,
                             class_word=str(form.get("class_word") or "").strip() or None, force=True)
    return caption_rows(folder), summarize(results), str(folder)


def caption_rows(folder: str | Path) -> list[list[str]]:
    """``[[photo file name, its caption or ""]]`` for the staged photos."""
    from studio.dataset.files import list_folder

    rows = []
    for image in list_folder(folder).images:
        sidecar = image.with_suffix(".txt")
        rows.append([image.name, sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""])
    return rows


def table_captions(rows: Any) -> dict[str, str]:
    """The edited caption table (a list of rows or a pandas DataFrame) → ``{file name: caption}``; empty
    captions are left out."""
    if rows is None:
        return {}
    values = rows.values.tolist() if hasattr(rows, "values") else list(rows)
    out = {}
    for row in values:
        if len(row) >= 2 and str(row[0] or "").strip() and str(row[1] or "").strip():
            out[str(row[0]).strip()] = str(row[1]).strip()
    return out


def masks(ctx: UIContext, form: dict[str, Any]) -> tuple[list[tuple[str, str]], str, str]:
    """Segment every staged photo (replacing earlier masks; a suspect mask — empty, near-full — is named,
    not written): ``(gallery of (mask file, caption), summary, staging folder)``. ``mask_model``: ``grabcut`` (offline) or a CLIPSeg hub id / allowed path."""
    from studio.dataset.mask import mask_folder
    from studio.dataset.segmenters import load_segmenter

    folder = stage(ctx, form)
    spec = str(form.get("mask_model") or GRABCUT).strip()
    if spec != GRABCUT:
        spec = str(ctx.studio.check_request_model(spec, label="segmenter", names=(GRABCUT,)))
    prompt = str(form.get("mask_prompt") or "").strip() or None
    segmenter = load_segmenter(spec, device=ctx.studio.settings.device)
    for old in folder.glob("*.mask.png"):  # "Make masks" replaces the folder's masks (uploaded ones included) …
        old.unlink()
    # … but an empty or near-full mask is not written (training would refuse or ignore it): it is named instead
    results = mask_folder(folder, segmenter, prompt=prompt, force=False)
    shown = [(str(r.mask), f"{r.image.name}: {r.coverage:.0%}" if r.coverage is not None else r.image.name)
             for r in results if r.mask.is_file()]
    notes = [r.warning for r in results if r.warning]
    summary = f"{sum(r.status == 'written' for r in results)} mask(s) written" + ("".join(f"\n- ⚠️ {n}" for n in notes) if notes else "")
    return shown, summary, str(folder)


def crop(ctx: UIContext, form: dict[str, Any]) -> tuple[str, str]:
    """Replace the staged photos by subject-aware square crops of ``crop_size`` px (centre crops where a
    photo has no mask): ``(summary, the new staging folder)``."""
    from studio.dataset.crop import crop_folder

    folder = stage(ctx, form)
    out = ctx.new_folder("dataset-crop")
    results = crop_folder(folder, out, size=int(form.get("crop_size") or 512))
    for txt in folder.glob("*.txt"):  # captions edited before cropping follow their photo
        if not (out / txt.name).exists():
            shutil.copyfile(txt, out / txt.name)
    (out / ".uploads").write_text((folder / ".uploads").read_text())
    lines = [f"- {r.name}: {r.note}" for r in results]
    return f"{len(results)} photo(s) cropped\n" + "\n".join(lines), str(out)
