"""Method comparisons measured in the learnable world, over seeds (the README's learning tables).

    python bench/world_compare.py table     [--seeds 0 1] [--methods ti dreambooth perfusion neti adapter]
    python bench/world_compare.py ti-init   [--seeds 0 1 2] [--steps 200] [--every 20]
    python bench/world_compare.py prior     [--seeds 0 1 2]
    python bench/world_compare.py neti-truncation [--seeds 0 1 2]
    python bench/world_compare.py classdiffusion | core | prospect | custom-diffusion [--seeds 0 1 2]
    python bench/world_compare.py decor [--seeds 0 1 2] [--methods ti dreambooth perfusion neti] [--strength 1]

* ``table``: every trainer with its learning-test settings: fidelity, editability, seconds
  (training + scoring, one process, 2 CPU cores) and the concept file's size.
* ``ti-init``: Cross Initialization vs plain textual inversion (same steps, lr, batch): the concept
  is scored every ``--every`` steps; **steps to bar** is the first step where fidelity and
  editability both clear the learning bars of :mod:`tests.learning.harness`.
* ``prior``: DreamBooth-LoRA with and without prior preservation: fidelity/editability of the
  concept, and **class drift** — how often the plain class prompt ("a photo of a circle" …), with
  the LoRA applied, renders the concept instead of any circle (the language drift prior
  preservation exists to prevent).
* ``neti-truncation``: one mapper per seed, scored at several strengths (nested-dropout
  truncation): the fidelity ↔ editability curve.
* ``classdiffusion`` / ``core`` / ``prospect`` / ``custom-diffusion``: each wave method against the one
  it improves (same photos, steps, lr and seeds, interleaved), scored by :func:`score_trained` — the
  one-attribute evaluation, the two-attribute one (:data:`studio.world.HARD_CONCEPT`) and class drift.
* ``decor``: each method's concept scored without and with DECOR at inference (the same trained
  concept, so the difference is DECOR's alone).

Numbers are means ± standard deviations over the seeds, printed as Markdown tables; nothing is
asserted here (a paper's claim is measured, not assumed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mean_sd(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _header() -> None:
    import torch

    from tests.learning.harness import references

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"references: {references()}\n", flush=True)


# ----------------------------------------------------------------------------------------------
def _trainers() -> dict[str, tuple[str, Callable]]:
    from tests.learning import (
        test_adapter_learns,
        test_dreambooth_learns,
        test_neti_learns,
        test_perfusion_learns,
        test_textual_inversion_learns,
    )

    return {
        "ti": ("textual inversion (Cross-Init)", test_textual_inversion_learns.train_textual_inversion),
        "dreambooth": ("DreamBooth-LoRA", None),  # needs a work folder: built in table()
        "perfusion": ("Perfusion", test_perfusion_learns.train_perfusion),
        "neti": ("NeTI", test_neti_learns.train_neti),
        "adapter": ("IP-Adapter fine-tune (zero-shot from 1 photo)", test_adapter_learns.train_adapter),
        "_dreambooth": ("", test_dreambooth_learns.train_dreambooth),
    }


def table(seeds: Sequence[int], methods: Sequence[str]) -> None:
    """The learning table: each trainer × seeds → fidelity, editability, seconds, file size."""
    from studio.world import CONCEPT
    from studio.world.score import evaluate
    from tests.learning.harness import PER_PROMPT, oracle, references

    refs = references()
    trainers = _trainers()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in methods:
            label, train = trainers[key]
            if key == "dreambooth":
                train = trainers["_dreambooth"][1](Path(tmp) / "db")
            results = []
            for seed in seeds:
                images = Path(tmp) / key / f"concept-seed{seed}"
                CONCEPT.write_training_folder(images, seed=seed)
                t0 = time.perf_counter()
                trained = train(images, seed, 1.0)
                scores = evaluate(trained.generate, trained.subject, CONCEPT, per_prompt=PER_PROMPT, seed=seed,
                                  oracle=oracle())
                seconds = time.perf_counter() - t0
                results.append((scores.fidelity, scores.editability, seconds, trained.size_bytes))
                print(f"{label} seed {seed}: {scores}, {seconds:.1f}s, {trained.size_bytes} bytes", flush=True)
            rows.append((label, results))
    print(f"\n| method | fidelity | editability | seconds | file size |  (bars: fidelity ≥ {refs.fidelity_bar:.3f}, "
          f"editability ≥ {refs.editability_bar:.3f})")
    print("|---|---|---|---|---|")
    print(f"| base model, class word only (baseline) | {refs.baseline.fidelity:.3f} | {refs.baseline.editability:.3f} "
          "| — | — |")
    print(f"| real renders of the concept (upper bound) | {refs.upper.fidelity:.3f} | {refs.upper.editability:.3f} "
          "| — | — |")
    for label, r in rows:
        size = r[0][3]
        print(f"| {label} | {_mean_sd([x[0] for x in r])} | {_mean_sd([x[1] for x in r])} | "
              f"{statistics.mean(x[2] for x in r):.0f} | {f'{size / 1024:.1f} KB' if size else '—'} |")


# ----------------------------------------------------------------------------------------------
def ti_init(seeds: Sequence[int], steps: int, every: int) -> None:
    """Cross Initialization vs plain TI: fidelity over steps and steps to the bars."""
    import copy

    from studio.methods import get_method
    from studio.prompts import rewrite
    from studio.world import CONCEPT
    from studio.world.score import evaluate, pipeline_generator
    from tests.learning.harness import PER_PROMPT, oracle, references
    from tests.learning.test_textual_inversion_learns import SETTINGS, TOKEN, _base
    from trainers import get_trainer
    from trainers.loop import TrainCallbacks, run_training

    refs = references()
    entry = get_trainer("textual-inversion")
    base = _base()
    plain = pipeline_generator(base.pipe)
    rows: dict[str, list[tuple[int | None, float, float, float]]] = {"cross": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            images = Path(tmp) / f"seed{seed}"
            CONCEPT.write_training_folder(images, seed=seed)
            for init in ("cross", "plain"):
                snapshots: list[tuple[int, object]] = []

                class Keep(TrainCallbacks):
                    def __init__(self, into: list) -> None:
                        self.into = into

                    def on_eval(self, step: int, concept) -> None:
                        self.into.append((step, copy.deepcopy(concept)))

                settings = dict(SETTINGS, init=init, steps=steps)
                cfg = entry.resolve(images=str(images), class_word=CONCEPT.class_word, token=TOKEN, seed=seed,
                                  log_every=0, eval_every=every, **settings)
                t0 = time.perf_counter()
                run_training(base, entry.make_trainer(base, cfg, TOKEN), cfg, method=entry.method, save=False,
                             callbacks=Keep(snapshots))
                seconds = time.perf_counter() - t0
                reached, curve = None, []
                for step, concept in snapshots:
                    handle = get_method(entry.method).apply(base, concept, strength=1.0)
                    try:
                        def generate(prompts, gen_seed, _h=handle, _c=concept):
                            return plain([rewrite(p, {_c.trigger: _h.prompt_text()}) for p in prompts], gen_seed)

                        scores = evaluate(generate, TOKEN, CONCEPT, per_prompt=PER_PROMPT,
                                          seed=seed, oracle=oracle())
                    finally:
                        handle.remove()
                    curve.append(f"{step}:{scores.fidelity:.2f}")
                    if reached is None and scores.fidelity >= refs.fidelity_bar and \
                            scores.editability >= refs.editability_bar:
                        reached = step
                final = scores
                rows[init].append((reached, final.fidelity, final.editability, seconds))
                print(f"seed {seed} {init:5s}: steps to bar {reached}, final {final}, train {seconds:.1f}s; "
                      f"fidelity by step {' '.join(curve)}", flush=True)
    print(f"\n| init | steps to bar (of {steps}) | seeds reaching it | fidelity @{steps} | editability @{steps} |")
    print("|---|---|---|---|---|")
    for init, r in rows.items():
        hit = [x[0] for x in r if x[0] is not None]
        print(f"| {init} | {_mean_sd([float(h) for h in hit]) if hit else 'never'} | {len(hit)}/{len(r)} | "
              f"{_mean_sd([x[1] for x in r])} | {_mean_sd([x[2] for x in r])} |")


# ----------------------------------------------------------------------------------------------
def prior(seeds: Sequence[int]) -> None:
    """DreamBooth-LoRA with vs without prior preservation: concept scores and class drift."""
    from studio.world import CONCEPT, describe
    from studio.world.score import fidelity, pipeline_generator
    from tests.learning import test_dreambooth_learns as db
    from tests.learning.harness import PER_PROMPT, measure, oracle

    class_prompts = [describe(noun=CONCEPT.class_word, background=bg) for bg in ("white", "black", "pink", "teal")]
    class_prompts.append(describe(noun=CONCEPT.class_word))
    rows: dict[str, list[tuple[float, float, float]]] = {"with prior": [], "without prior": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for label, use_prior in (("with prior", True), ("without prior", False)):
                db.SETTINGS["prior_preservation"] = use_prior
                concepts: list = []
                train = db.train_dreambooth(Path(tmp))

                def keep(images_dir, s, lr_scale, _train=train, _into=concepts):
                    trained = _train(images_dir, s, lr_scale)
                    _into.append(trained)
                    return trained

                scores, seconds = measure(keep, Path(tmp) / label.replace(" ", "-"), seed)
                # class drift: the plain class prompt, with the LoRA applied
                images = concepts[0].generate([p for p in class_prompts for _ in range(PER_PROMPT)], seed + 500)
                drift = fidelity(images, oracle())
                rows[label].append((scores.fidelity, scores.editability, drift))
                print(f"seed {seed} {label}: {scores}, class drift {drift:.3f}, {seconds:.1f}s", flush=True)
    db.SETTINGS["prior_preservation"] = True
    base_drift = fidelity(pipeline_generator(db._demo_base().pipe)(
        [p for p in class_prompts for _ in range(PER_PROMPT)], 500), oracle())
    print(f"\nclass drift of the base model itself: {base_drift:.3f}")
    print("\n| DreamBooth-LoRA | fidelity | editability | class drift (lower is better) |")
    print("|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {_mean_sd([x[0] for x in r])} | {_mean_sd([x[1] for x in r])} | "
              f"{_mean_sd([x[2] for x in r])} |")


# ----------------------------------------------------------------------------------------------
def neti_truncation(seeds: Sequence[int], strengths: Sequence[float]) -> None:
    """NeTI: one mapper per seed, scored at each strength (truncation of the nested-dropout code)."""
    from studio.methods.neti import truncation_for
    from tests.learning.test_neti_learns import truncation_curve

    table: dict[float, list[tuple[float, float]]] = {s: [] for s in strengths}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for s, scores in truncation_curve(Path(tmp), strengths, seed=seed):
                table[s].append((scores.fidelity, scores.editability))
                print(f"seed {seed} strength {s:.2f}: {scores}", flush=True)
    print("\n| strength | hidden dims kept | fidelity | editability |")
    print("|---|---|---|---|")
    for s, r in table.items():
        kept = truncation_for(s, 128) or 128
        print(f"| {s:.2f} | {kept} of 128 | {_mean_sd([x[0] for x in r])} | {_mean_sd([x[1] for x in r])} |")


# ----------------------------------------------------------------------------------------------
# With vs without: the regularizers and variants of the "beyond every peer" wave
# ----------------------------------------------------------------------------------------------
VersusRow = dict[str, float]


def _class_prompts() -> list[str]:
    from studio.world import CONCEPT, describe

    prompts = [describe(noun=CONCEPT.class_word, background=bg) for bg in ("white", "black", "pink", "teal")]
    return prompts + [describe(noun=CONCEPT.class_word)]


def score_trained(trained, seed: int, per_prompt: int | None = None) -> VersusRow:
    """Every number the with/without tables report, for one trained concept (a harness ``Trained``):

    * ``fidelity`` / ``editability``: the learning tests' one-attribute evaluation (:data:`CONCEPT`);
    * ``hard fidelity`` / ``hard joint``: the two-attribute prompts of :data:`HARD_CONCEPT` (small, on an
      unseen background): identity kept, and identity *and* both edits on the same image;
    * ``class drift``: the plain class prompts with the concept applied — how often they render the
      concept anyway (lower is better; 0 by construction for methods that only add a token).
    """
    from studio.world import CONCEPT, HARD_CONCEPT
    from studio.world.score import editability, fidelity, joint_success
    from tests.learning.harness import PER_PROMPT, oracle

    n = per_prompt or PER_PROMPT
    row: VersusRow = {}
    for key, task in (("", CONCEPT), ("hard ", HARD_CONCEPT)):
        prompts = [p for p in task.prompts(trained.subject) for _ in range(n)]
        targets = [t for t in task.targets() for _ in range(n)]
        images = trained.generate(prompts, seed)
        row[f"{key}fidelity"] = fidelity(images, oracle())
        row[f"{key}editability"] = editability(images, targets, oracle())
        row[f"{key}joint"] = joint_success(images, targets, oracle())
    class_prompts = [p for p in _class_prompts() for _ in range(n)]
    row["class drift"] = fidelity(trained.generate(class_prompts, seed + 500), oracle())
    return row


VERSUS_COLUMNS = ("fidelity", "editability", "hard fidelity", "hard joint", "class drift")


def versus(title: str, arms: dict[str, Callable], seeds: Sequence[int]) -> dict[str, list[VersusRow]]:
    """Train every arm (a harness ``TrainFn``: same photos, steps and seeds) and print the with/without table."""
    from studio.world import CONCEPT

    rows: dict[str, list[VersusRow]] = {label: [] for label in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            images_dir = Path(tmp) / f"concept-seed{seed}"
            CONCEPT.write_training_folder(images_dir, seed=seed)
            for label, train in arms.items():  # interleaved: every arm on one seed before the next seed
                t0 = time.perf_counter()
                trained = train(images_dir, seed, 1.0)
                row = score_trained(trained, seed) | {"seconds": time.perf_counter() - t0}
                rows[label].append(row)
                print(f"{title} · {label} · seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                      flush=True)
    print_versus(title, rows)
    return rows


def print_versus(title: str, rows: dict[str, list[VersusRow]]) -> None:
    n = len(next(iter(rows.values())))
    print(f"\n| {title} ({n} seeds) | " + " | ".join(VERSUS_COLUMNS) + " | s / run |")
    print("|---|" + "---|" * (len(VERSUS_COLUMNS) + 1))
    for label, r in rows.items():
        cells = [_mean_sd([x[c] for x in r]) for c in VERSUS_COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + f" | {statistics.mean(x['seconds'] for x in r):.0f} |")


def _arms(what: str, workdir: Path) -> dict[str, Callable]:
    """The with/without arms of each comparison (the learning tests' TrainFns: same photos, steps, lr)."""
    if what == "classdiffusion":
        from tests.learning import test_classdiffusion_learns as cd

        return {"DreamBooth-LoRA + prior": cd.train_dreambooth_prior,
                "+ ClassDiffusion SPL": cd.train_classdiffusion}
    if what == "core":
        from tests.learning import test_core_learns as core

        return {"textual inversion": core.train_plain, "+ CoRe": core.train_core,
                "NeTI": core.train_neti_plain, "NeTI + CoRe": core.train_neti_core}
    if what == "prospect":
        from tests.learning import test_prospect_learns as ps

        return {"textual inversion (same steps)": ps.train_ti_same, "ProSpect": ps.train_prospect}
    if what == "custom-diffusion":
        from tests.learning import test_custom_diffusion_learns as cdf

        return {"DreamBooth-LoRA + prior (same steps)": cdf.train_dreambooth_lora_same(workdir),
                "Custom Diffusion": cdf.train_custom_diffusion(workdir)}
    raise ValueError(what)


DECOR_WORDS = ("white", "gray", "large")
"""What the world's training photos all show besides the concept (their backgrounds and size): the
directions DECOR removes so that the concept's embedding cannot carry them into new prompts."""


def decor(seeds: Sequence[int], methods: Sequence[str], strength: float) -> None:
    """DECOR at inference vs none, for each method's concept (trained once per seed, scored both ways)."""
    from studio.world import CONCEPT
    from tests.learning.harness import base_pipeline
    from tests.test_decor import with_decor

    found = _trainers()
    rows: dict[str, list[VersusRow]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            images_dir = Path(tmp) / f"concept-seed{seed}"
            CONCEPT.write_training_folder(images_dir, seed=seed)
            for method in methods:
                label, train = found[method]
                pipe = base_pipeline()  # the pipeline the method's generator renders with (DECOR hooks into it)
                if method == "dreambooth":
                    from tests.learning.test_dreambooth_learns import _demo_base

                    train, pipe = found["_dreambooth"][1](Path(tmp)), _demo_base().pipe
                t0 = time.perf_counter()
                trained = train(images_dir, seed, 1.0)
                seconds = time.perf_counter() - t0
                for arm, gen in (("none", trained.generate),
                                 (f"DECOR α={strength:g}", with_decor(trained.generate, pipe, list(DECOR_WORDS), strength))):
                    view = type(trained)(subject=trained.subject, generate=gen)
                    row = score_trained(view, seed) | {"seconds": seconds}
                    rows.setdefault(f"{label} · {arm}", []).append(row)
                    print(f"decor · {label} · {arm} · seed {seed}: "
                          + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print_versus(f"DECOR (words: {', '.join(DECOR_WORDS)})", rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--methods", nargs="+", default=["ti", "dreambooth", "perfusion", "neti", "adapter"],
                   choices=["ti", "dreambooth", "perfusion", "neti", "adapter"])
    a = sub.add_parser("ti-init")
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--every", type=int, default=20)
    b = sub.add_parser("prior")
    c = sub.add_parser("neti-truncation")
    c.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    wave = [sub.add_parser(name) for name in ("classdiffusion", "core", "prospect", "custom-diffusion")]
    d = sub.add_parser("decor")
    d.add_argument("--methods", nargs="+", default=["ti", "dreambooth", "perfusion", "neti"],
                   choices=["ti", "dreambooth", "perfusion", "neti"])
    d.add_argument("--strength", type=float, default=1.0)
    for p in (a, b, c, d, *wave):
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    _header()
    t0 = time.perf_counter()
    run: dict[str, Callable[[], None]] = {
        "table": lambda: table(args.seeds, args.methods),
        "ti-init": lambda: ti_init(args.seeds, args.steps, args.every),
        "prior": lambda: prior(args.seeds),
        "neti-truncation": lambda: neti_truncation(args.seeds, args.strengths),
        "decor": lambda: decor(args.seeds, args.methods, args.strength),
    }
    work = tempfile.TemporaryDirectory()
    for name in ("classdiffusion", "core", "prospect", "custom-diffusion"):
        run[name] = lambda name=name: versus(name, _arms(name, Path(work.name)), args.seeds)
    run[args.what]()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
