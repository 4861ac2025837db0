"""The JSM equations as pure, batched tensor functions (no modules, no state).

Every function takes whole batches (``(B, 1, H, W)`` maps) and has no per-sample Python loop.
The dense CRF of the post-processing, a C++ CRF per image with its process pool (state),
lives in :mod:`jsm_dist.crf`.

Conventions: saliency/depth *logits* are named ``*_logit``; probabilities / maps in [0, 1]
are named ``*_prob`` or ``*_map``. ``depth`` follows :mod:`jsm_dist.schema` (1 = near).

Equations (see ``docs/method.md``):

- SSM, paper Eq. 1: ``D_mask = max(F_gauss(S, k), S) * D_map`` with the reference code's
  per-image min-max of the smoothed map and the 0.05 binarisation -> :func:`ssm_depth_mask`.
- BNS: ``L_d = minmax(sigmoid(relu(2 * S_logit - (1 - sigmoid(D_logit)))))``
  -> :func:`bns_candidate`.
- TSM loss: ``(NLL(T(feat * S), word) + NLL(T(feat * (1 - S)), 0)) / 2`` -> :func:`tsm_loss`.
- JSM: ``(w_g, w_d) = softmax([log p(word | feat * L_g), log p(word | feat * L_d)])``,
  ``L_new = w_g L_g + w_d L_d`` -> :func:`word_log_prob`, :func:`jsm_weights`, :func:`jsm_update`.
- Reference post-processing: sigmoid, per-image min-max, dense CRF -> :func:`postprocess`,
  ``crf.dense_crf``.
"""

from __future__ import annotations

import typing
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-8


# ---- Gaussian kernel and normalisation ---------------------------------------------------
def gaussian_kernel(size: int = 31, nsig: float = 4.0) -> np.ndarray:
    """The reference ``gkern``: a (size, size) kernel from the normal CDF over [-nsig, nsig].

    ``nsig`` is the half-width of the support in standard deviations, so the std in pixels is
    about ``size / (2 * nsig)`` (31, 4 -> ~3.9 px). Sums to 1.
    """
    from scipy.stats import norm

    interval = (2 * nsig + 1.0) / size
    x = np.linspace(-nsig - interval / 2.0, nsig + interval / 2.0, size + 1)
    k1 = np.diff(norm.cdf(x))
    kernel = np.sqrt(np.outer(k1, k1))
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_kernel_torch(size: int, sigma_px: torch.Tensor) -> torch.Tensor:
    """A differentiable (size, size) Gaussian with std ``sigma_px`` (pixels), normalised to 1."""
    r = torch.arange(size, dtype=sigma_px.dtype, device=sigma_px.device) - (size - 1) / 2.0
    g = torch.exp(-0.5 * (r / sigma_px) ** 2)
    k = torch.outer(g, g)
    return k / k.sum()


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation over the last two dims: ``(x - min) / (max - min + 1e-8)``."""
    flat = x.flatten(-2)
    lo = flat.min(-1).values[..., None, None]
    hi = flat.max(-1).values[..., None, None]
    return (x - lo) / (hi - lo + EPS)


def gaussian_smooth(s_prob: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``F_gauss(S, k)``: 2-D convolution of (B, 1, H, W) with a (k, k) kernel, zero bias, 'same'."""
    k = kernel.reshape(1, 1, *kernel.shape[-2:])
    pad_h, pad_w = k.shape[-2] // 2, k.shape[-1] // 2
    out = F.conv2d(s_prob, k, padding=(pad_h, pad_w))
    # even kernels (the paper's 32) give one extra row/col: crop to the input size
    return out[..., : s_prob.shape[-2], : s_prob.shape[-1]]


# ---- SSM (paper Eq. 1) -------------------------------------------------------------------
def ssm_attention(
    s_prob: torch.Tensor,
    kernel: torch.Tensor,
    threshold: float | None = 0.05,
    straight_through: bool = True,
) -> torch.Tensor:
    """``max(minmax(F_gauss(S, k)), S)``, binarised at ``threshold`` like the reference.

    Args:
        s_prob: (B, 1, H, W) saliency probabilities (the caller detaches them).
        kernel: (k, k) smoothing kernel (may require grad).
        threshold: ``> threshold -> 1 else 0``; ``None`` keeps the soft map.
        straight_through: the hard threshold has zero gradient, so in the reference code the
            "learnable" kernel never receives one (it also wraps the map in ``torch.tensor``).
            With ``True`` the forward value is the same binary map but the backward pass uses the
            soft map's gradient (straight-through estimator), so the kernel is actually learned,
            as the paper states. ``False`` reproduces the reference exactly (no kernel gradient).
    """
    soft = torch.maximum(minmax(gaussian_smooth(s_prob, kernel)), s_prob)
    if threshold is None:
        return soft
    hard = (soft > threshold).to(soft.dtype)
    return hard + (soft - soft.detach()) if straight_through else hard


def ssm_depth_mask(
    s_prob: torch.Tensor,
    depth: torch.Tensor,
    kernel: torch.Tensor,
    threshold: float | None = 0.05,
    straight_through: bool = True,
) -> torch.Tensor:
    """Paper Eq. 1, ``D_mask = max(F_gauss(S, k), S) * D_map`` (reference normalisation/threshold).

    ``depth`` is (B, 1, H, W) in [0, 1] with 1 = near (schema convention), so a near salient
    object keeps large target values and the far background inside the dilated mask small.
    """
    return ssm_attention(s_prob, kernel, threshold, straight_through) * depth


# ---- BNS ---------------------------------------------------------------------------------
def bns_candidate(s_logit: torch.Tensor, d_logit: torch.Tensor) -> torch.Tensor:
    """Background-noise suppression: the depth-refined candidate ``L_d`` in [0, 1].

    ``r = 2 S_logit - (1 - sigmoid(D_logit))``; ``L_d = minmax(sigmoid(relu(r)))``.
    (Reference: ``S_pred + S_pred - (1 - D_pred.sigmoid())`` on the detection logits.)
    """
    r = 2.0 * s_logit - (1.0 - torch.sigmoid(d_logit))
    return minmax(torch.sigmoid(torch.relu(r)))


# ---- JSM ---------------------------------------------------------------------------------
def word_log_prob(logits: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[word]`` per row: (..., B, C), (B,) -> (..., B)."""
    logp = F.log_softmax(logits, dim=-1)
    idx = word.reshape(*([1] * (logits.dim() - 2)), -1, 1).expand(*logits.shape[:-1], 1)
    return logp.gather(-1, idx).squeeze(-1)


JsmScore = Literal["word", "word_vs_negative"]
JSM_SCORES = typing.get_args(JsmScore)


def candidate_score(logits: torch.Tensor, word: torch.Tensor, kind: str = "word") -> torch.Tensor:
    """The per-candidate score whose softmax gives the JSM weights: (..., B, C), (B,) -> (..., B).

    ``"word"`` (paper/reference): ``log p(word | feat * L)``. ``"word_vs_negative"``:
    ``log p(word | feat * L) - log p(negative | feat * L)``, the log-odds of the salient word
    against class 0, the class the TSM loss trains on background regions. Why the option: a
    text network that names the word confidently from both candidates gives ``p ~ 1`` for
    both, so the reference weights sit at 0.5 whatever the candidates' quality; the odds
    against "negative" keep growing with how little of the region looks like background.
    Measured on the demo run (``benchmarks.text_signal`` and the refinement pass's
    ``choice`` statistics; docs/experiments.md, "Label update scoring").
    """
    if kind not in JSM_SCORES:
        raise ValueError(f"candidate score must be one of {JSM_SCORES}, got {kind!r}")
    p = word_log_prob(logits, word)
    if kind == "word_vs_negative":
        p = p - F.log_softmax(logits, dim=-1)[..., 0]
    return p


def jsm_weights(p_g: torch.Tensor, p_d: torch.Tensor) -> torch.Tensor:
    """``(w_g, w_d) = softmax([p_g, p_d])`` per sample: (B,), (B,) -> (B, 2)."""
    return torch.softmax(torch.stack([p_g, p_d], dim=-1), dim=-1)


def jsm_update(l_g: torch.Tensor, l_d: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``L_new = w_g L_g + w_d L_d`` with ``weights`` (B, 2) and labels (B, 1, H, W)."""
    w = weights.to(l_g.dtype)
    return w[:, 0, None, None, None] * l_g + w[:, 1, None, None, None] * l_d


def tsm_loss(logp: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """TSM training loss: mean of ``NLL(logp[0], word)`` (salient-masked feature -> its word) and
    ``NLL(logp[1], 0)`` (background-masked feature -> "negative").

    ``logp``: (2, B, C) log-probabilities. Samples with ``word == 0`` (no salient word) are
    left out of the first term (it would teach "salient region -> negative").
    """
    has_word = word != 0
    pos = logp[0].gather(1, word[:, None].long())[:, 0]
    pos_nll = -(pos * has_word).sum() / has_word.sum().clamp(min=1)
    neg_nll = -logp[1, :, 0].mean()
    return (pos_nll + neg_nll) / 2.0


def postprocess(label: torch.Tensor, sigmoid: bool = True, normalise: bool = True) -> torch.Tensor:
    """Reference post-processing before the CRF: ``minmax(sigmoid(L_new))`` (each optional)."""
    out = torch.sigmoid(label) if sigmoid else label
    return minmax(out) if normalise else out.clamp(0.0, 1.0)


def sample_loss_weights(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reference's (unused) per-sample weight ``softmax_over_batch(1 - mean BCE)``: (B,)."""
    bce = F.binary_cross_entropy_with_logits(logits.detach(), target.detach(), reduction="none")
    return torch.softmax(1.0 - bce.flatten(1).mean(1), dim=0)
