"""``python -m studio``: generate, manage concepts, train, queue training jobs, evaluate, compare.

User mistakes print one line on stderr and exit with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from studio.configs import add_arguments, from_namespace
from studio.errors import StudioError
from studio.library import DEFAULT_LIBRARY


def _base_flags(p: argparse.ArgumentParser) -> None:
    """The flags of :class:`~studio.models.BaseSettings` (``--base``, ``--device`` …)."""
    from studio.models import BaseSettings

    add_arguments(p, BaseSettings)


def _settings(ns: argparse.Namespace) -> Any:
    from studio.models import BaseSettings

    return from_namespace(BaseSettings, ns)


def _library_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", default=DEFAULT_LIBRARY, help=f"concept library folder (default: {DEFAULT_LIBRARY})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="The personalization studio.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render images, optionally with concepts")
    _base_flags(g)
    _library_flag(g)
    from studio.generation import GenerateConfig

    add_arguments(g, GenerateConfig)
    g.add_argument("--concept", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a concept file or library name, optionally with a default strength (repeatable); "
                        "ProSpect concepts also take stages: FILE@0-3[:STRENGTH] (stage 0 = the noisiest) or "
                        "FILE:S0,S1,… (one strength per stage)")
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
    p = csub.add_parser("merge", help="merge Custom Diffusion concepts into one (closed form; needs the base)",
                        description="Merge two or more Custom Diffusion concepts into one concept holding every "
                        "token: per cross-attention layer, the K/V weights closest to the base on regularisation "
                        "captions that reproduce each concept's K/V on its own token phrases (Kumari et al. 2023, §3.2).")
    _base_flags(p)
    _library_flag(p)
    p.add_argument("sources", nargs="+", help="concept files or library names (two or more)")
    p.add_argument("--out", required=True, help="library name of the merged concept, or an output .safetensors")
    p.add_argument("--captions", default=None, metavar="FILE",
                   help="regularisation captions, one per line (default: 1,000 generic captions)")
    p.add_argument("--force", action="store_true", help="replace an existing concept or file")
    from studio.methods.interop import export_formats_by_method, export_formats_help

    formats = list(dict.fromkeys(f for fs in export_formats_by_method().values() for f in fs))
    p = csub.add_parser("export", help=f"export a concept ({', '.join(formats)})",
                        description="Write a library concept as a studio file or in another tool's format. Formats "
                        f"(and the methods they take): {export_formats_help()}.")
    _library_flag(p)
    p.add_argument("name", help="the concept's name in the library")
    p.add_argument("out", help="output .safetensors file (for a diffusers LoRA also a folder)")
    p.add_argument("--format", default="studio", metavar="FORMAT",
                   help=f"one of: {export_formats_help()}")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    _hub_parsers(csub)

    t = sub.add_parser("train", help="train a concept")
    tsub = t.add_subparsers(dest="method", required=True)
    from studio.jobs.cli import queue_flags
    from trainers import trainer_registry
    from trainers.runner import add_cli_arguments

    for entry in trainer_registry().values():
        p = tsub.add_parser(entry.cli_name, help=entry.help, description=entry.help)
        _base_flags(p)
        _library_flag(p)
        p.add_argument("--queue", action="store_true",
                       help="add a job to the training queue instead of training now (`python -m studio jobs work` "
                            "runs it)")
        queue_flags(p)
        add_cli_arguments(entry, p)

    from studio.jobs.cli import add_parser as add_jobs_parser

    add_jobs_parser(sub, base_flags=_base_flags, library_flag=_library_flag)
    _evaluate_parser(sub)
    _compare_parser(sub)
    from studio.dataset.cli import add_parser as add_dataset_parser

    add_dataset_parser(sub)
    return parser


def _hub_parsers(csub: Any) -> None:
    """``concepts push`` / ``concepts pull``: share concepts on the Hugging Face Hub (:mod:`studio.hub`)."""
    endpoint_help = "hub URL (default: HF_ENDPOINT or https://huggingface.co)"
    p = csub.add_parser("push", help="upload a concept, its preview and a model card to a Hugging Face Hub repo")
    _library_flag(p)
    p.add_argument("name", help="the concept's name in the library")
    p.add_argument("--repo", required=True, metavar="USER/REPO", help="the hub model repo (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                   "visibility)")
    p.add_argument("--token", default=None, help="token with write access (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--endpoint", default=None, help=endpoint_help)
    p = csub.add_parser("pull", help="download a concept from a Hugging Face Hub repo into the library")
    _library_flag(p)
    p.add_argument("spec", metavar="USER/REPO[/FILE]", help="the repo (its one .safetensors file) or a file in it; "
                   "@REVISION after the repo or the file picks a branch, tag or commit")
    p.add_argument("--name", default=None, help="library name (default: the concept's own)")
    p.add_argument("--token", default=None, help="for private or gated repos (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--endpoint", default=None, help=endpoint_help)
    p.add_argument("--force", action="store_true", help="replace a concept of the same name")


def _evaluate_parser(sub: Any) -> None:
    from studio.configs import add_arguments
    from studio.evaluation.config import EvaluateConfig

    e = sub.add_parser("evaluate", help="generate and score concepts: CLIP-T/CLIP-I/DINO (CP-CLIP for several), "
                       "or the demo world's oracle; optionally sweep the strength")
    _base_flags(e)
    _library_flag(e)
    e.add_argument("--concept", action="append", required=True, metavar="FILE[@STAGES][:STRENGTH]",
                   help="concept file or library name (repeat for a multi-concept evaluation); ProSpect concepts by "
                   "stage as on generate: FILE@0-4 (stages 0-4 on, the others off), FILE@0-4:0.8, FILE:1,1,0.5,…")
    e.add_argument("--images", action="append", default=[], metavar="REFDIR",
                   help="reference photos of each --concept, in the same order (default: the embeddings stored in "
                        "the concept)")
    add_arguments(e, EvaluateConfig)  # --prompts, --protocol, --seeds … --out: one flag per EvaluateConfig field


def cmd_generate(ns: argparse.Namespace) -> int:
    from studio.generation import ConceptUse, GenerateConfig, png_info
    from studio.prompts import parse_concept_spec
    from studio.service import Studio

    cfg = from_namespace(GenerateConfig, ns, concepts=[ConceptUse(*parse_concept_spec(s)) for s in ns.concept])
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
        from trainers.probe import verdict_of

        rows = [i.row() | {"verdict": verdict_of(i.metrics)} for i in lib.list()]
        if ns.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no concepts in {lib.folder}")
        else:
            cols = ["name", "method", "trigger", "class_word", "base", "strength", "size_kb", "verdict"]
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
    elif ns.action == "merge":
        from studio.service import Studio

        path, summary = Studio(_settings(ns), library=ns.library).merge_concepts(
            ns.sources, ns.out, captions=ns.captions, force=ns.force)
        print(summary, file=sys.stderr)
        print(path)
    elif ns.action == "push":
        from studio.hub import push

        print(push(lib, ns.name, ns.repo, token=ns.token, private=ns.private, endpoint=ns.endpoint))
    elif ns.action == "pull":
        from studio.hub import pull

        print(pull(lib, ns.spec, name=ns.name, token=ns.token, endpoint=ns.endpoint, force=ns.force))
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
    from studio.configs import from_namespace
    from studio.evaluation import EvaluateConfig, format_summary
    from studio.generation import ConceptUse
    from studio.prompts import parse_concept_spec
    from studio.service import Studio

    cfg = from_namespace(EvaluateConfig, ns)
    if not cfg.out_dir:
        raise StudioError("--out DIR is required: the folder for report.json, contact_sheet.png and the images.")
    if ns.images and len(ns.images) != len(ns.concept):
        raise StudioError(f"Got {len(ns.images)} --images folders for {len(ns.concept)} --concept; give one per "
                          "concept, in the same order, or none (stored embeddings).")
    uses = [ConceptUse(*parse_concept_spec(s)) for s in ns.concept]  # generate's parser: FILE@0-4:0.8 too
    strengths = cfg.strengths()
    if strengths is not None and (len(uses) != 1 or cfg.store_refs):
        raise StudioError("--sweep scores one --concept (without --store-refs).")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of the scoring models
    studio = Studio(_settings(ns), library=ns.library)
    references = ns.images or None
    if strengths is None:
        report = studio.evaluate(uses, cfg, references=references)
        print(format_summary(report))
        print(Path(cfg.out_dir) / "report.json")
        return 0
    result = studio.sweep(uses[0], strengths, cfg, references=references)
    for point in result.points:
        print(f"strength {point.value:<5g} {result.fidelity} {point.fidelity:.4f}  {result.editability} "
              f"{point.editability:.4f}")
    print(f"recommended strength {result.choice.value:g} ({result.choice.rule})")
    print(result.paths.get("sweep", Path(cfg.out_dir) / "sweep.json"))
    return 0


def _compare_parser(sub: Any) -> None:
    from studio.configs import add_arguments
    from studio.evaluation.config import EvaluateConfig

    p = sub.add_parser("compare", help="A/B: concepts (or one concept at several strengths, or the base alone) with "
                       "the same prompts and seeds, side by side with their scores")
    _base_flags(p)
    _library_flag(p)
    p.add_argument("--concept", action="append", required=True, metavar="FILE[@STAGES][:STRENGTH]",
                   help="concept file or library name, a column each (repeat: A, B …); ProSpect concepts by stage "
                   "as on generate: FILE@0-4, FILE@5-9:0.8, FILE:1,1,0.5,…")
    p.add_argument("--strengths", default=None, metavar="S1,S2,...",
                   help="one --concept at each of these strengths, a column each, e.g. 0,0.5,1")
    p.add_argument("--baseline", action="store_true", help="add a first column with the base alone")
    p.add_argument("--images", default=None, metavar="REFDIR",
                   help="reference photos of the subject, for every column (default: the embeddings stored in the "
                        "concepts)")
    # --prompts, --protocol, --seeds, --steps, --scorer … --out: the evaluation's flags
    add_arguments(p, EvaluateConfig, skip=("sweep", "store_refs", "write_back"))


def cmd_compare(ns: argparse.Namespace) -> int:
    from studio.compare import arms_for_concepts, arms_for_strengths
    from studio.configs import from_namespace
    from studio.evaluation import EvaluateConfig
    from studio.generation import ConceptUse
    from studio.prompts import parse_concept_spec
    from studio.service import Studio

    cfg = from_namespace(EvaluateConfig, ns)
    if not cfg.out_dir:
        raise StudioError("--out DIR is required: the folder for compare.png and compare.json.")
    uses = [ConceptUse(*parse_concept_spec(s)) for s in ns.concept]  # generate's parser: FILE@0-4:0.8 too
    if ns.strengths is not None:
        if len(uses) != 1:
            raise StudioError("--strengths compares one --concept at several strengths; give exactly one --concept.")
        arms = arms_for_strengths(uses[0], ns.strengths, baseline=ns.baseline)  # its stages kept (FILE@0-4)
    else:
        if len(uses) < 2 and not ns.baseline:
            raise StudioError("Give two --concept (A and B), or one with --strengths 0,0.5,1 or --baseline.")
        arms = arms_for_concepts(uses, baseline=ns.baseline)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of the scoring models
    studio = Studio(_settings(ns), library=ns.library)
    result = studio.compare(arms, cfg, references=ns.images)
    for note in result.notes:
        print(note, file=sys.stderr)
    print(result.format_table())
    print(result.paths["image"])
    print(result.paths["json"])
    return 0


def cmd_jobs(ns: argparse.Namespace) -> int:
    from studio.jobs.cli import run

    return run(ns, _settings(ns) if ns.action == "submit" else None)


def cmd_dataset(ns: argparse.Namespace) -> int:
    from studio.dataset.cli import run

    return run(ns)


def main(argv: list[str] | None = None) -> int:
    import os

    # transformers warns at import that torchvision is absent (it never is needed here).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        handler = {"generate": cmd_generate, "concepts": cmd_concepts, "train": cmd_train, "jobs": cmd_jobs,
                   "evaluate": cmd_evaluate, "compare": cmd_compare, "dataset": cmd_dataset}[ns.command]
        return handler(ns)
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
