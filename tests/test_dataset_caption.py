"""``studio.dataset.caption``: trigger insertion, sidecars, and the real model loading path on tiny
random BLIP / BLIP-2 / Florence-2 / CLIP checkpoints built from config in temporary folders (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from studio.cli import main
from studio.dataset import captioners
from studio.dataset.caption import (
    Captioner,
    CaptionResult,
    caption_folder,
    insert_trigger,
    load_captioner,
    scan_folder,
)
from studio.errors import DatasetError, StudioError
from tests.helpers import write_photos
from tests.tiny_captioners import write_tiny_blip, write_tiny_blip2, write_tiny_florence2

FAST = dict(device="cpu", max_new_tokens=4, num_beams=1)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return write_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="module")
def blip(blip_dir):
    return load_captioner(str(blip_dir), batch_size=2, **FAST)


class Fixed:
    """A captioner that answers ``text`` for every image (and records how many it saw)."""

    style = "sentence"

    def __init__(self, text: str = "a dog on the grass", name: str = "fixed") -> None:
        self.text, self.name, self.seen = text, name, 0

    def caption(self, images: list[Image.Image]) -> list[str]:
        self.seen += len(images)
        assert all(im.mode == "RGB" for im in images)
        return [self.text for _ in images]


# ---------------------------------------------------------------- insert_trigger


@pytest.mark.parametrize("caption, class_word, expected", [
    ("a dog sitting on the grass", "dog", "a sks dog sitting on the grass"),
    ("Dog on a sofa", "dog", "sks dog on a sofa"),
    ("A DOG in the snow", "dog", "A sks dog in the snow"),
    ("two dogs playing, one dog asleep", "dog", "two sks dogs playing, one dog asleep"),
    ("a hotdog stand", "dog", "a photo of sks dog, a hotdog stand"),
    ("a red car parked outside", "dog", "a photo of sks dog, a red car parked outside"),
    ("a puppy on a bed", "dog", "a sks dog on a bed"),
    ("a man on a bench", "person", "a sks person on a bench"),
    ("a woman holding a cat", "man", "a sks man holding a cat"),
    ("a plush teddy bear", "teddy bear", "a plush sks teddy bear"),
    ("a dog", None, "a photo of sks, a dog"),
    ("", "dog", "a photo of sks dog"),
    ("  a   dog\n on grass ", "dog", "a sks dog on grass"),
])
def test_insert_trigger_sentences(caption, class_word, expected):
    assert insert_trigger(caption, "sks", class_word) == expected


def test_insert_trigger_is_idempotent_and_needs_a_trigger():
    once = insert_trigger("a dog on the grass", "<sks>", "dog")
    assert once == "a <sks> dog on the grass"
    assert insert_trigger(once, "<sks>", "dog") == once
    assert insert_trigger("a photo of sks dog, a car", "sks", "dog") == "a photo of sks dog, a car"
    assert insert_trigger("a dog  here", None, "dog") == "a dog here"


def test_insert_trigger_tags_puts_trigger_first_and_class_second():
    assert insert_trigger("grass, dog, outdoors", "sks", "dog", tags=True) == "sks, dog, grass, outdoors"
    assert insert_trigger("grass, outdoors", "sks", "dog", tags=True) == "sks, dog, grass, outdoors"
    assert insert_trigger("grass, Dog", "sks", None, tags=True) == "sks, grass, Dog"
    assert insert_trigger("sks, dog, grass", "sks", "dog", tags=True) == "sks, dog, grass"


@pytest.mark.parametrize("trigger, class_word, words", [
    ("sks dog", None, "has a space"), ("sk,s", "dog", "has a comma"), ("sks", "dog, cat", "has a comma")])
def test_bad_trigger_or_class_word_is_one_line_error(trigger, class_word, words):
    with pytest.raises(DatasetError, match=words) as err:
        insert_trigger("a dog", trigger, class_word)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the folder (real tiny BLIP)


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_photos(folder, n=3, size=40)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.new("L", (40, 40), 255).save(folder / "0.mask.png")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "sub").mkdir()
    return folder


def test_blip_captions_a_folder_end_to_end(tmp_path, blip):
    folder = _folder(tmp_path)
    assert isinstance(blip, Captioner) and isinstance(blip, captioners.HFCaptioner)
    assert blip.name == f"blip:folder:{Path(blip.name.split(':')[-1]).name}"
    # PIL preprocessing: no torchvision anywhere
    assert type(blip.processor.image_processor).__name__ == "BlipImageProcessorPil"
    seen: list[CaptionResult] = []
    results = caption_folder(folder, blip, trigger="sks", class_word="dog", on_result=seen.append)
    by_name = {r.image.name: r for r in results}
    assert sorted(by_name) == ["0.png", "1.png", "2.png", "broken.png", "notes.pdf"]
    assert sorted(r.image.name for r in seen) == sorted(by_name)
    for i in range(3):
        r = by_name[f"{i}.png"]
        assert r.status == "written" and r.ok
        expected = insert_trigger(blip.caption([Image.open(folder / f"{i}.png").convert("RGB")])[0], "sks", "dog")
        assert r.caption == expected and "sks dog" in expected
        assert (folder / f"{i}.txt").read_text(encoding="utf-8") == expected + "\n"
    assert by_name["notes.pdf"].status == "skipped"
    assert "notes.pdf is not an image the trainers read" in by_name["notes.pdf"].reason
    assert by_name["broken.png"].status == "skipped" and "broken.png" in by_name["broken.png"].reason
    assert not (folder / "broken.txt").exists() and not (folder / "notes.txt").exists()
    assert not (folder / "0.mask.txt").exists() and not (folder / ".hidden.txt").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind


def test_existing_captions_kept_without_force_replaced_with_it(tmp_path, blip):
    folder = tmp_path / "photos"
    write_photos(folder, n=2, size=40)
    (folder / "0.txt").write_text("my own caption\n", encoding="utf-8")
    counting = Fixed("a dog")
    results = caption_folder(folder, counting, trigger="sks", class_word="dog")
    assert [(r.image.name, r.status) for r in results] == [("0.png", "kept"), ("1.png", "written")]
    assert results[0].caption == "my own caption" and "--force" in results[0].reason
    assert counting.seen == 1  # the kept image never reached the model
    assert (folder / "0.txt").read_text(encoding="utf-8") == "my own caption\n"
    results = caption_folder(folder, blip, trigger="sks", class_word="dog", force=True)
    assert [(r.image.name, r.status) for r in results] == [("0.png", "replaced"), ("1.png", "replaced")]
    assert (folder / "0.txt").read_text(encoding="utf-8") == results[0].caption + "\n"
    assert "sks dog" in results[0].caption


def test_dry_run_writes_nothing(tmp_path, blip):
    folder = _folder(tmp_path)
    (folder / "1.txt").write_text("old", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    results = caption_folder(folder, blip, trigger="sks", class_word="dog", force=True, dry_run=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    previews = [r for r in results if r.status == "dry-run"]
    assert [r.image.name for r in previews] == ["0.png", "1.png", "2.png"]
    assert all(isinstance(r.caption, str) and "sks dog" in r.caption for r in previews)


def test_folder_errors_and_name_clashes(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        caption_folder(tmp_path / "nope", Fixed())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("hi")
    with pytest.raises(DatasetError, match="holds no images"):
        scan_folder(tmp_path / "empty")
    folder = tmp_path / "clash"
    write_photos(folder, n=1, name="a.png")
    Image.new("RGB", (20, 20)).save(folder / "a.jpg")
    Image.new("P", (20, 20)).save(folder / "b.gif")  # captioned: the crop step carries it to its PNG
    results = caption_folder(folder, Fixed("café ☕ on a table"))
    assert [(r.image.name, r.status) for r in results] == [("a.jpg", "written"), ("a.png", "skipped"),
                                                           ("b.gif", "written")]
    assert "share the caption file a.txt" in results[1].reason
    assert (folder / "a.txt").read_text(encoding="utf-8") == "café ☕ on a table\n"


def test_a_broken_captioner_and_empty_captions_are_reported(tmp_path):
    folder = tmp_path / "photos"
    write_photos(folder, n=2)

    class Short(Fixed):
        def caption(self, images):
            return ["x"]

    with pytest.raises(StudioError, match="returned 1 captions for 2 images"):
        caption_folder(folder, Short())
    results = caption_folder(folder, Fixed("   "))
    assert all(r.status == "skipped" and "empty caption" in r.reason for r in results)
    assert not list(folder.glob("*.txt"))


def test_alpha_images_are_captioned_on_white(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(folder / "clear.png")
    Image.new("LA", (30, 30), (10, 128)).save(folder / "grey.png")
    results = caption_folder(folder, Fixed())  # Fixed asserts RGB
    assert [r.status for r in results] == ["written", "written"]
    assert captioners.rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- other models


def test_blip2_and_florence2_load_and_caption(tmp_path):
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("L", (50, 50), 90)]
    blip2 = load_captioner(str(write_tiny_blip2(tmp_path / "b2")), prompt="a photo of", **FAST)
    assert blip2.name.startswith("blip-2:") and type(blip2.processor.image_processor).__name__.endswith("Pil")
    caps = blip2.caption(images)
    assert len(caps) == 2 and all(isinstance(c, str) and c.startswith("a photo of") for c in caps)
    assert not any(c.startswith("a photo of a photo of") for c in caps)  # the prompt's own ids are cut off
    florence_dir = write_tiny_florence2(tmp_path / "fl")
    florence = load_captioner(str(florence_dir), kind="blip", **FAST)
    assert florence.name.startswith("florence2:") and florence.prompt == "<CAPTION>"
    assert type(florence.processor.image_processor).__name__ == "CLIPImageProcessorPil"
    caps = florence.caption(images)
    assert len(caps) == 2 and all(isinstance(c, str) and "<" not in c for c in caps)  # random weights: may be ""
    with pytest.raises(StudioError, match="Florence-2 takes a task"):
        load_captioner(str(florence_dir), prompt="a photo of", **FAST)


def test_tags_with_a_tiny_clip(tmp_path, clip_dir):
    tagger = load_captioner(str(clip_dir), kind="tags", device="cpu")
    assert isinstance(tagger, captioners.TagCaptioner) and tagger.name.startswith("tags:folder:")
    assert isinstance(load_captioner(str(clip_dir), device="cpu"), captioners.TagCaptioner)  # auto
    vocabulary = {captioners._tag_text(t) for _, tags, _ in captioners.TAG_VOCABULARY.values() for t in tags}
    folder = tmp_path / "photos"
    write_photos(folder, n=2, size=40)
    results = caption_folder(folder, tagger, trigger="sks", class_word="dog")
    for r in results:
        tags = r.caption.split(", ")
        assert r.status == "written" and tags[:2] == ["sks", "dog"]
        assert set(tags[2:]) <= vocabulary and len(tags) == len(set(tags))
        assert (folder / f"{r.image.stem}.txt").read_text(encoding="utf-8") == r.caption + "\n"
    subjects = set(captioners.TAG_VOCABULARY["subject"][1])
    assert all(subjects & set(c.split(", ")) for c in tagger.caption([Image.new("RGB", (32, 32))]))
    with pytest.raises(StudioError, match="not to tags"):
        load_captioner(str(clip_dir), kind="tags", prompt="a photo of")


def test_wrong_kind_and_bad_model_specs_are_one_line_errors(tmp_path, blip_dir, clip_dir):
    cases = [
        (dict(spec=str(blip_dir), kind="tags"), "--kind tags needs a CLIP model"),
        (dict(spec=str(clip_dir), kind="blip"), "not a captioner"),
        (dict(spec=str(tmp_path / "missing")), "does not exist"),
        (dict(spec=str(tmp_path)), "Cannot load the captioning model from folder"),
        (dict(spec=str(blip_dir), kind="caption"), "Unknown captioner kind"),
    ]
    for kwargs, words in cases:
        with pytest.raises(StudioError, match=words) as err:
            load_captioner(**kwargs, device="cpu")
        assert "\n" not in str(err.value)


def test_a_hub_id_not_cached_offline_or_without_network_says_how_to_get_it(monkeypatch):
    hub_id = "studio-tests/no-such-captioner-7f3a"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StudioError) as err:
        load_captioner(hub_id)
    message = str(err.value)
    assert "not found locally" in message and "HF_HUB_OFFLINE=1" in message
    assert f"hf download {hub_id}" in message and "local folder" in message and "\n" not in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(captioners, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(StudioError, match=r"not found locally and the Hugging Face Hub cannot be reached \(no network\)"):
        load_captioner(hub_id, kind="tags")


# ---------------------------------------------------------------- CLI


def test_cli_caption_keep_force_and_dry_run(tmp_path, blip_dir, capsys):
    folder = tmp_path / "photos"
    write_photos(folder, n=2, size=40)
    args = ["dataset", "caption", str(folder), "--model", str(blip_dir), "--trigger", "sks", "--class-word", "dog",
            "--max-new-tokens", "3", "--num-beams", "1", "--device", "cpu", "--batch-size", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    first = (folder / "0.txt").read_text(encoding="utf-8")
    assert "sks dog" in first and f"wrote       0.txt: {first.strip()}" in out and "2 written" in out
    # nothing left to caption: the model is not even loaded (a missing one would be an error)
    assert main([*args[:3], "--model", str(tmp_path / "no-model")]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and "2 kept (pass --force to replace)" in out
    assert main([*args, "--force", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would write 0.txt" in out and "2 previewed" in out
    assert (folder / "0.txt").read_text(encoding="utf-8") == first
    (folder / "junk.pdf").write_bytes(b"x")
    assert main([*args, "--force"]) == 1  # a skipped file
    captured = capsys.readouterr()
    assert "skipped     junk.pdf: junk.pdf is not an image the trainers read" in captured.out and "2 replaced" in captured.out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["dataset", "caption", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    write_photos(tmp_path / "p", n=1)
    assert main(["dataset", "caption", str(tmp_path / "p"), "--trigger", "two words"]) != 0
    assert "has a space" in capsys.readouterr().err
