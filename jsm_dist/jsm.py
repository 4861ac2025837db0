"""The JSM equations as pure, batched tensor functions (no modules, no state).

Every function takes whole batches (``(B, 1, H, W)`` maps) and has no per-sample Python loop,
except :func:`dense_crf`, which is a C++ CRF per image run over a process pool.

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
  :func:`dense_crf`.
"""

from __future__ import annotations

import atexit
import math
import typing
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
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
    Measured on the demo run (``jsm_dist.bench.text_signal`` and the refinement pass's
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


# ---- dense CRF ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CRFParams:
    """Reference CRF settings (``DenseCRF/examples/dense_hsal.py``)."""

    size: int = 256  # the CRF runs at size x size (reference resizes to 256)
    iters: int = 1  # mean-field iterations
    tau: float = 1.05  # unary temperature
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 60.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 5.0

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"CRFParams.size must be >= 8, got {self.size}")
        if self.iters < 1:
            raise ValueError(f"CRFParams.iters must be >= 1, got {self.iters}")


def _sigmoid_np(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def crf_one(prob: np.ndarray, rgb: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Dense CRF on one image: prob (H, W) float in [0, 1], rgb (H, W, 3) uint8 -> (H, W) in [0, 1].

    The reference writes the map as an 8-bit PNG first; here the float map is used directly.
    """
    import cv2
    import pydensecrf.densecrf as dcrf

    h, w = prob.shape
    s = params.size
    img = np.ascontiguousarray(cv2.resize(rgb, (s, s), interpolation=cv2.INTER_LINEAR))
    a = np.clip(cv2.resize(prob.astype(np.float32), (s, s), interpolation=cv2.INTER_LINEAR), 0, 1)
    n_energy = -np.log(1.0 - a + EPS) / (params.tau * _sigmoid_np(1.0 - a))
    p_energy = -np.log(a + EPS) / (params.tau * _sigmoid_np(a))
    unary = np.stack([n_energy.ravel(), p_energy.ravel()]).astype(np.float32)
    d = dcrf.DenseCRF2D(s, s, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    d.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    d.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=img,
        compat=params.bilateral_compat,
    )
    q = np.array(d.inference(params.iters), dtype=np.float32)[1].reshape(s, s)
    return np.clip(cv2.resize(q, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def _crf_job(args: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    return crf_one(*args)


_POOLS: dict[int, Executor] = {}


def _pool(workers: int) -> Executor:
    """One persistent process pool per worker count (spawned: safe next to torch's threads)."""
    if workers not in _POOLS:
        import multiprocessing as mp

        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        if len(_POOLS) == 1:
            atexit.register(shutdown_crf_pools)
    return _POOLS[workers]


def shutdown_crf_pools() -> None:
    """Stop the CRF worker processes (also registered with atexit)."""
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


def dense_crf(
    prob: torch.Tensor,
    rgb: torch.Tensor,
    params: CRFParams = CRFParams(),
    workers: int = 0,
) -> torch.Tensor:
    """Batched reference dense CRF: prob (B, 1, H, W) in [0, 1], rgb (B, 3, H, W) in [0, 1].

    Returns the CRF's foreground marginal (B, 1, H, W) float32 in [0, 1] on ``prob``'s device.
    ``workers > 0`` runs the images on a persistent spawned process pool (no subprocess per
    image, no PNG round trip); ``0`` runs them in this process.
    """
    if prob.dim() != 4 or prob.shape[1] != 1:
        raise ValueError(f"dense_crf: prob must be (B, 1, H, W), got {tuple(prob.shape)}")
    if rgb.dim() != 4 or rgb.shape[1] != 3 or rgb.shape[-2:] != prob.shape[-2:]:
        raise ValueError(f"dense_crf: rgb must be (B, 3, H, W) like prob, got {tuple(rgb.shape)}")
    probs = prob.detach().float().cpu().numpy()[:, 0]
    imgs = (rgb.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255.0).round()
    imgs = imgs.astype(np.uint8)
    jobs = [(probs[i], imgs[i], params) for i in range(len(probs))]
    if workers > 0 and len(jobs) > 1:
        chunk = max(1, math.ceil(len(jobs) / (4 * workers)))
        outs = list(_pool(workers).map(_crf_job, jobs, chunksize=chunk))
    else:
        outs = [_crf_job(j) for j in jobs]
    return torch.from_numpy(np.stack(outs)[:, None]).to(prob.device)
