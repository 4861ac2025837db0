"""Component diagnostics (eval/objects.py) against a direct transcription of the definition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from jsm_dist.eval.objects import image_object_stats, object_diagnostics


def slow_stats(label: np.ndarray, gt: np.ndarray):
    """The definition, pixel by pixel: scipy's 8-connected labelling, per-component loops."""
    lab = label.astype(np.float64) / 255.0
    g = gt > 127
    comp, n = ndimage.label(lab > 0.5, structure=np.ones((3, 3)))
    mass, out = lab.sum(), sum(lab[y, x] for y, x in zip(*np.nonzero(~g)))
    if n == 0:
        return False, False, mass, out, True
    sizes, offs = [], []
    for c in range(1, n + 1):
        pix = list(zip(*np.nonzero(comp == c)))
        inside = sum(1 for y, x in pix if g[y, x])
        sizes.append(len(pix))
        offs.append(inside < 0.3 * len(pix))
    return offs[int(np.argmax(sizes))], any(offs), mass, out, False


def _scene(rng, h=40, w=48):
    gt = np.zeros((h, w), np.uint8)
    y, x = rng.integers(5, h - 15), rng.integers(5, w - 15)
    gt[y : y + 10, x : x + 12] = 255
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(0, 4)):  # blobs anywhere, some on the object
        cy, cx = rng.integers(0, h - 6), rng.integers(0, w - 6)
        a, b = rng.integers(2, 9, size=2)
        label[cy : cy + a, cx : cx + b] = rng.integers(100, 256)
    label = np.maximum(label, (gt * rng.uniform(0, 1)).astype(np.uint8) * rng.integers(0, 2))
    return label.astype(np.uint8), gt


@pytest.mark.parametrize("seed", range(40))
def test_image_stats_match_the_definition(seed):
    label, gt = _scene(np.random.default_rng(seed))
    fast, slow = image_object_stats(label, gt), slow_stats(label, gt)
    assert fast[0] == slow[0] and fast[1] == slow[1] and fast[4] == slow[4]
    assert fast[2] == pytest.approx(slow[2] / 1.0 * 1.0, rel=1e-5)
    assert fast[3] == pytest.approx(slow[3], rel=1e-5, abs=1e-6)


def test_diagnostics_on_hand_made_cases():
    gt = np.zeros((20, 20), np.uint8)
    gt[5:15, 5:15] = 255
    right = gt.copy()
    wrong = np.zeros_like(gt)
    wrong[0:4, 0:20] = 255  # 80 px, nothing inside the GT: the largest component, off-object
    both = right.copy()
    both[0:3, 0:20] = 255  # a small off-object strip beside the right object
    corner = gt.copy()
    corner[4, 4] = 255  # touches the object diagonally: one component (8-connectivity)
    d = object_diagnostics(np.stack([right, wrong, both, np.zeros_like(gt), corner]),
                           np.stack([gt] * 5))  # fmt: skip
    assert d["n"] == 5 and d["empty"] == 1
    assert d["main_off"] == pytest.approx(1 / 5)  # only `wrong`
    assert d["any_off"] == pytest.approx(2 / 5)  # `wrong` and `both`
    outside = 80 + 60 + 1  # label pixels (all 1.0) outside the GT, over all images
    total = 100 + 80 + 160 + 101
    assert d["mass_out"] == pytest.approx(outside / total)


def test_float_maps_read_like_uint8_and_other_integers_are_refused():
    label, gt = _scene(np.random.default_rng(1))
    assert (
        image_object_stats(label.astype(np.float32) / 255, gt)[:2]
        == image_object_stats(label, gt)[:2]
    )
    with pytest.raises(ValueError, match="uint8"):
        image_object_stats(label.astype(np.int64), gt)


def test_sizes_must_match():
    with pytest.raises(ValueError, match="differ in size"):
        image_object_stats(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
