"""Forms generated from config dataclasses (:func:`studio.configs.field_specs`), in two halves:

* :func:`form_fields` / :func:`parse_form` are plain Python (tested without gradio): which widget
  each option gets, and the typed values the form's raw widget values mean;
* :func:`build_form` creates the gradio components, grouped into accordions by the field's group.

A field added to a method's config dataclass appears in the Train form with no UI change: its type
picks the widget (bool → checkbox, ``choices`` → dropdown, int/float → number, list → text split on
commas, str → text), and a field's declared ``path`` (:func:`studio.configs.option`) picks the upload
widgets: ``"file"`` → a file upload, ``"folder"`` → a multi-file upload (the job copies both into its
folder, :mod:`studio.jobs.prepare`). A request never types a server path: a ``"model"`` field is a
text box whose value :mod:`studio.request_paths` checks (a hub id, a named value, or a path under a
folder the operator allowed). An int field such as ``num_class_images`` or ``eval_images`` is a number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from studio.errors import StudioError

Widget = Literal["checkbox", "dropdown", "int", "float", "text", "list", "file", "files"]
# Groups shown open; every other group starts collapsed (e.g. memory, checkpoints, previews).
OPEN_GROUPS = ("concept", "output", "training", "method")
GROUP_ORDER = ("concept", "output", "method", "training", "lora", "prior", "classdiffusion", "core", "flow", "data",
               "previews", "evaluation", "memory", "speed", "checkpoints", "options")


@dataclass(frozen=True)
class FormField:
    """One widget of a generated form."""

    name: str
    label: str
    widget: Widget
    default: Any  # None when the field may be left empty
    help: str
    group: str
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    path: str | None = None  # the field's declared path kind ("file", "folder", "model"), None when not a path


def form_fields(specs: list[Any]) -> list[FormField]:
    """:class:`~studio.configs.FieldSpec` s → form fields, ordered by group (:data:`GROUP_ORDER`)."""
    out = []
    for s in specs:
        if s.path == "file":
            widget: Widget = "file"
        elif s.path == "folder":  # a folder of files: uploaded as several files
            widget = "files"
        elif s.type is bool:
            widget = "checkbox"
        elif s.choices:
            widget = "dropdown"
        elif s.type is int:
            widget = "int"
        elif s.type is float:
            widget = "float"
        elif s.type is list:
            widget = "list"
        else:
            widget = "text"
        default = None if s.default is dataclasses.MISSING else s.default
        out.append(FormField(name=s.name, label=s.name.replace("_", " "), widget=widget, default=default,
                             help=s.help, group=s.group, choices=s.choices, optional=s.optional,
                             path=getattr(s, "path", None)))
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    return sorted(out, key=lambda f: rank.get(f.group, len(rank)))


def groups(fields: list[FormField]) -> dict[str, list[FormField]]:
    """Fields by group, in form order."""
    out: dict[str, list[FormField]] = {}
    for f in fields:
        out.setdefault(f.group, []).append(f)
    return out


def widget_value(field: FormField, value: Any) -> Any:
    """A config value as its widget shows it (lists joined by commas, None as empty)."""
    if field.widget == "list":
        return ", ".join(map(str, value or []))
    if value is None and (field.widget == "text" or (field.optional and field.widget in ("int", "float"))):
        return ""  # an optional number is a text box: empty = the default
    if field.widget in ("file", "files"):
        return None
    return value


def parse_form(fields: list[FormField], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Raw widget values → config values. Empty optional fields become None, numbers are checked,
    lists are split on commas; upload widgets give their file path(s) (or are left out when empty).
    Fields missing from ``raw`` are left out (the preset or the dataclass default applies)."""
    values: dict[str, Any] = {}
    for f in fields:
        if f.name not in raw:
            continue
        v = raw[f.name]
        if f.widget == "file":
            path = _path(v)
            if path:
                values[f.name] = path
            continue
        if f.widget == "files":
            paths = [p for p in (_path(x) for x in (v or [])) if p]
            if paths:
                values[f.name] = paths
            continue
        if isinstance(v, str):
            v = v.strip()
        if v is None or v == "":
            if f.widget == "checkbox":
                values[f.name] = False
            elif f.optional:
                values[f.name] = None
            elif f.widget in ("text", "list"):
                values[f.name] = "" if f.widget == "text" else []
            else:
                raise StudioError(f"{f.label} needs a value ({f.help}).")
            continue
        if f.widget in ("int", "float"):
            try:
                number = float(v)
            except (TypeError, ValueError):
                raise StudioError(f"{f.label} must be a number, got {v!r}.") from None
            if f.widget == "int" and not number.is_integer():
                raise StudioError(f"{f.label} must be a whole number, got {v}.")
            values[f.name] = int(number) if f.widget == "int" else number
        elif f.widget == "checkbox":
            values[f.name] = bool(v)
        elif f.widget == "list":
            values[f.name] = [t.strip() for t in str(v).replace("\n", ",").split(",") if t.strip()]
        else:
            values[f.name] = v
    return values


def _path(value: Any) -> str | None:
    """A gradio upload value (a path string, or an object / dict with ``path``/``name``) → its path."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        return value.get("path") or value.get("name")
    return getattr(value, "path", None) or getattr(value, "name", None)


# -- gradio ---------------------------------------------------------------------------------------
def build_form(fields: list[FormField], values: Mapping[str, Any] | None = None, *, prefix: str = "field",
               basic: tuple[str, ...] = (), open_groups: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Create one component per field inside the current gradio context, grouped in accordions;
    returns ``{field name: component}``. ``values`` (e.g. a preset) override the defaults; element
    ids are ``{prefix}-{field name}`` (accordions ``{prefix}-group-{group}``). Fields named in ``basic``
    come first, in one row outside the accordions (``{prefix}-basic``); ``open_groups`` (default
    :data:`OPEN_GROUPS`) are the accordions shown open."""
    import gradio as gr

    values = values or {}
    opened = OPEN_GROUPS if open_groups is None else open_groups
    comps: dict[str, Any] = {}
    first = sorted((f for f in fields if f.name in basic), key=lambda f: basic.index(f.name))
    if first:
        with gr.Row(equal_height=False, elem_id=f"{prefix}-basic"):
            for f in first:
                comps[f.name] = make_widget(f, values.get(f.name, f.default), elem_id=f"{prefix}-{f.name}")
    for group, members in groups([f for f in fields if f.name not in basic]).items():
        with gr.Accordion(group.capitalize(), open=group in opened, elem_id=f"{prefix}-group-{group}"):
            with gr.Row(equal_height=False):
                for f in members:
                    comps[f.name] = make_widget(f, values.get(f.name, f.default), elem_id=f"{prefix}-{f.name}")
    return comps


def make_widget(f: FormField, value: Any, *, elem_id: str | None = None) -> Any:
    import gradio as gr

    common: dict[str, Any] = dict(label=f.label, info=f.help or None, elem_id=elem_id or f"field-{f.name}", min_width=200)
    shown = widget_value(f, value)
    if f.widget == "checkbox":
        return gr.Checkbox(value=bool(shown), **common)
    if f.widget == "dropdown":
        return gr.Dropdown(choices=list(f.choices or ()), value=shown, **common)
    if f.widget in ("int", "float") and f.optional:
        return gr.Textbox(value=shown, placeholder="default", **common)
    if f.widget == "int":
        return gr.Number(value=shown, precision=0, **common)
    if f.widget == "float":
        return gr.Number(value=shown, **common)
    if f.widget in ("file", "files"):  # no 'info' on File: the help goes into the label
        label = f"{f.label} ({f.help})" if f.help else f.label
        return gr.File(file_count="single" if f.widget == "file" else "multiple", label=label,
                       elem_id=common["elem_id"], min_width=200, height=120,
                       file_types=["image"] if f.widget == "files" else None)
    return gr.Textbox(value=shown, **common)


def update_values(fields: list[FormField], values: Mapping[str, Any], names: list[str]) -> list[Any]:
    """The gradio updates that show ``values`` in the components of a form built by :func:`build_form`,
    in the order of ``names`` (the keys of its component dict); uploads are left as they are."""
    import gradio as gr

    by_name = {f.name: f for f in fields}
    out = []
    for name in names:
        f = by_name[name]
        if f.widget in ("file", "files") or name not in values:
            out.append(gr.skip())
        else:
            out.append(gr.update(value=widget_value(f, values[name])))
    return out
