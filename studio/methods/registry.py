"""Name → method. The built-in methods are listed here explicitly: the registry imports the
methods, never the reverse, so there is no registration by import side effect and no import loop.
A method declares its own file importers and exporters (``importers``, ``exporters``), which
:mod:`studio.methods.interop` reads from here."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from studio.errors import ConceptFormatError
from studio.methods.break_a_scene import BreakAScene
from studio.methods.custom_diffusion import CustomDiffusion
from studio.methods.lora import LoRA
from studio.methods.neti import NeTI
from studio.methods.perfusion import Perfusion
from studio.methods.prospect import ProSpect
from studio.methods.textual_inversion import TextualInversion
from studio.methods.zeroshot import ZeroShot

# The order is the order the UI lists them.
METHODS: MappingProxyType[str, Any] = MappingProxyType(
    {m.name: m for m in (TextualInversion(), LoRA(), Perfusion(), NeTI(), ProSpect(), CustomDiffusion(),
                         BreakAScene(), ZeroShot())})


def get_method(name: str) -> Any:
    """The method called ``name`` (a :class:`~studio.methods.base.Method`); a clear error otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(METHODS))
        raise ConceptFormatError(f"Unknown concept method {name!r}; this studio knows: {known}. "
                                 "The file may come from a newer studio.") from None


def method_names() -> list[str]:
    """Names of every method, sorted."""
    return sorted(METHODS)
