"""Region repair (jsm_dist/refine/regions.py): each batched equation against a direct
per-sample transcription, region extraction on hand-made scenes, and the model's update
with a stub text network that knows where the named object is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from benchmarks.model import VOCAB, make_batch
from jsm_dist import schema
from jsm_dist.models import JSMModel, ModelConfig
from jsm_dist.refine import regions as R

H = W = 24


def _box(y0, y1, x0, x1, value=1.0):
    m = torch.zeros(1, H, W)
    m[:, y0:y1, x0:x1] = value
    return m


# ---- extraction ----------------------------------------------------------------------------
def test_extraction_finds_each_source_and_dedupes():
    label = torch.stack([_box(2, 8, 2, 8, 0.9) + _box(14, 20, 14, 22, 0.8)])  # two objects
    s_prob = torch.stack([_box(2, 8, 2, 8, 0.95) + _box(15, 21, 2, 7, 0.7)])  # one repeat, one new
    cand = torch.stack([_box(0, 1, 0, 1, 0.9)])  # a 1-px speck: below the area floor
    depth = torch.zeros(1, 1, H, W)
    depth[..., 10:14, 10:20] = 1.0  # a near slab: the depth layers
    regs = R.extract_regions(label, s_prob, cand, depth, R.RegionParams(min_area=0.01))
    found = [
        (int(regs.source[k, 0]), int(regs.masks[k, 0].sum()))
        for k in range(regs.masks.shape[0])
        if regs.valid[k, 0]
    ]
    # label components first, the saliency repeat of the first one deduped (IoU 1), the
    # new saliency blob, the depth slab once (both quantile layers give the same mask)
    assert found == [
        (R.SOURCE_LABEL, 36),
        (R.SOURCE_LABEL, 48),
        (R.SOURCE_SALIENCY, 30),
        (R.SOURCE_DEPTH, 40),
    ]
    # soft maps: the source's values inside, zero outside
    k_sal = 2
    assert torch.allclose(regs.soft[k_sal, 0], s_prob[0] * regs.masks[k_sal, 0])
    assert regs.masks[len(found) :].sum() == 0 and not regs.valid[len(found) :].any()
    assert (regs.source[len(found) :] == -1).all()


def test_extraction_caps_regions_and_skips_large_ones():
    label = torch.zeros(1, 1, H, W)
    for i in range(5):
        label[..., 1 + 4 * i : 3 + 4 * i, 1:5] = 1.0  # five separate 2x4 bars
    whole = torch.ones(1, 1, H, W)  # larger than max_area: never a region
    regs = R.extract_regions(label, whole, whole, torch.zeros(1, 1, H, W),
                             R.RegionParams(max_regions=3, min_area=0.01, max_area=0.5))  # fmt: skip
    assert regs.valid[:, 0].tolist() == [True, True, True]
    assert (regs.source[:, 0] == R.SOURCE_LABEL).all()


# ---- batched equations vs transcriptions ---------------------------------------------------
def _random_regions(seed, k=5, b=4):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(k, b, 1, H, W, generator=g) > 0.7).float()
    valid = torch.rand(k, b, generator=g) > 0.25
    valid[:, 0] = False  # an image without regions
    masks = masks * valid[..., None, None, None]
    soft = masks * torch.rand(k, b, 1, H, W, generator=g)
    source = torch.randint(0, 4, (k, b), generator=g).masked_fill(~valid, -1)
    return R.Regions(masks, soft, valid, source), g


@pytest.mark.parametrize("seed", range(5))
def test_confidence_scores_match_the_formula(seed):
    regs, g = _random_regions(seed)
    s_prob = torch.rand(regs.masks.shape[1], 1, H, W, generator=g)
    got = R.confidence_scores(regs, s_prob)
    for k in range(regs.masks.shape[0]):
        for b in range(regs.masks.shape[1]):
            if not regs.valid[k, b]:
                assert got[k, b] == -math.inf
                continue
            m = regs.masks[k, b, 0].bool()
            mean = min(max(float(s_prob[b, 0][m].mean()), 1e-4), 1 - 1e-4) if m.any() else 1e-4
            assert float(got[k, b]) == pytest.approx(
                math.log(mean / (1 - mean)), rel=1e-4, abs=1e-4
            )


def slow_select(scores, regs, margin, min_score):
    k, b = scores.shape
    keep = torch.zeros(k, b, dtype=torch.bool)
    repaired = torch.zeros(b, dtype=torch.bool)
    for j in range(b):
        idx = [i for i in range(k) if regs.valid[i, j]]
        if not idx:
            continue
        best_i = max(idx, key=lambda i: (float(scores[i, j]), -i))  # first of equal scores
        best = float(scores[best_i, j])
        if not best > min_score:
            continue
        repaired[j] = True
        keep[best_i, j] = True
        for i in idx:
            if int(regs.source[i, j]) == R.SOURCE_LABEL and float(scores[i, j]) >= best - margin:
                keep[i, j] = True
    return keep, repaired


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("margin, min_score", [(0.0, -math.inf), (1.0, -math.inf), (0.5, 0.3)])
def test_selection_matches_a_per_image_loop(seed, margin, min_score):
    regs, g = _random_regions(seed)
    scores = torch.randn(regs.valid.shape, generator=g)
    keep, repaired = R.select_regions(scores, regs, margin, min_score)
    want_keep, want_rep = slow_select(scores, regs, margin, min_score)
    assert torch.equal(repaired, want_rep)
    assert torch.equal(keep, want_keep)


def slow_repair(l_g, l_d, regs, keep, repaired, grow):
    g, d, drop_all = l_g.clone(), l_d.clone(), torch.zeros_like(l_g)
    for j in range(l_g.shape[0]):
        if not repaired[j]:
            continue
        kept = np.zeros((H, W), bool)
        dropped = np.zeros((H, W), bool)
        added = np.zeros((H, W), np.float32)
        for i in range(regs.masks.shape[0]):
            m = regs.masks[i, j, 0].numpy() > 0
            if keep[i, j]:
                kept |= m
                added = np.maximum(added, regs.soft[i, j, 0].numpy())
            elif regs.valid[i, j]:
                dropped |= m
        if grow:  # every pixel within a (2 grow + 1) square of a kept pixel
            kept = ndimage.binary_dilation(kept, np.ones((2 * grow + 1,) * 2, bool))
        drop = torch.from_numpy((dropped & ~kept).astype(np.float32))
        drop_all[j, 0] = drop
        g[j, 0] = torch.maximum(l_g[j, 0], torch.from_numpy(added)) * (1 - drop)
        d[j, 0] = l_d[j, 0] * (1 - drop)
    return g, d, drop_all


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("grow", [0, 2])
def test_repair_matches_a_per_image_loop(seed, grow):
    regs, g = _random_regions(seed)
    b = regs.masks.shape[1]
    scores = torch.randn(regs.valid.shape, generator=g)
    keep, repaired = R.select_regions(scores, regs, 0.5, -math.inf)
    l_g, l_d = torch.rand(b, 1, H, W, generator=g), torch.rand(b, 1, H, W, generator=g)
    got = R.repair_candidates(l_g, l_d, regs, keep, repaired, grow)
    want = slow_repair(l_g, l_d, regs, keep, repaired, grow)
    for x, y in zip(got, want):
        assert torch.allclose(x, y)
    assert not repaired[0]  # the image without regions keeps its candidates
    assert torch.equal(got[0][0], l_g[0]) and torch.equal(got[1][0], l_d[0])


# ---- the model's update --------------------------------------------------------------------
class PlaceText(torch.nn.Module):
    """A stub text network that names the word exactly where ``target`` is: the logit of the
    salient word grows with the share of a map's mass inside ``target``; class 0 gets the
    rest."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target  # (B, 1, H, W) in {0, 1}

    def encode_text(self, captions, word_pos, words, device):
        return torch.as_tensor(words).long()

    def forward(self, feat, maps, words, rows=None):  # every row computed: rows is a hint
        size = maps.shape[-2:]
        t = torch.nn.functional.interpolate(self.target, size=size)
        inside = (maps * t).sum((-3, -2, -1)) / maps.sum((-3, -2, -1)).clamp(min=1e-6)
        logits = torch.zeros(*maps.shape[:2], len(VOCAB))
        logits.scatter_(-1, words.view(1, -1, 1).expand(maps.shape[0], -1, 1),
                        (10 * inside)[..., None])  # fmt: skip
        logits[..., 0] = 5.0
        return logits


class FixedSaliency(torch.nn.Module):
    """A saliency network stub: logits +3 on ``sure``, +1 on ``unsure``, -4 elsewhere."""

    def __init__(self, sure: torch.Tensor, unsure: torch.Tensor, channels: int) -> None:
        super().__init__()
        self.logit = -4.0 + 7.0 * sure + 5.0 * unsure
        self.channels = channels

    def forward(self, x, feat=None):
        b, _, h, w = x.shape
        f = torch.ones(b, self.channels, h, w) if feat else None
        return self.logit, self.logit, f


@pytest.mark.parametrize("score", ["text", "saliency"])
def test_region_update_moves_the_label_to_the_object_the_text_names(score):
    """Current label on a distractor (top left); the saliency network is surer of the
    distractor than of the named object (bottom right, nearer). With the text score the
    label moves to the named object; the text-free counterpart keeps the distractor."""
    torch.manual_seed(0)
    size = 32
    cfg = ModelConfig(encoder="tiny", text_model="tiny", text_hidden=32, text_heads=2,
                      crf=False, label_update="regions", region_score=score,
                      region_min_area=0.02)  # fmt: skip
    model = JSMModel(cfg, VOCAB, load_pretrained=False)
    batch = make_batch(2, size, seed=3)
    wrong = torch.zeros(2, 1, size, size)
    wrong[..., 2:10, 2:10] = 1.0
    right = torch.zeros(2, 1, size, size)
    right[..., 18:28, 18:28] = 1.0
    channels = model.saliency.feature_channels(cfg.text_feature)
    model.saliency = FixedSaliency(wrong, right, channels)
    batch[schema.LABEL] = wrong
    batch[schema.DEPTH] = 0.1 + 0.8 * right
    out = model.refine(batch, text=PlaceText(right))
    label = out[schema.LABEL]
    on = {
        k: float((label * m).sum() / label.sum()) for k, m in (("right", right), ("wrong", wrong))
    }
    assert out["region_repaired"].all()
    if score == "text":
        assert on["right"] > 0.9
        assert out["region_added"].all()  # the named object was not in the label
    else:
        assert on["wrong"] > 0.9
        assert not out["region_added"].any()


def test_blend_update_is_unchanged_by_the_region_settings():
    """label_update = blend (the reference) ignores every region_* setting."""
    batch = make_batch(2, 32, seed=4)
    outs = []
    for kw in ({}, {"region_max": 1, "region_keep_margin": 0.0, "region_grow": 0}):
        torch.manual_seed(0)
        cfg = ModelConfig(encoder="tiny", text_model="tiny", text_hidden=32, text_heads=2,
                          crf=False, **kw)  # fmt: skip
        outs.append(JSMModel(cfg, VOCAB, load_pretrained=False).refine(batch)[schema.LABEL])
    assert torch.equal(outs[0], outs[1])


def test_text_fit_negatives_are_the_regions_away_from_the_salient_object():
    """JSMModel.text_pooled(..., negatives=n): rows 2.. pool over other objects only."""
    size = 32
    cfg = ModelConfig(encoder="tiny", text_model="tiny", text_hidden=32, text_heads=2,
                      crf=False, region_min_area=0.02)  # fmt: skip
    model = JSMModel(cfg, VOCAB, load_pretrained=False)
    batch = make_batch(2, size, seed=5)
    sal = torch.zeros(2, 1, size, size)
    sal[..., 2:10, 2:10] = 1.0
    other = torch.zeros(2, 1, size, size)
    other[..., 18:28, 18:28] = 1.0  # a nearer object away from the salient one
    model.saliency = FixedSaliency(sal, torch.zeros_like(sal), model.text.v_conv.in_channels)
    batch[schema.LABEL] = sal
    batch[schema.DEPTH] = 0.1 + 0.8 * other
    pooled = model.text_pooled(batch[schema.RGB], batch, negatives=2)
    assert pooled.shape[:2] == (4, 2)
    feat = torch.ones(2, model.text.v_conv.in_channels, size, size)
    torch.testing.assert_close(pooled[2], model.text.masked_pool(feat, other[None])[0])
    assert (pooled[3] == 0).all()  # only one other object: the second row stays empty
    plain = model.text_pooled(batch[schema.RGB])
    torch.testing.assert_close(pooled[:2], plain)
