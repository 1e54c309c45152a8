"""The Evaluate tab: concepts + a protocol → report table, contact sheet, fidelity/editability plot;
a strength sweep → the front and the recommended strength (stored in the concept) (:mod:`studio.evaluation`).
The form's defaults and choices are :class:`~studio.evaluation.EvaluateConfig`'s (:func:`defaults`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.ui.common import GPU_QUEUE, UIContext, on

CUSTOM = "prompts below"
REPORT_COLUMNS = ["metric", "mean", "std", "images", "backbone"]
SWEEP_COLUMNS = ["strength", "fidelity", "editability", "on front"]


# -- handlers -------------------------------------------------------------------------------------
BASE_DEFAULT = "the base's"  # a protocol / judge choice: EvaluateConfig's None, decided by the loaded base's profile
EXAMPLE_PROMPTS = "a photo of {}\n{} in the snow"  # the prompts box's text (used with CUSTOM only)


def _choices(name: str) -> tuple[str, ...]:
    from studio.configs import field_specs
    from studio.evaluation import EvaluateConfig

    return next(s.choices for s in field_specs(EvaluateConfig) if s.name == name) or ()


def protocols() -> list[str]:
    """The base's protocol (:class:`~studio.evaluation.EvaluateConfig`'s default), its choices, and own prompts."""
    return [BASE_DEFAULT, *_choices("protocol"), CUSTOM]


def scorers(ctx: UIContext) -> list[str]:
    """The base's judge (the default), then :class:`~studio.evaluation.EvaluateConfig`'s choices (``oracle``
    only where the demo world's oracle is built)."""
    world = ctx.studio.capabilities().get("demo_world")
    return [BASE_DEFAULT, *(c for c in _choices("scorer") if c != "oracle" or world)]


def defaults() -> dict[str, Any]:
    """The widgets' values on an untouched form: :class:`~studio.evaluation.EvaluateConfig`'s defaults
    (``None`` shown as :data:`BASE_DEFAULT`, ``0`` or an empty box); :func:`form_config` maps them back."""
    from studio.evaluation import EvaluateConfig

    cfg = EvaluateConfig()
    return {"protocol": cfg.protocol or BASE_DEFAULT, "scorer": cfg.scorer or BASE_DEFAULT,
            "clip_model": cfg.clip_model, "prompts": EXAMPLE_PROMPTS, "seeds": cfg.seeds or 0, "seed": cfg.seed,
            "steps": cfg.steps or 0, "guidance": "" if cfg.guidance is None else f"{cfg.guidance:g}"}


def form_config(form: dict[str, Any]) -> Any:
    """The form → an :class:`~studio.evaluation.EvaluateConfig` (the fields the tab does not show keep
    their defaults; an untouched form gives ``EvaluateConfig()``)."""
    from studio.evaluation import EvaluateConfig

    values: dict[str, Any] = {"seeds": int(form.get("seeds") or 0) or None, "seed": int(form.get("seed") or 0),
                              "steps": int(form.get("steps") or 0) or None}
    scorer = str(form.get("scorer") or BASE_DEFAULT)
    values["scorer"] = None if scorer == BASE_DEFAULT else scorer
    clip_model = str(form.get("clip_model") or "").strip()
    if clip_model:
        values["clip_model"] = clip_model
    guidance = str(form.get("guidance") if form.get("guidance") is not None else "").strip()
    if guidance:
        try:
            values["guidance"] = float(guidance)
        except ValueError:
            raise StudioError(f"Guidance must be a number, got {guidance!r}.") from None
    protocol = str(form.get("protocol") or BASE_DEFAULT)
    if protocol == CUSTOM:
        prompts = [p.strip() for p in str(form.get("prompts") or "").splitlines() if p.strip()]
        if not prompts:
            raise StudioError("Write the prompts to evaluate, one per line, with {} where the concept goes.")
        values["prompts"] = prompts
    elif protocol != BASE_DEFAULT:
        values["protocol"] = protocol
    return EvaluateConfig(**values)


def options(ctx: UIContext, form: dict[str, Any], out_dir: Path, references: Path | None) -> dict[str, Any]:
    """The form → keyword options of :meth:`~studio.service.Studio.evaluate` / ``sweep``: the settings that
    differ from :class:`~studio.evaluation.EvaluateConfig`'s defaults, the output folder and the photos.
    A model the form names (the CLIP judge) is a hub id or a path under the operator's allowed folders."""
    import dataclasses

    from studio.configs import path_fields
    from studio.evaluation import EvaluateConfig

    cfg, default = form_config(form), EvaluateConfig()
    opts = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(default, f.name)}
    for name, (kind, names) in path_fields(EvaluateConfig).items():
        value = opts.get(name)
        if kind == "model" and isinstance(value, str) and value:
            opts[name] = ctx.studio.check_request_model(value, label=name.replace("_", " "), names=names)
        elif kind in ("file", "folder") and isinstance(value, str) and value:  # the form's prompts are a list
            raise StudioError(f"{name} is not read from a server file here.")
    opts["out_dir"] = str(out_dir)
    if references is not None:
        opts["references"] = str(references)
    return opts


def _references(ctx: UIContext, form: dict[str, Any]) -> Path | None:
    files = ctx.uploaded(form.get("references"))
    return ctx.studio.stage_training_images(files, min_images=1) if files else None


def evaluate(ctx: UIContext, form: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the chosen concepts: table rows, contact sheet, plot, summary, report file."""
    names = [ctx.studio.check_request_concept(n) for n in form.get("concepts") or []]
    if not names:
        raise StudioError("Choose at least one concept to evaluate.")
    folder = ctx.new_folder("eval")
    refs = _references(ctx, form)
    try:
        report = ctx.runners.evaluate(names, options(ctx, form, folder, refs))
    finally:
        if refs is not None:
            shutil.rmtree(refs, ignore_errors=True)
    rows = [[k, round(v.mean, 4), round(v.std, 4), v.count, v.backbone] for k, v in report.summaries.items()]
    timing = report.settings.get("timing", {})
    prompts = report.settings.get("prompts")
    text = (f"Evaluated **{', '.join(names)}** on {len(prompts) if isinstance(prompts, list) else prompts} prompt(s) × "
            f"{report.settings.get('seeds')} seed(s) ({report.settings.get('protocol')}); the scores are stored in the "
            f"concept. Generation {timing.get('generation_s', 0):.1f} s, scoring {timing.get('scoring_s', 0):.1f} s.")
    return {"rows": rows, "sheet": _existing(folder / "contact_sheet.png"), "plot": _existing(folder / "scatter.png"),
            "text": text, "report": _existing(folder / "report.json")}


def sweep(ctx: UIContext, form: dict[str, Any]) -> dict[str, Any]:
    """Sweep one concept's strength: the points, the plot and the recommended strength (stored in the concept)."""
    names = [ctx.studio.check_request_concept(n) for n in form.get("concepts") or []]
    if len(names) != 1:
        raise StudioError("A strength sweep scores one concept: choose exactly one.")
    try:
        strengths = [float(s) for s in str(form.get("strengths") or "").split(",") if s.strip()]
    except ValueError:
        raise StudioError(f"Strengths are numbers separated by commas, e.g. 0.25, 0.5, 1; got {form.get('strengths')!r}.") \
            from None
    folder = ctx.new_folder("sweep")
    refs = _references(ctx, form)
    try:
        result = ctx.runners.sweep(names[0], strengths, options(ctx, form, folder, refs))
    finally:
        if refs is not None:
            shutil.rmtree(refs, ignore_errors=True)
    front = {result.points[i].value for i in result.choice.front}
    rows = [[p.value, round(p.fidelity, 4), round(p.editability, 4), p.value in front] for p in result.points]
    text = (f"Recommended strength for **{names[0]}**: **{result.choice.value:g}** ({result.choice.rule}; "
            f"{result.fidelity} × {result.editability}). Stored in the concept: the Generate tab's slider now starts there.")
    return {"rows": rows, "plot": _existing(folder / "sweep.png"), "text": text,
            "report": _existing(folder / "sweep.json")}


def _existing(path: Path) -> str | None:
    return str(path) if path.is_file() else None


# -- layout ---------------------------------------------------------------------------------------
def build(tab: Any, ctx: UIContext) -> dict[str, Any]:
    import gradio as gr

    c: dict[str, Any] = {}
    with tab:
        start = defaults()
        names = ctx.studio.library.usable_names()  # broken files are listed on the Concepts tab
        with gr.Row():
            with gr.Column(scale=4):
                c["concepts"] = gr.Dropdown(choices=names, value=[], multiselect=True, label="Concepts",
                                            elem_id="eval-concepts")
                with gr.Row():
                    c["protocol"] = gr.Dropdown(choices=protocols(), value=start["protocol"], label="Protocol",
                                                elem_id="eval-protocol")
                    c["scorer"] = gr.Dropdown(choices=scorers(ctx), value=start["scorer"], label="Judge")
                    c["clip_model"] = gr.Textbox(label="CLIP model (hub id, or a folder the operator allowed)", value=start["clip_model"],
                                                 elem_id="eval-clip")
                c["prompts"] = gr.Textbox(label="Prompts (with 'prompts below'; {} = the concept)", lines=3,
                                          value=start["prompts"], elem_id="eval-prompts")
                with gr.Row():
                    c["seeds"] = gr.Number(label="Images per prompt (0 = the protocol's)", value=start["seeds"],
                                           precision=0, minimum=0, elem_id="eval-seeds")
                    c["seed"] = gr.Number(label="First seed", value=start["seed"], precision=0, minimum=0)
                    c["steps"] = gr.Number(label="Steps (0 = the base's)", value=start["steps"], precision=0,
                                           minimum=0, elem_id="eval-steps")
                    c["guidance"] = gr.Textbox(label="Guidance", value=start["guidance"], placeholder="the base's")
                c["references"] = gr.File(label="Reference photos (optional: else the embeddings stored in the concept)",
                                          file_count="multiple", file_types=["image"], elem_id="eval-refs")
                with gr.Row():
                    go = gr.Button("Evaluate", variant="primary", elem_id="eval-go")
                    c["strengths"] = gr.Textbox(label="Sweep strengths", value="0.25, 0.5, 0.75, 1, 1.25")
                    sweep_go = gr.Button("Strength sweep", elem_id="sweep-go")
            with gr.Column(scale=5):
                text = gr.Markdown("", elem_id="eval-text")
                table = gr.Dataframe(headers=REPORT_COLUMNS, interactive=False, elem_id="eval-table")
                with gr.Row():
                    sheet = gr.Image(label="Contact sheet", type="filepath", interactive=False)
                    plot = gr.Image(label="Fidelity / editability", type="filepath", interactive=False,
                                    elem_id="eval-plot")
                report = gr.File(label="Report (JSON)")

    def show(result: dict[str, Any], columns: list[str]) -> list[Any]:
        return [result["text"], gr.update(value=result["rows"], headers=columns),
                result.get("sheet") or gr.skip(), result["plot"], result["report"]]

    inputs = dict(c)
    outputs = [text, table, sheet, plot, report]
    on(go.click, ctx, lambda ctx_, form: show(evaluate(ctx_, form), REPORT_COLUMNS), inputs, outputs,
       concurrency_id=GPU_QUEUE, concurrency_limit=1)
    on(sweep_go.click, ctx, lambda ctx_, form: show(sweep(ctx_, form), SWEEP_COLUMNS), inputs, outputs,
       concurrency_id=GPU_QUEUE, concurrency_limit=1)
    on(tab.select, ctx, lambda ctx_, form: gr.update(choices=ctx_.studio.library.usable_names()),
       {}, c["concepts"])
    return c
