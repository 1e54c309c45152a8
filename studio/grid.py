"""X/Y grids: one setting varied along each axis (e.g. strength × seed), rendered as one labelled image.

>>> x = parse_axis("strength", "0, 0.5, 1", concept="my-dog")
>>> y = parse_axis("seed", "1, 2, 3")
>>> grid = xy_grid(lambda cfg: studio.generate(cfg)[0], GenerateConfig(prompt="a photo of <my-dog>"), x, y)
>>> grid.image.save("grid.png", pnginfo=png_info(grid.image))

Every cell is one image of ``cfg`` with the axis values applied (``num_images`` = 1). A strength
axis sets the default strength of one concept (a ``<tok:0.8>`` written in the prompt still wins,
as everywhere); a ``prompt`` axis is A1111's "Prompt S/R": its first value is searched in the
prompt and replaced by each value in turn.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

from studio.errors import StudioError
from studio.generation import SCHEDULERS, ConceptUse, GenerateConfig

AxisKind = Literal["seed", "steps", "guidance", "scheduler", "strength", "prompt"]
AXIS_KINDS: tuple[str, ...] = ("seed", "steps", "guidance", "scheduler", "strength", "prompt")
MAX_CELLS = 100
MIN_CELL = 128  # small images (the tiny and demo bases draw 32 px) are enlarged so labels fit


@dataclass(frozen=True)
class Axis:
    """One axis: what varies (``kind``), its values, and for ``strength`` the concept (file or library name)."""

    kind: AxisKind
    values: tuple[Any, ...]
    concept: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in AXIS_KINDS:
            raise StudioError(f"Unknown grid axis {self.kind!r}; use one of {', '.join(AXIS_KINDS)}.")
        if not self.values:
            raise StudioError(f"The {self.kind} axis has no values.")
        if self.kind == "strength" and not self.concept:
            raise StudioError("A strength axis needs the concept whose strength varies.")

    @property
    def title(self) -> str:
        return f"strength of {self.concept}" if self.kind == "strength" else self.kind

    def label(self, value: Any) -> str:
        if isinstance(value, float):
            return f"{self.kind} {value:g}"
        return f"{self.kind} {value}" if self.kind in ("seed", "steps") else str(value)

    def apply(self, cfg: GenerateConfig, value: Any) -> GenerateConfig:
        """``cfg`` with this axis at ``value`` (a new config; ``cfg`` is not changed)."""
        if self.kind == "strength":
            uses = [dataclasses.replace(c) for c in cfg.concepts]
            for use in uses:
                if use.source == self.concept:
                    use.strength = float(value)
                    break
            else:
                uses.append(ConceptUse(str(self.concept), float(value)))
            return dataclasses.replace(cfg, concepts=uses)
        if self.kind == "prompt":
            search = str(self.values[0])
            return dataclasses.replace(cfg, prompt=cfg.prompt.replace(search, str(value)))
        return dataclasses.replace(cfg, **{self.kind: value})


def parse_axis(kind: str, text: str, *, concept: str | None = None) -> Axis:
    """An axis from the text a user types: comma-separated values (``"1, 2, 3"``), and for numbers
    also ranges ``"1-4"`` (integers) — e.g. ``parse_axis("seed", "0-3")``."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise StudioError(f"Give the {kind} axis some values, separated by commas.")
    values: list[Any] = []
    try:
        for p in parts:
            if kind in ("seed", "steps"):
                if "-" in p[1:]:
                    lo, hi = (int(x) for x in p.split("-", 1))
                    if hi < lo or hi - lo > MAX_CELLS:
                        raise StudioError(f"The range {p} of the {kind} axis is empty or too long.")
                    values.extend(range(lo, hi + 1))
                else:
                    values.append(int(p))
            elif kind in ("guidance", "strength"):
                values.append(float(p))
            elif kind == "scheduler":
                if p != "default" and p not in SCHEDULERS:
                    raise StudioError(f"Unknown scheduler {p!r}; use default or one of {', '.join(SCHEDULERS)}.")
                values.append(p)
            else:
                values.append(p)
    except ValueError:
        raise StudioError(f"The {kind} axis takes numbers separated by commas, got {text!r}.") from None
    return Axis(kind, tuple(values), concept)  # type: ignore[arg-type]


@dataclass
class GridResult:
    """The labelled grid image (with a ``parameters`` PNG text) and the cell images, ``cells[row][col]``."""

    image: Image.Image
    cells: list[list[Image.Image]]
    x: Axis
    y: Axis | None
    configs: list[list[GenerateConfig]] = field(default_factory=list)


def xy_grid(render: Callable[[GenerateConfig], Image.Image], cfg: GenerateConfig, x: Axis, y: Axis | None = None,
            *, max_cells: int = MAX_CELLS, progress: Callable[[int, int], None] | None = None) -> GridResult:
    """Render ``cfg`` at every (x, y) value pair with ``render`` (one config → one image) and
    assemble the labelled grid: columns follow ``x``, rows follow ``y`` (one row without it)."""
    if y is not None and y.kind == x.kind and y.concept == x.concept:
        raise StudioError(f"Both axes vary {x.title}; choose two different settings.")
    rows = y.values if y is not None else (None,)
    total = len(rows) * len(x.values)
    if total > max_cells:
        raise StudioError(f"The grid would have {total} cells; at most {max_cells} are allowed.")
    base = dataclasses.replace(cfg, num_images=1)
    cells: list[list[Image.Image]] = []
    configs: list[list[GenerateConfig]] = []
    done = 0
    for yv in rows:
        row_cfg = y.apply(base, yv) if y is not None else base
        row, row_cfgs = [], []
        for xv in x.values:
            cell_cfg = x.apply(row_cfg, xv)
            row.append(render(cell_cfg))
            row_cfgs.append(cell_cfg)
            done += 1
            if progress is not None:
                progress(done, total)
        cells.append(row)
        configs.append(row_cfgs)
    image = assemble(cells, [x.label(v) for v in x.values], [y.label(v) for v in y.values] if y else [])
    first = cells[0][0].info.get("parameters", "")
    axes = f"X/Y grid: X {x.title} = {', '.join(map(str, x.values))}" + (
        f"; Y {y.title} = {', '.join(map(str, y.values))}" if y else "")
    image.info["parameters"] = f"{first}\n{axes}" if first else axes
    image.info["studio"] = json.dumps({"grid": {"x": _axis_json(x), "y": _axis_json(y) if y else None},
                                       "cells": [[json.loads(c.info.get("studio", "{}")) for c in r] for r in cells]})
    return GridResult(image=image, cells=cells, x=x, y=y, configs=configs)


def _axis_json(axis: Axis) -> dict[str, Any]:
    return {"kind": axis.kind, "values": list(axis.values), "concept": axis.concept}


def assemble(cells: Sequence[Sequence[Image.Image]], col_labels: Sequence[str], row_labels: Sequence[str] = (),
             ) -> Image.Image:
    """Cells (rows of equal-size images) on a white sheet, column labels on top, row labels on the left."""
    w, h = cells[0][0].size
    scale = max(1, -(-MIN_CELL // min(w, h)))
    cw, ch = w * scale, h * scale
    font = _font(14)
    pad = 6
    top = 24
    left = (max((_text_width(font, t) for t in row_labels), default=0) + 2 * pad) if row_labels else 0
    sheet = Image.new("RGB", (left + len(cells[0]) * (cw + pad) + pad, top + len(cells) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(col_labels):
        x0 = left + pad + c * (cw + pad)
        draw.text((x0 + max(0, (cw - _text_width(font, text)) // 2), 4), text, fill="black", font=font)
    for r, row in enumerate(cells):
        y0 = top + r * (ch + pad)
        if row_labels:
            draw.text((pad, y0 + ch // 2 - 7), row_labels[r], fill="black", font=font)
        for c, cell in enumerate(row):
            img = cell.convert("RGB")
            if scale > 1 or img.size != (w, h):
                img = img.resize((cw, ch), Image.Resampling.NEAREST)
            sheet.paste(img, (left + pad + c * (cw + pad), y0))
    return sheet


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    box = font.getbbox(text)
    return int(box[2] - box[0])
