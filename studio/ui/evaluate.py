"""The Evaluate tab: concepts + a protocol → report table, contact sheet, fidelity/editability plot;
a strength sweep → the front and the recommended strength (stored in the concept)
(:mod:`studio.evaluation`; a note when this install does not have it)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.ui.common import GPU_QUEUE, UIContext, note, on, upload_paths

CUSTOM = "prompts below"
REPORT_COLUMNS = ["metric", "mean", "std", "images", "backbone"]
SWEEP_COLUMNS = ["strength", "fidelity", "editability", "on front"]


# -- handlers -------------------------------------------------------------------------------------
def protocols() -> list[str]:
    from studio.evaluation import PROTOCOLS

    return [*PROTOCOLS, CUSTOM]


def scorers(ctx: UIContext) -> list[str]:
    """``oracle`` (the demo world's judge) when the demo base is loaded and its world is built; ``clip`` always."""
    demo = getattr(ctx.studio.settings, "base", "") == "demo" and ctx.studio.capabilities().get("demo_world")
    return ["oracle", "clip"] if demo else ["clip"]


def options(ctx: UIContext, form: dict[str, Any], out_dir: Path, references: Path | None) -> dict[str, Any]:
    """The form → keyword options of :func:`studio.evaluation.evaluate_concepts`."""
    opts: dict[str, Any] = {"seeds": int(form.get("seeds") or 1), "seed": int(form.get("seed") or 0),
                            "scorer": str(form.get("scorer") or "clip"), "out_dir": str(out_dir)}
    if opts["scorer"] == "clip" and str(form.get("clip_model") or "").strip():
        opts["clip_model"] = str(form["clip_model"]).strip()
    if form.get("steps"):
        opts["steps"] = int(form["steps"])
    guidance = str(form.get("guidance") if form.get("guidance") is not None else "").strip()
    if guidance:
        try:
            opts["guidance"] = float(guidance)
        except ValueError:
            raise StudioError(f"Guidance must be a number, got {guidance!r}.") from None
    protocol = str(form.get("protocol") or "")
    if protocol == CUSTOM:
        prompts = [p.strip() for p in str(form.get("prompts") or "").splitlines() if p.strip()]
        if not prompts:
            raise StudioError("Write the prompts to evaluate, one per line, with {} where the concept goes.")
        opts["prompts"] = prompts
    elif protocol:
        opts["protocol"] = protocol
    if references is not None:
        opts["references"] = str(references)
    return opts


def _references(ctx: UIContext, form: dict[str, Any]) -> Path | None:
    files = upload_paths(form.get("references"))
    return ctx.studio.stage_training_images(files, min_images=1) if files else None


def evaluate(ctx: UIContext, form: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the chosen concepts: table rows, contact sheet, plot, summary, report file."""
    names = list(form.get("concepts") or [])
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
    names = list(form.get("concepts") or [])
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

    caps = ctx.studio.capabilities()
    c: dict[str, Any] = {}
    with tab:
        if not caps.get("evaluation"):
            gr.Markdown(note("Evaluation (CLIP-T / CLIP-I / DINO scores, strength sweeps) is not part of this install "
                             "yet."))
            return c
        from studio.metrics.scorers import DEFAULT_CLIP

        names = ctx.studio.library.names()
        score_choices = scorers(ctx)
        with gr.Row():
            with gr.Column(scale=4):
                c["concepts"] = gr.Dropdown(choices=names, value=[], multiselect=True, label="Concepts",
                                            elem_id="eval-concepts")
                with gr.Row():
                    c["protocol"] = gr.Dropdown(choices=protocols(), value="world" if score_choices[0] == "oracle"
                                                else "dreambench", label="Protocol", elem_id="eval-protocol")
                    c["scorer"] = gr.Dropdown(choices=score_choices, value=score_choices[0], label="Judge")
                    c["clip_model"] = gr.Textbox(label="CLIP model (hub id or folder)", value=DEFAULT_CLIP,
                                                 elem_id="eval-clip")
                c["prompts"] = gr.Textbox(label="Prompts (with 'prompts below'; {} = the concept)", lines=3,
                                          value="a photo of {}\n{} in the snow", elem_id="eval-prompts")
                with gr.Row():
                    c["seeds"] = gr.Number(label="Images per prompt", value=2, precision=0, minimum=1,
                                           elem_id="eval-seeds")
                    c["seed"] = gr.Number(label="First seed", value=0, precision=0, minimum=0)
                    c["steps"] = gr.Number(label="Steps (0 = the protocol's)", value=0, precision=0, minimum=0,
                                           elem_id="eval-steps")
                    c["guidance"] = gr.Textbox(label="Guidance", value="", placeholder="default")
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
    on(tab.select, ctx, lambda ctx_, form: gr.update(choices=ctx_.studio.library.names()),
       {}, c["concepts"])
    return c
