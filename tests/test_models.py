import os
import subprocess
import sys
import time

import numpy as np
import pytest

from studio.errors import BaseModelError
from studio.models import load_base
from tests.conftest import render


@pytest.mark.parametrize("name,family,pred,widths", [
    ("tiny", "sd1", "epsilon", [32]),
    ("tiny-v", "sd2", "v_prediction", [32]),
    ("tiny-sdxl", "sdxl", "epsilon", [32, 32]),
])
def test_tiny_bases(tiny_bases, name, family, pred, widths):
    base = tiny_bases(name)
    assert base.family == family
    assert base.prediction_type == pred
    assert base.compat["text_widths"] == widths
    assert base.compat["n_cross_attention_layers"] > 1
    assert base.native_size == 32
    assert len(base.pipe.tokenizer) == 49408
    assert render(base).shape == (32, 32, 3)


def test_keys_separate_families_and_builds(tiny_bases):
    a, v, xl = tiny_bases("tiny"), tiny_bases("tiny-v"), tiny_bases("tiny-sdxl")
    assert len({a.compat_id, v.compat_id, xl.compat_id}) == 3
    assert len({a.identity, v.identity, xl.identity}) == 3


def test_folder_roundtrip_same_compat_different_identity(tiny, tmp_path):
    tiny.pipe.save_pretrained(tmp_path / "m")
    loaded = load_base(str(tmp_path / "m"), device="cpu")
    assert loaded.compat == tiny.compat
    assert loaded.identity.startswith("folder:") and loaded.identity != tiny.identity
    np.testing.assert_array_equal(render(loaded), render(tiny))


def _fake_hub_cache(pipe, root, repo="someone/tiny-sd", commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub's cache uses: models--owner--name/{refs/main, snapshots/<sha>/…}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    pipe.save_pretrained(snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo, commit


def test_hub_id_loads_offline_from_local_cache(tiny, tmp_path, monkeypatch):
    repo, commit = _fake_hub_cache(tiny.pipe, tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_base(repo, device="cpu", cache_dir=tmp_path / "hub")
    assert base.identity == f"hub:{repo}@{commit}"
    assert base.compat == tiny.compat


def test_uncached_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="not in the local Hugging Face cache"):
        load_base("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu", cache_dir=tmp_path)


def test_cli_offline_hub_id_fails_fast_without_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "studio", "generate", "--base",
                          "stable-diffusion-v1-5/stable-diffusion-v1-5", "--prompt", "a cat", "--out",
                          str(tmp_path / "a.png")], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2
    assert time.monotonic() - t0 < 30
    lines = [ln for ln in res.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in res.stderr


def test_missing_path_and_non_pipeline_folder(tmp_path):
    with pytest.raises(BaseModelError, match="not a folder, a file or a hub id"):
        load_base("./nowhere/at-all", device="cpu")
    (tmp_path / "x").mkdir()
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_base(str(tmp_path / "x"), device="cpu")
