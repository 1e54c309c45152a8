"""The example concepts shipped in ``concepts/`` (``scripts/build_example_concepts.py``): present, readable,
scored, previewed, current for the demo base, usable together — and marked, not applied, on another base."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from studio.concept import read_header
from studio.errors import IncompatibleConceptError
from studio.generation import ConceptUse, GenerateConfig
from studio.library import Library
from studio.methods import load_concept
from studio.service import Studio

REPO = Path(__file__).resolve().parents[1]
REBUILD = "run python scripts/build_example_concepts.py and commit concepts/"


def _script():
    path = REPO / "scripts" / "build_example_concepts.py"
    spec = importlib.util.spec_from_file_location("build_example_concepts", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()
SHIPPED = Path(SCRIPT.DEFAULT_OUT)
NAMES = [e.name for e in SCRIPT.EXAMPLES]


@pytest.fixture(scope="module")
def demo():
    return SCRIPT.load_demo_base()


@pytest.fixture
def examples(tmp_path):
    """A temporary library holding a copy of the shipped examples (tests never use concepts/ as their library)."""
    folder = tmp_path / "lib"
    folder.mkdir()
    for name in NAMES:
        for suffix in (".safetensors", ".preview.png"):
            src = SHIPPED / f"{name}{suffix}"
            if src.is_file():
                shutil.copyfile(src, folder / src.name)
    return folder


def test_the_examples_are_shipped_and_current_for_the_demo_base(demo):
    found = SCRIPT.problems(SHIPPED, demo)
    assert not found, f"The example concepts are missing or stale ({'; '.join(found)}): {REBUILD}."


@pytest.mark.parametrize("example", SCRIPT.EXAMPLES, ids=lambda e: e.name)
def test_each_example_loads_with_scores_a_preview_and_its_recipe(example):
    path = SHIPPED / f"{example.name}.safetensors"
    assert path.is_file(), f"{path} is missing: {REBUILD}."
    concept = load_concept(path)
    assert concept.trigger == example.token and concept.class_word == "circle"
    scores = concept.metrics["eval"]["scores"]
    assert 0.0 <= scores["fidelity"] <= 1.0 and 0.0 <= scores["editability"] <= 1.0
    made = concept.metrics["example"]
    assert made["command"].startswith("python scripts/build_example_concepts.py") and made["recipe"] == SCRIPT.RECIPE
    assert made["trainer"] == example.trainer and made["preset"] is None
    # the Concepts tab's reader finds them (studio.ui.concepts._scores reads metrics["eval"]["scores"])
    info = Library(SHIPPED).info(example.name)
    assert info.usable and info.preview is not None and info.metrics["eval"]["scores"] == scores
    assert info.size < 1024 * 1024, "an example ships in the repository: keep it small"
    # nothing of the machine that built it
    _, md = read_header(path)
    assert "/tmp" not in json.dumps(md)


def test_the_examples_have_distinct_triggers():
    triggers = [load_concept(SHIPPED / f"{n}.safetensors").trigger for n in NAMES]
    assert len(set(triggers)) == len(triggers) == 4


def test_examples_fit_the_demo_base_and_two_share_one_prompt(demo, examples):
    studio = Studio(library=examples, base=demo)
    assert [studio.fits(n) for n in NAMES] == [""] * len(NAMES)
    prompt = "a photo of a <hrt-ti> and a <sks> circle on a teal background"
    images = studio.generate(GenerateConfig(prompt=prompt, seed=0, steps=4,
                                            concepts=[ConceptUse("world-ti"), ConceptUse("world-lora")]))
    assert len(images) == 1 and images[0].size == (demo.native_size, demo.native_size)
    assert "<hrt-ti>" in images[0].info["parameters"] and "<sks>" in images[0].info["parameters"]


def test_on_another_base_examples_are_marked_and_refused(tiny, examples):
    studio = Studio(library=examples, base=tiny)
    assert [studio.fits(n) for n in NAMES] == ["for another base (demo world)"] * len(NAMES)
    assert studio.library.usable_names() == sorted(NAMES)  # still listed
    with pytest.raises(IncompatibleConceptError, match="does not fit base tiny"):
        studio.generate(GenerateConfig(prompt="a photo of a <hrt-ti>", steps=1, concepts=[ConceptUse("world-ti")]))


def test_a_stale_example_is_caught_and_fits_follows_the_file(demo, examples):
    studio = Studio(library=examples, base=demo)
    assert studio.fits("world-ti") == ""
    concept = studio.library.load("world-ti")
    concept.base = dict(concept.base, identity="folder:0000000000000000")  # the demo base was rebuilt since
    studio.library.add(concept, "world-ti", force=True)
    found = SCRIPT.problems(examples, demo)
    assert len(found) == 1 and "world-ti" in found[0] and "demo base" in found[0]
    assert studio.fits("world-ti") == ""  # same architecture: it applies (with a note); only --check asks for a rebuild
    concept.base = dict(concept.base, compat=dict(concept.base["compat"], text_widths=[768]))
    studio.library.add(concept, "world-ti", force=True)
    assert studio.fits("world-ti") == "for another base (demo world)"  # the cache follows the file's version
    assert "another base layout" in SCRIPT.problems(examples, demo)[0]
    assert SCRIPT.main(["--check", "--out", str(examples), "--methods", "ti"]) == 1
    assert SCRIPT.main(["--check", "--out", str(examples), "--methods", "lora", "neti"]) == 0
