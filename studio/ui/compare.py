"""The Compare tab: two concepts — or one concept at several strengths —, optionally beside the base
alone, rendered with the same prompts and seeds, side by side, with each column's scores
(:mod:`studio.compare`). Nothing is written into the concepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.ui.common import GPU_QUEUE, UIContext, on

TWO = "two concepts"
STRENGTHS = "one concept at several strengths"
MODES = (TWO, STRENGTHS)
DEFAULT_STRENGTHS = "0, 0.5, 1"
DEFAULT_SEEDS = 2  # images per prompt: a quick look (the evaluation's protocols use 4)
TABLE_COLUMNS = ["arm", "concepts", "fidelity", "editability"]


# -- handlers (plain functions: tested without gradio) --------------------------------------------
def concept_choices(ctx: UIContext) -> list[str]:
    """The library's usable concepts (a broken file is not offered)."""
    return ctx.studio.library.usable_names()


def build_arms(ctx: UIContext, form: dict[str, Any]) -> list[Any]:
    """The form → the columns (:class:`~studio.compare.Arm`): concept A and B, or A at each of the
    strengths, after the base alone when ``baseline`` is ticked. Concepts are library names only."""
    from studio.compare import arms_for_concepts, arms_for_strengths

    mode = str(form.get("mode") or TWO)
    if mode not in MODES:
        raise StudioError(f"Unknown comparison {mode!r}; choose {TWO!r} or {STRENGTHS!r}.")
    a = str(form.get("concept_a") or "").strip()
    if not a:
        raise StudioError("Choose concept A.")
    a = ctx.studio.check_request_concept(a)
    baseline = bool(form.get("baseline"))
    if mode == STRENGTHS:
        return arms_for_strengths(a, str(form.get("strengths") or ""), baseline=baseline)
    b = str(form.get("concept_b") or "").strip()
    if not b:
        raise StudioError("Choose concept B (or compare one concept at several strengths).")
    b = ctx.studio.check_request_concept(b)
    if a == b:
        raise StudioError(f"A and B are both {a}: choose two different concepts, or compare one at several "
                          "strengths.")
    return arms_for_concepts([a, b], baseline=baseline)


def options(form: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The form → keyword options of :meth:`~studio.service.Studio.compare` (:class:`~studio.evaluation.EvaluateConfig`
    fields): the prompts (one template per line with ``{}``; none: the base's protocol), images per prompt,
    sampler steps (0: the base's) and the output folder."""
    from studio.evaluation import EvaluateConfig

    prompts = [p.strip() for p in str(form.get("prompts") or "").splitlines() if p.strip()]
    try:
        seeds = int(form.get("seeds") or 0) or DEFAULT_SEEDS
        steps = int(form.get("steps") or 0) or None
    except (TypeError, ValueError):
        raise StudioError("Seeds and steps are whole numbers.") from None
    for p in prompts:
        if "{}" not in p:
            raise StudioError(f"Prompt {p!r} has no {{}}: write {{}} where each column's concept goes.")
    values: dict[str, Any] = {"seeds": seeds, "out_dir": str(out_dir)}
    if prompts:
        values["prompts"] = prompts
    if steps is not None:
        values["steps"] = steps
    EvaluateConfig().with_options(**values)  # checked before anything runs
    return values


def run_compare(ctx: UIContext, form: dict[str, Any]) -> dict[str, Any]:
    """Run the comparison: ``{"image": compare.png, "rows", "columns", "text", "report": compare.json}``."""
    arms = build_arms(ctx, form)
    folder = ctx.new_folder("compare")
    opts = options(form, folder)
    runner = ctx.runners.compare or (lambda arms_, options_: ctx.studio.compare(arms_, **options_))
    result = runner(arms, opts)
    paths = result.paths or result.save(folder)
    s = result.settings
    notes = "".join(f"\n\nⓘ {n}" for n in result.notes)
    text = (f"**{len(result.arms)} columns** × {len(result.templates)} prompt(s) × {len(result.seeds)} seed(s) "
            f"({s.get('protocol')}, {s.get('steps')} steps, judge {s.get('scorer')}); every column drew the same "
            f"seeds {result.seeds[0]}…{result.seeds[-1]}. Scores are means over each column's images; nothing was "
            f"written into the concepts.{notes}")
    return {"image": str(paths["image"]), "rows": result.table(), "columns": result.columns(), "text": text,
            "report": str(paths["json"])}


# -- layout ---------------------------------------------------------------------------------------
def build(tab: Any, ctx: UIContext) -> dict[str, Any]:
    import gradio as gr

    c: dict[str, Any] = {}
    with tab:
        names = concept_choices(ctx)
        with gr.Row():
            with gr.Column(scale=4):
                c["mode"] = gr.Radio(choices=list(MODES), value=TWO, label="Compare", elem_id="compare-mode")
                with gr.Row():
                    c["concept_a"] = gr.Dropdown(choices=names, value=names[0] if names else None, label="Concept A",
                                                 elem_id="compare-a")
                    c["concept_b"] = gr.Dropdown(choices=names, value=names[1] if len(names) > 1 else None,
                                                 label="Concept B", elem_id="compare-b")
                c["strengths"] = gr.Textbox(label="Strengths of A (one concept at several strengths)",
                                            value=DEFAULT_STRENGTHS, elem_id="compare-strengths")
                c["baseline"] = gr.Checkbox(label="Add a column with the base alone", value=True,
                                            elem_id="compare-baseline")
                c["prompts"] = gr.Textbox(label="Prompts, one per line, {} = each column's concept (empty: the "
                                          "base's protocol)", lines=3, value="", elem_id="compare-prompts")
                with gr.Row():
                    c["seeds"] = gr.Number(label="Seeds (images per prompt)", value=DEFAULT_SEEDS, precision=0,
                                           minimum=1, maximum=64, elem_id="compare-seeds")
                    c["steps"] = gr.Number(label="Steps (0 = the base's)", value=0, precision=0, minimum=0,
                                           elem_id="compare-steps")
                go = gr.Button("Compare", variant="primary", elem_id="compare-go")
            with gr.Column(scale=6):
                text = gr.Markdown("", elem_id="compare-text")
                table = gr.Dataframe(headers=TABLE_COLUMNS, interactive=False, elem_id="compare-table")
                image = gr.Image(label="Side by side (columns: arms; rows: prompt × seed)", type="filepath",
                                 interactive=False, elem_id="compare-image", elem_classes=["studio-pixelated"])
                report = gr.File(label="Scores (compare.json)", elem_id="compare-report")

    def show(ctx_: UIContext, form: dict[str, Any]) -> list[Any]:
        result = run_compare(ctx_, form)
        return [result["text"], gr.update(value=result["rows"], headers=result["columns"]), result["image"],
                result["report"]]

    on(go.click, ctx, show, dict(c), [text, table, image, report], concurrency_id=GPU_QUEUE, concurrency_limit=1)

    def refresh(ctx_: UIContext, form: dict[str, Any]) -> list[Any]:
        choices = concept_choices(ctx_)
        return [gr.update(choices=choices), gr.update(choices=choices)]

    on(tab.select, ctx, refresh, {}, [c["concept_a"], c["concept_b"]])
    return c
