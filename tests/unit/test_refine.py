"""Refinement-pass diagnostics: did the update favour the better candidate (by S-measure)?"""

import numpy as np
import pytest

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
    c = candidate_choice(old, cand, gt, w_d)
    assert c["n"] == 4
    assert c["cand_better"] == pytest.approx(0.5)
    assert c["favours_cand"] == pytest.approx(0.75)
    assert c["undecided"] == pytest.approx(0.25)
    assert c["favours_better"] == pytest.approx(0.5)  # the undecided scene counts as wrong
    assert c["favours_better_decided"] == pytest.approx(2 / 3)
    assert c["S_old"] == pytest.approx(c["S_cand"])  # two perfect, two wrong each
    assert c["corr_wd_dS"] > 0  # larger w_d where the candidate is better


def test_candidate_choice_rejects_mismatched_inputs():
    gt = np.stack([_square(4, 4)] * 3)
    with pytest.raises(ValueError, match="sizes"):
        candidate_choice(gt, gt, gt, np.full(2, 0.5))
