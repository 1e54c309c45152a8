"""Concept methods: the protocol, the registry and the built-in methods."""

from studio.methods.base import Applied, Method
from studio.methods.registry import get_method, method_names, register_method

# Built-in methods register on import (order = the order the UI lists them).
from studio.methods import textual_inversion  # noqa: E402,F401  isort: skip
from studio.methods import lora  # noqa: E402,F401  isort: skip
from studio.methods import perfusion  # noqa: E402,F401  isort: skip
from studio.methods import neti  # noqa: E402,F401  isort: skip
from studio.methods import zeroshot  # noqa: E402,F401  isort: skip

__all__ = ["Applied", "Method", "get_method", "method_names", "register_method"]
