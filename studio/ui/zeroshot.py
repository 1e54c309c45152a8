"""The Zero-shot tab: reference images → images (IP-Adapter, no training), and saving the references
as a zero-shot concept in the library (:meth:`Studio.create_zeroshot`) — or a note when this install
has no zero-shot method."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from studio.errors import StudioError
from studio.generation import GenerateConfig
from studio.ui.common import GPU_QUEUE, UIContext, image_name, on, save_png
from studio.ui.generate import request_adapter, sampling_defaults


def _references(ctx: UIContext, form: dict[str, Any]) -> list[str]:
    from studio.service import IMAGE_UPLOADS, check_uploads

    files = ctx.uploaded(form.get("references"))
    if not files:
        raise StudioError("Upload one or more reference images of the subject (or style).")
    return [str(p) for p in check_uploads(files, suffixes=IMAGE_UPLOADS)]


def _adapter(ctx: UIContext, form: dict[str, Any]) -> str | None:
    text = str(form.get("adapter") or "").strip()
    return request_adapter(ctx, text) if text else None


def generate(ctx: UIContext, form: dict[str, Any]) -> Iterator[tuple[list[tuple[str, str]], list[str], str]]:
    """Reference images + prompt → PNG files (one per seed), yielded as they come."""
    refs = _references(ctx, form)
    cfg = GenerateConfig(prompt=str(form.get("prompt") or ""), negative_prompt=str(form.get("negative") or ""),
                         seed=int(form.get("seed") or 0), steps=int(form["steps"]) if form.get("steps") else None,
                         guidance=float(form["guidance"]) if form.get("guidance") is not None else None,
                         num_images=int(form.get("num_images") or 1), reference_images=refs,
                         reference_scale=float(form["scale"]) if form.get("scale") is not None else 1.0,
                         adapter=_adapter(ctx, form)).resolved(ctx.studio.settings.profile())
    folder = ctx.new_folder("zeroshot")
    gallery: list[tuple[str, str]] = []
    files: list[str] = []
    for i in range(cfg.num_images):
        image = ctx.runners.render(dataclasses.replace(cfg, seed=cfg.seed + i, num_images=1))[0]
        path = save_png(image, folder / image_name(image, i))
        gallery.append((str(path), f"seed {cfg.seed + i}"))
        files.append(str(path))
        yield gallery, files, f"{i + 1}/{cfg.num_images} image(s) from {len(refs)} reference image(s)."


def save(ctx: UIContext, form: dict[str, Any]) -> str:
    """Save the reference images as a zero-shot concept in the library."""
    refs = _references(ctx, form)
    name = str(form.get("name") or "").strip()
    if not name:
        raise StudioError("Name the concept (letters, digits, spaces, '_', '-', '.').")
    adapter = _adapter(ctx, form)
    if adapter is None:
        from studio.methods.zeroshot import default_adapter

        adapter = default_adapter(ctx.studio.base)
    path = ctx.studio.create_zeroshot(refs, adapter, name=name, token=str(form.get("trigger") or "").strip() or None,
                                      class_word=str(form.get("class_word") or "").strip(),
                                      scale=float(form["scale"]) if form.get("scale") is not None else 1.0,
                                      average=bool(form.get("average")))
    return f"Saved **{path.stem}** to the library: select it on the Generate tab."


def build(tab: Any, ctx: UIContext) -> dict[str, Any]:
    import gradio as gr

    c: dict[str, Any] = {}
    with tab:
        gr.Markdown("Personalise without training: an IP-Adapter reads the reference images' CLIP embeddings. Save "
                    "them as a concept to reuse them (and mix them with trained concepts) on the Generate tab.")
        with gr.Row():
            with gr.Column(scale=5):
                c["references"] = gr.File(label="Reference images", file_count="multiple", file_types=["image"],
                                          elem_id="zs-references")
                c["prompt"] = gr.Textbox(label="Prompt", value="a photo of a cat", lines=2, elem_id="zs-prompt")
                c["negative"] = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    c["scale"] = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Reference scale (strength)")
                    c["adapter"] = gr.Textbox(label="IP-Adapter (empty = the base's default)",
                                              placeholder="sd15, sd15-plus, a hub path, or a path the operator allowed")
                with gr.Row():
                    c["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                    d = sampling_defaults(ctx)
                    c["steps"] = gr.Slider(1, 150, value=d["steps"], step=1, label="Steps", elem_id="zs-steps")
                    c["guidance"] = gr.Slider(0, 20, value=d["guidance"], step=0.5, label="Guidance")
                    c["num_images"] = gr.Slider(1, 8, value=1, step=1, label="Images")
                go = gr.Button("Generate", variant="primary", elem_id="zs-go")
                with gr.Accordion("Save as a zero-shot concept", open=False):
                    with gr.Row():
                        c["name"] = gr.Textbox(label="Name", elem_id="zs-name")
                        c["trigger"] = gr.Textbox(label="Trigger (optional)", placeholder="<my-dog>")
                        c["class_word"] = gr.Textbox(label="Class word (optional)", placeholder="dog")
                        c["average"] = gr.Checkbox(label="Average the images into one embedding")
                    save_go = gr.Button("Save concept", elem_id="zs-save")
            with gr.Column(scale=5):
                gallery = gr.Gallery(label="Images", columns=4, height=420, format="png", elem_id="zs-gallery")
                files = gr.File(label="Download (PNG with parameters)", file_count="multiple")
                info = gr.Markdown("", elem_id="zs-info")
    on(go.click, ctx, generate, c, [gallery, files, info], concurrency_id=GPU_QUEUE, concurrency_limit=1)
    on(save_go.click, ctx, save, c, info, concurrency_id=GPU_QUEUE, concurrency_limit=1)
    return c
