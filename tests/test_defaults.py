"""One source for every setting: the CLI, the UI and the Python API end up with the same defaults,
field by field, for every command and every training method, on a generic base and on the demo
world (whose profile opens every trainer on its own defaults, as on any base)."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest

from studio.cli import build_parser
from studio.configs import field_specs, from_namespace
from studio.generation import GenerateConfig
from studio.models import BaseSettings
from studio.models.profile import GENERIC, profile_for_spec, world_profile
from studio.service import Studio
from studio.ui import generate as ui_generate
from studio.ui import train as ui_train
from studio.ui.common import UIContext
from trainers import trainer_registry
from trainers.runner import config_from_cli

# What every trainer needs from the user (no default can stand in for them).
REQUIRED = {"class_word": "dog", "images": "photos"}
REQUIRED_BY_TRAINER = {"adapter": {"adapter": "new", "image_encoder": "enc"}}


def _required(cli_name: str) -> dict[str, Any]:
    return REQUIRED | REQUIRED_BY_TRAINER.get(cli_name, {})


def _flags(values: dict[str, Any]) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _ui_values(base: str, tmp_path, cli_name: str) -> dict[str, Any]:
    studio = Studio(BaseSettings(base=base), library=tmp_path / "lib")  # the base is never loaded here
    ctx = UIContext.create(studio, out_dir=tmp_path / "out")
    preset = ui_train.default_preset(ctx, cli_name)
    return ui_train.preset_values(ctx, cli_name, preset)


@pytest.mark.parametrize("base", ["tiny", "demo"])
@pytest.mark.parametrize("cli_name", list(trainer_registry()))
def test_train_defaults_agree_in_cli_jobs_ui_and_python(cli_name, base, tmp_path):
    entry = trainer_registry()[cli_name]
    settings = BaseSettings(base=base)
    profile = settings.profile()
    # The CLI: `python -m studio train METHOD --base B` with only the required flags.
    ns = build_parser().parse_args(["train", cli_name, "--base", base, *_flags(_required(cli_name))])
    cli = config_from_cli(entry, ns, from_namespace(BaseSettings, ns))
    # The queue: `python -m studio jobs submit METHOD …` takes the same flags and the same path.
    ns_job = build_parser().parse_args(["jobs", "submit", cli_name, "--base", base, *_flags(_required(cli_name))])
    job = config_from_cli(entry, ns_job, from_namespace(BaseSettings, ns_job))
    # Python: the one resolve, told the base's profile; and the dataclass alone on a generic base.
    python = entry.resolve(profile=profile, **_required(cli_name))
    assert dataclasses.asdict(cli) == dataclasses.asdict(python) == dataclasses.asdict(job)
    if profile.kind != "world":
        assert dataclasses.asdict(entry.config_cls(**_required(cli_name))) == dataclasses.asdict(python)
    # The UI: the form's values for every field it shows, and the config a job built from them gets
    # (a None the form shows is one the config derives, e.g. DreamBooth's steps from --full).
    ui = _ui_values(base, tmp_path, cli_name)
    from_ui = entry.config_cls(**(ui | _required(cli_name)))
    for name, value in ui.items():
        if name in _required(cli_name):
            continue
        assert value == getattr(python, name) or (value is None and entry.config_cls.__dataclass_fields__[name]
                                                  .default is None), \
            f"{cli_name} on {base}: the UI says {name}={value!r}, Python {getattr(python, name)!r}"
    assert dataclasses.asdict(from_ui) == dataclasses.asdict(python)


def test_the_demo_world_opens_trainers_on_their_defaults():
    """No hand-tuned preset on the demo base: the defaults adapt by measurement (issue 16); a profile
    can still name presets (the mechanism stays), and an explicit choice wins."""
    profile = profile_for_spec("demo")
    assert profile.kind == "world" and profile == world_profile() and not profile.presets
    for entry in trainer_registry().values():
        assert entry.preset_name(None, profile) == entry.preset_name(None, GENERIC) == entry.default_preset
        assert entry.preset_name("", profile) == ""  # an explicit "no preset"
    named = dataclasses.replace(profile, presets=MappingProxyType({"textual-inversion": "demo-world"}))
    assert trainer_registry()["textual-inversion"].preset_name(None, named) == "demo-world"


@pytest.mark.parametrize("base", ["tiny", "demo"])
def test_generate_defaults_agree_in_cli_ui_and_python(base, tmp_path):
    ns = build_parser().parse_args(["generate", "--base", base, "--prompt", "a cat", "--out", "x.png"])
    cli = from_namespace(GenerateConfig, ns)
    python = GenerateConfig(prompt="a cat")
    assert dataclasses.asdict(cli) == dataclasses.asdict(python)
    profile = BaseSettings(base=base).profile()
    studio = Studio(BaseSettings(base=base), library=tmp_path / "lib")
    ctx = UIContext.create(studio, out_dir=tmp_path / "out")
    resolved = python.resolved(profile)
    assert ui_generate.sampling_defaults(ctx) == {"steps": resolved.steps, "guidance": resolved.guidance}
    ui = ui_generate.build_config(ctx, {"prompt": "a cat"})
    for spec in field_specs(GenerateConfig):
        assert getattr(ui, spec.name) == getattr(resolved, spec.name), spec.name


def test_base_settings_defaults_agree_in_cli_and_python():
    for argv in (["generate", "--prompt", "x", "--out", "x.png"], ["train", "textual-inversion"],
                 ["jobs", "submit", "neti"]):
        ns = build_parser().parse_args(argv)
        assert from_namespace(BaseSettings, ns) == BaseSettings()


def test_train_offload_reaches_load_base(monkeypatch, tmp_path):
    """``train --offload`` used to be dropped on the way to ``load_base``."""
    import studio.models.settings as settings_module
    from studio.cli import main

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_load_base(spec: str, **kwargs: Any) -> Any:
        seen.update(kwargs, spec=spec)
        raise Stop

    monkeypatch.setattr(settings_module, "load_base", fake_load_base)
    with pytest.raises(Stop):
        main(["train", "textual-inversion", "--base", "tiny", "--offload", "--device", "cpu", "--images",
              str(tmp_path), "--class-word", "dog", "--out", str(tmp_path / "c.safetensors")])
    assert seen["spec"] == "tiny" and seen["offload"] is True and seen["device"] == "cpu"
