"""Joint augmentation: one geometric transform applied identically to every modality.

The geometry (flip, crop, small rotation, and the final resize to the train size) is one
affine map from output pixels to *image* pixels. Each modality is warped once with that
map composed with its own image->modality scale, so RGB (full resolution), depth, the
pseudo-label (store resolution, often smaller) and ground truth stay aligned to sub-pixel
accuracy whatever their sizes, and no intermediate resize is ever made.
Colour jitter (brightness, contrast, saturation, sharpness: the reference JSM ranges)
touches RGB only.

Pure functions of (arrays, config, numpy Generator): the loader seeds the generator from
(seed, rank, worker, epoch), so a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class AugmentConfig:
    """Which augmentations run (train loader only; evaluation uses identity geometry)."""

    flip: bool = True  # random horizontal flip, p = 0.5
    crop: float = 0.1  # random crop keeps between (1 - crop) and 1 of each side
    rotate_deg: float = 15.0  # max rotation angle, degrees
    rotate_prob: float = 0.2  # probability of rotating (reference: 0.2)
    color_jitter: bool = True  # brightness/contrast/saturation/sharpness on RGB only

    def __post_init__(self) -> None:
        if not 0.0 <= self.crop < 1.0:
            raise ValueError(f"crop must be in [0, 1), got {self.crop!r}")
        if not 0.0 <= self.rotate_deg <= 90.0:
            raise ValueError(f"rotate_deg must be in [0, 90], got {self.rotate_deg!r}")
        if not 0.0 <= self.rotate_prob <= 1.0:
            raise ValueError(f"rotate_prob must be in [0, 1], got {self.rotate_prob!r}")


@dataclass(frozen=True)
class Geometry:
    """A sampled transform, in image-normalised units (independent of resolution)."""

    flip: bool = False
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # crop x0, y0, x1, y1 in [0,1]
    angle_deg: float = 0.0  # counter-clockwise rotation about the crop centre

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.angle_deg == 0.0 and self.box == (0.0, 0.0, 1.0, 1.0)


IDENTITY = Geometry()


def sample_geometry(rng: np.random.Generator, cfg: AugmentConfig) -> Geometry:
    flip = bool(cfg.flip and rng.random() < 0.5)
    box = (0.0, 0.0, 1.0, 1.0)
    if cfg.crop > 0:
        fw, fh = rng.uniform(1.0 - cfg.crop, 1.0, size=2)
        x0, y0 = rng.uniform(0.0, 1.0 - fw), rng.uniform(0.0, 1.0 - fh)
        box = (float(x0), float(y0), float(x0 + fw), float(y0 + fh))
    angle = 0.0
    if cfg.rotate_deg > 0 and rng.random() < cfg.rotate_prob:
        angle = float(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
    return Geometry(flip, box, angle)


def output_to_image(
    geom: Geometry, image_hw: tuple[int, int], out_hw: tuple[int, int]
) -> np.ndarray:
    """3x3 matrix: output pixel (u, v, 1) -> image pixel (x, y, 1), pixel centres at +0.5."""
    h, w = image_hw
    oh, ow = out_hw
    x0, y0, x1, y1 = geom.box
    # output pixel centre -> continuous image coordinate inside the crop box
    sx, sy = (x1 - x0) * w / ow, (y1 - y0) * h / oh
    m = np.array(
        [[sx, 0.0, x0 * w + 0.5 * sx - 0.5], [0.0, sy, y0 * h + 0.5 * sy - 0.5], [0, 0, 1.0]]
    )
    if geom.angle_deg:
        cx, cy = (x0 + x1) * w / 2 - 0.5, (y0 + y1) * h / 2 - 0.5
        a = math.radians(geom.angle_deg)
        c, s = math.cos(a), math.sin(a)
        rot = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1.0]])
        m = rot @ m
    if geom.flip:
        m = np.array([[-1.0, 0, w - 1.0], [0, 1.0, 0], [0, 0, 1.0]]) @ m
    return m


def warp(
    arr: np.ndarray,
    out_to_img: np.ndarray,
    image_hw: tuple[int, int],
    out_hw: tuple[int, int],
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """Sample ``arr`` (any resolution covering the same scene as the image) on the output grid.

    Sources much larger than the output are first shrunk with area averaging (anti-aliasing);
    the map accounts for the actual source size, so the result is aligned either way.
    """
    h, w = image_hw
    oh, ow = out_hw
    ah, aw = arr.shape[:2]
    # source pixels per output pixel; above 2, bilinear sampling would alias
    step_x = (abs(out_to_img[0, 0]) + abs(out_to_img[0, 1])) * aw / w
    step_y = (abs(out_to_img[1, 0]) + abs(out_to_img[1, 1])) * ah / h
    shrink = min(step_x, step_y)
    if shrink > 2.0 and interpolation != cv2.INTER_NEAREST:
        size = (max(1, round(aw / shrink)), max(1, round(ah / shrink)))
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
        ah, aw = arr.shape[:2]
    # image pixel -> this array's pixel (centres aligned)
    to_arr = np.array(
        [[aw / w, 0, 0.5 * aw / w - 0.5], [0, ah / h, 0.5 * ah / h - 0.5], [0, 0, 1.0]]
    )
    m = (to_arr @ out_to_img)[:2].astype(np.float64)
    if abs(m[0, 1]) < 1e-12 and abs(m[1, 0]) < 1e-12:
        # no rotation: a pixel-aligned crop + resize + flip is exact and ~4x faster than a warp
        sx = _axis_interval(m[0, 0], m[0, 2], ow, aw)
        sy = _axis_interval(m[1, 1], m[1, 2], oh, ah)
        if sx is not None and sy is not None:
            view = arr[sy[0] : sy[1], sx[0] : sx[1]]
            if view.shape[:2] == (oh, ow):
                out = view.copy()
            else:
                out = cv2.resize(view, (ow, oh), interpolation=interpolation)
            if sx[2]:
                out = cv2.flip(out, 1)
            if sy[2]:
                out = cv2.flip(out, 0)
            return out
    return cv2.warpAffine(
        arr,
        m,
        (ow, oh),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def _axis_interval(scale: float, offset: float, n_out: int, n_src: int):
    """Source pixel interval [lo, hi) read by ``src = scale * out + offset`` (pixel centres)
    over ``n_out`` output pixels, and whether it runs backwards; None unless its edges
    fall on whole pixels inside the source."""
    e0 = offset - 0.5 * scale + 0.5  # source edge at the output's first edge
    e1 = e0 + scale * n_out
    lo, hi = min(e0, e1), max(e0, e1)
    ilo, ihi = round(lo), round(hi)
    if abs(lo - ilo) > 1e-6 or abs(hi - ihi) > 1e-6 or ilo < 0 or ihi > n_src or ihi <= ilo:
        return None
    return ilo, ihi, scale < 0


def snap_to_pixels(geom: Geometry, image_hw: tuple[int, int]) -> Geometry:
    """Crop box on whole image pixels (so RGB/depth/GT take the exact crop + resize path)."""
    h, w = image_hw
    x0, y0, x1, y1 = geom.box
    ix0, iy0 = round(x0 * w), round(y0 * h)
    ix1, iy1 = max(ix0 + 1, round(x1 * w)), max(iy0 + 1, round(y1 * h))
    return Geometry(geom.flip, (ix0 / w, iy0 / h, min(ix1, w) / w, min(iy1, h) / h), geom.angle_deg)


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, PIL's RGB -> L


def color_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) -> jittered uint8 copy: PIL ImageEnhance semantics, two fast passes.

    Factors as in the reference loader: brightness b and contrast c in [0.5, 1.5], colour
    (saturation) s in [0, 2], sharpness k in [0, 3], applied in that order. Brightness,
    contrast and saturation are all linear, so they compose into one 3x4 colour matrix
    ``c*b*S x + (1-c)*m`` (S blends with the luma grey, m = mean grey after brightness),
    applied by ``cv2.transform`` with saturation to [0, 255] once at the end (PIL clips
    after every step: the result differs only where an intermediate step overflowed).
    Sharpness blends with PIL's SMOOTH kernel ([[1,1,1],[1,5,1],[1,1,1]] / 13), rewritten
    as ``(9 * box3x3 + 4 * x) / 13`` so that it is a box blur plus one weighted sum.
    """
    b, c, s, k = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0, 2), rng.uniform(0, 3)
    return jitter_with(rgb, b, c, s, k)


def jitter_with(rgb: np.ndarray, b: float, c: float, s: float, k: float) -> np.ndarray:
    """:func:`color_jitter` with given brightness, contrast, colour and sharpness factors."""
    mean_grey = b * float(np.dot(cv2.mean(rgb[4::8])[:3], _LUMA))  # every 8th row: unbiased
    sat = s * np.eye(3) + (1.0 - s) * np.outer(np.ones(3), _LUMA)
    m = np.concatenate([c * b * sat, np.full((3, 1), (1.0 - c) * mean_grey)], axis=1)
    x = cv2.transform(rgb, m.astype(np.float32))
    box = cv2.blur(x, (3, 3), borderType=cv2.BORDER_REPLICATE)
    return cv2.addWeighted(x, k + (1.0 - k) * 4.0 / 13.0, box, (1.0 - k) * 9.0 / 13.0, 0.0)


def apply(
    sample: dict,
    out_hw: tuple[int, int],
    geom: Geometry = IDENTITY,
    rng: np.random.Generator | None = None,
    jitter: bool = False,
) -> dict:
    """Warp a decoded sample's arrays to ``out_hw`` with ``geom`` (+ optional RGB jitter).

    Input keys (numpy): ``rgb`` uint8 (H,W,3); ``depth`` float32 (H,W) in [0,1]; optional
    ``label`` (uint8 or float, any resolution) and ``gt`` (uint8 0..255, any resolution).
    Output (cheap to batch; the collate makes floats): ``rgb`` uint8 (oh,ow,3); ``depth`` float32 (oh,ow); ``label`` (oh,ow) in its input dtype; ``gt`` uint8
    (oh,ow) in {0, 1} (binarised at half). Other keys pass through.
    """
    image_hw = sample["rgb"].shape[:2]
    m = output_to_image(snap_to_pixels(geom, image_hw), image_hw, out_hw)
    out = dict(sample)
    rgb = warp(sample["rgb"], m, image_hw, out_hw)
    if jitter:
        if rng is None:
            raise ValueError("color jitter needs an rng")
        rgb = color_jitter(rgb, rng)
    out["rgb"] = rgb
    out["depth"] = warp(sample["depth"], m, image_hw, out_hw)
    if sample.get("label") is not None:
        out["label"] = warp(sample["label"], m, image_hw, out_hw)
    if sample.get("gt") is not None:
        g = warp(sample["gt"], m, image_hw, out_hw)
        out["gt"] = (g >= 128).astype(np.uint8)
    return out
