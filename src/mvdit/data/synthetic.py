"""Synthetic six-camera driving clips: one procedural 3-D scene ray-cast through six pinhole cameras on one car.

World frame: x forward along the road at t=0, y to the left, z up (metres). The road's centreline is the parabola
y = curvature*x^2/2; the car drives in the right lane. All cameras share one optical centre on the roof, so views
that overlap agree up to pixel sampling, and objects pass from view to view consistently as the car moves.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mvdit.constants import CAMERAS

# Camera yaw relative to the car's heading (degrees, positive = to the left) in CAMERAS order. With a 100 degree
# horizontal field of view, neighbours 60 degrees apart share a 40 degree wedge of the scene.
CAMERA_YAW_DEG: dict[str, float] = {
    "front": 0.0,
    "left": 60.0,
    "right": -60.0,
    "back": 180.0,
    "back_left": 120.0,
    "back_right": -120.0,
}
HFOV_DEG: float = 100.0
PITCH_DEG: float = -5.0  # tilted slightly down so more road than sky shows
CAMERA_HEIGHT: float = 1.6
ROAD_HALF_WIDTH: float = 3.6  # two 3.5 m lanes plus a little shoulder
LANE_OFFSET: float = -1.75  # the car drives in the right-hand lane
# Lens blur (Gaussian sigma in output pixels): a real camera's optics and sensor smooth what a ray caster aliases, and
# the tiny tokenizer (16 latent channels per 8x8x8 patch) can then reproduce the clips within 30 dB. 3.5 (was 1.5)
# for the demo's 64x96 clips: what the tiny model cannot predict (objects entering a view) is then smooth enough that
# a sample's guess at it costs less SSIM than copying the last frame (docs/demo-tuning-2026-12-07-b.md).
LENS_BLUR_PX: float = 3.5
EGO_SPEED: float = 12.0  # m/s, every clip: the motion is then predictable from the input frames
POST_GAP, TREE_GAP, BUILDING_GAP = 10.0, 15.0, 30.0  # metres between roadside objects of a kind (regular rows)

# Upstream's camera-description sentences (video2world_multiview.py:63-92), used as caption prefixes.
CAMERA_PHRASE: dict[str, str] = {
    "front": "The camera is facing forward.",
    "left": "The camera is facing to the left.",
    "right": "The camera is facing to the right.",
    "back": "The camera is facing backwards.",
    "back_left": "The camera is facing the rear left side.",
    "back_right": "The camera is facing the rear right side.",
}
CAPTION_PREFIX = "The video is captured from a camera mounted on a car."

_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.75, 0.10, 0.08),
    "white": (0.88, 0.88, 0.86),
    "yellow": (0.90, 0.75, 0.12),
    "orange": (0.92, 0.45, 0.10),
    "blue": (0.12, 0.25, 0.70),
    "black": (0.07, 0.07, 0.08),
    "silver": (0.62, 0.64, 0.66),
    "green": (0.15, 0.45, 0.20),
    "grey": (0.45, 0.45, 0.46),
    "beige": (0.78, 0.70, 0.55),
    "brick": (0.55, 0.25, 0.18),
}

# Sky zenith, sky horizon, ambient, sun strength per weather.
_WEATHER: dict[str, dict] = {
    "clear": dict(zenith=(0.22, 0.42, 0.82), horizon=(0.70, 0.80, 0.92), ambient=0.45, sun=0.75, clouds=0.35),
    "sunset": dict(zenith=(0.18, 0.20, 0.42), horizon=(0.98, 0.58, 0.32), ambient=0.35, sun=0.65, clouds=0.30),
    "overcast": dict(zenith=(0.52, 0.55, 0.60), horizon=(0.74, 0.75, 0.77), ambient=0.75, sun=0.20, clouds=0.9),
    "snowy": dict(zenith=(0.60, 0.64, 0.70), horizon=(0.85, 0.86, 0.88), ambient=0.70, sun=0.25, clouds=0.8),
}
_GROUND: dict[str, tuple[float, float, float]] = {
    "grass": (0.28, 0.46, 0.18),
    "sand": (0.72, 0.62, 0.42),
    "snow": (0.88, 0.90, 0.94),
}

_BOX, _CYL, _SPHERE = 0, 1, 2


@dataclass
class SceneObject:
    """One object at road coordinates: `s` metres along the road at t=0, `d` metres left of the centreline.

    kind: car | tree | post | building | box; `speed` (m/s along the road, negative = oncoming) moves it over time.
    length/width/height in metres (a tree's width is its crown diameter, a post's its diameter).
    """

    kind: str
    s: float
    d: float
    length: float
    width: float
    height: float
    colour: str
    speed: float = 0.0


@dataclass
class Scene:
    """Everything needed to render a clip deterministically (made by make_scene or by hand in tests)."""

    weather: str = "clear"
    ground: str = "grass"
    curvature: float = 0.0  # 1/m; positive curves left
    speed: float = 12.0  # ego speed, m/s
    marking: str = "white"  # centre-line colour
    sun_azimuth: float = 0.8  # radians, world frame
    sun_elevation: float = 0.6
    mountains: tuple[float, ...] = (0.02, 0.0, 0.0)  # base, then (amplitude, phase) pairs of a Fourier ridge
    cloud_phase: tuple[float, float, float] = (0.0, 1.0, 2.0)
    objects: list[SceneObject] = field(default_factory=list)
    sides: dict[str, str] = field(default_factory=dict)  # caption facts: what lines each side of the road


# ----------------------------------------------------------------------------------------------------------------
# Cameras


def _rotations(n_views: int) -> np.ndarray:
    """Camera-to-car rotations [V, 3, 3]; camera axes are (forward, right, down) as (1,0,0), (0,-1,0), (0,0,-1)."""
    if not 1 <= n_views <= len(CAMERAS):
        raise ValueError(f"n_views must be in 1..{len(CAMERAS)}, got {n_views}")
    p = math.radians(PITCH_DEG)
    pitch = np.array([[math.cos(p), 0, -math.sin(p)], [0, 1, 0], [math.sin(p), 0, math.cos(p)]])
    out = []
    for cam in CAMERAS[:n_views]:
        y = math.radians(CAMERA_YAW_DEG[cam])
        yaw = np.array([[math.cos(y), -math.sin(y), 0], [math.sin(y), math.cos(y), 0], [0, 0, 1]])
        out.append(yaw @ pitch)
    return np.stack(out)


def focal_px(width: int) -> float:
    """Focal length in pixels for the fixed horizontal field of view (square pixels)."""
    return (width / 2) / math.tan(math.radians(HFOV_DEG) / 2)


def camera_rays(height: int, width: int, n_views: int = 6) -> np.ndarray:
    """Unit ray directions through pixel centres in the car frame (x forward, y left, z up): [V, H, W, 3]."""
    f = focal_px(width)
    u = (np.arange(width) + 0.5 - width / 2) / f  # to the right
    v = (np.arange(height) + 0.5 - height / 2) / f  # downwards
    uu, vv = np.meshgrid(u, v)
    local = np.stack([np.ones_like(uu), -uu, -vv], -1)  # (forward, left, up) before the camera rotation
    local /= np.linalg.norm(local, axis=-1, keepdims=True)
    return np.einsum("vij,hwj->vhwi", _rotations(n_views), local).astype(np.float32)


def project(points: np.ndarray, view: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Car-frame points or directions [..., 3] -> (row, col, in_front) pixel coordinates in `view` (centre = .0)."""
    q = points @ _rotations(view + 1)[view]  # R^T p, as row vectors
    fwd, right, down = q[..., 0], -q[..., 1], -q[..., 2]
    f = focal_px(width)
    with np.errstate(divide="ignore", invalid="ignore"):
        col = f * right / fwd + width / 2 - 0.5
        row = f * down / fwd + height / 2 - 0.5
    return row, col, fwd > 0


# ----------------------------------------------------------------------------------------------------------------
# Scene generation


def _road_pose(scene: Scene, s: np.ndarray, d: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Road coordinates (s along, d left) -> world (x, y, heading); the offset d is along the road normal."""
    heading = np.arctan(scene.curvature * s)
    x = s - d * np.sin(heading)
    y = 0.5 * scene.curvature * s**2 + d * np.cos(heading)
    return x, y, heading


def make_scene(seed: int) -> Scene:
    """A random but deterministic scene from `seed`: weather, road shape, a regular roadside and a little traffic.

    What lines the road is regular, as along many real roads: each side has posts, trees or buildings (or two of
    them) at a fixed spacing, identical along the side, and the car drives at a constant EGO_SPEED. So the scene that
    moves past the cameras is predictable from a few frames while it moves visibly (trees and buildings cross the
    side views within a second); traffic that would appear from nowhere is rare: at most one car ahead (at the
    car's speed) and one oncoming car.
    """
    rng = np.random.default_rng(seed)
    weather = str(rng.choice(list(_WEATHER)))
    ground = "snow" if weather == "snowy" else str(rng.choice(["grass", "grass", "sand"]))
    curvature = float(rng.choice([-1, 1]) * rng.uniform(1 / 600, 1 / 250)) if rng.random() < 0.5 else 0.0
    elevation = {"clear": rng.uniform(0.45, 1.0), "sunset": rng.uniform(0.04, 0.15)}.get(weather, 0.6)
    ridge = [float(rng.uniform(0.015, 0.035))]
    for k in range(1, 7):
        ridge += [float(rng.uniform(0, 0.02 / k)), float(rng.uniform(0, 2 * math.pi))]
    scene = Scene(
        weather=weather,
        ground=ground,
        curvature=curvature,
        speed=EGO_SPEED,
        marking=str(rng.choice(["white", "yellow"])),
        sun_azimuth=float(rng.uniform(0, 2 * math.pi)),
        sun_elevation=float(elevation),
        mountains=tuple(ridge),
        cloud_phase=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, 3)),
    )
    s_lo, s_hi = -100.0, 220.0
    for side, sign in (("left", 1.0), ("right", -1.0)):
        kinds = str(rng.choice(["trees", "posts", "buildings", "trees and posts", "buildings and trees"]))
        facts = []
        if "posts" in kinds:
            colour = str(rng.choice(["red", "white", "yellow", "orange"]))
            facts.append(f"{colour} posts")
            for s in np.arange(s_lo + rng.uniform(0, POST_GAP), s_hi, POST_GAP):
                scene.objects.append(SceneObject("post", s, sign * (ROAD_HALF_WIDTH + 1.0), 0.2, 0.2, 1.1, colour))
        if "trees" in kinds:
            facts.append("trees")
            h = rng.uniform(5, 8)
            crown = rng.uniform(3.0, 4.5)
            d = sign * (ROAD_HALF_WIDTH + 5.0)
            for s in np.arange(s_lo + rng.uniform(0, TREE_GAP), s_hi, TREE_GAP):
                scene.objects.append(SceneObject("tree", s, d, crown, crown, h, "green"))
        if "buildings" in kinds:
            colour = str(rng.choice(["grey", "beige", "brick", "white"]))
            facts.append(f"{colour} buildings")
            depth, length, height = 10.0, rng.uniform(12, 18), rng.uniform(8, 14)
            d = sign * (18.0 + depth / 2)
            for s in np.arange(s_lo + rng.uniform(0, BUILDING_GAP), s_hi, BUILDING_GAP):
                scene.objects.append(SceneObject("building", s, d, length, depth, height, colour))
        scene.sides[side] = " and ".join(facts)
    car_colours = ["red", "blue", "white", "black", "silver", "green", "yellow"]
    traffic = {"ahead": [], "oncoming": [], "behind": [], "parked": []}
    if rng.random() < 0.5:
        c = str(rng.choice(car_colours))
        traffic["ahead"].append(c)
        scene.objects.append(SceneObject("car", rng.uniform(12, 30), LANE_OFFSET, 4.5, 1.8, 1.5, c, EGO_SPEED))
    if rng.random() < 0.3:
        c = str(rng.choice(car_colours))
        traffic["oncoming"].append(c)
        scene.objects.append(SceneObject("car", rng.uniform(40, 80), -LANE_OFFSET, 4.5, 1.8, 1.5, c, -EGO_SPEED))
    scene.sides.update({k: ",".join(v) for k, v in traffic.items()})
    return scene


def _cars_phrase(colours: str, where: str) -> str:
    """'red,blue,blue' -> 'There are a red car and two blue cars <where>.' ('' when there are none)."""
    if not colours:
        return ""
    counts: dict[str, int] = {}
    for c in colours.split(","):
        counts[c] = counts.get(c, 0) + 1
    words = {1: "a", 2: "two", 3: "three", 4: "four"}
    cars = [f"{words.get(n, n)} {c} car{'s' if n > 1 else ''}" for c, n in counts.items()]
    listed = cars[0] if len(cars) == 1 else ", ".join(cars[:-1]) + " and " + cars[-1]
    total = sum(counts.values())
    return f"There {'is' if total == 1 else 'are'} {listed} {where}."


def caption(scene: Scene, camera: str) -> str:
    """A deterministic caption for one camera: upstream's camera sentence plus what this camera can see."""
    turn = "left" if scene.curvature > 0 else "right"
    shape = "straight two-lane road" if scene.curvature == 0 else f"two-lane road that curves gently to the {turn}"
    weather = {
        "clear": "on a clear sunny day",
        "sunset": "at sunset",
        "overcast": "under an overcast sky",
        "snowy": "in a snowy landscape under a grey sky",
    }[scene.weather]
    ground = {"grass": "grassland", "sand": "sandy land", "snow": "snow-covered fields"}[scene.ground]
    parts = [
        CAPTION_PREFIX,
        CAMERA_PHRASE[camera],
        f"The car drives along a {shape}, with {scene.marking} centre markings through {ground}, "
        f"{weather}, with hills on the horizon.",
    ]
    left, right = scene.sides.get("left", ""), scene.sides.get("right", "")
    parked = [p.split(":") for p in scene.sides.get("parked", "").split(",") if p]
    if camera in ("front", "back"):
        parts.append(
            f"The road is lined with {left or 'open land'} on the left and {right or 'open land'} on the right."
        )
        parts.append(_cars_phrase(scene.sides.get("ahead" if camera == "front" else "behind", ""), "in the same lane"))
        if camera == "front":
            parts.append(_cars_phrase(scene.sides.get("oncoming", ""), "approaching in the oncoming lane"))
    else:
        side = "left" if "left" in camera else "right"
        parts.append(f"On this side of the road there are {scene.sides.get(side) or 'no objects, only open land'}.")
        parts.append(_cars_phrase(",".join(c for c, s in parked if s == side), "parked at the roadside"))
        if side == "left":
            parts.append(_cars_phrase(scene.sides.get("oncoming", ""), "passing in the oncoming lane"))
    return " ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Prims:
    """Primitives of all objects at the frames being rendered; P primitives, F frames."""

    kind: np.ndarray  # [P] _BOX | _CYL | _SPHERE
    centre: np.ndarray  # [P, F, 3]; box/cylinder: centre of the base; sphere: centre
    yaw: np.ndarray  # [P, F]
    dims: np.ndarray  # [P, 3]; box: half length, half width, height; cylinder: radius, -, height; sphere: radius
    albedo: np.ndarray  # [P, 3]
    windows: np.ndarray  # [P] bool: building facade pattern
    bound_centre: np.ndarray  # [P, F, 3]
    bound_radius: np.ndarray  # [P]


def _primitives(scene: Scene, times: np.ndarray) -> _Prims:
    """Expand scene objects into boxes, cylinders and spheres positioned at each time in `times` [F]."""
    rows = []  # (kind, x, y, z, yaw, dims, albedo, windows)
    for o in scene.objects:
        s = o.s + o.speed * times
        x, y, heading = _road_pose(scene, s, o.d)
        yaw = heading + (math.pi if o.speed < 0 else 0.0)
        fx, fy = np.cos(yaw), np.sin(yaw)
        colour = _COLOURS[o.colour]
        if o.kind == "car":
            body, cabin = 0.55 * o.height, 0.45 * o.height
            rows.append((_BOX, x, y, 0.12, yaw, (0.42 * o.length, 0.45 * o.width, 0.25), (0.05,) * 3, False))
            rows.append((_BOX, x, y, 0.3, yaw, (o.length / 2, o.width / 2, body - 0.3), colour, False))
            cx, cy = x - 0.1 * o.length * fx, y - 0.1 * o.length * fy
            dims = (0.27 * o.length, 0.44 * o.width, cabin)
            rows.append((_BOX, cx, cy, body, yaw, dims, (0.12, 0.15, 0.2), False))
        elif o.kind == "tree":
            r = o.width / 2
            rows.append((_CYL, x, y, 0.0, yaw, (0.18, 0.0, o.height - r), (0.30, 0.20, 0.12), False))
            rows.append((_SPHERE, x, y, o.height - r, yaw, (r, 0.0, 0.0), colour, False))
        elif o.kind == "post":
            rows.append((_CYL, x, y, 0.0, yaw, (o.width / 2, 0.0, o.height), colour, False))
        elif o.kind in ("building", "box"):
            dims = (o.length / 2, o.width / 2, o.height)
            rows.append((_BOX, x, y, 0.0, yaw, dims, colour, o.kind == "building"))
        else:
            raise ValueError(f"unknown object kind {o.kind!r}")
    n_t = len(times)
    kind = np.array([r[0] for r in rows], int)
    centre = np.zeros((len(rows), n_t, 3))
    yaw = np.zeros((len(rows), n_t))
    for i, r in enumerate(rows):
        centre[i, :, 0], centre[i, :, 1], centre[i, :, 2], yaw[i] = r[1], r[2], r[3], r[4]
    dims = np.array([r[5] for r in rows], float).reshape(-1, 3)
    lateral = np.where(kind == _BOX, dims[:, 1], 0.0)
    bound_radius = np.where(kind == _SPHERE, dims[:, 0], np.hypot(np.hypot(dims[:, 0], lateral), dims[:, 2] / 2))
    bound_centre = centre.copy()
    bound_centre[..., 2] += np.where(kind == _SPHERE, 0.0, dims[:, 2] / 2)[:, None]
    return _Prims(
        kind=kind,
        centre=centre,
        yaw=yaw,
        dims=dims,
        albedo=np.array([r[6] for r in rows], float).reshape(-1, 3),
        windows=np.array([r[7] for r in rows], bool),
        bound_centre=bound_centre,
        bound_radius=bound_radius,
    )


def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic value noise in [0, 1) per integer lattice cell (integer hashing, wraps on purpose)."""
    h = (ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263 + salt * 2246822519) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    return ((h ^ (h >> 16)) & 0xFFFF).astype(np.float32) / 65536.0


def _smooth_noise(x: np.ndarray, y: np.ndarray, salt: int) -> np.ndarray:
    """Bilinearly interpolated value noise in [0, 1): smooth, so moving texture stays a few pixels wide."""
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = (x - ix).astype(np.float32), (y - iy).astype(np.float32)
    top = _hash(ix, iy, salt) * (1 - fx) + _hash(ix + 1, iy, salt) * fx
    bottom = _hash(ix, iy + 1, salt) * (1 - fx) + _hash(ix + 1, iy + 1, salt) * fx
    return top * (1 - fy) + bottom * fy


def _sun(scene: Scene) -> np.ndarray:
    ce = math.cos(scene.sun_elevation)
    a = scene.sun_azimuth
    return np.array([ce * math.cos(a), ce * math.sin(a), math.sin(scene.sun_elevation)], np.float32)


def _sky(scene: Scene, d: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Colour [N, 3] of rays that miss the ground: gradient, sun glow, clouds on a high plane, distant hills."""
    w = _WEATHER[scene.weather]
    zen, hor = np.array(w["zenith"], np.float32), np.array(w["horizon"], np.float32)
    dz = np.clip(d[:, 2], 0.0, 1.0)
    col = hor + (zen - hor) * (np.clip(dz / 0.6, 0, 1) ** 0.7)[:, None]
    glow = np.clip(d @ _sun(scene), 0, 1)
    col += (np.array([1.0, 0.85, 0.6], np.float32) * w["sun"]) * (0.8 * glow**300 + 0.25 * glow**8)[:, None]
    # Clouds on a plane 800 m up: they sit far away, so they barely move, as real clouds do.
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (800.0 - o[:, 2]) / np.maximum(d[:, 2], 1e-3)
    cx, cy = o[:, 0] + t * d[:, 0], o[:, 1] + t * d[:, 1]
    p = scene.cloud_phase
    dens = np.sin(cx / 310 + p[0]) * np.sin(cy / 240 + p[1]) + 0.6 * np.sin((cx + 0.7 * cy) / 113 + p[2])
    dens += 0.35 * np.sin((0.6 * cx - cy) / 71 + 2 * p[0])  # breaks up the regular lattice of the first terms
    cover = np.clip((dens + 0.8 - w["clouds"]) / 0.6, 0, 1) * w["clouds"] * np.clip(d[:, 2] * 10, 0, 1)
    cloud = np.float32(0.95 if scene.weather in ("clear", "sunset") else 0.8) * (0.6 * hor + 0.4)
    col = col + (cloud - col) * cover[:, None]
    # Hills: a ridge of elevation angles over the world azimuth, so every view sees the same horizon.
    az = np.arctan2(d[:, 1], d[:, 0])
    ridge = np.full_like(az, scene.mountains[0])
    for k in range(1, (len(scene.mountains) - 1) // 2 + 1):
        ridge += scene.mountains[2 * k - 1] * np.sin(k * az + scene.mountains[2 * k])
    hill = (0.55 * hor + 0.45 * np.array(_GROUND[scene.ground], np.float32) * 0.6).astype(np.float32)
    col = np.where((d[:, 2] < ridge)[:, None], hill, col)
    return col


def _ground(scene: Scene, gx: np.ndarray, gy: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Albedo [N, 3] of ground hits: asphalt with markings, textured verge; texture fades with distance (aliasing)."""
    heading = np.arctan(scene.curvature * gx)
    lat = (gy - 0.5 * scene.curvature * gx**2) * np.cos(heading)
    along = gx  # close enough to arc length for the gentle curvatures used
    fade = np.exp(-t / 40.0)
    fine = _smooth_noise(gx * 0.5, gy * 0.5, 1) - 0.5
    coarse = _smooth_noise(gx / 3, gy / 3, 2) - 0.5
    alat = np.abs(lat)
    verge = np.array(_GROUND[scene.ground], np.float32)
    # Snow is near white: weaker texture keeps it from clipping into blotches.
    amp = 0.5 if scene.ground == "snow" else 1.0
    col = verge * (1 + amp * (0.2 * coarse + 0.3 * fine * fade))[:, None]
    road = alat < ROAD_HALF_WIDTH
    asphalt = 0.30 if scene.ground != "snow" else 0.36
    col[road] = (asphalt * (1 + 0.15 * fine[road] * fade[road] + 0.06 * coarse[road]))[:, None]
    dash = (alat < 0.08) & (np.mod(along, 9.0) < 3.0)
    col[dash] = _COLOURS[scene.marking]
    edge = np.abs(alat - (ROAD_HALF_WIDTH - 0.25)) < 0.08
    col[edge] = _COLOURS["white"]
    return col


def _hit_box(ox, oy, oz, dx, dy, dz, c, yaw, dims, sun):
    """Ray/oriented-box hits: (t, lambert, local hit point along, local z); arrays [F, h, w]; t = inf on a miss."""
    cs, sn = np.cos(yaw)[:, None, None], np.sin(yaw)[:, None, None]
    px, py = ox - c[:, 0, None, None], oy - c[:, 1, None, None]
    lx, ly = cs * px + sn * py, -sn * px + cs * py  # origin in box frame
    ldx, ldy = cs * dx + sn * dy, -sn * dx + cs * dy
    lz = oz - c[:, 2, None, None]
    hx, hy, h = dims
    tiny = np.float32(1e-9)
    inv = [1 / np.where(np.abs(a) < tiny, tiny, a) for a in (ldx, ldy, dz)]
    t_lo, t_hi = [], []
    for p, iv, lo, hi in ((lx, inv[0], -hx, hx), (ly, inv[1], -hy, hy), (lz, inv[2], 0.0, h)):
        a, b = (lo - p) * iv, (hi - p) * iv
        t_lo.append(np.minimum(a, b))
        t_hi.append(np.maximum(a, b))
    near = np.maximum(np.maximum(t_lo[0], t_lo[1]), t_lo[2])
    far = np.minimum(np.minimum(t_hi[0], t_hi[1]), t_hi[2])
    t = np.where((near <= far) & (near > 0), near, np.inf)
    axis = np.where(t_lo[0] >= near, 0, np.where(t_lo[1] >= near, 1, 2))
    # Lambert with the sun in box coordinates; the face normal points against the ray along the entry axis.
    sl = (cs * sun[0] + sn * sun[1], -sn * sun[0] + cs * sun[1])
    lam = np.where(axis == 0, -np.sign(ldx) * sl[0], np.where(axis == 1, -np.sign(ldy) * sl[1], -np.sign(dz) * sun[2]))
    along = np.where(axis == 0, ly + near * ldy, lx + near * ldx)
    return t, np.maximum(lam, 0), along, lz + near * dz, axis


def _hit_cyl(ox, oy, oz, dx, dy, dz, c, dims, sun):
    """Ray/vertical-cylinder hits (side and top cap): (t, lambert); arrays [F, h, w]."""
    r, h = dims[0], dims[2]
    px, py = ox - c[:, 0, None, None], oy - c[:, 1, None, None]
    pz = oz - c[:, 2, None, None]
    a = np.maximum(dx * dx + dy * dy, 1e-12)
    b = px * dx + py * dy
    disc = b * b - a * (px * px + py * py - r * r)
    with np.errstate(invalid="ignore"):
        ts = (-b - np.sqrt(disc)) / a
    zs = pz + ts * dz
    side = (disc >= 0) & (ts > 0) & (zs >= 0) & (zs <= h)
    tc = (h - pz) / np.where(dz < 0, dz, -1.0)
    cx, cy = px + tc * dx, py + tc * dy
    cap = (dz < 0) & (pz > h) & (tc > 0) & (cx * cx + cy * cy <= r * r)
    t = np.where(side, ts, np.where(cap, tc, np.inf))
    nx, ny = (px + ts * dx) / r, (py + ts * dy) / r
    lam = np.where(side, nx * sun[0] + ny * sun[1], sun[2])
    return t, np.maximum(lam, 0)


def _hit_sphere(ox, oy, oz, dx, dy, dz, c, dims, sun):
    """Ray/sphere hits: (t, lambert, leafy texture value); arrays [F, h, w]."""
    r = dims[0]
    px, py, pz = ox - c[:, 0, None, None], oy - c[:, 1, None, None], oz - c[:, 2, None, None]
    b = px * dx + py * dy + pz * dz
    disc = b * b - (px * px + py * py + pz * pz - r * r)
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
    hit = (disc >= 0) & (t > 0)
    t = np.where(hit, t, np.inf)
    th = np.where(hit, t, 0)  # finite stand-in so misses give finite (unused) normals
    nx, ny, nz = (px + th * dx) / r, (py + th * dy) / r, (pz + th * dz) / r
    lam = np.maximum(nx * sun[0] + ny * sun[1] + nz * sun[2], 0)
    leaves = _smooth_noise(nx * 2 + 8, ny * 2 + 8 + 16 * np.floor(nz * 2 + 8), 3)
    return t, lam, leaves


def _view_rects(
    prims: _Prims, ego: np.ndarray, heading: np.ndarray, n_views: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Conservative pixel rectangles [V, P, 4] (r0, r1, c0, c1) holding each primitive over the frames, and [V, P] use.

    Uses the exact tangent bounds of the bounding sphere projected on the horizontal and vertical camera planes;
    primitives smaller than a fifth of a pixel are culled (they would only alias).
    """
    rot = _rotations(n_views)  # [V, 3, 3] camera -> car
    rel = prims.bound_centre - ego[None]  # [P, F, 3] world
    cs, sn = np.cos(heading), np.sin(heading)
    car = np.stack([cs * rel[..., 0] + sn * rel[..., 1], -sn * rel[..., 0] + cs * rel[..., 1], rel[..., 2]], -1)
    q = np.einsum("vji,pfj->vpfi", rot, car)  # camera coords (forward, left, up)
    fwd, right, down = q[..., 0], -q[..., 1], -q[..., 2]
    r = prims.bound_radius[None, :, None]
    f = focal_px(width)
    dist = np.linalg.norm(q, axis=-1)
    big = r * f / np.maximum(dist, 1e-6) > 0.2
    half = math.pi / 2 - 1e-4

    def bounds(lat: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rho = np.hypot(lat, fwd)
        inside = rho <= r
        ang = np.arctan2(lat, fwd)
        alpha = np.arcsin(np.clip(r / np.maximum(rho, 1e-9), 0, 1))
        lo, hi = ang - alpha, ang + alpha
        seen = inside | ((hi > -half) & (lo < half))
        lo_px = np.where(inside | (lo <= -half), -np.inf, f * np.tan(np.clip(lo, -half, half)) + size / 2)
        hi_px = np.where(inside | (hi >= half), np.inf, f * np.tan(np.clip(hi, -half, half)) + size / 2)
        return np.floor(lo_px) - 1, np.ceil(hi_px) + 1, seen  # one pixel of slack

    c0, c1, seen_h = bounds(right, width)
    r0, r1, seen_v = bounds(down, height)
    vis = seen_h & seen_v & big & (c1 > 0) & (c0 < width) & (r1 > 0) & (r0 < height)  # [V, P, F]
    use = vis.any(-1)
    inf = np.float64(np.inf)

    def span(lo: np.ndarray, hi: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.where(vis, lo, inf).min(-1)
        hi = np.where(vis, hi, -inf).max(-1)
        return np.clip(lo, 0, size), np.clip(hi, 0, size)

    rr0, rr1 = span(r0, r1, height)
    cc0, cc1 = span(c0, c1, width)
    rects = np.stack([rr0, rr1, cc0, cc1], -1)
    rects = np.where(use[..., None], rects, 0).astype(np.int64)
    return rects, use


def _ego(scene: Scene, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre [F, 3] and heading [F] of the car at `times`."""
    x, y, heading = _road_pose(scene, scene.speed * times, LANE_OFFSET)
    return np.stack([x, y, np.full_like(x, CAMERA_HEIGHT)], -1), heading


def render_scene(
    scene: Scene,
    n_frames: int,
    height: int,
    width: int,
    n_views: int = 6,
    fps: float = 24.0,
    supersample: int = 1,
    lens_blur: float = LENS_BLUR_PX,
) -> np.ndarray:
    """Ray-cast `scene` through the first `n_views` cameras of CAMERAS -> uint8 [V, T, H, W, 3].

    supersample: s renders at (s*H, s*W) and box-filters down (less aliasing, s^2 slower).
    lens_blur: Gaussian sigma in output pixels applied last (0 = none).
    """
    hs, ws = height * supersample, width * supersample
    rays = camera_rays(hs, ws, n_views)  # [V, H, W, 3] car frame
    times = np.arange(n_frames) / fps
    ego_all, heading_all = _ego(scene, times)
    sun = _sun(scene)
    w = _WEATHER[scene.weather]
    haze = np.array(w["horizon"], np.float32)
    out = np.empty((n_views, n_frames, height, width, 3), np.uint8)
    # Chunks of frames keep the working set near 2 M rays whatever the clip size.
    chunk = max(1, 2_000_000 // (n_views * hs * ws))
    for f0 in range(0, n_frames, chunk):
        fs = slice(f0, min(n_frames, f0 + chunk))
        ego, heading = ego_all[fs], heading_all[fs]
        n_f = len(ego)
        cs, sn = np.cos(heading)[:, None, None, None], np.sin(heading)[:, None, None, None]
        dx = (cs * rays[None, ..., 0] - sn * rays[None, ..., 1]).astype(np.float32)  # [F, V, H, W]
        dy = (sn * rays[None, ..., 0] + cs * rays[None, ..., 1]).astype(np.float32)
        dz = np.broadcast_to(rays[None, ..., 2], dx.shape)
        ox = ego[:, 0, None, None, None].astype(np.float32)
        oy = ego[:, 1, None, None, None].astype(np.float32)
        oz = np.float32(CAMERA_HEIGHT)
        depth = np.full(dx.shape, np.inf, np.float32)
        colour = np.empty((*dx.shape, 3), np.float32)
        # Ground plane z = 0 and sky.
        down = dz < -1e-5
        t_g = np.where(down, -oz / np.where(down, dz, -1.0), np.inf).astype(np.float32)
        gx, gy = ox + t_g * dx, oy + t_g * dy
        depth[down] = t_g[down]
        colour[down] = _ground(scene, gx[down], gy[down], t_g[down]) * (w["ambient"] + w["sun"] * max(sun[2], 0))
        d_sky = np.stack([dx[~down], dy[~down], dz[~down]], -1)
        o_sky = np.broadcast_to(np.stack(np.broadcast_arrays(ox, oy, np.full_like(ox, oz)), -1), (*dx.shape, 3))
        colour[~down] = _sky(scene, d_sky, o_sky[~down])
        # Objects, each only inside its conservative pixel rectangle in each view.
        prims = _primitives(scene, times[fs])
        rects, use = _view_rects(prims, ego, heading, n_views, hs, ws)
        for v, p in zip(*np.nonzero(use), strict=True):
            r0, r1, c0, c1 = rects[v, p]
            win = (slice(None), v, slice(r0, r1), slice(c0, c1))
            args = (ox[:, 0], oy[:, 0], oz, dx[win], dy[win], dz[win], prims.centre[p].astype(np.float32))
            alb = prims.albedo[p].astype(np.float32)
            if prims.kind[p] == _BOX:
                t, lam, along, z, axis = _hit_box(*args, prims.yaw[p], prims.dims[p], sun)
                shade = np.broadcast_to(alb, (*t.shape, 3))
                if prims.windows[p]:  # facade windows: dark panes on a floor/bay grid, not on the roof
                    pane = (np.mod(z, 3.2) > 1.0) & (np.mod(z, 3.2) < 2.4) & (np.mod(along, 3.0) > 0.8) & (axis != 2)
                    shade = np.where(pane[..., None], np.float32(0.6) * alb, alb)  # soft contrast: 8 px patches
            elif prims.kind[p] == _CYL:
                t, lam = _hit_cyl(*args, prims.dims[p], sun)
                shade = np.broadcast_to(alb, (*t.shape, 3))
            else:
                t, lam, leaves = _hit_sphere(*args, prims.dims[p], sun)
                shade = alb * (0.7 + 0.6 * leaves)[..., None]
            hit = t < depth[win]
            if not hit.any():
                continue
            lit = shade * (w["ambient"] + w["sun"] * lam)[..., None]
            depth[win] = np.where(hit, t, depth[win])
            colour[win] = np.where(hit[..., None], lit, colour[win])
        # Aerial perspective: distant surfaces fade to the horizon colour.
        fog = 1 - np.exp(-np.where(np.isfinite(depth), depth, 0) / 350.0)
        colour += (haze - colour) * fog[..., None]
        img = np.clip(colour, 0, 1)
        if supersample > 1:
            s = supersample
            img = img.reshape(n_f, n_views, height, s, width, s, 3).mean((3, 5))
        if lens_blur > 0:
            img = _gaussian_blur(img, lens_blur)
        out[:, fs] = (img * 255 + 0.5).astype(np.uint8).transpose(1, 0, 2, 3, 4)
    return out


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of images [..., H, W, 3] (edges replicated)."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2)).astype(np.float32)
    k /= k.sum()
    for axis in (-3, -2):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (r, r)
        p = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        shifted = (p[..., i : i + n, :, :] if axis == -3 else p[..., i : i + n, :] for i in range(len(k)))
        img = sum(w * x for w, x in zip(k, shifted, strict=True))
    return img


def render_clip(
    seed: int,
    n_frames: int,
    height: int,
    width: int,
    n_views: int = 6,
    fps: float = 24.0,
    supersample: int = 1,
    lens_blur: float = LENS_BLUR_PX,
) -> np.ndarray:
    """Render the scene of make_scene(seed) -> uint8 [V, T, H, W, 3], views in CAMERAS order."""
    return render_scene(make_scene(seed), n_frames, height, width, n_views, fps, supersample, lens_blur)


def clip_seed(seed: int, index: int) -> int:
    """Independent per-clip seed for clip `index` of a dataset made with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _write_clip(
    out: Path,
    name: str,
    seed: int,
    n_frames: int,
    height: int,
    width: int,
    captions: bool,
    fps: float,
    supersample: int,
) -> None:
    from mvdit.data.video_io import write_video  # local: keeps the renderer importable without ffmpeg

    scene = make_scene(seed)
    views = render_scene(scene, n_frames, height, width, len(CAMERAS), fps, supersample)
    for cam, frames in zip(CAMERAS, views, strict=True):
        write_video(out / "videos" / cam / f"{name}.mp4", frames, fps)
        if captions:
            path = out / "captions" / cam / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(caption(scene, cam) + "\n")
            os.replace(tmp, path)


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_clips: int,
    n_frames: int,
    height: int,
    width: int,
    seed: int = 0,
    captions: bool = True,
    fps: float = 24.0,
    supersample: int = 2,
    workers: int = 1,
) -> list[str]:
    """Write clips in the real-data layout of mvdit.data.dataset and return their names (clip_0000, ...).

    <out_dir>/videos/<camera>/<clip>.mp4 for every camera and <out_dir>/captions/<camera>/<clip>.txt.
    workers > 1 renders that many clips at once in spawned processes; each clip depends only on its own seed, so the
    files are the same whatever the count.
    """
    out = Path(out_dir)
    names = [f"clip_{i:04d}" for i in range(n_clips)]
    jobs = [
        (out, name, clip_seed(seed, i), n_frames, height, width, captions, fps, supersample)
        for i, name in enumerate(names)
    ]
    workers = max(1, min(workers, n_clips))
    if workers == 1:
        for job in jobs:
            _write_clip(*job)
        return names
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(_write_clip, *job) for job in jobs]:
            f.result()  # the first failure propagates
    return names
