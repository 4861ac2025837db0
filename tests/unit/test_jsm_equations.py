"""JSM equations (jsm_dist.jsm) against slow, direct per-pixel / per-sample transcriptions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from jsm_reference import sig as _sig
from jsm_reference import slow_bns, slow_update

from jsm_dist import jsm
from jsm_dist.models.ssm import SSM, HolisticAttention, LearnableGaussian


# ---- slow transcriptions -----------------------------------------------------------------
def slow_conv_same(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Zero-padded 'same' 2-D cross-correlation, one pixel at a time."""
    h, w = img.shape
    kh, kw = k.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    out = np.zeros((h, w), np.float64)
    for y in range(h):
        for x in range(w):
            acc = 0.0
            for i in range(kh):
                for j in range(kw):
                    yy, xx = y + i - ph, x + j - pw
                    if 0 <= yy < h and 0 <= xx < w:
                        acc += img[yy, xx] * k[i, j]
            out[y, x] = acc
    return out


def slow_ssm(s: np.ndarray, depth: np.ndarray, k: np.ndarray, thr: float | None) -> np.ndarray:
    """Eq. 1 with the reference's min-max and binarisation, per image and per pixel."""
    out = np.zeros_like(s, dtype=np.float64)
    for b in range(s.shape[0]):
        sm = slow_conv_same(s[b, 0], k)
        lo, hi = sm.min(), sm.max()
        for y in range(s.shape[2]):
            for x in range(s.shape[3]):
                v = max((sm[y, x] - lo) / (hi - lo + 1e-8), s[b, 0, y, x])
                if thr is not None:
                    v = 1.0 if v > thr else 0.0
                out[b, 0, y, x] = v * depth[b, 0, y, x]
    return out


# ---- tests -------------------------------------------------------------------------------
def test_gaussian_kernel_is_reference_gkern():
    k = jsm.gaussian_kernel(31, 4)
    assert k.shape == (31, 31) and k.dtype == np.float32
    assert abs(float(k.sum()) - 1.0) < 1e-5
    assert np.allclose(k, k.T) and np.allclose(k, k[::-1, ::-1])
    assert k.argmax() == 15 * 31 + 15  # peak in the centre
    # separable: the reference builds sqrt(outer(k1, k1)) from the normal CDF
    from scipy.stats import norm

    interval = 9.0 / 31
    k1 = np.diff(norm.cdf(np.linspace(-4 - interval / 2, 4 + interval / 2, 32)))
    ref = np.sqrt(np.outer(k1, k1))
    assert np.allclose(k, ref / ref.sum(), atol=1e-7)


@pytest.mark.parametrize("thr", [0.05, 0.4, None])
def test_ssm_depth_mask_matches_slow_transcription(thr):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 1, 7, 9, generator=g, dtype=torch.float64)
    s[1] *= 0.3  # a dim map: the min-max rescales it
    depth = torch.rand(2, 1, 7, 9, generator=g, dtype=torch.float64)
    k = torch.rand(5, 5, generator=g, dtype=torch.float64)
    got = jsm.ssm_depth_mask(s, depth, k, threshold=thr)
    want = slow_ssm(s.numpy(), depth.numpy(), k.numpy(), thr)
    assert np.allclose(got.numpy(), want, atol=1e-10)
    if thr is not None:  # binary mask times depth
        att = jsm.ssm_attention(s, k, thr)
        assert set(np.unique(att.numpy())) <= {0.0, 1.0}


def test_ssm_even_kernel_keeps_size():
    s = torch.rand(1, 1, 10, 12)
    out = jsm.ssm_depth_mask(s, torch.ones_like(s), torch.ones(4, 4) / 16)
    assert out.shape == s.shape


def test_straight_through_same_value_and_gives_kernel_gradient():
    s = torch.rand(2, 1, 8, 8)
    depth = torch.rand(2, 1, 8, 8)
    k_st = torch.from_numpy(jsm.gaussian_kernel(5, 2)).requires_grad_()
    k_ref = k_st.detach().clone().requires_grad_()
    a = jsm.ssm_depth_mask(s, depth, k_st, 0.05, straight_through=True)
    b = jsm.ssm_depth_mask(s, depth, k_ref, 0.05, straight_through=False)
    assert torch.equal(a, b)  # forward identical to the reference
    target = torch.rand_like(a)
    ((a - target) ** 2).mean().backward()
    assert k_st.grad is not None and k_st.grad.abs().sum() > 0
    # the reference's hard threshold passes no gradient to its "learnable" kernel
    assert not b.requires_grad


@pytest.mark.parametrize("mode", ["free", "sigma"])
def test_learnable_gaussian_receives_gradients(mode):
    torch.manual_seed(0)
    ssm = SSM(size=7, nsig=2.0, mode=mode)
    ha = HolisticAttention(size=7, nsig=2.0, mode=mode)
    s = torch.rand(2, 1, 12, 12)
    d_mask = ssm(s, torch.rand(2, 1, 12, 12))
    x = torch.randn(2, 4, 12, 12)
    loss = ((d_mask - 0.3) ** 2).mean() + ha(s, x).pow(2).mean()
    loss.backward()
    for mod in (ssm.gauss, ha.gauss):
        grads = [p.grad for p in mod.parameters()]
        assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_sigma_mode_initialises_close_to_reference_kernel():
    free = LearnableGaussian(31, 4.0, "free").kernel().detach()
    sig = LearnableGaussian(31, 4.0, "sigma").kernel().detach()
    assert (free - sig).abs().max() < 0.1 * free.max()


def test_bns_matches_slow_transcription():
    g = torch.Generator().manual_seed(1)
    s_logit = torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64) * 2
    d_logit = torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64)
    got = jsm.bns_candidate(s_logit, d_logit)
    assert np.allclose(got.numpy(), slow_bns(s_logit.numpy(), d_logit.numpy()), atol=1e-10)
    assert got.min() >= 0 and got.max() <= 1


def test_jsm_update_matches_slow_transcription():
    g = torch.Generator().manual_seed(2)
    b, c = 4, 6
    logits = torch.randn(2, b, c, generator=g, dtype=torch.float64) * 3
    word = torch.tensor([1, 5, 0, 3])
    l_g = torch.rand(b, 1, 4, 5, generator=g, dtype=torch.float64)
    l_d = torch.rand(b, 1, 4, 5, generator=g, dtype=torch.float64)
    p = jsm.word_log_prob(logits, word)
    w = jsm.jsm_weights(p[0], p[1])
    new = jsm.jsm_update(l_g, l_d, w)
    want_new, want_w = slow_update(
        logits[0].numpy(), logits[1].numpy(), word.tolist(), l_g.numpy(), l_d.numpy()
    )
    assert np.allclose(w.numpy(), want_w, atol=1e-12)
    assert np.allclose(new.numpy(), want_new, atol=1e-12)
    assert torch.allclose(w.sum(1), torch.ones(b, dtype=torch.float64))


@pytest.mark.parametrize("score", ["word", "word_vs_negative"])
def test_candidate_score_weights_match_slow_transcription(score):
    g = torch.Generator().manual_seed(3)
    b, c = 5, 7
    logits = torch.randn(2, b, c, generator=g, dtype=torch.float64) * 3
    word = torch.tensor([1, 6, 2, 3, 4])
    l_g = torch.rand(b, 1, 3, 4, generator=g, dtype=torch.float64)
    l_d = torch.rand(b, 1, 3, 4, generator=g, dtype=torch.float64)
    p = jsm.candidate_score(logits, word, score)
    w = jsm.jsm_weights(p[0], p[1])
    want_new, want_w = slow_update(
        logits[0].numpy(), logits[1].numpy(), word.tolist(), l_g.numpy(), l_d.numpy(), score
    )
    assert np.allclose(w.numpy(), want_w, atol=1e-12)
    assert np.allclose(jsm.jsm_update(l_g, l_d, w).numpy(), want_new, atol=1e-12)


def test_word_vs_negative_separates_what_the_reference_score_ties():
    # both candidates name the word with p ~ 1; the second also looks far less like background
    logits = torch.tensor([[[0.0, 12.0, 0.0]], [[-6.0, 12.0, 0.0]]], dtype=torch.float64)
    word = torch.tensor([1])
    ref = jsm.candidate_score(logits, word, "word")
    w_ref = jsm.jsm_weights(ref[0], ref[1])
    assert abs(float(w_ref[0, 1]) - 0.5) < 1e-3  # reference: a tie
    odds = jsm.candidate_score(logits, word, "word_vs_negative")
    assert float(jsm.jsm_weights(odds[0], odds[1])[0, 1]) > 0.99
    with pytest.raises(ValueError, match="candidate score"):
        jsm.candidate_score(logits, word, "words")


def test_minmax_per_image_and_constant_image():
    x = torch.stack([torch.arange(6.0).view(1, 2, 3), torch.full((1, 2, 3), 7.0)])
    y = jsm.minmax(x)
    assert torch.allclose(y[0].flatten(), torch.arange(6.0) / 5.0, atol=1e-6)
    assert torch.equal(y[1], torch.zeros(1, 2, 3))


def test_postprocess_reference_sigmoid_minmax():
    lab = torch.rand(2, 1, 6, 6)
    out = jsm.postprocess(lab)
    s = torch.sigmoid(lab)
    lo = s.flatten(1).min(1).values.view(2, 1, 1, 1)
    hi = s.flatten(1).max(1).values.view(2, 1, 1, 1)
    assert torch.allclose(out, (s - lo) / (hi - lo + 1e-8))
    assert torch.equal(jsm.postprocess(lab, sigmoid=False, normalise=False), lab)


def test_sample_loss_weights_matches_slow():
    g = torch.Generator().manual_seed(3)
    logit = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    target = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    got = jsm.sample_loss_weights(logit, target)
    losses = []
    for b in range(3):
        vals = []
        for idx in np.ndindex(4, 4):
            x, t = float(logit[b, 0][idx]), float(target[b, 0][idx])
            vals.append(-(t * math.log(_sig(x)) + (1 - t) * math.log(1 - _sig(x))))
        losses.append(1.0 - sum(vals) / len(vals))
    e = [math.exp(v) for v in losses]
    assert np.allclose(got.numpy(), [v / sum(e) for v in e], atol=1e-10)


def test_tsm_loss_matches_slow_transcription():
    g = torch.Generator().manual_seed(4)
    logp = torch.log_softmax(torch.randn(2, 4, 5, generator=g, dtype=torch.float64), -1)
    word = torch.tensor([3, 0, 1, 4])  # sample 1 has no salient word: background term only
    got = float(jsm.tsm_loss(logp, word))
    pos = [-float(logp[0, b, word[b]]) for b in range(4) if word[b] != 0]
    neg = [-float(logp[1, b, 0]) for b in range(4)]
    want = (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2
    assert abs(got - want) < 1e-12
