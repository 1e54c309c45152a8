"""Interop fixes found by running ComfyUI's, A1111's and kohya's own loaders on studio files.

1-2. old A1111 ``.pt`` embeddings (``string_to_param`` a ``torch.nn.ParameterDict``) import; other
     classes are still refused, in one clean actionable line;
3.   ``concepts export --help`` (and the README) list every export format;
4-5. the PNG ``parameters`` text names samplers and the model hash as A1111 does;
6.   an SDXL LoRA on modules A1111 drops is announced in the training log;
7.   Perfusion / NeTI files carry a marker that makes other tools' embedding loaders skip them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from studio.concept import GUARD_TENSOR, write_concept
from studio.errors import ConceptFormatError, StudioError
from studio.generation import (
    SCHEDULERS,
    GenerateConfig,
    a1111_sampler,
    generate,
    model_hash,
    parameters_text,
    png_info,
)
from studio.methods import get_method, import_concept, load_concept, save_concept
from studio.methods.interop import PICKLE_CLASSES, export_formats_by_method
from studio.methods.lora.keys import a1111_dropped
from studio.models.keys import file_sha256
from tests.method_cases import make_lora, make_neti, make_perfusion, make_ti

README = Path(__file__).resolve().parents[1] / "README.md"


def _a1111_embedding(vec: torch.Tensor, name: str = "old-emb") -> dict:
    """What A1111's first versions saved (modules/textual_inversion/textual_inversion.py, Embedding.save):
    the vectors inside a ParameterDict."""
    return {"string_to_token": {"*": 265},
            "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)}),
            "name": name, "step": 1500, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}


def _one_clean_line(msg: str) -> None:
    assert msg and "\n" not in msg and "\r" not in msg and "\x1b" not in msg and "[1m" not in msg, msg
    assert msg.isprintable() and msg.endswith("."), msg


# -- 1. old A1111 .pt embeddings -----------------------------------------------------------------------
def test_old_a1111_pt_with_a_parameter_dict_imports(tmp_path):
    vec = torch.randn(3, 768)
    torch.save(_a1111_embedding(vec), tmp_path / "old.pt")
    concept = import_concept(tmp_path / "old.pt")
    assert concept.method == "textual_inversion" and concept.tokens == ["<old-emb>"]
    torch.testing.assert_close(concept.tensors["emb_params"], vec)
    assert concept.base.get("family") == "sd1"
    # The allow-list was for that call only: torch's is without it again, and a plain weights-only load
    # of the same file is still refused.
    assert torch.nn.ParameterDict not in torch.serialization.get_safe_globals()
    with pytest.raises(Exception, match="ParameterDict"):
        torch.load(tmp_path / "old.pt", weights_only=True)


def test_the_allow_list_is_exactly_the_parameter_dict():
    assert PICKLE_CLASSES == (torch.nn.ParameterDict,)


def test_a_user_allow_list_is_left_as_found(tmp_path):
    torch.save(_a1111_embedding(torch.randn(1, 768)), tmp_path / "old.pt")
    with torch.serialization.safe_globals([torch.nn.ParameterDict]):
        import_concept(tmp_path / "old.pt")
        assert torch.nn.ParameterDict in torch.serialization.get_safe_globals()  # not removed under the user
    assert torch.nn.ParameterDict not in torch.serialization.get_safe_globals()


@pytest.mark.parametrize("payload,needs", [
    ({"string_to_param": {"*": torch.nn.Linear(2, 2)}}, "torch.nn.modules.linear.Linear"),
    ({"string_to_param": torch.nn.ParameterList([torch.nn.Parameter(torch.ones(1, 768))])},
     "torch.nn.modules.container.ParameterList"),
])
def test_other_classes_are_still_refused_in_one_line(tmp_path, payload, needs):
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(StudioError) as err:
        import_concept(tmp_path / "bad.pt")
    msg = str(err.value)
    _one_clean_line(msg)
    assert "bad.pt" in msg and repr(needs) in msg and "weights-only" in msg and ".safetensors" in msg


def test_code_in_a_pickle_is_refused_and_not_run(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(StudioError) as err:
        import_concept(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out
    _one_clean_line(str(err.value))
    assert "'print'" in str(err.value)


def test_a_parameter_dict_with_a_non_tensor_state_is_refused(tmp_path):
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(1, 768))})
    vars(params)["_parameters"] = {"*": "not a tensor"}  # what a hand-made pickle could set
    torch.save({"string_to_param": params, "name": "x"}, tmp_path / "odd.pt")
    with pytest.raises(ConceptFormatError) as err:
        import_concept(tmp_path / "odd.pt")
    _one_clean_line(str(err.value))
    assert "ParameterDict" in str(err.value)


# -- 2. the refusal message ------------------------------------------------------------------------------
class Opaque:
    """A plain object in a pickle (module level, so it pickles)."""
def test_refusals_are_complete_lines_without_terminal_codes(tmp_path):
    """torch's weights-only error is many lines with ANSI bold codes; the studio's is one line that names
    the refused global and says what to do."""
    torch.save({"a": Opaque()}, tmp_path / "obj.pt")
    with pytest.raises(StudioError) as err:
        import_concept(tmp_path / "obj.pt")
    msg = str(err.value)
    _one_clean_line(msg)
    assert "'tests.test_interop_fixes.Opaque'" in msg and "convert the file to .safetensors" in msg
    assert len(msg) < 400

    (tmp_path / "junk.pt").write_bytes(b"\x80\x02" + b"garbage" * 20)
    with pytest.raises(StudioError) as err:
        import_concept(tmp_path / "junk.pt")
    msg = str(err.value)
    _one_clean_line(msg)
    assert "junk.pt" in msg and "Unsupported operand" in msg and ".safetensors" in msg


# -- 3. export formats in the help and the README --------------------------------------------------------
def test_export_help_lists_every_format_and_method(capsys):
    from studio.cli import main

    with pytest.raises(SystemExit) as done:
        main(["concepts", "export", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    by_method = export_formats_by_method()
    from studio.methods import method_names

    assert set(by_method) == set(method_names())
    for method, formats in by_method.items():
        for fmt in formats:
            assert fmt in text, fmt
        for fmt in formats[1:]:
            assert re.search(rf"{fmt} \([^)]*{method}", text), (fmt, method)
    assert {"studio", "a1111", "diffusers", "kohya"} <= {f for fs in by_method.values() for f in fs}


def test_readme_lists_every_export_format():
    text = README.read_text(encoding="utf-8")
    for fmt in {f for fs in export_formats_by_method().values() for f in fs}:
        assert f"| `{fmt}`" in text, fmt


# -- 4-5. the PNG parameters as A1111 writes them --------------------------------------------------------
_FIELD = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _settings(parameters: str) -> dict[str, str]:
    """The settings line read the way A1111's infotext parser reads it (name: value, comma separated,
    JSON-quoted values may hold commas)."""
    last = parameters.strip().split("\n")[-1]
    out = {}
    for name, value in _FIELD.findall(last):
        out[name.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return out


@pytest.mark.parametrize("cls,config,want", [
    ("DPMSolverMultistepScheduler", {}, ("DPM++ 2M", None)),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, ("DPM++ 2M", "Karras")),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, ("DPM++ 2M SDE", None)),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
     ("DPM++ 2M SDE Heun", None)),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, ("DPM++ 3M SDE", None)),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, (None, None)),
    ("EulerDiscreteScheduler", {}, ("Euler", None)),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, ("Euler", "Karras")),
    ("EulerAncestralDiscreteScheduler", {}, ("Euler a", None)),
    ("DDIMScheduler", {}, ("DDIM", None)),
    ("PNDMScheduler", {}, ("PLMS", None)),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, ("LMS", "Karras")),
    ("HeunDiscreteScheduler", {}, ("Heun", None)),
    ("KDPM2DiscreteScheduler", {}, ("DPM2", None)),
    ("KDPM2AncestralDiscreteScheduler", {}, ("DPM2 a", None)),
    ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, ("DPM++ SDE", "Karras")),
    ("UniPCMultistepScheduler", {}, ("UniPC", None)),
    ("LCMScheduler", {}, ("LCM", None)),
    ("DDPMScheduler", {}, (None, None)),  # no A1111 equivalent: no field rather than A1111's default
    ("FlowMatchEulerDiscreteScheduler", {}, ("Euler", None)),  # SD 3 / FLUX: Forge writes "Euler"
    ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, ("Euler", "Karras")),
])
def test_a1111_sampler_names(cls, config, want):
    assert a1111_sampler(cls, config) == want


@pytest.mark.parametrize("scheduler,sampler,schedule", [
    ("default", "DDIM", None),  # the tiny base's own scheduler
    ("dpmpp_2m_karras", "DPM++ 2M", "Karras"),
    ("euler_a", "Euler a", None),
    ("dpmpp_2m", "DPM++ 2M", None),
])
def test_png_parameters_use_a1111_names_and_round_trip(tiny, tmp_path, scheduler, sampler, schedule):
    cfg = GenerateConfig(prompt="a photo of a cat", negative_prompt="blurry", seed=7, steps=2, scheduler=scheduler)
    image = generate(tiny, cfg)[0]
    path = tmp_path / "out.png"
    image.save(path, pnginfo=png_info(image))
    with Image.open(path) as png:
        text = dict(png.text)
    lines = text["parameters"].split("\n")
    assert lines[:2] == ["a photo of a cat", "Negative prompt: blurry"]
    fields = _settings(text["parameters"])
    assert fields.get("Sampler") == sampler and fields.get("Schedule type") == schedule
    assert fields["Steps"] == "2" and fields["Seed"] == "7" and fields["CFG scale"] == "7.5"
    assert fields["Size"] == f"{tiny.native_size}x{tiny.native_size}" and fields["Model"] == "tiny"
    assert "Model hash" not in fields  # a built-in base has no checkpoint file, so no hash A1111 could match
    assert list(fields)[:2] == ["Steps", "Sampler"]
    # The studio's own record of the request still reads back whole.
    record = json.loads(text["studio"])
    assert record["seed"] == 7 and record["scheduler"] == scheduler and record["base"] == "tiny"


def test_every_scheduler_choice_has_an_a1111_name(tiny):
    for name, (cls, extra) in SCHEDULERS.items():
        sampler, _ = a1111_sampler(cls, {**tiny.pipe.scheduler.config, **extra})
        assert sampler, name


def _file_base(path: Path, name: str = "my-model"):
    """What parameters_text reads of a base loaded from one checkpoint file (studio.models.load_base)."""
    from diffusers import EulerDiscreteScheduler

    return SimpleNamespace(spec=str(path), name=name, identity="file:0123456789abcdef", extra={},
                           pipe=SimpleNamespace(scheduler=EulerDiscreteScheduler(use_karras_sigmas=True)))


def test_model_hash_is_a1111s_short_sha256_of_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HASH_CACHE", str(tmp_path / "cache" / "hashes.json"))
    ckpt = tmp_path / "my,model.safetensors"
    ckpt.write_bytes(b"checkpoint bytes " * 1000)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    base = _file_base(ckpt, name="my,model")
    text = parameters_text(GenerateConfig(prompt="x", steps=3, guidance=5.0), seed=1, base=base, width=64,
                           height=64, resolved=[])
    fields = _settings(text)
    assert fields["Model hash"] == sha[:10] and re.fullmatch(r"[0-9a-f]{10}", fields["Model hash"])
    assert fields["Model"] == "my,model"  # quoted in the text, as A1111 quotes a value with a comma
    assert fields["Sampler"] == "Euler" and fields["Schedule type"] == "Karras"
    assert list(fields) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model"]
    assert base.extra["sha256"] == sha  # remembered on the base …
    cached = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert cached[str(ckpt.resolve())]["sha256"] == sha  # … and on disk


def test_a_generation_on_a_single_file_base_writes_its_hash(tiny, tmp_path, monkeypatch):
    """The tiny pipeline described as load_base describes a base loaded from a checkpoint file."""
    from studio.models import describe
    from studio.models.keys import fingerprint_files

    monkeypatch.setenv("STUDIO_HASH_CACHE", str(tmp_path / "hashes.json"))
    ckpt = tmp_path / "tiny-ckpt.safetensors"
    ckpt.write_bytes(b"weights" * 4096)
    base = describe(tiny.pipe, spec=str(ckpt), name=ckpt.stem, identity=f"file:{fingerprint_files(ckpt)}")
    image = generate(base, GenerateConfig(prompt="a cat", steps=2, seed=4))[0]
    fields = _settings(image.info["parameters"])
    assert fields["Model hash"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    assert fields["Model"] == "tiny-ckpt" and fields["Sampler"] == "DDIM"


def test_the_hash_cache_is_keyed_by_size_and_time(tmp_path):
    cache = tmp_path / "hashes.json"
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"a" * 100)
    assert file_sha256(ckpt, cache=cache) == hashlib.sha256(b"a" * 100).hexdigest()
    entries = json.loads(cache.read_text())
    entries[str(ckpt.resolve())]["sha256"] = "f" * 64  # a remembered digest is used as is …
    cache.write_text(json.dumps(entries))
    assert file_sha256(ckpt, cache=cache) == "f" * 64
    ckpt.write_bytes(b"b" * 101)  # … until the file changes
    assert file_sha256(ckpt, cache=cache) == hashlib.sha256(b"b" * 101).hexdigest()
    cache.write_text("{not json")  # a damaged cache costs a re-hash, never an error
    assert file_sha256(ckpt, cache=cache) == hashlib.sha256(b"b" * 101).hexdigest()


def test_no_model_hash_without_a_checkpoint_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HASH_CACHE", str(tmp_path / "hashes.json"))
    gone = _file_base(tmp_path / "moved-away.safetensors")
    assert model_hash(gone) is None
    folder = _file_base(tmp_path)
    folder.identity = "folder:0123"
    assert model_hash(folder) is None
    assert not (tmp_path / "hashes.json").exists()


# -- 6. SDXL LoRA modules A1111 drops --------------------------------------------------------------------
def test_a1111_dropped_modules():
    names = ["lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_up_blocks_1_upsamplers_0_conv",
             "lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2", "lora_te2_text_projection",
             "lora_unet_time_embedding_linear_1", "lora_unet_down_blocks_1_downsamplers_0_conv",
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", "lora_te1_text_model_encoder_"
             "layers_0_self_attn_q_proj"]
    assert a1111_dropped(names, family="sdxl") == [
        "lora_te2_text_projection", "lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2",
        "lora_unet_up_blocks_0_upsamplers_0_conv"]
    assert a1111_dropped(names, family="sd1") == [] and a1111_dropped(names, family="sd2") == []


def _dreambooth_log(base, tmp_path: Path, **targets) -> list[str]:
    from trainers.lora import DreamBoothConfig, make_trainer

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (40, 40), (200, 60 * i, 40)).save(images / f"{i}.png")
    cfg = DreamBoothConfig(images=str(images), out=str(tmp_path / "o.safetensors"), class_word="dog",
                           prior_preservation=False, **targets)
    trainer = make_trainer(base, cfg, "sks")
    logs: list[str] = []
    try:
        trainer.announce(logs.append)
    finally:
        trainer.teardown()
    return logs


def test_sdxl_lora_on_modules_a1111_drops_is_announced(tiny_bases, tmp_path):
    logs = _dreambooth_log(tiny_bases("tiny-sdxl"), tmp_path, target_modules=["to_q", "conv", "linear_1", "linear_2"],
                           text_encoder_targets=["q_proj", "text_projection"])
    warnings = [line for line in logs if "A1111" in line]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    for module in ("lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_add_embedding_linear_1",
                   "lora_unet_add_embedding_linear_2", "lora_te2_text_projection"):
        assert module in warnings[0]
    assert "time_embedding" not in warnings[0] and "downsamplers" not in warnings[0]  # A1111 maps those


def test_default_targets_and_other_families_announce_nothing(tiny_bases, tmp_path):
    assert not [line for line in _dreambooth_log(tiny_bases("tiny-sdxl"), tmp_path) if "A1111" in line]
    assert not [line for line in _dreambooth_log(tiny_bases("tiny"), tmp_path, target_modules=["to_q", "conv"])
                if "A1111" in line]


# -- 7. Perfusion / NeTI files are skipped by other tools' embedding loaders ---------------------------
@pytest.mark.parametrize("family,make", [("tiny", make_perfusion), ("tiny-sdxl", make_perfusion), ("tiny", make_neti)])
def test_embedding_loaders_skip_perfusion_and_neti_files(tiny_bases, tmp_path, family, make):
    base = tiny_bases(family)
    concept = make(base, "<c>", 0)
    concept.refs, concept.ref_models = {"clip": torch.randn(2, 8)}, {"clip": "test"}
    path = save_concept(concept, tmp_path / "c.safetensors")
    data = load_file(str(path))  # what both loaders call on a .safetensors embedding file
    first_name, first = next(iter(data.items()))
    widths = {int(te.config.hidden_size) for te in (base.pipe.text_encoder, getattr(base.pipe, "text_encoder_2", None))
              if te is not None} | {768, 1024, 1280}
    # ComfyUI, comfy/sd1_clip.py load_embed: "string_to_param", the encoder's own key ("clip_l" / "clip_g")
    # and "bundle_emb.*" come first; none is there, so it falls back to the first tensor load_file gives …
    assert not {"string_to_param", "clip_l", "clip_g"} & set(data) and not any(k.startswith("bundle_emb.") for k in data)
    assert first_name == GUARD_TENSOR and first.shape == (1,) and first.dtype == torch.float32
    # … and SDClipModel.set_up_textual_embeddings ignores a vector whose width is no encoder's
    # ("shape mismatch when trying to apply embedding, embedding will be ignored").
    assert first.shape[-1] not in widths
    with safe_open(str(path), "pt") as f:  # the name order other readers list tensors in
        assert list(f.keys())[0] == GUARD_TENSOR
    # A1111, modules/textual_inversion/textual_inversion.py create_embedding_from_data: without
    # "string_to_param" or both "clip_g" and "clip_l", a dict of tensors must hold exactly one
    # ("embedding file has multiple terms in it"), so the file is refused and skipped.
    assert len(data) > 1 and not {"clip_g", "clip_l"} <= set(data)
    # The studio itself reads the concept as it was saved.
    back = load_concept(path)
    assert back.tensors.keys() == concept.tensors.keys() and GUARD_TENSOR not in back.tensors
    assert all(torch.equal(back.tensors[k], concept.tensors[k].float()) for k in concept.tensors)
    assert set(back.refs) == {"clip"}
    assert set(import_concept(path).tensors) == set(concept.tensors)


def test_files_from_before_the_marker_still_load(tiny, tmp_path):
    for make in (make_perfusion, make_neti):
        concept = make(tiny, "<c>", 1)
        old = write_concept(concept, tmp_path / f"old-{concept.method}.safetensors")  # as studios before it wrote
        assert GUARD_TENSOR not in load_file(str(old))
        back = load_concept(old)
        assert back.tensors.keys() == concept.tensors.keys()
        get_method(back.method).validate(back)
        resaved = save_concept(back, tmp_path / f"new-{concept.method}.safetensors")
        assert next(iter(load_file(str(resaved)))) == GUARD_TENSOR


def test_embeddings_and_loras_carry_no_marker(tiny, tmp_path):
    """Textual-inversion files are meant to be read as embeddings, LoRA files by LoRA loaders (where an
    unknown key would be noise): they stay as they were."""
    for concept in (make_ti(tiny, "<t>", 0), make_lora(tiny, "<l>", 0)):
        path = save_concept(concept, tmp_path / f"{concept.method}.safetensors")
        assert GUARD_TENSOR not in load_file(str(path))


def test_a_tensor_that_would_precede_the_marker_is_refused(tiny, tmp_path):
    concept = make_perfusion(tiny, "<c>", 2)
    early = dict(concept.tensors) | {"Early": torch.zeros(2)}
    with pytest.raises(ConceptFormatError, match="would come before"):
        write_concept(dataclasses.replace(concept, tensors=early), tmp_path / "a.safetensors", guard=True)
    wide = dict(concept.tensors) | {"perfusion.wide": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ConceptFormatError, match="wider than float32"):
        write_concept(dataclasses.replace(concept, tensors=wide), tmp_path / "b.safetensors", guard=True)
    assert not list(tmp_path.iterdir())  # refused before anything was written
