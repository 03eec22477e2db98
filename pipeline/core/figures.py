"""Off-screen matplotlib figures: the helpers every picture module shares.

`pyplot` gives pyplot on the Agg backend and `figure_image` renders a figure to an (H, W, 3) uint8 array
(closing it). Three layouts are built on them: `labelled_montage` frames a grid image (equal cells) with
row labels, column labels and a title; `bar_panels` draws side-by-side bar charts with the value written
on each bar; `history_curves` draws training-history columns against the step on a left and a right axis.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DPI = 100
FONT = 8  # points: legible at DPI 100 without dwarfing small images


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_image(fig: Any) -> np.ndarray:
    """Render `fig` as an (H, W, 3) uint8 array and close it."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return image


def wrap(text: str, width_px: float, font: float = FONT + 1) -> str:
    """`text` wrapped to lines that fit `width_px` pixels at `font` points (an average glyph width)."""
    chars = max(20, int(width_px / (0.55 * font * DPI / 72)))
    return "\n".join(textwrap.wrap(text, chars))


def labelled_montage(image: np.ndarray, rows: Sequence[str], columns: Sequence[str], title: str,
                     *, min_cell_px: int = 56) -> np.ndarray:
    """A grid image of len(rows) x len(columns) equal cells with each row's label on the left, each
    column's on top and `title` above. Small cells are enlarged (nearest neighbour) to `min_cell_px`."""
    height, width = image.shape[:2]
    cell_h, cell_w = height / len(rows), width / len(columns)
    scale = max(1, math.ceil(min_cell_px / min(cell_h, cell_w)))
    label_px = 7 * max(len(line) for text in rows for line in text.splitlines()) + 16
    body_w, body_h = width * scale, height * scale
    fig_w = label_px + body_w + 12
    title = wrap(title, fig_w - 8)
    top_px = 30 + 17 * (title.count("\n") + 1)  # the title's lines, then the column labels
    fig_h = top_px + body_h + 8
    plt = pyplot()
    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    ax = fig.add_axes((label_px / fig_w, 8 / fig_h, body_w / fig_w, body_h / fig_h))
    ax.imshow(image, interpolation="nearest", aspect="auto")
    ax.set_xticks([(i + 0.5) * cell_w for i in range(len(columns))], list(columns), fontsize=FONT)
    ax.set_yticks([(i + 0.5) * cell_h for i in range(len(rows))], list(rows), fontsize=FONT)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, pad=2)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.text(0.5, 1 - 4 / fig_h, title, ha="center", va="top", fontsize=FONT + 1)
    return figure_image(fig)


@dataclass
class BarPanel:
    """One bar chart: `bars` {name: value} in order, drawn with `ylabel`; `hatched` names are references
    (hatched grey bars, e.g. a trivial baseline)."""

    title: str
    ylabel: str
    bars: dict[str, float]
    hatched: set[str] = field(default_factory=set)


def bar_panels(panels: Sequence[BarPanel], title: str, *, colours: dict[str, str] | None = None,
               value_format: str = "{:.3g}") -> np.ndarray:
    """Bar charts side by side, each bar's value written on it, under one `title`; a bar name keeps its
    colour across panels (`colours`, else matplotlib's cycle). Non-finite values are left out."""
    plt = pyplot()
    names = list(dict.fromkeys(name for panel in panels for name in panel.bars))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {name: (colours or {}).get(name, cycle[i % len(cycle)]) for i, name in enumerate(names)}
    width = max(2.6 * len(panels) + 0.4, 4.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.4), dpi=DPI, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        shown = {k: v for k, v in panel.bars.items() if v is not None and math.isfinite(v)}
        x = np.arange(len(shown))
        bars = ax.bar(x, list(shown.values()), width=0.7,
                      color=["lightgrey" if k in panel.hatched else colours[k] for k in shown],
                      edgecolor="black", linewidth=0.6)
        for bar, name in zip(bars, shown, strict=True):
            if name in panel.hatched:
                bar.set_hatch("//")
        ax.bar_label(bars, [value_format.format(v) for v in shown.values()], fontsize=FONT, padding=2)
        ax.set_xticks(x, list(shown), fontsize=FONT)
        ax.set_ylabel(panel.ylabel, fontsize=FONT)
        ax.set_title(panel.title, fontsize=FONT + 1)
        ax.tick_params(axis="y", labelsize=FONT)
        low, top = min([0.0, *shown.values()]), max([0.0, *shown.values()])  # room for the values
        ax.set_ylim(1.18 * low, 1.18 * top if top > 0 else 1.0)
    fig.suptitle(wrap(title, width * DPI - 20, FONT + 2), fontsize=FONT + 2)
    fig.tight_layout()
    return figure_image(fig)


def series(history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the history rows that hold `key` (a column may be logged at some steps only)."""
    rows = [row for row in history if row.get(key) is not None and row.get(key) != ""]
    return [float(row["step"]) for row in rows], [float(row[key]) for row in rows]


def history_curves(history: Sequence[dict], left: dict[str, str], right: dict[str, str], *, title: str,
                   left_label: str, right_label: str, right_lines: dict[str, float] | None = None,
                   right_limits: tuple[float, float] | None = None, faint: Sequence[str] = ()) -> np.ndarray:
    """History columns against the step: `left` {column: legend label} on the left axis, `right` on a
    second axis (drawn with markers), `right_lines` {label: value} as dashed reference lines on it, and
    the `faint` columns (noisy per-batch values) thin and translucent. The legend goes under the plot;
    columns absent from the history are left out."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=DPI)
    other = ax.twinx()
    handles = []
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for axis, columns, marker in ((ax, left, None), (other, right, "o")):
        for key, label in columns.items():
            steps, values = series(history, key)
            if steps:
                style = ({"linewidth": 0.8, "alpha": 0.5} if key in faint
                         else {"marker": marker, "markersize": 4, "linewidth": 1.5})
                handles += axis.plot(steps, values, color=next(cycle), label=label, **style)
    for label, value in (right_lines or {}).items():
        handles.append(other.axhline(value, color="grey", linestyle="--", linewidth=1, label=label))
    if right_limits:
        other.set_ylim(*right_limits)
    ax.set_xlabel("step", fontsize=FONT + 1)
    ax.set_ylabel(left_label, fontsize=FONT + 1)
    other.set_ylabel(right_label, fontsize=FONT + 1)
    for axis in (ax, other):
        axis.tick_params(labelsize=FONT)
    ax.grid(alpha=0.3)
    ax.set_title(wrap(title, 560), fontsize=FONT + 1)
    rows = math.ceil(len(handles) / 2)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=FONT, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.045 * rows, 1, 1))
    return figure_image(fig)
