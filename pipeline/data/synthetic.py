"""Synthetic videos with exact ground-truth motion: seeded, deterministic, numpy only.

A scene is a textured background plus K textured object layers in depth order (last = top). Each
layer has a procedural colour texture in its own canonical coordinates, an analytic shape mask
(objects only) and one 2D affine map per frame, A_k(t): canonical -> image pixels. Frame t shows, at
pixel x, the top-most layer whose mask contains A_k(t)^-1 x, coloured by a bilinear texture lookup
there. Every layer moves affinely, so motion is known exactly:

- forward flow t->t+1 at x on layer k is A_k(t+1)(A_k(t)^-1 x) - x, in pixels, (x, y) order;
- a point p of layer k is at A_k(t) p in frame t, and is visible when it lies inside the frame and
  no layer above k contains it (occlusion is decided analytically at the exact position).

Pixel centres are integer coordinates (x in [0, W-1], y in [0, H-1]) and y points down, so a positive
rotation angle turns clockwise on screen. Motions are parameterised about the middle frame, so the
mid-clip size and placement of an object do not depend on which way it moves.

Used by `demo_data` (action classes decided by motion alone, and `data/motion_gt/` evaluation clips)
and by `motion_pretrain` (FlyingChairs/Kubric-style supervised training of the flow model and tracker).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

MOTION_CLASSES: tuple[str, ...] = ("translate_left", "translate_right", "translate_up", "translate_down",
                                   "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out")
TEXTURE_KINDS = ("noise", "stripes", "checker", "dots", "rings")
# every surface a style may draw: the textures, and "flat" (one uniform colour: no pattern, colour blobs,
# brightness field or grain), which no shipped style uses; demo_data's `textures` offers it as a control
SURFACE_KINDS = (*TEXTURE_KINDS, "flat")
PALETTES = ("vivid", "muted", "pastel")
SHAPES = ("ellipse", "rectangle", "polygon", "star")
# (saturation range, value range) of each HSV palette family
_PALETTE_SV = {"vivid": ((0.6, 1.0), (0.5, 1.0)), "muted": ((0.1, 0.4), (0.25, 0.75)),
               "pastel": ((0.15, 0.45), (0.8, 1.0))}


@dataclass(frozen=True)
class SceneStyle:
    """Statistics of a family of scenes. Ranges are (low, high), drawn uniformly per object.

    Sizes are object radii as a fraction of min(H, W); speeds are px/frame (random direction);
    rotations deg/frame and zooms d(log scale)/frame (random sign); acceleration is the largest
    px/frame^2 per axis. The background drifts at up to `background_speed` px/frame, rotates at up to
    `background_rotation` deg/frame and zooms at up to `background_zoom`. `grain` is per-texel colour
    noise (gives flow models texture to match). `nuisance` is used by class clips only: the motion
    components the class does not decide get up to this fraction of their range's low end.

    Camera effects, applied to the rendered frames (they change no motion): a Gaussian blur of
    `blur` px (sigma, drawn per clip), a lighting gain that drifts linearly by up to `lighting` (a
    fraction, random sign) from the first frame to the last, and per-pixel sensor noise of std
    `noise` (a fraction of full scale), drawn anew in every frame.

    Brightness: every object's texture is mapped linearly from [0, 1] into `object_levels`, the
    background's into `background_levels` (the default (0, 1) leaves textures as drawn). Disjoint levels
    give every scene the same contrast polarity (objects brighter than the background, say), which
    decides whether a moving edge's local change tells the direction of motion (see CLASS_STYLE).
    """

    num_objects: tuple[int, int] = (1, 4)
    object_size: tuple[float, float] = (0.1, 0.3)
    speed: tuple[float, float] = (0.5, 4.0)
    rotation: tuple[float, float] = (0.0, 2.0)
    zoom: tuple[float, float] = (0.0, 0.015)
    acceleration: float = 0.0
    background_speed: float = 1.0
    background_rotation: float = 0.0
    background_zoom: float = 0.0
    textures: tuple[str, ...] = TEXTURE_KINDS
    palettes: tuple[str, ...] = PALETTES
    shapes: tuple[str, ...] = SHAPES
    grain: float = 0.02
    nuisance: float = 0.25
    blur: tuple[float, float] = (0.0, 0.0)
    lighting: float = 0.0
    noise: float = 0.0
    object_levels: tuple[float, float] = (0.0, 1.0)
    background_levels: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("num_objects", "object_size", "speed", "rotation", "zoom", "blur"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"SceneStyle.{name} must be (low, high), 0 <= low <= high, got {(lo, hi)}")
        for name in ("object_levels", "background_levels"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"SceneStyle.{name} must be (low, high), 0 <= low <= high <= 1, "
                                 f"got {(lo, hi)}")
        if self.num_objects[1] > 100:  # layer indices are stored as int8
            raise ValueError(f"SceneStyle.num_objects allows at most 100 objects, got {self.num_objects}")
        for name, allowed in (("textures", SURFACE_KINDS), ("palettes", PALETTES), ("shapes", SHAPES)):
            values = getattr(self, name)
            if not values or set(values) - set(allowed):
                raise ValueError(f"SceneStyle.{name} must be a non-empty subset of {allowed}, got {values}")


# FlyingChairs-like: many vivid, hard-edged, sharply textured objects, large and varied motion over a
# moving background; what the flow model and tracker are pre-trained on.
PRETRAIN_STYLE = SceneStyle(num_objects=(2, 6), object_size=(0.08, 0.3), speed=(0.5, 8.0),
                            rotation=(0.0, 4.0), zoom=(0.0, 0.03), acceleration=0.15,
                            background_speed=4.0, background_rotation=1.0, background_zoom=0.01,
                            textures=("noise", "stripes", "checker"), palettes=("vivid",),
                            shapes=("rectangle", "polygon", "star"), grain=0.03)
# Evaluation clips (data/motion_gt/), the target domain refinement is judged on: a deliberate gap from
# PRETRAIN_STYLE. Other texture families (dots, rings) and muted/pastel colours, rounder shapes, smooth
# object motion of 1-10 px/frame over a near-static background (static regions: under 1 px/frame), more
# and larger objects so occlusion is frequent, and camera effects the pre-training clips never have:
# blur, a lighting drift and sensor noise. Fixed before any refinement experiment (issue 15); changing
# it afterwards to improve a result is not allowed.
GT_STYLE = SceneStyle(num_objects=(3, 7), object_size=(0.15, 0.35), speed=(1.0, 10.0),
                      rotation=(0.0, 1.5), zoom=(0.0, 0.015), acceleration=0.0,
                      background_speed=0.5, background_rotation=0.0, background_zoom=0.0,
                      textures=("dots", "rings"), palettes=("muted", "pastel"),
                      shapes=("ellipse", "polygon"), grain=0.01, blur=(0.5, 1.2), lighting=0.1,
                      noise=0.002)
# Action-recognition clips: every appearance family, 1-2 foreground objects; the ranges here are the
# magnitudes of the class motion (see render_class_clip). Objects are lit (levels 0.55-1) over a
# background in shadow (0-0.3): with one contrast polarity in every clip, the change a moving edge makes
# between two frames says which way it moves, so the direction is in reach of the encoder's linear
# tubelet embedding. With polarity drawn at random (both levels (0, 1), the demo's style until then)
# `bench/class_task_study.py --mixed-contrast` memorises the training clips and validates at chance; with
# this style it reaches 0.8 top-1 within 200 steps (README, "Demo data"). Colours, textures, shapes and
# sizes are still drawn independently of the class.
CLASS_STYLE = SceneStyle(num_objects=(1, 2), object_size=(0.15, 0.3), speed=(1.0, 3.0),
                         rotation=(2.0, 6.0), zoom=(0.015, 0.03), background_speed=0.5,
                         object_levels=(0.55, 1.0), background_levels=(0.0, 0.3))
# CLASS_STYLE with contrast polarity drawn at random: the demo's style until the class-task study showed
# it hides the direction of motion (demo_data's `contrast_polarity: random`; the first two legs of the
# shipped VQGAN were trained on it).
RANDOM_POLARITY_CLASS_STYLE = replace(CLASS_STYLE, object_levels=(0.0, 1.0), background_levels=(0.0, 1.0))
# demo_data's `contrast_polarity` -> the class style it renders
CLASS_STYLES = {"fixed": CLASS_STYLE, "random": RANDOM_POLARITY_CLASS_STYLE}


@dataclass
class MotionClip:
    """A rendered clip with exact motion ground truth (pixel coordinates, (x, y) order)."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    flow: np.ndarray  # (T-1, H, W, 2) float32, forward flow t -> t+1
    tracks: np.ndarray  # (T, P, 2) float32
    visible: np.ndarray  # (T, P) bool


@dataclass(frozen=True)
class _Shape:
    """An analytic region in canonical coordinates: ellipse/rectangle half-axes a, b or a polygon
    that is star-shaped about the origin (vertices sorted by angle, consecutive gaps < pi)."""

    kind: str
    a: float = 0.0
    b: float = 0.0
    verts: np.ndarray | None = None  # (n, 2)

    @property
    def radius(self) -> float:
        """Radius of the smallest origin-centred disc holding the shape (for culling)."""
        if self.kind == "polygon":
            return float(np.hypot(self.verts[:, 0], self.verts[:, 1]).max())
        return float(np.hypot(self.a, self.b) if self.kind == "rectangle" else max(self.a, self.b))

    def contains(self, u: np.ndarray) -> np.ndarray:
        """Whether canonical points u (..., 2) lie inside the shape."""
        x, y = u[..., 0], u[..., 1]
        if self.kind == "ellipse":
            return (x / self.a) ** 2 + (y / self.b) ** 2 <= 1
        if self.kind == "rectangle":
            return (np.abs(x) <= self.a) & (np.abs(y) <= self.b)
        v = self.verts
        angles = np.arctan2(v[:, 1], v[:, 0]) % (2 * np.pi)
        i = (np.searchsorted(angles, np.arctan2(y, x) % (2 * np.pi), side="right") - 1) % len(v)
        p0, p1 = v[i], v[(i + 1) % len(v)]
        # inside iff on the same (left) side of the sector's edge as the origin
        (x0, y0), (x1, y1) = np.moveaxis(p0, -1, 0), np.moveaxis(p1, -1, 0)
        return (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0


@dataclass
class _Layer:
    """One depth layer: texture centred on the canonical origin, shape (None = background) and the
    per-frame affine map canonical -> image, x = lin[t] @ u + off[t]."""

    texture: np.ndarray  # (h, w, 3) float32 in [0, 1]
    shape: _Shape | None
    lin: np.ndarray  # (T, 2, 2)
    off: np.ndarray  # (T, 2)

    def __post_init__(self) -> None:
        self.inv = np.linalg.inv(self.lin)

    def to_canonical(self, x: np.ndarray, t: int | np.ndarray | slice = slice(None)) -> np.ndarray:
        """Canonical coordinates of image points x (..., 2) at frame t (int), frames t (N,) for x (N, 2),
        or all frames (t a slice) for x (T, ..., 2)."""
        inv, off = self.inv[t], self.off[t]
        if isinstance(t, slice):  # align the per-frame maps with x's leading T axis
            extra = (None,) * (x.ndim - 2)
            inv, off = inv[(slice(None), *extra)], off[(slice(None), *extra)]
        return _matvec(inv, x - off)


def _matvec(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """m (..., 2, 2) @ v (..., 2), broadcasting; written out because einsum is slow for 2x2 blocks."""
    x, y = v[..., 0], v[..., 1]
    return np.stack([m[..., 0, 0] * x + m[..., 0, 1] * y, m[..., 1, 0] * x + m[..., 1, 1] * y], -1)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample img (h, w[, C]) at float pixel coordinates x, y (any shape); edges are clamped."""
    h, w = img.shape[:2]
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.intp), w - 2)
    y0 = np.minimum(np.floor(y).astype(np.intp), h - 2)
    fx, fy = (x - x0).astype(img.dtype), (y - y0).astype(img.dtype)
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    flat, i = img.reshape(h * w, -1) if img.ndim == 3 else img.ravel(), y0 * w + x0  # 1-D gathers are faster
    top = flat[i] * (1 - fx) + flat[i + 1] * fx
    bottom = flat[i + w] * (1 - fx) + flat[i + w + 1] * fx
    return top * (1 - fy) + bottom * fy


def _palette(rng: np.random.Generator, family: str, n: int) -> np.ndarray:
    """n random RGB colours (n, 3) in [0, 1] from an HSV palette family."""
    (s0, s1), (v0, v1) = _PALETTE_SV[family]
    h, s, v = rng.uniform(0, 1, n), rng.uniform(s0, s1, n), rng.uniform(v0, v1, n)
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] * (1 - s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise (h, w) in [0, 1] with blobs about `cell` texels across (two octaves)."""
    out = np.zeros((h, w))
    for c, weight in ((cell, 0.7), (cell / 2.5, 0.3)):
        grid = rng.uniform(0, 1, (int(h / c) + 3, int(w / c) + 3))
        yy, xx = np.mgrid[0:h, 0:w] / c
        out += weight * _bilinear(grid, xx + rng.uniform(0, 1), yy + rng.uniform(0, 1))
    return out


def _texture(rng: np.random.Generator, h: int, w: int, style: SceneStyle) -> np.ndarray:
    """A procedural colour texture (h, w, 3) float32, its centre at the canonical origin."""
    kind = style.textures[rng.integers(len(style.textures))]
    colours = _palette(rng, style.palettes[rng.integers(len(style.palettes))], 3)
    if kind == "flat":
        return np.broadcast_to(np.clip(colours[0], 0, 1), (h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w] - np.array([(h - 1) / 2, (w - 1) / 2])[:, None, None]
    phi = rng.uniform(0, np.pi)
    a, b = xx * np.cos(phi) + yy * np.sin(phi), -xx * np.sin(phi) + yy * np.cos(phi)
    period = rng.uniform(5, 22)
    if kind == "noise":
        m = _noise(rng, h, w, rng.uniform(6, 30))
        m = (m - m.min()) / (np.ptp(m) + 1e-6)
    elif kind == "stripes":  # sharpened sine: between soft waves and hard bars
        wave = np.sin(2 * np.pi * a / period + rng.uniform(0, 2 * np.pi))
        m = np.clip(0.5 + rng.uniform(0.5, 3) * wave, 0, 1)
    elif kind == "checker":
        m = (np.floor(a / period) + np.floor(b / period)) % 2
    elif kind == "dots":
        da, db = a / period - np.round(a / period), b / period - np.round(b / period)
        m = (np.hypot(da, db) < rng.uniform(0.15, 0.4)).astype(float)
    else:  # rings about a random centre
        r = np.hypot(xx - rng.uniform(-0.3, 0.3) * w, yy - rng.uniform(-0.3, 0.3) * h)
        m = 0.5 + 0.5 * np.sin(2 * np.pi * r / period)
    tex = colours[0] * (1 - m[..., None]) + colours[1] * m[..., None]
    # a third colour in low-frequency blobs and a brightness field: real surfaces are rarely uniform
    blend = 0.5 * _noise(rng, h, w, rng.uniform(15, 50))[..., None]
    tex = (tex * (1 - blend) + colours[2] * blend) * (0.75 + 0.5 * _noise(rng, h, w, 25.0))[..., None]
    tex = tex + rng.normal(0, style.grain, tex.shape)
    # [1 2 1] blur both ways: removes aliasing of hard texture edges, so bilinear resampling is faithful
    p = np.pad(tex, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return np.clip((p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4, 0, 1).astype(np.float32)


def _random_shape(rng: np.random.Generator, kinds: tuple[str, ...], r: float) -> _Shape:
    """A random shape of the given kinds, contained in the disc of radius r."""
    kind = kinds[rng.integers(len(kinds))]
    if kind == "ellipse":
        return _Shape("ellipse", r, r * rng.uniform(0.45, 1))
    if kind == "rectangle":
        return _Shape("rectangle", 0.7 * r, 0.7 * r * rng.uniform(0.4, 1))
    if kind == "polygon":  # angle jitter keeps every gap < pi, so the polygon stays star-shaped
        n = int(rng.integers(3, 9))
        angles = 2 * np.pi * (np.arange(n) + rng.uniform(-0.2, 0.2, n)) / n
        radii = r * rng.uniform(0.55, 1, n)
    else:
        n = 2 * int(rng.integers(4, 8))
        angles = 2 * np.pi * np.arange(n) / n
        radii = r * np.where(np.arange(n) % 2 == 0, 1.0, rng.uniform(0.35, 0.6))
    angles = (angles + rng.uniform(0, 2 * np.pi)) % (2 * np.pi)
    order = np.argsort(angles)
    return _Shape("polygon", verts=np.stack([np.cos(angles), np.sin(angles)], -1)[order] * radii[order, None])


def _affine(num_frames: int, centre, velocity, angle: float, omega: float, zoom: float,
            accel=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame maps u -> s(t) R(theta(t)) u + c(t), parameterised about the middle frame."""
    tau = np.arange(num_frames) - (num_frames - 1) / 2
    theta, scale = angle + omega * tau, np.exp(zoom * tau)
    cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
    lin = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    off = np.asarray(centre) + np.outer(tau, velocity) + 0.5 * np.outer(tau**2, accel)
    return lin, off


def _object(rng: np.random.Generator, size: tuple[int, int], style: SceneStyle) -> tuple[_Shape, np.ndarray]:
    """An object's appearance: shape and texture (covering the shape's disc)."""
    r = rng.uniform(*style.object_size) * min(size)
    n = 2 * int(np.ceil(r)) + 5
    return _random_shape(rng, style.shapes, r), _levels(_texture(rng, n, n, style), style.object_levels)


def _levels(texture: np.ndarray, levels: tuple[float, float]) -> np.ndarray:
    """`texture` in [0, 1] mapped linearly into [low, high]; untouched for (0, 1)."""
    low, high = levels
    if (low, high) == (0.0, 1.0):
        return texture
    return (low + (high - low) * texture).astype(np.float32)


def _background(rng: np.random.Generator, size: tuple[int, int], num_frames: int, style: SceneStyle,
                velocity) -> _Layer:
    """A background layer centred on the frame, its texture big enough that its edges never show."""
    h, w = size
    omega = np.deg2rad(rng.uniform(-1, 1) * style.background_rotation)
    lin, off = _affine(num_frames, ((w - 1) / 2, (h - 1) / 2), velocity, 0.0, omega,
                       rng.uniform(-1, 1) * style.background_zoom)
    layer = _Layer(np.zeros((1, 1, 3), np.float32), None, lin, off)
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    half = np.ceil(np.abs(layer.to_canonical(np.broadcast_to(corners, (num_frames, 4, 2)))).max((0, 1))) + 2
    layer.texture = _levels(_texture(rng, 2 * int(half[1]) + 1, 2 * int(half[0]) + 1, style),
                            style.background_levels)
    return layer


def _random_velocity(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A velocity of uniform magnitude in [lo, hi] and uniform direction."""
    a = rng.uniform(0, 2 * np.pi)
    return rng.uniform(lo, hi) * np.array([np.cos(a), np.sin(a)])


def _random_scene(rng: np.random.Generator, size: tuple[int, int], num_frames: int,
                  style: SceneStyle) -> list[_Layer]:
    """Background + objects with independent random motion drawn from `style`."""
    h, w = size
    layers = [_background(rng, size, num_frames, style, _random_velocity(rng, 0, style.background_speed))]
    for _ in range(int(rng.integers(style.num_objects[0], style.num_objects[1] + 1))):
        shape, tex = _object(rng, size, style)
        sign = rng.choice([-1.0, 1.0], 2)
        centre, velocity = rng.uniform(0.05, 0.95, 2) * (w, h), _random_velocity(rng, *style.speed)
        angle, omega = rng.uniform(0, 2 * np.pi), sign[0] * np.deg2rad(rng.uniform(*style.rotation))
        lin, off = _affine(num_frames, centre, velocity, angle, omega, sign[1] * rng.uniform(*style.zoom),
                           rng.uniform(-1, 1, 2) * style.acceleration)
        layers.append(_Layer(tex, shape, lin, off))
    return layers


def _class_scene(motion_class: str, rng: np.random.Generator, size: tuple[int, int], num_frames: int,
                 style: SceneStyle) -> list[_Layer]:
    """Background with small random drift + 1..n objects that all follow the class motion.

    Every class makes the same random draws in the same order, so appearance (and, for one seed, even
    the very textures and shapes) is independent of the class.
    """
    if motion_class not in MOTION_CLASSES:
        raise ValueError(f"unknown motion class {motion_class!r}; expected one of {MOTION_CLASSES}")
    h, w = size
    extent, span = np.array([w, h], float), num_frames - 1
    layers = [_background(rng, size, num_frames, style, _random_velocity(rng, 0, style.background_speed))]
    for _ in range(max(1, int(rng.integers(style.num_objects[0], style.num_objects[1] + 1)))):
        shape, tex = _object(rng, size, style)
        nuisance = rng.uniform(-1, 1, 4) * style.nuisance
        velocity = nuisance[:2] * style.speed[0]
        omega, zoom = np.deg2rad(nuisance[2] * style.rotation[0]), nuisance[3] * style.zoom[0]
        speed, spin, rate = rng.uniform(*style.speed), rng.uniform(*style.rotation), rng.uniform(*style.zoom)
        placement, angle = rng.uniform(-1, 1, 2), rng.uniform(0, 2 * np.pi)
        kind, direction = motion_class.split("_")
        if kind == "translate":  # y points down: "up" is -y
            axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[direction]
            velocity[axis] = sign * min(speed, 0.7 * extent[axis] / span)  # travel at most 70% of the frame
        elif kind == "rotate":  # positive angle turns clockwise on screen
            omega = np.deg2rad(spin) * (1 if direction == "cw" else -1)
        else:  # at most x3 in scale over the clip, so the object stays recognisable
            zoom = min(rate, np.log(3) / span) * (1 if direction == "in" else -1)
        # centre the path in the frame, with the slack left by the travel used for random placement
        slack = np.maximum(0, (extent - np.abs(velocity) * span) / 2 - 0.1 * extent)
        centre = (extent - 1) / 2 + placement * slack
        layers.append(_Layer(tex, shape, *_affine(num_frames, centre, velocity, angle, omega, zoom)))
    return layers


def _render(layers: list[_Layer], size: tuple[int, int], with_flow: bool = True
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Frames (T, H, W, 3) uint8, forward flow (T-1, H, W, 2) float32 or None, and the index of the
    layer seen at each pixel (T, H, W) int8."""
    h, w = size
    num_frames = layers[0].lin.shape[0]
    grid = np.stack(np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float)), -1)  # (H, W, 2) (x, y)
    ids = np.zeros((num_frames, h, w), np.int8)
    for k, layer in enumerate(layers[1:], 1):  # painter's order: later layers overwrite
        reach = layer.shape.radius * np.sqrt(np.abs(np.linalg.det(layer.lin))) + 1
        for t in range(num_frames):  # only the pixels within the object's bounding box
            (cx, cy), r = layer.off[t], reach[t]
            x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 2)
            y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 2)
            if x0 < x1 and y0 < y1:
                box = ids[t, y0:y1, x0:x1]
                box[layer.shape.contains(layer.to_canonical(grid[y0:y1, x0:x1], t))] = k
    frames = np.empty((num_frames, h, w, 3), np.float32)
    flow = np.zeros((num_frames - 1, h, w, 2), np.float32) if with_flow else None
    for k, layer in enumerate(layers):
        t, yy, xx = np.nonzero(ids == k)
        x = grid[yy, xx]
        u = layer.to_canonical(x, t)
        th, tw = layer.texture.shape[:2]
        frames[t, yy, xx] = _bilinear(layer.texture, u[:, 0] + (tw - 1) / 2, u[:, 1] + (th - 1) / 2)
        if with_flow:
            m = t < num_frames - 1
            nxt = _matvec(layer.lin[t[m] + 1], u[m]) + layer.off[t[m] + 1]
            flow[t[m], yy[m], xx[m]] = nxt - x[m]
    return np.round(frames * 255).astype(np.uint8), flow, ids


def _track(layers: list[_Layer], layer_of: np.ndarray, canon: np.ndarray, size: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Tracks (T, P, 2) float32 and visibility (T, P) of canonical points `canon` (P, 2) on layers
    `layer_of` (P,)."""
    h, w = size
    num_frames, p = layers[0].lin.shape[0], len(canon)
    tracks, visible = np.zeros((num_frames, p, 2)), np.zeros((num_frames, p), bool)
    for k in np.unique(layer_of):
        sel = layer_of == k
        pos = _matvec(layers[k].lin[:, None], canon[sel]) + layers[k].off[:, None]
        vis = (pos[..., 0] >= 0) & (pos[..., 0] <= w - 1) & (pos[..., 1] >= 0) & (pos[..., 1] <= h - 1)
        if layers[k].shape is not None:  # a point off its own shape is never seen
            vis &= layers[k].shape.contains(canon[sel])
        for above in layers[k + 1:]:
            vis &= ~above.shape.contains(above.to_canonical(pos))
        tracks[:, sel], visible[:, sel] = pos, vis
    return tracks.astype(np.float32), visible


def _sample_points(layers: list[_Layer], ids: np.ndarray, num_points: int, rng: np.random.Generator,
                   size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Layer index (P,) and canonical position (P, 2) of points visible at a random query frame, half
    on objects and half on the background (where both are in view)."""
    num_frames, h, w = ids.shape
    query = rng.integers(0, num_frames, num_points)
    flat = np.zeros(num_points, np.intp)
    for t in np.unique(query):
        sel = np.flatnonzero(query == t)
        on_obj = ids[t].ravel() > 0
        weight = np.where(on_obj, 0.5 / max(on_obj.sum(), 1), 0.5 / max((~on_obj).sum(), 1))
        flat[sel] = rng.choice(h * w, sel.size, p=weight / weight.sum())
    yy, xx = np.divmod(flat, w)
    layer_of = ids[query, yy, xx].astype(np.intp)
    centres = np.stack([xx, yy], -1).astype(float)
    jittered = centres + rng.uniform(-0.45, 0.45, (num_points, 2))
    canon, fallback = np.zeros((num_points, 2)), np.zeros((num_points, 2))
    for k in np.unique(layer_of):
        sel = layer_of == k
        canon[sel] = layers[k].to_canonical(jittered[sel], query[sel])
        fallback[sel] = layers[k].to_canonical(centres[sel], query[sel])
    # sub-pixel jitter may slip off an edge; the pixel centre itself is visible by construction
    _, visible = _track(layers, layer_of, canon, size)
    hidden = ~visible[query, np.arange(num_points)]
    canon[hidden] = fallback[hidden]
    return layer_of, canon


def _check_sizes(size: tuple[int, int], num_frames: int) -> None:
    if len(size) != 2 or not all(isinstance(n, (int, np.integer)) and n >= 8 for n in size):
        raise ValueError(f"size must be (H, W), integers >= 8, got {size}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 (motion needs two frames), got {num_frames}")


def render_class_clip(motion_class: str, *, size: tuple[int, int], num_frames: int,
                      rng: np.random.Generator, style: SceneStyle = CLASS_STYLE) -> np.ndarray:
    """A clip (T, H, W, 3) uint8 whose action class is decided by its foreground motion alone.

    The 1-2 foreground objects follow `motion_class` (one of MOTION_CLASSES) with a random magnitude
    from `style` (speed / rotation / zoom range), placed so their path stays mostly in frame; the
    background drifts slightly in a random direction whatever the class; textures, shapes, colours and
    sizes are drawn independently of the class. `size` is (H, W). Deterministic for a given rng state.
    """
    _check_sizes(size, num_frames)
    frames, _, _ = _render(_class_scene(motion_class, rng, size, num_frames, style), size, with_flow=False)
    return frames


def _motion_clip(size: tuple[int, int], num_frames: int, num_points: int, rng: np.random.Generator,
                 style: SceneStyle) -> tuple[MotionClip, np.ndarray, np.ndarray]:
    """render_motion_clip plus the per-pixel layer index (T, H, W) and each point's layer (P,)."""
    _check_sizes(size, num_frames)
    if num_points < 0:
        raise ValueError(f"num_points must be >= 0, got {num_points}")
    layers = _random_scene(rng, size, num_frames, style)
    frames, flow, ids = _render(layers, size)
    layer_of, canon = _sample_points(layers, ids, num_points, rng, size)
    tracks, visible = _track(layers, layer_of, canon, size)
    if style.blur[1] > 0 or style.lighting > 0 or style.noise > 0:  # drawn last: the scene stays the same
        frames = camera_effects(frames, np.random.default_rng(rng.integers(2**62)), style)
    return MotionClip(frames, flow, tracks, visible), ids, layer_of


def camera_effects(frames: np.ndarray, rng: np.random.Generator, style: SceneStyle) -> np.ndarray:
    """Blur, lighting drift and sensor noise (see SceneStyle) on frames (T, H, W, 3) uint8."""
    out = frames.astype(np.float32) / 255
    sigma = rng.uniform(*style.blur)
    if sigma > 0:
        radius = max(1, int(np.ceil(3 * sigma)))
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        for axis in (1, 2):  # separable: rows, then columns, edges replicated
            padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(4)], mode="edge")
            out = sum(k * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis)
                      for i, k in enumerate(kernel))
    gain = 1 + rng.choice([-1, 1]) * style.lighting * np.linspace(0, 1, len(out))
    out = out * gain[:, None, None, None]
    if style.noise > 0:
        out = out + rng.normal(0, style.noise, out.shape)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def render_motion_clip(*, size: tuple[int, int], num_frames: int, num_points: int,
                       rng: np.random.Generator, style: SceneStyle) -> MotionClip:
    """A random layered scene with exact forward flow, point tracks and visibility.

    Each of the `num_points` points is visible at a random query frame (its first visible frame is a
    valid query); about half lie on objects, half on the background. `size` is (H, W). Deterministic
    for a given rng state.
    """
    return _motion_clip(size, num_frames, num_points, rng, style)[0]
