"""The evaluation report and its files: ``report.json``, a contact sheet, a scatter plot.

:class:`Report` is plain data (JSON round-trip with :meth:`Report.to_dict` / :meth:`Report.from_dict`).
:func:`write_report` writes ``report.json`` and, when given the images, ``contact_sheet.png`` (PIL)
and ``scatter.png`` (matplotlib with the Agg backend, imported only when plotting).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from studio.errors import StudioError
from studio.evaluation.metrics.formulas import MetricSummary
from studio.evaluation.metrics.selection import Choice, TradeoffPoint

REPORT_VERSION = 1


@dataclass
class ImageRecord:
    """Scores of one generated image."""

    prompt: str
    index: int  # position among this prompt's images
    clip_t_text: str  # the text CLIP-T scored
    clip_t: float
    clip_i: dict[str, float] = field(default_factory=dict)  # concept name -> mean over its references
    dino: dict[str, float] = field(default_factory=dict)
    cp_clip: float | None = None
    ti_clip: float | None = None
    context_text: str | None = None  # the text TI-CLIP scored
    cp_clip_detail: dict[str, Any] | None = None  # kept boxes, S_i, S_ij (CPClipImage.to_dict())


@dataclass
class Report:
    """Scores of one evaluation: summaries, per-image records, and how they were computed."""

    summaries: dict[str, MetricSummary]  # "clip_t", "clip_i", "dino", "cp_clip", "ti_clip", "clip_i[<name>]" ...
    records: list[ImageRecord]
    backbones: dict[str, str]  # role ("clip", "dino", "detector") -> scorer/detector name
    settings: dict[str, Any]  # text mode, crop padding, concepts (trigger, class noun, #refs) ...
    version: int = REPORT_VERSION

    def score(self, metric: str) -> float:
        """The mean of ``metric`` (e.g. ``"clip_i"``); raises when it was not computed."""
        if metric not in self.summaries:
            raise StudioError(f"This report has no '{metric}' score; it has {sorted(self.summaries)}.")
        return self.summaries[metric].mean

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes ``null``)."""
        return _json_safe(
            {
                "version": self.version,
                "summaries": {key: value.to_dict() for key, value in self.summaries.items()},
                "backbones": dict(self.backbones),
                "settings": dict(self.settings),
                "records": [asdict(record) for record in self.records],
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`."""
        try:
            summaries = {
                key: MetricSummary(
                    value["metric"],
                    value["backbone"],
                    float("nan") if value["mean"] is None else value["mean"],
                    float("nan") if value["std"] is None else value["std"],
                    value["count"],
                )
                for key, value in data["summaries"].items()
            }
            records = [ImageRecord(**record) for record in data["records"]]
            return cls(summaries, records, dict(data["backbones"]), dict(data["settings"]), int(data["version"]))
        except (KeyError, TypeError, ValueError) as err:
            raise StudioError(f"Not a studio metrics report ({err}).") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read a ``report.json``."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as err:
            raise StudioError(f"Cannot read the metrics report '{path}' ({err}).") from None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def contact_sheet(
    images: Sequence[Image.Image | None],
    *,
    columns: int = 4,
    cell: int = 256,
    captions: Sequence[str] | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """A grid of ``images`` (each fitted into a ``cell`` x ``cell`` square, ``None`` leaves a cell
    empty), filled row by row, with an optional caption under each."""
    if not any(image is not None for image in images):
        raise StudioError("A contact sheet needs at least one image.")
    if captions is not None and len(captions) != len(images):
        raise StudioError(f"Got {len(captions)} captions for {len(images)} images.")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    font = ImageFont.load_default()
    caption_h = 14 if captions is not None else 0
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption_h)), background)
    draw = ImageDraw.Draw(sheet)
    for k, image in enumerate(images):
        if image is None:
            continue
        thumb = image.convert("RGB")
        if max(thumb.size) * 2 <= cell:  # small renders (the 32-px demo world): enlarge by whole pixels
            k_up = cell // max(thumb.size)
            thumb = thumb.resize((thumb.width * k_up, thumb.height * k_up), Image.Resampling.NEAREST)
        thumb.thumbnail((cell, cell))
        x, y = (k % columns) * cell, (k // columns) * (cell + caption_h)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if captions is not None:
            text = captions[k]
            while text and draw.textlength(text, font=font) > cell - 4:
                text = text[:-2] + "…" if len(text) > 2 else ""
            draw.text((x + 2, y + cell + 1), text, fill=(0, 0, 0), font=font)
    return sheet


def _figure(size: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot, no global backend change, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise StudioError(
            "Plotting needs matplotlib, which is not installed; install it (pip install matplotlib) or skip the plot."
        ) from None
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def scatter_plot(
    xs: Sequence[float],
    ys: Sequence[float],
    path: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    highlight: Sequence[int] = (),
    chosen: int | None = None,
    xlabel: str = "prompt fidelity (CLIP-T)",
    ylabel: str = "subject fidelity (CLIP-I)",
    title: str = "",
) -> Path:
    """Scatter of ``(x, y)`` points saved as a PNG; ``highlight`` (e.g. a Pareto front) is joined by a
    line, ``chosen`` is ringed. Returns the path written."""
    fig = _figure((6, 4.5))
    ax = fig.subplots()
    ax.scatter(xs, ys, s=28, color="tab:blue", alpha=0.8)
    if highlight:
        order = sorted(highlight, key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], color="tab:orange", lw=1.5, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    if chosen is not None:
        ax.scatter([xs[chosen]], [ys[chosen]], s=160, facecolors="none", edgecolors="tab:red", linewidths=2)
    for k, text in enumerate(labels or []):
        ax.annotate(text[:40], (xs[k], ys[k]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_report(report: Report, path: str | os.PathLike[str], *, fidelity: str = "clip_i") -> Path:
    """Per-prompt mean CLIP-T (x) against mean fidelity (y), one labelled point per prompt."""
    prompts = list(dict.fromkeys(record.prompt for record in report.records))
    xs, ys = [], []
    for prompt in prompts:
        rows = [r for r in report.records if r.prompt == prompt]
        values = [v for r in rows for v in (getattr(r, fidelity) or {}).values()]
        xs.append(sum(r.clip_t for r in rows) / len(rows))
        ys.append(sum(values) / len(values) if values else float("nan"))
    name = {"clip_i": "CLIP-I", "dino": "DINO"}.get(fidelity, fidelity)
    return scatter_plot(
        xs, ys, path, labels=prompts, ylabel=f"subject fidelity ({name})", title=report.backbones.get("clip", "")
    )


def plot_sweep(points: Sequence[TradeoffPoint], choice: Choice, path: str | os.PathLike[str]) -> Path:
    """Editability (x) against fidelity (y) per strength/step, the Pareto front and the choice."""
    return scatter_plot(
        [p.editability for p in points],
        [p.fidelity for p in points],
        path,
        labels=[f"{p.value:g}" for p in points],
        highlight=choice.front,
        chosen=choice.index,
        xlabel="editability (CLIP-T)",
        ylabel="fidelity",
        title=f"recommended: {choice.value:g}",
    )


def write_report(
    report: Report,
    folder: str | os.PathLike[str],
    *,
    images_by_prompt: Mapping[str, Sequence[Image.Image]] | None = None,
    plot: bool = True,
    fidelity: str = "clip_i",
) -> dict[str, Path]:
    """Write ``report.json`` (always), ``contact_sheet.png`` (when images are given) and
    ``scatter.png`` (when ``plot``; raises a :class:`StudioError` if matplotlib is missing).

    Returns the paths written, by kind (``"report"``, ``"contact_sheet"``, ``"scatter"``).
    """
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = {"report": out / "report.json"}
        paths["report"].write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        if images_by_prompt and any(images_by_prompt.values()):
            # One row per prompt; each caption: the image's CLIP-T, then the prompt.
            per = max(len(group) for group in images_by_prompt.values())
            scores = {(r.prompt, r.index): r.clip_t for r in report.records}
            cells: list[Image.Image | None] = []
            captions: list[str] = []
            for prompt, group in images_by_prompt.items():
                for k in range(per):
                    cells.append(group[k] if k < len(group) else None)
                    captions.append(f"{scores.get((prompt, k), float('nan')):.3f} {prompt}" if k < len(group) else "")
            paths["contact_sheet"] = out / "contact_sheet.png"
            contact_sheet(cells, columns=per, captions=captions).save(paths["contact_sheet"])
        if plot:
            paths["scatter"] = plot_report(report, out / "scatter.png", fidelity=fidelity)
    except OSError as err:
        raise StudioError(f"Cannot write the report to '{out}' ({err}).") from None
    return paths
