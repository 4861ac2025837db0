"""Joint augmentation: geometry identical on every modality, colour on RGB only."""

from __future__ import annotations

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
