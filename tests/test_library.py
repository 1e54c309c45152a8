import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from studio.errors import StudioError
from tests.method_cases import make_ti


def test_add_list_show_rename_delete(tiny, library):
    library.add(make_ti(tiny, "<a>", 0), "first", preview=Image.new("RGB", (8, 8)))
    library.add(make_ti(tiny, "<b>", 1), "second")
    assert library.names() == ["first", "second"]
    rows = {r.name: r for r in library.list()}
    assert rows["first"].tokens == ["<a>"] and rows["first"].preview is not None
    assert rows["first"].base["family"] == "sd1"
    library.rename("first", "renamed", token="<c>")
    assert library.names() == ["renamed", "second"]
    assert library.load("renamed").tokens == ["<c>"]
    assert library.preview_path("renamed").is_file()
    library.delete("renamed")
    assert library.names() == ["second"]


def test_no_overwrite_without_force(tiny, library):
    library.add(make_ti(tiny, "<a>", 0), "x")
    with pytest.raises(StudioError, match="already exists"):
        library.add(make_ti(tiny, "<a>", 1), "x")
    library.add(make_ti(tiny, "<a>", 1), "x", force=True)


@pytest.mark.parametrize("bad", ["../evil", "a/b", ".hidden", "", "x" * 100, "..", "a\\b"])
def test_names_are_sanitised(library, bad):
    with pytest.raises(StudioError, match="not allowed"):
        library.path(bad)


def test_a_corrupt_file_does_not_break_listing(tiny, library):
    library.add(make_ti(tiny, "<a>", 0), "good")
    (library.folder / "bad.safetensors").write_bytes(b"junk")
    rows = {r.name: r for r in library.list()}
    assert rows["good"].error == "" and "corrupt" in rows["bad"].error


def test_failed_write_keeps_the_old_file(tiny, library, monkeypatch):
    path = library.add(make_ti(tiny, "<a>", 0), "x")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(StudioError, match="disk is full"):
        library.add(make_ti(tiny, "<a>", 1), "x", force=True)
    assert path.read_bytes() == before
    assert not [p for p in library.folder.iterdir() if p.name.endswith(".tmp")]


def test_import_formats_and_export(tiny, library, tmp_path):
    vec = torch.randn(2, 32)
    save_file({"emb_params": vec}, str(tmp_path / "a1111.safetensors"))
    save_file({"<cat-toy>": vec}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<ci>_v0": vec[0], "<ci>_v1": vec[1]}, str(tmp_path / "crossinit.safetensors"))
    torch.save({"string_to_param": {"*": vec}, "name": "pt-emb"}, tmp_path / "emb.pt")
    for f, name in [("a1111.safetensors", "a"), ("learned_embeds.safetensors", "d"),
                    ("crossinit.safetensors", "c"), ("emb.pt", "p")]:
        library.import_file(tmp_path / f, name, class_word="cat")
        torch.testing.assert_close(library.load(name).tensors["emb_params"], vec)
    assert library.load("d").tokens == ["<cat-toy>"] and library.load("c").tokens == ["<ci>"]
    assert library.load("p").tokens == ["<pt-emb>"]
    out = library.export("d", tmp_path / "out.safetensors", "diffusers")
    assert set(load_file(str(out))) == {"<cat-toy>"}
    with pytest.raises(StudioError, match="exists"):
        library.export("d", out, "diffusers")
    with pytest.raises(StudioError, match="cannot be exported as 'nope'"):
        library.export("d", tmp_path / "o2.safetensors", "nope")


def test_import_refuses_code_in_pickles(library, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(StudioError, match="weights-only"):
        library.import_file(tmp_path / "evil.pt")
