"""The refinement pass (jsm_dist.refine.refinement): labels and side columns it commits, with a stand-in
model whose outputs are known (tests/refine_stub.py), and its diagnostics (did the update
favour the better candidate, by S-measure?)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import all_ids, garble_member, label_value, make_tiny_corpus
from refine_stub import (
    IdModel,
    check_refined_generation,
    data_config,
    new_label_value,
    stub_weights,
)

from jsm_dist import schema
from jsm_dist.eval.metrics import image_stats, smeasure_per_image
from jsm_dist.labels import LabelStore
from jsm_dist.refine.refinement import refine_labels
from jsm_dist.refine.stats import candidate_choice


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
    from jsm_dist.eval.metrics import evaluate_arrays

    gt = np.stack([_square(4, 4), _square(10, 2), _square(2, 12)])
    pred = np.stack([_square(5, 5), _square(14, 14), _square(2, 11)])
    res, sm = evaluate_arrays(pred, gt, per_image_sm=True)
    np.testing.assert_allclose(sm, smeasure_per_image(pred, gt), rtol=0, atol=1e-12)
    assert res["Sm"] == pytest.approx(sm.mean())
    assert res["Sm"] == evaluate_arrays(pred, gt)["Sm"]


# ---- the pass itself, with a stand-in model whose every output is known --------------------
SHARDS = (5, 3, 7, 1, 4)  # uneven; batches of 3 straddle shard boundaries


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param((), id="all-readable"),
        # an unreadable sample: the pass carries its previous label over and marks it
        pytest.param(((2, 4),), id="one-corrupt"),
    ],
)
def test_refine_pass_writes_every_sample_its_own_label_and_side_columns(tmp_path, corrupt):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=SHARDS, size=32, label_size=16)
    for s, i in corrupt:
        garble_member(corpus.shard_paths[s], f"tiny_{s:03d}_{i:04d}.rgb.png")
    store = LabelStore.open(corpus.label_dir)
    gen0 = _files(store.gen_dir(0))
    readable = sorted(all_ids(corpus) - set(corrupt))
    for g in (1, 2):  # the second pass must start from the first one's labels
        model = IdModel(generation=g).train()
        stats = refine_labels(model, corpus, store, data_config(), progress=False)
        assert model.training  # mode restored
        assert stats.generation == g and store.generation == g
        check_refined_generation(store, g, corrupt)
        # each readable sample refined once, fed its current (generation g - 1) label
        prev = label_value if g == 1 else (lambda s, i: new_label_value(s, i, 1))
        assert sorted(model.seen) == [(s, i, prev(s, i)) for s, i in readable]
        # the diagnostics are the means over exactly these samples
        new = np.array([new_label_value(s, i, g) for s, i in readable], np.float64)
        old = np.array([prev(s, i) for s, i in readable], np.float64)
        w_g = np.array([stub_weights(s, i, g)[0] for s, i in readable])
        assert stats.samples == len(readable)
        assert stats.mean_abs_change == pytest.approx(np.abs(new - old).mean() / 255, abs=1e-6)
        assert stats.fg_old == pytest.approx((old > 127.5).mean())
        assert stats.fg_new == pytest.approx((new > 127.5).mean())
        assert stats.w_g_mean == pytest.approx(w_g.mean()) and stats.w_g_std > 0
    assert _files(store.gen_dir(0)) == gen0  # a committed generation is never written again
    assert store.generations == [0, 1, 2]


def test_pass_times_its_phases_without_counting_a_second_twice(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=SHARDS, size=32, label_size=16)
    store = LabelStore.open(corpus.label_dir)
    model = IdModel(generation=1, crf_sleep=0.05)
    stats = refine_labels(model, corpus, store, data_config(), progress=False)
    ph = stats.phases
    assert set(ph) == {"decode", "forward", "crf", "write", "evaluation", "commit"}
    batches = -(-sum(SHARDS) // data_config().batch_size)  # batches straddle shards
    assert ph["crf"] == pytest.approx(0.05 * batches)
    assert 0 <= ph["forward"] < 0.05 * batches  # the CRF's sleep is not counted again here
    assert all(v >= 0 for v in ph.values())
    assert sum(ph.values()) <= stats.seconds + 1e-6


def test_pass_statistics_say_whether_labels_sit_on_the_object():
    """quality_old / quality_new carry eval/objects.py's diagnostics of exactly the labels
    the pass read and wrote, against GT."""
    from jsm_dist.eval.objects import object_diagnostics
    from jsm_dist.refine.stats import RefineAccumulator, to_label_size

    rng = np.random.default_rng(0)
    gt = torch.zeros(6, 1, 16, 16)
    gt[:, :, 4:10, 4:10] = 1.0
    old = torch.zeros_like(gt)
    old[:3, :, 0:3, :] = 1.0  # three labels on the wrong object ...
    old[3:, :, 4:10, 4:10] = 1.0  # ... three on the right one
    new = (old + torch.from_numpy(rng.uniform(0, 0.3, old.shape)).float()).clamp(0, 1)
    new[0, :, 0:3, :] = 0.0  # the update repairs one
    new[0, :, 4:10, 4:10] = 1.0
    acc = RefineAccumulator((16, 16), 100, 0)
    batch = {schema.LABEL: old, schema.GT: gt, schema.HAS_GT: torch.ones(6, dtype=torch.bool)}
    new_u8 = to_label_size(new, (16, 16))
    acc.step(batch, {"label": new}, new_u8)
    stats = acc.get_results(1)
    gt_u8 = to_label_size(gt, (16, 16))
    for q, labels in (
        (stats.quality_old, to_label_size(old, (16, 16))),
        (stats.quality_new, new_u8),
    ):
        want = object_diagnostics(labels, gt_u8)
        for k in ("main_off", "any_off", "mass_out"):
            assert q[k] == pytest.approx(want[k])
    assert stats.quality_old["main_off"] == pytest.approx(0.5)
    assert stats.quality_new["main_off"] == pytest.approx(2 / 6)
