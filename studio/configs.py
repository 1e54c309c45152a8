"""Config dataclasses → argparse flags and UI form fields, from one source of truth.

A field's help text lives in ``field(metadata={"help": …})``; ``choices`` and ``flag`` (the CLI
name) are optional metadata too. Adding a field to a method's config adds the CLI flag and the UI
form field with no other change.

A field naming something on disk declares it (``path=``): ``"file"`` / ``"folder"`` — an input the
server reads (the UI uploads it, a job copies it), ``"model"`` — a hub id, one of the field's ``names``
(e.g. ``oracle``, the adapter presets) or a local path (:mod:`studio.request_paths` says what a web
request may name). Fields a job manages itself (the dataset, outputs, checkpoints, caches) are not
user inputs and leave ``path`` unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

PathKind = Literal["file", "folder", "model"]
PATH_KINDS: tuple[PathKind, ...] = ("file", "folder", "model")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One user-facing option of a config dataclass."""

    name: str
    type: type  # bool, int, float, str, or list[str]
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    optional: bool  # None is an allowed value
    flag: str
    group: str
    path: PathKind | None = None  # what the value names on disk (see the module docstring); None: not a path
    names: tuple[str, ...] = ()  # a "model" field's named values besides hub ids and paths (e.g. 'oracle')


def option(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A dataclass field that is a user-facing option: ``help`` (and optional ``choices``, ``group``,
    ``flag``, ``hidden``) become the CLI flag's and the UI field's text; ``path`` (``"file"``, ``"folder"``
    or ``"model"``, with a model's ``names``) declares a value the server reads from disk. A list default
    is copied per instance."""
    if meta.get("path") not in (None, *PATH_KINDS):
        raise ValueError(f"path must be one of {', '.join(PATH_KINDS)}, not {meta['path']!r}")
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def field_specs(cls: type) -> list[FieldSpec]:
    hints = get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("hidden"):
            continue
        tp, optional = _unwrap(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        specs.append(FieldSpec(
            name=f.name, type=tp, default=default, help=f.metadata.get("help", ""),
            choices=tuple(f.metadata["choices"]) if "choices" in f.metadata else None, optional=optional,
            flag=f.metadata.get("flag", "--" + f.name.replace("_", "-")), group=f.metadata.get("group", "options"),
            path=f.metadata.get("path"), names=tuple(f.metadata.get("names", ())),
        ))
    return specs


def path_fields(cls: type) -> dict[str, tuple[PathKind, tuple[str, ...]]]:
    """``{field: (path kind, named values)}`` for the fields of ``cls`` that name something on disk (hidden
    ones included)."""
    return {f.name: (f.metadata["path"], tuple(f.metadata.get("names", ()))) for f in dataclasses.fields(cls)
            if f.metadata.get("path")}


def _unwrap(tp: Any) -> tuple[type, bool]:
    optional = False
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) != len(get_args(tp))
        tp = args[0]
    if get_origin(tp) is list:
        return list, optional
    return tp, optional


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                  suppress_defaults: bool = False) -> None:
    """Add one flag per field of ``cls`` (booleans as ``--x/--no-x``).

    With ``suppress_defaults`` a flag the user did not pass is absent from the namespace, so
    presets can fill it before the dataclass default does."""
    groups: dict[str, Any] = {}
    for spec in field_specs(cls):
        if spec.name in skip:
            continue
        group = groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        required = spec.default is dataclasses.MISSING and not suppress_defaults
        quiet = required or spec.default is None or spec.default in ("", []) or "default" in spec.help
        default_txt = "" if quiet else f" (default: {spec.default})"
        kwargs: dict[str, Any] = {"dest": spec.name, "help": spec.help + default_txt}
        if spec.type is bool:
            group.add_argument(spec.flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS if suppress_defaults else spec.default, **kwargs)
            continue
        if spec.type is list:
            kwargs.update(action="append", default=argparse.SUPPRESS if suppress_defaults else None)
        else:
            kwargs.update(type=spec.type,
                          default=argparse.SUPPRESS if required or suppress_defaults else spec.default)
            if spec.choices:
                kwargs["choices"] = spec.choices
        group.add_argument(spec.flag, required=required, **kwargs)


def namespace_values(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that the parsed flags set (absent or None flags are left out)."""
    return {spec.name: getattr(ns, spec.name) for spec in field_specs(cls)
            if getattr(ns, spec.name, None) is not None}


def from_namespace(cls: type, ns: argparse.Namespace, base: dict[str, Any] | None = None, **extra: Any) -> Any:
    """Build ``cls`` from ``base`` values (e.g. a preset) overridden by the parsed flags, then ``extra``."""
    return cls(**(dict(base or {}) | namespace_values(cls, ns) | extra))


def to_flags(cls: type, values: dict[str, Any], reference: dict[str, Any] | None = None, *,
             skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line words that give ``values`` for the fields of ``cls`` — the inverse of
    :func:`add_arguments` + :func:`namespace_values`: only fields whose value differs from ``reference``
    (the values the command resolves to without the flag, e.g. a preset over the defaults) are written.

    Booleans become ``--x`` / ``--no-x``, lists one ``--x item`` per item, other values ``--x value``.
    A value the flags cannot express (``None`` over a set default, an empty list over a non-empty one)
    raises :class:`~studio.errors.StudioError` naming the field. Returns the words unquoted
    (``shlex.join`` them for a shell)."""
    from studio.errors import StudioError

    reference = reference or {}
    words: list[str] = []
    for spec in field_specs(cls):
        if spec.name in skip or spec.name not in values:
            continue
        value = values[spec.name]
        if spec.name in reference and reference[spec.name] == value:
            continue
        if spec.name not in reference and spec.default is not dataclasses.MISSING and spec.default == value:
            continue
        if value is None or (spec.type is list and not value):
            raise StudioError(f"{spec.name} = {value!r} cannot be written as a {spec.flag} flag; leave it at its "
                              f"default ({reference.get(spec.name, spec.default)!r}) or give a value.")
        if spec.type is bool:
            words.append(spec.flag if value else "--no-" + spec.flag[2:])
        elif spec.type is list:
            for item in value:
                words += [spec.flag, str(item)]
        else:
            words += [spec.flag, str(value)]
    return words


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
