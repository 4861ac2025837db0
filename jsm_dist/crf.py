"""Dense CRF post-processing of a refined label (the reference's last step).

A C++ CRF (pydensecrf2) per image, optionally over a process pool that lives here (module
state, shut down at exit), so :mod:`jsm_dist.jsm` stays pure tensor functions.
"""

from __future__ import annotations

import atexit
import math
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from jsm_dist.jsm import EPS


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
