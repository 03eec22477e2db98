"""Tests for the synthetic video renderer: determinism, exact flow, tracks, occlusion, class motion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.data import synthetic as syn


def _interior(ids: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood is all on their own layer (away from layer boundaries)."""
    h, w = ids.shape
    p = np.pad(ids, 1, mode="edge")
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.all([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == ids for dy, dx in shifts], 0)


def _same_layer_at(ids: np.ndarray, x: np.ndarray, y: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Whether (x, y) lies inside the frame and all 4 pixels used to sample it bilinearly are on layer k."""
    h, w = ids.shape
    ok = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    x0, y0 = np.clip(np.floor(x).astype(int), 0, w - 2), np.clip(np.floor(y).astype(int), 0, h - 2)
    for dy in (0, 1):
        for dx in (0, 1):
            ok &= ids[y0 + dy, x0 + dx] == k
    return ok


def _static_background(size, num_frames, rng):
    h, w = size
    lin, off = syn._affine(num_frames, ((w - 1) / 2, (h - 1) / 2), (0.0, 0.0), 0.0, 0.0, 0.0)
    return syn._Layer(syn._texture(rng, h + 9, w + 9, syn.GT_STYLE), None, lin, off)


def _disc(num_frames, centre, velocity, rng, radius=10.0):
    shape = syn._Shape("ellipse", radius, radius)
    lin, off = syn._affine(num_frames, centre, velocity, 0.0, 0.0, 0.0)
    return syn._Layer(syn._texture(rng, 25, 25, syn.PRETRAIN_STYLE), shape, lin, off)


def test_bilinear_is_exact_on_a_linear_ramp():
    img = np.add.outer(3.0 * np.arange(6), 2.0 * np.arange(7))  # value = 3y + 2x
    x, y = np.array([0.0, 2.25, 5.5, 6.0]), np.array([0.0, 1.5, 4.75, 5.0])
    np.testing.assert_allclose(syn._bilinear(img, x, y), 3 * y + 2 * x)


def test_same_seed_same_clip_and_different_seed_different_clip():
    kw = dict(size=(32, 40), num_frames=6, num_points=16, style=syn.PRETRAIN_STYLE)
    a, b = (syn.render_motion_clip(rng=np.random.default_rng(7), **kw) for _ in range(2))
    c = syn.render_motion_clip(rng=np.random.default_rng(8), **kw)
    assert a.frames.shape == (6, 32, 40, 3) and a.frames.dtype == np.uint8
    assert a.flow.shape == (5, 32, 40, 2) and a.flow.dtype == np.float32
    assert a.tracks.shape == (6, 16, 2) and a.tracks.dtype == np.float32 and a.visible.shape == (6, 16)
    for name in ("frames", "flow", "tracks", "visible"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.frames, c.frames)
    f1, f2 = (syn.render_class_clip("zoom_in", size=(32, 32), num_frames=5, rng=np.random.default_rng(3))
              for _ in range(2))
    np.testing.assert_array_equal(f1, f2)
    assert not np.array_equal(f1, syn.render_class_clip("zoom_in", size=(32, 32), num_frames=5,
                                                        rng=np.random.default_rng(4)))


def _class(motion_class="zoom_in", size=(32, 32), num_frames=4):
    return syn.render_class_clip(motion_class, size=size, num_frames=num_frames, rng=np.random.default_rng())


def _motion(num_frames=4, num_points=4):
    return syn.render_motion_clip(size=(32, 32), num_frames=num_frames, num_points=num_points,
                                  rng=np.random.default_rng(), style=syn.GT_STYLE)


@pytest.mark.parametrize("call, match", [
    (lambda: _class("spin"), "spin"),
    (lambda: _class(size=(4, 32)), "size"),
    (lambda: _class(size=(32.5, 32)), "size"),
    (lambda: _class(num_frames=1), "num_frames"),
    (lambda: _motion(num_frames=1), "num_frames"),
    (lambda: _motion(num_points=-1), "num_points"),
    (lambda: syn.SceneStyle(speed=(3.0, 1.0)), "speed"),
    (lambda: syn.SceneStyle(textures=("plaid",)), "textures"),
    (lambda: syn.SceneStyle(num_objects=(1, 500)), "num_objects"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# GT_STYLE's geometry without its camera effects (blur, lighting drift, noise change the colours only)
GT_GEOMETRY = dataclasses.replace(syn.GT_STYLE, blur=(0.0, 0.0), lighting=0.0, noise=0.0)


@pytest.mark.parametrize("style", [syn.PRETRAIN_STYLE, GT_GEOMETRY])
def test_flow_warps_next_frame_onto_this_one(style):
    for seed in range(2):
        clip, ids, _ = syn._motion_clip((96, 96), 6, 0, np.random.default_rng(seed), style)
        for t in range(len(clip.flow)):
            yy, xx = np.nonzero(_interior(ids[t]))
            f = clip.flow[t, yy, xx]
            tx, ty = xx + f[:, 0], yy + f[:, 1]
            ok = _same_layer_at(ids[t + 1], tx, ty, ids[t, yy, xx])
            assert ok.mean() > 0.5
            src = clip.frames[t, yy[ok], xx[ok]].astype(np.float32)
            nxt = clip.frames[t + 1].astype(np.float32)
            err = np.abs(syn._bilinear(nxt, tx[ok], ty[ok]) - src).mean()
            off_by_one = np.abs(syn._bilinear(nxt, tx[ok] + 1, ty[ok] + 1) - src).mean()  # a wrong flow
            assert err < 1.5 and err < 0.3 * off_by_one, (seed, t, err, off_by_one)


def test_pure_translation_has_exactly_the_known_flow():
    rng = np.random.default_rng(0)
    size, num_frames, velocity = (48, 64), 5, (2.0, -1.0)
    layers = [_static_background(size, num_frames, rng), _disc(num_frames, (30.0, 25.0), velocity, rng)]
    frames, flow, ids = syn._render(layers, size)
    on_obj = ids[:-1] == 1
    assert on_obj.sum() > 4 * 200
    np.testing.assert_allclose(flow[on_obj], np.broadcast_to(velocity, (on_obj.sum(), 2)), atol=1e-4)
    np.testing.assert_allclose(flow[~on_obj], 0, atol=1e-4)
    # an integer shift samples the texture at the very same canonical points: pixels move unchanged
    t, yy, xx = np.nonzero(on_obj)
    diff = frames[t + 1, yy - 1, xx + 2].astype(int) - frames[t, yy, xx]
    assert np.abs(diff).max() <= 1


def test_tracks_follow_the_flow():
    for style in (syn.PRETRAIN_STYLE, syn.GT_STYLE):
        clip, ids, layer_of = syn._motion_clip((80, 96), 8, 96, np.random.default_rng(1), style)
        checked = 0
        for t in range(len(clip.flow)):
            x, y = clip.tracks[t, :, 0], clip.tracks[t, :, 1]
            ok = clip.visible[t] & clip.visible[t + 1] & _same_layer_at(ids[t], x, y, layer_of)
            predicted = clip.tracks[t, ok] + syn._bilinear(clip.flow[t], x[ok], y[ok])
            np.testing.assert_allclose(predicted, clip.tracks[t + 1, ok], atol=1e-3)
            checked += ok.sum()
        assert checked > 100


def test_points_are_visible_only_inside_the_frame_and_each_is_seen():
    for seed, style in enumerate((syn.PRETRAIN_STYLE, syn.GT_STYLE)):
        clip, _, layer_of = syn._motion_clip((64, 80), 10, 200, np.random.default_rng(seed), style)
        x, y = clip.tracks[..., 0][clip.visible], clip.tracks[..., 1][clip.visible]
        assert x.min() >= 0 and x.max() <= 79 and y.min() >= 0 and y.max() <= 63
        assert clip.visible.any(0).all()  # every point is visible at its query frame
        assert 0.25 < (layer_of > 0).mean() < 0.75  # both objects and background are tracked
        assert 0.1 < clip.visible.mean() < 1.0


def test_an_object_passing_over_a_background_point_occludes_it():
    rng = np.random.default_rng(0)
    size, num_frames = (48, 96), 21
    # a disc moving right 5 px/frame along y = 23.5, centre at x = 47.5 (over the frame centre) at t = 10
    layers = [_static_background(size, num_frames, rng), _disc(num_frames, (47.5, 23.5), (5.0, 0.0), rng)]
    layer_of = np.array([0, 0, 1])
    canon = np.array([[0.0, 0.0], [0.0, 15.0], [3.0, 2.0]])  # frame centre, 15 px below it, on the disc
    tracks, visible = syn._track(layers, layer_of, canon, size)
    np.testing.assert_allclose(tracks[:, 0], np.broadcast_to([47.5, 23.5], (num_frames, 2)))
    covered = np.abs(5.0 * (np.arange(num_frames) - 10)) <= 10  # disc radius 10, boundary included
    np.testing.assert_array_equal(visible[:, 0], ~covered)
    assert visible[:, 1].all()  # the disc never reaches it
    inside = (tracks[:, 2, 0] >= 0) & (tracks[:, 2, 0] <= 95)
    np.testing.assert_array_equal(visible[:, 2], inside)  # the top layer is never occluded
    assert not inside.all()


def _foreground_motion(motion_class: str, seed: int) -> dict[str, float]:
    """Mean dx, dy, curl and divergence of the foreground flow of a class clip."""
    layers = syn._class_scene(motion_class, np.random.default_rng(seed), (64, 64), 8, syn.CLASS_STYLE)
    _, flow, ids = syn._render(layers, (64, 64))
    fg = ids[:-1] > 0
    # finite differences of the (per-layer affine) flow, where a pixel and its right/lower neighbours
    # share a layer
    here = ids[:-1, :-1, :-1]
    same = (here > 0) & (here == ids[:-1, 1:, :-1]) & (here == ids[:-1, :-1, 1:])
    d_dx = (flow[:, :-1, 1:] - flow[:, :-1, :-1])[same]
    d_dy = (flow[:, 1:, :-1] - flow[:, :-1, :-1])[same]
    return {"dx": flow[..., 0][fg].mean(), "dy": flow[..., 1][fg].mean(),
            "curl": (d_dx[:, 1] - d_dy[:, 0]).mean(), "div": (d_dx[:, 0] + d_dy[:, 1]).mean()}


@pytest.mark.parametrize("motion_class, key, sign", [
    ("translate_left", "dx", -1), ("translate_right", "dx", 1), ("translate_up", "dy", -1),
    ("translate_down", "dy", 1), ("rotate_cw", "curl", 1), ("rotate_ccw", "curl", -1),
    ("zoom_in", "div", 1), ("zoom_out", "div", -1)])
def test_class_clips_move_as_their_class_says(motion_class, key, sign):
    # y points down, so clockwise on screen is positive curl dv_y/dx - dv_x/dy
    for seed in range(3):
        m = _foreground_motion(motion_class, seed)
        assert sign * m[key] > 0, (seed, m)
        if key in ("dx", "dy"):  # the class component dominates the nuisance motion
            assert abs(m[key]) > 2 * abs(m["dy" if key == "dx" else "dx"]), (seed, m)


def test_appearance_does_not_depend_on_the_class():
    # one seed gives the very same textures and shapes whatever the class
    scenes = [syn._class_scene(c, np.random.default_rng(5), (48, 48), 6, syn.CLASS_STYLE)
              for c in syn.MOTION_CLASSES]
    for layers in scenes[1:]:
        assert len(layers) == len(scenes[0])
        for a, b in zip(layers, scenes[0]):
            np.testing.assert_array_equal(a.texture, b.texture)
            if a.shape is not None:
                assert (a.shape.kind, a.shape.a, a.shape.b) == (b.shape.kind, b.shape.a, b.shape.b)
                np.testing.assert_array_equal(a.shape.verts, b.shape.verts)
    # so colour statistics differ far more between seeds than between classes
    clips = [[syn.render_class_clip(c, size=(48, 48), num_frames=6, rng=np.random.default_rng(seed))
              for seed in range(5)] for c in syn.MOTION_CLASSES]
    means = np.array(clips, float).mean((2, 3, 4))  # (classes, seeds, 3)
    assert means.std(0).mean() < 0.5 * means.std(1).mean()


def test_camera_effects_change_colours_only():
    """The same seed with and without GT_STYLE's camera effects: identical motion, tracks and
    visibility; frames blurred (less high-frequency energy), drifting in brightness and noisy."""
    plain, _, _ = syn._motion_clip((64, 64), 12, 32, np.random.default_rng(5), GT_GEOMETRY)
    seen, _, _ = syn._motion_clip((64, 64), 12, 32, np.random.default_rng(5), syn.GT_STYLE)
    for name in ("flow", "tracks", "visible"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(seen, name))
    a, b = plain.frames.astype(np.float32), seen.frames.astype(np.float32)
    assert np.abs(np.diff(b, axis=2)).mean() < np.abs(np.diff(a, axis=2)).mean(), "blurred"
    ratio = b.reshape(12, -1).mean(1) / a.reshape(12, -1).mean(1)
    assert abs(ratio[-1] - ratio[0]) > 0.05 and abs(ratio[0] - 1) < 0.03, "lighting drifts over the clip"


def test_the_evaluation_domain_moves_objects_1_to_10_px_over_a_near_static_background():
    """motion_gt's motion statistics (issue 15): objects 1-10 px/frame, the background under 1 px/frame."""
    speeds_obj, speeds_bg = [], []
    for seed in range(4):
        clip, ids, _ = syn._motion_clip((128, 128), 6, 0, np.random.default_rng(seed), syn.GT_STYLE)
        speed = np.linalg.norm(clip.flow, axis=-1)
        speeds_obj.append(speed[ids[:-1] > 0]), speeds_bg.append(speed[ids[:-1] == 0])
    obj, bg = np.concatenate(speeds_obj), np.concatenate(speeds_bg)
    assert np.percentile(bg, 99) < 1.0
    assert np.percentile(obj, 10) > 0.5 and 3.0 < np.median(obj) < 10.0 and np.percentile(obj, 99) < 16


def test_class_styles_fix_or_randomise_the_contrast_polarity_and_levels_are_checked():
    fixed, random = syn.CLASS_STYLES["fixed"], syn.CLASS_STYLES["random"]
    assert fixed is syn.CLASS_STYLE and fixed.object_levels[0] > fixed.background_levels[1]
    assert dataclasses.replace(random, object_levels=fixed.object_levels,
                               background_levels=fixed.background_levels) == fixed
    layers = syn._class_scene("translate_left", np.random.default_rng(3), (48, 48), 4, fixed)
    assert layers[0].texture.max() <= 0.3 + 1e-6
    assert all(layer.texture.min() >= 0.55 - 1e-6 for layer in layers[1:])
    with pytest.raises(ValueError, match="object_levels"):
        syn.SceneStyle(object_levels=(0.5, 1.2))


def test_flat_surfaces_change_only_where_an_edge_moves():
    style = dataclasses.replace(syn.CLASS_STYLE, textures=("flat",))
    layers = syn._class_scene("translate_right", np.random.default_rng(5), (48, 48), 6, style)
    for layer in layers:  # one uniform colour per surface, inside its brightness levels
        assert np.ptp(layer.texture.reshape(-1, 3), axis=0).max() == 0
    frames = syn.render_class_clip("translate_right", size=(48, 48), num_frames=6,
                                   rng=np.random.default_rng(5), style=style).astype(int)
    changed = np.abs(np.diff(frames, axis=0)).max(-1) > 2  # (T-1, H, W)
    assert 0 < changed.mean() < 0.25, "the moving edges change, the surfaces do not"
    still = np.abs(np.diff(frames, axis=0)).max(-1) == 0
    assert still.mean() > 0.75, "a flat surface away from a moving edge does not change at all"
    assert "flat" not in syn.CLASS_STYLE.textures, "no shipped style draws flat surfaces"
    with pytest.raises(ValueError, match="textures"):
        syn.SceneStyle(textures=("wood",))
