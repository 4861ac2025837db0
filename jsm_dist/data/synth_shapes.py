"""Shape rasterisation for the synthetic scenes (:mod:`jsm_dist.data.synth`).

Holds the vocabulary of the generator (shape classes and their family, the colour palette,
surface patterns), each shape as a boolean mask over object-local coordinates, how far each
shape reaches below its centre, the :class:`SceneObject` record of one placed object, and
:func:`draw_object`, which paints one object (shading, pattern, contact shadow) into the
RGB, disparity and label images of a scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Shape classes (the salient-word vocabulary, without "<negative>") and their family.
# fmt: off
FAMILY: dict[str, str] = {
    "ball": "round", "ring": "round", "ellipse": "round", "crescent": "round", "capsule": "round",
    "square": "polygon", "triangle": "polygon", "diamond": "polygon", "pentagon": "polygon",
    "hexagon": "polygon", "star": "symbol", "cross": "symbol", "heart": "symbol", "arrow": "symbol",
}
VOCAB: list[str] = list(FAMILY)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 165, 60), "blue": (35, 75, 215),
    "yellow": (235, 210, 35), "orange": (240, 135, 25), "purple": (135, 55, 180),
    "pink": (240, 120, 180), "white": (238, 238, 232), "black": (28, 28, 30),
    "brown": (125, 75, 35), "cyan": (35, 195, 210), "grey": (125, 125, 128),
}
# fmt: on
COLOURS: list[str] = list(PALETTE)
PATTERNS = ("plain", "striped", "checkered", "dotted")


# ---- shapes: boolean masks over object-local coordinates (u right, v down, radius 1) ----
def _polygon(u: np.ndarray, v: np.ndarray, n: int, phase: float) -> np.ndarray:
    inside = np.ones(u.shape, bool)
    for k in range(n):  # n half-planes, n <= 6: not a per-pixel loop
        a = phase + math.pi / n + 2 * math.pi * k / n
        inside &= u * math.cos(a) + v * math.sin(a) <= math.cos(math.pi / n)
    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho = np.hypot(u, v)
    theta = np.mod(np.arctan2(v, u) + math.pi / 2, 2 * math.pi / 5)  # 0 at an outer tip
    t = np.minimum(theta, 2 * math.pi / 5 - theta)
    inner = 0.45
    p_in = (inner * math.cos(math.pi / 5), inner * math.sin(math.pi / 5))
    n = (p_in[1], 1.0 - p_in[0])  # normal of the tip -> inner-vertex edge
    return rho * (n[0] * np.cos(t) + n[1] * np.sin(t)) <= n[0]


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.2 * u, -1.2 * v + 0.2
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0


SHAPES = {
    "ball": lambda u, v: u * u + v * v <= 1.0,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.3),
    "ellipse": lambda u, v: u * u + (v / 0.6) ** 2 <= 1.0,
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 > 0.6),
    "capsule": lambda u, v: (
        (np.abs(v) <= 0.45) & ((np.abs(u) <= 0.55) | ((np.abs(u) - 0.55) ** 2 + v * v <= 0.2))
    ),
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.78,
    "triangle": lambda u, v: _polygon(u, v - 0.2, 3, -math.pi / 2),
    "diamond": lambda u, v: np.abs(u) / 0.7 + np.abs(v) <= 1.0,
    "pentagon": lambda u, v: _polygon(u, v, 5, -math.pi / 2),
    "hexagon": lambda u, v: _polygon(u, v, 6, 0.0),
    "star": _star,
    "cross": lambda u, v: (
        ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.95))
    ),
    "heart": _heart,
    "arrow": lambda u, v: (
        ((np.abs(v) <= 0.22) & (u >= -0.95) & (u <= 0.15))
        | ((u >= 0.15) & (u <= 0.95) & (np.abs(v) <= 0.75 * (0.95 - u) / 0.8))
    ),
}
_MIRRORABLE = {"crescent", "arrow"}
# How far each shape reaches below its centre (radius units): it stands on its base.
# fmt: off
BOTTOM = {
    "ball": 1.0, "ring": 1.0, "ellipse": 0.6, "crescent": 1.0, "capsule": 0.45, "square": 0.78,
    "triangle": 0.7, "diamond": 1.0, "pentagon": 0.81, "hexagon": 0.87, "star": 0.81,
    "cross": 0.95, "heart": 1.0, "arrow": 0.75,
}
# fmt: on


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, freq: float, angle: float) -> np.ndarray:
    """0/1 pattern in object coordinates (so it turns and scales with the object)."""
    if kind == "striped":
        return (np.sin(freq * math.pi * (u * math.cos(angle) + v * math.sin(angle))) > 0).astype(
            np.float32
        )
    if kind == "checkered":
        return ((np.sin(freq * math.pi * u) * np.sin(freq * math.pi * v)) > 0).astype(np.float32)
    if kind == "dotted":
        fu, fv = (u * freq * 0.5) % 1.0 - 0.5, (v * freq * 0.5) % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    return np.zeros(u.shape, np.float32)


# ---- one object: its record and how it is painted ------------------------------------
@dataclass
class SceneObject:
    """One placed object; ``render`` reports ``vars()`` of each in ``info["objects"]``."""

    word: str
    colour: str
    pattern: str
    near: float  # disparity at the object's base
    cx: float
    cy: float
    r: float
    role: str  # "salient" | "front" | "similar" | "behind"


def draw_object(rng, rgb, near, label, obj: SceneObject, idx: int, horizon: float) -> None:
    """Paint ``obj`` in place into ``rgb``, ``near`` (disparity) and ``label`` (as ``idx``)."""
    s = rgb.shape[0]
    r = obj.r
    x0, x1 = int(max(obj.cx - r - 2, 0)), int(min(obj.cx + r + 3, s))
    y0, y1 = int(max(obj.cy - r - 2, 0)), int(min(obj.cy + r + 3, s))
    if x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    base = obj.cy + BOTTOM[obj.word] * r
    if base > horizon:  # contact shadow on the floor
        sh = ((xx - obj.cx) / (1.1 * r)) ** 2 + ((yy - base) / (0.22 * r)) ** 2
        rgb[y0:y1, x0:x1] *= (1 - 0.35 * np.exp(-sh))[..., None]
    ang = 0.0 if obj.word in ("ball", "ring") else rng.uniform(-0.35, 0.35)
    dx, dy = (xx - obj.cx) / r, (yy - obj.cy) / r
    u = dx * math.cos(ang) + dy * math.sin(ang)
    v = -dx * math.sin(ang) + dy * math.cos(ang)
    if obj.word in _MIRRORABLE and rng.random() < 0.5:
        u = -u
    mask = SHAPES[obj.word](u, v)
    col = np.array(PALETTE[obj.colour], np.float32) / 255
    col = np.clip(col * rng.uniform(0.85, 1.1), 0, 1)
    second = col * 0.45 if col.mean() > 0.35 else col + 0.45 * (1 - col)
    pat = _pattern(obj.pattern, u, v, rng.uniform(2.5, 4.5), rng.uniform(0, math.pi))
    colour = col + pat[..., None] * (second - col)
    rho2 = np.clip(u * u + v * v, 0, 1)
    if obj.word == "ball":  # Lambertian sphere, light from the upper left
        nz = np.sqrt(1 - rho2)
        shade = 0.3 + 0.75 * np.clip((-0.45 * u - 0.5 * v + 0.74 * nz), 0, 1)
        relief = 0.3 * nz
    else:
        shade = 1.0 - 0.12 * (u + v)
        relief = 0.08 * (1 - rho2) - 0.05 * v
    colour = colour * shade[..., None] + rng.normal(0, 0.02, colour.shape)
    rgb[y0:y1, x0:x1][mask] = colour[mask]
    near[y0:y1, x0:x1][mask] = obj.near + (relief * r / s)[mask]
    label[y0:y1, x0:x1][mask] = idx
