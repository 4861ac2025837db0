"""Joint augmentation: geometry identical on every modality, colour on RGB only."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from jsm_dist.data import augment as A


def _blob(h: int, w: int, cx: float, cy: float, sigma: float = 0.06) -> np.ndarray:
    """A Gaussian blob at normalised (cx, cy), sampled at the pixel centres of an h x w grid."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = (xx + 0.5) / w, (yy + 0.5) / h
    return np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * sigma**2))


def _centroid(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    if a.ndim == 3:
        a = a.mean(-1)
    a = np.clip(a - 0.2 * a.max(), 0, None)  # ignore the low tail cut by borders
    yy, xx = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    return np.array([(a * xx).sum(), (a * yy).sum()]) / a.sum()


def _sample(h=60, w=80, label_hw=(30, 40), cx=0.62, cy=0.38) -> dict:
    img = _blob(h, w, cx, cy)
    return {
        "rgb": np.repeat((img * 250)[..., None], 3, -1).astype(np.uint8),
        "depth": img.astype(np.float32),
        "label": (_blob(*label_hw, cx, cy) * 255).astype(np.uint8),  # other resolution
        "gt": (img > 0.5).astype(np.uint8) * 255,
    }


@pytest.mark.parametrize("seed", range(6))
def test_random_geometry_keeps_modalities_aligned(seed):
    rng = np.random.default_rng(seed)
    cfg = A.AugmentConfig(crop=0.3, rotate_deg=25.0, rotate_prob=1.0 if seed % 2 else 0.0)
    sample = _sample()
    geom = A.sample_geometry(rng, cfg)
    out = A.apply(sample, (48, 48), geom)
    c_rgb = _centroid(out["rgb"])
    for key in ("depth", "label", "gt"):
        assert np.abs(_centroid(out[key]) - c_rgb).max() < 0.75, (key, geom)
    # and the blob sits where the transform says: output = inverse(map) applied to the image point
    snapped = A.snap_to_pixels(geom, (60, 80))
    m = A.output_to_image(snapped, (60, 80), (48, 48))
    expected = np.linalg.solve(m, [0.62 * 80 - 0.5, 0.38 * 60 - 0.5, 1.0])[:2]
    assert np.abs(c_rgb - expected).max() < 0.75


def test_flip_is_exact_mirror():
    s = _sample(h=40, w=40, label_hw=(40, 40))
    out = A.apply(s, (40, 40), A.Geometry(flip=True))
    np.testing.assert_array_equal(out["rgb"], s["rgb"][:, ::-1])
    np.testing.assert_array_equal(out["depth"], s["depth"][:, ::-1])
    np.testing.assert_array_equal(out["label"], s["label"][:, ::-1])
    np.testing.assert_array_equal(out["gt"], (s["gt"][:, ::-1] >= 128).astype(np.uint8))


def test_pixel_aligned_crop_is_exact_slice():
    s = _sample(h=40, w=40, label_hw=(40, 40))
    geom = A.Geometry(box=(5 / 40, 10 / 40, 35 / 40, 30 / 40))  # 30 x 20 pixels
    out = A.apply(s, (20, 30), geom)
    np.testing.assert_array_equal(out["rgb"], s["rgb"][10:30, 5:35])
    np.testing.assert_array_equal(out["depth"], s["depth"][10:30, 5:35])


def test_rotation_by_90_degrees_is_rot90():
    img = np.arange(36, dtype=np.float32).reshape(6, 6)
    m = A.output_to_image(A.Geometry(angle_deg=90.0), (6, 6), (6, 6))
    np.testing.assert_allclose(A.warp(img, m, (6, 6), (6, 6)), np.rot90(img, 1), atol=1e-4)


def test_identity_keeps_values_and_resizes_other_resolutions():
    s = _sample(h=32, w=32, label_hw=(16, 16))
    out = A.apply(s, (32, 32))
    np.testing.assert_array_equal(out["rgb"], s["rgb"])
    np.testing.assert_array_equal(out["depth"], s["depth"])
    assert out["label"].shape == (32, 32) and out["label"].dtype == np.uint8
    assert set(np.unique(out["gt"])) <= {0, 1}


def test_color_jitter_touches_rgb_only():
    s = _sample()
    geom = A.Geometry(flip=True, box=(0.1, 0.1, 0.9, 0.95), angle_deg=7.0)
    plain = A.apply(s, (40, 40), geom)
    jit = A.apply(s, (40, 40), geom, np.random.default_rng(3), jitter=True)
    for key in ("depth", "label", "gt"):
        np.testing.assert_array_equal(plain[key], jit[key])
    assert not np.array_equal(plain["rgb"], jit["rgb"])


def _pil_enhance(rgb: np.ndarray, b: float, c: float, s: float, k: float) -> np.ndarray:
    """Slow transcription: the reference's PIL ImageEnhance chain."""
    im = Image.fromarray(rgb)
    im = ImageEnhance.Brightness(im).enhance(b)
    im = ImageEnhance.Contrast(im).enhance(c)
    im = ImageEnhance.Color(im).enhance(s)
    return np.asarray(ImageEnhance.Sharpness(im).enhance(k))


@pytest.mark.parametrize(
    "factors", [(1.2, 0.8, 1.5, 2.0), (0.7, 1.3, 0.3, 0.5), (1.0, 1.0, 1.0, 1.0)]
)
def test_color_jitter_matches_pil_enhance(factors):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    rgb = np.stack([70 + xx * 2, 90 + yy, 120 + (xx + yy) // 2], -1) + rng.integers(
        0, 20, (48, 48, 3)
    )
    rgb = rgb.clip(0, 255).astype(np.uint8)  # mid-range: no step of the chain saturates
    ours = A.jitter_with(rgb, *factors).astype(np.float64)
    ref = _pil_enhance(rgb, *factors).astype(np.float64)
    inner = (slice(1, -1), slice(1, -1))  # PIL's SMOOTH leaves the border unfiltered
    diff = ours[inner] - ref[inner]
    # PIL truncates after each of its four blends (ours rounds once): a bias of <= ~2 levels
    assert np.abs(diff).mean() < 2.5
    assert np.abs(diff).max() <= 6


def test_sample_geometry_respects_switches():
    rng = np.random.default_rng(0)
    off = A.AugmentConfig(flip=False, crop=0.0, rotate_deg=0.0)
    assert all(A.sample_geometry(rng, off).is_identity for _ in range(20))
    on = A.AugmentConfig(flip=True, crop=0.2, rotate_deg=10.0, rotate_prob=1.0)
    geoms = [A.sample_geometry(rng, on) for _ in range(50)]
    assert any(g.flip for g in geoms) and not all(g.flip for g in geoms)
    assert all(abs(g.angle_deg) <= 10.0 for g in geoms)
    assert all(0.8 - 1e-9 <= g.box[2] - g.box[0] <= 1.0 for g in geoms)


@pytest.mark.parametrize(
    "kwargs, bad",
    [({"crop": 1.0}, "1.0"), ({"rotate_deg": -1.0}, "-1.0"), ({"rotate_prob": 2.0}, "2.0")],
)
def test_augment_config_rejects_bad_values(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        A.AugmentConfig(**kwargs)


def _rows(size: int = 40) -> dict:
    return {
        "rgb": np.zeros((3, size, size), np.uint8),
        "depth": np.zeros((size, size), np.uint16),
        "label": np.zeros((size, size), np.uint8),
        "gt": np.zeros((size, size), np.uint8),
    }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("depth_u16", [False, True])
def test_apply_into_writes_what_apply_then_collate_would(seed, depth_u16):
    """The loader's path (straight into batch rows) = the public apply + batching.collate."""
    from jsm_dist.data.batching import collate

    s = {**_sample(), "shard": 0, "index": 0, "word": 0, "word_pos": 0, "key": "k", "caption": ""}
    if depth_u16:
        s["depth"] = (s["depth"] * 65535 + 0.5).astype(np.uint16)
    cfg = A.AugmentConfig(crop=0.3, rotate_deg=20.0, rotate_prob=0.5)
    geom = A.sample_geometry(np.random.default_rng(seed), cfg)
    ref = collate([A.apply(s, (40, 40), geom, np.random.default_rng(seed), jitter=True)])
    rows = _rows()
    scratch: dict = {}
    for _ in range(2):  # twice: the reused scratch buffers must not leak between calls
        A.apply_into(s, rows, geom, np.random.default_rng(seed), True, scratch)
        np.testing.assert_array_equal(rows["rgb"], ref["rgb"][0].numpy())
        for key in ("depth", "label", "gt"):
            np.testing.assert_array_equal(rows[key], ref[key][0, 0].numpy(), err_msg=key)
    no_label = {k: v for k, v in s.items() if k not in ("label", "gt")}
    A.apply_into(no_label, rows, geom, np.random.default_rng(seed), True, scratch)
    assert not rows["label"].any() and not rows["gt"].any()


def test_coarse_label_is_brought_to_image_resolution_and_stays_aligned():
    """A crop that cuts label pixels: the label is upsampled to image resolution first; the
    result matches a direct bilinear warp of the label (same geometry, a little smoother)."""
    label = (_blob(30, 40, 0.55, 0.45, sigma=0.15) * 255).astype(np.uint8)
    geom = A.snap_to_pixels(A.Geometry(flip=True, box=(0.113, 0.061, 0.93, 0.87)), (60, 80))
    m = A.output_to_image(geom, (60, 80), (48, 48))
    got = A.warp(label, m, (60, 80), (48, 48)).astype(np.float64)
    to_label = np.array([[0.5, 0, -0.25], [0, 0.5, -0.25], [0, 0, 1.0]])  # centres aligned
    direct = cv2.warpAffine(
        label.astype(np.float32),
        (to_label @ m)[:2],
        (48, 48),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    assert np.abs(got - direct).max() <= 6  # smooth label: two interpolations ~ one
    assert np.abs(_centroid(got) - _centroid(direct)).max() < 0.1


def test_jitter_into_a_destination_and_scratch_is_the_same():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (24, 30, 3)).astype(np.uint8)
    plain = A.jitter_with(rgb, 1.2, 0.7, 1.6, 2.5)
    scratch: dict = {}
    out = rgb.copy()
    A.jitter_with(out, 1.2, 0.7, 1.6, 2.5, dst=out, scratch=scratch)  # in place
    np.testing.assert_array_equal(out, plain)
    assert set(scratch) == {"jitter", "box"}


def test_apply_into_without_gt_rows_leaves_them_to_the_caller():
    """A loader that never reads GT hands over rows without ``gt``: nothing else changes;
    a sample that does carry GT is then an error, not silently dropped."""
    s = _sample()
    no_gt = {k: v for k, v in s.items() if k != "gt"}
    geom = A.sample_geometry(np.random.default_rng(3), A.AugmentConfig(crop=0.3))
    full = _rows()
    A.apply_into(no_gt, full, geom, np.random.default_rng(3), True)
    rows = {k: v for k, v in _rows().items() if k != "gt"}
    A.apply_into(no_gt, rows, geom, np.random.default_rng(3), True)
    for k, v in rows.items():
        np.testing.assert_array_equal(v, full[k], err_msg=k)
    with pytest.raises(ValueError, match="ground truth"):
        A.apply_into(s, rows, geom, np.random.default_rng(3), True)


@pytest.mark.parametrize("size", [(48, 48), (23, 61)])
def test_single_channel_8bit_resize_is_the_rounded_bilinear_value(size):
    """8-bit single-channel images are resized in 16 bits (faster here): the result is the
    exact bilinear value rounded (OpenCV's 8-bit path, fixed-point weights, is within one
    unit), written into ``dst`` or returned as uint8; RGB takes OpenCV's 8-bit path."""
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 256, (30, 40)).astype(np.uint8)
    exact = cv2.resize(lab.astype(np.float32), size[::-1], interpolation=cv2.INTER_LINEAR)
    dst = np.empty(size, np.uint8)
    got = A._resize(lab, size[::-1], cv2.INTER_LINEAR, dst)
    assert got is dst
    assert np.abs(got - exact).max() <= 0.5 + 1e-3
    eight = cv2.resize(lab, size[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.abs(got.astype(int) - eight).max() <= 1
    as_u8 = A._resize(lab, size[::-1], cv2.INTER_LINEAR, dtype=np.uint8)
    assert as_u8.dtype == np.uint8 and np.array_equal(as_u8, got)
    rgb = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
    np.testing.assert_array_equal(
        A._resize(rgb, size[::-1], cv2.INTER_LINEAR), cv2.resize(rgb, size[::-1])
    )
    # the warp of a coarse 8-bit label (upsampled to image resolution, then cropped) stays
    # 8-bit with or without a destination
    geom = A.snap_to_pixels(A.Geometry(flip=True, box=(0.113, 0.061, 0.93, 0.87)), (60, 80))
    m = A.output_to_image(geom, (60, 80), size)
    plain = A.warp(lab, m, (60, 80), size)
    into = A.warp(lab, m, (60, 80), size, dst=np.empty(size, np.uint8))
    assert plain.dtype == np.uint8 and np.array_equal(plain, into)
