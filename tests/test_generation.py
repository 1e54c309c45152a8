import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from studio.errors import StudioError
from studio.generation import ConceptUse, GenerateConfig, generate
from studio.prompts import find_triggers, rewrite, split_concept_spec
from studio.service import Studio
from tests.method_cases import make_ti


def test_trigger_parsing():
    uses = find_triggers("a <hrt> and <dog-1:0.8> x")
    assert [(u.token, u.strength) for u in uses] == [("<hrt>", None), ("<dog-1>", 0.8)]
    assert rewrite("a <hrt:0.5> dog", {"<hrt>": "h1 h2"}) == "a h1 h2 dog"
    with pytest.raises(StudioError, match="Unknown token <x>"):
        rewrite("a <x>", {})
    with pytest.raises(StudioError, match="strength must be between"):
        find_triggers("<a:7>")
    assert split_concept_spec("dir/c.safetensors:0.8") == ("dir/c.safetensors", 0.8)
    assert split_concept_spec("C:\\x\\c.safetensors") == ("C:\\x\\c.safetensors", None)


def test_config_validation():
    with pytest.raises(StudioError, match="steps"):
        GenerateConfig(prompt="x", steps=0)
    with pytest.raises(StudioError, match="scheduler"):
        GenerateConfig(prompt="x", scheduler="nope")
    with pytest.raises(StudioError, match="empty"):
        GenerateConfig(prompt="  ")


def test_same_seed_same_pixels_and_params(tiny):
    cfg = GenerateConfig(prompt="a photo of a cat", seed=3, steps=3, num_images=2)
    a, b = generate(tiny, cfg), generate(tiny, cfg)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # seed + 1
    other = generate(tiny, GenerateConfig(prompt="a photo of a dog", seed=3, steps=3))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))
    text = a[1].info["parameters"]
    assert text.startswith("a photo of a cat\n") and "Seed: 4" in text and "Size: 32x32" in text
    assert json.loads(a[0].info["studio"])["seed"] == 3


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "unipc"])
def test_schedulers_run_and_are_restored(tiny, scheduler):
    before = type(tiny.pipe.scheduler)
    img = generate(tiny, GenerateConfig(prompt="a cat", steps=2, scheduler=scheduler))[0]
    assert img.size == (32, 32) and type(tiny.pipe.scheduler) is before


def test_size_must_fit_the_base(tiny):
    with pytest.raises(StudioError, match="multiple of 4"):
        generate(tiny, GenerateConfig(prompt="a cat", steps=1, width=30))


def test_studio_resolves_library_names_and_strength_in_prompt(tiny, library):
    library.add(make_ti(tiny, "<hrt>", 0), "hrt")
    studio = Studio(library=library.folder, base=tiny)
    cfg = GenerateConfig(prompt="a photo of <hrt:0.5>", steps=2, concepts=[ConceptUse("hrt", 0.9)])
    img = studio.generate(cfg)[0]
    assert "<hrt>:0.5 (hrt)" in img.info["parameters"]
    with pytest.raises(StudioError, match="No concept 'nope'"):
        studio.generate(GenerateConfig(prompt="x", concepts=[ConceptUse("nope")]))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_generate_is_deterministic_and_writes_parameters(tmp_path):
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = []
    for name, seed, prompt in [("a", 3, "a photo of a cat"), ("b", 3, "a photo of a cat"), ("c", 4, "a photo of a cat")]:
        res = _cli("generate", "--base", "tiny", "--prompt", prompt, "--seed", str(seed), "--steps", "3",
                   "--out", str(tmp_path / f"{name}.png"), cwd=repo)
        assert res.returncode == 0, res.stderr
        outs.append(Image.open(tmp_path / f"{name}.png"))
    a, b, c = (np.asarray(o.convert("RGB")) for o in outs)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert "Seed: 3" in outs[0].info["parameters"] and "Model: tiny" in outs[0].info["parameters"]


def test_cli_user_errors_are_one_line(tmp_path):
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = _cli("generate", "--base", "tiny", "--prompt", "a <nope>", "--steps", "1", "--out",
               str(tmp_path / "x.png"), cwd=repo)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: Unknown token <nope>")
    assert "Traceback" not in res.stderr
    res = _cli("concepts", "list", "--library", str(tmp_path / "none"), cwd=repo)
    assert res.returncode == 0 and "no concepts" in res.stdout
