"""Dense CRF post-processing (jsm_dist.crf.dense_crf)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from jsm_dist import crf

H = 64


def _square(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, H), np.float32)
    m[y0:y1, x0:x1] = 1.0
    return m


def _image(mask: np.ndarray) -> np.ndarray:
    """A red object on a dark grey background, uint8 (H, W, 3)."""
    colour = np.array([220, 60, 60], np.float32)
    return (40 + mask[..., None] * (colour - 40)).astype(np.uint8)


def _blurred(mask: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(mask, (0, 0), 4) * 0.8 + 0.1


def _to_torch(probs: list[np.ndarray], imgs: list[np.ndarray]):
    p = torch.from_numpy(np.stack(probs))[:, None]
    rgb = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    return p, rgb


def test_crf_output_range_shape_dtype():
    obj = _square(16, 48, 20, 52)
    rng = np.random.default_rng(0)
    noisy = np.clip(_blurred(obj) + rng.normal(0, 0.2, obj.shape), 0, 1).astype(np.float32)
    p, rgb = _to_torch([_blurred(obj), noisy, np.zeros_like(obj)], [_image(obj)] * 3)
    out = crf.dense_crf(p, rgb)
    assert out.shape == p.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.isfinite(out).all()
    assert float(out[2].max()) < 0.5  # an empty map stays background


def test_crf_sharpens_blurred_mask_along_rgb_edges():
    obj = _square(16, 48, 20, 52)
    blur = _blurred(obj)
    out = crf.dense_crf(*_to_torch([blur], [_image(obj)]))[0, 0].numpy()
    k = np.ones((7, 7), np.uint8)
    band = (cv2.dilate(obj, k) - cv2.erode(obj, k)) > 0  # pixels near the object boundary
    err_blur = np.abs(blur - obj)[band].mean()
    err_crf = np.abs(out - obj)[band].mean()
    assert err_crf < 0.5 * err_blur, (err_blur, err_crf)


def test_crf_follows_the_image_edges_not_the_mask():
    """The RGB object sits 4 px right of the blurred mask: the CRF moves towards the RGB edge,
    which it cannot do on a flat image."""
    mask_obj, rgb_obj = _square(16, 48, 20, 52), _square(16, 48, 24, 56)
    blur = _blurred(mask_obj)
    flat = np.full((H, H, 3), 100, np.uint8)
    out = crf.dense_crf(*_to_torch([blur, blur], [_image(rgb_obj), flat]))[:, 0].numpy()
    err_edges = np.abs(out[0] - rgb_obj).mean()
    err_flat = np.abs(out[1] - rgb_obj).mean()
    assert err_edges < 0.6 * err_flat, (err_edges, err_flat)
    assert err_edges < np.abs(out[0] - mask_obj).mean()


def test_crf_rejects_bad_shapes():
    with pytest.raises(ValueError, match="prob"):
        crf.dense_crf(torch.rand(2, H, H), torch.rand(2, 3, H, H))
    with pytest.raises(ValueError, match="rgb"):
        crf.dense_crf(torch.rand(2, 1, H, H), torch.rand(2, 3, H, H + 1))


def test_crf_process_pool_matches_in_process():
    obj = _square(10, 40, 12, 50)
    probs = [_blurred(obj), _blurred(np.roll(obj, 5, 1)), _blurred(obj) * 0.5]
    p, rgb = _to_torch(probs, [_image(obj)] * 3)
    params = crf.CRFParams(size=64)
    try:
        pooled = crf.dense_crf(p, rgb, params, workers=2)
    finally:
        crf.shutdown_crf_pools()
    assert torch.allclose(pooled, crf.dense_crf(p, rgb, params, workers=0), atol=1e-6)
