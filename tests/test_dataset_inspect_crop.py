"""``dataset inspect`` and ``dataset crop`` (studio/dataset/inspect.py, crop.py): every warning of the
report on a folder built here with PIL, and subject-aware crops that keep the whole subject."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from studio.cli import main
from studio.dataset import crop, inspect, sheet
from studio.errors import DatasetError


def pattern(seed: int, side: int = 640, cells: int = 40) -> Image.Image:
    """A sharp RGB image: ``cells``×``cells`` random colour blocks, ``side`` pixels square."""
    rng = np.random.default_rng(seed)
    blocks = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
    return Image.fromarray(blocks).resize((side, side), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A folder with one file for each thing the report must notice."""
    d = tmp_path_factory.mktemp("messy")
    pattern(1).save(d / "sharp.png")
    (d / "sharp.txt").write_text("a photo of sks dog", encoding="utf-8")
    Image.new("L", (640, 640), 255).save(d / "sharp.mask.png")
    buf = io.BytesIO()
    pattern(1).resize((600, 600), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=80)
    (d / "sharp_copy.jpg").write_bytes(buf.getvalue())  # re-encoded and resized: a near-duplicate
    pattern(2).filter(ImageFilter.GaussianBlur(6)).save(d / "blurry.png")
    pattern(3, side=100, cells=100).save(d / "tiny.png")
    pattern(4).convert("CMYK").save(d / "cmyk.jpg", "JPEG", quality=90)
    deep = (np.asarray(pattern(5).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(deep).save(d / "deep.png")
    frames = [pattern(6 + k).convert("P") for k in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90° clockwise
    pattern(9).resize((800, 600)).save(d / "rotated.jpg", "JPEG", quality=90, exif=exif)
    palette = pattern(10).quantize(16)
    palette.save(d / "logo.png", transparency=0)
    pattern(11).save(d / "clean.png")
    (d / "corrupt.jpg").write_bytes(buf.getvalue()[:300])  # a truncated JPEG
    (d / "notes.txt").write_text("shot on a sunny day", encoding="utf-8")  # the caption of no image
    (d / "data.bin").write_bytes(b"\x00\x01binary")
    return d


@pytest.fixture(scope="module")
def report(messy):
    return inspect.inspect_folder(messy, resolution=512)


def _info(report, name):
    return next(i for i in report.images if i.name == name)


def _warning(report, start):
    found = [w for w in report.warnings if w.startswith(start)]
    assert len(found) == 1, (start, report.warnings)
    return found[0]


def test_inspect_lists_images_and_unusable_files(report):
    assert sorted(i.name for i in report.images) == sorted(
        ["sharp.png", "sharp_copy.jpg", "blurry.png", "tiny.png", "cmyk.jpg", "deep.png", "anim.gif", "rotated.jpg",
         "logo.png", "clean.png"])
    assert sorted(e.name for e in report.errors) == ["corrupt.jpg", "data.bin"]
    corrupt = next(e for e in report.errors if e.name == "corrupt.jpg")
    assert "corrupt" in corrupt.reason and str(report.folder) not in corrupt.reason
    assert _warning(report, "data.bin is not an image")
    assert _warning(report, "corrupt.jpg is corrupt")


def test_inspect_measures_each_image(report):
    sharp = _info(report, "sharp.png")
    assert (sharp.width, sharp.height, sharp.aspect, sharp.megapixels) == (640, 640, 1.0, 0.41)
    assert (sharp.mode, sharp.bit_depth, sharp.format) == ("RGB", 8, "PNG")
    assert sharp.has_mask and sharp.has_caption and not sharp.has_alpha and sharp.mask_coverage == 1.0
    assert len(sharp.phash) == 16 and sharp.sharpness > inspect.BLUR_THRESHOLD * 5
    assert _info(report, "clean.png").flags == []
    assert _info(report, "logo.png").has_alpha and _info(report, "logo.png").mode == "P"
    deep = _info(report, "deep.png")
    assert (deep.mode, deep.bit_depth) == ("I;16", 16)
    assert _info(report, "anim.gif").frames == 3


def test_inspect_warnings(report):
    assert _warning(report, "1 image under 512 px: tiny.png (100×100)")
    assert _warning(report, "2 near-duplicates: sharp.png ≈ sharp_copy.jpg")
    assert report.near_duplicates == [["sharp.png", "sharp_copy.jpg"]]
    blurry = _info(report, "blurry.png")
    assert blurry.sharpness < inspect.BLUR_THRESHOLD
    assert _warning(report, f"1 blurry image: blurry.png (sharpness {blurry.sharpness:.0f} < 40)")
    assert _warning(report, "cmyk.jpg is CMYK: converted to RGB")
    assert _warning(report, "deep.png is 16-bit: reduced to 8-bit")
    assert _warning(report, "anim.gif is animated: its first frame is used")
    assert _warning(report, "anim.gif: the trainers do not read .gif")
    assert _warning(report, "logo.png is a palette image with transparency: converted to RGBA")
    assert _warning(report, "rotated.jpg has EXIF orientation 6: turned upright")
    assert _warning(report, "notes.txt is the caption of no image")
    assert not any(w.startswith(("sharp.txt", "clean.png", "sharp.png is", "sharp_copy.jpg is"))
                   for w in report.warnings)
    assert {"duplicate"} == set(_info(report, "sharp_copy.jpg").flags)
    assert "blurry" in blurry.flags and "small" in _info(report, "tiny.png").flags


def test_inspect_applies_exif_orientation_and_reports_the_tag(report):
    rotated = _info(report, "rotated.jpg")
    assert rotated.orientation == 6 and rotated.orientation_applied
    assert (rotated.width, rotated.height) == (600, 800)  # stored 800×600
    assert _info(report, "clean.png").orientation is None and not _info(report, "clean.png").orientation_applied


def test_sharpness_compares_across_resolutions_and_hash_finds_copies():
    big = pattern(20, side=1280)
    small = big.resize((700, 700), Image.Resampling.LANCZOS)
    s_big, s_small = (inspect.sharpness(inspect.grey_at(im)) for im in (big, small))
    assert 0.6 < s_small / s_big < 1.6
    h = inspect.perceptual_hash(inspect.grey_at(big))
    assert inspect.hamming(h, inspect.perceptual_hash(inspect.grey_at(small))) <= 2
    other = inspect.perceptual_hash(inspect.grey_at(pattern(21)))
    assert inspect.hamming(h, other) > inspect.DUPLICATE_DISTANCE
    assert inspect.hamming(0b1011, 0b0001) == 2
    groups = inspect.duplicate_groups({"a": 0, "b": 0b111, "c": 0b111111, "d": (1 << 64) - 1}, max_distance=3)
    assert groups == [["a", "b", "c"]]  # a ≈ b ≈ c through b; d is far from all


def test_report_json_text_and_contact_sheet(report):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["thresholds"]["blur"] == inspect.BLUR_THRESHOLD
    assert data["warnings"] == report.warnings and len(data["images"]) == 10 and "thumbnail" not in data["images"][0]
    text = report.text()
    header = text.splitlines()[2].split()
    assert header[:2] == ["name", "size"] and "sharp" in header and "phash" in header
    for i in report.images:
        assert i.name in text
    assert "Warnings:" in text and "- 1 blurry image: blurry.png" in text
    img = report.contact_sheet(columns=4)
    cell_w = inspect.THUMB_SIDE + 2 * sheet.PAD
    cell_h = cell_w + sheet.LABEL_LINES * sheet.LINE_HEIGHT
    assert img.mode == "RGB" and img.size == (4 * cell_w, 3 * cell_h)  # 10 images + 2 errors
    names = [i.name for i in report.images] + [e.name for e in report.errors]

    def badge(name):
        k = names.index(name)
        x, y = (k % 4) * cell_w + sheet.PAD, (k // 4) * cell_h + sheet.PAD
        cx, cy = x + inspect.THUMB_SIDE - 13, y + 13
        return img.getpixel((cx, cy - 7))

    assert badge("clean.png") == sheet.OK
    assert badge("blurry.png") == sheet.WARN
    assert badge("corrupt.jpg") == sheet.ERROR


def test_inspect_cli(messy, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert main(["dataset", "inspect", str(messy), "--json", "--sheet", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(w.startswith("1 blurry image: blurry.png") for w in data["warnings"])
    assert Image.open(out).size[0] > 0
    before = out.read_bytes()
    assert main(["dataset", "inspect", str(messy), "--sheet", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["dataset", "inspect", str(messy), "--resolution", "90", "--sheet", str(out), "--force"]) == 0
    text = capsys.readouterr().out
    assert "under" not in text and "Contact sheet:" in text
    assert main(["dataset", "inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- crop ----------------------------------------------------------------------------------------------

SUBJECT = (620, 80, 860, 380)  # off-centre (right) in a 900×600 photo


def _subject_mask(size=(900, 600), box=SUBJECT) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(2))  # soft edges, as a segmenter gives


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    photo = pattern(30, side=900).crop((0, 0, 900, 600))
    photo.save(d / "dog.png")
    _subject_mask().save(d / "dog.mask.png")
    (d / "dog.txt").write_text("a photo of sks dog", encoding="utf-8")
    pattern(31, side=700).resize((800, 500)).save(d / "plain.jpg", quality=90)
    return d


def test_subject_box_and_window():
    arr = np.zeros((60, 80), np.uint8)
    arr[10:20, 30:45] = 255
    assert crop.subject_box(arr) == (30, 10, 45, 20)
    assert crop.subject_box(Image.fromarray(arr)) == (30, 10, 45, 20)
    assert crop.subject_box(arr.astype(np.float32) / 255) == (30, 10, 45, 20)
    arr[5, 5] = 100  # below the mask level: background
    assert crop.subject_box(arr) == (30, 10, 45, 20)
    with pytest.raises(DatasetError, match="empty"):
        crop.subject_box(np.zeros((8, 8), np.uint8))
    assert crop.crop_window((900, 600), 1.0) == ((150, 0, 750, 600), "")
    assert crop.crop_window((900, 600), 1.0, (620, 80, 860, 380)) == ((300, 0, 900, 600), "")
    assert crop.crop_window((900, 600), 1.0, (100, 100, 300, 300), margin=0.1) == ((0, 0, 600, 600), "")
    assert crop.crop_window((900, 600), 1.0, (10, 0, 590, 600), margin=0.1)[1] == "margin"
    window, gave = crop.crop_window((900, 600), 1.0, (50, 0, 850, 600))
    assert gave == "cut" and window == (150, 0, 750, 600)
    assert crop.output_size(512, None) == (512, 512) and crop.output_size(500, 1.0) == (500, 500)
    w, h = crop.output_size(512, crop.parse_aspect("3:4"))
    assert (w, h) == (440, 592) and w % 8 == h % 8 == 0
    with pytest.raises(DatasetError, match="W:H"):
        crop.parse_aspect("wide")


def test_crop_keeps_the_whole_subject_with_its_mask_and_caption(photos, tmp_path):
    out = tmp_path / "out"
    results = crop.crop_folder(photos, out, size=256, margin=0.1)
    dog, plain = results
    assert dog.method == "subject" and dog.note.startswith("Subject crop from dog.mask.png")
    mask = np.asarray(_subject_mask(), dtype=np.float64)
    x0, y0, x1, y1 = dog.window
    assert x1 - x0 == y1 - y0 == 600
    sx0, sy0, sx1, sy1 = dog.subject
    assert x0 <= sx0 and y0 <= sy0 and sx1 <= x1 and sy1 <= y1
    assert mask[y0:y1, x0:x1].sum() >= 0.999 * mask.sum()
    assert mask[:, 150:750].sum() < 0.8 * mask.sum()  # a centre crop would have cut the subject
    img = Image.open(out / "dog.png")
    cropped_mask = Image.open(out / "dog.mask.png")
    assert img.size == cropped_mask.size == (256, 256) and cropped_mask.mode == "L"
    kept = mask[y0:y1, x0:x1].mean() / 255
    assert abs(np.asarray(cropped_mask, dtype=np.float64).mean() / 255 - kept) < 0.01
    assert (out / "dog.txt").read_text(encoding="utf-8") == "a photo of sks dog"
    assert dog.output == out / "dog.png" and dog.mask_output == out / "dog.mask.png"
    assert plain.method == "centre" and "No mask" in plain.note and "centre crop" in plain.note
    assert plain.window == (150, 0, 650, 500) and Image.open(out / "plain.jpg").size == (256, 256)
    assert not (out / "plain.mask.png").exists() and not (out / "plain.txt").exists()
    assert sorted(p.name for p in photos.iterdir()) == ["dog.mask.png", "dog.png", "dog.txt", "plain.jpg"]


def test_crop_uses_alpha_aspect_and_writes_gif_as_png(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = pattern(40, side=900).crop((0, 0, 900, 600)).convert("RGBA")
    rgba.putalpha(_subject_mask(box=(40, 200, 260, 560)))  # subject at the bottom left
    rgba.save(src / "cut.png")
    frames = [pattern(41 + k, side=300).convert("P") for k in range(2)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    results = crop.crop_folder(src, tmp_path / "out", size=256, aspect="3:4")
    cut, anim = sorted(results, key=lambda r: r.name, reverse=True)
    assert cut.method == "subject" and "its alpha" in cut.note and cut.window[0] == 0
    out = Image.open(cut.output)
    assert out.mode == "RGBA" and out.size == (224, 296) == cut.size
    ww, wh = cut.window[2] - cut.window[0], cut.window[3] - cut.window[1]
    assert abs(ww / wh - 224 / 296) < 0.01 and wh == 600
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64)
    x0, y0, x1, y1 = cut.window
    assert alpha[y0:y1, x0:x1].sum() >= 0.999 * alpha.sum()
    assert anim.output.name == "anim.png" and Image.open(anim.output).size == (224, 296)
    assert anim.method == "centre"


def test_crop_refuses_to_overwrite_and_in_place(photos, tmp_path, capsys):
    out = tmp_path / "out"
    crop.crop_folder(photos, out, size=64)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DatasetError, match="already exist.*--force"):
        crop.crop_folder(photos, out, size=128)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert Image.open(crop.crop_folder(photos, out, size=128, force=True)[0].output).size == (128, 128)
    original = (photos / "dog.png").read_bytes()
    with pytest.raises(DatasetError, match="in place"):
        crop.crop_folder(photos, photos, size=64)
    assert main(["dataset", "crop", str(photos), "--in-place"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["dataset", "crop", str(photos), "--out", str(photos), "--force"]) == 2
    assert "--in-place --force" in capsys.readouterr().err
    assert (photos / "dog.png").read_bytes() == original
    assert main(["dataset", "crop", str(photos), "--in-place", "--force", "--size", "64"]) == 0
    assert Image.open(photos / "dog.png").size == (64, 64) and Image.open(photos / "dog.mask.png").size == (64, 64)
    assert (photos / "dog.txt").read_text(encoding="utf-8") == "a photo of sks dog"


def test_crop_cli_reports_each_image_and_continues_past_a_bad_one(photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.new("L", (10, 10), 255).save(photos / "plain.mask.png")  # the wrong size for plain.jpg
    out = tmp_path / "out"
    assert main(["dataset", "crop", str(photos), "--out", str(out), "--size", "96", "--margin", "0.2"]) == 1
    text = capsys.readouterr().out
    assert "dog.png: Subject crop from dog.mask.png" in text
    assert "broken.png: broken.png is corrupt" in text and str(photos) not in text.split("Cropped")[0]
    assert "plain.mask.png is 10×10 but plain.jpg is 800×500" in text
    assert "Cropped 1 image(s) to 96×96" in text and "2 image(s) could not be cropped" in text
    assert sorted(p.name for p in out.iterdir()) == ["dog.mask.png", "dog.png", "dog.txt"]
    assert main(["dataset", "crop", str(photos), "--out", str(tmp_path / "o2"), "--aspect", "9:1"]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["dataset", "crop", str(photos), "--out", str(tmp_path / "o3"), "--margin", "-1"]) == 2
    assert "--margin" in capsys.readouterr().err
