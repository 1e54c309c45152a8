"""studio.evaluation.metrics: known answers for every formula, parity with transformers' CLIPModel on a tiny
model built from config, real photos from scikit-image as plumbing, the Haar detector driving
CP-CLIP, sweep / checkpoint selection, the embedding cache, and the report files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from studio.errors import StudioError
from studio.evaluation.metrics import (
    CachedScorer,
    ClipScorer,
    Detections,
    DinoScorer,
    EmbeddingCache,
    EvalConcept,
    HaarCascadeDetector,
    OracleScorer,
    Report,
    TradeoffPoint,
    best_box_per_label,
    best_checkpoint,
    clip_i,
    clip_t,
    clip_t_text,
    context_text,
    cp_clip,
    cp_clip_image,
    dino,
    evaluate,
    image_key,
    pairwise_cosine,
    pareto_front,
    plot_sweep,
    points_from_reports,
    recommend_strength,
    ti_clip,
    write_report,
)
from studio.evaluation.metrics.detectors import padded_box

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "studio" / "assets" / "clip_tokenizer"


# ----------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, rgb)


class TableScorer:
    """A fake scorer: embeddings looked up by image content / text, encoder calls counted."""

    def __init__(
        self,
        images: dict[str, list[float]] | None = None,
        texts: dict[str, list[float]] | None = None,
        name: str = "fake:table",
    ) -> None:
        self.images = images or {}
        self.texts = texts or {}
        self.name = name
        self.image_calls = 0
        self.images_encoded = 0
        self.text_calls = 0

    def embed_images(self, images):
        self.image_calls += 1
        self.images_encoded += len(images)
        return F.normalize(torch.tensor([self.images[image_key(im)] for im in images], dtype=torch.float32), dim=-1)

    def embed_texts(self, texts):
        self.text_calls += 1
        return F.normalize(torch.tensor([self.texts[t] for t in texts], dtype=torch.float32), dim=-1)


def mean_colour(images):
    """Oracle features: mean RGB of each image, ``(N, 3)``."""
    return torch.tensor(
        np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0) for im in images])
    )


class FixedDetector:
    """Deterministic detector returning preset boxes, filtered to the queried labels."""

    name = "fixed"

    def __init__(self, found: list[tuple[str, float, tuple[float, float, float, float]]]) -> None:
        self.found = found
        self.queries: list[list[str]] = []

    def __call__(self, image, labels):
        self.queries.append(list(labels))
        hits = [f for f in self.found if f[0] in labels]
        if not hits:
            return Detections.empty()
        return Detections(
            torch.tensor([h[2] for h in hits], dtype=torch.float32),
            torch.tensor([h[1] for h in hits]),
            [h[0] for h in hits],
        )


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    skdata = pytest.importorskip("skimage.data")
    return {name: Image.fromarray(getattr(skdata, name)()) for name in ("astronaut", "chelsea", "coffee")}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel (real tokenizer) saved with its PIL processor: (folder, model, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.model_max_length = 77
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def clip_scorer(tiny_clip) -> ClipScorer:
    return ClipScorer(tiny_clip[0], batch_size=4)


# ----------------------------------------------------------------------------------------------
# Formulas: known answers on synthetic embeddings
# ----------------------------------------------------------------------------------------------


def test_clip_t_scores_matched_pairs_only():
    images = unit([1, 0, 0], [0, 1, 0])
    texts = unit([1, 1, 0], [0, 0, 1])  # image 0 vs its text: cos 45° ; image 1 vs its text: 0
    scores = clip_t(images, texts, backbone="b")
    assert torch.allclose(scores.per_image, torch.tensor([math.sqrt(0.5), 0.0]), atol=1e-6)
    assert scores.mean == pytest.approx(math.sqrt(0.5) / 2)
    assert (scores.summary.metric, scores.summary.backbone, scores.summary.count) == ("clip_t", "b", 2)
    # Inputs are normalised inside: scaling rows changes nothing (no ×100, no clamping).
    assert torch.allclose(clip_t(images * 7, texts * 0.1, "b").per_image, scores.per_image)
    assert clip_t(unit([1, 0]), unit([-1, 0])).mean == pytest.approx(-1.0)


def test_clip_i_and_dino_average_all_pairs_not_matched_pairs():
    generated = unit([1, 0], [0, 1])
    references = unit([1, 0], [0, 1])
    # Matched pairs would give 1.0; all four pairs give (1 + 0 + 0 + 1) / 4.
    for formula, name in ((clip_i, "clip_i"), (dino, "dino")):
        scores = formula(generated, references)
        assert scores.mean == pytest.approx(0.5)
        assert torch.allclose(scores.per_image, torch.tensor([0.5, 0.5]))
        assert scores.summary.metric == name
    # Uneven: 3 generated x 2 references, mean over the 6 cosines.
    generated = unit([1, 0], [1, 0], [1, 1])
    references = unit([1, 0], [1, 1])
    expected = pairwise_cosine(generated, references).mean()
    assert clip_i(generated, references).mean == pytest.approx(float(expected))
    assert clip_i(generated, references).per_image[2] == pytest.approx((math.sqrt(0.5) + 1) / 2)


def test_formulas_refuse_mismatched_widths():
    with pytest.raises(StudioError, match="widths differ"):
        clip_i(unit([1, 0]), unit([1, 0, 0]))
    with pytest.raises(StudioError, match="as many rows"):
        clip_t(unit([1, 0], [0, 1]), unit([1, 0]))


CP_CASES = {
    # name: (crop embeddings, per-concept reference embeddings, expected CP-CLIP)
    "both concepts found": ([[1, 0, 0], [0, 1, 0]], [[[1, 0, 0]], [[0, 1, 0]]], 1.0),
    "missing concept divides by |O'|": ([[1, 0, 0]], [[[1, 0, 0]], [[0, 1, 0]]], 0.5),
    "nothing detected": ([], [[[1, 0, 0]], [[0, 1, 0]]], 0.0),
    "S_ij is the mean over the concept's references": ([[1, 0, 0]], [[[1, 0, 0], [0, 0, 1]]], 0.5),
    "S_i is the max over concepts": ([[1, 1, 0]], [[[1, 0, 0]], [[1, 1, 0]], [[0, 0, 1]]], 1 / 3),
    "extra crops are not penalised": ([[1, 0, 0], [1, 0, 0]], [[[1, 0, 0]], [[0, 1, 0]]], 1.0),
}


@pytest.mark.parametrize("case", list(CP_CASES))
def test_cp_clip_known_answers(case):
    crops, refs, expected = CP_CASES[case]
    crop_embeds = torch.tensor(crops, dtype=torch.float32).reshape(len(crops), 3)
    result = cp_clip(crop_embeds, [torch.tensor(r, dtype=torch.float32) for r in refs])
    assert result.score == pytest.approx(expected, abs=1e-6)
    assert result.num_requested == len(refs)
    assert result.s_ij.shape == (len(crops), len(refs))


def test_cp_clip_max_picks_the_best_concept():
    result = cp_clip(unit([0.2, 1, 0]), [unit([1, 0, 0]), unit([0, 1, 0])])
    assert result.best_concept == (1,)
    assert float(result.s_i[0]) == pytest.approx(float(result.s_ij[0, 1]))
    assert result.score == pytest.approx(float(result.s_ij[0, 1]) / 2)


def test_ti_clip_is_matched_cosine():
    assert ti_clip(unit([1, 0], [0, 1]), unit([1, 0], [1, 0])).mean == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# Scored texts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "nouns", "mode", "expected"),
    [
        ("a <hrt> dog on the beach", {"<hrt>": "dog"}, "class_noun", "a dog on the beach"),
        ("a photo of <hrt:0.8>, in the snow", {"<hrt>": "dog"}, "class_noun", "a photo of dog, in the snow"),
        ("a sks dog in the jungle", {"sks": "dog"}, "class_noun", "a dog in the jungle"),
        ("a <t> stuffed animal", {"<t>": "stuffed animal"}, "class_noun", "a stuffed animal"),
        ("a photo of <hrt> in paris", {"<hrt>": "dog"}, "remove", "a photo of in paris"),
        ("a <hrt> dog", {"<hrt>": "dog"}, "keep", "a <hrt> dog"),
        ("<c1> cat and <c2:1.2> dog", {"<c1>": "cat", "<c2>": "dog"}, "class_noun", "cat and dog"),
        ("a <hrtx> dog", {"<hrt>": "dog"}, "class_noun", "a <hrtx> dog"),  # another token is left alone
    ],
)
def test_clip_t_text(prompt, nouns, mode, expected):
    assert clip_t_text(prompt, nouns, mode) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a <c1> cat and a <c2> dog on the beach", "on the beach"),
        ("a photo of <c1:0.8> cat, <c2> dog and a lamp in the living room", "a photo of a lamp in the living room"),
        ("the <c1> cat playing with a <c2> dog in the snow", "playing in the snow"),
        ("a <c1> cat with a <c2> dog", None),
    ],
)
def test_context_text_removes_the_concept_objects(prompt, expected):
    assert context_text(prompt, {"<c1>": "cat", "<c2>": "dog"}) == expected


# ----------------------------------------------------------------------------------------------
# Detection, best box per label, crops
# ----------------------------------------------------------------------------------------------


def test_best_box_per_label_keeps_the_highest_score():
    found = Detections(
        torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3], [0, 0, 4, 4]], dtype=torch.float32),
        torch.tensor([0.3, 0.9, 0.5, 0.7]),
        ["cat", "dog", "cat", "dog"],
    )
    kept = best_box_per_label(found, ["cat", "dog", "lamp"])
    assert kept.labels == ["cat", "dog"]
    assert kept.boxes[:, 2].tolist() == [3.0, 2.0]
    assert kept.scores.tolist() == pytest.approx([0.5, 0.9])
    assert best_box_per_label(Detections.empty()).labels == []


def test_padded_box_grows_and_clips():
    assert padded_box((10, 10, 30, 50), (100, 100), 0.1) == (8, 6, 32, 54)
    assert padded_box((0, 0, 100, 100), (100, 100), 0.5) == (0, 0, 100, 100)
    assert padded_box((5, 5, 5, 5), (10, 10), 0.0) == (5, 5, 6, 6)  # never empty


def test_cp_clip_image_pipeline_with_a_fixed_detector():
    # A red and a blue square on grey; the oracle scorer embeds mean colours, so a tight crop of a
    # square matches its concept's reference exactly (cos 1) and the other one not at all (cos 0).
    canvas = solid((128, 128, 128), (100, 50))
    canvas.paste(solid((255, 0, 0), (20, 20)), (10, 10))
    canvas.paste(solid((0, 0, 255), (20, 20)), (60, 10))
    scorer = OracleScorer(mean_colour, name="colour")
    refs = [scorer.embed_images([solid((255, 0, 0))]), scorer.embed_images([solid((0, 0, 255))])]
    detector = FixedDetector(
        [
            ("ball", 0.9, (10, 10, 30, 30)),
            ("ball", 0.4, (60, 10, 80, 30)),
            ("cube", 0.8, (60, 10, 80, 30)),
            ("lamp", 0.99, (0, 0, 5, 5)),
        ]
    )
    result = cp_clip_image(canvas, ["ball", "cube"], refs, scorer, detector, padding=0.0)
    assert detector.queries == [["ball", "cube"]]
    assert result.kept.labels == ["ball", "cube"]  # the 0.4 "ball" box is dropped, "lamp" never queried
    assert result.score == pytest.approx(1.0, abs=1e-6)
    assert result.detail.best_concept == (0, 1)
    # The cube is not found: its term is missing and the sum is still divided by |O'| = 2.
    only_ball = FixedDetector([("ball", 0.9, (10, 10, 30, 30))])
    assert cp_clip_image(canvas, ["ball", "cube"], refs, scorer, only_ball, padding=0.0).score == pytest.approx(0.5)
    # Padding pulls grey into the crop: the score drops below 1.
    assert cp_clip_image(canvas, ["ball", "cube"], refs, scorer, detector, padding=0.4).score < 0.99


def test_haar_detector_finds_the_astronaut_face_and_the_cat_face(photos):
    pytest.importorskip("cv2")
    detector = HaarCascadeDetector()
    face = best_box_per_label(detector(photos["astronaut"], ["person"]))
    assert face.labels == ["person"]
    x0, y0, x1, y1 = face.boxes[0].tolist()
    assert 170 < (x0 + x1) / 2 < 280 and 60 < (y0 + y1) / 2 < 170  # her face, upper middle
    cat = best_box_per_label(detector(photos["chelsea"], ["cat"]))
    assert cat.labels == ["cat"]
    x0, y0, x1, y1 = cat.boxes[0].tolist()
    assert x1 - x0 > 200  # the face fills the photo: found thanks to the border
    assert detector(photos["coffee"], ["person", "cat"]).labels == []
    # Deterministic.
    assert torch.equal(detector(photos["astronaut"], ["person"]).boxes, detector(photos["astronaut"], ["person"]).boxes)
    with pytest.raises(StudioError, match="cannot find 'giraffe'"):
        detector(photos["coffee"], ["giraffe"])


def test_owlvit_detector_plumbing_on_a_tiny_model(tmp_path, photos, clip_scorer):
    from transformers import CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    from studio.evaluation.metrics import OwlVitDetector

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.model_max_length = 16
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = OwlViTConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=32,
    )
    torch.manual_seed(0)
    OwlViTForObjectDetection(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    OwlViTImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path
    )
    image = photos["chelsea"]  # 451 x 300: boxes must come back in its pixel coordinates
    detector = OwlVitDetector(tmp_path, threshold=0.0)
    found = detector(image, ["cat", "person", "cat"])
    assert len(found.labels) == 16  # one box per 8x8 patch of the 32x32 input
    assert set(found.labels) <= {"cat", "person"}
    assert float(found.boxes[:, 2].max()) <= image.width and float(found.boxes[:, 3].max()) <= image.height
    assert float(found.boxes[:, 2].max()) > 300  # scaled to the image, not left in [0, 1]
    cats = detector(image, ["cat"])
    detector.threshold = float(cats.scores.median())
    assert len(detector(image, ["cat"]).labels) == int((cats.scores > detector.threshold).sum())
    concept = EvalConcept("<kit>", "cat", [image])
    detector.threshold = 0.0
    report = evaluate({"a <kit> cat": [image]}, concept, clip_scorer, detector=detector)
    assert 0.0 < report.score("cp_clip") <= 1.0 and report.backbones["detector"].startswith("owl:folder:")


# ----------------------------------------------------------------------------------------------
# Backends on tiny models: parity with transformers
# ----------------------------------------------------------------------------------------------


def test_clip_scorer_matches_clipmodel_logits(tiny_clip, clip_scorer, photos):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder, model, tokenizer = tiny_clip
    images = [photos["astronaut"], photos["chelsea"], photos["coffee"]]
    texts = ["a photo of an astronaut", "a cat", "a cup of coffee on a table"]
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    expected = out.logits_per_image / model.logit_scale.exp()  # (3 images, 3 texts) cosines

    image_embeds, text_embeds = clip_scorer.embed_images(images), clip_scorer.embed_texts(texts)
    assert image_embeds.shape == (3, 16) and image_embeds.dtype == torch.float32
    assert torch.allclose(image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(pairwise_cosine(image_embeds, text_embeds), expected, atol=1e-5)
    assert torch.allclose(clip_t(image_embeds, text_embeds).per_image, expected.diagonal(), atol=1e-5)
    expected_clip_i = (out.image_embeds @ out.image_embeds.T).mean()
    assert clip_i(image_embeds, image_embeds).mean == pytest.approx(float(expected_clip_i), abs=1e-5)
    assert clip_scorer.name.startswith("clip:folder:")


def test_clip_i_of_identical_images_is_one_and_a_flipped_copy_less(clip_scorer, photos):
    astronaut = photos["astronaut"]
    same = clip_i(clip_scorer.embed_images([astronaut]), clip_scorer.embed_images([astronaut.copy()]))
    flipped = clip_i(clip_scorer.embed_images([ImageOps.mirror(astronaut)]), clip_scorer.embed_images([astronaut]))
    assert same.mean == pytest.approx(1.0, abs=1e-5)
    assert flipped.mean < 1.0 - 1e-4


def test_dino_scorer_uses_the_cls_token_not_the_pooler(tmp_path, photos):
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2
    )
    torch.manual_seed(0)
    model = ViTModel(config, add_pooling_layer=True).eval()
    model.save_pretrained(tmp_path)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    images = [photos["astronaut"], photos["chelsea"]]
    with torch.no_grad():
        out = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    scorer = DinoScorer(tmp_path)
    embeds = scorer.embed_images(images)
    assert torch.allclose(embeds, F.normalize(out.last_hidden_state[:, 0], dim=-1), atol=1e-5)
    assert not torch.allclose(embeds, F.normalize(out.pooler_output, dim=-1), atol=1e-3)
    assert scorer.name.startswith("dino:")
    with pytest.raises(StudioError, match="no text tower"):
        scorer.embed_texts(["a cat"])


# ----------------------------------------------------------------------------------------------
# evaluate: end to end on real photos
# ----------------------------------------------------------------------------------------------


def test_evaluate_single_concept_with_tiny_clip(clip_scorer, photos):
    astronaut, chelsea = photos["astronaut"], photos["chelsea"]
    images = {"a <kit> cat on the beach": [chelsea, ImageOps.mirror(chelsea)], "a <kit:0.5> cat in space": [astronaut]}
    identity = OracleScorer(mean_colour, name="colour")  # stands in for DINO
    report = evaluate(images, EvalConcept("<kit>", "cat", [chelsea]), clip_scorer, identity_scorer=identity)
    assert set(report.summaries) == {"clip_t", "clip_i", "dino"}
    assert report.backbones == {"clip": clip_scorer.name, "dino": "oracle:colour"}
    colours = identity.embed_images([chelsea, ImageOps.mirror(chelsea), astronaut])
    assert report.score("dino") == pytest.approx(dino(colours, identity.embed_images([chelsea])).mean, abs=1e-6)
    with pytest.raises(StudioError, match="no 'cp_clip' score"):
        report.score("cp_clip")
    assert [r.clip_t_text for r in report.records] == ["a cat on the beach"] * 2 + ["a cat in space"]
    gen = clip_scorer.embed_images([chelsea, ImageOps.mirror(chelsea), astronaut])
    texts = clip_scorer.embed_texts(["a cat on the beach", "a cat on the beach", "a cat in space"])
    assert report.score("clip_t") == pytest.approx(clip_t(gen, texts).mean, abs=1e-6)
    assert report.score("clip_i") == pytest.approx(clip_i(gen, clip_scorer.embed_images([chelsea])).mean, abs=1e-6)
    assert report.records[0].clip_i["<kit>"] == pytest.approx(1.0, abs=1e-5)  # identical to the reference
    assert report.records[1].clip_i["<kit>"] < 1.0


def test_cp_clip_end_to_end_with_the_haar_detector(clip_scorer, photos):
    pytest.importorskip("cv2")
    astronaut, chelsea = photos["astronaut"], photos["chelsea"]
    scene = Image.new("RGB", (512, 256), (255, 255, 255))  # a "generated" image with both concepts
    scene.paste(astronaut.resize((256, 256)), (0, 0))
    scene.paste(chelsea.resize((180, 120)), (300, 70))
    alone = astronaut.resize((256, 256))
    concepts = [EvalConcept("<ada>", "person", [astronaut]), EvalConcept("<kit>", "cat", [chelsea, chelsea.rotate(5)])]
    prompts = {"a photo of <ada> person and a <kit> cat in a garden": [scene], "<ada> person and <kit> cat": [alone]}
    detector = HaarCascadeDetector()
    report = evaluate(prompts, concepts, clip_scorer, detector=detector)

    # Recompute CP-CLIP for the scene by hand: best box per label -> padded crop -> S_ij -> max -> / 2.
    kept = best_box_per_label(detector(scene, ["person", "cat"]), ["person", "cat"])
    assert kept.labels == ["person", "cat"]
    crops = clip_scorer.embed_images([scene.crop(padded_box(b, scene.size, 0.1)) for b in kept.boxes])
    refs = [clip_scorer.embed_images([astronaut]), clip_scorer.embed_images([chelsea, chelsea.rotate(5)])]
    s_ij = torch.stack([(crops @ r.T).mean(1) for r in refs], dim=1)  # (2 crops, 2 concepts)
    expected = float(s_ij.max(dim=1).values.sum() / 2)
    scene_record, alone_record = report.records
    assert scene_record.cp_clip == pytest.approx(expected, abs=1e-5)
    assert [c["label"] for c in scene_record.cp_clip_detail["crops"]] == ["person", "cat"]
    # No cat in the second image: only the face term counts, still divided by 2.
    assert [c["label"] for c in alone_record.cp_clip_detail["crops"]] == ["person"]
    assert alone_record.cp_clip == pytest.approx(alone_record.cp_clip_detail["crops"][0]["s_i"] / 2, abs=1e-6)
    # TI-CLIP scored the context text only; none is left for the second prompt.
    assert scene_record.context_text == "a photo of in a garden"
    text = clip_scorer.embed_texts(["a photo of in a garden"])
    assert scene_record.ti_clip == pytest.approx(float(clip_scorer.embed_images([scene]) @ text[0]), abs=1e-5)
    assert alone_record.ti_clip is None and report.summaries["ti_clip"].count == 1
    assert report.summaries["cp_clip"].mean == pytest.approx((scene_record.cp_clip + alone_record.cp_clip) / 2)
    assert {"clip_i[<ada>]", "clip_i[<kit>]", "clip_i"} <= set(report.summaries)
    assert report.backbones["detector"].startswith("haar")


# ----------------------------------------------------------------------------------------------
# Sweep and best checkpoint
# ----------------------------------------------------------------------------------------------


def _sweep_fixture():
    """Strength s -> solid image whose fake embedding is (cos θ, sin θ, z) with θ = s·π/2: fidelity to
    the reference (0, 1, 0) is sin θ, editability w.r.t. the text (1, 0, 0) is cos θ. Strength 1.25
    adds z (off both axes), so it is dominated."""
    strengths = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    scorer = TableScorer(texts={"a dog on the beach": [1, 0, 0]})
    reference = solid((1, 2, 3))
    scorer.images[image_key(reference)] = [0, 1, 0]
    images = {}
    for k, s in enumerate(strengths):
        image = solid((10 * k, 0, 0))
        theta = min(s, 1.0) * math.pi / 2 if s <= 1 else math.pi / 4
        scorer.images[image_key(image)] = [math.cos(theta), math.sin(theta), 0.0 if s <= 1 else 1.0]
        images[s] = image
    return strengths, scorer, reference, images


def test_sweep_recommends_the_known_knee(tmp_path):
    pytest.importorskip("matplotlib")
    strengths, scorer, reference, images = _sweep_fixture()
    concept = EvalConcept("<hrt>", "dog", [reference])
    reports = [evaluate({"a <hrt> dog on the beach": [images[s]]}, concept, scorer) for s in strengths]
    points = points_from_reports(strengths, reports)
    assert (points[2].fidelity, points[2].editability) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))
    assert pareto_front(points) == [0, 1, 2, 3, 4]  # 1.25 is dominated by 0.5
    for rule in ("product", "knee"):
        choice = recommend_strength(points, rule=rule)
        assert choice.value == 0.5 and choice.front == (0, 1, 2, 3, 4)
    assert recommend_strength(points, min_editability=0.9).value == 0.25
    assert plot_sweep(points, recommend_strength(points), tmp_path / "sweep.png").stat().st_size > 1000


def test_pareto_front_and_ties():
    points = [TradeoffPoint(0.5, 0.7, 0.3), TradeoffPoint(1.0, 0.7, 0.3), TradeoffPoint(1.5, 0.6, 0.2)]
    assert pareto_front(points) == [0, 1]  # equal points do not dominate each other
    assert recommend_strength(points).value == 0.5  # tie -> the smaller strength
    assert recommend_strength([TradeoffPoint(1.0, 0.5, 0.5)]).value == 1.0
    with pytest.raises(StudioError):
        recommend_strength([])


def test_best_checkpoint_from_an_eval_curve():
    steps = [100, 200, 300, 400, 500]
    fidelity = [0.60, 0.70, 0.78, 0.80, 0.80]
    editability = [0.32, 0.31, 0.29, 0.25, 0.24]
    curve = [TradeoffPoint(s, f, e) for s, f, e in zip(steps, fidelity, editability)]
    assert best_checkpoint(curve, rule="fidelity").value == 400  # tie at 0.80 -> the earlier step
    # Normalised: f^ = (0, .5, .9, 1, 1), e^ = (1, .875, .625, .125, 0) -> products peak at step 300.
    assert best_checkpoint(curve).value == 300
    assert best_checkpoint(curve, rule="fidelity", min_editability=0.30).value == 200
    with pytest.raises(StudioError, match="editability"):
        best_checkpoint(curve, min_editability=0.5)


# ----------------------------------------------------------------------------------------------
# Cache, batching, oracle, loading errors
# ----------------------------------------------------------------------------------------------


def test_cache_avoids_recomputation(tmp_path):
    images = [solid((k, 0, 0)) for k in range(4)]
    scorer = TableScorer({image_key(im): [1, k, 0] for k, im in enumerate(images)}, {"x": [1, 0, 0]})
    cached = CachedScorer(scorer, EmbeddingCache(tmp_path / "cache"))
    first = cached.embed_images(images + [images[0]])  # a duplicate in one call is encoded once
    assert (scorer.image_calls, scorer.images_encoded) == (1, 4)
    again = cached.embed_images(list(reversed(images)))
    assert scorer.image_calls == 1 and torch.equal(again, first[:4].flip(0))
    cached.embed_texts(["x", "x"])
    cached.embed_texts(["x"])
    assert scorer.text_calls == 1
    # A fresh process reading the same folder encodes nothing; another backbone recomputes.
    fresh = CachedScorer(scorer, EmbeddingCache(tmp_path / "cache"))
    assert torch.equal(fresh.embed_images(images), first[:4]) and scorer.image_calls == 1
    other = TableScorer(scorer.images, name="fake:other")
    CachedScorer(other, EmbeddingCache(tmp_path / "cache")).embed_images(images)
    assert other.images_encoded == 4
    # evaluate re-run with a shared cache: no image is encoded again.
    strengths, sweep_scorer, reference, sweep_images = _sweep_fixture()
    shared = EmbeddingCache()
    concept = EvalConcept("<hrt>", "dog", [reference])
    evaluate({"a <hrt> dog on the beach": [sweep_images[0.5]]}, concept, sweep_scorer, cache=shared)
    encoded = sweep_scorer.images_encoded
    evaluate({"a <hrt> dog on the beach": [sweep_images[0.5]]}, concept, sweep_scorer, cache=shared)
    assert sweep_scorer.images_encoded == encoded == 2


def test_scorers_batch_encoder_calls():
    calls = []
    scorer = OracleScorer(lambda ims: (calls.append(len(ims)), mean_colour(ims))[1], name="colour", batch_size=2)
    embeds = scorer.embed_images([solid((k, 1, 1)) for k in range(5)])
    assert calls == [2, 2, 1] and embeds.shape == (5, 3)
    assert scorer.name == "oracle:colour"


def test_oracle_probabilities_give_the_bhattacharyya_coefficient():
    probs = {0: [0.5, 0.5, 0.0], 1: [0.0, 0.5, 0.5]}
    scorer = OracleScorer(
        lambda ims: torch.tensor([probs[im.getpixel((0, 0))[0]] for im in ims]), name="world", output="probabilities"
    )
    embeds = scorer.embed_images([solid((0, 0, 0)), solid((1, 0, 0))])
    assert float(embeds[0] @ embeds[1]) == pytest.approx(0.5)  # sqrt(.5 * 0) + sqrt(.5 * .5) + 0
    with pytest.raises(StudioError, match="no text tower"):
        scorer.embed_texts(["a dog"])


def test_loading_fails_with_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StudioError, match="not in the local Hugging Face cache") as err:
        ClipScorer("studio-tests/definitely-not-cached-clip")
    assert "\n" not in str(err.value) and err.value.__cause__ is None
    with pytest.raises(StudioError, match="does not exist"):
        DinoScorer(str(tmp_path / "missing" / "dino"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="Cannot load the CLIP model from folder"):
        ClipScorer(tmp_path / "empty")


def test_a_cached_hub_id_loads_without_the_network(monkeypatch, tmp_path, tiny_clip, clip_scorer, photos):
    import shutil
    import socket

    # A Hugging Face cache holding "studio-tests/tiny-clip" at a fake commit.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--studio-tests--tiny-clip"
    shutil.copytree(tiny_clip[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    scorer = ClipScorer("studio-tests/tiny-clip", cache_dir=tmp_path / "hub")
    assert attempts == []
    assert scorer.name == f"clip:studio-tests/tiny-clip@{commit[:12]}"
    image = [photos["coffee"]]
    assert torch.allclose(scorer.embed_images(image), clip_scorer.embed_images(image), atol=1e-6)


def test_open_clip_backend_says_when_it_is_missing(monkeypatch):
    from studio.evaluation.metrics import OpenClipScorer

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(StudioError, match="open_clip_torch"):
        OpenClipScorer()


# ----------------------------------------------------------------------------------------------
# Report files
# ----------------------------------------------------------------------------------------------


def test_report_files_round_trip(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    strengths, scorer, reference, images = _sweep_fixture()
    concept = EvalConcept("<hrt>", "dog", [reference])
    by_prompt = {"a <hrt> dog on the beach": [images[0.0], images[0.5]], "a <hrt> dog": [images[1.0]]}
    scorer.texts["a dog"] = [1, 1, 0]
    report = evaluate(by_prompt, concept, scorer)
    paths = write_report(report, tmp_path / "eval", images_by_prompt=by_prompt)
    loaded = Report.load(paths["report"])
    assert loaded.to_dict() == report.to_dict()
    assert json.loads(paths["report"].read_text())["summaries"]["clip_t"]["backbone"] == "fake:table"
    with Image.open(paths["contact_sheet"]) as sheet:
        assert sheet.size == (2 * 256, 2 * (256 + 14))  # one row per prompt, two columns
    assert paths["scatter"].stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(StudioError, match="matplotlib"):
        write_report(report, tmp_path / "again")
    assert write_report(report, tmp_path / "noplot", plot=False).keys() == {"report"}
