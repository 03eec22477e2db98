"""Pictures of a classifier's training: the loss and accuracy curves of its history.

`training_curves` draws the shared loop's history of the finetune stage against the step: the training
loss (soft-target cross-entropy) and the validation loss on the left axis, the validation top-1 and the
training accuracy on the right, with chance (1 / classes) as a reference line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.core.figures import history_curves


def training_curves(history: Sequence[dict], num_classes: int, title: str) -> np.ndarray:
    """The curves image (H, W, 3) uint8 of a finetune history (rows with "step", "loss", "acc" and, at
    the validation steps, "val_loss" and "val_top1_centre")."""
    return history_curves(
        history,
        left={"loss": "train loss (soft-target cross-entropy, batch)",
              "val_loss": "val loss (cross-entropy)"},
        right={"val_top1_centre": "val top-1 (centre view, per video)", "acc": "train accuracy (batch)"},
        title=title, left_label="loss", right_label="accuracy",
        right_lines={f"chance (1/{num_classes})": 1 / max(num_classes, 1)}, right_limits=(0.0, 1.02),
        faint=("acc",))
