"""Layout of the motion commands' output videos: images side by side under a caption bar.

The caption bar is rendered once per video (matplotlib, off-screen) and stacked above every frame,
so frames stay at their own resolution and every output frame has the same even size (H.264).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np

DPI = 100
FONT_PX = 11  # 8 points at DPI 100
CHAR_PX = 0.6 * FONT_PX  # a generous average glyph width
LINE_PX = 1.3 * FONT_PX


def caption_bar(titles: Sequence[str], widths: Sequence[int]) -> np.ndarray:
    """(h, sum(widths), 3) uint8: black text on white, each title centred over its column and
    wrapped to its width; h (even) fits the longest title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    total = int(sum(widths))
    lines = [textwrap.wrap(title, max(int(width // CHAR_PX), 1)) or [""]
             for title, width in zip(titles, widths, strict=True)]
    height = 2 * math.ceil((max(map(len, lines)) * LINE_PX + 6) / 2)
    fig = Figure(figsize=(total / DPI, height / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    left = 0
    for text, width in zip(lines, widths):
        fig.text((left + width / 2) / total, 0.5, "\n".join(text), ha="center", va="center",
                 fontsize=FONT_PX * 72 / DPI, linespacing=1.1)
        left += width
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.full((height, total, 3), 255, np.uint8)  # the canvas may round to a pixel more or less
    h, w = min(height, image.shape[0]), min(total, image.shape[1])
    out[:h, :w] = image[:h, :w]
    return out


def compose(caption: np.ndarray, images: Sequence[np.ndarray]) -> np.ndarray:
    """The caption bar over `images` placed side by side (all of the caption's total width)."""
    row = np.concatenate(list(images), axis=1)
    if row.shape[1] != caption.shape[1]:
        raise ValueError(f"caption is {caption.shape[1]} px wide, the images {row.shape[1]}")
    return np.concatenate([caption, row], axis=0)
