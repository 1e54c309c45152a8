"""Loading pretrained encoders by Hugging Face hub id or local folder, offline-first.

Rules (shared by every backend in this package):

1. A spec naming an existing folder is loaded from that folder and nothing else
   (``local_files_only=True``: a folder missing a file fails at once instead of asking the hub).
2. A spec that looks like a path (starts with ``/``, ``.`` or ``~``, contains a backslash, or has
   more than one ``/``) but is not a folder is refused: "folder not found".
3. Otherwise the spec is a hub id. It is first loaded with ``local_files_only=True`` (a cached model
   never touches the network). When it is not cached:
   - with ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) a :class:`StudioError` says so at once;
   - otherwise one download is attempted (``huggingface_hub`` retries a few times on a dead network,
     ~25 s), and a failure becomes one :class:`StudioError` sentence.

The loaders never print a traceback for these cases; genuine bugs (``TypeError`` ...) propagate.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from studio.errors import StudioError

T = TypeVar("T")

_TRUTHY = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the environment forbids downloads (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUTHY for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def local_folder(spec: str | os.PathLike[str]) -> Path | None:
    """The folder ``spec`` names, ``None`` for a hub id; raises when ``spec`` is a missing path."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    looks_like_path = text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1
    if looks_like_path or isinstance(spec, Path):
        raise StudioError(f"Model folder '{text}' does not exist; pass an existing folder or a Hugging Face hub id.")
    if not text.strip():
        raise StudioError("An empty model name was given; pass a Hugging Face hub id or a local folder.")
    return None


def _reason(err: BaseException) -> str:
    first = str(err).strip().splitlines()
    return first[0].rstrip(".") if first else type(err).__name__


def load_pretrained(
    loader: Callable[..., T],
    spec: str | os.PathLike[str],
    what: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    is_model: bool = False,
    **kwargs: object,
) -> T:
    """Call ``loader(spec, **kwargs)`` (a ``from_pretrained``) with the offline-first rules above.

    Args:
        loader: e.g. ``AutoModel.from_pretrained``.
        spec: hub id or local folder.
        what: names the thing in error messages ("CLIP model", "DINO image processor").
        revision, cache_dir: hub revision and cache folder (hub ids only).
        is_model: the loader is a transformers ``Auto*`` model class; its PEFT-adapter probe is told
            ``local_files_only`` too (transformers 5 otherwise asks the hub even for cached models).
    """

    def call(target: str, local_only: bool, hub: bool) -> T:
        extra: dict[str, object] = dict(kwargs, local_files_only=local_only)
        if is_model:
            extra["adapter_kwargs"] = {"local_files_only": local_only}
        if hub and revision:
            extra["revision"] = revision
        if hub and cache_dir is not None:
            extra["cache_dir"] = os.fspath(cache_dir)
        return loader(target, **extra)

    folder = local_folder(spec)
    if folder is not None:
        try:
            return call(str(folder), True, False)  # a folder never needs the network
        except (OSError, ValueError, KeyError) as err:
            raise StudioError(f"Cannot load the {what} from folder '{folder}' ({_reason(err)}).") from None
    hub_id = os.fspath(spec)
    try:
        return call(hub_id, True, True)
    except (OSError, ValueError):
        pass  # not (fully) cached: decide below whether the network may be used
    if hub_offline():
        raise StudioError(
            f"The {what} '{hub_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
            "downloading it; download it once with network access or pass a local folder."
        )
    try:
        return call(hub_id, False, True)
    except (OSError, ValueError) as err:
        raise StudioError(
            f"Cannot load the {what} '{hub_id}' from the Hugging Face Hub ({_reason(err)}); check the id and "
            "your connection, or pass a local folder."
        ) from None


def hub_commit(
    hub_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> str | None:
    """The commit of the cached snapshot ``hub_id`` resolves to (from ``config.json``'s cache path), if any."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(
        hub_id, "config.json", cache_dir=os.fspath(cache_dir) if cache_dir is not None else None, revision=revision
    )
    if isinstance(path, str) and Path(path).parent.parent.name == "snapshots":
        return Path(path).parent.name
    return None


def folder_fingerprint(folder: Path, *, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".json")) -> str:
    """sha256 (first 12 hex digits) of the weight and config files' contents in ``folder``.

    Gives a local model an identity that changes when its weights do, for cache keys.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def model_identity(
    kind: str,
    spec: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> str:
    """A backbone name: ``"<kind>:<hub id>@<commit[:12]>"`` or ``"<kind>:folder:<name>:<content hash>"``."""
    folder = local_folder(spec)
    if folder is not None:
        return f"{kind}:folder:{folder.name}:{folder_fingerprint(folder)}"
    commit = hub_commit(os.fspath(spec), revision=revision, cache_dir=cache_dir)
    suffix = f"@{commit[:12]}" if commit else (f"@{revision}" if revision else "")
    return f"{kind}:{os.fspath(spec)}{suffix}"
