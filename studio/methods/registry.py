"""Name → method registry. Methods register themselves when their module is imported; the
package ``__init__`` imports every built-in method explicitly (no entry-point magic)."""

from __future__ import annotations

from typing import Any

from studio.errors import ConceptFormatError

_METHODS: dict[str, Any] = {}


def register_method(cls: type) -> type:
    """Class decorator: register ``cls`` (a :class:`~studio.methods.base.Method`) by ``cls.name``."""
    _METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Any:
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS)) or "none"
        raise ConceptFormatError(f"Unknown concept method {name!r}; this studio knows: {known}. "
                                 "The file may come from a newer studio.") from None


def method_names() -> list[str]:
    return sorted(_METHODS)
