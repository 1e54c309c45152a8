"""The studio in the browser (Gradio). ``python app.py [--base B] [--library DIR] [--port P]``.

This is the minimal Generate page of the foundation; the full studio UI builds on it.
Runs unchanged as a Hugging Face Space (``demo`` is importable).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from studio.errors import StudioError  # noqa: E402
from studio.service import BaseSettings, Studio  # noqa: E402


def make_studio(base: str | None = None, library: str | None = None) -> tuple[Studio, str]:
    """Load the requested base; when it cannot be loaded, fall back to an offline base and say why."""
    wanted = base or os.environ.get("STUDIO_BASE", "demo")
    lib = library or os.environ.get("STUDIO_LIBRARY", "concepts")
    for spec in dict.fromkeys([wanted, "demo", "tiny"]):
        studio = Studio(BaseSettings(base=spec), library=lib)
        try:
            _ = studio.base
        except StudioError as err:
            banner = f"Could not load base {wanted!r}: {err}"
            continue
        else:
            if spec != wanted:
                return studio, f"{banner} Running on the offline base {spec!r} ({studio.base.label}). " \
                               "Choose a real base with --base or STUDIO_BASE."
            return studio, studio.base.label
    raise SystemExit(banner)


def build_demo(studio: Studio, banner: str = ""):
    import gradio as gr

    from studio.generation import ConceptUse, GenerateConfig

    def run(prompt: str, negative: str, seed: float, steps: float, guidance: float, n: float, concepts: list[str]):
        try:
            cfg = GenerateConfig(prompt=prompt, negative_prompt=negative, seed=int(seed), steps=int(steps),
                                 guidance=float(guidance), num_images=int(n),
                                 concepts=[ConceptUse(c) for c in concepts or []])
            return studio.generate(cfg)
        except StudioError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="Personalization Studio") as demo:
        gr.Markdown("# Personalization Studio")
        if banner:
            gr.Markdown(f"**Base:** {studio.base.name} — {banner}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="a photo of a cat")
                negative = gr.Textbox(label="Negative prompt")
                concepts = gr.Dropdown(choices=studio.library.names(), multiselect=True, label="Concepts")
                seed = gr.Number(label="Seed", value=0, precision=0)
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=7.5, label="Guidance")
                n = gr.Slider(1, 8, value=1, step=1, label="Images")
                go = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Images", format="png")
        go.click(run, [prompt, negative, seed, steps, guidance, n, concepts], gallery)
    return demo


def main() -> None:
    ap = argparse.ArgumentParser(description="The personalization studio in the browser.")
    ap.add_argument("--base", default=None)
    ap.add_argument("--library", default=None)
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    ap.add_argument("--listen", action="store_true", help="bind 0.0.0.0 instead of 127.0.0.1")
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = ap.parse_args()
    studio, banner = make_studio(args.base, args.library)
    build_demo(studio, banner).launch(server_name="0.0.0.0" if args.listen else "127.0.0.1",
                                      server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
