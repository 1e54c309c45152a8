"""studio.evaluation: protocols, reference embeddings stored in concepts, the evaluate CLI end to end on
the tiny base with a tiny CLIP built from config, the strength sweep and best-checkpoint selection
with fake scorers whose answers are known, and the world oracle's path (or its clear error)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from studio.cli import main
from studio.concept import Concept
from studio.errors import StudioError
from studio.evaluation import (
    WorldJudge,
    attach_reference_embeddings,
    build_prompts,
    evaluate_concepts,
    load_judges,
    load_protocol,
    read_prompt_file,
    score_images,
    sweep_strength,
)
from studio.evaluation.metrics import ClipScorer, EvalConcept
from studio.methods import load_concept, save_concept
from studio.service import BaseSettings, Studio
from tests.helpers import write_photos
from tests.method_cases import make_ti
from trainers import get_trainer
from trainers.loop import TrainCallbacks
from trainers.runner import train

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "studio" / "assets" / "clip_tokenizer"
REF = [1.0, 0.0, 0.0]  # every reference photo
TEXT = [0.0, 1.0, 0.0]  # every text


# ----------------------------------------------------------------------------------------------
# Fixtures and fakes
# ----------------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three small reference/training photos."""
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, size=40)
    return folder


@pytest.fixture
def concept_file(tiny, tmp_path) -> Path:
    return save_concept(make_ti(tiny, "<hrt>", seed=1), tmp_path / "hrt.safetensors")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class InfoScorer:
    """A judge whose answers are known: a generated image is embedded from what its ``studio`` info says
    it was made with (``key``: the concept strength or the training step) as ``[f, e, rest]``, so its
    CLIP-I against the references (``REF``) is ``f`` and its CLIP-T against any text (``TEXT``) is ``e``."""

    name = "fake:info"

    def __init__(self, table: dict[float, tuple[float, float]], key: str) -> None:
        self.table, self.key = table, key

    def _value(self, image: Image.Image) -> float | None:
        if "studio" not in image.info:
            return None
        info = json.loads(image.info["studio"])
        return float(info["step"] if self.key == "step" else info["concepts"][0]["strength"])

    def embed_images(self, images):
        rows = []
        for image in images:
            value = self._value(image)
            if value is None:
                rows.append(REF)
            else:
                f, e = self.table[value]
                rows.append([f, e, math.sqrt(1 - f * f - e * e)])
        return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)

    def embed_texts(self, texts):
        return torch.tensor([TEXT] * len(texts), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Protocols and prompts
# ----------------------------------------------------------------------------------------------


def test_dreambench_protocol_has_25_object_and_25_live_prompts():
    obj, live = load_protocol("dreambench-object"), load_protocol("dreambench-live")
    assert len(obj.templates) == 25 and len(live.templates) == 25
    assert all(t.count("{}") == 1 for t in obj.templates + live.templates)
    assert obj.templates[0] == "a {} in the jungle" and "a {} wearing a santa hat" in live.templates
    assert obj.images_per_prompt == 4 and "google/dreambooth" in obj.source
    # "dreambench" picks the list by class noun, as the paper does (pets are live subjects).
    assert load_protocol("dreambench", "dog").name == "dreambench-live"
    assert load_protocol("dreambench", "teapot").name == "dreambench-object"
    data = json.loads((Path(__file__).resolve().parents[1] / "studio/assets/protocols/dreambench.json").read_text())
    assert len(data["subjects"]) == 30 and len(data["live_subjects"]) == 9
    with pytest.raises(StudioError, match="Unknown protocol"):
        load_protocol("coco")


def test_protocol_file_matches_the_shared_source():
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_protocols.py"
    spec = importlib.util.spec_from_file_location("build_protocols", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render(module.parse(module.DEFAULT_SOURCE.read_text(encoding="utf-8")))
    assert module.DEFAULT_OUT.read_text(encoding="utf-8") == text


def test_prompts_name_every_concept(tmp_path):
    dog = Concept("lora", ["<a>"], {}, class_word="dog")  # an identifier: goes with the class noun
    cat = Concept("lora", ["<b>"], {}, class_word="cat")
    assert build_prompts(["a {} in the snow"], [dog]) == ["a <a> dog in the snow"]
    assert build_prompts(["{} on the beach", "{1} chasing {0}"], [dog, cat]) == [
        "<a> dog and <b> cat on the beach", "<b> cat chasing <a> dog"]
    # textual inversion trains "a photo of <tok>": the trigger alone names the subject
    ti = Concept("textual_inversion", ["<t>"], {}, class_word="dog")
    assert build_prompts(["a {} in the snow", "{1} chasing {0}"], [ti, cat]) == [
        "a <t> and <b> cat in the snow", "<b> cat chasing <t>"]
    assert build_prompts(["a <a:0.5> dog"], [dog]) == ["a <a:0.5> dog"]
    with pytest.raises(StudioError, match="does not name <a>"):
        build_prompts(["a photo of a dog"], [dog])
    (tmp_path / "p.txt").write_text("# comment\n\na {} on grass\n")
    assert read_prompt_file(tmp_path / "p.txt") == ["a {} on grass"]
    with pytest.raises(StudioError, match="no prompts"):
        (tmp_path / "e.txt").write_text("# nothing\n")
        read_prompt_file(tmp_path / "e.txt")


# ----------------------------------------------------------------------------------------------
# Reference embeddings stored in the concept
# ----------------------------------------------------------------------------------------------


def test_reference_embeddings_round_trip(tiny, tmp_path, clip_dir, photos):
    from safetensors import safe_open

    from studio.evaluation import load_reference_images

    scorer = ClipScorer(clip_dir)
    concept = attach_reference_embeddings(make_ti(tiny, "<hrt>", 1), load_reference_images(photos), scorer)
    path = save_concept(concept, tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"emb_params", "ref.clip"}  # the method's tensor and the references, one file
        assert json.loads(f.metadata()["studio.ref_model"]) == {"clip": scorer.name}
    back = load_concept(path)
    assert set(back.tensors) == {"emb_params"}  # methods never see ref.* tensors
    assert back.refs["clip"].shape == (3, 16) and torch.equal(back.refs["clip"], concept.refs["clip"])
    assert back.ref_models == {"clip": scorer.name}
    assert torch.allclose(back.refs["clip"].norm(dim=-1), torch.ones(3))
    # Re-saving keeps them; a ref.* tensor given among the method's tensors is split off the same way.
    moved = Concept("textual_inversion", ["<x>"], {"emb_params": torch.ones(1, 32), "ref.clip": torch.ones(2, 4)})
    assert load_concept(save_concept(moved, tmp_path / "m.safetensors")).refs["clip"].shape == (2, 4)
    with pytest.raises(StudioError, match="float \\(N, D\\)"):
        save_concept(Concept("textual_inversion", ["<x>"], {"emb_params": torch.ones(1, 32)},
                             refs={"clip": torch.ones(3)}), tmp_path / "bad.safetensors")


def test_stored_references_score_like_the_photos(tiny, tmp_path, clip_dir, photos):
    path = save_concept(make_ti(tiny, "<hrt>", 1), tmp_path / "c.safetensors")
    options = dict(prompts=["a photo of {}"], seeds=1, steps=1, guidance=1.0, clip_model=str(clip_dir))
    tokens = len(tiny.pipe.tokenizer)
    with pytest.raises(StudioError, match="no stored clip reference embeddings"):
        evaluate_concepts(tiny, [str(path)], **options)
    with_photos = evaluate_concepts(tiny, [str(path)], references=photos, store_refs=True, **options)
    stored = evaluate_concepts(tiny, [str(path)], **options)
    assert stored.score("clip_i") == pytest.approx(with_photos.score("clip_i"), abs=1e-6)
    assert stored.settings["concepts"][0]["references"] == 3
    assert len(tiny.pipe.tokenizer) == tokens  # the concept was applied for the run and removed
    with pytest.raises(StudioError, match="were made with"):
        evaluate_concepts(tiny, [str(path)], prompts=["a photo of {}"], seeds=1, steps=1,
                          scorer=InfoScorer({}, "strength"))


# ----------------------------------------------------------------------------------------------
# The CLI, end to end offline
# ----------------------------------------------------------------------------------------------


def test_cli_evaluate_end_to_end(tiny, tmp_path, clip_dir, photos, concept_file, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--base", "tiny", "--concept", str(concept_file), "--images", str(photos),
            "--clip-model", str(clip_dir), "--protocol", "dreambench-object", "--seeds", "1", "--steps", "1",
            "--guidance", "1", "--batch-size", "25", "--store-refs", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "clip_t" in printed and "clip_i" in printed and "time: loading" in printed
    for name in ("report.json", "contact_sheet.png", "scatter.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "images").glob("*.png"))) == 25
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["protocol"] == "dreambench-object" and report["settings"]["images"] == 25
    assert report["records"][0]["prompt"] == "a <hrt> in the jungle"  # TI: the trigger names the subject
    assert report["records"][0]["clip_t_text"] == "a cat in the jungle"
    timing = report["settings"]["timing"]
    assert timing["generation_s"] > 0 and timing["scoring_s"] > 0 and timing["images"] == 25
    concept = load_concept(concept_file)
    scores = concept.metrics["eval"]["scores"]
    assert scores["clip_t"] == pytest.approx(report["summaries"]["clip_t"]["mean"], abs=1e-6)
    assert scores["clip_i"] == pytest.approx(report["summaries"]["clip_i"]["mean"], abs=1e-6)
    assert concept.metrics["eval"]["backbones"]["clip"].startswith("clip:folder:")
    assert concept.refs["clip"].shape[0] == 3  # --store-refs
    # Re-scored later without the photos: the stored embeddings stand in for them.
    argv2 = ["evaluate", "--base", "tiny", "--concept", str(concept_file), "--clip-model", str(clip_dir),
             "--prompts", str(_prompt_file(tmp_path)), "--seeds", "1", "--steps", "1", "--guidance", "1",
             "--no-save-images",
             "--no-write", "--out", str(tmp_path / "again")]
    assert main(argv2) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["settings"]["concepts"][0]["references"] == 3 and not (tmp_path / "again" / "images").exists()
    assert load_concept(concept_file).metrics["eval"]["protocol"] == "dreambench-object"  # --no-write


def test_cli_sweep_stores_a_strength(tiny, tmp_path, clip_dir, photos, concept_file, capsys):
    out = tmp_path / "sweep"
    argv = ["evaluate", "--base", "tiny", "--concept", str(concept_file), "--images", str(photos), "--clip-model",
            str(clip_dir), "--prompts", str(_prompt_file(tmp_path)), "--seeds", "1", "--steps", "1",
            "--guidance", "1", "--sweep", "0,1", "--out", str(out)]
    assert main(argv) == 0
    assert "recommended strength" in capsys.readouterr().out
    assert (out / "sweep.json").is_file() and (out / "sweep.png").is_file()
    assert (out / "strength-0" / "report.json").is_file() and (out / "strength-1" / "contact_sheet.png").is_file()
    concept = load_concept(concept_file)
    assert concept.strength in (0.0, 1.0) and concept.metrics["sweep"]["recommended"] == concept.strength


def test_cli_evaluate_takes_the_per_stage_concept_spec(tiny, tmp_path, clip_dir, photos, concept_file, capsys):
    """``--concept FILE@0-4:0.7`` (generate's parser) renders exactly what ``<aa@0-4:0.7>`` written in the prompt
    renders, and the report and each image record the per-stage strengths."""
    from studio.methods.prospect import random_concept

    path = save_concept(random_concept(tiny, "<aa>", 9), tmp_path / "aa.safetensors")
    (tmp_path / "spec.txt").write_text("a photo of {} on the beach\n")
    (tmp_path / "written.txt").write_text("a photo of <aa@0-4:0.7> on the beach\n")
    common = ["evaluate", "--base", "tiny", "--clip-model", str(clip_dir), "--images", str(photos), "--seeds", "2",
              "--steps", "3", "--guidance", "1", "--no-write"]
    assert main([*common, "--concept", f"{path}@0-4:0.7", "--prompts", str(tmp_path / "spec.txt"),
                 "--out", str(tmp_path / "spec")]) == 0
    assert main([*common, "--concept", str(path), "--prompts", str(tmp_path / "written.txt"),
                 "--out", str(tmp_path / "written")]) == 0
    report = json.loads((tmp_path / "spec" / "report.json").read_text())
    assert report["settings"]["strengths"] == {"aa": 0.7}
    assert report["settings"]["stages"] == {"aa": [0.7] * 5 + [0.0] * 5}
    spec_images = sorted((tmp_path / "spec" / "images").glob("*.png"))
    written_images = sorted((tmp_path / "written" / "images").glob("*.png"))
    assert len(spec_images) == len(written_images) == 2
    for a, b in zip(spec_images, written_images):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), (a.name, b.name)
        info = json.loads(Image.open(a).info["studio"])
        assert info["concepts"][0]["stages"] == [0.7] * 5 + [0.0] * 5
        assert "<aa>:0.7@0.7,0.7,0.7,0.7,0.7,0,0,0,0,0" in Image.open(a).info["parameters"]
    # all stages on at the concept's strength is not the layout-only image
    assert main([*common, "--concept", str(path), "--prompts", str(tmp_path / "spec.txt"), "--out",
                 str(tmp_path / "all")]) == 0
    every = sorted((tmp_path / "all" / "images").glob("*.png"))
    assert any(not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
               for a, b in zip(spec_images, every))
    capsys.readouterr()
    # a concept without stages, and a sweep over one strength per stage: one-line errors
    for argv, message in [(["--concept", f"{concept_file}@0-4"], "no denoising stages"),
                          (["--concept", f"{path}:1,1,1,1,1,0,0,0,0,0", "--sweep", "0,1"], "a sweep varies one")]:
        assert main([*common, *argv, "--prompts", str(tmp_path / "spec.txt"), "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err


def test_evaluation_renders_what_generate_renders(tiny):
    """The evaluation's renderer edits what ``generate`` edits: a Perfusion concept (whose hook edits only the
    conditional CFG rows) gives ``generate``'s pixels, prompt, seed and settings being equal."""
    from studio.evaluation.render import render_images
    from studio.generation import GenerateConfig, generate
    from tests.method_cases import make_perfusion

    concept = make_perfusion(tiny, "<pp>", 0)
    prompt = "a photo of <pp> on the beach"
    via_eval = render_images(tiny, [(concept, None, "pp")], [prompt], seeds=1, seed=4, steps=2, guidance=3.0)
    via_generate = generate(tiny, GenerateConfig(prompt=prompt, seed=4, steps=2, guidance=3.0), [(concept, None, "pp")])
    assert np.array_equal(np.asarray(via_eval[prompt][0]), np.asarray(via_generate[0]))


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# one held-out prompt\na photo of {} on the beach\n")
    return path


@pytest.mark.parametrize("extra, message", [
    (["--images", "a", "--images", "b"], "2 --images folders for 1 --concept"),
    (["--sweep", "0,x"], "comma-separated strengths"),
    (["--prompts", "/nonexistent/prompts.txt"], "Cannot read the prompt file"),
    (["--sweep", "1"], "at least two different strengths"),
])
def test_cli_user_errors_are_one_line(concept_file, tmp_path, capsys, extra, message):
    argv = ["evaluate", "--base", "tiny", "--concept", str(concept_file), "--out", str(tmp_path / "o")] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err


# ----------------------------------------------------------------------------------------------
# Strength sweep and best checkpoint, with judges whose answers are known
# ----------------------------------------------------------------------------------------------

# strength -> (fidelity, editability). Min-max normalised product f^ * e^: 0 -> 0, 0.5 -> 0.667 * 0.75 = 0.5,
# 1 -> 1 * 0.125, and 1.25 is dominated by 1 (lower on both): the recommendation is 0.5.
SWEEP = {0.0: (0.1, 0.9), 0.5: (0.6, 0.7), 1.0: (0.85, 0.2), 1.25: (0.7, 0.1)}


def test_sweep_with_known_front_stores_the_recommended_strength(tiny, tmp_path, photos, concept_file):
    studio = Studio(BaseSettings(base="tiny"), library=tmp_path / "lib", base=tiny)
    result = studio.sweep(str(concept_file), list(SWEEP), scorer=InfoScorer(SWEEP, "strength"), references=photos,
                          prompts=["a photo of {}"], seeds=1, steps=1, out_dir=tmp_path / "out")
    assert [(p.value, round(p.fidelity, 6), round(p.editability, 6)) for p in result.points] == [
        (s, f, e) for s, (f, e) in SWEEP.items()]
    assert result.choice.value == 0.5
    assert sorted(result.to_dict()["front"]) == [0.0, 0.5, 1.0]  # 1.25 is dominated
    assert (tmp_path / "out" / "sweep.png").is_file()
    concept = load_concept(concept_file)
    assert concept.strength == 0.5
    assert concept.metrics["sweep"]["recommended"] == 0.5
    assert concept.metrics["eval"]["scores"]["clip_i"] == pytest.approx(0.6)  # the evaluation at 0.5
    with pytest.raises(StudioError, match="at least two"):
        sweep_strength(tiny, str(concept_file), [1.0, 1.0], scorer=InfoScorer(SWEEP, "strength"))


# step -> (fidelity, editability): step 2 balances both; step 3 (the last) has the highest fidelity.
CURVE = {1.0: (0.2, 0.9), 2.0: (0.7, 0.7), 3.0: (0.8, 0.2)}


class Recorder(TrainCallbacks):
    def __init__(self) -> None:
        self.exported: dict[int, Concept] = {}
        self.logs: list[str] = []

    def on_eval(self, step, concept):
        self.exported[step] = concept

    def on_log(self, message):
        self.logs.append(message)


@pytest.mark.parametrize("keep_best", [True, False])
def test_training_curve_and_best_checkpoint(tiny, tmp_path, photos, keep_best):
    out = tmp_path / "c.safetensors"
    cfg = get_trainer("textual-inversion").resolve(images=str(photos), out=str(out), class_word="cat", steps=3,
                      batch_size=1, lr=5e-2, log_every=0, seed=0, eval_every=1, eval_images=1, eval_steps=1,
                      eval_prompts=str(_prompt_file(tmp_path)), keep_best=keep_best)
    recorder = Recorder()
    result = train(get_trainer("textual-inversion"), cfg, tiny, callbacks=recorder, scorer=InfoScorer(CURVE, "step"))
    assert sorted(recorder.exported) == [1, 2, 3]
    saved = load_concept(out)
    curve = saved.metrics["curve"]
    assert [p["step"] for p in curve["points"]] == [1, 2, 3] and curve["best_step"] == 2
    assert curve["points"][1]["fidelity"] == pytest.approx(0.7) and curve["points"][1]["editability"] == pytest.approx(0.7)
    assert curve["prompts"] == ["a photo of <cat> on the beach"]  # as TI trains: the token alone
    kept = 2 if keep_best else 3
    assert curve["kept_step"] == kept
    assert torch.equal(saved.tensors["emb_params"], recorder.exported[kept].tensors["emb_params"])
    assert not torch.equal(recorder.exported[2].tensors["emb_params"], recorder.exported[3].tensors["emb_params"])
    assert (saved.train.get("kept_step") == 2) is keep_best
    assert saved.refs["clip"].shape[0] == 3 and saved.ref_models["clip"] == "fake:info"  # the training photos
    assert result.concept.metrics["curve"]["best_step"] == 2
    assert any(m.startswith("eval step 2:") for m in recorder.logs)


def test_keep_best_needs_eval_every(photos):
    with pytest.raises(StudioError, match="--keep-best needs --eval-every"):
        get_trainer("textual-inversion").resolve(images=str(photos), class_word="cat", keep_best=True)


# ----------------------------------------------------------------------------------------------
# Several concepts; the world oracle
# ----------------------------------------------------------------------------------------------


def test_two_concepts_score_cp_clip_with_the_haar_detector(tiny, tmp_path, clip_dir, photos):
    a = save_concept(make_ti(tiny, "<a>", 1), tmp_path / "a.safetensors")
    b = save_concept(make_ti(tiny, "<b>", 2), tmp_path / "b.safetensors")
    report = evaluate_concepts(tiny, [str(a), str(b)], references=[photos, photos], prompts=["{} on the beach"],
                               seeds=1, steps=1, guidance=1.0, clip_model=str(clip_dir), detector="haar")
    assert report.records[0].prompt == "<a> and <b> on the beach"
    assert {"clip_t", "clip_i", "clip_i[a]", "clip_i[b]", "cp_clip", "ti_clip"} <= set(report.summaries)
    assert report.records[0].context_text == "on the beach"
    assert report.backbones["detector"]
    assert load_concept(a).metrics["eval_multi"]["scores"]["cp_clip"] == pytest.approx(report.score("cp_clip"))


def test_world_targets_follow_the_world_grammar():
    assert WorldJudge.targets("a photo of a <hrt> circle on a pink background") == [("background", "pink")]
    assert WorldJudge.targets("a photo of a small <hrt> circle") == [("size", "small")]
    assert WorldJudge.targets("a large <hrt> circle on a teal background") == [("background", "teal"),
                                                                               ("size", "large")]
    assert WorldJudge.targets("a photo of a <hrt> circle") == []


class FakeOracle:
    """Reads every image as: background pink, size small, identity probability 0.75."""

    def read(self, images):
        from studio.world import VOCABULARY

        n = len(images)
        probs = {name: F.one_hot(torch.zeros(n, dtype=torch.long), len(values)).float()
                 for name, values in VOCABULARY.items()}
        probs["background"] = F.one_hot(torch.full((n,), VOCABULARY["background"].index("pink")),
                                        len(VOCABULARY["background"])).float()
        probs["identity"] = torch.full((n,), 0.75)
        return probs


def test_oracle_report_from_a_stand_in_oracle():
    judge = WorldJudge.__new__(WorldJudge)  # the scoring logic, without the committed oracle file
    judge.oracle, judge.name = FakeOracle(), "oracle:fake"
    from studio.evaluation import Judges

    images = {"a <hrt> circle on a pink background": [Image.new("RGB", (32, 32))] * 2,
              "a <hrt> circle on a teal background": [Image.new("RGB", (32, 32))],
              "a large <hrt> circle": [Image.new("RGB", (32, 32))]}
    report = score_images(images, [EvalConcept("<hrt>", "circle", [Image.new("RGB", (1, 1))])],
                          Judges("oracle", world=judge))
    assert report.score("fidelity") == pytest.approx(0.75)
    assert report.score("editability") == pytest.approx(0.5)  # pink read (x2), teal and large missed
    assert report.records[2].clip_t_text == "background=teal"
    assert Judges("oracle", world=judge).keys() == ("fidelity", "editability")


@pytest.fixture
def stand_in_world(tmp_path, monkeypatch):
    """A demo world made of stand-ins: the tiny pipeline saved as the demo base folder and a random oracle
    (its numbers mean nothing; the oracle path through the CLI is what is tested)."""
    from safetensors.torch import save_file

    import studio.world as world
    from studio.models import build_tiny_pipeline

    folder = tmp_path / "world"
    build_tiny_pipeline("tiny").save_pretrained(folder / "base")
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in world.Oracle(width=4).state_dict().items()}
    save_file(state, str(folder / "oracle.safetensors"), metadata={"studio.world.oracle": json.dumps({"width": 4})})
    monkeypatch.setattr(world, "DEMO_BASE_DIR", folder / "base")
    monkeypatch.setattr(world, "ORACLE_PATH", folder / "oracle.safetensors")
    return folder


def test_oracle_path_end_to_end_on_a_stand_in_world(stand_in_world, tiny, tmp_path, capsys):
    from dataclasses import replace

    from studio.world import CONCEPT

    concept = replace(make_ti(tiny, "<hrt>", 1), class_word="circle")
    path = save_concept(concept, tmp_path / "hrt.safetensors")
    out = tmp_path / "oracle"
    assert main(["evaluate", "--base", "demo", "--concept", str(path), "--scorer", "oracle", "--seeds", "1",
                 "--steps", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["summaries"]) == {"fidelity", "editability"}
    assert report["settings"]["protocol"] == "world" and report["settings"]["images"] == len(CONCEPT.eval_prompts)
    assert report["settings"]["guidance"] == 4.0  # the world's sampling settings on --base demo
    assert report["backbones"]["oracle"].startswith("oracle:world:")
    assert report["records"][0]["prompt"] == "a photo of a <hrt> on a black background"
    assert report["records"][0]["clip_t_text"] == "background=black"
    assert (out / "scatter.png").is_file() and (out / "contact_sheet.png").is_file()
    saved = load_concept(path).metrics["eval"]
    assert saved["fidelity"] == "fidelity" and saved["scores"]["editability"] == pytest.approx(
        report["summaries"]["editability"]["mean"], abs=1e-6)


def test_oracle_end_to_end_on_the_demo_base(tmp_path, capsys):
    from studio.models import load_base
    from studio.world import CONCEPT

    demo = load_base("demo", device="cpu")
    concept = Concept("textual_inversion", ["<hrt>"], {"emb_params": torch.zeros(
        1, demo.pipe.text_encoder.config.hidden_size)}, class_word=CONCEPT.class_word, base=demo.fingerprint())
    path = save_concept(concept, tmp_path / "hrt.safetensors")
    out = tmp_path / "oracle"
    assert main(["evaluate", "--base", "demo", "--concept", str(path), "--scorer", "oracle", "--seeds", "1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["summaries"]) == {"fidelity", "editability"} and report["settings"]["protocol"] == "world"
    assert (out / "scatter.png").is_file() and (out / "contact_sheet.png").is_file()
    assert load_concept(path).metrics["eval"]["scores"]["fidelity"] == pytest.approx(
        report["summaries"]["fidelity"]["mean"], abs=1e-6)


def test_oracle_missing_is_a_clear_error(concept_file, tmp_path, capsys, monkeypatch):
    import studio.world as world

    monkeypatch.setattr(world, "ORACLE_PATH", tmp_path / "no-oracle.safetensors")  # an install without it
    with pytest.raises(StudioError, match="The demo world's oracle is not built"):
        load_judges("oracle")
    assert main(["evaluate", "--base", "tiny", "--concept", str(concept_file), "--scorer", "oracle",
                 "--out", str(tmp_path / "o")]) == 2
    assert "The demo world's oracle is not built" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing generated before the judge failed
