"""Multi-view evaluation of a video classifier: view scores, per-video averages, accuracy metrics.

Every view of `pipeline.classify.data.EvalViews` (stored clip x spatial crop) is scored with the
softmax of the model's logits; a video's score is the mean over all its views (VideoMAE's
num_clips x num_crops testing). Metrics: top-1, top-k, per-class accuracy and the confusion matrix
(rows = true class, columns = predicted), plus a rendered confusion-matrix image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.core.figures import figure_image, pyplot
from pipeline.core.progress import progress


@dataclass
class ViewScores:
    """Softmax scores of every view (V, K) with the view's true label and video id; ``video_names``
    (when the views know them) names each video id by its source file."""

    scores: np.ndarray
    labels: np.ndarray
    videos: np.ndarray
    video_names: list[str] | None = None


@torch.no_grad()
def score_views(model: nn.Module, views: Dataset, *, batch_size: int = 16, device: torch.device | str = "cpu",
                workers: int = 0, autocast_dtype: torch.dtype | None = None) -> ViewScores:
    """Softmax scores of every view of `views` (items with "clip", "label", "video"; the dataset's
    ``video_names``, if it has them, are passed on)."""
    model.eval()
    device = torch.device(device)
    loader = DataLoader(views, batch_size=batch_size, shuffle=False, num_workers=workers,
                        multiprocessing_context="spawn" if workers else None)
    scores, labels, videos = [], [], []
    for batch in progress(loader, desc="evaluate", unit="batch", total=len(loader)):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(batch["clip"].to(device))
        scores.append(logits.float().softmax(dim=-1).cpu().numpy())
        labels.append(batch["label"].numpy())
        videos.append(batch["video"].numpy())
    return ViewScores(np.concatenate(scores), np.concatenate(labels), np.concatenate(videos),
                      getattr(views, "video_names", None))


def average_per_video(views: ViewScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(video ids (M,), mean score over each video's views (M, K), its label (M,)), ids ascending."""
    ids, inverse = np.unique(views.videos, return_inverse=True)
    sums = np.zeros((len(ids), views.scores.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, views.scores)
    counts = np.bincount(inverse, minlength=len(ids))[:, None]
    labels = np.zeros(len(ids), dtype=np.int64)
    labels[inverse] = views.labels
    return ids, sums / counts, labels


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (ties broken by class index)."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, pred), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> list[float | None]:
    """Recall of each class from a confusion matrix; None for a class with no examples."""
    totals = matrix.sum(axis=1)
    return [float(matrix[i, i] / n) if n else None for i, n in enumerate(totals)]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default): how far an accuracy
    measured on `trials` videos can be from the true one. (0, 1) for no trials."""
    if trials == 0:
        return 0.0, 1.0
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def classification_metrics(views: ViewScores, class_names: list[str]) -> dict:
    """Per-video metrics of multi-view scores with the top-1's 95% Wilson interval and its trivial
    baseline (`top1_majority`: predicting the most frequent class of the evaluated videos for all of
    them, the best any constant answer scores), and the single-view top-1 for comparison."""
    _, scores, labels = average_per_video(views)
    pred = scores.argmax(axis=1)
    matrix = confusion_matrix(pred, labels, len(class_names))
    k = min(5, len(class_names))
    top1 = topk_accuracy(scores, labels, 1)
    low, high = wilson_interval(int(round(top1 * len(labels))), len(labels))
    return {
        "top1": top1, f"top{k}": topk_accuracy(scores, labels, k),
        "top1_ci95_low": low, "top1_ci95_high": high,
        "top1_majority": float(np.bincount(labels, minlength=len(class_names)).max() / max(len(labels), 1)),
        "top1_single_view": topk_accuracy(views.scores, views.labels, 1),
        "videos": int(len(labels)), "views": int(len(views.labels)),
        "views_per_video": float(len(views.labels) / max(len(labels), 1)),
        "per_class": dict(zip(class_names, per_class_accuracy(matrix), strict=True)),
        "confusion": matrix.tolist(), "class_names": list(class_names),
    }


def confusion_image(matrix: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Render a confusion matrix (row-normalised colours, counts written in) as (H, W, 3) uint8."""
    plt = pyplot()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(matrix.sum())
    correct = int(np.trace(matrix))
    ax.set_title(f"top-1 {correct / max(total, 1):.3f} ({correct}/{total} videos); colour: fraction of "
                 f"the true class (row-normalised), numbers: counts", fontsize=8)
    if len(class_names) <= 30:  # counts stay legible up to about this many classes
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    return figure_image(fig)

