"""Slow, direct transcriptions of the JSM equations, for tests (``from jsm_reference import ...``).

Written from the formulas one pixel / one sample at a time, in float64, without calling
``jsm_dist.jsm``: the batched implementation and the model are checked against these.
"""

from __future__ import annotations

import math

import numpy as np


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def slow_bns(s_logit: np.ndarray, d_logit: np.ndarray) -> np.ndarray:
    """BNS: ``minmax(sigmoid(relu(2 S - (1 - sigmoid(D)))))`` per image."""
    ds = np.zeros_like(s_logit, dtype=np.float64)
    for idx in np.ndindex(s_logit.shape):
        r = 2 * s_logit[idx] - (1 - sig(d_logit[idx]))
        ds[idx] = sig(max(r, 0.0))
    return slow_minmax(ds)


def slow_minmax(x: np.ndarray) -> np.ndarray:
    """Per-image ``(x - min) / (max - min + 1e-8)`` over everything but the batch dim."""
    out = np.zeros_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        lo, hi = x[b].min(), x[b].max()
        for idx in np.ndindex(x.shape[1:]):
            out[(b, *idx)] = (x[(b, *idx)] - lo) / (hi - lo + 1e-8)
    return out


def slow_postprocess(label: np.ndarray, sigmoid: bool = True, normalise: bool = True):
    """Reference post-processing: sigmoid per pixel, then per-image min-max (each optional)."""
    out = np.vectorize(sig)(label) if sigmoid else np.asarray(label, np.float64)
    return slow_minmax(out) if normalise else np.clip(out, 0.0, 1.0)


def slow_update(logits_g, logits_d, word, l_g, l_d, score="word"):
    """Per sample: log-softmax at the word (minus the one at class 0 for the
    ``word_vs_negative`` score), 2-way softmax, weighted sum per pixel."""
    new = np.zeros_like(l_g, dtype=np.float64)
    weights = []
    for b in range(len(word)):

        def logp(row, target):
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            word_lp = row[target] - lse
            return word_lp - (row[0] - lse) if score == "word_vs_negative" else word_lp

        pg = logp(list(logits_g[b]), word[b])
        pd = logp(list(logits_d[b]), word[b])
        wg = math.exp(pg) / (math.exp(pg) + math.exp(pd))
        wd = 1.0 - wg
        weights.append((wg, wd))
        for idx in np.ndindex(l_g.shape[1:]):
            new[(b, *idx)] = wg * l_g[(b, *idx)] + wd * l_d[(b, *idx)]
    return new, np.array(weights)
