"""Share concepts on the Hugging Face Hub: :func:`push` a library concept, :func:`pull` one back.

A pushed repo holds the concept file ``NAME.safetensors`` exactly as the library stores it, its
``NAME.preview.png`` when it has one, and a ``README.md`` model card written from the concept's
metadata (trigger, method, class word, base, recommended strength, measured scores, how to use it).

Pulling downloads into a temporary folder and brings the file in through the library's own import
path (:meth:`studio.library.Library.import_file`): a file that is no concept is refused with the
library's one-line error and leaves nothing behind; an existing name is never replaced without
``force``.

Every failure — no token, a repo that does not exist, a token the hub refuses, no network,
``HF_HUB_OFFLINE=1`` — is a :class:`~studio.errors.StudioError` of one actionable sentence.
Tokens: the ``token`` argument, else huggingface_hub's usual resolution (``HF_TOKEN``, then the
login cached by ``hf auth login``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from studio.errors import StudioError
from studio.library import PREVIEW, SUFFIX, Library, check_name

if TYPE_CHECKING:
    from PIL import Image

    from studio.concept import Concept

DEFAULT_ENDPOINT = "https://huggingface.co"
# What `pull` accepts as the file to import (what `concepts import` reads); only .safetensors is picked by itself.
CONCEPT_SUFFIXES = (".safetensors", ".pt", ".bin")
# The largest concept any method accepts is a 4 GiB LoRA (its tensors) plus the header and photo embeddings.
MAX_PULL_BYTES = 4 * 1024**3 + 256 * 1024**2
MAX_PREVIEW_BYTES = 32 * 1024**2
TAGS = ("text-to-image", "personalization-studio")
LIBRARY_NAME = "personalization-studio"
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_TRUTHY = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubRef:
    """Where a concept lives on the hub: ``repo_id``, optionally a ``filename`` in it and a ``revision``."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def repo_label(self) -> str:
        """The repo as a user writes it: ``user/repo`` or ``user/repo@REV``."""
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` (``user/repo``, an ``hf://`` prefix allowed) checked against the hub's naming rules."""
    text = str(repo_id).strip()
    text = text[len("hf://"):] if text.startswith("hf://") else text
    text = text[len("models/"):] if text.startswith("models/") else text
    if not _REPO_ID.match(text) or ".." in text or "--" in text:
        raise StudioError(f"{repo_id!r} is not a hub repo id; write it as user/repo (letters, digits, '-', '_' and "
                          "'.', e.g. alice/my-dog).")
    return text


def parse_spec(spec: str) -> HubRef:
    """Parse what ``concepts pull`` takes: ``user/repo``, ``user/repo/path/in/repo.safetensors``, with an
    optional ``hf://`` prefix and revision, written ``user/repo@REV[/file]`` or ``user/repo/file@REV``."""
    text = str(spec).strip()
    raw = text
    for prefix in ("hf://", "models/"):
        text = text[len(prefix):] if text.startswith(prefix) else text
    if text.startswith(("datasets/", "spaces/")):
        raise StudioError(f"{raw!r} names a {text.split('/')[0][:-1]} repo; concepts live in model repos "
                          "(user/repo).")
    parts = text.split("/")
    if len(parts) < 2:
        raise StudioError(f"{raw!r} is not a hub concept; write user/repo or user/repo/FILE.safetensors "
                          "(optionally @REVISION).")
    namespace, name, rest = parts[0], parts[1], "/".join(parts[2:])
    revision: str | None = None
    if "@" in name:
        name, revision = name.split("@", 1)
        special = re.fullmatch(r"(pr/\d+|convert/[\w.-]+)(?:/(.*))?", rest) if revision == "refs" else None
        if special:  # refs/pr/N, refs/convert/NAME: revisions with a '/'
            revision, rest = f"refs/{special[1]}", special[2] or ""
    elif rest and "@" in parts[-1] and parts[-1].rsplit("@", 1)[0].endswith(CONCEPT_SUFFIXES):
        rest, revision = rest.rsplit("@", 1)
    if revision is not None and not revision.strip():
        raise StudioError(f"{raw!r} has an empty revision after '@'; write user/repo@REVISION or leave '@' out.")
    repo_id = check_repo_id(f"{namespace}/{name}")
    if rest and (rest.endswith("/") or "//" in rest or any(p in ("", ".", "..") for p in rest.split("/"))):
        raise StudioError(f"{raw!r}: the file inside the repo must be a plain path such as dir/NAME.safetensors.")
    return HubRef(repo_id, rest or None, revision.strip() if revision else None)


# -- push -----------------------------------------------------------------------------------------
def push(library: Library | str | os.PathLike[str], name: str, repo_id: str, *, token: str | None = None,
         private: bool = False, endpoint: str | None = None, revision: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload the library's concept ``name`` to the hub model repo ``repo_id`` and return the repo's URL.

    The commit holds ``NAME.safetensors`` (byte for byte what the library stores), ``NAME.preview.png``
    if the concept has a preview, and a ``README.md`` model card (:func:`model_card`). The repo is
    created when missing (``private`` then decides its visibility; an existing repo keeps its own).

    Args:
        library: a :class:`~studio.library.Library` or its folder.
        name: the concept's name in the library; a broken concept is refused.
        repo_id: ``user/repo`` (or ``org/repo``) on the hub.
        token: a token with write access; default ``HF_TOKEN`` or the ``hf auth login`` one.
        private: create the repo private.
        endpoint: the hub's URL (default ``HF_ENDPOINT`` or https://huggingface.co).
        revision: the branch to commit to (default ``main``).
        commit_message: default ``"Upload concept NAME"``.
    """
    lib = _library(library)
    repo_id = check_repo_id(repo_id)
    name = check_name(name)
    info = lib.info(name)  # "No concept named …" for a missing one
    if info.error:
        raise StudioError(f"Concept {name!r} cannot be pushed: {info.error}")
    _refuse_offline("push to")
    token = _token(token)
    from huggingface_hub import CommitOperationAdd, HfApi

    from studio.methods import load_concept

    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="studio-push-") as tmp:
        # A snapshot: the bytes validated, described and uploaded are the same even if the library changes meanwhile.
        file = Path(tmp) / f"{name}{SUFFIX}"
        shutil.copyfile(info.path, file)
        concept = load_concept(file)
        preview = None
        if info.preview is not None and info.preview.is_file():
            preview = Path(tmp) / f"{name}{PREVIEW}"
            shutil.copyfile(info.preview, preview)
        card = model_card(concept, name, repo_id, preview=preview is not None, file_size=file.stat().st_size)
        operations = [CommitOperationAdd(path_in_repo=file.name, path_or_fileobj=str(file))]
        if preview is not None:
            operations.append(CommitOperationAdd(path_in_repo=preview.name, path_or_fileobj=str(preview)))
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        with _hub_errors("push to", repo_id, api.endpoint):
            api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
            api.create_commit(repo_id, operations, commit_message=commit_message or f"Upload concept {name}",
                              revision=revision, repo_type="model")
    return f"{api.endpoint.rstrip('/')}/{repo_id}"


def model_card(concept: Concept, name: str, repo_id: str, *, preview: bool = False, file_size: int | None = None) -> str:
    """The ``README.md`` of a pushed concept: YAML front matter (``library_name``, ``tags``, ``base_model``
    when the base came from the hub, ``instance_prompt``) and what a user needs to apply it."""
    from huggingface_hub import ModelCardData

    from studio.evaluation.protocols import subject
    from studio.methods import export_formats, get_method

    method = get_method(concept.method)
    formats = [f for f in export_formats(concept.method) if f != "studio"]
    base = concept.base if isinstance(concept.base, dict) else {}
    base_name, family = _text(base.get("name")), _text(base.get("family"))
    hub_base = _hub_base(base)
    tags = [*TAGS[:1], "diffusers" if "diffusers" in formats else None, concept.method,
            concept.method.replace("_", "-"), _FAMILY_TAGS.get(family), *TAGS[1:]]
    data = ModelCardData(library_name=LIBRARY_NAME, tags=list(dict.fromkeys(t for t in tags if t)),
                         base_model=hub_base, instance_prompt=concept.trigger or None)
    prompt = f"a photo of {subject(concept)}"
    file = f"{name}{SUFFIX}"
    rows = [("trigger", ", ".join(f"`{_md(t)}`" for t in concept.tokens) or "—"),
            ("method", f"`{concept.method}`"),
            ("class word", _md(concept.class_word) or "—"),
            ("base", (_md(base_name) or "—") + (f" (family {_md(family)})" if family else ""))]
    if base.get("identity"):
        rows.append(("base identity", f"`{_md(_text(base['identity']))}`"))
    rows.append(("recommended strength",
                 f"{concept.strength:g}" if concept.strength is not None else "1 (as trained)"))
    rows.append(("file", f"`{_md(file)}`" + (f" ({file_size / 1024:.1f} KiB)" if file_size else "")))
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {_md(name)}", ""]
    if preview:
        lines += [f"![{_md(name)}]({quote(name + PREVIEW)})", ""]
    description = _text(getattr(method, "description", "")) or concept.method
    lines += [f"A personalized concept for text-to-image diffusion, made with the personalization studio: "
              f"{_md(description)}.", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    scores = _scores(concept.metrics)
    if scores:
        lines += ["", "## Measured", "", *scores]
    weighted = f"<{concept.trigger.strip('<>')}:0.8>" if concept.trigger else "<trigger:0.8>"
    lines += ["", "## Use it in the personalization studio", "", "```bash",
              f"python -m studio concepts pull {_shell(f'{repo_id}/{file}')}",
              f"python -m studio generate --base {_shell(base_name or 'BASE')} --concept {_shell(name)} "
              f"--prompt {_shell(prompt)} --out out.png",
              "```", "",
              f"Write the trigger in the prompt, with a strength if you like (`{weighted}`): 0 turns the concept "
              "off, 1 is as trained. The studio applies it to bases of the same family "
              f"({_md(family) or 'the one it was trained on'}) and refuses an incompatible base."]
    lines += _interop(concept, name, formats)
    return "\n".join(lines).rstrip() + "\n"


_FAMILY_TAGS = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl"}


def _interop(concept: Concept, name: str, formats: list[str]) -> list[str]:
    """The "other tools" section: export with the studio, then load in diffusers / A1111."""
    if not formats:
        return ["", f"A `{concept.method}` concept has no format other tools read; use it in the studio."]
    trigger = concept.trigger
    out: list[str] = ["", "## Use it in diffusers or AUTOMATIC1111", "",
                      "Export it with the studio first (formats: " + ", ".join(f"`{f}`" for f in formats) + "):", "",
                      "```bash"]
    out += [f"python -m studio concepts export {_shell(name)} {_shell(f'{name}.{fmt}.safetensors')} --format {fmt}"
            for fmt in formats]
    out += ["```", ""]
    if concept.method == "textual_inversion":
        sdxl = "clip_l" in concept.tensors
        out += ["In diffusers:", "", "```python"]
        if sdxl:
            out += ["from safetensors.torch import load_file", "",
                    f'state = load_file("{name}.a1111.safetensors")',
                    f'pipe.load_textual_inversion(state["clip_l"], token="{trigger}", '
                    "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                    f'pipe.load_textual_inversion(state["clip_g"], token="{trigger}", '
                    "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
        else:
            out += [f'pipe.load_textual_inversion("{name}.diffusers.safetensors", token="{trigger}")']
        out += [f'image = pipe("a photo of {trigger}").images[0]', "```", "",
                f"In AUTOMATIC1111 / ComfyUI: put `{name}.a1111.safetensors` in `embeddings/` and write its file name "
                f"(`{name}.a1111`) in the prompt."]
    elif concept.method == "lora":
        phrase = " ".join(t for t in (trigger.strip("<>"), concept.class_word) if t)  # the trigger is plain text
        out += ["In diffusers:", "", "```python",
                f'pipe.load_lora_weights(".", weight_name="{name}.diffusers.safetensors")',
                f'image = pipe("a photo of {phrase}").images[0]', "```", "",
                f"In AUTOMATIC1111 / ComfyUI: put `{name}.kohya.safetensors` in `models/Lora/` and add "
                f"`<lora:{name}.kohya:1>` and `{phrase}` to the prompt."]
    else:
        out += ["Load the exported file with the tool that reads that format."]
    return out


def _scores(metrics: Any) -> list[str]:
    """Markdown lines for what evaluation and training measured (``studio.metrics``), if anything."""
    if not isinstance(metrics, dict):
        return []
    lines: list[str] = []
    verdict = metrics.get("verdict")
    if isinstance(verdict, dict) and isinstance(verdict.get("verdict"), str):
        gain = verdict.get("gain")
        extra = f" (denoising gain over the class prompt {gain:+.3f})" if isinstance(gain, (int, float)) else ""
        lines.append(f"- training verdict: **{_md(verdict['verdict'])}**{extra}")
    for key in ("eval", "eval_multi"):
        ev = metrics.get(key)
        if not isinstance(ev, dict) or not isinstance(ev.get("scores"), dict):
            continue
        raw = ev.get("backbones")
        backbones: dict[str, Any] = raw if isinstance(raw, dict) else {}
        what = "evaluation" if key == "eval" else "multi-concept evaluation"
        setting = ", ".join(f"{k} {_md(_text(ev[k]))}" for k in ("protocol", "base", "seeds", "steps")
                            if ev.get(k) not in (None, "", [], {}))
        lines.append(f"- {what}{f' ({setting})' if setting else ''}:")
        for score, value in ev["scores"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                backbone = backbones.get(score)
                lines.append(f"  - {_md(str(score))}: {value:.4f}{f' ({_md(_text(backbone))})' if backbone else ''}")
    sweep = metrics.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("recommended"), (int, float)):
        rule = f" ({_md(_text(sweep.get('rule')))} rule)" if sweep.get("rule") else ""
        lines.append(f"- strength sweep: recommended strength {sweep['recommended']:g}{rule}")
    return lines


def _hub_base(base: dict[str, Any]) -> str | None:
    """The base's hub id when the concept was trained on a base loaded from the hub (identity ``hub:ID@COMMIT``)."""
    identity, name = _text(base.get("identity")), _text(base.get("name"))
    if identity.startswith("hub:") and _REPO_ID.match(name):
        return name
    return None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _md(text: str) -> str:
    """``text`` safe inside a markdown table cell, on one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _shell(text: str) -> str:
    """``text`` quoted for a POSIX shell when it needs it."""
    import shlex

    return shlex.quote(text)


# -- pull -----------------------------------------------------------------------------------------
def pull(library: Library | str | os.PathLike[str], spec: str, *, name: str | None = None,
         token: str | bool | None = None,
         endpoint: str | None = None, force: bool = False) -> Path:
    """Download a concept from the hub into the library and return its library file.

    Args:
        library: a :class:`~studio.library.Library` or its folder.
        spec: ``user/repo`` (the repo's one ``.safetensors`` file), or ``user/repo/path/in/repo.safetensors``;
            an ``hf://`` prefix and a revision (``user/repo@REV`` or ``…/FILE@REV``) are accepted.
        name: the library name (default: what the library's import gives it, for a studio file the
            name it was pushed under).
        token: for private or gated repos; default ``HF_TOKEN`` or the ``hf auth login`` one; ``False``:
            anonymous, whatever the machine has (the web page: a visitor never uses the server's token).
        endpoint: the hub's URL (default ``HF_ENDPOINT`` or https://huggingface.co).
        force: replace a concept of the same name (otherwise refused).

    The file goes through :meth:`~studio.library.Library.import_file` (studio, A1111, diffusers,
    kohya …); a file the library refuses leaves nothing in it. The repo's ``<stem>.preview.png``
    comes along as the concept's preview (an unreadable one is skipped).
    """
    lib = _library(library)
    ref = parse_spec(spec)
    if name is not None:
        name = check_name(name)
        if lib.exists(name) and not force:
            raise StudioError(f"A concept named {name!r} already exists in {lib.folder}; pass --force to replace it "
                              "or choose another --name.")
    _refuse_offline("pull from")
    from huggingface_hub import HfApi, RepoFile, hf_hub_download

    api = HfApi(endpoint=endpoint, token=False if token is False else (token or None))
    with _hub_errors("pull from", ref.repo_id, api.endpoint, ref.revision):
        files = {f.path: f.size for f in api.list_repo_tree(ref.repo_id, recursive=True, revision=ref.revision,
                                                            repo_type="model") if isinstance(f, RepoFile)}
    filename = ref.filename or _pick(files, ref)
    if filename not in files:
        raise StudioError(f"The hub repo {ref.repo_label()} has no file {filename!r} ({_listing(files)}).")
    if not filename.endswith(CONCEPT_SUFFIXES):
        raise StudioError(f"{ref.repo_id}/{filename} is not a concept file; pull a {', '.join(CONCEPT_SUFFIXES)} file.")
    size = files[filename]
    if isinstance(size, int) and size > MAX_PULL_BYTES:
        raise StudioError(f"{ref.repo_id}/{filename} is {size / 1024**3:.1f} GiB, larger than any concept "
                          f"({MAX_PULL_BYTES / 1024**3:.2f} GiB at most); it is not a concept file.")
    stem = filename[: -len(Path(filename).suffix)]
    preview_file = stem + PREVIEW
    has_preview = preview_file in files and (files[preview_file] or 0) <= MAX_PREVIEW_BYTES
    where = f"{ref.repo_id}/{filename}"
    with tempfile.TemporaryDirectory(prefix="studio-pull-") as tmp:

        def download(path_in_repo: str) -> Path:
            return Path(hf_hub_download(ref.repo_id, path_in_repo, revision=ref.revision, local_dir=tmp,
                                        endpoint=api.endpoint, token=False if token is False else (token or None),
                                        repo_type="model"))

        with _hub_errors("pull from", ref.repo_id, api.endpoint, ref.revision):
            local = download(filename)
        image = None
        if has_preview:
            with contextlib.suppress(StudioError), _hub_errors("pull from", ref.repo_id, api.endpoint, ref.revision):
                image = _read_preview(download(preview_file))  # a preview that fails to come is left out
        before = set(lib.names())
        try:
            path = lib.import_file(local, name, force=force)
        except StudioError as err:  # name the file as it is on the hub, not its temporary download path
            message = _rename_paths(str(err), {str(local): where, str(local.resolve()): where,
                                               str(Path(tmp)): ref.repo_id, str(Path(tmp).resolve()): ref.repo_id})
            if Path(filename).name in message and where not in message:  # a message about the file: say which
                message = f"{where} from the hub: {message}"
            raise type(err)(message) from None
    final = path.name[: -len(SUFFIX)]
    if image is not None:
        lib.set_preview(final, image)
    elif final in before:  # the replaced concept's preview shows another concept
        lib.preview_path(final).unlink(missing_ok=True)
    return path


def _pick(files: dict[str, Any], ref: HubRef) -> str:
    """The repo's one ``.safetensors`` file, or a one-line error listing the candidates."""
    found = sorted(p for p in files if p.endswith(SUFFIX))
    if len(found) == 1:
        return found[0]
    if not found:
        raise StudioError(f"The hub repo {ref.repo_label()} holds no .safetensors concept file ({_listing(files)}); "
                          f"name the file to pull as {ref.repo_id}/FILE.")
    shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
    raise StudioError(f"The hub repo {ref.repo_label()} holds several concept files ({shown}); pull one of them as "
                      f"{ref.repo_id}/FILE, e.g. {ref.repo_id}/{found[0]}.")


def _listing(files: dict[str, Any]) -> str:
    """``its files: a, b, …`` (concept files first, at most ten named) or ``the repo is empty``."""
    shown = sorted(p for p in files if p.endswith(CONCEPT_SUFFIXES)) or sorted(files)
    if not shown:
        return "the repo is empty"
    return "its files: " + ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "")


def _read_preview(path: Path) -> Image.Image | None:
    """The downloaded preview as a loaded image, or ``None`` when it is not an image."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.convert("RGBA" if "A" in im.getbands() else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None


def _rename_paths(message: str, names: dict[str, str]) -> str:
    for path in sorted(names, key=len, reverse=True):
        if len(path) > 1:
            message = message.replace(path, names[path])
    return message


# -- shared ---------------------------------------------------------------------------------------
def _library(library: Library | str | os.PathLike[str]) -> Library:
    return library if isinstance(library, Library) else Library(library)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids talking to the hub, now or at import."""
    if any(os.environ.get(v, "").strip().lower() in _TRUTHY for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _refuse_offline(action: str) -> None:
    if hub_offline():
        raise StudioError(f"HF_HUB_OFFLINE=1 (offline mode) is set, so the studio cannot {action} the Hugging Face "
                          "Hub; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) on a machine with network access.")


def _token(token: str | None) -> str:
    """``token``, else the one huggingface_hub finds (``HF_TOKEN``, the cached login); pushing needs one."""
    if token and token.strip():
        return token.strip()
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as err:  # noqa: BLE001 - an OIDC exchange (HF_OIDC_RESOURCE) that failed, an unreadable file …
        raise StudioError(f"Could not read the Hugging Face token ({type(err).__name__}: {_one_line(err)}); pass "
                          "--token hf_… instead.") from None
    if not found:
        raise StudioError("Pushing to the Hugging Face Hub needs a token with write access: pass --token hf_…, set "
                          "HF_TOKEN, or log in once with `hf auth login` (tokens: "
                          "https://huggingface.co/settings/tokens).")
    return found


@contextlib.contextmanager
def _hub_errors(action: str, repo_id: str, endpoint: str, revision: str | None = None) -> Iterator[None]:
    """Turn what huggingface_hub raises into one actionable :class:`StudioError` sentence."""
    try:
        yield
    except StudioError:
        raise
    except Exception as err:
        translated = _translate(err, action, repo_id, endpoint, revision)
        if translated is None:
            raise
        raise translated from err


def _translate(err: Exception, action: str, repo_id: str, endpoint: str,
               revision: str | None) -> StudioError | None:
    from huggingface_hub import errors as hf

    host = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    url = f"{host}/{repo_id}"
    login = "pass --token hf_…, set HF_TOKEN, or run `hf auth login`"
    if isinstance(err, hf.OfflineModeIsEnabled):
        return StudioError(f"HF_HUB_OFFLINE=1 (offline mode) is set, so the studio cannot {action} the Hugging Face "
                           "Hub; unset it on a machine with network access.")
    if isinstance(err, hf.GatedRepoError):
        return StudioError(f"The hub repo {repo_id} is gated: accept its conditions at {url} with your account, then "
                           f"{login}.")
    if isinstance(err, hf.RepositoryNotFoundError):
        return StudioError(f"The hub repo {repo_id} was not found at {host}, or it is private and your token cannot "
                           f"read it; check the name (user/repo) or {login} with a token that can.")
    if isinstance(err, hf.RevisionNotFoundError):
        return StudioError(f"The hub repo {repo_id} has no revision {revision or 'main'!r}; name an existing branch, "
                           "tag or commit after '@'.")
    if isinstance(err, hf.RemoteEntryNotFoundError):
        return StudioError(f"A file is missing from the hub repo {repo_id} ({_one_line(err)[:160]}); check the "
                           "file's path in the repo.")
    if isinstance(err, hf.HfHubHTTPError):
        status = err.response.status_code if err.response is not None else 0
        if status == 401:
            scope = " with write access" if action.startswith("push") else ""
            return StudioError(f"The Hugging Face Hub refused the token (401: invalid or expired); create one{scope} "
                               "at https://huggingface.co/settings/tokens and pass it with --token or HF_TOKEN.")
        if status == 403:
            if action.startswith("push"):
                return StudioError(f"Your token may not write to {repo_id} (403 Forbidden); use a token with write "
                                   "access to that namespace (a fine-grained token needs the repo's write scope) or "
                                   "push to a repo under your own user.")
            return StudioError(f"Your token may not read {repo_id} (403 Forbidden); request access at {url} or "
                               f"{login} with a token that can.")
        detail = _one_line(err.server_message or err)[:200]
        return StudioError(f"The Hugging Face Hub answered {status or 'an error'} while trying to {action} {repo_id}: "
                           f"{detail}")
    if isinstance(err, hf.HFValidationError):
        return StudioError(f"{repo_id!r} is not a valid hub repo id ({_one_line(err)[:160]}); write it as user/repo.")
    if isinstance(err, hf.LocalEntryNotFoundError) or isinstance(err, (ConnectionError, TimeoutError)) \
            or _is_transport_error(err):
        return StudioError(f"Cannot reach the Hugging Face Hub at {host} to {action} {repo_id} (no network, a proxy "
                           "or a firewall in the way); check the connection (HF_ENDPOINT for a mirror) and try again.")
    if isinstance(err, ValueError) and "README.md" in str(err):
        return StudioError(f"The hub refused the model card of {repo_id}: {_one_line(err)[:200]}")
    if isinstance(err, (OSError, ValueError)):
        return StudioError(f"Could not {action} {repo_id} on the Hugging Face Hub ({type(err).__name__}: "
                           f"{_one_line(err)[:200]}).")
    return None


def _is_transport_error(err: BaseException) -> bool:
    """An HTTP-level failure before any answer (connection refused, DNS, timeout, proxy)."""
    try:
        import httpx2
    except ImportError:  # huggingface_hub's HTTP client; absent, nothing raises its errors
        return False
    return isinstance(err, httpx2.TransportError)


def _one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split())
    return text or (type(err).__name__ if isinstance(err, BaseException) else "")
