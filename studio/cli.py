"""``python -m studio``: generate, manage concepts, train, queue training jobs, evaluate.

User mistakes print one line on stderr and exit with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.library import DEFAULT_LIBRARY


def _base_flags(p: argparse.ArgumentParser, default_base: str | None = "demo") -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--base", default=default_base, required=default_base is None,
                   help="hub id, diffusers folder, .safetensors checkpoint, demo, tiny, tiny-v or tiny-sdxl")
    g.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: best available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    g.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    g.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="override for single-file SD 2 checkpoints that do not say")
    g.add_argument("--offload", action="store_true", help="CUDA: offload idle components to the CPU")


def _settings(ns: argparse.Namespace) -> Any:
    from studio.service import BaseSettings

    return BaseSettings(base=ns.base, device=ns.device, dtype=ns.dtype, attention=ns.attention,
                        prediction_type=ns.prediction_type, offload=ns.offload)


def _library_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", default=DEFAULT_LIBRARY, help=f"concept library folder (default: {DEFAULT_LIBRARY})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="The personalization studio.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render images, optionally with concepts")
    _base_flags(g)
    _library_flag(g)
    g.add_argument("--prompt", required=True, help="prompt; trigger tokens as <tok> or <tok:0.8>")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--concept", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a concept file or library name, optionally with a default strength (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--width", type=int, default=None, help="default: the base's native size")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--scheduler", default="default", help="default, ddim, euler, euler_a, dpmpp_2m, unipc, heun, pndm")
    g.add_argument("--num-images", type=int, default=1)
    r = g.add_argument_group("image prompt (IP-Adapter, zero-shot)")
    r.add_argument("--reference-image", action="append", default=[], metavar="IMG",
                   help="reference image (or folder) whose subject/style the images take on (repeatable)")
    r.add_argument("--reference-scale", type=float, default=1.0, help="adapter scale: 0 = off, 1 = full")
    r.add_argument("--adapter", default=None, help="IP-Adapter: preset (sd15, sd15-plus, sd15-plus-face, sdxl, "
                   "sdxl-plus …), adapter file or folder, or hub path (default: the base's usual one)")
    r.add_argument("--image-encoder", default=None, help="CLIP image-encoder folder, when not beside the adapter")
    r.add_argument("--reference-mask", default=None, metavar="IMG", help="mask image: white where the reference acts")
    pf = g.add_argument_group("Perfusion concepts")
    pf.add_argument("--perfusion-locking", choices=("local", "global"), default=None,
                    help="key locking: local (the concept's keys) or global (the whole prompt's keys locked to "
                         "the class word; paper β 0.4–0.6); default: each concept's own")
    pf.add_argument("--perfusion-orthogonal", choices=("approx", "exact"), default="approx",
                    help="several Perfusion concepts: approx (sum of each concept's term) or exact (Appendix B)")
    g.add_argument("--out", required=True, help="output PNG; with several images NAME-0.png, NAME-1.png …")

    c = sub.add_parser("concepts", help="the concept library")
    csub = c.add_subparsers(dest="action", required=True)
    for name, helptext in (("list", "list concepts"), ("show", "show one concept")):
        p = csub.add_parser(name, help=helptext)
        _library_flag(p)
        if name == "show":
            p.add_argument("name")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    p = csub.add_parser("rename", help="rename a concept (and optionally its trigger token)")
    _library_flag(p)
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--token", default=None, help="new trigger token, e.g. <my-dog>")
    p.add_argument("--force", action="store_true")
    p = csub.add_parser("rm", help="delete a concept")
    _library_flag(p)
    p.add_argument("name")
    p = csub.add_parser("import", help="import a studio, A1111, diffusers or Cross-Initialization file")
    _library_flag(p)
    p.add_argument("file")
    p.add_argument("--name", default=None)
    p.add_argument("--token", default=None, help="trigger token (default: from the file)")
    p.add_argument("--class-word", default=None)
    p.add_argument("--force", action="store_true")
    p = csub.add_parser("create-zeroshot", help="a zero-shot concept from reference images (IP-Adapter embeddings, "
                        "no training)")
    _library_flag(p)
    p.add_argument("--images", action="append", required=True, metavar="DIR_OR_IMG", help="reference images (repeatable)")
    p.add_argument("--adapter", required=True, help="IP-Adapter: preset (sd15, sd15-plus, sdxl …), file, folder or hub "
                   "path")
    p.add_argument("--image-encoder", default=None, help="CLIP image-encoder folder, when not beside the adapter")
    p.add_argument("--out", default=None, help="output .safetensors (default: into the library under --name)")
    p.add_argument("--name", default=None, help="concept name (default: the folder's name)")
    p.add_argument("--token", default=None, help="trigger token (default: <name>)")
    p.add_argument("--class-word", default="", help="what the subject is; the trigger reads as this word")
    p.add_argument("--scale", type=float, default=1.0, help="recommended adapter scale (the concept's strength)")
    p.add_argument("--average", action="store_true", help="store the mean embedding instead of one per image")
    p.add_argument("--mask", default=None, metavar="IMG", help="mask image: white where the reference acts")
    p.add_argument("--layer-scales", default=None, metavar="JSON",
                   help='per-layer scales as for diffusers set_ip_adapter_scale, e.g. \'{"up": {"block_0": [0, 1, 0]}}\'')
    p.add_argument("--force", action="store_true")
    p = csub.add_parser("export", help="export a concept (studio, a1111, diffusers, …)")
    _library_flag(p)
    p.add_argument("name")
    p.add_argument("out")
    p.add_argument("--format", default="studio")
    p.add_argument("--force", action="store_true")

    t = sub.add_parser("train", help="train a concept")
    tsub = t.add_subparsers(dest="method", required=True)
    from trainers import trainer_registry
    from trainers.runner import add_cli_arguments

    for entry in trainer_registry().values():
        p = tsub.add_parser(entry.cli_name, help=entry.help, description=entry.help)
        _base_flags(p)
        _library_flag(p)
        p.add_argument("--queue", action="store_true",
                       help="add a job to the training queue instead of training now (`python -m studio jobs work` "
                            "runs it)")
        add_cli_arguments(entry, p)

    from studio.jobs.cli import add_parser as add_jobs_parser

    add_jobs_parser(sub, base_flags=_base_flags, library_flag=_library_flag)
    _evaluate_parser(sub)
    return parser


def _evaluate_parser(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="generate and score concepts: CLIP-T/CLIP-I/DINO (CP-CLIP for several), "
                       "or the demo world's oracle; optionally sweep the strength")
    _base_flags(e)
    _library_flag(e)
    e.add_argument("--concept", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="concept file or library name (repeat for a multi-concept evaluation)")
    e.add_argument("--images", action="append", default=[], metavar="REFDIR",
                   help="reference photos of each --concept, in the same order (default: the embeddings stored in "
                        "the concept)")
    e.add_argument("--store-refs", action="store_true",
                   help="store the --images embeddings in the concept, to re-score it later without the photos")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="FILE", help="one prompt per line, {} where the concept goes")
    src.add_argument("--protocol", choices=["dreambench", "dreambench-object", "dreambench-live", "world"],
                     help="named prompt list (default: world on --base demo, else dreambench: live for cat/dog "
                          "concepts, object otherwise)")
    e.add_argument("--seeds", type=int, default=None, help="images per prompt (default: the protocol's, 4)")
    e.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed + i")
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default 30; 20 on --base demo)")
    e.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5; 4 on --base demo)")
    e.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    e.add_argument("--scorer", choices=["clip", "oracle"], default="clip",
                   help="clip: CLIP/DINO metrics; oracle: the demo world's oracle (fidelity, editability)")
    e.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="CLIP hub id or folder")
    e.add_argument("--dino-model", default=None, help="add DINO (e.g. facebook/dino-vits16): hub id or folder")
    e.add_argument("--detector-model", default=None,
                   help="CP-CLIP detector for several concepts: OWL-ViT hub id or folder (default "
                        "google/owlvit-base-patch32), or haar (offline; faces of people and cats)")
    e.add_argument("--clip-t-text", choices=["class_noun", "remove", "keep"], default="class_noun",
                   help="text CLIP-T scores: the trigger replaced by the class noun (default), removed, or kept")
    e.add_argument("--fidelity", choices=["clip_i", "dino"], default=None, help="fidelity score of --sweep")
    e.add_argument("--sweep", default=None, metavar="S1,S2,...",
                   help="score these strengths (e.g. 0,0.25,0.5,0.75,1,1.25) and store the recommended one")
    e.add_argument("--no-write", action="store_true", help="do not write the scores into the concept file")
    e.add_argument("--no-save-images", action="store_true", help="do not write the generated images")
    e.add_argument("--out", required=True, help="output folder (report.json, contact_sheet.png, scatter.png …)")


def cmd_generate(ns: argparse.Namespace) -> int:
    from studio.generation import ConceptUse, GenerateConfig, png_info
    from studio.prompts import split_concept_spec
    from studio.service import Studio

    cfg = GenerateConfig(prompt=ns.prompt, negative_prompt=ns.negative_prompt, seed=ns.seed, steps=ns.steps,
                         guidance=ns.guidance, width=ns.width, height=ns.height, scheduler=ns.scheduler,
                         num_images=ns.num_images,
                         concepts=[ConceptUse(*split_concept_spec(s)) for s in ns.concept],
                         reference_images=ns.reference_image, reference_scale=ns.reference_scale, adapter=ns.adapter,
                         image_encoder=ns.image_encoder, reference_mask=ns.reference_mask,
                         perfusion_locking=ns.perfusion_locking, perfusion_orthogonal=ns.perfusion_orthogonal)
    out = Path(ns.out)
    if out.suffix.lower() != ".png":
        raise StudioError(f"--out {out} must end in .png (the parameters are stored in PNG text chunks).")
    studio = Studio(_settings(ns), library=ns.library)
    if studio.base.label:
        print(f"base {studio.base.name}: {studio.base.label}", file=sys.stderr)
    images = studio.generate(cfg)
    for note in studio.notes:
        print(note, file=sys.stderr)
    from studio.atomic import atomic_path

    for i, img in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG", pnginfo=png_info(img))
        print(path)
    return 0


def cmd_concepts(ns: argparse.Namespace) -> int:
    from studio.library import Library

    lib = Library(ns.library)
    if ns.action == "list":
        rows = [i.row() for i in lib.list()]
        if ns.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no concepts in {lib.folder}")
        else:
            cols = ["name", "method", "trigger", "class_word", "base", "strength", "size_kb"]
            widths = {c: max(len(c), *(len(str(r[c] if r[c] is not None else "")) for r in rows)) for c in cols}
            print("  ".join(c.ljust(widths[c]) for c in cols))
            for r in rows:
                line = "  ".join(str(r[c] if r[c] is not None else "").ljust(widths[c]) for c in cols)
                print(line + (f"  ! {r['error']}" if r["error"] else ""))
    elif ns.action == "show":
        info = lib.info(ns.name)
        data = info.row() | {"path": str(info.path), "tokens": info.tokens, "base": info.base,
                             "metrics": info.metrics, "preview": str(info.preview) if info.preview else None}
        print(json.dumps(data, indent=2, default=str))
    elif ns.action == "rename":
        print(lib.rename(ns.old, ns.new, force=ns.force, token=ns.token))
    elif ns.action == "rm":
        lib.delete(ns.name)
        print(f"deleted {ns.name}")
    elif ns.action == "import":
        print(lib.import_file(ns.file, ns.name, token=ns.token, class_word=ns.class_word, force=ns.force))
    elif ns.action == "export":
        print(lib.export(ns.name, ns.out, ns.format, force=ns.force))
    elif ns.action == "create-zeroshot":
        from studio.service import Studio

        layer_scales = None
        if ns.layer_scales:
            try:
                layer_scales = json.loads(ns.layer_scales)
            except json.JSONDecodeError:
                raise StudioError(f"--layer-scales {ns.layer_scales!r} is not JSON.") from None
        print(Studio(library=ns.library).create_zeroshot(
            ns.images, ns.adapter, image_encoder=ns.image_encoder, out=ns.out, name=ns.name, token=ns.token,
            class_word=ns.class_word, scale=ns.scale, average=ns.average, layer_scales=layer_scales, mask=ns.mask,
            force=ns.force))
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from trainers import get_trainer
    from trainers.runner import run_cli

    if ns.queue:
        from studio.jobs.cli import submit

        return submit(get_trainer(ns.method), ns, _settings(ns))
    return run_cli(get_trainer(ns.method), ns, _settings(ns))


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from studio.evaluation import format_summary
    from studio.generation import ConceptUse
    from studio.prompts import split_concept_spec
    from studio.service import Studio

    if ns.batch_size < 1:
        raise StudioError(f"--batch-size must be at least 1, got {ns.batch_size}.")
    if ns.images and len(ns.images) != len(ns.concept):
        raise StudioError(f"Got {len(ns.images)} --images folders for {len(ns.concept)} --concept; give one per "
                          "concept, in the same order, or none (stored embeddings).")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of the scoring models
    studio = Studio(_settings(ns), library=ns.library)
    options: dict[str, Any] = dict(
        prompts=ns.prompts, protocol=ns.protocol, seeds=ns.seeds, seed=ns.seed, references=ns.images or None,
        scorer=ns.scorer, clip_model=ns.clip_model, dino_model=ns.dino_model, detector=ns.detector_model,
        steps=ns.steps, guidance=ns.guidance, batch_size=ns.batch_size, text_mode=ns.clip_t_text,
        fidelity=ns.fidelity, out_dir=ns.out, save_images=not ns.no_save_images, write_back=not ns.no_write)
    uses = [ConceptUse(*split_concept_spec(s)) for s in ns.concept]
    if ns.sweep is None:
        report = studio.evaluate(uses, store_refs=ns.store_refs, **options)
        print(format_summary(report))
        print(Path(ns.out) / "report.json")
        return 0
    try:
        strengths = [float(s) for s in ns.sweep.split(",") if s.strip()]
    except ValueError:
        raise StudioError(f"--sweep takes comma-separated strengths such as 0,0.5,1; got {ns.sweep!r}.") from None
    if len(uses) != 1 or ns.store_refs:
        raise StudioError("--sweep scores one --concept (without --store-refs).")
    result = studio.sweep(uses[0], strengths, **options)
    for point in result.points:
        print(f"strength {point.value:<5g} {result.fidelity} {point.fidelity:.4f}  {result.editability} "
              f"{point.editability:.4f}")
    print(f"recommended strength {result.choice.value:g} ({result.choice.rule})")
    print(result.paths.get("sweep", Path(ns.out) / "sweep.json"))
    return 0


def cmd_jobs(ns: argparse.Namespace) -> int:
    from studio.jobs.cli import run

    return run(ns, _settings(ns) if ns.action == "submit" else None)


def main(argv: list[str] | None = None) -> int:
    import os

    # transformers warns at import that torchvision is absent (it never is needed here).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        handler = {"generate": cmd_generate, "concepts": cmd_concepts, "train": cmd_train, "jobs": cmd_jobs,
                   "evaluate": cmd_evaluate}[ns.command]
        return handler(ns)
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
