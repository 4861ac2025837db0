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

from jsm_dist import schema
from jsm_dist.settings import check_fields, setting, within


@dataclass
class AugmentConfig:
    """Which augmentations run (train loader only; evaluation uses identity geometry).

    ``DataConfig`` (the ``data`` section of a run) extends this class, so these fields are
    declared once and set as ``--data.flip``, ``--data.crop``, ...
    """

    flip: bool = setting(True, "random horizontal flip, p = 0.5")
    crop: float = setting(
        0.1,
        "random crop keeps between (1 - crop) and 1 of each side",
        check=within(0.0, 1.0, hi_open=True),
    )
    rotate_deg: float = setting(15.0, "max rotation angle, degrees", check=within(0.0, 90.0))
    rotate_prob: float = setting(
        0.2, "probability of a rotation (reference: 0.2)", check=within(0.0, 1.0)
    )
    color_jitter: bool = setting(
        True, "brightness/contrast/saturation/sharpness jitter on RGB only"
    )

    def __post_init__(self) -> None:
        check_fields(self, "augment")


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
    dst: np.ndarray | None = None,
    copy: bool = True,
) -> np.ndarray:
    """Sample ``arr`` (any resolution covering the same scene as the image) on the output grid.

    Sources much larger than the output are first shrunk with area averaging (anti-aliasing);
    the map accounts for the actual source size, so the result is aligned either way.
    Without rotation, a crop whose edges fall on whole pixels of ``arr`` is an exact slice
    + resize (~3x faster than a general warp); a source *smaller* than the image whose
    pixels the crop cuts (a low-resolution label) is first brought to image resolution
    (centre-aligned, so still exactly aligned; a little smoother), where the crop is whole
    pixels -- but only when the image itself needs no shrinking for this output: a label
    brought up to a large image would have to be shrunk again, to a size where the crop
    cuts pixels once more. Such a label (and any other case) takes the general warp, from
    its own resolution. ``dst`` (oh, ow[, c], the result's dtype) receives the result when
    given, except that with ``copy=False`` an exact unflipped crop comes back as a view of
    ``arr``.
    """
    h, w = image_hw
    oh, ow = out_hw
    (a, b, c), (d, e, f) = out_to_img[0].tolist(), out_to_img[1].tolist()  # plain floats: fast
    ah, aw = arr.shape[:2]
    shrink = _shrink_factor(a, b, d, e, aw / w, ah / h, interpolation)
    if shrink:
        size = (max(1, round(aw / shrink)), max(1, round(ah / shrink)))
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
        ah, aw = arr.shape[:2]
    m = _array_map(a, b, c, d, e, f, aw / w, ah / h)
    if abs(b) < 1e-12 and abs(d) < 1e-12:  # no rotation
        crop = _whole_pixel_crop(m, out_hw, (ah, aw))
        if crop is not None:
            return _crop_resize(arr, crop, out_hw, interpolation, dst, copy)
        if ah <= h and aw <= w and not _shrink_factor(a, b, d, e, 1.0, 1.0, interpolation):
            m_img = _array_map(a, b, c, d, e, f, 1.0, 1.0)
            crop = _whole_pixel_crop(m_img, out_hw, image_hw)
            if crop is not None:  # whole image pixels, not whole pixels of this coarser array
                up = _resize(arr, (w, h), interpolation)  # 8-bit stays widened until the end
                out = _crop_resize(up, crop, out_hw, interpolation, dst, True)
                return out if out.dtype == arr.dtype else out.astype(arr.dtype)
    out = cv2.warpAffine(
        arr,
        np.array(m),
        (ow, oh),
        dst=dst,
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return _put(dst, out)


def _shrink_factor(
    a: float, b: float, d: float, e: float, sx: float, sy: float, interpolation: int
) -> float:
    """Source pixels per output pixel when above 2 (bilinear sampling would alias), else 0.

    ``a, b, d, e``: the linear part of the output -> image map; ``sx, sy``: this array's
    pixels per image pixel. The smaller of the two axes, so that the shrunk array keeps at
    least the output's resolution along both. Nearest sampling never shrinks.
    """
    shrink = min((abs(a) + abs(b)) * sx, (abs(d) + abs(e)) * sy)
    return shrink if shrink > 2.0 and interpolation != cv2.INTER_NEAREST else 0.0


def _array_map(
    a: float, b: float, c: float, d: float, e: float, f: float, sx: float, sy: float
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Output pixel -> pixel of an array with ``sx, sy`` pixels per image pixel: (image
    pixel -> array pixel, pixel centres aligned) composed with the output -> image map."""
    return (
        (sx * a, sx * b, sx * c + 0.5 * sx - 0.5),
        (sy * d, sy * e, sy * f + 0.5 * sy - 0.5),
    )


def _whole_pixel_crop(m, out_hw: tuple[int, int], arr_hw: tuple[int, int]):
    """The (x, y) source intervals of an unrotated map ``m`` (see :func:`_axis_interval`)
    when its crop falls on whole pixels of an ``arr_hw`` array, else None."""
    ix = _axis_interval(m[0][0], m[0][2], out_hw[1], arr_hw[1])
    iy = _axis_interval(m[1][1], m[1][2], out_hw[0], arr_hw[0])
    return None if ix is None or iy is None else (ix, iy)


def _crop_resize(
    arr: np.ndarray,
    crop,
    out_hw: tuple[int, int],
    interpolation: int,
    dst: np.ndarray | None,
    copy: bool,
) -> np.ndarray:
    """The exact path of :func:`warp`: slice the whole-pixel crop, resize, flip."""
    (x0, x1, flip_x), (y0, y1, flip_y) = crop
    oh, ow = out_hw
    view = arr[y0:y1, x0:x1]
    if view.shape[:2] == (oh, ow) and not copy and not (flip_x or flip_y):
        return view
    if view.shape[:2] == (oh, ow):
        if dst is None:
            out = view.copy()
        else:
            np.copyto(dst, view, casting="unsafe")
            out = dst
    else:
        out = _resize(view, (ow, oh), interpolation, dst, arr.dtype)
    if flip_x:
        cv2.flip(out, 1, out)
    if flip_y:
        cv2.flip(out, 0, out)
    return out


def _resize(
    src: np.ndarray,
    size: tuple[int, int],
    interpolation: int,
    dst: np.ndarray | None = None,
    dtype=None,
) -> np.ndarray:
    """``cv2.resize`` to ``size`` (w, h), into ``dst`` when given, else as ``dtype``.

    Single-channel 8-bit bilinear resizing (label, GT) runs in 16 bits: OpenCV's 16-bit
    bilinear resize of one channel (float weights) is ~1.7x faster here than its 8-bit
    one (11-bit fixed-point weights), widening and narrowing included, and at least as
    exact (both round the bilinear value; they differ by at most one unit). Values of an
    8-bit source stay in 0..255, so narrowing is exact. (RGB gains nothing in the
    loader: OpenCV's 3-channel 8-bit resize is faster per channel, and 16-bit copies
    double the memory traffic.) Without ``dst`` and ``dtype`` an 8-bit source comes back
    in 16 bits (to be resized again: :func:`warp`'s low-resolution label path).
    """
    if interpolation == cv2.INTER_LINEAR and src.dtype == np.uint8 and src.ndim == 2:
        src = src.astype(np.uint16)
    if dst is not None and dst.dtype != src.dtype:
        return _put(dst, cv2.resize(src, size, interpolation=interpolation))
    out = cv2.resize(src, size, dst=dst, interpolation=interpolation)
    return out if dtype is None or out.dtype == dtype else out.astype(dtype)


def _put(dst: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """``out`` in ``dst`` (OpenCV writes in place when the shape and dtype fit; else copy)."""
    if dst is None or out is dst:
        return out
    np.copyto(dst, out, casting="unsafe")
    return dst


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


_LUMA_R, _LUMA_G, _LUMA_B = 0.299, 0.587, 0.114  # ITU-R 601-2, PIL's RGB -> L


def color_jitter(
    rgb: np.ndarray,
    rng: np.random.Generator,
    dst: np.ndarray | None = None,
    scratch: dict | None = None,
) -> np.ndarray:
    """uint8 (H, W, 3) -> jittered uint8 copy: PIL ImageEnhance semantics, two fast passes.

    Factors as in the reference loader: brightness b and contrast c in [0.5, 1.5], colour
    (saturation) s in [0, 2], sharpness k in [0, 3], applied in that order. Brightness,
    contrast and saturation are all linear, so they compose into one 3x4 colour matrix
    ``c*b*S x + (1-c)*m`` (S blends with the luma grey, m = mean grey after brightness),
    applied by ``cv2.transform`` with saturation to [0, 255] once at the end (PIL clips
    after every step: the result differs only where an intermediate step overflowed).
    Sharpness blends with PIL's SMOOTH kernel ([[1,1,1],[1,5,1],[1,1,1]] / 13), rewritten
    as ``(9 * box3x3 + 4 * x) / 13`` so that it is a box blur plus one weighted sum.
    ``dst`` (may be ``rgb`` itself) receives the result; ``scratch`` keeps the two
    intermediate images between calls.
    """
    b, c, s, k = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0, 2), rng.uniform(0, 3)
    return jitter_with(rgb, b, c, s, k, dst, scratch)


def jitter_with(
    rgb: np.ndarray,
    b: float,
    c: float,
    s: float,
    k: float,
    dst: np.ndarray | None = None,
    scratch: dict | None = None,
) -> np.ndarray:
    """:func:`color_jitter` with given brightness, contrast, colour and sharpness factors."""
    r, g, bl = cv2.mean(rgb[4::16])[:3]  # every 16th row: an unbiased mean, 16x cheaper
    mean_grey = b * (_LUMA_R * r + _LUMA_G * g + _LUMA_B * bl)
    # c*b * (s * I + (1 - s) * 1 luma^T) | (1 - c) * mean_grey, built from plain floats
    cb, grey_w, offset = c * b, c * b * (1.0 - s), (1.0 - c) * mean_grey
    luma = (_LUMA_R * grey_w, _LUMA_G * grey_w, _LUMA_B * grey_w)
    m = np.array(
        [[luma[j] + (cb * s if i == j else 0.0) for j in range(3)] + [offset] for i in range(3)],
        np.float32,
    )
    x = cv2.transform(rgb, m, dst=_buffer(scratch, "jitter", rgb.shape))
    box = cv2.blur(
        x, (3, 3), dst=_buffer(scratch, "box", rgb.shape), borderType=cv2.BORDER_REPLICATE
    )
    out = cv2.addWeighted(x, k + (1.0 - k) * 4.0 / 13.0, box, (1.0 - k) * 9.0 / 13.0, 0.0, dst=dst)
    return _put(dst, out)


def _buffer(scratch: dict | None, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A reusable uint8 array (None without a scratch dict: OpenCV then allocates)."""
    if scratch is None:
        return None
    buf = scratch.get(name)
    if buf is None or buf.shape != shape:
        buf = scratch[name] = np.empty(shape, np.uint8)
    return buf


def apply(
    sample: dict,
    out_hw: tuple[int, int],
    geom: Geometry = IDENTITY,
    rng: np.random.Generator | None = None,
    jitter: bool = False,
) -> dict:
    """Warp a decoded sample's arrays to ``out_hw`` with ``geom`` (+ optional RGB jitter).

    Input keys (numpy): ``rgb`` uint8 (H,W,3); ``depth`` (H,W), float32 in [0,1] or uint16
    (the same x 65535, what the loader decodes); optional ``label`` (uint8 or float, any
    resolution) and ``gt`` (uint8 0..255, any resolution). Output (cheap to batch):
    ``rgb`` uint8 (oh,ow,3); ``depth`` and ``label`` (oh,ow) in their input dtypes; ``gt``
    uint8 (oh,ow) in {0, 1} (binarised at half). Other keys pass through.
    """
    image_hw = sample[schema.RGB].shape[:2]
    m = output_to_image(snap_to_pixels(geom, image_hw), image_hw, out_hw)
    out = dict(sample)
    rgb = warp(sample[schema.RGB], m, image_hw, out_hw)
    if jitter:
        if rng is None:
            raise ValueError("color jitter needs an rng")
        rgb = color_jitter(rgb, rng, dst=rgb)
    out[schema.RGB] = rgb
    out[schema.DEPTH] = warp(sample[schema.DEPTH], m, image_hw, out_hw)
    if sample.get(schema.LABEL) is not None:
        out[schema.LABEL] = warp(sample[schema.LABEL], m, image_hw, out_hw)
    if sample.get(schema.GT) is not None:
        g = warp(sample[schema.GT], m, image_hw, out_hw)
        out[schema.GT] = cv2.threshold(g, 127, 1, cv2.THRESH_BINARY, dst=g)[1]  # (g >= 128) as 0/1
    return out


def apply_into(
    sample: dict,
    out: dict[str, np.ndarray],
    geom: Geometry = IDENTITY,
    rng: np.random.Generator | None = None,
    jitter: bool = False,
    scratch: dict | None = None,
) -> None:
    """:func:`apply`, written straight into one sample's rows of a compact batch.

    ``out``: ``rgb`` uint8 (3, oh, ow) (channel planes), ``depth`` uint16 (oh, ow) =
    round(depth * 65535), ``label`` uint8 (oh, ow) (float labels x 255, rounded), ``gt``
    uint8 (oh, ow) in {0, 1}; label / gt are zeros when the sample has none. ``gt`` may
    be left out of ``out`` for samples without ground truth: rows the caller keeps at
    zero itself (a loader that never reads GT). The same random draws and the same values
    as :func:`apply` followed by ``batching.collate``, without the intermediate arrays
    (``scratch`` keeps reusable buffers between calls).
    """
    if jitter and rng is None:
        raise ValueError("color jitter needs an rng")
    out_hw = out[schema.DEPTH].shape
    oh, ow = out_hw
    image_hw = sample[schema.RGB].shape[:2]
    m = output_to_image(snap_to_pixels(geom, image_hw), image_hw, out_hw)
    # (without jitter an exact crop is split straight from the decoded image)
    rgb_buf = _buffer(scratch, "rgb", (oh, ow, 3))
    rgb = warp(sample[schema.RGB], m, image_hw, out_hw, dst=rgb_buf, copy=jitter)
    if jitter:
        rgb = color_jitter(rgb, rng, dst=rgb, scratch=scratch)
    cv2.split(
        rgb, [out[schema.RGB][0], out[schema.RGB][1], out[schema.RGB][2]]
    )  # HWC -> CHW planes
    depth = sample[schema.DEPTH]
    if depth.dtype == np.uint16:
        warp(depth, m, image_hw, out_hw, dst=out[schema.DEPTH])
    else:
        d = warp(depth, m, image_hw, out_hw)
        np.add(d * np.float32(65535.0), 0.5, out=out[schema.DEPTH], casting="unsafe")
    label = sample.get(schema.LABEL)
    if label is None:
        out[schema.LABEL].fill(0)
    elif label.dtype == np.uint8:
        warp(label, m, image_hw, out_hw, dst=out[schema.LABEL])
    else:  # float label in [0, 1]
        lab = warp(label, m, image_hw, out_hw)
        np.add(lab * np.float32(255.0), 0.5, out=out[schema.LABEL], casting="unsafe")
    gt = sample.get(schema.GT)
    if "gt" not in out:
        if gt is not None:
            raise ValueError("the sample has ground truth but out has no gt rows")
    elif gt is None:
        out[schema.GT].fill(0)
    else:
        g = warp(gt, m, image_hw, out_hw, dst=_buffer(scratch, "gt", out_hw))
        cv2.threshold(g, 127, 1, cv2.THRESH_BINARY, dst=out[schema.GT])  # (g >= 128) as 0/1
