"""Hardening (issue 25): temp files of killed writers, progress-aware retries, image bombs, names,
file modes, `--resume latest` without a checkpoint, server paths in upload errors, the Train form."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.atomic import atomic_write_bytes, file_mode, host_tag, is_stale_temporary, temp_path
from studio.errors import DatasetError, StudioError
from studio.images import MAX_PIXELS, open_image
from studio.library import Library, check_name

REPO = Path(__file__).resolve().parents[1]
GHOST_PID = 2**22 + 12345  # above Linux's largest pid_max: never a live process
TI = "textual-inversion"


def _photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (200, 40 * i, 40)).save(folder / f"{i}.png")
    return folder


# ----------------------------------------------------------------------------------------------
# 1. temporary files a killed writer left
# ----------------------------------------------------------------------------------------------


def _temp(folder: Path, name: str, pid: int, tag: str | None = None) -> Path:
    p = folder / f".{name}.{pid}-{tag or host_tag()}-k3j4h5g6.studio.tmp"
    p.write_bytes(b"half a concept")
    return p


def test_a_killed_writers_temp_file_is_removed_when_the_library_opens_a_live_ones_stays(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    # a real writer killed mid-save: it leaves a temp file, never a file under the final name
    code = ("import os; from studio.atomic import atomic_path\n"
            f"cm = atomic_path({str(lib / 'x.safetensors')!r}); tmp = cm.__enter__()\n"
            "tmp.write_bytes(b'x' * 4096); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    (killed,) = [p for p in lib.iterdir() if p.name.startswith(".x.safetensors.")]
    assert is_stale_temporary(killed) and not (lib / "x.safetensors").exists()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = _temp(lib, "a.safetensors", GHOST_PID)
        live = _temp(lib, "b.safetensors", sleeper.pid)  # another process, still writing
        mine = _temp(lib, "c.safetensors", os.getpid())
        other_host = _temp(lib, "d.safetensors", GHOST_PID, tag="000000" if host_tag() != "000000" else "111111")
        old_style, old_style_fresh = lib / ".e.safetensors.a1b2c3d4.tmp", lib / ".f.safetensors.a1b2c3d4.tmp"
        old_style.write_bytes(b"x")
        old_style_fresh.write_bytes(b"x")
        week = time.time() - 7 * 86400
        os.utime(old_style, (week, week))
        models = lib / "models"
        models.mkdir()
        model_tmp = models / f".m.{GHOST_PID}-{host_tag()}-aaaa.studio.tmp"  # a whole model's folder
        (model_tmp / "unet").mkdir(parents=True)
        unrelated = lib / ".notes.txt"
        unrelated.write_text("mine")

        Library(lib)  # opening the library sweeps
        assert not killed.exists() and not dead.exists() and not old_style.exists() and not model_tmp.exists()
        assert live.exists() and mine.exists() and unrelated.exists()
        assert other_host.exists() and old_style_fresh.exists()  # another host's pid cannot be judged: by age only

        sleeper.kill()
        sleeper.wait()
        assert Library(lib).names() == [] and not live.exists()  # listing sweeps too, once the writer is gone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_job_folders_are_swept_when_the_queue_opens(tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib")
    previews = queue.job_folder(7) / "previews"
    previews.mkdir(parents=True)
    dead = _temp(previews, "step-000003.png", GHOST_PID)
    live = _temp(previews, "step-000004.png", os.getpid())
    publish = temp_path(tmp_path / "lib" / "cat.safetensors", "job-7")  # an interrupted publish, by name
    assert publish.name.startswith(".cat.safetensors.job-7.") and not is_stale_temporary(publish)
    make_queue(tmp_path / "lib")
    assert not dead.exists() and live.exists()


def test_saved_files_get_the_mode_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "atomic.bin", b"x")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "atomic.bin") == mode(plain) == file_mode()  # not mkstemp's 0600
    preview = Library(tmp_path / "lib").set_preview("cat", Image.new("RGB", (4, 4)))
    assert mode(preview) == file_mode()


# ----------------------------------------------------------------------------------------------
# 2. a worker that dies while making progress
# ----------------------------------------------------------------------------------------------


def test_deaths_between_new_checkpoints_do_not_fail_a_job_deaths_at_the_same_step_do(tmp_path, make_queue):
    queue = make_queue(tmp_path / "lib", max_attempts=2)  # on both databases (tests/jobs_backends.py)
    cfg = dict(images=str(_photos(tmp_path / "photos")), class_word="cat", steps=40, batch_size=1)
    job = queue.submit(TI, cfg, "tiny")
    for life, step in enumerate((4, 8, 12, 16)):  # each life checkpoints further, then the worker dies
        assert queue.claim(f"w{life}", "cpu", pid=GHOST_PID).id == job.id
        assert queue.progress(job.id, f"w{life}", [(step, 0.1, 1.0), (step + 1, 0.1, 1.1)], 40, None)
        queue.log(job.id, "checkpoint", {"step": step, "path": f"checkpoints/step-{step:06d}"})
        assert queue.list()[0].state == "queued"  # recovered: more lives than max_attempts, still going
        assert queue.get(job.id).attempts == 0
    last = queue.events(job.id, kinds=["state"])[-1].text()
    assert "is gone" in last and "checkpointed step 16" in last

    # now it dies at the same place every time: resumed at 16, never reaches its next checkpoint
    assert queue.claim("w4", "cpu", pid=GHOST_PID).id == job.id
    assert queue.progress(job.id, "w4", [(17, 0.1, 1.0), (18, 0.1, 1.1)], 40, None)
    queue.log(job.id, "checkpoint", {"step": 16, "path": "checkpoints/step-000016"})  # an old step: no progress
    assert queue.list()[0].state == "queued" and queue.get(job.id).attempts == 1
    assert queue.claim("w5", "cpu", pid=GHOST_PID).id == job.id
    assert queue.progress(job.id, "w5", [(17, 0.1, 1.0), (18, 0.1, 1.1)], 40, None)
    failed = queue.list()[0]
    assert failed.state == "failed" and failed.attempts == 2
    assert "stopped unexpectedly 2 times in a row without progress" in failed.error
    assert "no new checkpoint since step 16" in failed.error and f"jobs resume {job.id}" in failed.error
    assert "\n" not in failed.error
    # resuming gives it a fresh count
    assert queue.resume(job.id).attempts == 0


# ----------------------------------------------------------------------------------------------
# 3. image bombs and odd image modes
# ----------------------------------------------------------------------------------------------


def _png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit ``side``×``side`` PNG of zeros, a few dozen KB on disk (written row by row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return _png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def _one_line_about_the_bomb(message: str) -> None:
    assert "bomb.png is 20000×20000 pixels (400 megapixels)" in message
    assert f"limited to {MAX_PIXELS / 1e6:.0f} megapixels (8192×8192)" in message
    assert "\n" not in message and "/" not in message.split(" — ")[0]  # the file's name, not its folder


def test_a_decompression_bomb_is_refused_from_its_header(bomb, tmp_path):
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DatasetError) as err:
        open_image(bomb)
    _one_line_about_the_bomb(str(err.value))
    # the training loader (what `train` reads) and zero-shot / generation reference images
    from studio.methods.zeroshot import open_images
    from trainers.data import load_image_folder

    folder = _photos(tmp_path / "photos", 2)
    (folder / "bomb.png").write_bytes(bomb.read_bytes())
    with pytest.raises(DatasetError) as err:
        load_image_folder(folder, 16)
    _one_line_about_the_bomb(str(err.value))
    with pytest.raises(DatasetError) as err:
        open_images([folder])
    _one_line_about_the_bomb(str(err.value))
    assert str(folder) not in str(err.value)


def test_the_cli_reports_a_bomb_in_one_line(bomb, tmp_path, tiny, monkeypatch, capsys):
    from studio.cli import main
    from studio.models import BaseSettings

    monkeypatch.setattr(BaseSettings, "load", lambda self: tiny)
    folder = _photos(tmp_path / "photos", 2)
    (folder / "bomb.png").write_bytes(bomb.read_bytes())
    rc = main(["train", TI, "--base", "tiny", "--images", str(folder), "--class-word", "cat", "--steps", "1",
               "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "DecompressionBomb" not in err
    _one_line_about_the_bomb(err.strip().splitlines()[-1])


def test_an_uploaded_bomb_is_refused_naming_the_upload_not_a_server_path(bomb, tmp_path):
    from studio.models import BaseSettings
    from studio.service import Studio

    uploads = tmp_path / "gradio" / "0f3a9c"
    _photos(uploads, 2)
    (uploads / "bomb.png").write_bytes(bomb.read_bytes())
    studio = Studio(BaseSettings(base="tiny"), library=tmp_path / "lib")
    with pytest.raises(DatasetError) as err:
        studio.stage_training_images([uploads / "0.png", uploads / "1.png", uploads / "bomb.png"])
    _one_line_about_the_bomb(str(err.value))
    assert "studio-upload-" not in str(err.value) and str(tmp_path) not in str(err.value)
    # an uploaded concept file that is not one: its name, never /tmp/gradio/…
    bad = uploads / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StudioError) as err:
        studio.import_upload(bad)
    assert "broken.safetensors" in str(err.value) and str(uploads) not in str(err.value)


def test_open_image_normalises_modes_orientation_and_frames(tmp_path):
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    deep = np.full((10, 20), 65535, dtype=np.uint16)
    deep[:, :10] = 32768
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grey
    pal = Image.new("P", (20, 10), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=0)
    Image.new("LA", (20, 10), (128, 200)).save(tmp_path / "la.png")
    Image.new("1", (20, 10), 1).save(tmp_path / "bits.png")
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    rotated = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rot.jpg", exif=exif)

    cmyk = open_image(tmp_path / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.getpixel((5, 5))[0] > 200 and cmyk.getpixel((5, 5))[1] < 60
    grey = open_image(tmp_path / "deep.png")
    assert grey.mode == "L" and grey.getpixel((15, 5)) == 255 and grey.getpixel((5, 5)) == 128  # scaled, not clipped
    assert open_image(tmp_path / "pal.png").mode == "RGBA" and open_image(tmp_path / "pal.png").getpixel((0, 0))[3] == 255
    assert open_image(tmp_path / "la.png").mode == "RGBA"
    assert open_image(tmp_path / "bits.png").mode == "L"
    first = open_image(tmp_path / "anim.gif")
    assert first.mode == "RGB" and first.convert("RGB").getpixel((5, 5))[0] > 200  # the first frame
    assert open_image(tmp_path / "rot.jpg").size == (10, 20)  # EXIF orientation applied
    (tmp_path / "cut.png").write_bytes((tmp_path / "la.png").read_bytes()[:40])
    with pytest.raises(DatasetError, match="cut.png is corrupt"):
        open_image(tmp_path / "cut.png")


# ----------------------------------------------------------------------------------------------
# 4. names, suffixes, resume, forms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CON", "con", "Nul", "PRN", "aux", "COM1", "com9", "LPT1", "LPT1.txt", "nul.tar.gz",
                                  "CON.safetensors", "Aux .x"])
def test_windows_device_names_are_refused(name):
    with pytest.raises(StudioError, match="device name on Windows"):
        check_name(name)


@pytest.mark.parametrize("name", ["console", "CONx", "com10", "lpt", "my con", "nullable", "a.con"])
def test_names_that_only_look_like_device_names_are_fine(name):
    assert check_name(name) == name


def test_what_is_stored_is_what_is_shown(tiny, tmp_path):
    from tests.method_cases import make_ti

    library = Library(tmp_path / "lib")
    assert check_name("x.safetensors.safetensors") == check_name("x.safetensors") == "x"
    path = library.add(make_ti(tiny, "<x>", 0), "x.safetensors.safetensors")
    assert path.name == "x.safetensors" and library.names() == ["x"]
    assert library.info("x").path == path and library.load("x").name == "x"
    # a file copied in by hand under a name the library would never give is not listed (import it)
    (library.folder / "y.safetensors.safetensors").write_bytes(path.read_bytes())
    assert library.names() == ["x"] and [i.name for i in library.list()] == ["x"]


def test_an_explicit_resume_latest_without_a_checkpoint_is_an_error(tmp_path, capsys):
    from studio.cli import main

    photos = _photos(tmp_path / "photos")
    rc = main(["train", TI, "--base", "tiny", "--images", str(photos), "--class-word", "cat",
               "--out", str(tmp_path / "a.safetensors"), "--resume", "latest"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"no checkpoint under {tmp_path / 'a.checkpoints'}" in err and "drop --resume" in err


def test_a_first_run_with_resume_latest_says_it_starts_from_step_0(tiny, tmp_path):
    from trainers import get_trainer
    from trainers.loop import TrainCallbacks
    from trainers.runner import train

    logs: list[str] = []

    class Log(TrainCallbacks):
        def on_log(self, message):
            logs.append(message)

    out = tmp_path / "a.safetensors"
    cfg = get_trainer(TI).resolve(images=str(_photos(tmp_path / "photos")), class_word="cat", steps=1,
                      batch_size=1, log_every=0, out=str(out), resume="latest")
    train(get_trainer(TI), cfg, tiny, callbacks=Log())
    assert f"no checkpoint found under {tmp_path / 'a.checkpoints'}; starting from step 0" in logs


def test_the_train_form_uploads_only_path_fields_and_orders_groups_once():
    from studio.configs import field_specs
    from studio.ui.forms import GROUP_ORDER, form_fields
    from trainers import get_trainer

    assert len(GROUP_ORDER) == len(set(GROUP_ORDER))
    fields = {f.name: f for f in form_fields(field_specs(get_trainer("dreambooth").config_cls))}
    assert fields["num_class_images"].widget == "int" and fields["eval_images"].widget == "int"
    assert fields["class_images"].widget == "files"
    groups = list(dict.fromkeys(f.group for f in fields.values()))
    assert groups[:4] == ["concept", "output", "method", "training"]  # Output right after Concept, not last
