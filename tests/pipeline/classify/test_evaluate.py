"""Multi-view evaluation: batched scores equal one-by-one scores, averaged per video; metric math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.classifier import VideoClassifier
from models.video_vit import build_encoder
from pipeline.classify.data import ClipSpec, EvalViews
from pipeline.classify.evaluate import (
    ViewScores,
    average_per_video,
    classification_metrics,
    confusion_image,
    confusion_matrix,
    per_class_accuracy,
    score_views,
    topk_accuracy,
    wilson_interval,
)
from tests.pipeline.classify.test_data import write_class_store


def test_multi_view_average_equals_mean_of_single_views(tmp_path, one_thread):
    store = write_class_store(tmp_path / "clips.zarr", ["zoom_in", "zoom_out", "rotate_cw"],
                              videos_per_class=2, clips_per_video=2, val_every=1, size=32)
    views = EvalViews(store, "val", ClipSpec(4, 1, 24), num_clips=2, num_crops=3)
    torch.manual_seed(0)
    encoder = build_encoder("tiny", img_size=24, num_frames=4, patch_size=8, embed_dim=32, depth=1,
                            num_heads=2)
    model = VideoClassifier(encoder, 3, head_init_scale=50.0).eval()  # a large head: scores far from uniform
    batched = score_views(model, views, batch_size=5)
    assert batched.scores.shape == (6 * 2 * 2 * 3, 3)
    # the same views, scored one at a time and grouped by video by hand
    per_video: dict[int, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(len(views)):
            item = views[i]
            single = model(item["clip"][None]).softmax(-1)[0].numpy()
            np.testing.assert_allclose(batched.scores[i], single, rtol=1e-4, atol=1e-6)
            per_video.setdefault(item["video"], []).append(single)
    ids, averaged, labels = average_per_video(batched)
    assert list(ids) == sorted(per_video) and len(ids) == 6
    for video, scores in zip(ids, averaged, strict=True):
        assert len(per_video[video]) == 12  # 2 stored clips x 2 temporal windows x 3 crops
        np.testing.assert_allclose(scores, np.mean(per_video[video], axis=0), rtol=1e-4, atol=1e-6)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.ptp(batched.scores[:12], axis=0).max() > 1e-3  # the views really differ


def test_topk_confusion_and_per_class():
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 1, 2])
    assert topk_accuracy(scores, labels, 1) == 0.5
    assert topk_accuracy(scores, labels, 2) == 1.0
    assert topk_accuracy(scores, labels, 5) == 1.0  # k beyond the classes: everything is in the top k
    matrix = confusion_matrix(scores.argmax(1), labels, 4)
    assert matrix.tolist() == [[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert per_class_accuracy(matrix) == [1.0, 0.0, 1.0, None]


def test_metrics_average_views_before_ranking():
    # video 7: one confident wrong view, two mildly right ones -> right on average
    views = ViewScores(scores=np.array([[0.8, 0.2], [0.3, 0.7], [0.3, 0.7], [0.2, 0.8]]),
                       labels=np.array([1, 1, 1, 0]), videos=np.array([7, 7, 7, 3]))
    metrics = classification_metrics(views, ["a", "b"])
    assert metrics["top1"] == 0.5 and metrics["videos"] == 2 and metrics["views"] == 4
    assert metrics["top1_single_view"] == pytest.approx(0.5)
    assert metrics["per_class"] == {"a": 0.0, "b": 1.0}
    assert metrics["confusion"] == [[0, 1], [0, 1]]
    assert metrics["top1_majority"] == 0.5  # one video of each class
    assert (metrics["top1_ci95_low"], metrics["top1_ci95_high"]) == wilson_interval(1, 2)


def test_the_wilson_interval_narrows_with_more_videos_and_stays_in_0_1():
    # worked by hand from the formula (z = 1.96): 5 of 16 -> 0.142-0.556; 48 of 64 -> 0.632-0.840
    assert wilson_interval(5, 16) == pytest.approx((0.1416, 0.5560), abs=1e-3)
    assert wilson_interval(48, 64) == pytest.approx((0.6318, 0.8399), abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_confusion_image_is_rgb():
    image = confusion_image(np.array([[3, 1], [0, 4]]), ["left", "right"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 100
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2
