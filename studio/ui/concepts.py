"""The Concepts tab: the library as cards (preview, trigger, method, base, size, scores, recommended
strength) with search; rename, delete (confirmed), import (studio, A1111, diffusers, kohya files),
export and download. Every name goes through :func:`studio.library.check_name`."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from studio.errors import StudioError
from studio.ui.common import UIContext, on
from trainers.probe import verdict_text

THUMB = 160


# -- handlers -------------------------------------------------------------------------------------
ALL = "all"
FILTERS = ("all", "fits this base", "for another base")


def cards(ctx: UIContext, query: str = "", method: str = ALL, fit: str = ALL) -> list[dict[str, Any]]:
    """The library's concepts matching ``query`` (name, trigger, method, class word or base), of ``method``
    (or all) and, with ``fit``, only those that fit the loaded base or only those made for another base,
    as card data. A concept for another base is listed with ``fits`` saying so (it cannot be applied here)."""
    q = (query or "").strip().lower()
    out = []
    for info in ctx.studio.library.list():
        row = info.row()
        text = " ".join(str(v) for v in (row["name"], row["trigger"], row["method"], row["class_word"], row["base"]))
        if q and q not in text.lower():
            continue
        if method not in (None, "", ALL) and row["method"] != method:
            continue
        row["fits"] = "" if info.error else ctx.studio.fits(info.name)
        if (fit == FILTERS[1] and (row["fits"] or info.error)) or (fit == FILTERS[2] and not row["fits"]):
            continue
        row["scores"] = _scores(info.metrics)
        row["verdict"] = verdict_text(info.metrics)
        row["preview"] = str(info.preview) if info.preview else None
        out.append(row)
    return out


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline scores of a concept: its last evaluation's, else the last training-curve point's.
    Metrics come from the file: anything of an unexpected shape is left out, never raised."""
    def obj(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    ev = obj(metrics.get("eval")) or obj(metrics.get("eval_multi"))
    scores = obj(ev.get("scores"))
    points = obj(metrics.get("curve")).get("points")
    if not scores and isinstance(points, list) and points:
        point = obj(points[-1])
        scores = {"fidelity": point.get("fidelity"), "editability": point.get("editability")}
    return {str(k): round(float(v), 4) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def cards_html(rows: list[dict[str, Any]]) -> str:
    """Cards as HTML (thumbnails inlined as small PNG data URIs; every text escaped)."""
    if not rows:
        return "<p class='studio-empty'>No concepts yet: train one on the Train tab, or import a file below.</p>"
    parts = ["<div class='studio-cards'>"]
    for r in rows:
        thumb = _thumb(r["preview"])
        img = (f"<img src='{thumb}' alt='preview of {html.escape(r['name'])}'>" if thumb
               else "<div class='studio-noimg'>no preview</div>")
        scores = ", ".join(f"{html.escape(k)} {v:g}" for k, v in r["scores"].items()) or "not evaluated"
        strength = f"{r['strength']:g}" if r["strength"] is not None else "1 (default)"
        err = f"<div class='studio-err'>broken: {html.escape(r['error'])}</div>" if r["error"] else ""
        if r.get("fits"):
            err += f"<div class='studio-other'>{html.escape(r['fits'])} — cannot be applied here</div>"
        parts.append(
            f"<div class='studio-card' data-name='{html.escape(r['name'], quote=True)}'>{img}"
            f"<div class='studio-card-body'><b>{html.escape(r['name'])}</b><br>"
            f"<code>{html.escape(r['trigger'])}</code> · {html.escape(r['method'] or '?')}"
            f"{(' · ' + html.escape(r['class_word'])) if r['class_word'] else ''}<br>"
            f"base {html.escape(r['base'] or '?')} ({html.escape(r['family'] or '?')}) · {r['size_kb']:g} KB<br>"
            f"scores: {scores}<br>recommended strength: {strength}"
            f"{('<br>' + html.escape(r['verdict'])) if r.get('verdict') else ''}{err}</div></div>")
    parts.append("</div>")
    return "".join(parts)


def _thumb(path: str | None) -> str | None:
    if not path:
        return None
    from PIL import Image

    from studio.images import open_image

    try:
        im = open_image(path).convert("RGB")  # the size is checked before decoding
        scale = THUMB / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - an unreadable preview (or a decompression bomb) shows no thumbnail
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def method_choices(ctx: UIContext) -> list[str]:
    """The filter's methods: ``all`` and every method present in the library."""
    return [ALL, *sorted({i.method for i in ctx.studio.library.list() if i.method})]


def use_in_generate(ctx: UIContext, form: dict[str, Any]) -> tuple[list[str], str]:
    """"Use in Generate": ``(the Generate tab's concepts, its prompt)`` — the chosen concept added to the
    ones already selected, its trigger written into the prompt (the base's concept prompt when the
    prompt has no trigger of it yet). Broken concepts and concepts for another base are refused here,
    with the reason, rather than at generation."""
    name = form.get("name")
    if not name:
        raise StudioError("Choose a concept first.")
    info = ctx.studio.library.info(str(name))
    if info.error:
        raise StudioError(f"{name} cannot be used: {info.error}")
    why = ctx.studio.fits(info.name)
    if why:
        raise StudioError(f"{name} is {why}: load that base (Base model, above) to use it.")
    selected = [n for n in (form.get("selected") or []) if n != name] + [info.name]
    prompt = str(form.get("prompt") or "")
    trigger = info.tokens[0] if info.tokens else ""
    if trigger and trigger not in prompt:
        subject = " ".join([*info.tokens, info.class_word]).strip()
        prompt = ctx.studio.settings.profile().concept_prompt.format(subject)
    return selected, prompt


def hub_push(ctx: UIContext, form: dict[str, Any]) -> str:
    """Push the chosen concept to a hub repo (:func:`studio.hub.push`) with the token typed on the page: the
    server's own token (``HF_TOKEN``, a cached login) is never used for a visitor's request."""
    from studio import hub

    name, repo, token = form.get("name"), str(form.get("repo") or "").strip(), str(form.get("token") or "").strip()
    if not name:
        raise StudioError("Choose a concept first.")
    if not repo:
        raise StudioError("Type the hub repo to push to: user/repo.")
    if not token:
        raise StudioError("Paste a Hugging Face token with write access (https://huggingface.co/settings/tokens); "
                          "the page never uses the server's own token.")
    url = hub.push(ctx.studio.library, str(name), repo, token=token, private=bool(form.get("private")))
    return f"Pushed **{name}** to {url}"


def hub_pull(ctx: UIContext, form: dict[str, Any]) -> str:
    """Pull a concept from the hub into the library (:func:`studio.hub.pull`): ``user/repo`` or
    ``user/repo/file.safetensors``; anonymous unless a token is typed (the server's is never used)."""
    from studio import hub

    spec, token = str(form.get("spec") or "").strip(), str(form.get("token") or "").strip()
    if not spec:
        raise StudioError("Type what to pull: user/repo or user/repo/file.safetensors.")
    path = hub.pull(ctx.studio.library, spec, token=token or False,
                    name=str(form.get("import_name") or "").strip() or None)
    return f"Pulled **{path.stem}** from {spec}."


def rename(ctx: UIContext, form: dict[str, Any]) -> str:
    name, new = form.get("name"), str(form.get("new_name") or "").strip()
    token = str(form.get("new_trigger") or "").strip() or None
    if not name:
        raise StudioError("Choose a concept first.")
    if not new and not token:
        raise StudioError("Type a new name (and/or a new trigger).")
    path = ctx.studio.library.rename(name, new or name, token=token)
    return f"Renamed **{name}** → **{path.stem}**" + (f", trigger {token}" if token else "") + "."


def delete(ctx: UIContext, form: dict[str, Any]) -> str:
    name = form.get("name")
    if not name:
        raise StudioError("Choose a concept first.")
    if not form.get("confirmed"):
        raise StudioError(f"Confirm to delete {name}.")
    ctx.studio.library.delete(name)
    return f"Deleted **{name}**."


def import_concept(ctx: UIContext, form: dict[str, Any]) -> str:
    files = ctx.uploaded(form.get("file"))
    if not files:
        raise StudioError("Upload a concept file (.safetensors, or an A1111 .pt / diffusers .bin).")
    path = ctx.studio.import_upload(files[0], str(form.get("import_name") or "").strip() or None,
                                    token=str(form.get("import_trigger") or "").strip() or None,
                                    class_word=str(form.get("import_class") or "").strip() or None)
    return f"Imported **{path.stem}**."


def export_formats(ctx: UIContext, name: str | None) -> list[str]:
    from studio.methods.interop import export_formats as formats

    if not name:
        return ["studio"]
    try:
        info = ctx.studio.library.info(name)
        return formats(info.method) if info.method and info.usable else ["studio"]
    except StudioError:  # a broken file or refused name: it can still be copied out as it is
        return ["studio"]


def export(ctx: UIContext, form: dict[str, Any]) -> str:
    """Export into a fresh result folder and return the file (or zipped folder) to download."""
    import shutil

    name, fmt = form.get("name"), str(form.get("format") or "studio")
    if not name:
        raise StudioError("Choose a concept first.")
    folder = ctx.new_folder("export")
    target = folder / (f"{name}.safetensors" if fmt == "studio" else f"{name}.{fmt}.safetensors")
    out = ctx.studio.library.export(name, target, fmt)
    if out.is_dir():
        return shutil.make_archive(str(folder / name), "zip", out)
    return str(out)


# -- layout ---------------------------------------------------------------------------------------
CSS = """
.studio-cards {display:flex; flex-wrap:wrap; gap:12px}
.studio-card {width:190px; border:1px solid var(--border-color-primary); border-radius:8px; padding:8px;
              font-size:0.85em}
.studio-card img, .studio-noimg {width:160px; height:160px; object-fit:contain; image-rendering:pixelated;
              background:var(--background-fill-secondary); display:flex; align-items:center; justify-content:center}
.studio-err {color:var(--error-text-color)}
.studio-other {color:var(--body-text-color-subdued); font-style:italic}
"""


def build(tab: Any, ctx: UIContext) -> dict[str, Any]:
    import gradio as gr

    names = ctx.studio.library.names()
    c: dict[str, Any] = {}
    with tab:
        with gr.Row():
            c["query"] = gr.Textbox(label="Search", placeholder="name, trigger, method, class word, base",
                                    elem_id="concepts-search", scale=4)
            c["method"] = gr.Dropdown(choices=method_choices(ctx), value=ALL, label="Method", scale=1,
                                      elem_id="concepts-method")
            c["fit"] = gr.Dropdown(choices=list(FILTERS), value=ALL, label="Base", scale=1, elem_id="concepts-fit")
            refresh = gr.Button("Refresh", scale=1)
        grid = gr.HTML(cards_html(cards(ctx)), elem_id="concepts-cards", css_template=CSS, js_on_load=None)
        with gr.Row():
            c["name"] = gr.Dropdown(choices=names, value=names[0] if names else None, label="Concept",
                                    elem_id="concepts-name", scale=4)
            c["use"] = gr.Button("Use in Generate", variant="primary", scale=1, elem_id="concepts-use")
        result = gr.Markdown("", elem_id="concepts-result")
        with gr.Accordion("Rename", open=False):
            with gr.Row():
                c["new_name"] = gr.Textbox(label="New name")
                c["new_trigger"] = gr.Textbox(label="New trigger (optional)", placeholder="<my-dog>")
                rename_go = gr.Button("Rename")
        with gr.Accordion("Delete", open=False):
            delete_go = gr.Button("Delete…", variant="stop", elem_id="concepts-delete")
            with gr.Row(visible=False) as confirm_row:
                gr.Markdown("Delete this concept and its preview? This cannot be undone.")
                yes = gr.Button("Yes, delete", variant="stop", elem_id="concepts-delete-yes")
                no = gr.Button("Keep it")
        with gr.Accordion("Import", open=False):
            with gr.Row():
                c["file"] = gr.File(label="Concept file (studio / diffusers / A1111 / kohya)",
                                    file_types=[".safetensors", ".pt", ".bin"], elem_id="concepts-import-file")
                with gr.Column():
                    c["import_name"] = gr.Textbox(label="Name (optional)")
                    c["import_trigger"] = gr.Textbox(label="Trigger (optional)")
                    c["import_class"] = gr.Textbox(label="Class word (optional)")
                    import_go = gr.Button("Import")
        with gr.Accordion("Share on the Hugging Face Hub", open=False):
            with gr.Row():
                c["token"] = gr.Textbox(label="Your Hugging Face token", type="password", scale=2,
                                        info="write access to push; only for private repos to pull (never stored)")
                c["repo"] = gr.Textbox(label="Push the chosen concept to", placeholder="user/repo", scale=2)
                c["private"] = gr.Checkbox(label="private repo", value=False, scale=1)
                push_go = gr.Button("Push", scale=1)
            with gr.Row():
                c["spec"] = gr.Textbox(label="Pull", placeholder="user/repo or user/repo/file.safetensors", scale=4)
                pull_go = gr.Button("Pull into the library", scale=1)
        with gr.Accordion("Export / download", open=False):
            with gr.Row():
                c["format"] = gr.Dropdown(choices=export_formats(ctx, names[0] if names else None), value="studio",
                                          label="Format")
                export_go = gr.Button("Export")
                download = gr.File(label="Download", elem_id="concepts-download")

    def listing(ctx_: UIContext, form: dict[str, Any]) -> list[Any]:
        names_now = ctx_.studio.library.names()
        keep = form.get("name") if form.get("name") in names_now else (names_now[0] if names_now else None)
        return [cards_html(cards(ctx_, form.get("query") or "", form.get("method") or ALL, form.get("fit") or ALL)),
                gr.update(choices=names_now, value=keep)]

    find = {"query": c["query"], "name": c["name"], "method": c["method"], "fit": c["fit"]}
    filters = {k: c[k] for k in ("query", "method", "fit")}
    for box in filters.values():
        on(box.change, ctx, lambda ctx_, form: cards_html(cards(ctx_, form["query"], form["method"], form["fit"])),
           filters, grid)
    on(refresh.click, ctx, listing, find, [grid, c["name"]])
    on(tab.select, ctx, listing, find, [grid, c["name"]])
    on(c["name"].change, ctx, lambda ctx_, form: gr.update(choices=export_formats(ctx_, form["name"]), value="studio"),
       {"name": c["name"]}, c["format"])

    def then_list(fn: Any) -> Any:
        def run(ctx_: UIContext, form: dict[str, Any]) -> list[Any]:
            message = fn(ctx_, form)
            return [message, *listing(ctx_, form)]
        return run

    on(rename_go.click, ctx, then_list(rename), {k: c[k] for k in ("name", "new_name", "new_trigger", "query", "method",
                                                                    "fit")},
       [result, grid, c["name"]])
    delete_go.click(lambda: gr.update(visible=True), None, confirm_row)
    no.click(lambda: gr.update(visible=False), None, confirm_row)
    on(yes.click, ctx, lambda ctx_, form: [*then_list(delete)(ctx_, form | {"confirmed": True}), gr.update(visible=False)],
       find, [result, grid, c["name"], confirm_row])
    on(import_go.click, ctx, then_list(import_concept),
       {k: c[k] for k in ("file", "import_name", "import_trigger", "import_class", "query", "name", "method", "fit")},
       [result, grid, c["name"]])
    on(push_go.click, ctx, hub_push, {k: c[k] for k in ("name", "repo", "token", "private")}, result)
    on(pull_go.click, ctx, then_list(hub_pull), {k: c[k] for k in ("spec", "token", "import_name", *find)},
       [result, grid, c["name"]])
    on(export_go.click, ctx, export, {"name": c["name"], "format": c["format"]}, download)
    return c


def link_to_generate(ctx: UIContext, mine: dict[str, Any], gen: dict[str, Any], tabs: Any) -> None:
    """Wire "Use in Generate": the chosen concept goes into the Generate tab's concepts (its choices
    refreshed) and prompt, and that tab opens. Called by :func:`studio.ui.build_app` once both tabs exist."""
    import gradio as gr

    def go(ctx_: UIContext, form: dict[str, Any]) -> list[Any]:
        selected, prompt = use_in_generate(ctx_, form)
        from studio.ui.generate import concept_choices

        return [gr.update(choices=concept_choices(ctx_), value=selected), prompt, gr.Tabs(selected="generate")]

    on(mine["use"].click, ctx, go, {"name": mine["name"], "selected": gen["concepts"], "prompt": gen["prompt"]},
       [gen["concepts"], gen["prompt"], tabs])
