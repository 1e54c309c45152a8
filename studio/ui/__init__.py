"""The studio in the browser: one module per tab, each with ``build(tab, ctx)`` and plain handlers.

The UI is a thin layer (docs/architecture.md): widgets → a config dataclass → a :class:`~studio.service.Studio`
call → outputs. ``app.py`` creates the studio, the GPU-bound calls and the job worker, then
:func:`build_app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.ui.common import GPU_QUEUE, Runners, UIContext, on

TABS = ("Generate", "Train", "Jobs", "Concepts", "Compare", "Zero-shot", "Evaluate")

# The page's style (``launch(css=CSS)`` in app.py): small images — the demo world draws 32 px — are shown
# enlarged with nearest-neighbour scaling, not blurred by the browser's smoothing; the downloads stay
# the PNGs as rendered.
CSS = """
#gen-gallery img, #grid-image img, #compare-image img, #train-preview img, #zs-gallery img, #eval-plot img,
.studio-pixelated img {image-rendering: pixelated; image-rendering: crisp-edges}
#gen-gallery img, #zs-gallery img {object-fit: contain !important}
#train-preview img {width: 100%; height: 100%; object-fit: contain}
"""


def base_banner(ctx: UIContext) -> str:
    """The line under the title: which base is loaded (and, after a fallback, why and how to choose another)."""
    studio = ctx.studio
    base = getattr(studio, "_base", None)
    label = f"**Base:** `{studio.settings.base}`" + (f" — {base.label}" if base is not None and base.label else "")
    if ctx.banner:
        return f"⚠️ {ctx.banner}\n\n{label}"
    return label


def switch_base(ctx: UIContext, form: dict[str, Any]) -> str:
    """Load another base (a hub id, ``demo`` / ``tiny``, or a local folder or file under the folders the
    operator allowed: :meth:`~studio.service.Studio.check_request_base`, before anything is opened); the old
    one stays on failure."""
    from studio.errors import StudioError
    from studio.models import BaseSettings

    spec = str(form.get("base") or "").strip()
    if not spec:
        raise StudioError("Type a base: a hub id (stable-diffusion-v1-5/stable-diffusion-v1-5), demo / tiny, or a "
                          "local folder or .safetensors file under a folder the operator allowed.")
    spec = ctx.studio.check_request_base(spec)
    device = str(form.get("device") or "auto")
    ctx.studio.switch_base(BaseSettings(base=spec, device=None if device == "auto" else device))
    ctx.banner = ""
    return base_banner(ctx)


def build_app(studio: Any, *, banner: str = "", runners: Runners | None = None, out_dir: str | Path | None = None,
              title: str = "Personalization Studio") -> Any:
    """The gradio ``Blocks`` of the whole studio (not launched)."""
    import gradio as gr

    from studio.ui import compare, concepts, evaluate, generate, jobs, train, zeroshot

    ctx = UIContext.create(studio, runners=runners, out_dir=out_dir, banner=banner)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {title}")
        header = gr.Markdown(base_banner(ctx), elem_id="base-banner")
        with gr.Accordion("Base model", open=bool(banner)):
            with gr.Row():
                spec = gr.Textbox(label="Base", value=studio.settings.base, scale=4, elem_id="base-spec",
                                  info="hub id; demo / tiny offline; a diffusers folder or .safetensors file under a "
                                       "folder the operator allowed (app.py --allow-path)")
                device = gr.Dropdown(choices=["auto", "cuda", "mps", "cpu"], value=studio.settings.device or "auto",
                                     label="Device", scale=1)
                load = gr.Button("Load base", scale=1)
        on(load.click, ctx, switch_base, {"base": spec, "device": device}, header, concurrency_id=GPU_QUEUE,
           concurrency_limit=1)
        modules = (generate, train, jobs, concepts, compare, zeroshot, evaluate)
        built: dict[str, dict[str, Any]] = {}
        with gr.Tabs() as tabs:
            for name, module in zip(TABS, modules):
                tab = gr.Tab(name, id=name.lower(), elem_id=f"tab-{name.lower()}")
                built[name] = module.build(tab, ctx) or {}
        concepts.link_to_generate(ctx, built["Concepts"], built["Generate"], tabs)
    demo.studio_context = ctx  # for tests and app.py
    return demo


__all__ = ["CSS", "Runners", "UIContext", "base_banner", "build_app", "switch_base", "TABS"]
