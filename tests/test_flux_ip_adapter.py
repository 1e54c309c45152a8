"""IP-Adapter on FLUX.1 (docs/methods.md §6, "FLUX.1"): XLabs-layout files, parity with diffusers'
``FluxPipeline.load_ip_adapter``, exact removal, composition, refusals (SD 3, fine-tuning), the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import IncompatibleConceptError, StudioError
from studio.generation import GenerateConfig, applied, effective_strengths, generate
from studio.methods import get_method, load_concept
from studio.methods.zeroshot import EMBEDS, MASK, make_zeroshot_concept
from studio.methods.zeroshot.adapter import read_adapter_state, resolve_adapter
from studio.methods.zeroshot.flux import (
    STORE_ATTR,
    build_flux_adapter,
    double_layers,
    flux_store,
    xlabs_state,
)
from studio.models import build_tiny_pipeline, load_base
from studio.prompts import rewrite
from tests.method_cases import reference_image, save_tiny_adapter, save_tiny_flux_adapter

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def flux():
    return load_base("tiny-flux", device="cpu")


def _latents(pipe, **kw) -> torch.Tensor:
    """Packed latents after 2 steps (no VAE rounding): (1, N, 64)."""
    return pipe(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="latent", guidance_scale=3.5, **kw).images


def _studio_latents(base, concepts: list[tuple], pipe=None) -> torch.Tensor:
    """The studio's path: ``applied`` (check, apply, remove) around one pipeline call."""
    resolved = effective_strengths(PROMPT, "", [(c, s, c.name) for c, s in concepts])
    with applied(base, resolved) as texts:
        assert rewrite(PROMPT, texts) == PROMPT
        return _latents(pipe or base.pipe)


def _diffusers(folders: list[Path], scales: list[float], embeds: list[torch.Tensor], pipe=None) -> torch.Tensor:
    """diffusers alone on a fresh tiny-flux: load_ip_adapter + set_ip_adapter_scale + ip_adapter_image_embeds."""
    pipe = pipe or build_tiny_pipeline("tiny-flux")
    pipe.load_ip_adapter([str(f) for f in folders], weight_name=["ip_adapter.safetensors"] * len(folders),
                         image_encoder_pretrained_model_name_or_path=str(folders[0] / "image_encoder"),
                         image_encoder_dtype=torch.float32)
    pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])
    return _latents(pipe, ip_adapter_image_embeds=[e[None] for e in embeds])


def _snapshot(transformer) -> dict:
    return {"procs": dict(transformer.attn_processors), "state": {k: v.clone() for k, v in transformer.state_dict().items()},
            "pre_hooks": len(transformer._forward_pre_hooks),
            "norm_hooks": [len(a.norm_q._forward_hooks) for _, a in double_layers(transformer)]}


def _same(transformer, snap: dict) -> bool:
    now = _snapshot(transformer)
    return (now["procs"].keys() == snap["procs"].keys() and all(now["procs"][k] is snap["procs"][k] for k in now["procs"])
            and all(torch.equal(now["state"][k], snap["state"][k]) for k in snap["state"])
            and now["state"].keys() == snap["state"].keys() and now["pre_hooks"] == snap["pre_hooks"]
            and now["norm_hooks"] == snap["norm_hooks"] and STORE_ATTR not in transformer.__dict__)


def test_xlabs_file_reads_and_writes_back(flux, tmp_path):
    """The XLabs names are read as diffusers reads them and written back bit-identical; the folder
    resolves to the file and its encoder; the adapter says FLUX."""
    folder = save_tiny_flux_adapter(tmp_path / "a", flux.pipe.transformer, seed=1)
    ref = resolve_adapter(str(folder))
    assert ref.file.name == "ip_adapter.safetensors" and ref.image_encoder == str((folder / "image_encoder").resolve())
    adapter = build_flux_adapter(flux.pipe.transformer, read_adapter_state(ref.file))
    assert (adapter.info.layout, adapter.info.family, adapter.info.num_tokens, adapter.info.token_dim) == ("flux", "flux", 4, 64)
    from safetensors.torch import load_file

    original = load_file(str(ref.file))
    assert any(k.startswith("double_blocks.0.processor.ip_adapter_double_stream_k_proj") for k in original)
    written = xlabs_state(adapter)
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)


def test_flux_dev_shapes_read_as_diffusers_reads_them():
    """XLabs' FLUX.1-dev adapter shapes (meta tensors; no weights here): 16 tokens of 4096 from 768-d CLIP
    ViT-L/14 embeddings, one K/V pair per double block of FLUX.1-dev's 19."""
    from diffusers import FluxTransformer2DModel

    from studio.methods.zeroshot.adapter import adapter_info
    from studio.methods.zeroshot.xlabs import from_xlabs

    with torch.device("meta"):
        dev = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are FLUX.1's widths
        flat = {"ip_adapter_proj_model.proj.weight": torch.empty(65536, 768),
                "ip_adapter_proj_model.proj.bias": torch.empty(65536),
                "ip_adapter_proj_model.norm.weight": torch.empty(4096),
                "ip_adapter_proj_model.norm.bias": torch.empty(4096)}
        for i in range(19):
            for kv in "kv":
                flat[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = torch.empty(3072, 4096)
                flat[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = torch.empty(3072)
    info = adapter_info(from_xlabs(flat))
    assert (info.family, info.embed_dim, info.num_tokens, info.token_dim, info.n_layers) == ("flux", 768, 16, 4096, 19)
    layers = double_layers(dev)
    assert len(layers) == 19 and {int(a.inner_dim) for _, a in layers} == {3072}
    assert int(dev.config.joint_attention_dim) == info.token_dim


@pytest.mark.parametrize("scale", [0.7, 1.3])
def test_parity_with_diffusers_flux_ip_adapter(flux, tmp_path, scale):
    """The studio's generation with a zero-shot concept at scale s = diffusers' FluxPipeline +
    load_ip_adapter + set_ip_adapter_scale(s) + ip_adapter_image_embeds, same seed; removal is exact."""
    folder = save_tiny_flux_adapter(tmp_path / "a", flux.pipe.transformer, seed=3)
    img = reference_image(5)
    concept = make_zeroshot_concept([img], str(folder), name="ref", class_word="cat")
    assert concept.tensors[EMBEDS].shape == (1, 16) and concept.base == {"family": "flux"}
    snap = _snapshot(flux.pipe.transformer)
    plain = _latents(flux.pipe)
    mine = _studio_latents(flux, [(concept, scale)])
    assert _same(flux.pipe.transformer, snap)
    assert torch.equal(_latents(flux.pipe), plain)  # removing restores the pipeline exactly
    assert (mine - plain).abs().max() > 1e-2  # the reference changes the image
    theirs = _diffusers([folder], [scale], [concept.tensors[EMBEDS]])
    assert (mine - theirs).abs().max() <= 1e-5, float((mine - theirs).abs().max())


def test_generate_reference_image_equals_diffusers_pixels_and_scale_zero_is_plain(flux, tmp_path):
    """``generate --reference-image`` on FLUX (the image encoded in the call) gives diffusers' pixels
    from ``ip_adapter_image``; scale 0 installs nothing and gives the plain image."""
    folder = save_tiny_flux_adapter(tmp_path / "a", flux.pipe.transformer, seed=4)
    ref = tmp_path / "ref.png"
    reference_image(6).save(ref)
    cfg = dict(prompt=PROMPT, steps=2, seed=0)
    mine = generate(flux, GenerateConfig(**cfg, reference_images=[str(ref)], adapter=str(folder), reference_scale=0.8))[0]
    assert json.loads(mine.info["studio"])["reference_images"] == [str(ref)]
    assert flux_store(flux.pipe.transformer) is None
    plain = generate(flux, GenerateConfig(**cfg))[0]
    off = generate(flux, GenerateConfig(**cfg, reference_images=[str(ref)], adapter=str(folder), reference_scale=0.0))[0]
    assert np.array_equal(np.asarray(off), np.asarray(plain)) and not np.array_equal(np.asarray(mine), np.asarray(plain))

    pipe = build_tiny_pipeline("tiny-flux")
    pipe.load_ip_adapter(str(folder), weight_name="ip_adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path=str(folder / "image_encoder"),
                         image_encoder_dtype=torch.float32)
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), guidance_scale=3.5,
                  ip_adapter_image=Image.open(ref)).images[0]
    assert np.array_equal(np.asarray(mine), np.asarray(theirs))


def _two_block_pipe():
    """tiny-flux with two double-stream blocks (checks the per-block numbering of the weights)."""
    from diffusers import FluxTransformer2DModel

    pipe = build_tiny_pipeline("tiny-flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "num_layers": 2})
    return pipe


def test_two_concepts_several_images_and_two_double_blocks_match_diffusers(flux, tmp_path):
    """Two concepts (one of two reference images, attending as one sequence) on a FLUX with two double
    blocks = diffusers with two adapters and per-adapter scales."""
    pipe = _two_block_pipe()
    base = dataclasses.replace(flux, pipe=pipe)
    a = save_tiny_flux_adapter(tmp_path / "a", pipe.transformer, seed=7)
    b = save_tiny_flux_adapter(tmp_path / "b", pipe.transformer, seed=8)
    ca = make_zeroshot_concept([reference_image(1), reference_image(2)], str(a), name="a", class_word="cat")
    cb = make_zeroshot_concept([reference_image(3)], str(b), name="b", class_word="cat")
    assert ca.tensors[EMBEDS].shape[0] == 2
    snap = _snapshot(pipe.transformer)
    mine = _studio_latents(base, [(ca, 0.9), (cb, 0.5)])
    assert _same(pipe.transformer, snap)
    only_a = _studio_latents(base, [(ca, 0.9)])
    assert (mine - only_a).abs().max() > 1e-3  # the second concept adds its own term
    theirs = _diffusers([a, b], [0.9, 0.5], [ca.tensors[EMBEDS], cb.tensors[EMBEDS]], pipe=_two_block_pipe())
    assert (mine - theirs).abs().max() <= 1e-5, float((mine - theirs).abs().max())


def test_mask_limits_where_the_reference_acts(flux, tmp_path):
    folder = save_tiny_flux_adapter(tmp_path / "a", flux.pipe.transformer, seed=9)
    c = make_zeroshot_concept([reference_image(4)], str(folder), name="m", class_word="cat")
    from studio.methods.zeroshot.adapter import mask_tensor

    left = Image.fromarray(np.tile((np.arange(32) < 16).astype("uint8") * 255, (32, 1)))
    plain, full = _latents(flux.pipe), _studio_latents(flux, [(c, 1.0)])
    nowhere = dataclasses.replace(c, tensors={**c.tensors, MASK: mask_tensor(Image.new("L", (32, 32)))})
    assert torch.equal(_studio_latents(flux, [(nowhere, 1.0)]), plain)
    half = _studio_latents(flux, [(dataclasses.replace(c, tensors={**c.tensors, MASK: mask_tensor(left)}), 1.0)])
    assert (half - plain).abs().max() > 1e-3 and (half - full).abs().max() > 1e-3


def test_refusals_are_one_sentence(flux, tmp_path):
    """SD 3, a UNet adapter on FLUX (and the reverse), diffusers' own adapter already loaded, per-block
    scales, and fine-tuning an adapter on FLUX are each refused in one sentence."""
    sd3 = load_base("tiny-sd3", device="cpu")
    with pytest.raises(IncompatibleConceptError, match="no IP-Adapter for Stable Diffusion 3") as err:
        get_method("zeroshot").check_base(None, sd3)
    assert str(err.value).count(". ") == 0
    with pytest.raises(StudioError, match="IP-Adapter"):
        generate(sd3, GenerateConfig(prompt="a cat", reference_images=["x.png"], steps=1))

    tiny = load_base("tiny", device="cpu")
    unet_folder = save_tiny_adapter(tmp_path / "unet", tiny.pipe.unet, "base", seed=1)
    unet_concept = make_zeroshot_concept([reference_image(0)], str(unet_folder), name="u")
    with pytest.raises(IncompatibleConceptError, match="UNet bases"):
        get_method("zeroshot").apply(flux, unet_concept, strength=1.0)
    folder = save_tiny_flux_adapter(tmp_path / "f", flux.pipe.transformer, seed=2)
    concept = make_zeroshot_concept([reference_image(0)], str(folder), name="f")
    with pytest.raises(IncompatibleConceptError, match="FLUX.1 IP-Adapter"):
        get_method("zeroshot").apply(tiny, concept, strength=1.0)

    blocks = dataclasses.replace(concept, meta={**concept.meta, "zeroshot.layer_scales": json.dumps({"up": 0.0})})
    with pytest.raises(StudioError, match="one scale"):
        get_method("zeroshot").apply(flux, blocks, strength=1.0)
    assert flux_store(flux.pipe.transformer) is None

    pipe = build_tiny_pipeline("tiny-flux")
    pipe.load_ip_adapter(str(folder), weight_name="ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=None)
    with pytest.raises(StudioError, match="unload_ip_adapter"):
        get_method("zeroshot").apply(dataclasses.replace(flux, pipe=pipe), concept, strength=1.0)
    assert STORE_ATTR not in pipe.transformer.__dict__

    from tests.helpers import write_square_photos
    from trainers import get_trainer
    from trainers.runner import train

    entry = get_trainer("adapter")
    cfg = entry.resolve(images=str(write_square_photos(tmp_path / "imgs")), adapter=str(folder), out=str(tmp_path / "o"),
                        steps=1)
    with pytest.raises(IncompatibleConceptError, match="Fine-tuning an IP-Adapter on FLUX.1") as err:
        train(entry, cfg, flux)
    assert str(err.value).count(". ") == 0


def test_cli_create_zeroshot_and_generate_on_tiny_flux(flux, tmp_path):
    """``concepts create-zeroshot`` with a FLUX adapter, then ``generate --base tiny-flux --concept``:
    the same pixels as the Python path."""
    from studio.cli import main

    folder = save_tiny_flux_adapter(tmp_path / "a", flux.pipe.transformer, seed=5)
    refs = tmp_path / "refs"
    refs.mkdir()
    reference_image(40).save(refs / "0.png")
    out = tmp_path / "dog.safetensors"
    assert main(["concepts", "create-zeroshot", "--images", str(refs), "--adapter", str(folder), "--out", str(out),
                 "--scale", "0.9", "--class-word", "dog"]) == 0
    concept = load_concept(out)
    assert concept.method == "zeroshot" and concept.strength == 0.9
    png = tmp_path / "img.png"
    assert main(["generate", "--base", "tiny-flux", "--device", "cpu", "--prompt", "a photo of <refs>", "--seed", "1",
                 "--steps", "2", "--concept", str(out), "--out", str(png), "--library", str(tmp_path / "lib")]) == 0
    direct = generate(flux, GenerateConfig(prompt="a photo of <refs>", seed=1, steps=2), [(concept, None, str(out))])[0]
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(direct))
    plain = generate(flux, GenerateConfig(prompt="a photo of dog", seed=1, steps=2))[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(direct))
