import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from studio.concept import FORMAT_VERSION, Concept, check_compatible
from studio.errors import ConceptFormatError, IncompatibleConceptError
from studio.methods import load_concept, save_concept
from tests.method_cases import make_ti


def test_round_trip_keeps_tensors_and_metadata(tiny, tmp_path):
    c = make_ti(tiny, "<hrt>", 0)
    c.train = {"steps": 5, "lr": 0.005}
    c.metrics = {"clip_i": 0.8}
    c.strength = 0.9
    path = save_concept(c, tmp_path / "c.safetensors")
    back = load_concept(path)
    assert back.method == c.method and back.tokens == ["<hrt>"] and back.class_word == "cat"
    assert back.base == json.loads(json.dumps(c.base)) and back.train == c.train and back.metrics == c.metrics
    assert back.strength == 0.9
    torch.testing.assert_close(back.tensors["emb_params"], c.tensors["emb_params"], rtol=0, atol=0)
    assert back.meta["modelspec.trigger_phrase"] == "<hrt>"
    assert not list(tmp_path.glob(".*tmp"))  # the atomic writer cleaned up


@pytest.fixture
def saved(tiny, tmp_path):
    return save_concept(make_ti(tiny, "<hrt>", 0), tmp_path / "c.safetensors")


def test_refuses_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:-10])
    with pytest.raises(ConceptFormatError, match="truncated"):
        load_concept(saved)


def test_refuses_garbage_and_empty(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConceptFormatError, match="corrupt"):
        load_concept(tmp_path / "g.safetensors")
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(ConceptFormatError, match="empty or truncated"):
        load_concept(tmp_path / "e.safetensors")
    bad_json = b"{not json"
    (tmp_path / "j.safetensors").write_bytes(struct.pack("<Q", len(bad_json)) + bad_json)
    with pytest.raises(ConceptFormatError, match="not valid JSON"):
        load_concept(tmp_path / "j.safetensors")


def test_refuses_newer_format_and_foreign_files(tmp_path):
    t = {"emb_params": torch.zeros(1, 32)}
    save_file(t, str(tmp_path / "new.safetensors"), metadata={"studio.format": str(FORMAT_VERSION + 1),
                                                                "studio.method": "textual_inversion"})
    with pytest.raises(ConceptFormatError, match="newer than this studio"):
        load_concept(tmp_path / "new.safetensors")
    save_file(t, str(tmp_path / "a1111.safetensors"))
    with pytest.raises(ConceptFormatError, match="concepts import"):
        load_concept(tmp_path / "a1111.safetensors")


def test_refuses_unknown_method_and_bad_tensors(tmp_path):
    md = {"studio.format": "1", "studio.method": "mystery", "studio.tokens": '["<x>"]'}
    save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata=md)
    with pytest.raises(ConceptFormatError, match="Unknown concept method 'mystery'"):
        load_concept(tmp_path / "m.safetensors")
    md["studio.method"] = "textual_inversion"
    save_file({"emb_params": torch.full((1, 4), float("nan"))}, str(tmp_path / "n.safetensors"), metadata=md)
    with pytest.raises(ConceptFormatError, match="NaN"):
        load_concept(tmp_path / "n.safetensors")
    save_file({"weights": torch.zeros(1, 4)}, str(tmp_path / "k.safetensors"), metadata=md)
    with pytest.raises(ConceptFormatError, match="exactly 'emb_params'"):
        load_concept(tmp_path / "k.safetensors")


def test_pickles_are_never_loaded_implicitly(tmp_path):
    torch.save({"emb_params": torch.zeros(1, 4)}, tmp_path / "x.safetensors")  # a pickle in disguise
    with pytest.raises(ConceptFormatError):
        load_concept(tmp_path / "x.safetensors")


def test_incompatible_base_is_refused_with_reason(tiny_bases):
    tiny, xl = tiny_bases("tiny"), tiny_bases("tiny-sdxl")
    c = make_ti(tiny, "<hrt>", 0)
    with pytest.raises(IncompatibleConceptError, match="trained for sd1 and the loaded base is sdxl"):
        check_compatible(c, xl)
    assert check_compatible(c, tiny) is None


def test_wrong_width_embedding_refused_by_method(tiny):
    from studio.methods import get_method

    c = Concept(method="textual_inversion", tokens=["<w>"], tensors={"emb_params": torch.zeros(1, 1024)})
    with pytest.raises(IncompatibleConceptError, match="1024-d embeddings but base tiny's text encoder is 32-d"):
        get_method("textual_inversion").apply(tiny, c, strength=1.0)


def test_same_architecture_other_weights_is_a_note(tiny, tmp_path):
    from studio.models import load_base

    tiny.pipe.save_pretrained(tmp_path / "ft")
    other = load_base(str(tmp_path / "ft"), device="cpu")
    note = check_compatible(make_ti(tiny, "<hrt>", 0), other)
    assert note and "same architecture" in note
