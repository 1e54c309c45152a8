"""One source of evaluation options: the ``evaluate`` CLI, the Evaluate tab and the Python API end up
with the same :class:`~studio.evaluation.EvaluateConfig`, field by field; ``None`` ("the base's") is
decided by the base's profile, never by its name."""

from __future__ import annotations

import dataclasses

import pytest

from studio.cli import build_parser
from studio.configs import field_specs, from_namespace
from studio.errors import StudioError
from studio.evaluation import PROTOCOLS, EvaluateConfig
from studio.models.profile import GENERIC, BaseProfile
from studio.ui import evaluate as tab


def _cli(*flags: str) -> EvaluateConfig:
    ns = build_parser().parse_args(["evaluate", "--concept", "x", "--out", "o", *flags])
    return from_namespace(EvaluateConfig, ns)


def test_cli_ui_and_python_defaults_agree_field_by_field():
    api = EvaluateConfig()
    cli = _cli()
    ui = tab.form_config(tab.defaults())
    for f in dataclasses.fields(EvaluateConfig):
        if f.name == "out_dir":  # the CLI requires --out; Python and the tab choose their own folder
            assert cli.out_dir == "o" and api.out_dir is None
            continue
        assert getattr(cli, f.name) == getattr(api, f.name), f.name
        assert getattr(ui, f.name) == getattr(api, f.name), f.name
    # an untouched tab passes nothing but where the files go
    assert tab.options(None, tab.defaults(), "out", None) == {"out_dir": "out"}


def test_the_tab_offers_the_configs_choices():
    specs = {s.name: s for s in field_specs(EvaluateConfig)}
    assert tab.protocols() == [tab.BASE_DEFAULT, *specs["protocol"].choices, tab.CUSTOM]
    assert tuple(specs["protocol"].choices) == PROTOCOLS

    class Caps:
        def __init__(self, world: bool) -> None:
            self.studio = self
            self.world = world

        def capabilities(self):
            return {"demo_world": self.world}

    assert tab.scorers(Caps(True)) == [tab.BASE_DEFAULT, "clip", "oracle"]
    assert tab.scorers(Caps(False)) == [tab.BASE_DEFAULT, "clip"]


def test_every_existing_cli_flag_fills_its_field():
    cfg = _cli("--prompts", "p.txt", "--seeds", "2", "--seed", "3", "--steps", "4", "--guidance", "5.5",
               "--batch-size", "6", "--scorer", "oracle", "--clip-model", "m", "--dino-model", "d",
               "--detector-model", "haar", "--clip-t-text", "keep", "--fidelity", "dino", "--sweep", "0,1",
               "--no-write", "--no-save-images", "--store-refs")
    assert cfg == EvaluateConfig(prompts="p.txt", seeds=2, seed=3, steps=4, guidance=5.5, batch_size=6,
                                 scorer="oracle", clip_model="m", dino_model="d", detector="haar", text_mode="keep",
                                 fidelity="dino", sweep="0,1", write_back=False, save_images=False, store_refs=True,
                                 out_dir="o")
    assert cfg.strengths() == [0.0, 1.0]
    assert _cli("--protocol", "world").protocol == "world"
    with pytest.raises(StudioError, match="prompts or a protocol"):
        _cli("--prompts", "p.txt", "--protocol", "world")
    with pytest.raises(StudioError, match="comma-separated"):
        _cli("--sweep", "0,x")


def test_none_means_the_bases_profile():
    world = BaseProfile(kind="world", steps=20, guidance=4.0, protocol="world", judge="oracle")
    cfg = EvaluateConfig()
    assert cfg.for_base(world) == EvaluateConfig(protocol="world", steps=20, guidance=4.0, scorer="oracle")
    resolved = cfg.for_base(GENERIC)
    assert (resolved.protocol, resolved.scorer, resolved.steps, resolved.guidance) == ("dreambench", "clip", 30, 7.5)
    # several concepts: the shared multi-concept prompts and CLIP (the oracle knows one concept)
    several = cfg.for_base(world, concepts=2)
    assert (several.protocol, several.scorer) == (None, "clip")
    # what the user set wins over the base's
    mine = EvaluateConfig(protocol="dreambench-live", scorer="clip", steps=3, guidance=0.0).for_base(world)
    assert (mine.protocol, mine.scorer, mine.steps, mine.guidance) == ("dreambench-live", "clip", 3, 0.0)
    assert EvaluateConfig(prompts=["a {}"]).for_base(world).protocol is None
