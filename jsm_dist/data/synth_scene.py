"""Scene composition for the synthetic scenes (:mod:`jsm_dist.data.synth`).

Holds the room (a textured wall and floor with a floor disparity law), the layout of the
salient object and its distractors (front / similar-depth / behind roles, camouflage
colours), and the structured-light sensor model that turns clean disparity into stored
uint16 depth with noise, quantisation, misalignment and holes. ``synth.render`` calls
these in a fixed order, which fixes each scene's random-number stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from jsm_dist.data.synth_shapes import BOTTOM, COLOURS, PALETTE, PATTERNS, VOCAB, SceneObject


@dataclass
class SynthConfig:
    """Settings of the synthetic corpus. Radii are fractions of the image side."""

    num_samples: int  # number of scenes (indices 0 .. num_samples-1)
    image_size: int = 128  # square images, pixels
    seed: int = 0  # corpus seed: scene i depends only on (seed, i)
    min_distractors: int = 0  # distractor objects per scene, inclusive range
    max_distractors: int = 3
    salient_radius: tuple[float, float] = (0.14, 0.24)
    distractor_radius: tuple[float, float] = (0.07, 0.15)
    front_distractor_prob: float = 0.2  # a distractor is nearer than the salient object
    similar_depth_prob: float = 0.3  # ... or at about the same depth (else behind it)
    camouflage_prob: float = 0.3  # room tinted like the salient object + a loud distractor
    window_prob: float = 0.3  # a bright window on the wall (contrast without an object)
    depth_noise: float = 0.008  # std of Gaussian disparity noise (disparity in [0, 1])
    depth_levels: int = 256  # disparity quantisation steps over [0, 1]
    max_depth_shift: int = 2  # RGB/depth misalignment, pixels
    edge_hole_prob: float = 0.7  # holes along depth discontinuities
    blob_hole_prob: float = 0.5  # 1-3 random hole blobs
    border_hole_prob: float = 0.4  # a missing band at the left border
    dark_hole_prob: float = 0.6  # black objects return no depth (IR absorption)
    dropout: float = 0.003  # fraction of isolated missing pixels
    name_prefix: str = "synth"  # sample names: f"{prefix}_s{seed}_{i:07d}"

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.min_distractors <= self.max_distractors <= len(VOCAB) - 1:
            raise ValueError(
                f"need 0 <= min_distractors <= max_distractors <= {len(VOCAB) - 1}, got "
                f"{self.min_distractors}, {self.max_distractors}"
            )
        for name in ("salient_radius", "distractor_radius"):
            lo, hi = getattr(self, name)
            if not 0.02 <= lo <= hi <= 0.3:
                raise ValueError(f"{name} must satisfy 0.02 <= lo <= hi <= 0.3, got {(lo, hi)}")
        probs = "front_distractor_prob similar_depth_prob camouflage_prob window_prob"
        for name in (
            probs + " edge_hole_prob blob_hole_prob border_hole_prob dark_hole_prob"
        ).split():
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if self.front_distractor_prob + self.similar_depth_prob > 1.0:
            raise ValueError(
                "front_distractor_prob + similar_depth_prob must be <= 1, got "
                f"{self.front_distractor_prob + self.similar_depth_prob}"
            )
        if not 0.0 <= self.depth_noise <= 0.2:
            raise ValueError(f"depth_noise must be in [0, 0.2], got {self.depth_noise}")
        if not 2 <= self.depth_levels <= 65535:
            raise ValueError(f"depth_levels must be in [2, 65535], got {self.depth_levels}")
        if not 0 <= self.max_depth_shift <= self.image_size // 8:
            raise ValueError(
                f"max_depth_shift must be in [0, image_size//8], got {self.max_depth_shift}"
            )
        if not 0.0 <= self.dropout <= 0.2:
            raise ValueError(f"dropout must be in [0, 0.2], got {self.dropout}")
        if not self.name_prefix or not self.name_prefix.replace("_", "").isalnum():
            raise ValueError(
                f"name_prefix must be alphanumeric/underscore, got {self.name_prefix!r}"
            )
        self.salient_radius = tuple(self.salient_radius)
        self.distractor_radius = tuple(self.distractor_radius)


# ---- background ---------------------------------------------------------------------
def _lowfreq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1] (bicubic upsampling of a coarse random grid)."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC) * 0.6


def _muted(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(15, 90), rng.uniform(90, 215)]]])
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255


def draw_room(rng: np.random.Generator, s: int, tint: np.ndarray | None):
    """Wall + floor colours (H,W,3 float), disparity (H,W) and the floor's disparity law."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    horizon = rng.uniform(0.3, 0.55) * s
    near_wall = rng.uniform(0.08, 0.2)
    near_bottom = rng.uniform(0.8, 0.95)
    wall_tilt = rng.uniform(-0.04, 0.04)
    floor_near = near_wall + (near_bottom - near_wall) * np.clip(
        (yy - horizon) / (s - horizon), 0, 1
    )
    wall_near = near_wall + wall_tilt * (xx / s - 0.5)
    is_floor = yy >= horizon
    near = np.where(is_floor, np.maximum(floor_near, wall_near), wall_near)

    if tint is not None:  # camouflage: the room takes the salient object's hue
        wall_col = np.clip(0.7 * tint + 0.3 * _muted(rng) + rng.uniform(-0.06, 0.06), 0, 1)
        floor_col = np.clip(0.75 * tint + 0.25 * _muted(rng) - 0.08, 0, 1)
    else:
        wall_col, floor_col = _muted(rng), _muted(rng)

    wall_tex = 0.05 * _lowfreq(rng, s, 6)
    kind = rng.integers(3)
    if kind == 1:  # wallpaper stripes
        wall_tex += 0.06 * np.sign(np.sin(xx * 2 * math.pi / rng.uniform(6, 14)))
    elif kind == 2:  # tiles
        period = rng.uniform(10, 20)
        wall_tex -= 0.12 * ((xx % period < 1.2) | (yy % period < 1.2))
    world_x = (xx - s / 2) / np.maximum(floor_near, 0.05) / s  # floor plane coordinates:
    world_z = 1.0 / np.maximum(floor_near, 0.05)  # perspective comes for free
    floor_tex = 0.06 * _lowfreq(rng, s, 10)
    kind = rng.integers(3)
    if kind == 0:  # planks
        floor_tex += 0.07 * np.sign(np.sin(world_z * rng.uniform(4, 8)))
    elif kind == 1:  # checker tiles
        a, b = rng.uniform(6, 12), rng.uniform(2, 5)
        floor_tex += 0.1 * np.sign(np.sin(world_x * a) * np.sin(world_z * b))
    rgb = np.where(
        is_floor[..., None],
        floor_col * (1 + floor_tex[..., None]),
        wall_col * (1 + wall_tex[..., None]),
    )
    if rng.random() < 0.5:  # a darker skirting where wall meets floor
        rgb[(yy >= horizon - 2) & (yy < horizon + 0.5)] *= 0.6
    return rgb.astype(np.float32), near.astype(np.float32), (horizon, near_wall, near_bottom)


# ---- the scene ------------------------------------------------------------------------
def _contrast_colour(rng: np.random.Generator, ref: np.ndarray, exclude: str) -> str:
    dist = {c: float(np.abs(np.array(v) / 255 - ref).sum()) for c, v in PALETTE.items()}
    ranked = [c for c in sorted(dist, key=dist.get, reverse=True) if c != exclude]
    return ranked[int(rng.integers(3))]


def layout_objects(
    cfg: SynthConfig, rng: np.random.Generator, room_law, colour: str, camouflage: bool, bg_mean
):
    s = cfg.image_size
    horizon, near_wall, near_bottom = room_law

    def row_of(near: float) -> float:  # inverse of the floor disparity law
        return horizon + (near - near_wall) / (near_bottom - near_wall) * (s - horizon)

    def near_of(row: float) -> float:
        return near_wall + (near_bottom - near_wall) * (row - horizon) / (s - horizon)

    words = rng.permutation(len(VOCAB))
    n_d = int(rng.integers(cfg.min_distractors, cfg.max_distractors + 1))
    r_s = rng.uniform(*cfg.salient_radius) * s
    base = rng.uniform(max(row_of(0.45), horizon + 0.6 * r_s), min(row_of(0.8), s - 2.0))
    base = max(base, 2.0 * r_s + 1)
    cx = s / 2 + rng.normal(0, 0.12 * s) if rng.random() < 0.75 else rng.uniform(0, s)
    cx = float(np.clip(cx, r_s + 1, s - r_s - 1))
    pattern = PATTERNS[int(rng.choice(4, p=[0.15, 0.35, 0.25, 0.25]))]
    word = VOCAB[words[0]]
    objs = [
        SceneObject(
            word, colour, pattern, near_of(base), cx, base - BOTTOM[word] * r_s, r_s, "salient"
        )
    ]
    for k in range(n_d):
        u = rng.random()
        role = (
            "front"
            if u < cfg.front_distractor_prob
            else "similar"
            if u < cfg.front_distractor_prob + cfg.similar_depth_prob
            else "behind"
        )
        r_d = rng.uniform(*cfg.distractor_radius) * s
        if role == "front":
            near = objs[0].near + rng.uniform(0.06, 0.2)
        elif role == "similar":
            near = objs[0].near + rng.uniform(-0.04, 0.02)
        else:
            near = objs[0].near - rng.uniform(0.1, 0.35)
        near = float(np.clip(near, near_wall + 0.05, near_bottom + 0.05))
        b = float(np.clip(row_of(near), 2 * r_d + 1, s + 0.3 * r_d))
        for _ in range(12):  # keep the salient object mostly visible
            x = rng.uniform(r_d, s - r_d)
            if abs(x - cx) > 0.85 * (r_s + r_d) or abs(b - base) > 1.2 * (r_s + r_d):
                break
        else:
            continue
        if camouflage and k == 0:  # the loud one
            dcol = _contrast_colour(rng, bg_mean, colour)
        else:
            dcol = COLOURS[int(rng.integers(len(COLOURS)))]
        dpat = "plain" if rng.random() < 0.85 else PATTERNS[int(rng.integers(1, 4))]
        word = VOCAB[words[k + 1]]
        objs.append(SceneObject(word, dcol, dpat, near_of(b), x, b - BOTTOM[word] * r_d, r_d, role))
    return objs


def sensor_depth(cfg: SynthConfig, rng, near: np.ndarray, label, objs) -> np.ndarray:
    """Sensor model on clean disparity -> uint16 near_is_large, 0 = hole."""
    s = near.shape[0]
    shift = rng.integers(-cfg.max_depth_shift, cfg.max_depth_shift + 1, size=2)
    m = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    clean = cv2.warpAffine(
        near.astype(np.float32), m, (s, s), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE
    )
    d = clean + 0.01 * _lowfreq(rng, s, 4) + rng.normal(0, cfg.depth_noise, near.shape)
    d = np.round(np.clip(d, 0, 1) * cfg.depth_levels) / cfg.depth_levels
    holes = np.zeros((s, s), np.uint8)
    if rng.random() < cfg.edge_hole_prob:  # occlusion shadows left of depth discontinuities
        jump = (clean[:, 1:] - clean[:, :-1]) > 0.05  # background -> nearer surface, left to right
        edge = np.zeros((s, s), np.uint8)
        edge[:, :-1] = jump
        width = int(rng.integers(1, 4)) + 1
        holes |= cv2.dilate(edge, np.ones((1, width), np.uint8), anchor=(width - 1, 0))
    if rng.random() < cfg.blob_hole_prob:
        for _ in range(int(rng.integers(1, 4))):
            c = (int(rng.integers(s)), int(rng.integers(s)))
            ax = (int(rng.uniform(0.02, 0.08) * s) + 1, int(rng.uniform(0.02, 0.06) * s) + 1)
            cv2.ellipse(holes, c, ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    for idx, obj in enumerate(objs):  # dark surfaces absorb the IR pattern
        if obj.colour == "black" and rng.random() < cfg.dark_hole_prob:
            lab = np.roll(label == idx, (int(shift[1]), int(shift[0])), axis=(0, 1))
            holes |= lab & (rng.random((s, s)) < 0.8)
    if rng.random() < cfg.border_hole_prob:
        holes[:, : int(rng.integers(2, max(3, s // 16)))] = 1
    holes |= rng.random((s, s)) < cfg.dropout
    out = (1 + np.round(d * 65534)).astype(np.uint16)
    out[holes.astype(bool)] = 0
    return out
