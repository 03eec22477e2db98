"""The shared figure layouts render labelled images: a framed montage, bar panels, history curves."""

from __future__ import annotations

import numpy as np

from pipeline.core.figures import BarPanel, bar_panels, history_curves, labelled_montage, series


def test_labelled_montage_frames_the_grid_and_keeps_its_pixels():
    grid = np.zeros((36, 54, 3), np.uint8)  # 2 x 3 cells of 18 px
    grid[:18, :18] = (255, 0, 0)
    image = labelled_montage(grid, ["clip 1: input", "target"], ["t0", "t1", "t2"], "a title")
    assert image.dtype == np.uint8 and image.ndim == 3
    # cells of 18 px are enlarged (x4 to reach 56 px) and framed by labels and the title
    assert image.shape[0] > 4 * 36 and image.shape[1] > 4 * 54
    red = (image[..., 0] > 200) & (image[..., 1] < 50) & (image[..., 2] < 50)
    assert 0.9 * 72 * 72 <= red.sum() <= 1.1 * 72 * 72  # the red cell, scaled, and nothing else red


def test_bar_panels_leave_out_missing_values():
    panels = [BarPanel("EPE", "px", {"before": 1.2, "after": 1.1, "zero motion": 1.8}, {"zero motion"}),
              BarPanel("delta_avg", "fraction", {"before": 0.2, "after": float("nan")})]
    image = bar_panels(panels, "before vs after")
    assert image.dtype == np.uint8 and image.shape[1] > image.shape[0] > 100


def test_history_curves_take_columns_logged_at_some_steps_only():
    history = [{"step": 2, "loss": 1.0}, {"step": 3, "val_top1": 0.5},
               {"step": 4, "loss": 0.8, "val_top1": ""}]
    assert series(history, "val_top1") == ([3.0], [0.5])
    assert series(history, "loss") == ([2.0, 4.0], [1.0, 0.8])
    image = history_curves(history, {"loss": "train loss", "absent": "never logged"},
                           {"val_top1": "val top-1"}, title="curves", left_label="loss",
                           right_label="accuracy", right_lines={"chance": 0.25})
    assert image.dtype == np.uint8 and image.shape[0] > 200
