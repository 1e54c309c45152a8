"""Concept methods: one folder per method (apply, file I/O, import/export), the registry, the shared
attention processor (:mod:`studio.methods.attention`) and token table (:mod:`studio.methods.runtime`),
and the validating concept reader/writer (:mod:`studio.methods.interop`)."""

from studio.methods.base import Applied, Method
from studio.methods.interop import export_concept, export_formats, import_concept, load_concept, save_concept
from studio.methods.registry import METHODS, get_method, method_names

__all__ = ["METHODS", "Applied", "Method", "export_concept", "export_formats", "get_method", "import_concept",
           "load_concept", "method_names", "save_concept"]
