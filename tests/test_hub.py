"""Sharing concepts on the Hugging Face Hub (``studio.hub``, ``concepts push`` / ``concepts pull``), with no network.

:class:`FakeHub` is a local stand-in for the hub's HTTP API, served from a thread on 127.0.0.1 (a
random port): exactly the endpoints huggingface_hub 2.4.0 calls for ``create_repo``, ``create_commit``
(README validation, preupload answering "regular" for every file so the content comes inline as
base64 in the NDJSON commit), ``list_repo_tree`` and ``hf_hub_download`` (HEAD/GET ``resolve`` with
``X-Repo-Commit``, ``ETag``, ``Content-Length``), with the hub's error answers: 404 ``RepoNotFound`` /
``RevisionNotFound`` / ``EntryNotFound``, 401 for a bad token, 403 for another user's namespace.
The studio is pointed at it through ``endpoint=`` (``--endpoint`` in the CLI).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from studio import hub as studio_hub
from studio.errors import StudioError
from studio.library import Library
from tests.method_cases import make_lora, make_ti

TOKEN = "hf_alice_write_token"  # alice's
BOB = "hf_bob_write_token"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    owner: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> the tree at that commit
    head: str = ""

    def files(self, revision: str) -> dict[str, bytes] | None:
        if revision == "main":
            return self.commits.get(self.head, {})
        return self.commits.get(revision)

    def commit(self, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(f"{self.head}:{len(self.commits)}:{sorted(files)}".encode()).hexdigest()
        self.commits[sha] = files
        self.head = sha
        return sha


class _Answered(Exception):
    """The handler already sent its answer (an error)."""


class FakeHub:
    """The hub's HTTP API, as far as push and pull use it (see the module docstring)."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens  # token -> user
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> FakeRepo:
        repo = self.repos[repo_id] = FakeRepo(owner=repo_id.split("/")[0], private=private)
        repo.commit(dict(files))
        return repo

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_HEAD(self) -> None:
                self._dispatch("HEAD")

            def do_POST(self) -> None:
                self._dispatch("POST")

            # -- plumbing -------------------------------------------------------------------------
            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(data).encode(), headers)

            def _error(self, status: int, message: str, code: str | None = None, **headers: str) -> None:
                extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **headers}
                self._json(status, {"error": message}, extra)
                raise _Answered

            def _user(self) -> str | None:
                auth = self.headers.get("Authorization")
                if not auth:
                    return None
                user = hub.tokens.get(auth.removeprefix("Bearer ").strip())
                if user is None:
                    self._error(401, "Invalid credentials in Authorization header")
                return user

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _repo(self, repo_id: str, *, write: bool = False) -> FakeRepo:
                user = self._user()
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and user != repo.owner):
                    self._error(401 if user is None else 404, "Repository not found", "RepoNotFound")
                if write and user != repo.owner:
                    self._error(401 if user is None else 403, "You don't have the rights to write to this repo")
                return repo

            def _files(self, repo: FakeRepo, revision: str) -> dict[str, bytes]:
                files = repo.files(revision)
                if files is None:
                    self._error(404, "Invalid rev id", "RevisionNotFound")
                return files

            def _dispatch(self, method: str) -> None:
                parts = urlsplit(self.path)
                hub.requests.append((method, parts.path))
                routes = [
                    ("POST", r"/api/repos/create", self._create),
                    ("POST", r"/api/validate-yaml", self._validate_yaml),
                    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", self._info),
                    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
                    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
                    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
                    ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
                    ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
                ]
                try:
                    for verb, pattern, handler in routes:
                        m = re.fullmatch(pattern, parts.path)
                        if verb == method and m:
                            handler(**{k: unquote(v or "") for k, v in m.groupdict().items()})
                            return
                    self._error(404, f"no route {method} {parts.path}")
                except _Answered:
                    pass

            # -- endpoints ------------------------------------------------------------------------
            def _create(self) -> None:
                user = self._user()
                payload = json.loads(self._body())
                repo_id = f"{payload.get('organization') or user}/{payload['name']}"
                if user is None:
                    self._error(401, "You must be authenticated to create a repo")
                if repo_id.split("/")[0] != user:
                    self._error(403, f"You don't have the rights to create a model under the namespace "
                                     f"\"{repo_id.split('/')[0]}\"")
                if repo_id in hub.repos:
                    self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                               {"X-Error-Message": "You already created this model repo"})
                    return
                repo = hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"},
                                    private=payload.get("visibility") == "private")
                assert repo.owner == user
                self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

            def _validate_yaml(self) -> None:
                payload = json.loads(self._body())
                assert payload["content"].startswith("---\n")
                self._json(200, {"errors": [], "warnings": []})

            def _info(self, repo: str) -> None:
                r = self._repo(repo)
                self._json(200, {"id": repo, "sha": r.head, "private": r.private,
                                 "siblings": [{"rfilename": p} for p in r.files("main") or {}]})

            def _preupload(self, repo: str, rev: str) -> None:
                self._repo(repo, write=True)
                payload = json.loads(self._body())
                self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                            "oid": None} for f in payload["files"]]})

            def _commit(self, repo: str, rev: str) -> None:
                r = self._repo(repo, write=True)
                files = dict(self._files(r, rev))
                lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                assert lines[0]["key"] == "header" and lines[0]["value"]["summary"]
                for item in lines[1:]:
                    value = item["value"]
                    if item["key"] == "file":
                        assert value["encoding"] == "base64"
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    else:
                        self._error(400, f"the fake hub does not take {item['key']} operations")
                sha = r.commit(files)
                self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo}/commit/{sha}"})

            def _tree(self, repo: str, rev: str, path: str) -> None:
                files = self._files(self._repo(repo), rev)
                entries, folders = [], set()
                for p in sorted(files):
                    if path and not p.startswith(path.rstrip("/") + "/"):
                        continue
                    folders.update("/".join(p.split("/")[:i]) for i in range(1, p.count("/") + 1))
                    entries.append({"type": "file", "oid": git_oid(files[p]), "size": len(files[p]), "path": p})
                entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
                self._json(200, entries)

            def _resolve(self, repo: str, rev: str, path: str) -> None:
                r = self._repo(repo)
                files = self._files(r, rev)
                sha = r.head if rev == "main" else rev
                if path not in files:
                    self._error(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": sha})
                data = files[path]
                self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{git_oid(data)}"'},
                           content_type="application/octet-stream")

        return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running :class:`FakeHub` (alice and bob have tokens), with no token or offline mode leaking in."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # no cached login
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with FakeHub({TOKEN: "alice", BOB: "bob"}) as server:
        yield server


@pytest.fixture
def concept_lib(tiny, tmp_path):
    """A library holding ``dog``: a textual-inversion concept with a preview, a strength and scores."""
    lib = Library(tmp_path / "lib")
    concept = make_ti(tiny, "<dog>", 0)
    concept.strength = 0.8
    concept.metrics = {"eval": {"scores": {"clip_t": 0.2812, "clip_i": 0.7344}, "backbones": {"clip_t": "tiny-clip"},
                                "protocol": "dreambench"}}
    lib.add(concept, "dog", preview=Image.new("RGB", (16, 16), (200, 30, 30)))
    return lib


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_push_then_pull_round_trip(hub, concept_lib, tmp_path):
    url = studio_hub.push(concept_lib, "dog", "alice/dog", token=TOKEN, endpoint=hub.url)
    assert url == f"{hub.url}/alice/dog"
    files = hub.repos["alice/dog"].files("main")
    assert {"dog.safetensors", "dog.preview.png", "README.md"} <= set(files)
    assert files["dog.safetensors"] == concept_lib.path("dog").read_bytes()  # the library's file, byte for byte
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: personalization-studio" in card
    assert "instance_prompt: <dog>" in card and "- textual_inversion" in card and "- text-to-image" in card
    assert "`<dog>`" in card and "| base | tiny" in card and "| recommended strength | 0.8 |" in card
    assert "clip_t: 0.2812 (tiny-clip)" in card and "concepts pull alice/dog/dog.safetensors" in card
    assert "load_textual_inversion" in card and "--format a1111" in card

    other = Library(tmp_path / "other")
    path = studio_hub.pull(other, "alice/dog", endpoint=hub.url)
    assert path == other.path("dog") and other.names() == ["dog"]
    pulled, original = other.load("dog"), concept_lib.load("dog")
    assert pulled.tokens == ["<dog>"] and pulled.strength == 0.8 and pulled.base == original.base
    assert pulled.tensors.keys() == original.tensors.keys()
    for key, value in original.tensors.items():
        torch.testing.assert_close(pulled.tensors[key], value, rtol=0, atol=0)
    assert other.info("dog").preview is not None
    assert Image.open(other.preview_path("dog")).getpixel((0, 0)) == (200, 30, 30)
    assert _files(other.folder) == ["dog.preview.png", "dog.safetensors"]  # no temporary file left

    # A file path, hf:// and a revision; another name.
    sha = hub.repos["alice/dog"].head
    studio_hub.pull(other, f"hf://alice/dog/dog.safetensors@{sha}", name="dog-copy", endpoint=hub.url)
    torch.testing.assert_close(other.load("dog-copy").tensors["emb_params"], original.tensors["emb_params"])


def test_push_again_updates_the_repo_and_old_revisions_stay_pullable(hub, concept_lib, tiny, tmp_path):
    studio_hub.push(concept_lib, "dog", "alice/dog", token=TOKEN, endpoint=hub.url)
    first = hub.repos["alice/dog"].head
    concept_lib.add(make_ti(tiny, "<dog>", 1), "dog", force=True)
    studio_hub.push(concept_lib, "dog", "alice/dog", token=TOKEN, endpoint=hub.url)  # the repo exists: 409 → exist_ok
    assert hub.repos["alice/dog"].head != first
    other = Library(tmp_path / "other")
    studio_hub.pull(other, f"alice/dog@{first}", name="old", endpoint=hub.url)
    studio_hub.pull(other, "alice/dog", name="new", endpoint=hub.url)
    assert not torch.equal(other.load("old").tensors["emb_params"], other.load("new").tensors["emb_params"])
    torch.testing.assert_close(other.load("new").tensors["emb_params"],
                               concept_lib.load("dog").tensors["emb_params"])
    with pytest.raises(StudioError, match="has no revision 'v9'"):
        studio_hub.pull(other, "alice/dog@v9", endpoint=hub.url)


def test_pull_of_a_repo_with_several_concept_files_lists_them(hub, tiny, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lib = Library(tmp_path / "src")
    lib.add(make_ti(tiny, "<a>", 0), "a")
    lib.add(make_ti(tiny, "<b>", 1), "b")
    a.write_bytes(lib.path("a").read_bytes())
    b.write_bytes(lib.path("b").read_bytes())
    hub.add_repo("alice/pair", {"a.safetensors": a.read_bytes(), "sub/b.safetensors": b.read_bytes(),
                                "README.md": b"# two"})
    target = Library(tmp_path / "target")
    with pytest.raises(StudioError) as err:
        studio_hub.pull(target, "alice/pair", endpoint=hub.url)
    message = str(err.value)
    assert "several concept files (a.safetensors, sub/b.safetensors)" in message and "\n" not in message
    assert "alice/pair/a.safetensors" in message
    assert _files(target.folder) == []
    studio_hub.pull(target, "alice/pair/sub/b.safetensors", endpoint=hub.url)  # naming one works
    assert target.names() == ["b"]
    with pytest.raises(StudioError, match=r"has no file 'c.safetensors' \(its files: a.safetensors, "
                                          r"sub/b.safetensors\)"):
        studio_hub.pull(target, "alice/pair/c.safetensors", endpoint=hub.url)


@pytest.mark.parametrize("content", [b"junk, not safetensors", "tensors"])
def test_pull_refuses_a_file_that_is_no_concept_and_leaves_nothing(hub, tmp_path, content):
    if content == "tensors":  # a well-formed safetensors file whose tensors no method knows
        save_file({"weights": torch.randn(3, 3), "bias": torch.randn(3)}, str(tmp_path / "x.safetensors"))
        content = (tmp_path / "x.safetensors").read_bytes()
    hub.add_repo("alice/junk", {"model.safetensors": content, "model.preview.png": b"not a png"})
    lib = Library(tmp_path / "lib")
    with pytest.raises(StudioError) as err:
        studio_hub.pull(lib, "alice/junk", endpoint=hub.url)
    message = str(err.value)
    assert "alice/junk/model.safetensors" in message and "studio-pull-" not in message and "\n" not in message
    assert _files(lib.folder) == [] and lib.names() == []


def test_a_broken_preview_is_left_out(hub, concept_lib, tmp_path):
    studio_hub.push(concept_lib, "dog", "alice/dog", token=TOKEN, endpoint=hub.url)
    repo = hub.repos["alice/dog"]
    repo.commit(repo.files("main") | {"dog.preview.png": b"not a png"})
    other = Library(tmp_path / "other")
    studio_hub.pull(other, "alice/dog", endpoint=hub.url)
    assert other.names() == ["dog"] and other.info("dog").preview is None


def test_push_needs_a_token(hub, concept_lib):
    with pytest.raises(StudioError, match="needs a token with write access: pass --token") as err:
        studio_hub.push(concept_lib, "dog", "alice/dog", endpoint=hub.url)
    assert "\n" not in str(err.value)
    assert hub.requests == []  # refused before anything was sent


def test_the_token_comes_from_hf_token(hub, concept_lib, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert studio_hub.push(concept_lib, "dog", "alice/dog", endpoint=hub.url).endswith("/alice/dog")


def test_hub_errors_are_one_actionable_line(hub, concept_lib, tmp_path, monkeypatch):
    lib = Library(tmp_path / "other")
    cases = [
        (lambda: studio_hub.pull(lib, "alice/nope", endpoint=hub.url), "hub repo alice/nope was not found"),
        (lambda: studio_hub.pull(lib, "alice/nope", token="hf_wrong", endpoint=hub.url), "refused the token (401"),
        (lambda: studio_hub.push(concept_lib, "dog", "alice/dog", token="hf_wrong", endpoint=hub.url),
         "refused the token (401: invalid or expired); create one with write access"),
        (lambda: studio_hub.push(concept_lib, "dog", "bob/dog", token=TOKEN, endpoint=hub.url),
         "may not write to bob/dog (403"),
        (lambda: studio_hub.push(concept_lib, "cat", "alice/dog", token=TOKEN, endpoint=hub.url),
         "No concept named 'cat'"),
        (lambda: studio_hub.push(concept_lib, "dog", "not a repo", token=TOKEN, endpoint=hub.url),
         "is not a hub repo id"),
        (lambda: studio_hub.pull(lib, "datasets/alice/dog", endpoint=hub.url), "concepts live in model repos"),
    ]
    for call, expected in cases:
        with pytest.raises(StudioError) as err:
            call()
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert lib.names() == []


def test_private_repos_need_the_owners_token(hub, concept_lib, tmp_path):
    studio_hub.push(concept_lib, "dog", "alice/secret", token=TOKEN, private=True, endpoint=hub.url)
    assert hub.repos["alice/secret"].private
    lib = Library(tmp_path / "other")
    with pytest.raises(StudioError, match="not found .* or it is private"):
        studio_hub.pull(lib, "alice/secret", endpoint=hub.url)
    with pytest.raises(StudioError, match="not found"):
        studio_hub.pull(lib, "alice/secret", token=BOB, endpoint=hub.url)
    studio_hub.pull(lib, "alice/secret", token=TOKEN, endpoint=hub.url)
    assert lib.names() == ["dog"]


def test_offline_mode_and_no_network_are_refused_in_one_line(hub, concept_lib, tmp_path, monkeypatch):
    lib = Library(tmp_path / "other")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (lambda: studio_hub.pull(lib, "alice/dog", endpoint=hub.url),
                 lambda: studio_hub.push(concept_lib, "dog", "alice/dog", token=TOKEN, endpoint=hub.url)):
        with pytest.raises(StudioError, match="HF_HUB_OFFLINE=1"):
            call()
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")

    import httpx2
    from huggingface_hub import HfApi

    def unreachable(*args, **kwargs):
        raise httpx2.ConnectError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(HfApi, "list_repo_tree", unreachable)
    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    with pytest.raises(StudioError, match="Cannot reach the Hugging Face Hub at .* to pull from alice/dog"):
        studio_hub.pull(lib, "alice/dog", endpoint=hub.url)
    with pytest.raises(StudioError, match="Cannot reach the Hugging Face Hub"):
        studio_hub.push(concept_lib, "dog", "alice/dog", token=TOKEN, endpoint=hub.url)


def test_pull_never_overwrites_without_force(hub, concept_lib, tiny, tmp_path):
    studio_hub.push(concept_lib, "dog", "alice/dog", token=TOKEN, endpoint=hub.url)
    lib = Library(tmp_path / "other")
    lib.add(make_ti(tiny, "<mine>", 5), "dog", preview=Image.new("RGB", (8, 8), (0, 0, 255)))
    mine = lib.path("dog").read_bytes()
    with pytest.raises(StudioError, match="already exists"):
        studio_hub.pull(lib, "alice/dog", endpoint=hub.url)
    hub.requests.clear()
    with pytest.raises(StudioError, match="already exists .* --force"):
        studio_hub.pull(lib, "alice/dog", name="dog", endpoint=hub.url)
    assert hub.requests == []  # an explicit name that clashes is refused before any download
    assert lib.path("dog").read_bytes() == mine and _files(lib.folder) == ["dog.preview.png", "dog.safetensors"]
    studio_hub.pull(lib, "alice/dog", force=True, endpoint=hub.url)
    assert lib.load("dog").tokens == ["<dog>"]
    assert Image.open(lib.preview_path("dog")).getpixel((0, 0)) == (200, 30, 30)  # its preview came too


def test_model_card_names_a_hub_base_and_lora_interop(tiny):
    from huggingface_hub import ModelCard

    concept = make_lora(tiny, "<sks>", 0)
    concept.base = dict(concept.base, name="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        identity="hub:stable-diffusion-v1-5/stable-diffusion-v1-5@abc", family="sd1")
    card = studio_hub.model_card(concept, "my dog", "alice/dog")
    data = ModelCard(card).data.to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["instance_prompt"] == "<sks>" and data["library_name"] == "personalization-studio"
    assert {"text-to-image", "diffusers", "lora", "stable-diffusion", "personalization-studio"} <= set(data["tags"])
    assert "load_lora_weights" in card and "<lora:my dog.kohya:1>" in card and "'a photo of <sks> cat'" in card
    local = make_ti(tiny, "<t>", 0)  # a base that is no hub id: no base_model
    assert "base_model" not in ModelCard(studio_hub.model_card(local, "t", "alice/t")).data.to_dict()


@pytest.mark.parametrize("spec, expected", [
    ("alice/dog", ("alice/dog", None, None)),
    ("hf://alice/dog", ("alice/dog", None, None)),
    ("alice/dog/dog.safetensors", ("alice/dog", "dog.safetensors", None)),
    ("alice/dog@v1/sub/dog.safetensors", ("alice/dog", "sub/dog.safetensors", "v1")),
    ("hf://models/alice/dog/dog.safetensors@main", ("alice/dog", "dog.safetensors", "main")),
    ("alice/dog@refs/pr/1", ("alice/dog", None, "refs/pr/1")),
    ("alice/dog@refs/pr/12/a/dog.safetensors", ("alice/dog", "a/dog.safetensors", "refs/pr/12")),
])
def test_parse_spec(spec, expected):
    ref = studio_hub.parse_spec(spec)
    assert (ref.repo_id, ref.filename, ref.revision) == expected


@pytest.mark.parametrize("spec", ["dog", "alice/../dog", "alice/dog/../x.safetensors", "alice/dog@", "-a/dog"])
def test_parse_spec_refuses(spec):
    with pytest.raises(StudioError):
        studio_hub.parse_spec(spec)


def test_cli_push_and_pull(hub, concept_lib, tmp_path, capsys):
    from studio.cli import main

    other = tmp_path / "other"
    assert main(["concepts", "push", "dog", "--repo", "alice/dog", "--library", str(concept_lib.folder),
                 "--token", TOKEN, "--endpoint", hub.url]) == 0
    assert capsys.readouterr().out.strip() == f"{hub.url}/alice/dog"
    assert main(["concepts", "pull", "alice/dog", "--library", str(other), "--endpoint", hub.url]) == 0
    assert capsys.readouterr().out.strip() == str(Library(other).path("dog"))
    assert main(["concepts", "pull", "alice/dog", "--library", str(other), "--endpoint", hub.url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: A concept named 'dog' already exists") and err.count("\n") == 1
    assert main(["concepts", "pull", "alice/dog", "--library", str(other), "--endpoint", hub.url, "--force",
                 "--name", "dog"]) == 0
    assert main(["concepts", "push", "dog", "--repo", "alice/dog", "--library", str(concept_lib.folder),
                 "--endpoint", hub.url]) == 2
    assert "needs a token" in capsys.readouterr().err


def test_the_concepts_tab_pushes_and_pulls_with_the_visitors_token_only(hub, concept_lib, tmp_path, monkeypatch):
    """The Concepts tab's Hub box: push needs the token typed on the page, and pull is anonymous without
    one — the server's own token (HF_TOKEN here: alice's) is never spent on a visitor's request."""
    from huggingface_hub import constants

    from studio.service import BaseSettings, Studio
    from studio.ui import concepts as tab
    from studio.ui.common import UIContext

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # what huggingface_hub reads at import: its constants, here
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the server's token
    studio = Studio(BaseSettings(base="tiny"), library=concept_lib.folder)
    ctx = UIContext.create(studio, out_dir=tmp_path / "out")
    with pytest.raises(StudioError, match="never uses the server's own token"):
        tab.hub_push(ctx, {"name": "dog", "repo": "alice/dog", "token": ""})
    assert hub.requests == []
    assert "alice/dog" in tab.hub_push(ctx, {"name": "dog", "repo": "alice/dog", "token": TOKEN, "private": True})
    other = UIContext.create(Studio(BaseSettings(base="tiny"), library=tmp_path / "visitor"), out_dir=tmp_path / "o2")
    with pytest.raises(StudioError, match="not found .* or it is private"):
        tab.hub_pull(other, {"spec": "alice/dog", "token": ""})  # anonymous: the private repo stays private
    assert "Pulled **dog**" in tab.hub_pull(other, {"spec": "alice/dog", "token": TOKEN})
    assert other.studio.library.names() == ["dog"]
