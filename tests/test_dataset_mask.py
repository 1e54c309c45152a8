"""The dataset step ``mask`` (studio/dataset/mask.py, studio/dataset/segmenters.py) and the world's true masks.

Measured bars (this file's images, 2 CPU cores):

* GrabCut on synthetic product photos (4 shapes × 4 colours × 3 plain or graded backgrounds, 128 px,
  anti-aliased): IoU ≥ 0.956 for every photo (the arrow's notch loses its mixed edge pixels), so the
  bar is 0.93;
* GrabCut on the learnable world (32 px): the concept's training photos IoU ≥ 0.919 (bar 0.9); 60 random
  world images mean 0.87 (bar 0.84) — every error is an anti-aliased edge pixel counted as subject.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio.dataset.mask import (
    CLIPSegSegmenter,
    GrabCutSegmenter,
    default_prompt,
    load_segmenter,
    mask_folder,
    mask_path,
)
from studio.errors import DatasetError, StudioError
from tests.helpers import TOKENIZER_DIR

SS = 4  # supersampling of the synthetic photos' shapes


def product_photo(kind: str, colour: tuple[int, int, int], background: tuple[int, int, int],
                  gradient: tuple[int, int, int] = (0, 0, 0), size: int = 128,
                  width: int | None = None) -> tuple[Image.Image, np.ndarray]:
    """A product-like photo: one anti-aliased shape on a plain or top-to-bottom graded background.

    Returns the RGB image (``width``×``size``) and the true mask (``(size, width)`` bool, shape ≥ half a pixel)."""
    w = width or size
    rows = np.linspace(0.0, 1.0, size)[:, None, None]
    top = np.array(background, float)
    pixels = np.broadcast_to(top - np.array(gradient, float) * rows, (size, w, 3)).copy()
    big = Image.new("L", (w * SS, size * SS), 0)
    draw = ImageDraw.Draw(big)
    sx, sy = w * SS, size * SS
    if kind == "ellipse":
        draw.ellipse([0.3 * sx, 0.2 * sy, 0.7 * sx, 0.85 * sy], fill=255)
    elif kind == "box":
        draw.rectangle([0.25 * sx, 0.3 * sy, 0.75 * sx, 0.8 * sy], fill=255)
    elif kind == "bottle":
        draw.rectangle([0.4 * sx, 0.12 * sy, 0.6 * sx, 0.35 * sy], fill=255)
        draw.rounded_rectangle([0.3 * sx, 0.3 * sy, 0.7 * sx, 0.88 * sy], radius=0.08 * sy, fill=255)
    elif kind == "arrow":
        draw.polygon([(0.5 * sx, 0.15 * sy), (0.85 * sx, 0.8 * sy), (0.5 * sx, 0.65 * sy), (0.15 * sx, 0.8 * sy)],
                     fill=255)
    soft = np.asarray(big.resize((w, size), Image.Resampling.BOX), float)[..., None] / 255.0
    pixels = pixels * (1 - soft) + np.array(colour, float) * soft
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image, soft[..., 0] >= 0.5


def iou(mask: Image.Image | np.ndarray, truth: np.ndarray) -> float:
    m = np.asarray(mask) >= 128 if isinstance(mask, Image.Image) else mask
    return float((m & truth).sum() / max(1, (m | truth).sum()))


def write_products(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    kinds = ("ellipse", "box", "bottle", "arrow")
    paths = []
    for i in range(n):
        image, _ = product_photo(kinds[i % 4], (40, 80, 200), (240, 240, 238), (30, 30, 30), size=96, width=80 + 8 * i)
        path = folder / f"{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# GrabCut
# ---------------------------------------------------------------------------------------------

BACKGROUNDS = (((245, 245, 245), (0, 0, 0)), ((235, 235, 230), (40, 40, 40)), ((230, 215, 190), (30, 30, 20)))
COLOURS = ((200, 40, 40), (40, 80, 200), (30, 30, 30), (240, 200, 60))


def test_grabcut_finds_products_on_plain_and_graded_backgrounds():
    seg = GrabCutSegmenter()
    scores = {}
    for kind in ("ellipse", "box", "bottle", "arrow"):
        for colour in COLOURS:
            for background, gradient in BACKGROUNDS:
                image, truth = product_photo(kind, colour, background, gradient)
                (mask,) = seg.segment([image], "")
                assert mask.mode == "L" and mask.size == image.size
                assert set(np.unique(np.asarray(mask))) <= {0, 255}
                scores[(kind, colour, background)] = iou(mask, truth)
    worst = min(scores, key=scores.__getitem__)
    assert scores[worst] >= 0.93, f"GrabCut IoU {scores[worst]:.3f} on {worst}"


def test_grabcut_is_deterministic_and_keeps_the_image_size():
    image, truth = product_photo("bottle", (200, 40, 40), (235, 235, 230), (40, 40, 40), size=120, width=90)
    seg = GrabCutSegmenter()
    first, again = seg.segment([image, image], "ignored")
    assert first.size == (90, 120)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert iou(first, truth) >= 0.93
    # a large photo is segmented at work size (384 px) and scaled back
    big, big_truth = product_photo("bottle", (200, 40, 40), (235, 235, 230), (40, 40, 40), size=1200, width=900)
    (mask,) = seg.segment([big], "")
    assert mask.size == (900, 1200)
    assert iou(mask, big_truth) >= 0.95


def test_grabcut_finds_nothing_in_a_flat_or_noisy_image():
    seg = GrabCutSegmenter()
    flat = Image.new("RGB", (64, 64), (120, 120, 120))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for mask in seg.segment([flat, noise], ""):
        assert np.asarray(mask).max() == 0


def test_grabcut_on_the_learnable_world_against_the_true_masks():
    from studio.world import CONCEPT
    from studio.world.render import render, render_mask, sample_attributes

    seg = GrabCutSegmenter()
    rng = random.Random("test-dataset-mask")
    world = []
    for _ in range(60):
        attributes, jitter = sample_attributes(rng), rng.randrange(2**31)
        (mask,) = seg.segment([render(attributes, jitter=jitter)], "")
        world.append(iou(mask, np.asarray(render_mask(attributes, jitter=jitter)) >= 128))
    assert np.mean(world) >= 0.84, f"mean IoU {np.mean(world):.3f} on random world images"
    concept = []
    jitters = random.Random("concept-train/0")  # CONCEPT.training_images' draws, in order
    for i, photo in enumerate(CONCEPT.training_images(n=5, seed=0)):
        attributes = CONCEPT.attributes(background=CONCEPT.train_backgrounds[i % 2], size="large")
        truth = render_mask(attributes, jitter=jitters.randrange(2**31))
        (mask,) = seg.segment([photo], "")
        concept.append(iou(mask, np.asarray(truth) >= 128))
    assert min(concept) >= 0.9, f"IoU {min(concept):.3f} on the concept's photos"


# ---------------------------------------------------------------------------------------------
# the world's true masks
# ---------------------------------------------------------------------------------------------


def test_render_mask_is_the_rendered_shape_and_render_is_unchanged():
    from studio.world.render import BACKGROUNDS, Attributes, render, render_mask

    cases = [Attributes("star", "red", "striped", "pink", "small"), Attributes("circle", "purple", "dotted", "white", "large"),
             Attributes("triangle", "green", "plain", "teal", "large"), Attributes("square", "yellow", "dotted", "black", "small")]
    digest = hashlib.sha256()
    for attributes in cases:
        for jitter in (None, 0, 5):
            for size in (32, 48):
                image = render(attributes, jitter=jitter, size=size)
                digest.update(image.tobytes())
                mask = np.asarray(render_mask(attributes, jitter=jitter, size=size))
                assert mask.shape == (size, size) and mask.dtype == np.uint8
                pixels = np.asarray(image)
                # outside the shape: exactly the background; inside: never the background
                assert (pixels[mask == 0] == BACKGROUNDS[attributes.background]).all()
                assert (np.abs(pixels[mask == 255].astype(int) - BACKGROUNDS[attributes.background]).sum(-1) > 0).all()
                assert 0 < (mask == 255).sum() < size * size
    # the pixels the demo world was built on (sha256 of these renders before render_mask existed)
    assert digest.hexdigest() == "4a34712c4b722b48356f8a3a7634716dd8fd20d910a7cafcd83410176f10eb03"


# ---------------------------------------------------------------------------------------------
# CLIPSeg (a tiny random model built from config; nothing is downloaded)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clipseg(tmp_path_factory) -> Path:
    """A tiny random ``CLIPSegForImageSegmentation`` (seed 0) saved with the committed CLIP tokenizer and a
    PIL ViT image processor, as ``CIDAS/clipseg-rd64-refined`` is laid out."""
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPTokenizer, ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-clipseg")
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.model_max_length = 77
    config = CLIPSegConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=16, extract_layers=[1], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clipseg_loads_from_a_folder_and_segments_at_the_image_size(tiny_clipseg):
    seg = load_segmenter(str(tiny_clipseg))
    assert isinstance(seg, CLIPSegSegmenter) and seg.name == f"clipseg:{tiny_clipseg}"
    images = [product_photo("ellipse", (200, 40, 40), (240, 240, 240), size=50, width=70)[0],
              product_photo("box", (40, 80, 200), (240, 240, 240), size=96)[0], Image.new("RGBA", (40, 40))]
    probabilities = seg.probabilities(images, "the box")
    assert [p.shape for p in probabilities] == [(50, 70), (96, 96), (40, 40)]
    assert all(p.dtype == np.float32 and 0 <= p.min() <= p.max() <= 1 for p in probabilities)
    masks = seg.segment(images, "the box")
    assert [(m.mode, m.size) for m in masks] == [("L", (70, 50)), ("L", (96, 96)), ("L", (40, 40))]
    # the threshold decides: 0 keeps every pixel, above 1 none
    seg.threshold = 0.0
    assert all(np.asarray(m).min() == 255 for m in seg.segment(images, "the box"))
    seg.threshold = 1.01
    assert all(np.asarray(m).max() == 0 for m in seg.segment(images, "the box"))


def test_clipseg_needs_a_prompt(tiny_clipseg):
    seg = load_segmenter(str(tiny_clipseg))
    with pytest.raises(StudioError, match="--prompt"):
        seg.segment([Image.new("RGB", (32, 32))], "  ")
    assert default_prompt("dog") == "a photo of a dog" and default_prompt("owl") == "a photo of an owl"
    assert default_prompt(None) == ""


def test_load_segmenter_errors_are_one_line(tmp_path, monkeypatch):
    assert isinstance(load_segmenter("grabcut"), GrabCutSegmenter)
    assert isinstance(load_segmenter("GrabCut "), GrabCutSegmenter)
    with pytest.raises(StudioError, match="not 'grabcut', an existing folder or a hub id") as err:
        load_segmenter(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(StudioError, match="not CLIPSeg"):
        load_segmenter(str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="no readable config.json"):
        load_segmenter(str(tmp_path / "empty"))
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    with pytest.raises(StudioError, match="HF_HUB_OFFLINE=1") as err:
        load_segmenter("clipseg")
    assert "CIDAS/clipseg-rd64-refined" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# sidecars
# ---------------------------------------------------------------------------------------------


def test_masks_are_written_beside_the_photos_and_the_trainers_read_them(tmp_path):
    from trainers.data import load_image_folder

    photos = write_products(tmp_path / "photos", n=3)
    (tmp_path / "photos" / "00.txt").write_text("a photo of a bottle")
    results = mask_folder(tmp_path / "photos", GrabCutSegmenter())
    assert [r.image for r in results] == photos
    assert [r.status for r in results] == ["written"] * 3 and all(r.warning is None for r in results)
    for r in results:
        assert r.mask == mask_path(r.image) == r.image.with_name(r.image.stem + ".mask.png")
        with Image.open(r.mask) as mask, Image.open(r.image) as image:
            assert mask.mode == "L" and mask.size == image.size
            assert abs((np.asarray(mask) >= 128).mean() - r.coverage) < 1e-9
        assert 0.15 < r.coverage < 0.5
    assert not list((tmp_path / "photos").glob(".*"))  # no temporary file left
    examples = load_image_folder(tmp_path / "photos", 32)
    assert len(examples) == 3 and all(e.mask is not None and e.mask.shape == (1, 32, 32) for e in examples)
    for e, r in zip(examples, results):
        assert abs(float(e.mask.mean()) - r.coverage) < 0.08


def test_existing_masks_are_kept_unless_forced(tmp_path):
    photos = write_products(tmp_path / "photos", n=2)
    mine = Image.new("L", Image.open(photos[0]).size, 255)
    mine.paste(0, (0, 0, 10, 10))
    mine.save(mask_path(photos[0]))
    before = mask_path(photos[0]).read_bytes()
    results = mask_folder(tmp_path / "photos", GrabCutSegmenter())
    assert [r.status for r in results] == ["kept", "written"] and results[0].coverage is None
    assert mask_path(photos[0]).read_bytes() == before
    assert [r.status for r in mask_folder(tmp_path / "photos", GrabCutSegmenter())] == ["kept", "kept"]
    forced = mask_folder(tmp_path / "photos", GrabCutSegmenter(), force=True)
    assert [r.status for r in forced] == ["written", "written"]
    assert mask_path(photos[0]).read_bytes() != before


def test_empty_and_near_full_masks_are_warnings_not_files(tmp_path):
    class Full:
        name = "full"

        def segment(self, images, prompt):
            return [Image.new("L", im.size, 255) for im in images]

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 48), (120, 120, 120)).save(folder / "wall.jpg")
    (result,) = mask_folder(folder, GrabCutSegmenter())
    assert result.status == "skipped" and result.coverage == 0.0
    assert "empty" in result.warning and "--force" in result.warning
    assert not mask_path(folder / "wall.jpg").exists()
    (result,) = mask_folder(folder, Full())
    assert result.status == "skipped" and result.coverage == 1.0 and "100.0%" in result.warning
    (forced,) = mask_folder(folder, GrabCutSegmenter(), force=True)
    assert forced.status == "written" and "empty" in forced.warning
    with Image.open(mask_path(folder / "wall.jpg")) as mask:
        assert mask.size == (64, 48) and np.asarray(mask).max() == 0


def test_transparent_photos_keep_their_alpha_unless_forced(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    cutout = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    cutout.paste((200, 40, 40, 255), (16, 16, 48, 48))
    cutout.save(folder / "cutout.png")
    opaque, _ = product_photo("box", (200, 40, 40), (240, 240, 240), size=64)
    opaque.convert("RGBA").save(folder / "opaque.png")  # an alpha channel with nothing transparent: no mask
    results = mask_folder(folder, GrabCutSegmenter())
    assert [(r.image.name, r.status) for r in results] == [("cutout.png", "kept"), ("opaque.png", "written")]
    assert "transparency" in results[0].warning and not mask_path(folder / "cutout.png").exists()
    (cut, _) = mask_folder(folder, GrabCutSegmenter(), force=True)
    assert cut.status == "written" and abs(cut.coverage - 0.25) < 0.03  # composited on white, as trainers do


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        mask_folder(tmp_path / "nope", GrabCutSegmenter())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        mask_folder(tmp_path / "empty", GrabCutSegmenter())
    photos = write_products(tmp_path / "twins", n=1)
    Image.open(photos[0]).convert("RGB").save(tmp_path / "twins" / "00.jpg")
    with pytest.raises(DatasetError, match="would share the mask 00.mask.png"):
        mask_folder(tmp_path / "twins", GrabCutSegmenter())
    write_products(tmp_path / "broken", n=2)
    (tmp_path / "broken" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match="01.png"):
        mask_folder(tmp_path / "broken", GrabCutSegmenter())


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_masks_a_folder(tmp_path, capsys, tiny_clipseg):
    from studio.cli import main

    photos = write_products(tmp_path / "photos", n=2)
    assert main(["dataset", "mask", str(tmp_path / "photos")]) == 0
    out = capsys.readouterr().out
    assert "00.png → 00.mask.png" in out and "grabcut: 2 written, 0 kept, 0 skipped of 2 photos" in out
    assert all(mask_path(p).is_file() for p in photos)
    assert main(["dataset", "mask", str(tmp_path / "photos")]) == 0
    assert "0 written, 2 kept" in capsys.readouterr().out
    code = main(["dataset", "mask", str(tmp_path / "photos"), "--model", str(tiny_clipseg), "--class-word", "bottle",
                 "--force", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0 and f"clipseg:{tiny_clipseg}:" in captured.out
    assert main(["dataset", "mask", str(tmp_path / "photos"), "--model", str(tiny_clipseg), "--force"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--prompt" in err and err.count("\n") == 1
    assert main(["dataset", "mask", str(tmp_path / "missing")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_a_cached_hub_id_loads_offline(tiny_clipseg, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub-cache" / "models--someone--tiny-clipseg"
    shutil.copytree(tiny_clipseg, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    seg = load_segmenter("someone/tiny-clipseg")
    assert seg.name == "clipseg:someone/tiny-clipseg"
    assert seg.segment([Image.new("RGB", (20, 30))], "the box")[0].size == (20, 30)
