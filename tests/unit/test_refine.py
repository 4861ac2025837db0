"""Refinement-pass diagnostics: did the update favour the better candidate (by S-measure)?"""

import numpy as np
import pytest

from jsm_dist.eval_metrics import image_stats, smeasure_per_image
from jsm_dist.refine import candidate_choice


def _square(y, x, size=24, side=8):
    m = np.zeros((size, size), np.uint8)
    m[y : y + side, x : x + side] = 255
    return m


def test_candidate_choice_counts_each_case():
    gt = np.stack([_square(4, 4)] * 4)
    wrong = _square(14, 14)  # a distractor: no overlap with the object
    old = np.stack([gt[0], gt[1], wrong, wrong])  # current label right in scenes 0-1
    cand = np.stack([wrong, wrong, gt[2], gt[3]])  # candidate right in scenes 2-3
    w_d = np.array([0.2, 0.6, 0.9, 0.505])  # right, wrong, right, undecided
    c = candidate_choice(smeasure_per_image(old, gt), smeasure_per_image(cand, gt), w_d)
    assert c["n"] == 4
    assert c["cand_better"] == pytest.approx(0.5)
    assert c["favours_cand"] == pytest.approx(0.75)
    assert c["undecided"] == pytest.approx(0.25)
    assert c["favours_better"] == pytest.approx(0.5)  # the undecided scene counts as wrong
    assert c["favours_better_decided"] == pytest.approx(2 / 3)
    assert c["S_old"] == pytest.approx(c["S_cand"])  # two perfect, two wrong each
    assert c["corr_wd_dS"] > 0  # larger w_d where the candidate is better


def test_candidate_choice_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="sizes"):
        candidate_choice(np.ones(3), np.ones(3), np.full(2, 0.5))


def test_smeasure_per_image_is_the_evaluators_sm():
    gt = np.stack([_square(4, 4), _square(10, 2)])
    pred = np.stack([_square(5, 5), _square(14, 14)])
    want = [image_stats(p, g)["Sm"] for p, g in zip(pred, gt)]
    np.testing.assert_allclose(smeasure_per_image(pred, gt), want, rtol=0, atol=1e-12)
    assert want[0] > want[1]  # the overlapping square scores higher


def test_evaluate_arrays_hands_back_the_per_image_sm_it_averaged():
    from jsm_dist.eval_metrics import evaluate_arrays

    gt = np.stack([_square(4, 4), _square(10, 2), _square(2, 12)])
    pred = np.stack([_square(5, 5), _square(14, 14), _square(2, 11)])
    res, sm = evaluate_arrays(pred, gt, per_image_sm=True)
    np.testing.assert_allclose(sm, smeasure_per_image(pred, gt), rtol=0, atol=1e-12)
    assert res["Sm"] == pytest.approx(sm.mean())
    assert res["Sm"] == evaluate_arrays(pred, gt)["Sm"]
