"""studio.compare — A/B comparisons on the demo world (its oracle as the judge): one concept at strengths 0
and 1 beside the base alone, two concepts, the side-by-side image's geometry, the CLI and the Compare tab's
handlers; and the CLIP path on the tiny base.

The world's concept (a purple dotted circle) is made without training: a textual-inversion concept whose
three vectors are the base's own input embeddings of "purple", "dotted" and "circle" — the base composes
them, so at strength 1 the oracle finds the concept in some images, and at strength 0 (the class word
"circle" in the prompt) in none. A "red striped circle" concept made the same way is the other arm.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.cli import main
from studio.compare import (
    BASE_LABEL,
    FOOTER_LINE,
    GRID_PAD,
    GRID_TOP,
    Arm,
    Comparison,
    _grid_rows,
    arms_for_concepts,
    arms_for_strengths,
    compare,
    parse_strengths,
)
from studio.concept import Concept
from studio.errors import StudioError
from studio.grid import MIN_CELL
from studio.methods import save_concept
from studio.models import BaseSettings
from studio.service import Studio
from studio.ui import compare as tab
from studio.ui.common import Runners, UIContext
from tests.helpers import write_photos
from tests.method_cases import make_ti

# The world's sampler steps where the oracle's scores are compared (its default is 20): 32 px images render in
# milliseconds, and from about 10 steps the base draws the composed concept well enough for the oracle to
# find it in most images (9 of 10 here; 2 of 10 at 4 steps). Elsewhere 2 steps.
STEPS = 10
SEEDS = 2
CELL = MIN_CELL  # the world's 32 px images enlarged ×4 in the side-by-side image


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def world_concept(base, trigger: str, words: tuple[str, ...]) -> Concept:
    """A textual-inversion concept whose vectors are the base's input embeddings of ``words`` (no training)."""
    tokenizer, embedding = base.pipe.tokenizer, base.pipe.text_encoder.get_input_embeddings().weight
    rows = [embedding[tokenizer(w, add_special_tokens=False).input_ids].mean(0).detach().float() for w in words]
    return Concept("textual_inversion", [trigger], {"emb_params": torch.stack(rows)}, class_word="circle",
                   name=trigger.strip("<>"), base=base.fingerprint())


@pytest.fixture(scope="module")
def demo():
    from studio.models import load_base

    base = load_base("demo", device="cpu")
    base.pipe.set_progress_bar_config(disable=True)
    return base


@pytest.fixture(scope="module")
def world(demo, tmp_path_factory):
    """A studio on the demo base whose library holds ``pdc`` (the world's concept) and ``rsc`` (a red striped
    circle)."""
    folder = tmp_path_factory.mktemp("compare-lib")
    studio = Studio(BaseSettings(base="demo"), library=folder, base=demo)
    studio.library.add(world_concept(demo, "<pdc>", ("purple", "dotted", "circle")), "pdc")
    studio.library.add(world_concept(demo, "<rsc>", ("red", "striped", "circle")), "rsc")
    return studio


@pytest.fixture(scope="module")
def strengths(world) -> Comparison:
    """``base | pdc:0 | pdc:1`` on the world protocol (5 prompts), 2 seeds, 10 steps, judged by the oracle."""
    return world.compare(arms_for_strengths("pdc", [0, 1], baseline=True), seeds=SEEDS, steps=STEPS)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cell(result: Comparison, row: int, col: int) -> np.ndarray:
    """The pixels of one cell of the side-by-side image (its geometry: studio.grid.assemble's)."""
    left = result.image.width - len(result.arms) * (CELL + GRID_PAD) - GRID_PAD
    x0, y0 = left + GRID_PAD + col * (CELL + GRID_PAD), GRID_TOP + row * (CELL + GRID_PAD)
    return np.asarray(result.image.crop((x0, y0, x0 + CELL, y0 + CELL)))


# ----------------------------------------------------------------------------------------------
# One concept at several strengths, beside the base alone
# ----------------------------------------------------------------------------------------------


def test_strength_zero_is_the_base_alone_and_strength_one_raises_fidelity(strengths, world):
    assert [r.label for r in strengths.arms] == [BASE_LABEL, "pdc:0", "pdc:1"]
    assert strengths.settings["protocol"] == "world" and strengths.settings["scorer"] == "oracle"
    assert len(strengths.templates) == 5 and strengths.seeds == [0, 1]
    base, off, on = strengths.arms
    assert base.prompts["a photo of a {} on a black background"] == "a photo of a circle on a black background"
    assert on.prompts["a photo of a {} on a black background"] == "a photo of a <pdc> on a black background"
    # strength 0 puts the class word where the trigger was: the same text, the same seeds → the same pixels
    for template in strengths.templates:
        for i in range(SEEDS):
            a = np.asarray(strengths.image_of(BASE_LABEL, template, i))
            assert a.shape == (32, 32, 3)
            assert np.array_equal(a, np.asarray(strengths.image_of("pdc:0", template, i))), (template, i)
    assert base.scores() == pytest.approx(off.scores())
    # the oracle finds the world's concept at strength 1 only
    assert off.scores()["fidelity"] < 0.05 and on.scores()["fidelity"] > 0.5
    assert on.report.settings["strengths"] == {"pdc": 1.0} and off.report.settings["strengths"] == {"pdc": 0.0}
    assert on.report.settings["images"] == 5 * SEEDS


def test_table_has_a_row_per_arm_and_the_judges_scores(strengths):
    assert strengths.columns() == ["arm", "concepts", "fidelity", "editability"]
    rows = strengths.table()
    assert [r[:2] for r in rows] == [["base", "base alone"], ["pdc:0", "pdc:0"], ["pdc:1", "pdc:1"]]
    assert rows[2][2] == pytest.approx(strengths.arm("pdc:1").scores()["fidelity"], abs=1e-4)
    text = strengths.format_table()
    assert text.splitlines()[0].split() == strengths.columns() and "pdc:1" in text
    data = json.loads(json.dumps(strengths.to_dict()))
    assert [a["label"] for a in data["arms"]] == ["base", "pdc:0", "pdc:1"]
    assert data["arms"][2]["report"]["summaries"]["fidelity"]["count"] == 5 * SEEDS


def test_side_by_side_geometry(strengths):
    """Columns = arms, rows = prompt × seed, 32 px images enlarged ×4 (nearest) to 128 px cells, 6 px
    apart, a 24 px band for the column labels and two lines of scores under the columns."""
    image, rows = strengths.image, len(strengths.templates) * SEEDS
    assert strengths.grid_rows == [(t, i) for t in strengths.templates for i in range(SEEDS)]
    assert image.height == GRID_TOP + rows * (CELL + GRID_PAD) + GRID_PAD + 2 * FOOTER_LINE + GRID_PAD
    left = image.width - 3 * (CELL + GRID_PAD) - GRID_PAD
    assert left > 100  # the row labels ("a photo of a {} on a black background · seed 0")
    for row, (template, i) in enumerate(strengths.grid_rows):
        for col in range(3):
            small = strengths.image_of(col, template, i)
            assert np.array_equal(_cell(strengths, row, col),
                                  np.asarray(small.resize((CELL, CELL), Image.Resampling.NEAREST))), (row, col)
    assert "A/B comparison: base (base alone) | pdc:0 (pdc:0) | pdc:1 (pdc:1)" in image.info["parameters"]


def test_nothing_is_written_into_the_concepts(world, tmp_path):
    before = {n: _digest(world.library.resolve(n)) for n in ("pdc", "rsc")}
    result = world.compare(arms_for_strengths("pdc", "0.5, 1"), prompts=["a photo of a small {}"], seeds=1, steps=2,
                           out_dir=str(tmp_path / "out"), write_back=True)
    assert {n: _digest(world.library.resolve(n)) for n in before} == before
    assert (tmp_path / "out" / "compare.png").is_file() and (tmp_path / "out" / "compare.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["00-pdc_0.5", "01-pdc_1"]
    assert (tmp_path / "out" / "images" / "01-pdc_1" / "p00-s0.png").is_file()
    assert result.paths["image"] == tmp_path / "out" / "compare.png"


# ----------------------------------------------------------------------------------------------
# Two concepts
# ----------------------------------------------------------------------------------------------


def test_two_concepts_share_prompts_and_seeds_and_the_baseline_repeats(world, strengths):
    result = world.compare(arms_for_concepts(["pdc", "rsc"], baseline=True), seeds=SEEDS, steps=STEPS)
    assert [r.label for r in result.arms] == ["base", "pdc", "rsc"]
    assert result.templates == strengths.templates and result.seeds == strengths.seeds
    assert result.arm("rsc").prompts["a photo of a small {}"] == "a photo of a small <rsc>"
    for template in result.templates:  # the same seeds give the same baseline in another call
        for i in range(SEEDS):
            assert np.array_equal(np.asarray(result.image_of("base", template, i)),
                                  np.asarray(strengths.image_of("base", template, i)))
    # the world's concept is the purple dotted circle, not the red striped one
    assert result.arm("rsc").scores()["fidelity"] < 0.05 < 0.5 < result.arm("pdc").scores()["fidelity"]
    assert result.image.size == strengths.image.size


def test_prompts_and_arms_are_checked_before_anything_renders(world):
    with pytest.raises(StudioError, match="has no"):
        world.compare(arms_for_concepts(["pdc", "rsc"]), prompts=["a photo of a circle"], seeds=1, steps=1)
    with pytest.raises(StudioError, match="share the label"):
        world.compare([Arm("x", ["pdc"]), Arm("x", ["rsc"])], seeds=1, steps=1)
    with pytest.raises(StudioError, match="at least one concept"):
        world.compare([Arm("base")], seeds=1, steps=1)
    with pytest.raises(StudioError, match="between 0 and"):
        parse_strengths("0, 9")
    with pytest.raises(StudioError, match="numbers separated by commas"):
        parse_strengths("0, lots")
    assert parse_strengths("1, 0, 1") == [1.0, 0.0]
    assert [a.label for a in arms_for_strengths("dogs/kit.safetensors", [0.25, 1])] == ["kit:0.25", "kit:1"]


def test_a_large_comparison_shows_the_first_seeds_of_each_prompt():
    assert _grid_rows(["a", "b"], 4, 3, 100) == [(t, i) for t in "ab" for i in range(4)]
    assert _grid_rows(["a"] * 25, 4, 2, 100) == [("a", i) for _ in range(25) for i in range(2)]  # 2 seeds each
    assert _grid_rows(["a"] * 25, 4, 3, 100) == [("a", 0)] * 25  # 25 prompts × 3 arms: one seed each
    assert len(_grid_rows([str(i) for i in range(25)], 4, 5, 100)) == 20  # not even one seed each: 20 prompts


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_compare_writes_the_image_and_the_scores(world, demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(BaseSettings, "load", lambda self, device=None: demo)  # the module's demo base
    out = tmp_path / "cmp"
    assert main(["compare", "--base", "demo", "--library", str(world.library.folder), "--concept", "pdc",
                 "--strengths", "0,1", "--baseline", "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["arm", "concepts", "fidelity", "editability"]
    assert "pdc:1" in printed and str(out / "compare.png") in printed
    data = json.loads((out / "compare.json").read_text())
    assert [a["label"] for a in data["arms"]] == ["base", "pdc:0", "pdc:1"]
    assert set(data["arms"][2]["scores"]) == {"fidelity", "editability"}
    assert data["settings"]["steps"] == 2 and data["seeds"] == [0]
    with Image.open(out / "compare.png") as im:
        assert im.size[1] == GRID_TOP + 5 * (CELL + GRID_PAD) + GRID_PAD + 2 * FOOTER_LINE + GRID_PAD
        assert "A/B comparison" in im.text["parameters"]
    # two concepts, A and B
    assert main(["compare", "--base", "demo", "--library", str(world.library.folder), "--concept", "pdc",
                 "--concept", "rsc:0.5", "--prompts", str(_prompt_file(tmp_path)), "--seeds", "1", "--steps", "2",
                 "--out", str(tmp_path / "ab")]) == 0
    data = json.loads((tmp_path / "ab" / "compare.json").read_text())
    assert [a["label"] for a in data["arms"]] == ["pdc", "rsc:0.5"] and data["templates"] == ["a photo of a small {}"]


def _prompt_file(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("# one template\na photo of a small {}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("extra, message", [
    (["--concept", "pdc", "--concept", "rsc", "--strengths", "0,1"], "exactly one --concept"),
    (["--concept", "pdc"], "Give two --concept"),
    (["--concept", "pdc", "--strengths", "0,7"], "between 0 and"),
])
def test_cli_user_errors_are_one_line(world, tmp_path, capsys, extra, message):
    argv = ["compare", "--base", "demo", "--library", str(world.library.folder), *extra, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert main(["compare", "--base", "demo", "--concept", "pdc", "--baseline"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Per-stage concept specs (ProSpect), through generate's parser
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged(demo, tmp_path_factory):
    """A studio on the demo base whose library holds ``pst`` (a ProSpect concept: every one of its 10 stages
    the input embedding of "purple dotted circle", untrained) and ``rsc`` (a textual inversion, no stages)."""
    from studio.methods.prospect import concept_from_tables

    studio = Studio(BaseSettings(base="demo"), library=tmp_path_factory.mktemp("compare-staged"), base=demo)
    words = world_concept(demo, "<pst>", ("purple", "dotted", "circle")).tensors["emb_params"].mean(0)
    steps = int(demo.pipe.scheduler.config.num_train_timesteps)
    studio.library.add(concept_from_tables([words.expand(10, -1)], token="<pst>", class_word="circle", name="pst",
                                           num_train_timesteps=steps, base=demo.fingerprint()), "pst")
    studio.library.add(world_concept(demo, "<rsc>", ("red", "striped", "circle")), "rsc")
    return studio


def test_cli_compare_takes_the_per_stage_concept_spec(staged, demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(BaseSettings, "load", lambda self, device=None: demo)
    head = ["compare", "--base", "demo", "--library", str(staged.library.folder), "--prompts",
            str(_prompt_file(tmp_path)), "--seeds", "2", "--steps", "10"]
    # the layout stages only, beside every stage: two columns, the stages in the labels, the table and the report
    assert main([*head, "--concept", "pst@0-4", "--concept", "pst", "--out", str(tmp_path / "ab")]) == 0
    data = json.loads((tmp_path / "ab" / "compare.json").read_text())
    assert [a["label"] for a in data["arms"]] == ["pst@0-4", "pst"]
    assert data["arms"][0]["concepts"] == "pst:1@1,1,1,1,1,0,0,0,0,0" and data["arms"][1]["concepts"] == "pst:1"
    assert data["arms"][0]["report"]["settings"]["stages"] == {"pst": [1.0] * 5 + [0.0] * 5}
    assert "stages" not in data["arms"][1]["report"]["settings"]
    layout = sorted((tmp_path / "ab" / "images").glob("00-*/*.png"))
    every = sorted((tmp_path / "ab" / "images").glob("01-*/*.png"))
    assert len(layout) == len(every) == 2
    assert any(not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) for a, b in zip(layout, every))
    assert "<pst>:1@1,1,1,1,1,0,0,0,0,0" in Image.open(layout[0]).info["parameters"]
    # --strengths drives the selected stages; at 0 every stage reads the class word: the base's pixels
    assert main([*head, "--concept", "pst@0-4", "--strengths", "0,1", "--baseline", "--out", str(tmp_path / "s")]) == 0
    data = json.loads((tmp_path / "s" / "compare.json").read_text())
    assert [a["label"] for a in data["arms"]] == ["base", "pst@0-4:0", "pst@0-4:1"]
    assert data["arms"][2]["report"]["settings"]["stages"] == {"pst": [1.0] * 5 + [0.0] * 5}
    base_images = sorted((tmp_path / "s" / "images").glob("00-*/*.png"))
    off_images = sorted((tmp_path / "s" / "images").glob("01-*/*.png"))
    assert [np.asarray(Image.open(p)).tolist() for p in base_images] == \
        [np.asarray(Image.open(p)).tolist() for p in off_images]
    capsys.readouterr()
    # a concept without stages, and one strength per stage with --strengths: one-line errors
    for extra, message in [(["--concept", "rsc@0-4", "--baseline"], "no denoising stages"),
                           (["--concept", "pst:1,1,1,1,1,0,0,0,0,0", "--strengths", "0,1"], "nothing for --strengths")]:
        assert main([*head, *extra, "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_arms_keep_the_stages_of_their_concept_spec():
    from studio.generation import ConceptUse
    from studio.prompts import StageStrengths, parse_concept_spec

    use = ConceptUse(*parse_concept_spec("dir/pst.safetensors@0-4:0.8"))
    assert use == ConceptUse("dir/pst.safetensors", 0.8, StageStrengths(on=(0, 1, 2, 3, 4)))
    arms = arms_for_strengths(use, [0, 0.5])
    assert [a.label for a in arms] == ["pst@0-4:0", "pst@0-4:0.5"]
    assert [a.concepts[0] for a in arms] == [ConceptUse("dir/pst.safetensors", s, use.stages) for s in (0, 0.5)]
    assert [a.label for a in arms_for_concepts([use, ConceptUse(*parse_concept_spec("pst:1,0.5"))])] == \
        ["pst@0-4:0.8", "pst:1,0.5"]


# ----------------------------------------------------------------------------------------------
# The Compare tab's handlers (no gradio)
# ----------------------------------------------------------------------------------------------


def test_tab_builds_the_arms_from_the_form(world, tmp_path):
    ctx = UIContext.create(world, out_dir=tmp_path / "ui")
    assert tab.concept_choices(ctx) == ["pdc", "rsc"]
    arms = tab.build_arms(ctx, {"mode": tab.TWO, "concept_a": "pdc", "concept_b": "rsc", "baseline": True})
    assert [(a.label, a.is_base) for a in arms] == [("base", True), ("pdc", False), ("rsc", False)]
    arms = tab.build_arms(ctx, {"mode": tab.STRENGTHS, "concept_a": "pdc", "strengths": "0, 0.5, 1"})
    assert [a.label for a in arms] == ["pdc:0", "pdc:0.5", "pdc:1"]
    for form, message in [({"mode": tab.TWO, "concept_a": "pdc", "concept_b": "pdc"}, "two different"),
                          ({"mode": tab.TWO, "concept_a": "pdc"}, "Choose concept B"),
                          ({"mode": tab.TWO, "concept_a": str(world.library.resolve("pdc")), "concept_b": "rsc"},
                           "No concept named"),  # a library name, never a server path
                          ({"mode": tab.STRENGTHS, "concept_a": "pdc", "strengths": "x"}, "numbers")]:
        with pytest.raises(StudioError, match=message):
            tab.build_arms(ctx, form)
    with pytest.raises(StudioError, match="has no"):
        tab.options({"prompts": "a photo of a circle"}, tmp_path)
    assert tab.options({"prompts": "a {} \n\n a small {}", "seeds": 3, "steps": 0}, tmp_path) == {
        "seeds": 3, "out_dir": str(tmp_path), "prompts": ["a {}", "a small {}"]}


def test_tab_compares_and_shows_the_image_and_the_table(world, tmp_path):
    calls = []

    def runner(arms, options):
        calls.append([a.label for a in arms])
        return world.compare(arms, **options)

    direct = Runners.direct(world)
    ctx = UIContext.create(world, out_dir=tmp_path / "ui", runners=Runners(
        render=direct.render, evaluate=direct.evaluate, sweep=direct.sweep, compare=runner))
    form = {"mode": tab.STRENGTHS, "concept_a": "pdc", "strengths": "0, 1", "baseline": True,
            "prompts": "a photo of a {} on a teal background\na photo of a small {}", "seeds": 1, "steps": 2}
    result = tab.run_compare(ctx, form)
    assert calls == [["base", "pdc:0", "pdc:1"]]
    assert result["columns"] == ["arm", "concepts", "fidelity", "editability"]
    assert [r[0] for r in result["rows"]] == ["base", "pdc:0", "pdc:1"]
    with Image.open(result["image"]) as im:
        assert im.size[1] == GRID_TOP + 2 * (CELL + GRID_PAD) + GRID_PAD + 2 * FOOTER_LINE + GRID_PAD
    assert json.loads(Path(result["report"]).read_text())["templates"] == [
        "a photo of a {} on a teal background", "a photo of a small {}"]
    assert "3 columns" in result["text"] and "oracle" in result["text"]
    # the default runners call the studio directly
    plain = tab.run_compare(UIContext.create(world, out_dir=tmp_path / "ui2"), {**form, "baseline": False})
    assert [r[0] for r in plain["rows"]] == ["pdc:0", "pdc:1"]


# ----------------------------------------------------------------------------------------------
# CLIP judges (the tiny base): the base-alone column is scored against the first concept's photos
# ----------------------------------------------------------------------------------------------


def test_clip_scores_every_column_against_the_references(tiny, tmp_path, clip_dir):
    photos = tmp_path / "photos"
    write_photos(photos, size=40)
    a = save_concept(make_ti(tiny, "<a>", 1), tmp_path / "a.safetensors")
    b = save_concept(make_ti(tiny, "<b>", 2), tmp_path / "b.safetensors")
    tokens = len(tiny.pipe.tokenizer)
    result = compare(tiny, arms_for_concepts([str(a), str(b)], baseline=True), prompts=["a photo of {}"], seeds=1,
                     steps=1, scorer="clip", clip_model=str(clip_dir), references=str(photos))
    assert len(tiny.pipe.tokenizer) == tokens  # every concept was applied for its column and removed
    assert [r.label for r in result.arms] == ["base", "a", "b"]
    assert result.arm("base").prompts == {"a photo of {}": "a photo of cat"}
    assert result.metrics()[:2] == ["clip_i", "clip_t"]
    for arm in result.arms:
        assert set(arm.scores()) == {"clip_t", "clip_i"}
    assert result.arm("a").scores() != result.arm("b").scores()
