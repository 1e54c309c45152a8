"""The Generate tab: prompt with trigger tokens, sampling settings, concepts with strength sliders,
a gallery of PNG files that keep their parameters, and X/Y grids (:mod:`studio.grid`)."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from typing import Any

from studio.configs import field_specs
from studio.generation import SCHEDULERS, ConceptUse, GenerateConfig
from studio.grid import AXIS_KINDS, parse_axis, xy_grid
from studio.ui.common import GPU_QUEUE, UIContext, image_name, on, save_png
from studio.ui.forms import FormField, form_fields, make_widget, parse_form

SLOTS = 6  # concepts with their own strength slider (more can still be given strengths in the prompt)
MAX_SEED = 2**31 - 1
# GenerateConfig's "DECOR" group (decor_words, decor_strength), shown in the DECOR accordion.
DECOR_FIELDS: list[FormField] = [f for f in form_fields(field_specs(GenerateConfig)) if f.group == "DECOR"]


# -- handlers (plain functions: tested without gradio) --------------------------------------------
def concept_choices(ctx: UIContext) -> list[str]:
    """The library's usable concepts: a broken file is not offered (the Concepts tab lists it with its reason)."""
    return ctx.studio.library.usable_names()


def concept_defaults(ctx: UIContext, names: list[str]) -> list[dict[str, Any]]:
    """Per selected concept: name, trigger and the default strength (its recommended strength, else 1)."""
    rows = []
    for name in names or []:
        info = ctx.studio.library.info(name)
        rows.append({"name": name, "trigger": " ".join(info.tokens), "method": info.method,
                     "strength": info.strength if info.strength is not None else 1.0, "error": info.error})
    return rows


def sampling_defaults(ctx: UIContext) -> dict[str, Any]:
    """Steps and guidance the form opens with: :class:`GenerateConfig`'s, resolved for the base's profile
    (the demo world samples with its own settings)."""
    cfg = GenerateConfig(prompt="-").resolved(ctx.studio.settings.profile())
    return {"steps": cfg.steps, "guidance": cfg.guidance}


def example_rows(ctx: UIContext, names: list[str] | None = None) -> list[list[Any]]:
    """The Generate tab's examples, ``[prompt, [concept names]]``: the base's example prompts
    (:attr:`~studio.models.profile.BaseProfile.examples` — the demo world's are in its vocabulary), then, when
    the library has concepts that fit the loaded base, one example with the first of them and one with
    the first two together (both triggers in the prompt: :attr:`BaseProfile.concept_prompt`)."""
    profile = ctx.studio.settings.profile()
    rows: list[list[Any]] = [[p, []] for p in profile.examples]
    library = ctx.studio.library
    fitting = []
    for name in names if names is not None else concept_choices(ctx):
        info = library.info(name)
        if info.usable and info.tokens and not ctx.studio.fits(name):
            fitting.append(info)
    fitting.sort(key=lambda info: -_fidelity(info.metrics))  # the best-measured examples first

    def subject(info: Any) -> str:
        return " ".join([*info.tokens, info.class_word]).strip()

    if fitting:
        rows.append([profile.concept_prompt.format(subject(fitting[0])), [fitting[0].name]])
    if len(fitting) > 1:
        both = " ".join([*fitting[0].tokens, *fitting[1].tokens, fitting[0].class_word or fitting[1].class_word])
        rows.append([profile.concept_prompt.format(both.strip()), [fitting[0].name, fitting[1].name]])
    return rows


def _fidelity(metrics: dict[str, Any]) -> float:
    """A concept's measured fidelity (its last evaluation's), or -1 when it has none of the right shape."""
    ev = metrics.get("eval")
    scores = ev.get("scores") if isinstance(ev, dict) else None
    value = scores.get("fidelity", scores.get("clip_i")) if isinstance(scores, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else -1.0


def build_config(ctx: UIContext, form: dict[str, Any]) -> GenerateConfig:
    """The form → a :class:`GenerateConfig` (a random seed is drawn here when asked for). Concepts are library
    names, reference images uploads and the adapter a preset, a hub path or an allowed local path
    (:mod:`studio.request_paths`): a request names no other server path."""
    names = [ctx.studio.check_request_concept(n) for n in form.get("concepts") or []]
    uses = []
    for i, name in enumerate(names):
        strength = form.get(f"strength_{i}") if i < SLOTS else None
        uses.append(ConceptUse(name, None if strength is None else float(strength)))
    seed = secrets.randbelow(MAX_SEED) if form.get("random_seed") else int(form.get("seed") or 0)
    values: dict[str, Any] = dict(
        prompt=str(form.get("prompt") or ""), negative_prompt=str(form.get("negative") or ""), seed=seed,
        steps=int(form["steps"]) if form.get("steps") else None,
        guidance=float(form["guidance"]) if form.get("guidance") is not None else None,
        width=int(form["width"]) if form.get("width") else None, height=int(form["height"]) if form.get("height") else None,
        scheduler=str(form.get("scheduler") or "default"), num_images=int(form.get("num_images") or 1), concepts=uses)
    locking = str(form.get("perfusion_locking") or "")
    if locking in ("local", "global"):
        values["perfusion_locking"] = locking
    if form.get("perfusion_orthogonal"):
        values["perfusion_orthogonal"] = str(form["perfusion_orthogonal"])
    refs = ctx.uploaded(form.get("reference"))
    if refs:
        from studio.service import IMAGE_UPLOADS, check_uploads

        values["reference_images"] = [str(p) for p in check_uploads(refs, suffixes=IMAGE_UPLOADS)]
        if form.get("reference_scale") is not None:
            values["reference_scale"] = float(form["reference_scale"])
        if str(form.get("adapter") or "").strip():
            values["adapter"] = request_adapter(ctx, str(form["adapter"]))
    values.update(parse_form(DECOR_FIELDS, {f.name: form[f.name] for f in DECOR_FIELDS if f.name in form}))
    return GenerateConfig(**values).resolved(ctx.studio.settings.profile())


def request_adapter(ctx: UIContext, value: str) -> str:
    """An IP-Adapter a request names: a preset, a hub path (``owner/repo/…/file``) or a local path under the
    operator's allowed folders."""
    from studio.methods.zeroshot.adapter import PRESETS

    return str(ctx.studio.check_request_model(value.strip(), label="IP-Adapter", names=tuple(PRESETS)))


def generate(ctx: UIContext, form: dict[str, Any]) -> Iterator[tuple[list[tuple[str, str]], list[str], str]]:
    """Render the images one at a time (image ``i`` uses seed ``seed + i``, exactly as one call with
    ``num_images`` does) and yield ``(gallery, files, info)`` after each: PNG files with parameters."""
    cfg = build_config(ctx, form)
    folder = ctx.new_folder("generate")
    gallery: list[tuple[str, str]] = []
    files: list[str] = []
    for i in range(cfg.num_images):
        one = dataclasses.replace(cfg, seed=cfg.seed + i, num_images=1)
        image = ctx.runners.render(one)[0]
        path = save_png(image, folder / image_name(image, i))
        gallery.append((str(path), f"seed {cfg.seed + i}"))
        files.append(str(path))
        yield gallery, files, _info(ctx, cfg, i + 1, image)


def _info(ctx: UIContext, cfg: GenerateConfig, done: int, image: Any) -> str:
    lines = [f"**{done}/{cfg.num_images}** image(s), seeds {cfg.seed}…{cfg.seed + done - 1}"]
    notes = list(getattr(ctx.studio, "notes", []) or [])
    lines += [f"ⓘ {n}" for n in notes]
    params = image.info.get("parameters", "")
    if params:
        lines.append(f"```\n{params}\n```")
    return "\n\n".join(lines)


def make_grid(ctx: UIContext, form: dict[str, Any]) -> tuple[str, str, str]:
    """The X/Y grid of the form's settings: ``(image path, download path, info)``."""
    cfg = build_config(ctx, form)
    concept = form.get("grid_concept") or (cfg.concepts[0].source if cfg.concepts else None)
    if concept:  # a custom value is allowed in the box: still a library name, never a file
        concept = ctx.studio.check_request_concept(str(concept))
    x = parse_axis(str(form.get("x_kind") or "seed"), str(form.get("x_values") or ""), concept=concept)
    y = None
    if form.get("y_kind") and form.get("y_kind") != "none" and str(form.get("y_values") or "").strip():
        y = parse_axis(str(form["y_kind"]), str(form["y_values"]), concept=concept)
    result = xy_grid(lambda c: ctx.runners.render(c)[0], cfg, x, y)
    folder = ctx.new_folder("grid")
    path = save_png(result.image, folder / "grid.png")
    for r, row in enumerate(result.cells):
        for c, cell in enumerate(row):
            save_png(cell, folder / f"cell-r{r}-c{c}.png")
    info = f"{len(result.cells)} × {len(result.cells[0])} grid: X = {x.title}" + (f", Y = {y.title}" if y else "")
    return str(path), str(path), info


def on_concepts(ctx: UIContext, form: dict[str, Any]) -> list[Any]:
    """Show one strength slider per selected concept (at its default strength) and the triggers to use."""
    import gradio as gr

    rows = concept_defaults(ctx, list(form.get("concepts") or []))
    updates = []
    for i in range(SLOTS):
        if i < len(rows):
            r = rows[i]
            updates.append(gr.update(visible=True, value=r["strength"], label=f"{r['name']} {r['trigger']} strength"))
        else:
            updates.append(gr.update(visible=False))
    hint = "  ".join(f"`{r['trigger']}` ({r['name']}, {r['method'] or '?'})" for r in rows)
    extra = f"\n\n{len(rows) - SLOTS} more: set their strength in the prompt, e.g. `<tok:0.8>`." if len(rows) > SLOTS else ""
    return [*updates, ("Write the trigger in the prompt: " + hint + extra) if rows else "", gr.update(
        choices=[r["name"] for r in rows], value=rows[0]["name"] if rows else None)]


def insert_triggers(ctx: UIContext, form: dict[str, Any]) -> str:
    """The prompt with the trigger of every selected concept it does not name yet appended."""
    prompt = str(form.get("prompt") or "")
    for r in concept_defaults(ctx, list(form.get("concepts") or [])):
        trigger = r["trigger"].split(" ")[0] if r["trigger"] else ""
        if trigger and trigger[:-1] not in prompt:
            prompt = f"{prompt.rstrip()} {trigger}".strip()
    return prompt


def refresh(ctx: UIContext, form: dict[str, Any]) -> Any:
    import gradio as gr

    names = concept_choices(ctx)
    kept = [n for n in (form.get("concepts") or []) if n in names]
    return gr.update(choices=names, value=kept)


# -- layout ---------------------------------------------------------------------------------------
def build(tab: Any, ctx: UIContext) -> dict[str, Any]:
    """Build the tab's components inside ``tab`` and wire them; returns the components by name."""
    import gradio as gr

    d = sampling_defaults(ctx)
    c: dict[str, Any] = {}
    with tab:
        with gr.Row():
            with gr.Column(scale=5):
                examples = example_rows(ctx)
                c["prompt"] = gr.Textbox(label="Prompt", lines=2, value=examples[0][0], elem_id="gen-prompt",
                                         info="write a concept's trigger token, e.g. <my-dog>, or <my-dog:0.8> for a "
                                              "strength; ProSpect concepts by stage: <tok@0-4> (layout stages "
                                              "only; 0 = noisiest) or <tok:1,1,0.5,…>")
                c["negative"] = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
                with gr.Row():
                    c["concepts"] = gr.Dropdown(choices=concept_choices(ctx), value=[], multiselect=True,
                                                label="Concepts", elem_id="gen-concepts", scale=4)
                    insert = gr.Button("Insert triggers", size="sm", scale=1)
                c["hint"] = gr.Markdown("")
                with gr.Row():
                    for i in range(SLOTS):
                        c[f"strength_{i}"] = gr.Slider(0, 1.5, value=1.0, step=0.05, visible=False,
                                                       label=f"strength {i + 1}", elem_id=f"gen-strength-{i}")
                with gr.Row():
                    c["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="gen-seed")
                    c["random_seed"] = gr.Checkbox(label="Random seed", value=False)
                    c["num_images"] = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="gen-num")
                with gr.Row():
                    c["steps"] = gr.Slider(1, 150, value=d["steps"], step=1, label="Steps", elem_id="gen-steps")
                    c["guidance"] = gr.Slider(0, 20, value=d["guidance"], step=0.5, label="Guidance (CFG)")
                with gr.Row():
                    c["width"] = gr.Number(label="Width (0 = the base's size)", value=0, precision=0, minimum=0)
                    c["height"] = gr.Number(label="Height (0 = the base's size)", value=0, precision=0, minimum=0)
                    c["scheduler"] = gr.Dropdown(choices=["default", *SCHEDULERS], value="default", label="Scheduler")
                with gr.Accordion("Zero-shot reference image", open=False):
                    with gr.Row():
                        c["reference"] = gr.File(label="Reference image(s)", file_count="multiple",
                                                 file_types=["image"], height=120, elem_id="gen-reference")
                        with gr.Column():
                            c["reference_scale"] = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Reference scale")
                            c["adapter"] = gr.Textbox(label="IP-Adapter (empty = the base's default)",
                                                      placeholder="sd15, sd15-plus, a hub path, or a path the operator allowed")
                with gr.Accordion("Perfusion concepts", open=False):
                    with gr.Row():
                        c["perfusion_locking"] = gr.Dropdown(
                            choices=["concept's own", "local", "global"], value="concept's own", label="Key locking",
                            info="global: the whole prompt's keys locked to the class word (β 0.4–0.6)")
                        c["perfusion_orthogonal"] = gr.Dropdown(
                            choices=["approx", "exact"], value="approx", label="Several concepts",
                            info="approx: sum of each concept's term; exact: the paper's Appendix B")
                with gr.Accordion("DECOR: remove words from the prompt's text embeddings", open=False):
                    with gr.Row():
                        for f in DECOR_FIELDS:
                            elem_id = "gen-" + f.name.replace("_", "-")
                            if f.name == "decor_strength":  # α in [0, 1]
                                c[f.name] = gr.Slider(0, 1, value=f.default, step=0.05, label=f.label, info=f.help,
                                                      elem_id=elem_id)
                            else:
                                c[f.name] = make_widget(f, f.default, elem_id=elem_id)
                go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                gr.Examples(examples, [c["prompt"], c["concepts"]], label="Examples (click one, then Generate)",
                            elem_id="gen-examples", examples_per_page=8)
            with gr.Column(scale=5):
                gallery = gr.Gallery(label="Images", columns=4, height="auto", elem_id="gen-gallery", format="png",
                                     object_fit="contain")
                files = gr.File(label="Download (PNG with parameters)", file_count="multiple", elem_id="gen-files")
                info = gr.Markdown("", elem_id="gen-info")
        with gr.Accordion("X/Y grid", open=False):
            with gr.Row():
                c["x_kind"] = gr.Dropdown(choices=list(AXIS_KINDS), value="strength", label="X axis")
                c["x_values"] = gr.Textbox(label="X values", value="0, 0.5, 1", elem_id="grid-x")
                c["y_kind"] = gr.Dropdown(choices=["none", *AXIS_KINDS], value="seed", label="Y axis")
                c["y_values"] = gr.Textbox(label="Y values", value="0, 1", elem_id="grid-y")
                c["grid_concept"] = gr.Dropdown(choices=[], label="Concept of a strength axis", allow_custom_value=True)
            grid_go = gr.Button("Make grid", elem_id="grid-go")
            with gr.Row():
                grid_image = gr.Image(label="Grid", type="filepath", format="png", elem_id="grid-image")
                with gr.Column():
                    grid_file = gr.File(label="Download grid")
                    grid_info = gr.Markdown("")
    slots = [c[f"strength_{i}"] for i in range(SLOTS)]
    on(c["concepts"].change, ctx, on_concepts, {"concepts": c["concepts"]}, [*slots, c["hint"], c["grid_concept"]])
    on(insert.click, ctx, insert_triggers, {"prompt": c["prompt"], "concepts": c["concepts"]}, c["prompt"])
    inputs = {k: v for k, v in c.items() if k != "hint"}
    on(go.click, ctx, generate, inputs, [gallery, files, info], concurrency_id=GPU_QUEUE, concurrency_limit=1)
    on(grid_go.click, ctx, make_grid, inputs, [grid_image, grid_file, grid_info], concurrency_id=GPU_QUEUE,
       concurrency_limit=1)
    on(tab.select, ctx, refresh, {"concepts": c["concepts"]}, c["concepts"])
    return c
