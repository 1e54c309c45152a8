"""What a web request may name on the server.

The browser UI (and the HTTP API gradio serves from it) must never make the server read a file the
operator did not mean to serve. So a request names no server path in a text value:

* files and folders a setting reads (``path="file"`` / ``"folder"`` in its :func:`~studio.configs.option`)
  arrive as uploads — gradio keeps those inside its own cache — never as typed text;
* a model setting (``path="model"``: a CLIP judge, an IP-Adapter, an image encoder, the base) is a hub
  id (``owner/name``, or ``owner/name/sub/file`` where the loader takes a file in a repo), one of the
  setting's named values (``oracle``, the adapter presets, …), or a local path under a folder the
  operator allowed when starting the app (``app.py --allow-path DIR``; by default none);
* a concept is a library name, never a file path.

Each check decides from the text alone plus the allowed folders: nothing outside them is opened, and
a refusal neither quotes a file nor says whether a path exists. The Python API and the CLI (the
operator's own code) still take paths; the UI handlers are the ones that call these checks
(through :class:`~studio.service.Studio`'s ``check_request_*`` methods).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from studio.errors import StudioError

# owner/name, optionally followed by a path inside the repo (an adapter's weights, an encoder subfolder)
_HUB = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)+$")
NAMED_BASES = ("demo", "demo-scene", "tiny", "tiny-v", "tiny-sdxl", "tiny-sd3", "tiny-flux")
ALLOW_ENV = "STUDIO_ALLOW_PATHS"


def allowed_folders(paths: Iterable[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """The operator's ``--allow-path`` entries, absolute with symlinks resolved (duplicates dropped)."""
    out: dict[Path, None] = {}
    for p in paths:
        text = str(p).strip()
        if text:
            out[Path(text).expanduser().resolve()] = None
    return tuple(out)


def allowed_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """``STUDIO_ALLOW_PATHS`` (folders separated by :data:`os.pathsep`) → its entries."""
    value = (os.environ if environ is None else environ).get(ALLOW_ENV, "")
    return [p for p in value.split(os.pathsep) if p.strip()]


def is_hub_ref(value: str, *, max_parts: int | None = None) -> bool:
    """``owner/name`` (``owner/name/sub/file`` unless ``max_parts``): the shape of a hub reference, with no
    ``.``/``..`` part, no backslash and nothing that makes it a local path (``/``, ``~``, a leading dot)."""
    if not _HUB.match(value) or "\\" in value:
        return False
    parts = value.split("/")
    if any(part in (".", "..") for part in parts):
        return False
    return max_parts is None or len(parts) <= max_parts


def under_allowed(value: str | os.PathLike[str], allowed: Sequence[Path]) -> Path | None:
    """``value`` as an absolute path when it lies, symlinks resolved, inside one of ``allowed``; else None.
    Decides from the path alone (nothing is opened; a missing path under an allowed folder is allowed)."""
    if not allowed:
        return None
    try:
        real = Path(value).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte …
        return None
    if any(real == root or real.is_relative_to(root) for root in allowed):
        return Path(value).expanduser().absolute()
    return None


def _local_exists(value: str) -> bool:
    """Whether a hub-shaped ``value`` also names something relative to the working directory (the loaders
    would read that instead of the hub)."""
    try:
        return os.path.lexists(value)
    except (OSError, ValueError):
        return True


def _allow_hint(allowed: Sequence[Path]) -> str:
    if allowed:
        return "or a path under a folder the operator allowed"
    return "(local paths are accepted only under folders the operator allows: app.py --allow-path DIR)"


def check_model(value: str, *, label: str, allowed: Sequence[Path], names: Iterable[str] = (),
                hub_parts: int | None = None) -> str:
    """A model setting from a request (see the module docstring) → the value to use: a named value or a hub
    id as given, a local path made absolute. Anything else is refused before anything is opened."""
    text = str(value).strip()
    named = tuple(names)
    if text in named:
        return text
    if is_hub_ref(text, max_parts=hub_parts) and not _local_exists(text):
        return text
    local = under_allowed(text, allowed)
    if local is not None:
        return str(local)
    choices = f"one of {', '.join(named)}, " if named else ""
    raise StudioError(f"{label} {text!r} is not accepted here: use {choices}a hub id such as owner/name "
                      f"{_allow_hint(allowed)}.")


def check_base(spec: str, *, allowed: Sequence[Path]) -> str:
    """The Base box: a named base (:data:`NAMED_BASES`), a hub id ``owner/name`` or a path under an allowed
    folder; refused before any file is opened, with a message that quotes no file and does not say whether
    the path exists."""
    text = str(spec).strip()
    if text in NAMED_BASES:
        return text
    if is_hub_ref(text, max_parts=2) and not _local_exists(text):
        return text
    local = under_allowed(text, allowed)
    if local is not None:
        return str(local)
    raise StudioError(f"Base {text!r} is not accepted here: use a hub id such as "
                      f"stable-diffusion-v1-5/stable-diffusion-v1-5, one of {', '.join(NAMED_BASES)}, "
                      f"{_allow_hint(allowed)}.")


def check_concept_name(source: str, names: Iterable[str]) -> str:
    """A concept a request names: one of the library's ``names`` (never a file path)."""
    text = str(source).strip()
    known = list(names)
    if text not in known:
        raise StudioError(f"No concept named {text!r} in the library (known: {', '.join(known) or 'none'}).")
    return text
