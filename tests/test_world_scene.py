"""The scene world (a shape in a frame): renderer, masks, captions, task, oracles and the committed base."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from safetensors import safe_open

from studio.world import (
    WORLD_SCENE_BASE_DIR,
    WORLD_SCENE_DIR,
    WORLD_SCENE_RESOLUTION,
    Attributes,
    load_oracle,
    render,
    render_mask,
)
from studio.world.render import BACKGROUNDS, COLOURS, PATTERN_RGB
from studio.world.scene import (
    BAND,
    INTERIOR,
    SCENE_ORACLE_PATH,
    SCENE_TASK,
    SCENE_VOCABULARY,
    Frame,
    SceneAttributes,
    describe_scene,
    full_caption,
    interior,
    load_scene_oracle,
    read_scene,
    render_scene,
    sample_scene,
    scene_caption,
    scene_masks,
    scene_photos,
    scene_targets,
    scene_upper_bound,
    scenes_to_tensor,
    score_scene,
)

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
CIRCLE = Attributes("circle", "purple", "dotted", "pink", "large")


@pytest.fixture(scope="module")
def oracles():
    return {"world_oracle": load_oracle("cpu"), "scene_oracle": load_scene_oracle("cpu")}


def _band(array: np.ndarray) -> np.ndarray:
    keep = np.ones(array.shape[:2], dtype=bool)
    keep[BAND:-BAND, BAND:-BAND] = False
    return array[keep]


# ---------------------------------------------------------------------------------------------
# renderer, masks, captions
# ---------------------------------------------------------------------------------------------


def test_scene_is_deterministic_and_its_interior_is_the_world_render():
    scene = SceneAttributes.of(CIRCLE, Frame("orange", "striped"))
    first = np.asarray(render_scene(scene, jitter=3))
    assert first.shape == (WORLD_SCENE_RESOLUTION, WORLD_SCENE_RESOLUTION, 3) and first.dtype == np.uint8
    assert np.array_equal(first, np.asarray(render_scene(scene, jitter=3)))
    assert not np.array_equal(first, np.asarray(render_scene(scene, jitter=4)))
    left, top, right, bottom = INTERIOR
    assert np.array_equal(first[top:bottom, left:right], np.asarray(render(CIRCLE, jitter=3)))
    # the band holds the frame's colour and its white marks, nothing else
    band = {tuple(p) for p in _band(first)}
    assert COLOURS["orange"] in band and PATTERN_RGB in band
    # no frame: the band is the background; no shape: the interior is
    bare = np.asarray(render_scene(SceneAttributes.of(CIRCLE), jitter=3))
    assert {tuple(p) for p in _band(bare)} == {BACKGROUNDS["pink"]}
    empty = np.asarray(render_scene(SceneAttributes("teal", None, Frame("blue")), jitter=3))
    assert {tuple(p) for p in empty[top:bottom, left:right].reshape(-1, 3)} == {BACKGROUNDS["teal"]}
    assert {tuple(p) for p in _band(empty)} == {COLOURS["blue"]}


def test_frame_patterns_differ_and_the_jitter_moves_the_marks():
    def band(pattern: str, jitter: int) -> np.ndarray:
        return _band(np.asarray(render_scene(SceneAttributes("white", None, Frame("red", pattern)), jitter)))

    white = {p: float((band(p, 0) == PATTERN_RGB).all(-1).mean()) for p in ("plain", "striped", "dotted")}
    assert white["plain"] == 0 and 0.3 < white["striped"] < 0.6 and 0.1 < white["dotted"] < 0.3
    assert not np.array_equal(band("dotted", 0), band("dotted", 1))


def test_masks_cover_the_objects_pixels():
    scene = SceneAttributes.of(Attributes("star", "green", "plain", "black", "small"), Frame("yellow", "plain"))
    image = np.asarray(render_scene(scene, jitter=5))
    masks = scene_masks(scene, jitter=5)
    assert set(masks) == {"shape", "frame"}
    shape, frame = (np.asarray(masks[k]) >= 128 for k in ("shape", "frame"))
    left, top, right, bottom = INTERIOR
    assert np.array_equal(np.asarray(masks["shape"])[top:bottom, left:right],
                          np.asarray(render_mask(scene.shape, jitter=5)))  # type: ignore[arg-type]
    assert shape[:BAND].sum() == 0 and 40 < shape.sum() < 200  # a small star, inside the interior
    assert frame.sum() == 48 * 48 - 32 * 32 and not (shape & frame).any()
    full = np.asarray(masks["shape"]) == 255  # wholly inside the shape (the edge is anti-aliased)
    assert full.sum() > 30 and (image[full] == COLOURS["green"]).all(-1).all()
    assert (image[frame] == COLOURS["yellow"]).all(-1).all()
    assert (image[~shape & ~frame] == BACKGROUNDS["black"]).all(-1).mean() > 0.95
    assert set(scene_masks(SceneAttributes("white", None, Frame("red")), 0)) == {"frame"}
    assert set(scene_masks(SceneAttributes.of(CIRCLE), 0)) == {"shape"}


def test_scene_attributes_are_checked():
    with pytest.raises(ValueError, match="shape, a frame or both"):
        SceneAttributes("white")
    with pytest.raises(ValueError, match="background"):
        SceneAttributes("white", CIRCLE)  # the circle is on pink
    with pytest.raises(ValueError, match="frame colour"):
        Frame("magenta")
    assert SceneAttributes.of(CIRCLE, background="teal").shape == CIRCLE.replace(background="teal")


def test_captions_extend_the_world_grammar():
    assert full_caption(SceneAttributes.of(CIRCLE, Frame("orange", "striped"))) == (
        "a photo of a large purple dotted circle on a pink background in an orange striped frame")
    assert full_caption(SceneAttributes("pink", None, Frame("orange", "striped"))) == (
        "a photo of an orange striped frame on a pink background")
    assert full_caption(SceneAttributes.of(CIRCLE)) == "a photo of a large purple dotted circle on a pink background"
    assert describe_scene(noun="<s1> circle", background="teal", frame_noun="<s2> frame") == (
        "a photo of a <s1> circle on a teal background in a <s2> frame")
    rng = random.Random(0)
    kinds = {"shape+frame": 0, "shape": 0, "frame": 0}
    for _ in range(300):
        scene = sample_scene(rng)
        kinds["+".join(k for k in ("shape", "frame") if getattr(scene, k) is not None)] += 1
        text = scene_caption(scene, rng)
        assert ("frame" in text) == (scene.frame is not None)  # a frame is always said, and only then
        nouns = set(text.split()) & {"circle", "square", "triangle", "star", "shape"}
        assert len(nouns) == (scene.shape is not None)  # a shape is always said (maybe as "shape"), and only then
    assert all(n > 20 for n in kinds.values())


# ---------------------------------------------------------------------------------------------
# the two-concept task
# ---------------------------------------------------------------------------------------------


def test_scene_task_photos_show_both_concepts_with_a_mask_each():
    photos = scene_photos(3, seed=0)
    assert len(photos) == 3
    again = scene_photos(3, seed=0)
    for (image, masks), (image2, _) in zip(photos, again):
        assert image.size == (48, 48) and np.array_equal(np.asarray(image), np.asarray(image2))
        assert set(masks) == {c.name for c in SCENE_TASK.concepts} == {"shape", "frame"}
    scene = SCENE_TASK.scene()
    assert all(c.is_identity(scene) for c in SCENE_TASK.concepts) and SCENE_TASK.shows_held_out(scene)
    assert SCENE_TASK.descriptions() == {"shape": "purple dotted circle", "frame": "yellow dotted frame"}
    assert not SCENE_TASK.shows_held_out(SceneAttributes.of(CIRCLE.replace(pattern="plain"), Frame("yellow", "plain")))
    prompts = SCENE_TASK.prompts({"shape": "<s1> circle", "frame": "<s2> frame"})
    assert any("<s1> circle" in p and "<s2> frame" in p for p in prompts)
    assert any("<s1>" in p and "<s2>" not in p for p in prompts) and any("<s2>" in p and "<s1>" not in p for p in prompts)
    with pytest.raises(ValueError, match="needs a subject"):
        SCENE_TASK.prompts({"shape": "<s1> circle"})


# ---------------------------------------------------------------------------------------------
# oracles (committed)
# ---------------------------------------------------------------------------------------------


def test_scene_oracle_reads_held_out_renders(oracles):
    """≥ 98 % on every head, on scenes with seeds the build never used (a quarter with the frame concept)."""
    rng = random.Random("test-scene-heldout")
    frame = SCENE_TASK.concept("frame").identity
    scenes = []
    for i in range(400):
        scene = sample_scene(rng)
        if i % 4 == 0:
            scene = SceneAttributes(scene.background, scene.shape, Frame(frame["colour"], frame["pattern"]))
        scenes.append(scene)
    probs = oracles["scene_oracle"].read(scenes_to_tensor([render_scene(a, 10**6 + i) for i, a in enumerate(scenes)]))
    for name, target in scene_targets(scenes).items():
        keep = target >= 0
        acc = float((probs[name].argmax(-1)[keep] == target[keep]).float().mean())
        assert acc >= 0.98, f"scene oracle {name} accuracy {acc:.3f}"
    assert set(probs) == set(SCENE_VOCABULARY)


def test_world_oracle_reads_the_interior(oracles):
    rng = random.Random("test-scene-interior")
    scenes = [sample_scene(rng, kind="shape+frame") for _ in range(120)]
    readings = read_scene([render_scene(a, 10**6 + i) for i, a in enumerate(scenes)], **oracles)
    for name in ("shape", "colour", "pattern", "size"):
        acc = np.mean([r.values[name] == getattr(a.shape, name) for a, r in zip(scenes, readings)])
        assert acc >= 0.95, f"interior {name} accuracy {acc:.3f}"
    concept = read_scene([render_scene(SCENE_TASK.scene("teal", "small"), 7)], **oracles)[0]
    assert concept.identity["shape"] > 0.9 and concept.identity["frame"] > 0.9


def test_scene_scores_on_real_renders(oracles):
    ub = scene_upper_bound(per_prompt=2, **oracles)
    assert ub.shape_fidelity > 0.95 and ub.frame_fidelity > 0.95 and ub.both_present > 0.95 and ub.editability > 0.95
    both = [p for p in SCENE_TASK.eval_prompts if set(p.concepts) == {"shape", "frame"}][:1] * 2
    near_miss = SceneAttributes("black", CIRCLE.replace(background="black", pattern="plain"), Frame("yellow", "striped"))
    wrong = [render_scene(near_miss, 0), render_scene(SCENE_TASK.scene("black"), 0)]  # neither concept, then both
    scores = score_scene(wrong, both, **oracles)
    assert scores.both_present == 0.5 and scores.shape_fidelity == pytest.approx(0.5, abs=0.05)
    assert scores.frame_fidelity == pytest.approx(0.5, abs=0.05) and scores.editability == 1.0
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        score_scene(wrong, both[:1], **oracles)


# ---------------------------------------------------------------------------------------------
# the committed base
# ---------------------------------------------------------------------------------------------


def test_scene_base_is_committed_small_stamped_and_verified():
    record = json.loads((WORLD_SCENE_BASE_DIR / "world_build.json").read_text())
    assert record["settings"]["resolution"] == WORLD_SCENE_RESOLUTION and record["settings"]["world"] == "scene"
    assert record["scene_task"] == {c.name: c.identity for c in SCENE_TASK.concepts}
    for path in [*(WORLD_SCENE_BASE_DIR / n for n in WEIGHT_FILES), SCENE_ORACLE_PATH]:
        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["studio.world.build"])["script_sha256"] == record["script_sha256"]
    total = sum(p.stat().st_size for p in WORLD_SCENE_DIR.rglob("*") if p.is_file())
    assert total <= 3_500_000, f"the scene world takes {total / 1e6:.2f} MB"
    metrics = record["metrics"]
    assert metrics["base_vocabulary_accuracy"]["mean_attribute"] >= 0.9
    assert min(metrics["scene_oracle_accuracy_on_vae_reconstructions"].values()) >= 0.95
    assert min(metrics["interior_oracle_accuracy_on_vae_reconstructions"].values()) >= 0.9
    base, words = metrics["concepts_baseline"], metrics["concepts_in_words"]
    assert base["shape_fidelity"] < 0.2 and base["frame_fidelity"] < 0.2
    # said in words, the unseen combinations are drawn far more often than the class words alone give them
    assert words["shape_fidelity"] > base["shape_fidelity"] + 0.3 and words["frame_fidelity"] > base["frame_fidelity"] + 0.3


def test_scene_base_draws_scenes_from_the_cli(tmp_path, oracles):
    from PIL import Image

    from studio.cli import main

    out = tmp_path / "scene.png"
    assert main(["generate", "--base", "demo-scene", "--prompt",
                 "a photo of a red plain square on a white background in a blue striped frame",
                 "--steps", "20", "--guidance", "4", "--seed", "0", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (48, 48)
    reading = read_scene([image], **oracles)[0]
    assert reading.values["frame"] == "frame" and reading.values["background"] == "white"
    assert interior([image])[0].size == (32, 32)
