"""The training dataset: validation errors name the file; alpha, sidecars and EXIF are honoured."""

import pytest
import torch
from PIL import Image

from studio.errors import DatasetError
from trainers.data import load_image_folder


def _img(path, size=(40, 30), color=(200, 30, 30), mode="RGB", **save):
    Image.new(mode, size, color if mode == "RGB" else color + (255,)).save(path, **save)


def test_loads_resizes_and_crops(tmp_path):
    _img(tmp_path / "a.png", (60, 40))
    _img(tmp_path / "b.jpg", (40, 80))
    (tmp_path / "b.txt").write_text("a red square\n")
    ex = load_image_folder(tmp_path, 16)
    assert [e.path.name for e in ex] == ["a.png", "b.jpg"]
    assert ex[0].pixels.shape == (3, 16, 16) and ex[0].pixels.min() >= -1 and ex[0].pixels.max() <= 1
    assert ex[1].caption == "a red square" and ex[0].caption is None and ex[0].mask is None


def test_alpha_becomes_the_mask_and_sidecar_mask_wins(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (8, 8, 24, 24))
    rgba.save(tmp_path / "a.png")
    _img(tmp_path / "b.png", (32, 32))
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (0, 0, 16, 32))
    m.save(tmp_path / "b.mask.png")
    a, b = load_image_folder(tmp_path, 16)
    assert a.mask.shape == (1, 16, 16) and 0.2 < float(a.mask.mean()) < 0.3
    assert abs(float(b.mask.mean()) - 0.5) < 0.05


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 255, 0), (0, 0, 20, 20))  # left half green
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    img.save(tmp_path / "a.jpg", exif=exif, quality=95)
    (ex,) = load_image_folder(tmp_path, 20)
    # displayed upright the image is 20 wide × 40 tall, green on top: after the centre crop the
    # top rows are green-ish
    top = ex.pixels[:, 0, :].mean(dim=1)
    assert top[1] > top[0]


@pytest.mark.parametrize("name,content,match", [
    ("bad.png", b"this is not a png", "bad.png is corrupt or not an image"),
    ("notes.pdf", b"%PDF-1.4", "notes.pdf .* is not an image"),
])
def test_bad_files_are_named(tmp_path, name, content, match):
    _img(tmp_path / "ok.png")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        load_image_folder(tmp_path, 16)


def test_truncated_tiny_too_few_and_missing(tmp_path):
    _img(tmp_path / "big.png", (64, 64))
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cut.png"):
        load_image_folder(tmp_path, 16)
    (tmp_path / "cut.png").unlink()
    _img(tmp_path / "small.png", (8, 8))
    with pytest.raises(DatasetError, match="small.png is only 8×8"):
        load_image_folder(tmp_path, 16)
    (tmp_path / "small.png").unlink()
    with pytest.raises(DatasetError, match="holds 1 image.*at least 3"):
        load_image_folder(tmp_path, 16, min_images=3)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 16)


def test_pixels_are_deterministic(tmp_path):
    _img(tmp_path / "a.png", (50, 37))
    a, b = load_image_folder(tmp_path, 16), load_image_folder(tmp_path, 16)
    assert torch.equal(a[0].pixels, b[0].pixels)
