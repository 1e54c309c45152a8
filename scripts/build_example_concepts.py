"""Build the example concepts shipped in ``concepts/`` for the demo world base.

    python scripts/build_example_concepts.py                        # (re)train and write concepts/world-*.safetensors
    python scripts/build_example_concepts.py --check                # exit 1 if an example is missing or stale
    python scripts/build_example_concepts.py --methods ti neti      # only these examples
    python scripts/build_example_concepts.py --out /tmp/examples    # somewhere else

The demo world's concept (``studio.world.CONCEPT``: a purple dotted circle, class word "circle") is
trained on the demo base — loaded as a user loads it, ``--base demo`` on the CPU in float32 — once per
concept method, each with the trainer's **default** settings (no preset, the profile that knows
nothing about the base: what ``tests/learning/defaults.py`` runs) and a fixed seed, each under its
own trigger so the examples can share one prompt:

* ``world-ti``: textual-inversion, trigger ``<hrt-ti>`` ("a photo of a <hrt-ti>");
* ``world-lora``: dreambooth (a LoRA), trigger ``<sks>`` ("a photo of a <sks> circle");
* ``world-perfusion``: perfusion, trigger ``<hrt-perfusion>`` ("a photo of a <hrt-perfusion>");
* ``world-neti``: neti, trigger ``<hrt-neti>`` ("a photo of a <hrt-neti>").

DreamBooth binds a rare word that the vocabulary already holds (``trainers.lora.RARE_IDENTIFIERS``)
to the class word, so its trigger is ``<sks>`` — its own first choice, written out so that the
example does not depend on what else a library holds — and it goes with the class word ("sks
circle"); the other methods add new tokens, and the trigger alone names the subject. IP-Adapter is
left out: it trains an adapter for a base, not a concept.

Each concept is then scored by the world's oracle as the learning harness scores
(``tests/learning/harness.py``: the task's five evaluation prompts, 8 images each, per evaluation
seed; fidelity = the oracle's P(concept), editability = the share of images showing the background
or size the prompt asked for), and the scores go where ``Studio.evaluate`` puts them and the
Concepts tab reads them (``studio.metrics["eval"]["scores"]``). ``studio.metrics["example"]`` says
that the file is an example and which command made it. The preview (``a photo of a <trigger> on a
teal background``, seed 0) is rendered through the studio's generation and written with the file by
the library (atomic writes).

``--check`` rewrites nothing: it fails when an example is missing, unreadable, not made by this
script's recipe (``RECIPE``), has no scores or preview, or was trained on another build of the demo
base (its stored base identity and compatibility key against the base loaded now) — then run this
script again and commit the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "concepts"
COMMAND = "python scripts/build_example_concepts.py"
RECIPE = 1
"""Bump when what this script trains or measures changes: ``--check`` then asks for a rebuild."""
SEED = 0
EVAL_SEEDS = (0, 1)
PER_PROMPT = 8  # images per evaluation prompt and seed, as tests/learning/harness.py
PREVIEW_PROMPT = "a photo of a {} on a teal background"
PREVIEW_SEED = 0
BASE_SPEC = "demo"


class Example(NamedTuple):
    key: str  # the name's suffix and the --methods value
    trainer: str  # the trainers registry's CLI name
    token: str

    @property
    def name(self) -> str:
        return f"world-{self.key}"


EXAMPLES: tuple[Example, ...] = (
    Example("ti", "textual-inversion", "<hrt-ti>"),
    Example("lora", "dreambooth", "<sks>"),
    Example("perfusion", "perfusion", "<hrt-perfusion>"),
    Example("neti", "neti", "<hrt-neti>"),
)
BY_KEY = {e.key: e for e in EXAMPLES}


def load_demo_base() -> Any:
    """The demo base as users load it (``--base demo``), on the CPU in float32."""
    from studio.models import BaseSettings

    return BaseSettings(base=BASE_SPEC, device="cpu", dtype="fp32").load()


# -- training ----------------------------------------------------------------------------------------
def train_example(example: Example, base: Any, workdir: Path, seed: int) -> tuple[Any, float]:
    """Train ``example`` with its trainer's defaults on the world's concept photos; ``(concept, seconds)``."""
    from studio.models.profile import GENERIC
    from studio.world import CONCEPT
    from trainers import get_trainer
    from trainers.runner import train

    images = workdir / "images"
    if not images.is_dir():
        CONCEPT.write_training_folder(images, seed=seed)
    entry = get_trainer(example.trainer)
    values: dict[str, Any] = dict(images=str(images), class_word=CONCEPT.class_word, seed=seed, log_every=0,
                                  token=example.token, name=example.name,
                                  out=str(workdir / f"{example.name}.safetensors"))
    if "class_cache_dir" in {f.name for f in dataclasses.fields(entry.config_cls)}:
        values["class_cache_dir"] = str(workdir / "class-images")
    # no preset, a profile that knows nothing about the base: the trainer's own defaults
    cfg = entry.resolve(profile=GENERIC, **values)
    t0 = time.perf_counter()
    result = train(entry, cfg, base)
    seconds = time.perf_counter() - t0
    concept = result.concept
    # paths of this machine's temporary folders say nothing to whoever reads the shipped file
    for key, text in (("images", f"studio.world.CONCEPT.write_training_folder(seed={seed})"),
                      ("out", ""), ("class_cache_dir", "")):
        if key in concept.train:
            concept.train[key] = text
    return concept, seconds


# -- measuring ---------------------------------------------------------------------------------------
def generator(base: Any, concept: Any | None) -> Any:
    """A world generator (``prompts, seed -> images``) rendering with ``concept`` applied through its method,
    the trigger in the prompt rewritten as the method says (``tests.learning.defaults.trained``)."""
    from studio.methods import get_method
    from studio.prompts import rewrite
    from studio.world.score import pipeline_generator

    plain = pipeline_generator(base.pipe)
    if concept is None:
        return plain

    def generate(prompts: Sequence[str], seed: int) -> list[Any]:
        handle = get_method(concept.method).apply(base, concept, strength=1.0)
        try:
            return plain([rewrite(p, {concept.trigger: handle.prompt_text()}) for p in prompts], seed)
        finally:
            handle.remove()

    return generate


def measure(base: Any, concept: Any | None, oracle: Any, seeds: Sequence[int] = EVAL_SEEDS) -> dict[str, float]:
    """Oracle fidelity and editability over ``seeds`` (``None``: the base with the bare class word)."""
    from studio.world import CONCEPT
    from studio.world.score import evaluate

    generate = generator(base, concept)
    subject = concept.trigger if concept is not None else CONCEPT.class_word
    scores = [evaluate(generate, subject, CONCEPT, per_prompt=PER_PROMPT, seed=s, oracle=oracle) for s in seeds]
    return {"fidelity": sum(s.fidelity for s in scores) / len(scores),
            "editability": sum(s.editability for s in scores) / len(scores),
            "images": sum(s.n_images for s in scores)}


def upper_bound(oracle: Any, seeds: Sequence[int] = EVAL_SEEDS) -> dict[str, float]:
    from studio.world import CONCEPT
    from studio.world.score import upper_bound as real

    scores = [real(CONCEPT, per_prompt=PER_PROMPT, seed=s, oracle=oracle) for s in seeds]
    return {"fidelity": sum(s.fidelity for s in scores) / len(scores),
            "editability": sum(s.editability for s in scores) / len(scores)}


def eval_record(base: Any, measured: dict[str, float], oracle_name: str, refs: dict[str, Any],
                name: str) -> dict[str, Any]:
    """``studio.metrics["eval"]`` in the schema of :func:`studio.evaluation.summary` (what ``Studio.evaluate``
    writes and the Concepts tab reads), with the harness's references beside it."""
    from studio.world import CONCEPT
    from studio.world.score import GUIDANCE_SCALE, NUM_STEPS

    return {
        "scores": {"fidelity": round(measured["fidelity"], 6), "editability": round(measured["editability"], 6)},
        "fidelity": "fidelity", "editability": "editability",
        "backbones": {"fidelity": oracle_name, "editability": oracle_name},
        "protocol": "world", "prompts": len(CONCEPT.eval_prompts), "images": measured["images"],
        "seeds": PER_PROMPT * len(EVAL_SEEDS), "eval_seeds": list(EVAL_SEEDS), "steps": NUM_STEPS,
        "guidance": GUIDANCE_SCALE,
        "strengths": {name: 1.0}, "base": base.name, "clip_t_text": None,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": name,
        "references": refs,
    }


def preview(base: Any, concept: Any) -> Any:
    """The card's picture: the studio's own generation, the trigger as the method names the subject."""
    from studio.evaluation import build_prompts
    from studio.generation import GenerateConfig, generate

    prompt = build_prompts([PREVIEW_PROMPT], [concept])[0]
    return generate(base, GenerateConfig(prompt=prompt, seed=PREVIEW_SEED), [(concept, None, concept.name)])[0]


# -- checking ----------------------------------------------------------------------------------------
def problems(folder: str | Path, base: Any, examples: Sequence[Example] = EXAMPLES) -> list[str]:
    """Why the examples in ``folder`` are not current for ``base`` (empty: they are)."""
    from studio.errors import StudioError
    from studio.library import Library

    library = Library(folder)
    out = []
    for ex in examples:
        if not library.exists(ex.name):
            out.append(f"{ex.name}: missing from {library.folder}")
            continue
        try:
            concept = library.load(ex.name)
        except StudioError as err:
            out.append(f"{ex.name}: unreadable ({err})")
            continue
        info = library.info(ex.name)
        made = concept.metrics.get("example") if isinstance(concept.metrics.get("example"), dict) else {}
        scores = (concept.metrics.get("eval") or {}).get("scores") or {}
        if concept.trigger != ex.token:
            out.append(f"{ex.name}: trigger {concept.trigger}, expected {ex.token}")
        if made.get("recipe") != RECIPE:
            out.append(f"{ex.name}: made by recipe {made.get('recipe')}, this script's is {RECIPE}")
        if not {"fidelity", "editability"} <= set(scores):
            out.append(f"{ex.name}: no fidelity/editability scores in studio.metrics['eval']")
        if info.preview is None:
            out.append(f"{ex.name}: no preview {library.preview_path(ex.name).name}")
        if concept.base.get("compat") != base.compat:
            out.append(f"{ex.name}: trained for another base layout ({concept.base.get('compat')})")
        elif concept.base.get("identity") != base.identity:
            out.append(f"{ex.name}: trained on demo base {concept.base.get('identity')}, the demo base is now "
                       f"{base.identity}")
    return out


# -- the command -------------------------------------------------------------------------------------
def command_line(args: argparse.Namespace) -> str:
    """The command that rebuilds these files, as typed in the repository's root."""
    parts = [COMMAND]
    if args.seed != SEED:
        parts += ["--seed", str(args.seed)]
    if [e.key for e in args.examples] != [e.key for e in EXAMPLES]:
        parts += ["--methods", *(e.key for e in args.examples)]
    return " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts))


def build(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from studio.evaluation import WorldJudge
    from studio.library import Library
    from studio.world.oracle import load_oracle

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base = load_demo_base()
    oracle = load_oracle("cpu")
    oracle_name = WorldJudge("cpu").name
    library = Library(args.out)
    print(f"demo base {base.identity}; measuring the references ({PER_PROMPT} images per prompt, seeds "
          f"{', '.join(map(str, EVAL_SEEDS))}) ...", flush=True)
    refs = {"baseline": measure(base, None, oracle), "upper": upper_bound(oracle)}
    refs["baseline"].pop("images")
    refs = {k: {m: round(v, 6) for m, v in r.items()} for k, r in refs.items()}
    print(f"  baseline (class word): fidelity {refs['baseline']['fidelity']:.3f}, editability "
          f"{refs['baseline']['editability']:.3f}; upper bound (real renders): fidelity {refs['upper']['fidelity']:.3f}, "
          f"editability {refs['upper']['editability']:.3f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="studio-examples-") as tmp:
        for ex in args.examples:
            print(f"{ex.name}: training {ex.trainer} (defaults, seed {args.seed}, trigger {ex.token}) ...", flush=True)
            concept, seconds = train_example(ex, base, Path(tmp), args.seed)
            t0 = time.perf_counter()
            measured = measure(base, concept, oracle)
            concept.metrics = dict(concept.metrics) | {
                "eval": eval_record(base, measured, oracle_name, refs, ex.name),
                "example": {"recipe": RECIPE, "command": command_line(args), "trainer": ex.trainer,
                            "preset": None, "seed": args.seed, "train_seconds": round(seconds, 1),
                            "note": "an example concept shipped with the studio for the demo world base"},
            }
            image = preview(base, concept)
            path = library.add(concept, ex.name, force=True, preview=image)
            verdict = concept.metrics.get("verdict") or {}
            rows.append({"name": ex.name, "method": concept.method, "trainer": ex.trainer, "trigger": ex.token,
                         "kb": path.stat().st_size / 1024, "fidelity": measured["fidelity"],
                         "editability": measured["editability"], "train_s": seconds,
                         "verdict": verdict.get("verdict", ""), "steps": (verdict.get("budget") or {}).get("steps_run"),
                         "kept": (verdict.get("budget") or {}).get("kept_step")})
            print(f"  {path} ({rows[-1]['kb']:.1f} KB): fidelity {measured['fidelity']:.3f}, editability "
                  f"{measured['editability']:.3f}; trained in {seconds:.0f} s, scored in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print(table(rows))
    print(f"\nbaseline fidelity {refs['baseline']['fidelity']:.3f} / editability {refs['baseline']['editability']:.3f}; "
          f"{len(EVAL_SEEDS) * PER_PROMPT * 5} oracle-scored images per example; total {time.perf_counter() - t_start:.0f} s")
    return rows


LABELS = {"textual-inversion": "textual inversion", "dreambooth": "DreamBooth-LoRA", "perfusion": "Perfusion",
          "neti": "NeTI"}


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| example | method | trigger | size | fidelity | editability | training |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {LABELS.get(r['trainer'], r['trainer'])} | `{r['trigger']}` | "
                     f"{r['kb']:.1f} KB | {r['fidelity']:.3f} | {r['editability']:.3f} | {r['train_s']:.0f} s |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="library folder to write (default: concepts/)")
    parser.add_argument("--methods", nargs="+", choices=list(BY_KEY), default=list(BY_KEY),
                        help="which examples (default: all)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"training seed (default {SEED})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the same bits every run)")
    parser.add_argument("--check", action="store_true",
                        help="verify the files in --out are current for the demo base; write nothing")
    args = parser.parse_args(argv)
    args.examples = [BY_KEY[k] for k in dict.fromkeys(args.methods)]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        found = problems(args.out, load_demo_base(), args.examples)
        for line in found:
            print(line)
        if found:
            print(f"The example concepts are out of date: run {COMMAND} and commit {args.out}.")
            return 1
        print(f"{len(args.examples)} example concept(s) in {args.out} are current for the demo base.")
        return 0
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
