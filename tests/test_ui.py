"""The browser UI's handlers, called as plain functions (no gradio server): forms generated from the
config dataclasses (a new field appears with no UI change), generation files that keep their PNG
parameters, X/Y grids, uploads validated by the service, the job flow from the Train tab to the
library, concept management, evaluation, base switching, the app's safe defaults, and a simulated
Hugging Face Space (a stand-in ``spaces`` module). The app as a process (in Chromium, and stopped
mid-job then restarted) is tests/test_browser.py."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.configs import field_specs, option
from studio.errors import StudioError
from studio.generation import GenerateConfig
from studio.grid import Axis, parse_axis, xy_grid
from studio.jobs import Worker
from studio.service import BaseSettings, Studio
from studio.ui import concepts, evaluate, generate, jobs, train
from studio.ui.common import Runners, UIContext
from studio.ui.forms import form_fields, parse_form
from tests.helpers import write_photos
from tests.method_cases import make_ti
from trainers import TrainerEntry
from trainers.textual_inversion import TextualInversionConfig, TextualInversionTrainer

REPO = Path(__file__).resolve().parents[1]
TI = "textual-inversion"


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def studio(tiny_bases, tmp_path, tmp_path_factory):
    """A studio on the session's tiny base with an empty library; the tests' temporary folders (a CLIP judge,
    an adapter) are the folders the operator allowed (app.py --allow-path)."""
    import tempfile

    return Studio(BaseSettings(base="tiny"), library=tmp_path / "lib", base=tiny_bases("tiny"),
                  allowed_paths=[tmp_path_factory.getbasetemp(), tempfile.gettempdir()])


@pytest.fixture
def ctx(studio, tmp_path, tmp_path_factory):
    # the tests' photos stand for uploads: their temporary folders count as gradio's upload folder
    return UIContext.create(studio, out_dir=tmp_path / "out", upload_roots=[tmp_path_factory.getbasetemp()])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return write_photos(tmp_path_factory.mktemp("photos"), name="photo {i}.png")


def _drain(gen):
    """The last value a generator handler yields."""
    out = None
    for item in gen:
        out = item
    return out


def _png_text(path: str | Path) -> dict[str, str]:
    with Image.open(path) as im:
        return dict(im.text)


def _fake_render(cfg: GenerateConfig) -> list[Image.Image]:
    """A stand-in pipeline: a colour from the seed, the config in the PNG texts (no model)."""
    img = Image.new("RGB", (32, 32), (cfg.seed * 40 % 256, int((cfg.guidance or 0) * 10) % 256, (cfg.steps or 0) % 256))
    strengths = {c.source: c.strength for c in cfg.concepts}
    img.info["parameters"] = f"{cfg.prompt}\nSteps: {cfg.steps}, Seed: {cfg.seed}, Strengths: {strengths}"
    img.info["studio"] = json.dumps({"seed": cfg.seed, "steps": cfg.steps, "strengths": strengths,
                                     "prompt": cfg.prompt})
    return [img]


# ----------------------------------------------------------------------------------------------
# Forms from config dataclasses
# ----------------------------------------------------------------------------------------------


def test_the_train_form_is_the_config_dataclass_minus_what_a_job_manages(ctx):
    forms = train.method_forms(ctx)
    assert TI in forms and "dreambooth" in forms
    ti = {f.name: f for f in forms[TI]}
    expected = {s.name for s in field_specs(TextualInversionConfig)} - {"images", "out", "checkpoint_dir", "resume"}
    assert set(ti) == expected
    assert ti["steps"].widget == "int" and ti["lr"].widget == "float" and ti["flip"].widget == "checkbox"
    assert ti["init"].widget == "dropdown" and ti["init"].choices == ("auto", "cross", "names", "plain")
    assert ti["names_file"].widget == "file"  # *_file: an upload the job copies
    assert ti["resolution"].optional and ti["resolution"].default is None
    db = {f.name: f for f in forms["dreambooth"]}
    assert db["target_modules"].widget == "list" and db["class_images"].widget == "files"
    assert "class_cache_dir" not in db  # a server path: never a web form field
    # presets fill the form: the default preset's values, or none
    values = train.preset_values(ctx, TI, "cross-init-fast")
    assert values["steps"] == 25 and values["batch_size"] == 8 and values["init"] == "auto"  # measured (issue 16)
    assert train.preset_choices(ctx, "dreambooth")[0] == train.NO_PRESET
    # the form opens on each method's default preset, on the demo base too (defaults adapt by measurement)
    assert train.default_preset(ctx, TI) == "cross-init" and train.default_preset(ctx, "dreambooth") == train.NO_PRESET
    demo = UIContext.create(Studio(BaseSettings(base="demo"), library=ctx.studio.library.folder, base=ctx.studio.base),
                            out_dir=ctx.out_dir)
    assert train.default_preset(demo, TI) == "cross-init" and train.default_preset(demo, "neti") == "paper"
    assert train.preset_values(demo, TI, "demo-world")["lr"] == 2e-2  # still there by name: a quick look


def test_a_field_added_to_a_config_appears_in_the_train_form_with_no_ui_change(ctx, monkeypatch):
    import gradio as gr

    import trainers.registry
    from studio.ui.forms import build_form

    @dataclasses.dataclass
    class SharperConfig(TextualInversionConfig):
        sharpness: float = option(0.5, "how sharp the learned vectors are", group="training")
        style_images: str | None = option(None, "a few images of the style to avoid", group="data", path="folder")
        mode: str = option("fast", "how to train", choices=["fast", "careful"], group="method")

    entry = TrainerEntry(cli_name="sharper-ti", method="textual_inversion", help="TI, sharper",
                         config_cls=SharperConfig, make_trainer=TextualInversionTrainer,
                         presets={"sharp": {"sharpness": 0.9}}, default_preset="sharp")
    monkeypatch.setattr(trainers.registry, "_TRAINERS", (*trainers.registry._TRAINERS, entry))

    fields = {f.name: f for f in train.method_forms(ctx)["sharper-ti"]}
    assert fields["sharpness"].widget == "float" and fields["sharpness"].help == "how sharp the learned vectors are"
    assert fields["style_images"].widget == "files" and fields["mode"].choices == ("fast", "careful")
    assert train.preset_values(ctx, "sharper-ti", "sharp")["sharpness"] == 0.9
    with gr.Blocks():
        comps = build_form(list(fields.values()), train.preset_values(ctx, "sharper-ti", "sharp"), prefix="t")
    assert comps["sharpness"].label == "sharpness" and comps["sharpness"].value == 0.9
    assert comps["mode"].elem_id == "t-mode"
    # the form's raw values become the new config's values
    form = {f"sharper-ti{train.SEP}sharpness": "0.7", f"sharper-ti{train.SEP}class_word": "cat",
            f"sharper-ti{train.SEP}mode": "careful"}
    values = train.method_values(ctx, "sharper-ti", form)
    assert values == {"sharpness": 0.7, "class_word": "cat", "mode": "careful"}
    assert SharperConfig(**values).sharpness == 0.7


def test_parse_form_types_and_errors():
    fields = form_fields(field_specs(TextualInversionConfig))
    values = parse_form(fields, {"steps": 12.0, "resolution": "", "lr": "0.01", "flip": None, "init_words": " a b ",
                                 "token": "", "names_file": {"path": "/tmp/names.txt"}})
    assert values == {"steps": 12, "resolution": None, "lr": 0.01, "flip": False, "init_words": "a b", "token": None,
                      "names_file": "/tmp/names.txt"}
    with pytest.raises(StudioError, match="whole number"):
        parse_form(fields, {"steps": 2.5})
    with pytest.raises(StudioError, match="must be a number"):
        parse_form(fields, {"resolution": "big"})
    with pytest.raises(StudioError, match="needs a value"):
        parse_form(fields, {"steps": ""})


# ----------------------------------------------------------------------------------------------
# Generate
# ----------------------------------------------------------------------------------------------


def test_generate_writes_pngs_that_keep_their_parameters_and_match_one_call(ctx, studio):
    form = {"prompt": "a photo of a cat", "negative": "blurry", "seed": 5, "steps": 2, "guidance": 5.0,
            "num_images": 2, "width": 0, "height": 0, "scheduler": "euler", "concepts": []}
    gallery, files, info = _drain(generate.generate(ctx, form))
    assert len(gallery) == len(files) == 2 and "seeds 5…6" in info
    for i, path in enumerate(files):
        assert Path(path).is_relative_to(ctx.out_dir) and path.endswith(".png")
        text = _png_text(path)
        assert "Negative prompt: blurry" in text["parameters"] and f"Seed: {5 + i}" in text["parameters"]
        assert json.loads(text["studio"])["seed"] == 5 + i
    # one image at a time == one call with num_images (image i uses seed + i)
    together = studio.generate(GenerateConfig(prompt="a photo of a cat", negative_prompt="blurry", seed=5, steps=2,
                                              guidance=5.0, num_images=2, scheduler="euler"))
    with Image.open(files[1]) as second:
        assert list(second.convert("RGB").getdata()) == list(together[1].convert("RGB").getdata())


def test_generate_with_a_concept_uses_its_recommended_strength(ctx, studio, tiny):
    concept = make_ti(tiny, "<kit>", 0)
    concept.strength = 0.6
    studio.library.add(concept, "kit")
    assert generate.concept_choices(ctx) == ["kit"]
    [row] = generate.concept_defaults(ctx, ["kit"])
    assert row["strength"] == 0.6 and row["trigger"] == "<kit>"
    assert generate.insert_triggers(ctx, {"prompt": "a photo of", "concepts": ["kit"]}) == "a photo of <kit>"
    cfg = generate.build_config(ctx, {"prompt": "a <kit>", "concepts": ["kit"], "strength_0": 0.6, "steps": 2,
                                      "random_seed": True})
    assert cfg.concepts[0].source == "kit" and cfg.concepts[0].strength == 0.6 and 0 <= cfg.seed < 2**31
    _, files, _ = _drain(generate.generate(ctx, {"prompt": "a <kit>", "concepts": ["kit"], "strength_0": 0.6,
                                                 "steps": 2, "seed": 1}))
    assert "<kit>:0.6 (kit)" in _png_text(files[0])["parameters"]
    with pytest.raises(StudioError, match="prompt is empty"):
        generate.build_config(ctx, {"prompt": " "})


def test_xy_grid_labels_cells_and_varies_each_axis(ctx):
    x = parse_axis("strength", "0, 0.5, 1", concept="kit")
    y = parse_axis("seed", "3-4")
    assert y.values == (3, 4) and x.values == (0.0, 0.5, 1.0)
    seen = []

    def render(cfg):
        seen.append(cfg)
        return _fake_render(cfg)[0]

    result = xy_grid(render, GenerateConfig(prompt="a <kit>", steps=3, num_images=4), x, y)
    assert len(seen) == 6 and all(c.num_images == 1 for c in seen)
    assert [(c.seed, c.concepts[0].strength) for c in seen] == [(3, 0.0), (3, 0.5), (3, 1.0), (4, 0.0), (4, 0.5),
                                                                 (4, 1.0)]
    assert result.image.width > 3 * 128 and result.image.height > 2 * 128  # 32-px cells enlarged, labels around
    assert "X strength of kit = 0.0, 0.5, 1.0; Y seed = 3, 4" in result.image.info["parameters"]
    prompt_axis = parse_axis("prompt", "cat, dog")
    assert prompt_axis.apply(GenerateConfig(prompt="a cat"), "dog").prompt == "a dog"
    with pytest.raises(StudioError, match="Unknown scheduler"):
        parse_axis("scheduler", "warp")
    with pytest.raises(StudioError, match="needs the concept"):
        Axis("strength", (1.0,))
    with pytest.raises(StudioError, match="at most 4"):
        xy_grid(render, GenerateConfig(prompt="x"), parse_axis("seed", "1-5"), max_cells=4)
    # through the tab: the grid PNG keeps its parameters
    fake = UIContext.create(ctx.studio, runners=Runners(render=_fake_render, evaluate=None, sweep=None),
                            out_dir=ctx.out_dir)
    path, download, info = generate.make_grid(fake, {"prompt": "a <kit>", "steps": 2, "x_kind": "seed",
                                                     "x_values": "1,2", "y_kind": "guidance", "y_values": "3, 6"})
    assert path == download and "2 × 2 grid" in info and "X/Y grid" in _png_text(path)["parameters"]


# ----------------------------------------------------------------------------------------------
# Uploads and training
# ----------------------------------------------------------------------------------------------


def test_uploads_are_validated_and_laid_out_for_the_trainer(studio, photos, tmp_path):
    import shutil

    import studio.service as service

    caption = tmp_path / "photo 0.txt"
    caption.write_text("a red cat", encoding="utf-8")
    mask = tmp_path / "photo 1.png"
    Image.new("L", (32, 32), 255).save(mask)
    folder = studio.stage_training_images([*photos, caption], masks=[mask], captions={"photo 2.png": "a cat"})
    try:
        assert sorted(p.name for p in folder.iterdir()) == [
            "photo 0.png", "photo 0.txt", "photo 1.mask.png", "photo 1.png", "photo 2.png", "photo 2.txt"]
        assert (folder / "photo 2.txt").read_text().strip() == "a cat"
    finally:
        shutil.rmtree(folder)
    # an uploaded file's name never leads out of the folder, nor hides the file
    assert service.safe_filename("../../etc/passwd") == "passwd"
    assert service.safe_filename("..\\..\\boot.ini") == "boot.ini"
    assert service.safe_filename(".hidden.png") == "hidden.png"
    assert service.safe_filename("ça<va>.png") == "_a_va_.png"
    text = tmp_path / "notes.doc"
    text.write_text("x")
    with pytest.raises(StudioError, match="not an accepted file type"):
        studio.stage_training_images([photos[0], text])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(StudioError, match="broken.png is corrupt"):
        studio.stage_training_images([photos[0], broken])
    with pytest.raises(StudioError, match="matches no uploaded image"):
        studio.stage_training_images([photos[0]], captions={"other.png": "x"})
    with pytest.raises(StudioError, match="at least 2"):
        studio.stage_training_images([photos[0]], min_images=2)
    with pytest.raises(StudioError, match="at most 2 are accepted"):
        service.check_uploads(photos, suffixes=service.IMAGE_UPLOADS, max_files=2)
    with pytest.raises(StudioError, match="MB; files up to"):
        service.check_uploads(photos, suffixes=service.IMAGE_UPLOADS, max_bytes=10)


def _whole_form(ctx, method: str, preset: str | None, **changes) -> dict:
    """The Train form as the page sends it: every widget showing the preset's value, then ``changes``."""
    from studio.ui.forms import widget_value

    fields = {f.name: f for f in train.method_forms(ctx)[method]}
    values = train.preset_values(ctx, method, preset)
    form = {f"{method}{train.SEP}{k}": widget_value(f, values.get(k, f.default)) for k, f in fields.items()}
    form |= {f"{method}{train.SEP}{k}": v for k, v in changes.items()}
    return form | {"method": method, f"{method}{train.SEP}preset": preset or train.NO_PRESET}


@pytest.mark.parametrize("method, preset, changes", [
    (TI, "cross-init", {"class_word": "cat", "name": "kitty", "steps": 7, "flip": True, "lr": "0.01"}),
    (TI, "cross-init-fast", {"class_word": "cat", "init": "plain", "resolution": "64", "templates": "style"}),
    ("dreambooth", None, {"class_word": "dog", "rank": 16, "target_modules": "to_k, to_v",
                          "train_text_encoder": False, "budget": "fixed"}),
    ("dreambooth", "lora-unet-only", {"class_word": "dog", "steps": 12}),
    ("perfusion", "paper", {"class_word": "teddy", "lr_v_scale": 0.1}),
    ("neti", "paper", {"class_word": "cat", "nested_dropout": 0.25}),
])
def test_copy_cli_command_reproduces_the_form(ctx, studio, method, preset, changes):
    """The Train tab's "Copy CLI command": running the printed ``python -m studio train …`` builds exactly
    the config the form would queue (Studio.submit_training: the preset, then the form's values)."""
    import shlex

    from studio.cli import build_parser
    from studio.models import BaseSettings as Settings
    from trainers import get_trainer
    from trainers.runner import config_from_cli

    form = _whole_form(ctx, method, preset, **changes)
    command = train.cli_command(ctx, form)
    words = shlex.split(command)
    assert words[:5] == ["python", "-m", "studio", "train", method] and "--images" in words
    ns = build_parser().parse_args(words[3:])
    settings = Settings(**{k: getattr(ns, k) for k in ("base", "device", "dtype") if hasattr(ns, k)})
    assert settings.base == studio.settings.base
    from_cli = config_from_cli(get_trainer(method), ns, settings)
    m = studio.training_methods()[method]
    chosen = m.preset_name(studio.settings.profile()) if preset is None else preset
    from_form = m.config_cls(**(m.preset_values(chosen) | train.method_values(ctx, method, form)))
    skip = {"images", "out", "checkpoint_dir", "resume"}
    assert {k: v for k, v in dataclasses.asdict(from_cli).items() if k not in skip} == \
        {k: v for k, v in dataclasses.asdict(from_form).items() if k not in skip}, command
    assert ns.images == train.PHOTOS_DIR
    # only what the form changed is written (a preset's value is not repeated)
    assert "--class-word" in words and ("--preset" in words) == bool(chosen)
    unchanged = train.cli_command(ctx, _whole_form(ctx, method, preset))
    assert len(shlex.split(unchanged)) <= 9 + 2 * bool(chosen), unchanged


def test_the_train_tab_estimates_memory_before_training(ctx):
    for method in (TI, "dreambooth"):
        text = train.memory_estimate(ctx, _whole_form(ctx, method, None, class_word="cat"))
        assert text.startswith("Memory estimate:") and "fits" in text and "GiB" in text
    small = train.memory_estimate(ctx, _whole_form(ctx, TI, "cross-init", class_word="cat", batch_size=1))
    large = train.memory_estimate(ctx, _whole_form(ctx, TI, "cross-init", class_word="cat", batch_size=16))
    assert small != large  # the form's batch size is what is estimated


def test_the_train_tab_says_what_each_method_gives(ctx):
    for name in ctx.studio.training_methods():
        line = train.method_summary(ctx, name)
        assert line.startswith(f"**{name}**") and "Gives:" in line
    assert "KB" in train.method_summary(ctx, TI) and "MB" in train.method_summary(ctx, "dreambooth")


def test_start_training_from_the_form_then_the_concept_is_in_the_library(ctx, studio, photos, tiny_bases):
    m = TI + train.SEP
    form = {"method": TI, "images": [str(p) for p in photos], "captions": "photo 0.png: a cat on a mat",
            m + "preset": "cross-init", m + "class_word": "cat", m + "name": "kitty", m + "steps": 3,
            m + "batch_size": 1, m + "resolution": "", m + "checkpoint_every": 2}
    with pytest.raises(StudioError, match="images first"):
        train.start(ctx, {**form, "images": []})
    job_id, text = train.start(ctx, form)
    assert "kitty" in text and "<kitty>" in text
    job = studio.jobs.get(job_id)
    assert job.state == "queued" and job.config["steps"] == 3 and job.config["lr"] is None \
        and job.config["lr_scale"] == 0.35  # the preset's rate, in the base's units (issue 16)
    assert (job.folder / "dataset" / "photo 0.txt").read_text().strip() == "a cat on a mat"
    status = train.job_status(ctx, job_id)
    assert status["active"] and "queued" in status["text"]
    with pytest.raises(StudioError, match="checkpoints and output"):
        studio.submit_training(TI, {"class_word": "cat", "checkpoint_dir": "/etc"}, photos)
    with pytest.raises(StudioError, match="has no setting stepz"):
        studio.submit_training(TI, {"class_word": "cat", "stepz": 3}, photos)

    Worker(studio.jobs, load_base=lambda settings, device: tiny_bases(settings["base"])).run(once=True)
    status = train.job_status(ctx, job_id)
    assert not status["active"] and status["state"] == "done" and "Saved to the library" in status["text"]
    assert [s for s, _ in status["curve"]] == [1, 2, 3]  # (previews: tests/test_browser.py)
    assert "published" in status["log"]
    assert studio.library.names() == ["kitty"]
    rows = jobs.job_rows(ctx)
    assert rows[0][:2] == [job_id, "done"] and "3/3" in rows[0]
    assert "published" in jobs.job_log(ctx, job_id)
    with pytest.raises(StudioError, match="is done"):
        jobs.act(ctx, "resume", job_id)
    assert jobs.act(ctx, "remove", job_id) == f"Job {job_id} removed." and jobs.job_rows(ctx) == []


def test_the_dataset_step_inspects_captions_masks_crops_and_training_uses_it(ctx, studio, tmp_path):
    """The Train tab's "Prepare the photos": on a staging folder of the uploads — inspect (report and sheet),
    captions in an editable table (a tiny random BLIP: the real loading path), GrabCut masks, subject
    crops — then Start trains on the prepared folder with the table's (edited) captions."""
    from studio.ui import dataset
    from tests.tiny_captioners import write_tiny_blip

    photos = write_photos(tmp_path / "up", n=3, size=96)
    photos.append(tmp_path / "up" / "3.png")
    Image.open(photos[0]).save(photos[3])  # a duplicate, for the inspection to notice
    m = TI + train.SEP
    form = {"method": TI, "images": [str(p) for p in photos], m + "token": "<sq>", m + "class_word": "square"}
    text, sheet, staged = dataset.inspect(ctx, train.dataset_form(form))
    assert "4 image(s)" in text and "near-duplicate" in text and sheet.size[0] > 0
    form["staged"] = staged
    assert dataset.stage(ctx, form) == Path(staged)  # reused while the uploads are the same

    blip = write_tiny_blip(tmp_path / "blip")
    rows, summary, _ = dataset.caption(ctx, train.dataset_form(form | {"caption_model": str(blip)}))
    assert [r[0] for r in rows] == ["0.png", "1.png", "2.png", "3.png"] and "4 written" in summary
    assert all("<sq> square" in r[1] for r in rows)  # the trigger and class word are in every caption
    with pytest.raises(StudioError, match="not allowed|allowed"):
        dataset.caption(ctx, train.dataset_form(form | {"caption_model": "/etc"}))

    shown, note, _ = dataset.masks(ctx, train.dataset_form(form))
    assert len(shown) == 4 and all(Path(p).name.endswith(".mask.png") for p, _ in shown), note
    mask = np.asarray(Image.open(Path(staged) / "0.mask.png")) > 127
    assert mask[48, 48] and not mask[2, 2]  # the blue square is the subject, the border is not

    note, cropped = dataset.crop(ctx, train.dataset_form(form | {"crop_size": 64}))
    assert "4 photo(s) cropped" in note and Image.open(Path(cropped) / "0.png").size == (64, 64)
    form["staged"] = cropped
    rows[1][1] = "an edited caption of <sq> square"
    job_id, _ = train.start(ctx, form | {"caption_table": rows, m + "steps": 2, m + "batch_size": 1,
                                          m + "name": "sq"})
    job = studio.jobs.get(job_id)
    data = job.folder / "dataset"
    assert (data / "1.txt").read_text().strip() == "an edited caption of <sq> square"
    assert (data / "0.mask.png").is_file() and Image.open(data / "0.png").size == (64, 64)


def test_pause_resume_cancel_from_the_ui(ctx, studio, photos):
    job = studio.submit_training(TI, {"class_word": "cat", "steps": 2}, photos)
    assert train.control(ctx, "pause", job.id) == f"Job {job.id}: paused"
    assert not train.job_status(ctx, job.id)["active"]
    assert jobs.act(ctx, "resume", job.id) == f"Job {job.id}: queued"
    assert jobs.act(ctx, "cancel", job.id) == f"Job {job.id}: cancelled"
    with pytest.raises(StudioError, match="Select a job"):
        jobs.act(ctx, "cancel", None)


# ----------------------------------------------------------------------------------------------
# Concepts
# ----------------------------------------------------------------------------------------------


def test_concept_cards_search_rename_delete_import_export(ctx, studio, tiny, tmp_path):
    a = make_ti(tiny, "<kit>", 0)
    a.metrics = {"eval": {"scores": {"clip_i": 0.81234, "clip_t": 0.3}}}
    a.strength = 0.7
    studio.library.add(a, "kit", preview=Image.new("RGB", (32, 32), "red"))
    studio.library.add(make_ti(tiny, "<pup>", 1), "pup")
    rows = concepts.cards(ctx)
    assert [r["name"] for r in rows] == ["kit", "pup"]
    assert rows[0]["scores"] == {"clip_i": 0.8123, "clip_t": 0.3} and rows[0]["strength"] == 0.7
    html = concepts.cards_html(rows)
    assert "data:image/png;base64," in html and "&lt;kit&gt;" in html and "recommended strength: 0.7" in html
    assert [r["name"] for r in concepts.cards(ctx, "PUP")] == ["pup"]
    assert concepts.cards(ctx, "nothing-like-this") == []

    assert "kitty" in concepts.rename(ctx, {"name": "kit", "new_name": "kitty", "new_trigger": "<kitty>"})
    assert studio.library.info("kitty").tokens == ["<kitty>"] and studio.library.info("kitty").preview
    with pytest.raises(StudioError, match="not allowed"):
        concepts.rename(ctx, {"name": "kitty", "new_name": "../outside"})
    with pytest.raises(StudioError, match="Confirm"):
        concepts.delete(ctx, {"name": "pup"})
    concepts.delete(ctx, {"name": "pup", "confirmed": True})
    assert studio.library.names() == ["kitty"]

    assert concepts.export_formats(ctx, "kitty") == ["studio", "a1111", "diffusers"]
    out = concepts.export(ctx, {"name": "kitty", "format": "a1111"})
    assert Path(out).is_relative_to(ctx.out_dir) and Path(out).name == "kitty.a1111.safetensors"
    assert "Imported **again**" in concepts.import_concept(ctx, {"file": out, "import_name": "again",
                                                                  "import_trigger": "<again>", "import_class": "cat"})
    torch.testing.assert_close(studio.library.load("again").tensors["emb_params"],
                               studio.library.load("kitty").tensors["emb_params"])
    with pytest.raises(StudioError, match="not allowed"):
        concepts.import_concept(ctx, {"file": out, "import_name": "../../etc/x"})
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"x")
    with pytest.raises(StudioError, match="not an accepted file type"):
        concepts.import_concept(ctx, {"file": str(bad)})


def test_concept_gallery_filters_marks_other_bases_and_sends_a_concept_to_generate(ctx, studio, tiny, tiny_bases):
    """The gallery's method and base filters; a concept made for another base is listed, marked "for
    another base" and refused by "Use in Generate" (and by generation); a fitting one goes to the
    Generate tab's concepts with its trigger in the prompt, and the Generate examples use it."""
    from tests.method_cases import make_lora

    studio.library.add(make_ti(tiny, "<kit>", 0), "kit")
    studio.library.add(make_lora(tiny, "<lor>", 1), "lor")
    studio.library.add(make_ti(tiny_bases("tiny-sdxl"), "<xl>", 2), "xl")
    rows = {r["name"]: r for r in concepts.cards(ctx)}
    assert rows["kit"]["fits"] == "" and rows["lor"]["fits"] == "" and "another base" in rows["xl"]["fits"]
    assert "cannot be applied here" in concepts.cards_html([rows["xl"]])
    assert [r["name"] for r in concepts.cards(ctx, fit="fits this base")] == ["kit", "lor"]
    assert [r["name"] for r in concepts.cards(ctx, fit="for another base")] == ["xl"]
    lora_method = rows["lor"]["method"]
    assert [r["name"] for r in concepts.cards(ctx, method=lora_method)] == ["lor"]
    assert concepts.method_choices(ctx) == ["all", *sorted({lora_method, "textual_inversion"})]

    with pytest.raises(StudioError, match="another base.*load that base"):
        concepts.use_in_generate(ctx, {"name": "xl", "selected": [], "prompt": ""})
    selected, prompt = concepts.use_in_generate(ctx, {"name": "kit", "selected": ["lor"], "prompt": "a dog"})
    assert selected == ["lor", "kit"] and prompt == "a photo of <kit> cat on the beach"
    assert concepts.use_in_generate(ctx, {"name": "kit", "selected": ["kit"], "prompt": "my <kit> here"}) == \
        (["kit"], "my <kit> here")
    # the examples: the base's prompts, then one concept, then two together (both triggers in the prompt)
    rows_ = generate.example_rows(ctx)
    assert [r[1] for r in rows_[-2:]] == [["kit"], ["kit", "lor"]] and "<kit>" in rows_[-1][0] and "<lor>" in rows_[-1][0]
    assert all(not r[1] for r in rows_[:-2]) and rows_[0][0] == studio.settings.profile().examples[0]
    with pytest.raises(StudioError, match="does not fit|another"):
        studio.generate(generate.build_config(ctx, {"prompt": "a <xl>", "concepts": ["xl"], "steps": 1}))


def test_demo_world_examples_are_in_its_vocabulary():
    from studio.models.profile import world_profile
    from studio.world.render import VOCABULARY

    known = {w for values in VOCABULARY.values() for w in values} | {"a", "an", "photo", "of", "on", "background"}
    profile = world_profile()
    assert len(profile.examples) >= 3
    for prompt in profile.examples:
        assert set(prompt.split()) <= known, prompt
    assert profile.concept_prompt.format("<hrt> circle") == "a photo of a <hrt> circle on a teal background"


# ----------------------------------------------------------------------------------------------
# Zero-shot
# ----------------------------------------------------------------------------------------------


def test_zero_shot_images_and_concept_from_reference_uploads(ctx, studio, tiny, photos):
    from studio.ui import zeroshot
    from tests.method_cases import tiny_adapter_folder

    adapter = str(tiny_adapter_folder(tiny))
    form = {"references": [str(p) for p in photos[:2]], "prompt": "a photo of a cat", "steps": 2, "seed": 2,
            "num_images": 1, "scale": 0.8, "adapter": adapter, "name": "ref cat", "class_word": "cat"}
    _, files, info = _drain(zeroshot.generate(ctx, form))
    assert "from 2 reference image(s)" in info and "Seed: 2" in _png_text(files[0])["parameters"]
    assert "ref cat" in zeroshot.save(ctx, form)
    info = studio.library.info("ref cat")
    assert info.method == "zeroshot" and info.strength == 0.8
    with pytest.raises(StudioError, match="Upload one or more reference images"):
        zeroshot.save(ctx, {**form, "references": []})
    # the Generate tab takes reference images too
    cfg = generate.build_config(ctx, {"prompt": "a cat", "reference": [str(photos[0])], "reference_scale": 0.5,
                                      "adapter": adapter})
    assert cfg.reference_images == [str(photos[0])] and cfg.reference_scale == 0.5 and cfg.adapter == adapter


# ----------------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------------




def test_evaluate_and_sweep_from_the_tab(ctx, studio, tiny, photos, clip_dir):
    studio.library.add(make_ti(tiny, "<kit>", 0), "kit")
    form = {"concepts": ["kit"], "protocol": evaluate.CUSTOM, "prompts": "a photo of {}", "scorer": "clip",
            "clip_model": str(clip_dir), "seeds": 1, "steps": 2, "guidance": "", "references": [str(p) for p in photos]}
    assert "clip" in evaluate.scorers(ctx) and evaluate.CUSTOM in evaluate.protocols()
    opts = evaluate.options(ctx, form, ctx.out_dir, None)
    assert opts["prompts"] == ["a photo of {}"] and "guidance" not in opts and opts["clip_model"] == str(clip_dir)
    result = evaluate.evaluate(ctx, form)
    assert {row[0] for row in result["rows"]} >= {"clip_t", "clip_i"}
    assert Path(result["sheet"]).is_file() and Path(result["plot"]).is_file() and "Evaluated **kit**" in result["text"]
    assert "clip_i" in studio.library.info("kit").metrics["eval"]["scores"]  # stored in the concept
    swept = evaluate.sweep(ctx, {**form, "strengths": "0, 1"})
    assert [row[0] for row in swept["rows"]] == [0.0, 1.0] and "Recommended strength" in swept["text"]
    assert studio.library.info("kit").strength in (0.0, 1.0)
    with pytest.raises(StudioError, match="exactly one"):
        evaluate.sweep(ctx, {**form, "concepts": []})
    with pytest.raises(StudioError, match="Guidance must be a number"):
        evaluate.options(ctx, {**form, "guidance": "lots"}, ctx.out_dir, None)


# ----------------------------------------------------------------------------------------------
# Base switching, app defaults
# ----------------------------------------------------------------------------------------------


def test_switching_to_a_base_that_fails_keeps_the_old_one(ctx, studio):
    from studio.ui import base_banner, switch_base

    before = studio.base
    with pytest.raises(StudioError):
        switch_base(ctx, {"base": str(Path("/nonexistent/model-folder")), "device": "cpu"})
    assert studio.base is before and studio.settings.base == "tiny"
    assert "`tiny`" in base_banner(ctx)
    with pytest.raises(StudioError, match="Type a base"):
        switch_base(ctx, {"base": " "})


def test_app_falls_back_to_an_offline_base_with_a_banner_and_binds_loopback(tiny_bases, tmp_path, monkeypatch):
    import app
    import studio.models.settings as service  # where BaseSettings.load finds load_base

    real = service.load_base

    def load(spec, **kw):
        return tiny_bases(spec) if spec in ("tiny",) else real(spec, **kw)

    monkeypatch.setattr(service, "load_base", load)
    monkeypatch.setattr(app, "OFFLINE_BASES", ("tiny",))
    studio, banner = app.make_studio("/nonexistent/base-folder", str(tmp_path / "lib"))
    assert studio.settings.base == "tiny"
    assert "Could not load base '/nonexistent/base-folder'" in banner and "offline base 'tiny'" in banner
    assert "--base" in banner and "STUDIO_BASE" in banner
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert app.server_name(False) == "127.0.0.1" and app.server_name(True) == "0.0.0.0"
    assert app.parse_auth("ann:secret, bob:pw") == [("ann", "secret"), ("bob", "pw")]
    with pytest.raises(SystemExit):
        app.parse_auth("nopassword")
    args = app.parse_args([])
    assert not args.listen and not args.share


# ----------------------------------------------------------------------------------------------
# A simulated Hugging Face Space
# ----------------------------------------------------------------------------------------------


def _front_matter(readme: Path) -> dict[str, str] | None:
    text = readme.read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    if not m:
        return None
    return {k.strip(): v.strip().strip("'\"") for k, _, v in (line.partition(":") for line in m.group(1).splitlines())
            if k.strip() and not k.startswith(" ")}


def test_the_app_runs_as_a_space_with_spaces_gpu(tiny_bases, tmp_path, monkeypatch):
    """The Space runtime: ``spaces`` importable, ``SPACE_ID`` set, ``import app; app.demo``; the
    models load at import and a generation goes through the ``spaces.GPU``-decorated function."""
    import gradio as gr

    import studio.models.settings as service  # where BaseSettings.load finds load_base

    calls: list[tuple[str, int]] = []
    decorated: list[str] = []

    def GPU(fn=None, *, duration=60):  # noqa: N802 - the spaces API
        def wrap(f):
            decorated.append(f.__name__)

            def run(*args, **kwargs):
                calls.append((f.__name__, duration))
                return f(*args, **kwargs)

            run.__name__ = f.__name__
            return run

        return wrap(fn) if fn is not None else wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    loads = []
    monkeypatch.setattr(service, "load_base", lambda spec, **kw: loads.append(spec) or tiny_bases(spec))
    monkeypatch.setenv("SPACE_ID", "someone/studio")
    monkeypatch.setenv("STUDIO_BASE", "tiny")
    monkeypatch.setenv("STUDIO_LIBRARY", str(tmp_path / "lib"))
    monkeypatch.setenv("STUDIO_WORKER", "0")
    monkeypatch.delitem(sys.modules, "app", raising=False)

    import app

    try:
        assert loads == ["tiny"]  # loaded at import, before any request
        assert isinstance(app.demo, gr.Blocks)
        assert {"render", "evaluate", "sweep", "train_chunk"} <= set(decorated)
        images = app.render(GenerateConfig(prompt="a photo of a cat", steps=2, seed=3))
        assert calls == [("render", 120)]
        assert isinstance(images[0], Image.Image) and "Seed: 3" in images[0].info["parameters"]
        ctx = app.demo.studio_context
        _, files, _ = _drain(generate.generate(ctx, {"prompt": "a photo of a cat", "steps": 2, "seed": 4}))
        assert calls[-1] == ("render", 120) and "Seed: 4" in _png_text(files[0])["parameters"]
    finally:
        sys.modules.pop("app", None)


def test_the_readme_declares_the_space():
    meta = _front_matter(REPO / "README.md")
    assert meta is not None, "README.md lost its Hugging Face Space front matter"
    assert meta.get("sdk") == "gradio" and meta.get("app_file") == "app.py"
    import gradio

    assert meta.get("sdk_version") == gradio.__version__


def _painted(size: int = 32) -> dict:
    """A mask-painter value: a picture and two painted layers (a disc, then the border band)."""
    from PIL import ImageDraw

    picture = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(picture).ellipse((8, 8, 24, 24), fill=(135, 60, 190))
    disc, band = Image.new("RGBA", (size, size)), Image.new("RGBA", (size, size))
    ImageDraw.Draw(disc).ellipse((9, 9, 23, 23), fill=(255, 48, 48, 255))
    ImageDraw.Draw(band).rectangle((0, 0, size - 1, size - 1), outline=(48, 160, 255, 255), width=4)
    return {"background": picture, "layers": [disc, band], "composite": None}


def test_break_a_scene_masks_painted_on_one_picture_train_from_the_form(ctx, studio, tmp_path, tiny_bases):
    """The Train tab's painter: layer i is the i-th concept's mask, written as <stem>.<concept>.png beside the
    picture — the layout `--masks` reads — and the job trains on that one picture."""
    m = train.PAINT_METHOD + train.SEP
    form = {"method": train.PAINT_METHOD, "images": [], "paint": _painted(), m + "concepts": "blob:circle,edge:frame",
            m + "steps": 2, m + "phase1_steps": 1, m + "batch_size": 1}
    picture, masks = train.painted_scene(form["paint"], "blob:circle,edge:frame", tmp_path / "p")
    assert picture.name == "scene.png" and [p.name for p in masks] == ["scene.blob.png", "scene.edge.png"]
    blob = np.asarray(Image.open(masks[0]))
    assert blob[16, 16] == 255 and blob[0, 0] == 0 and set(np.unique(blob)) == {0, 255}
    assert np.asarray(Image.open(masks[1]))[0, 0] == 255
    with pytest.raises(StudioError, match="2 layer.*3 concept"):
        train.painted_scene(form["paint"], "a,b,c", tmp_path / "q")
    with pytest.raises(StudioError, match="Layer 2 \\(edge\\) is empty"):
        train.painted_scene({**form["paint"], "layers": [form["paint"]["layers"][0], Image.new("RGBA", (32, 32))]},
                            "blob,edge", tmp_path / "r")
    with pytest.raises(StudioError, match="Name the concepts"):
        train.painted_scene(form["paint"], "", tmp_path / "s")
    assert train.painted_scene({"background": None, "layers": []}, "a", tmp_path / "t") is None
    with pytest.raises(StudioError, match="or paint the concepts"):
        train.start(ctx, {**form, "paint": None})

    job_id, _ = train.start(ctx, form)
    job = studio.jobs.get(job_id)
    assert job.state == "queued"
    names = sorted(p.name for p in job.folder.rglob("*.png"))
    assert "scene.png" in names and "scene.blob.png" in names and "scene.edge.png" in names
    Worker(studio.jobs, load_base=lambda settings, device: tiny_bases(settings["base"])).run(once=True)
    status = train.job_status(ctx, job_id)
    assert status["state"] == "done", status["text"]
    assert sorted(studio.library.names()) == [f"{job.name}-blob", f"{job.name}-edge"]  # one file per concept
    from studio.jobs.execute import finished_output, publish

    job = studio.jobs.get(job_id)
    finished = finished_output(job)  # the list written last: a restart publishes the complete set once
    assert finished is not None and finished.name == "concepts.json"
    assert publish(job, finished) == studio.library.path(f"{job.name}-blob")  # already there: no second copy
