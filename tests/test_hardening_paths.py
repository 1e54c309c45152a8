"""A web request names no server path (issue 25: HIGH 1 and Medium 3).

The attack: the Train form's 'eval prompts' box took a server path, and the queued job showed the
file's first line in its status (``Prompt 'SECRET-LINE-ONE api_key=…' does not name <x>``); the Base
box told the first 8 bytes and the size of any file (``/etc/passwd`` → 'its header claims
3475222254926655346 bytes' = ``root:x:0``). Here every entry point of the page is called as the UI
calls it (plain handlers with a :class:`UIContext`, as tests/test_ui.py does) with a secret file outside
the app's folders: each refuses before the file is opened, queues nothing, and never quotes it. Uploads
(inside the app's upload folder) still work end to end, hub ids and named values are accepted, and a
local base or model is accepted only under a folder the operator allowed (``app.py --allow-path``)."""

from __future__ import annotations

import builtins
import io
import os
from pathlib import Path

import pytest

from studio.configs import path_fields
from studio.errors import StudioError
from studio.jobs import Worker
from studio.models import BaseSettings
from studio.request_paths import check_base, check_model, is_hub_ref
from studio.service import Studio
from studio.ui import concepts, evaluate, generate, switch_base, train, zeroshot
from studio.ui.common import UIContext
from tests.helpers import write_photos
from tests.method_cases import make_ti
from trainers import trainer_registry

TI = "textual-inversion"
SECRET = "SECRET-LINE-ONE api_key=hunter2"
# Every text box of every Train form that is not a path: a new str field must be declared (path=…) or listed here.
PLAIN_TEXT = {"name", "token", "class_word", "preview_prompt", "init_words", "instance_prompt", "class_prompt",
              "target_modules", "text_encoder_targets", "core_layers", "init_token",
              "concepts", "prompt"}  # Break-A-Scene's name:class-word list and its prompt template
DECLARED = {"eval_prompts": "file", "eval_model": "model", "names_file": "file", "class_images": "folder",
            "corpus": "file", "adapter": "model", "image_encoder": "model", "core_prompts_file": "file",
            "masks": "folder"}
HUB_VALUES = {"eval_model": "openai/clip-vit-base-patch32",
              "adapter": "h94/IP-Adapter/models/ip-adapter_sd15.safetensors",
              "image_encoder": "h94/IP-Adapter/models/image_encoder"}


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path_factory) -> Path:
    """A server file outside every folder of the app (its first line is what the attack read)."""
    path = tmp_path_factory.mktemp("server-secrets") / "secret.txt"
    path.write_text(f"{SECRET}\nsecond line\n", encoding="utf-8")
    return path


@pytest.fixture
def uploads(tmp_path) -> Path:
    """Stands for gradio's upload folder (the only place an upload comes from)."""
    folder = tmp_path / "gradio-uploads"
    folder.mkdir()
    return folder


@pytest.fixture
def photos(uploads) -> list[Path]:
    return write_photos(uploads / "a1b2", name="photo {i}.png")


@pytest.fixture
def studio(tiny_bases, tmp_path):
    """A studio as `python app.py` starts it: no --allow-path."""
    return Studio(BaseSettings(base="tiny"), library=tmp_path / "lib", base=tiny_bases("tiny"))


@pytest.fixture
def ctx(studio, tmp_path, uploads):
    return UIContext.create(studio, out_dir=tmp_path / "out", upload_roots=[uploads])


@pytest.fixture
def opened(monkeypatch):
    """Every path opened (builtins.open, io.open — what pathlib uses —, os.open) while the test runs."""
    seen: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy(file, *args, **kwargs):
        seen.append(str(file))
        return real_open(file, *args, **kwargs)

    def os_spy(path, *args, **kwargs):
        seen.append(str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    return seen


def _refused(fn, *args, match: str | None = None, **kwargs) -> str:
    """Call ``fn``: it must raise a StudioError that quotes no secret; returns its message."""
    with pytest.raises(StudioError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert SECRET not in message and "hunter2" not in message and "root:" not in message, message
    if match is not None:
        assert match in message, message
    return message


def _never_opened(opened: list[str], *paths: Path | str) -> None:
    for p in paths:
        assert not [o for o in opened if Path(o).name == Path(p).name], f"{p} was opened"


def _form(method: str, photos: list[Path], **fields) -> dict:
    m = method + train.SEP
    form = {"method": method, "images": [str(p) for p in photos], m + "class_word": "cat", m + "steps": 2,
            m + "batch_size": 1}
    if method == "adapter":
        form[m + "adapter"] = "new"
        form[m + "image_encoder"] = HUB_VALUES["image_encoder"]
    return form | {m + k: v for k, v in fields.items()}


# ----------------------------------------------------------------------------------------------
# The attack: a server path typed into the Train form
# ----------------------------------------------------------------------------------------------


def test_eval_prompts_naming_a_server_file_is_refused_and_nothing_is_queued(ctx, studio, photos, secret, opened):
    for target in (str(secret), "/etc/shadow", "/etc/passwd"):
        # what the attacker sends for the eval-prompts box (now an upload widget): a server path
        _refused(train.start, ctx, _form(TI, photos, eval_prompts=target), match="not an uploaded file")
        # and the service itself refuses a path typed as a value
        _refused(studio.submit_training, TI, {"class_word": "cat", "eval_prompts": target}, photos,
                 match="eval_prompts is uploaded as a file, not typed")
    assert studio.jobs.list() == []
    _never_opened(opened, secret, "/etc/shadow")


@pytest.mark.parametrize("method", list(trainer_registry()))
def test_every_path_field_of_every_train_form_refuses_a_server_path(method, ctx, studio, photos, secret, opened):
    fields = {f.name: f for f in train.method_forms(ctx)[method]}
    declared = {name: f.path for name, f in fields.items() if f.path}
    assert declared, method
    for name, kind in declared.items():
        if kind in ("file", "folder"):
            assert fields[name].widget == ("file" if kind == "file" else "files")
            value: object = str(secret) if kind == "file" else [str(secret)]
            _refused(train.start, ctx, _form(method, photos, **{name: value}), match="not an uploaded file")
            _refused(studio.submit_training, method, {"class_word": "cat", name: str(secret)}, photos,
                     match=f"{name} is uploaded as a file, not typed")
        else:  # a model: a text box, checked
            assert fields[name].widget == "text"
            for target in (str(secret), str(secret.parent), "/etc/passwd", "~/.ssh/id_rsa", "../../etc/passwd",
                           "owner/../../etc/passwd"):
                message = _refused(train.start, ctx, _form(method, photos, **{name: target}), match="not accepted here")
                assert "operator" in message  # says how a local path can be allowed
    assert studio.jobs.list() == []
    _never_opened(opened, secret)


@pytest.mark.parametrize("method", list(trainer_registry()))
def test_model_fields_take_hub_ids_and_named_values(method, ctx, studio, photos):
    fields = {f.name: f for f in train.method_forms(ctx)[method]}
    models = {name: HUB_VALUES[name] for name, f in fields.items() if f.path == "model"}
    job_id, _ = train.start(ctx, _form(method, photos, **models))
    job = studio.jobs.get(job_id)
    assert {k: job.config[k] for k in models} == models  # queued as given (nothing was read to decide)
    # each field's named values (oracle, the adapter presets, new) are accepted as they are
    declared = path_fields(trainer_registry()[method].config_cls)
    assert declared["eval_model"][1] == ("oracle",)
    for name in models:
        for named in declared[name][1]:
            assert studio.check_request_model(named, label=name, names=declared[name][1]) == named


def test_every_text_box_of_the_train_forms_is_declared_or_plain_text(ctx):
    seen: dict[str, str] = {}
    for method, fields in train.method_forms(ctx).items():
        for f in fields:
            if f.path:
                seen[f.name] = f.path
            elif f.widget in ("text", "list", "file", "files"):
                assert f.name in PLAIN_TEXT, f"{method}.{f.name}: a new text field — declare path= or list it here"
    assert seen == DECLARED
    adapter = path_fields(trainer_registry()["adapter"].config_cls)["adapter"]
    assert adapter[0] == "model" and {"new", "sd15", "sdxl"} <= set(adapter[1])


# ----------------------------------------------------------------------------------------------
# Uploads still work
# ----------------------------------------------------------------------------------------------


def test_an_uploaded_eval_prompts_file_is_copied_into_the_job_and_used(ctx, studio, photos, uploads, clip_dir,
                                                                        tiny_bases):
    prompts = uploads / "c3d4" / "held-out.txt"
    prompts.parent.mkdir()
    prompts.write_text("UPLOADED-PROMPT {} on the moon\n", encoding="utf-8")
    studio.allowed_paths = (clip_dir.resolve(),)  # the operator's --allow-path: the CLIP judge's folder
    form = _form(TI, photos, eval_prompts=str(prompts), eval_model=str(clip_dir), eval_every=2, eval_images=1,
                 eval_steps=1, name="moon")
    job_id, _ = train.start(ctx, form)
    job = studio.jobs.get(job_id)
    rel = job.inputs["eval_prompts"]
    assert rel.startswith("files/eval_prompts-") and (job.folder / rel).read_text().startswith("UPLOADED-PROMPT")
    assert job.config["eval_model"] == str(clip_dir)
    prompts.unlink()  # the job has its own copy
    Worker(studio.jobs, load_base=lambda settings, device: tiny_bases(settings["base"])).run(once=True)
    assert studio.jobs.get(job_id).state == "done", studio.jobs.get(job_id).error
    curve = studio.library.info("moon").metrics["curve"]
    assert any(p.startswith("UPLOADED-PROMPT") and p.endswith("on the moon") for p in curve["prompts"])


def test_an_uploaded_class_image_folder_is_staged(ctx, studio, photos, uploads):
    extra = write_photos(uploads / "e5f6", n=2, name="class {i}.png")
    job_id, _ = train.start(ctx, _form("dreambooth", photos, class_images=[str(p) for p in extra]))
    job = studio.jobs.get(job_id)
    assert sorted(p.name for p in (job.folder / job.inputs["class_images"]).iterdir()) == ["class 0.png",
                                                                                         "class 1.png"]
    with pytest.raises(StudioError, match="eval_prompts is one uploaded file"):
        studio.submit_training(TI, {"class_word": "cat"}, photos, files={"eval_prompts": [photos[0], photos[1]]})
    with pytest.raises(StudioError, match="steps is a setting, not an uploaded file"):
        studio.submit_training(TI, {"class_word": "cat"}, photos, files={"steps": [photos[0]]})


def test_uploads_are_taken_from_gradios_upload_folder_and_the_apps_results(studio, tmp_path, secret):
    from gradio.utils import get_upload_folder

    ctx = UIContext.create(studio, out_dir=tmp_path / "out")  # as build_app creates it
    assert Path(get_upload_folder()).resolve() in ctx.upload_roots and ctx.out_dir.resolve() in ctx.upload_roots
    cached = Path(get_upload_folder()) / "0123abcd" / "photo.png"
    assert ctx.uploaded([str(cached)]) == [str(cached)]  # decided from the path: nothing is opened
    result = ctx.out_dir / "export-1" / "kit.safetensors"
    assert ctx.uploaded({"path": str(result)}) == [str(result)]
    for outside in (str(secret), "/etc/passwd", str(Path(get_upload_folder()) / ".." / "elsewhere.txt")):
        _refused(ctx.uploaded, [outside], match="not an uploaded file")


def test_the_operators_own_code_may_still_name_server_paths(studio, photos, tmp_path):
    own = tmp_path / "mine.txt"
    own.write_text("a photo of {}\n", encoding="utf-8")
    job = studio.submit_training(TI, {"class_word": "cat", "eval_prompts": str(own)}, photos, trusted=True)
    assert (job.folder / job.inputs["eval_prompts"]).read_text() == "a photo of {}\n"


# ----------------------------------------------------------------------------------------------
# The Base box (Medium 3)
# ----------------------------------------------------------------------------------------------


def test_the_base_box_refuses_server_files_without_reading_them(ctx, studio, secret, opened):
    before = studio.base
    messages = {}
    for target in ("/etc/passwd", str(secret), str(secret.parent), "~/.bashrc", "../../../etc/passwd",
                   "/nonexistent/model-folder", "stable-diffusion-v1-5/../../etc/passwd"):
        messages[target] = _refused(switch_base, ctx, {"base": target, "device": "cpu"}, match="not accepted here")
        assert "bytes" not in messages[target] and "3475222254926655346" not in messages[target]
    # an existing file and a missing one get the same answer: the refusal does not say which exists
    assert (messages["/etc/passwd"].replace("/etc/passwd", "X")
            == messages["/nonexistent/model-folder"].replace("/nonexistent/model-folder", "X"))
    assert studio.base is before and studio.settings.base == "tiny"
    _never_opened(opened, "/etc/passwd", secret)


def test_the_base_box_takes_hub_ids_named_bases_and_allowed_paths(ctx, studio, tmp_path, monkeypatch, tiny_bases):
    import studio.models.settings as settings_module

    loaded: list[str] = []

    def fake_load(spec, **kw):
        loaded.append(spec)
        return tiny_bases("tiny")

    monkeypatch.setattr(settings_module, "load_base", fake_load)
    switch_base(ctx, {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5", "device": "cpu"})
    switch_base(ctx, {"base": "tiny", "device": "cpu"})
    allowed = tmp_path / "models"
    (allowed / "sd").mkdir(parents=True)
    _refused(switch_base, ctx, {"base": str(allowed / "sd"), "device": "cpu"}, match="not accepted here")
    studio.allowed_paths = (allowed.resolve(),)
    switch_base(ctx, {"base": str(allowed / "sd"), "device": "cpu"})
    assert loaded == ["stable-diffusion-v1-5/stable-diffusion-v1-5", "tiny", str(allowed / "sd")]
    # a symlink inside the allowed folder that leads out of it is refused
    (allowed / "escape").symlink_to("/etc")
    _refused(switch_base, ctx, {"base": str(allowed / "escape" / "passwd"), "device": "cpu"}, match="not accepted")
    _refused(switch_base, ctx, {"base": str(allowed / ".." / "elsewhere"), "device": "cpu"}, match="not accepted")


def test_a_checkpoint_that_is_not_one_is_refused_without_quoting_its_bytes(tmp_path):
    from studio.models.single_file import read_safetensors_header

    fake = tmp_path / "passwd.safetensors"
    fake.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 3)
    with pytest.raises(StudioError) as err:
        read_safetensors_header(fake)
    message = str(err.value)
    assert str(int.from_bytes(b"root:x:0", "little")) not in message and "root" not in message
    assert str(fake.stat().st_size) not in message and "not a .safetensors file" in message


def test_hub_shapes_and_allowed_paths(tmp_path, monkeypatch):
    from studio.models import TINY_NAMES
    from studio.request_paths import NAMED_BASES

    assert set(NAMED_BASES) == {"demo", "demo-scene", *TINY_NAMES}  # every base load_base knows by name
    assert path_fields(BaseSettings)["base"] == ("model", NAMED_BASES)
    assert is_hub_ref("owner/name") and is_hub_ref("h94/IP-Adapter/models/x.safetensors")
    assert not is_hub_ref("owner/name/x", max_parts=2)
    for bad in ("/etc/passwd", "~/x/y", "./a/b", "a/../b", "owner/..", "a\\b/c", "a", ".hidden/x"):
        assert not is_hub_ref(bad), bad
    # a hub-shaped name that is also a local path (the loaders would read it) is a path: refused
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    with pytest.raises(StudioError, match="not accepted here"):
        check_model("owner/name", label="clip model", allowed=())
    with pytest.raises(StudioError, match="not accepted here"):
        check_base("owner/name", allowed=())
    assert check_model("owner/other", label="clip model", allowed=()) == "owner/other"
    assert check_model("owner/name", label="clip model", allowed=(tmp_path.resolve(),)) == str(tmp_path / "owner/name")


# ----------------------------------------------------------------------------------------------
# The other tabs
# ----------------------------------------------------------------------------------------------


def test_generate_and_zero_shot_tabs_name_no_server_path(ctx, studio, photos, secret, tiny, opened):
    studio.library.add(make_ti(tiny, "<kit>", 0), "kit")
    ref = [str(photos[0])]
    base = {"prompt": "a <kit>", "steps": 1}
    _refused(generate.build_config, ctx, base | {"concepts": [str(secret)]}, match="No concept named")
    _refused(generate.build_config, ctx, base | {"reference": [str(secret)]}, match="not an uploaded file")
    _refused(generate.build_config, ctx, base | {"reference": ref, "adapter": str(secret)}, match="not accepted here")
    _refused(generate.make_grid, ctx, base | {"concepts": ["kit"], "grid_concept": str(secret), "x_kind": "strength",
                                              "x_values": "0, 1", "y_kind": "none"}, match="No concept named")
    cfg = generate.build_config(ctx, base | {"concepts": ["kit"], "reference": ref, "adapter": "sd15"})
    assert cfg.concepts[0].source == "kit" and cfg.adapter == "sd15"
    hub = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
    assert generate.build_config(ctx, base | {"reference": ref, "adapter": hub}).adapter == hub
    form = {"references": ref, "prompt": "a cat", "steps": 1, "name": "z", "adapter": str(secret)}
    _refused(lambda: next(zeroshot.generate(ctx, form)), match="not accepted here")
    _refused(zeroshot.save, ctx, form, match="not accepted here")
    _refused(zeroshot.save, ctx, form | {"references": [str(secret)]}, match="not an uploaded file")
    _never_opened(opened, secret)


def test_evaluate_and_concepts_tabs_name_no_server_path(ctx, studio, photos, secret, tiny, opened):
    studio.library.add(make_ti(tiny, "<kit>", 0), "kit")
    form = {"concepts": ["kit"], "protocol": evaluate.CUSTOM, "prompts": "a photo of {}", "seeds": 1, "steps": 1}
    _refused(evaluate.evaluate, ctx, form | {"concepts": [str(secret)]}, match="No concept named")
    _refused(evaluate.sweep, ctx, form | {"concepts": [str(secret)], "strengths": "0, 1"}, match="No concept named")
    _refused(evaluate.options, ctx, form | {"clip_model": str(secret)}, ctx.out_dir, None, match="not accepted here")
    _refused(evaluate.evaluate, ctx, form | {"references": [str(secret)]}, match="not an uploaded file")
    assert evaluate.options(ctx, form | {"clip_model": "openai/clip-vit-large-patch14"}, ctx.out_dir,
                            None)["clip_model"] == "openai/clip-vit-large-patch14"
    _refused(concepts.import_concept, ctx, {"file": str(secret), "import_name": "stolen"}, match="not an uploaded file")
    assert studio.library.names() == ["kit"]
    _never_opened(opened, secret)


def test_a_library_name_wins_over_a_same_named_file_in_the_working_directory(studio, tiny, tmp_path, monkeypatch):
    studio.library.add(make_ti(tiny, "<kit>", 0), "kit")
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "kit").write_text(SECRET)
    monkeypatch.chdir(work)
    assert studio.library.resolve("kit") == studio.library.path("kit")
    assert studio.check_request_concept("kit") == "kit"


# ----------------------------------------------------------------------------------------------
# The app: --allow-path
# ----------------------------------------------------------------------------------------------


def test_the_app_allows_only_the_folders_the_operator_names(tmp_path, monkeypatch, tiny_bases):
    import app
    import studio.models.settings as settings_module

    monkeypatch.setattr(settings_module, "load_base", lambda spec, **kw: tiny_bases("tiny"))
    monkeypatch.delenv("STUDIO_ALLOW_PATHS", raising=False)
    assert app.parse_args([]).allow_paths is None
    assert app.parse_args(["--allow-path", "a", "--allow-path", "b"]).allow_paths == ["a", "b"]
    studio, _ = app.make_studio("tiny", str(tmp_path / "lib"))
    assert studio.allowed_paths == ()  # none by default
    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.setenv("STUDIO_ALLOW_PATHS", f"{one}{os.pathsep}{two}")
    studio, _ = app.make_studio("tiny", str(tmp_path / "lib"))
    assert studio.allowed_paths == (one.resolve(), two.resolve())
    # the operator's own --base is allowed too: exactly that file, not its folder
    checkpoint = tmp_path / "models" / "mine.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"")
    studio, _ = app.make_studio(str(checkpoint), str(tmp_path / "lib"), allow_paths=[str(one)])
    assert studio.allowed_paths == (one.resolve(), checkpoint.resolve())
    assert studio.check_request_base(str(checkpoint)) == str(checkpoint)
    with pytest.raises(StudioError, match="not accepted here"):
        studio.check_request_base(str(checkpoint.parent / "other.safetensors"))
