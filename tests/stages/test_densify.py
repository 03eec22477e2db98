"""densify: dense query windows around kept tracks, re-balancing that removes static tracks and
flattens the speed histogram, flow pairs dropped when static, and the end-to-end layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.motion.label_store import (
    append_flow,
    create_label_store,
    histogram_entropy,
    open_label_store,
    read_tracks,
    speed_histogram,
)
from stages.densify import HEADLINE, Params, copy_moving_flow, dense_queries, rebalance_tracks, run
from tests.stages.test_pseudo_labels import label, make_label_inputs


def test_dense_queries_cover_windows_inside_the_frame():
    rng = np.random.default_rng(0)
    anchors = np.array([[10.2, 20.0], [11.0, 20.0], [0.0, 63.0]])
    queries = dense_queries(anchors, 3, (64, 64), cap=1000, rng=rng)
    expected = {(x, y) for x in (9, 10, 11, 12) for y in (19, 20, 21)}  # the two windows overlap
    expected |= {(x, y) for x in (0, 1) for y in (62, 63)}  # the corner window is clipped
    assert {tuple(q) for q in queries.astype(int).tolist()} == expected
    assert len(queries) == len(expected) and queries.dtype == np.float32
    capped = dense_queries(anchors, 3, (64, 64), cap=5, rng=rng)
    assert len(capped) == 5 and {tuple(q) for q in capped.astype(int).tolist()} <= expected


def test_rebalancing_drops_static_tracks_and_flattens_the_histogram():
    rng = np.random.default_rng(0)
    # mostly slow tracks, as pseudo-labels are: many near-static, a long tail of fast ones
    speeds = np.concatenate([rng.uniform(0, 0.4, 3000), rng.uniform(0.5, 1.0, 800),
                             rng.uniform(1.0, 3.0, 300), rng.uniform(4.0, 9.0, 40)])
    chosen = rebalance_tracks(speeds, static_speed=0.45, balance=True, rng=rng)
    assert (speeds[chosen] > 0.45).all()
    assert len(np.unique(chosen)) == len(chosen)
    before, after = speed_histogram(speeds), speed_histogram(speeds[chosen])
    assert histogram_entropy(after) > histogram_entropy(before) + 0.1
    moving = speed_histogram(speeds[speeds > 0.45])["counts"]
    cap = int(np.median([c for c in moving if c > 0]))
    assert max(after["counts"]) == cap  # no bin above the median non-empty bin
    assert all(a == min(m, cap) for a, m in zip(after["counts"], moving, strict=True))
    unbalanced = rebalance_tracks(speeds, 0.45, balance=False, rng=rng)
    assert np.array_equal(unbalanced, np.flatnonzero(speeds > 0.45))


def test_static_and_empty_flow_pairs_are_dropped(tmp_path):
    source = create_label_store(tmp_path / "in.zarr", image_size=(8, 8), window=8, points=4,
                                attrs={"clips": "x"})
    flow = np.zeros((3, 2, 8, 8), np.float32)
    valid = np.ones((3, 8, 8), bool)
    flow[1, 0, :4] = 3.0  # pair 1: half of its pixels move 3 px
    flow[2, 0] = 3.0
    valid[2] = False  # pair 2 moves but has no valid pixel
    append_flow(source, np.array([[0, 0, 1], [0, 1, 2], [0, 2, 3]]), flow, valid)
    out = create_label_store(tmp_path / "out.zarr", image_size=(8, 8), window=8, points=4,
                             attrs={"clips": "x"})
    assert copy_moving_flow(source, out, static_speed=1.0, params=Params(min_moving_fraction=0.25)) == 1
    assert out["flow/pairs"][:].tolist() == [[0, 1, 2]]
    assert np.array_equal(out["flow/flow"][0], flow[1].astype(np.float16))


def test_densify_end_to_end(tmp_path):
    inputs = make_label_inputs(tmp_path)
    labels = label(tmp_path, inputs)["labels"]
    out = run(Params(window_size=3, max_queries_per_window=200), labels=labels,
              tracker=inputs["tracker"], train_labels=tmp_path / "train_labels.zarr", work=tmp_path / "work",
              reports=tmp_path / "reports", metrics=tmp_path / "densify.json")
    group = open_label_store(out["train_labels"])
    source = open_label_store(labels)
    assert group["tracks/coords"].shape[1:] == source["tracks/coords"].shape[1:]
    assert group["flow/flow"].shape[1:] == source["flow/flow"].shape[1:]
    assert group.attrs["clips"] == source.attrs["clips"] and group.attrs["tau"] == source.attrs["tau"]
    assert group.attrs["tracker_iters"] == 2 == source.attrs["tracker_iters"], "pseudo_labels' count, kept"
    stats = json.loads((tmp_path / "reports" / "stats.json").read_text())
    # 4 x 4 grid queries per window, each grown to a 3 x 3 window: 9 times as many tracks to check
    assert stats["tracks_before"] == 2 * 2 * 16 and stats["tracks_dense"] == 9 * stats["tracks_before"]
    dense = open_label_store(tmp_path / "work" / "dense.zarr")
    _, _, dense_coords = read_tracks(dense)
    _, _, sparse = read_tracks(source)
    nearest = np.abs(dense_coords[:, None, 0] - sparse[None, :, 0]).max(-1).min(1)
    assert (nearest <= 1).all(), "dense queries lie in the 3 x 3 window of a kept track"
    # an untrained tracker predicts no motion: every densified track is static and is dropped
    assert stats["tracks_after"] == 0 and group["tracks/clip"].shape[0] == 0
    assert stats["flow_pairs_after"] <= stats["flow_pairs_before"]
    assert (tmp_path / "reports" / "speed_histograms.png").exists()
    assert json.loads(out["metrics"].read_text()) == {key: stats[key] for key in HEADLINE}


def test_missing_labels_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pseudo_labels"):
        run(Params(), labels=tmp_path / "none.zarr", tracker=tmp_path / "t.pt",
            train_labels=tmp_path / "o.zarr", work=tmp_path / "w", reports=tmp_path / "r",
            metrics=tmp_path / "m.json")

