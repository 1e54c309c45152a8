"""The Train tab, photos first: 1. the photos (+ captions, masks); 2. the method and preset, with a line
saying what each gives (size, speed, measured fidelity/editability); 3. the options — the basic ones
(:data:`BASIC`) shown, the rest in collapsed groups — generated from the method's config dataclass
(:mod:`studio.ui.forms`). Start queues a job (:meth:`Studio.submit_training`); progress is polled from
the job's events by a ``gr.Timer``. "Copy CLI command" prints the ``python -m studio train …`` that
builds the same config (:func:`cli_command`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.ui.common import UIContext, on
from studio.ui.forms import FormField, build_form, form_fields, parse_form, update_values

SEP = "::"  # form keys of method fields: "textual-inversion::steps"
NO_PRESET = "(none)"
LOG_LINES = 40
# The options shown open above the groups: what a creator sets on a first run. Everything else stays in
# its group's collapsed accordion (the defaults measure what they can: README "Defaults that learn").
BASIC = ("name", "token", "class_word", "steps", "full")
PHOTOS_DIR = "PHOTOS_DIR"  # stands for the folder of photos in a copied command


# -- handlers -------------------------------------------------------------------------------------
def method_forms(ctx: UIContext) -> dict[str, list[FormField]]:
    """Each training method's form fields (from its config dataclass), by method name."""
    return {name: form_fields(m.fields()) for name, m in ctx.studio.training_methods().items()}


def preset_choices(ctx: UIContext, method: str) -> list[str]:
    m = ctx.studio.training_methods()[method]
    return ([] if m.default_preset else [NO_PRESET]) + list(m.presets)


def default_preset(ctx: UIContext, method: str) -> str:
    """The preset the form opens with: the one the base's profile names, else the method's default."""
    return ctx.studio.training_methods()[method].preset_name(ctx.studio.settings.profile()) or NO_PRESET


def preset_values(ctx: UIContext, method: str, preset: str | None) -> dict[str, Any]:
    m = ctx.studio.training_methods()[method]
    return m.preset_values("" if preset in (None, NO_PRESET) else preset)


def method_summary(ctx: UIContext, method: str) -> str:
    """The one line under the method: what it gives (:attr:`trainers.entry.TrainerEntry.gives`)."""
    m = ctx.studio.training_methods()[method]
    return f"**{method}** — {m.help}." + (f"  \nGives: {m.gives}." if m.gives else "")


def cli_command(ctx: UIContext, form: dict[str, Any]) -> str:
    """The ``python -m studio train …`` command that trains what the form would queue, on the loaded base:
    the same preset and every option the form changed (:meth:`TrainingMethod.cli_words`); the photos are
    the folder ``PHOTOS_DIR`` (the form's uploads live on the server). Uploaded option files are named
    as ``--FIELD FILE`` placeholders too."""
    import dataclasses
    import shlex

    from studio.configs import path_fields, to_flags

    method = str(form.get("method") or "")
    methods = ctx.studio.training_methods()
    if method not in methods:
        raise StudioError(f"Choose a training method ({', '.join(methods)}).")
    m = methods[method]
    preset = form.get(f"{method}{SEP}preset")
    values = method_values(ctx, method, form)
    words = m.cli_words(values, None if preset in (None, NO_PRESET) else str(preset), ctx.studio.settings.profile())
    kinds = path_fields(m.config_cls)
    for key in sorted(k for k in values if kinds.get(k, ("",))[0] in ("file", "folder")):
        words += ["--" + key.replace("_", "-"), key.upper() + ("_DIR" if kinds[key][0] == "folder" else "_FILE")]
    from studio.models import BaseSettings

    base = to_flags(BaseSettings, dataclasses.asdict(ctx.studio.settings))  # what differs from the CLI's defaults
    return shlex.join(["python", "-m", "studio", "train", m.entry.cli_name, *base, "--images", PHOTOS_DIR, *words])


def memory_estimate(ctx: UIContext, form: dict[str, Any]) -> str:
    """The memory the form's training needs on the loaded base, before it starts (:mod:`trainers.memory`,
    the same estimate as ``train … --dry-run``): parameters, optimizer state, activations, total, and which
    GPU sizes it fits."""
    from trainers.memory import estimate_text

    method = str(form.get("method") or "")
    methods = ctx.studio.training_methods()
    if method not in methods:
        raise StudioError(f"Choose a training method ({', '.join(methods)}).")
    m = methods[method]
    preset = form.get(f"{method}{SEP}preset")
    chosen = m.preset_name(ctx.studio.settings.profile()) if preset in (None, NO_PRESET) else str(preset)
    uploads = {f.name for f in method_forms(ctx)[method] if f.widget in ("file", "files")}
    values = {k: v for k, v in method_values(ctx, method, form).items() if k not in uploads}
    cfg = m.config_cls(**(m.preset_values(chosen) | values | {"images": ""}))
    n = len(ctx.uploaded(form.get("images"))) or None
    return estimate_text(m.entry, ctx.studio.base, cfg, n_images=n)


def dataset_form(form: dict[str, Any]) -> dict[str, Any]:
    """The dataset step's inputs, with the trigger and class word of the chosen method's form."""
    method = str(form.get("method") or "")
    return form | {"trigger": form.get(f"{method}{SEP}token") or "", "class_word": form.get(f"{method}{SEP}class_word")
                   or "", "resolution": form.get(f"{method}{SEP}resolution") or 512}


def parse_captions(text: str | None) -> dict[str, str]:
    """``"dog1.png: a dog on grass"`` per line → ``{"dog1.png": "a dog on grass"}``."""
    out = {}
    for n, line in enumerate(str(text or "").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, caption = line.partition(":")
        if not sep or not name.strip() or not caption.strip():
            raise StudioError(f"Caption line {n} ({line.strip()!r}) must read 'image file name: caption'.")
        out[name.strip()] = caption.strip()
    return out


PAINT_METHOD = "break-a-scene"  # the method whose form shows the mask painter


def painted_scene(editor: Any, concepts: str, folder: Path) -> tuple[Path, list[Path]] | None:
    """The mask painter's picture and masks, written to ``folder`` in the layout the trainer reads.

    ``editor`` is a ``gr.ImageEditor`` value (``{"background", "layers", "composite"}``, PIL images): the
    background is the picture; layer ``i``, painted in any colour, marks the ``i``-th concept of
    ``concepts`` (``"dog:dog,mug:cup"``, the trainer's ``--concepts``). Writes ``scene.png`` and
    ``scene.<concept>.png`` (white where the layer is painted, i.e. alpha > 0) and returns their paths;
    None when nothing was painted on (no picture). Raises a one-line error for a picture without layers,
    a layer count that is not the concept count, or an empty layer."""
    from PIL import Image

    from trainers.break_a_scene import parse_concepts

    if not isinstance(editor, dict) or editor.get("background") is None:
        return None
    names = [n for n, _ in parse_concepts(str(concepts or ""))]
    if not names:
        raise StudioError("Name the concepts first (Concepts: e.g. dog:dog,mug:cup): layer 1 is the first name.")
    layers = [lay for lay in (editor.get("layers") or []) if lay is not None]
    if len(layers) != len(names):
        raise StudioError(f"The painter has {len(layers)} layer(s) for {len(names)} concept(s) ({', '.join(names)}): "
                          "paint each concept on its own layer, in the order of Concepts.")
    picture = editor["background"]
    picture = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    picture = picture.convert("RGB")
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / "scene.png"
    picture.save(image_path)
    masks = []
    for i, (name, layer) in enumerate(zip(names, layers), 1):
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(layer)
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != picture.size:
            alpha = alpha.resize(picture.size, Image.Resampling.NEAREST)
        mask = alpha.point(lambda a: 255 if a > 0 else 0)
        if mask.getbbox() is None:
            raise StudioError(f"Layer {i} ({name}) is empty: paint the {name} on it.")
        path = folder / f"scene.{name}.png"
        mask.save(path)
        masks.append(path)
    return image_path, masks


def method_values(ctx: UIContext, method: str, form: dict[str, Any]) -> dict[str, Any]:
    """The chosen method's typed option values from the form (keys ``method::field``)."""
    fields = method_forms(ctx)[method]
    raw = {k.split(SEP, 1)[1]: v for k, v in form.items() if k.startswith(method + SEP)}
    return parse_form(fields, raw)


def start(ctx: UIContext, form: dict[str, Any]) -> tuple[int, str]:
    """Queue a training job from the form; returns ``(job id, status text)``."""
    method = str(form.get("method") or "")
    if method not in ctx.studio.training_methods():
        raise StudioError(f"Choose a training method ({', '.join(ctx.studio.training_methods())}).")
    images = ctx.uploaded(form.get("images"))
    paint = form.get("paint")
    painting = method == PAINT_METHOD and isinstance(paint, dict) and paint.get("background") is not None
    if not images and not painting:
        raise StudioError("Upload the training images first (3–20 photos of the subject work best)"
                          + (", or paint the concepts' masks on one picture." if method == PAINT_METHOD else "."))
    masks = ctx.uploaded(form.get("masks"))
    captions = parse_captions(form.get("captions"))
    if form.get("staged"):  # the dataset step prepared the photos: train on its folder and its edited table
        from studio.ui import dataset

        folder = dataset.stage(ctx, form)
        images, masks = dataset.staged_files(folder), []
        captions = captions | dataset.table_captions(form.get("caption_table"))
    preset = form.get(f"{method}{SEP}preset")
    # the upload widgets' files go apart from the typed values: submit_training refuses a path typed as a value
    uploads = {f.name for f in method_forms(ctx)[method] if f.widget in ("file", "files")}
    values = method_values(ctx, method, form)
    files = {k: ctx.uploaded(v) for k, v in values.items() if k in uploads}
    if method == PAINT_METHOD:  # masks painted on one picture: it is the training image, its layers the masks
        painted = painted_scene(form.get("paint"), str(values.get("concepts") or ""), ctx.new_folder("paint"))
        if painted is not None:
            if images or files.get("masks"):
                raise StudioError("Either paint the masks on one picture or upload images and masks, not both: "
                                  "clear the painter or the uploads.")
            images, files["masks"] = [str(painted[0])], [str(m) for m in painted[1]]
    job = ctx.studio.submit_training(method, {k: v for k, v in values.items() if k not in uploads}, images,
                                     masks=masks, captions=captions,
                                     preset=None if preset in (None, NO_PRESET) else preset, files=files)
    return job.id, f"Queued job {job.id}: concept **{job.name}**, trigger `{job.token}`, {job.total} steps."


def job_status(ctx: UIContext, job_id: int | None) -> dict[str, Any]:
    """What the progress panel shows for one job: text, loss curve, latest preview, log, and whether
    it is still going (the poll timer stops once it is not)."""
    if not job_id:
        return {"text": "No job yet: start one above.", "curve": [], "preview": None, "log": "", "active": False}
    queue = ctx.studio.jobs
    job = queue.get(int(job_id))
    parts = [f"**Job {job.id}** · {job.trainer} · concept **{job.name}** `{job.token}` · **{job.state}**"
             + (f" ({job.request} requested)" if job.request else ""),
             f"step {job.step}/{job.total}" + (f" · loss {job.loss:.4f}" if job.loss is not None else "")
             + (f" · ETA {_duration(job.eta)}" if job.eta is not None and job.state == "running" else "")]
    if job.state == "queued":
        parts.append("waiting for the worker" + (" (press 'Train on the GPU')" if ctx.runners.train_chunk else ""))
    if job.error:
        parts.append(f"**Error:** {job.error}")
    if job.state == "done" and job.trainer == PAINT_METHOD:
        parts.append(f"Saved to the library as **{job.name}-…**, one file per concept: use each concept's "
                     "`<name>` in a prompt on the Generate tab, alone or together.")
    elif job.state == "done":
        parts.append(f"Saved to the library as **{job.name}**: use `{job.token}` in a prompt on the Generate tab.")
    events = queue.events(job.id, kinds=["state", "log", "checkpoint"])
    log = "\n".join(time.strftime("%H:%M:%S ", time.localtime(e.time)) + e.text() for e in events[-LOG_LINES:])
    return {"text": "  \n".join(parts), "curve": queue.loss_curve(job.id), "preview": job.preview, "log": log,
            "active": not job.terminal and job.state != "paused", "state": job.state}


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def control(ctx: UIContext, action: str, job_id: int | None) -> str:
    """Pause, resume or cancel a job (see :class:`~studio.jobs.JobQueue`)."""
    if not job_id:
        raise StudioError("No job selected.")
    queue = ctx.studio.jobs
    job = {"pause": queue.pause, "resume": queue.resume, "cancel": queue.cancel}[action](int(job_id))
    return f"Job {job.id}: {job.state}" + (f" ({job.request} requested)" if job.request else "")


def train_on_gpu(ctx: UIContext, form: dict[str, Any]) -> str:
    """ZeroGPU: run queued jobs for a chunk of GPU time (they checkpoint and continue next time)."""
    if ctx.runners.train_chunk is None:
        raise StudioError("Jobs run in the background worker here.")
    return ctx.runners.train_chunk(float(form.get("seconds") or 120))


# -- gradio glue ----------------------------------------------------------------------------------
def _panel(ctx: UIContext, job_id: Any) -> list[Any]:
    import gradio as gr
    import pandas as pd
    from PIL import Image

    s = job_status(ctx, job_id)
    preview = None
    if s["preview"]:
        try:
            with Image.open(s["preview"]) as im:
                preview = im.convert("RGB")
        except OSError:
            preview = None
    curve = pd.DataFrame(s["curve"], columns=["step", "loss"])
    return [s["text"], curve, preview if preview is not None else gr.skip(), s["log"], gr.Timer(active=s["active"])]


def _build_dataset_step(c: dict[str, Any]) -> dict[str, Any]:
    """The "Prepare the photos" accordion (:mod:`studio.ui.dataset`); its inputs join ``c``."""
    import gradio as gr

    from studio.ui import dataset

    d: dict[str, Any] = {}
    with gr.Accordion("Prepare the photos (optional): inspect, captions, masks, crops", open=False,
                      elem_id="train-dataset"):
        c["staged"] = gr.State("")
        with gr.Row():
            d["inspect"] = gr.Button("Inspect", elem_id="train-inspect")
            d["report"] = gr.Markdown("", elem_id="train-inspect-report")
        d["sheet"] = gr.Image(label="Contact sheet", type="pil", interactive=False, visible=True, height=240,
                              elem_id="train-sheet")
        with gr.Row():
            c["caption_kind"] = gr.Dropdown(choices=list(dataset.CAPTION_KINDS), value="blip", label="Captions",
                                            scale=1)
            c["caption_model"] = gr.Textbox(label="Captioning model (empty: the kind's default)", scale=3,
                                            placeholder="Salesforce/blip-image-captioning-base")
            d["caption"] = gr.Button("Caption the photos", scale=1, elem_id="train-caption")
        c["caption_table"] = gr.Dataframe(headers=["image", "caption"], column_count=2, static_columns=[0], interactive=True,
                                          label="Captions: edit any cell, then train", elem_id="train-caption-table")
        with gr.Row():
            c["mask_model"] = gr.Textbox(label="Segmenter", value=dataset.GRABCUT, scale=2,
                                         info="grabcut (offline, plain backgrounds) or a CLIPSeg hub id")
            c["mask_prompt"] = gr.Textbox(label="What to keep (CLIPSeg)", placeholder="the dog", scale=2)
            d["mask"] = gr.Button("Make masks", scale=1, elem_id="train-mask")
        d["masks"] = gr.Gallery(label="Masks (white = subject)", columns=8, height="auto", elem_id="train-masks",
                                object_fit="contain")
        with gr.Row():
            c["crop_size"] = gr.Number(label="Crop size (px)", value=512, precision=0, minimum=64, scale=1)
            d["crop"] = gr.Button("Crop to the subject", scale=1, elem_id="train-crop")
        d["note"] = gr.Markdown("", elem_id="train-dataset-note")
    return d


def _wire_dataset_step(ctx: UIContext, c: dict[str, Any], d: dict[str, Any]) -> None:
    from studio.ui import dataset

    keys = [k for k in c if k not in ("caption_table", "paint")]
    inputs = {k: c[k] for k in keys}
    on(d["inspect"].click, ctx, lambda ctx_, form: list(dataset.inspect(ctx_, dataset_form(form))), inputs,
       [d["report"], d["sheet"], c["staged"]])
    on(d["caption"].click, ctx, lambda ctx_, form: list(dataset.caption(ctx_, dataset_form(form))), inputs,
       [c["caption_table"], d["note"], c["staged"]])
    on(d["mask"].click, ctx, lambda ctx_, form: list(dataset.masks(ctx_, dataset_form(form))), inputs,
       [d["masks"], d["note"], c["staged"]])
    on(d["crop"].click, ctx, lambda ctx_, form: list(dataset.crop(ctx_, dataset_form(form))), inputs,
       [d["note"], c["staged"]])
    # new uploads: start over (the staging folder no longer holds these photos)
    c["images"].change(lambda: ["", None], None, [c["staged"], c["caption_table"]])


def build(tab: Any, ctx: UIContext) -> dict[str, Any]:
    import gradio as gr
    import pandas as pd

    methods = ctx.studio.training_methods()
    forms = method_forms(ctx)
    first = "textual-inversion" if "textual-inversion" in methods else next(iter(methods))
    c: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    field_comps: dict[str, dict[str, Any]] = {}
    with tab:
        gr.Markdown("### 1 · Photos of your subject")
        with gr.Row():
            c["images"] = gr.File(label="Training images (+ optional name.txt captions, name.mask.png masks)",
                                  file_count="multiple", file_types=["image", ".txt"], elem_id="train-images")
            c["masks"] = gr.File(label="Masks (optional; white = subject, named like their image)",
                                 file_count="multiple", file_types=["image"])
            c["captions"] = gr.Textbox(label="Captions (optional)", lines=4, placeholder="dog1.png: a dog on the grass",
                                       info="one 'image file name: caption' per line")
        dataset_step = _build_dataset_step(c)
        gr.Markdown("### 2 · Method")
        c["method"] = gr.Dropdown(choices=list(methods), value=first, label="Method", elem_id="train-method")
        gives = gr.Markdown(method_summary(ctx, first), elem_id="train-gives")
        gr.Markdown("### 3 · Options")
        for name in methods:
            with gr.Group(visible=name == first) as groups[name]:
                choices = preset_choices(ctx, name)
                preset = default_preset(ctx, name)
                c[f"{name}{SEP}preset"] = gr.Dropdown(choices=choices, value=preset, label="Preset",
                                                      elem_id=f"train-{name}-preset")
                comps = build_form(forms[name], preset_values(ctx, name, preset), prefix=f"train-{name}",
                                   basic=BASIC, open_groups=())
                field_comps[name] = comps
                for field, comp in comps.items():
                    c[f"{name}{SEP}{field}"] = comp
        with gr.Accordion("Paint the concepts on one picture (Break-A-Scene)", open=True,
                          visible=first == PAINT_METHOD, elem_id="train-paint-box") as paint_box:
            gr.Markdown("Load the picture, then paint each concept on its **own layer**, in the order of "
                        "*Concepts* above (layer 1 = the first name). Or upload images and masks named "
                        "`<image-stem>.<concept>.png` instead.")
            c["paint"] = gr.ImageEditor(type="pil", label="Picture and concept layers", image_mode="RGBA",
                                        layers=gr.LayerOptions(allow_additional_layers=True,
                                                               layers=["concept 1", "concept 2"]),
                                        brush=gr.Brush(colors=["#ff3030", "#30a0ff", "#30d050", "#ffd030"]),
                                        elem_id="train-paint")
        with gr.Row():
            go = gr.Button("Start training", variant="primary", elem_id="train-start")
            cli_go = gr.Button("Copy CLI command", elem_id="train-cli-go")
            memory_go = gr.Button("Memory estimate", elem_id="train-memory-go")
            if ctx.runners.train_chunk is not None:
                seconds = gr.Slider(30, 280, value=120, step=10, label="GPU seconds per chunk")
                chunk = gr.Button("Train on the GPU", elem_id="train-gpu")
        memory = gr.Markdown("", elem_id="train-memory")
        cli = gr.Code(label="The same training from the command line (PHOTOS_DIR: your photos' folder)",
                      language="shell", interactive=False, visible=False, elem_id="train-cli")
        with gr.Group():
            job_id = gr.Number(label="Job", value=None, precision=0, elem_id="train-job")
            status = gr.Markdown("No job yet: start one above.", elem_id="train-status")
            with gr.Row():
                curve = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", title="Loss",
                                    height=240, elem_id="train-loss")
                preview = gr.Image(label="Latest preview", type="pil", height=240, interactive=False,
                                   elem_id="train-preview")
            with gr.Row():
                pause, resume, cancel = gr.Button("Pause"), gr.Button("Resume"), gr.Button("Cancel", variant="stop")
            log = gr.Textbox(label="Log", lines=6, max_lines=12, elem_id="train-log")
        timer = gr.Timer(1.0, active=False)

    def show_method(form: dict[str, Any]) -> list[Any]:
        return [*(gr.update(visible=n == form["method"]) for n in methods),
                gr.update(visible=form["method"] == PAINT_METHOD)]

    _wire_dataset_step(ctx, c, dataset_step)
    on(c["method"].change, ctx, lambda ctx_, form: [*show_method(form), method_summary(ctx_, form["method"])],
       {"method": c["method"]}, [*groups.values(), paint_box, gives])
    on(cli_go.click, ctx, lambda ctx_, form: gr.update(value=cli_command(ctx_, form), visible=True), c, cli)
    on(memory_go.click, ctx, memory_estimate, c, memory)
    for name in methods:
        comps = field_comps[name]
        # .input (a user's choice), not .change: a change event at page load would re-apply the preset
        # over fields the user is already editing
        on(c[f"{name}{SEP}preset"].input, ctx,
           lambda ctx_, form, name=name, comps=comps: update_values(
               forms[name], preset_values(ctx_, name, form["preset"]), list(comps)),
           {"preset": c[f"{name}{SEP}preset"]}, list(comps.values()))
    panel = [status, curve, preview, log, timer]

    def started(ctx_: UIContext, form: dict[str, Any]) -> list[Any]:
        jid, _ = start(ctx_, form)
        return [jid, *_panel(ctx_, jid)]

    on(go.click, ctx, started, c, [job_id, *panel])
    on(timer.tick, ctx, lambda ctx_, form: _panel(ctx_, form["job"]), {"job": job_id}, panel)
    on(job_id.change, ctx, lambda ctx_, form: _panel(ctx_, form["job"]), {"job": job_id}, panel)
    for button, action in ((pause, "pause"), (resume, "resume"), (cancel, "cancel")):
        on(button.click, ctx, lambda ctx_, form, action=action: (control(ctx_, action, form["job"]),
                                                                 *_panel(ctx_, form["job"]))[1:],
           {"job": job_id}, panel)
    if ctx.runners.train_chunk is not None:
        on(chunk.click, ctx, lambda ctx_, form: [train_on_gpu(ctx_, form), *_panel(ctx_, form["job"])[1:]],
           {"seconds": seconds, "job": job_id}, panel)
    return c
