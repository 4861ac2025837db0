"""Learnable Gaussian smoothing (holistic attention and SSM, paper Eq. 1).

Two parametrisations (``ModelConfig.gauss_mode``):

- ``"free"`` (default, the reference code): a free ``size x size`` kernel initialised from the
  reference ``gkern(31, 4)``; every tap is a parameter.
- ``"sigma"`` (closer to the paper's wording): a Gaussian whose std (pixels) is one learnable
  scalar, initialised to the std of ``gkern(size, nsig)``. The paper also calls the kernel
  *size* learnable, but an integer size has no gradient; here it is fixed (odd, so the
  convolution stays centred; the paper's 32 would shift the map by half a pixel).

The reference uses ``"free"``; nothing measured here showed ``"sigma"`` better, so the
default follows the code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from jsm_dist import jsm


class LearnableGaussian(nn.Module):
    """Produces the (size, size) smoothing kernel; call :meth:`kernel`."""

    def __init__(self, size: int = 31, nsig: float = 4.0, mode: str = "free") -> None:
        super().__init__()
        if mode not in ("free", "sigma"):
            raise ValueError(f"gauss mode must be 'free' or 'sigma', got {mode!r}")
        self.size, self.mode = size, mode
        init = torch.from_numpy(jsm.gaussian_kernel(size, nsig))
        if mode == "free":
            self.weight = nn.Parameter(init)
        else:
            r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
            marg = init.sum(1)
            std = float(torch.sqrt((marg * r**2).sum()))
            self.log_sigma = nn.Parameter(torch.tensor(math.log(std)))

    def kernel(self) -> torch.Tensor:
        if self.mode == "free":
            return self.weight
        return jsm.gaussian_kernel_torch(self.size, self.log_sigma.exp())

    def smooth(self, prob: torch.Tensor) -> torch.Tensor:
        return jsm.gaussian_smooth(prob, self.kernel())


class HolisticAttention(nn.Module):
    """CPD holistic attention: ``x * max(minmax(F_gauss(att, k)), att)`` (soft, no threshold)."""

    def __init__(self, size: int = 31, nsig: float = 4.0, mode: str = "free") -> None:
        super().__init__()
        self.gauss = LearnableGaussian(size, nsig, mode)

    def forward(self, att_prob: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * jsm.ssm_attention(att_prob, self.gauss.kernel(), threshold=None)


class SSM(nn.Module):
    """Saliency-guided depth mask (Eq. 1) with its own learnable Gaussian kernel."""

    def __init__(
        self,
        size: int = 31,
        nsig: float = 4.0,
        mode: str = "free",
        threshold: float | None = 0.05,
        straight_through: bool = True,
    ) -> None:
        super().__init__()
        self.gauss = LearnableGaussian(size, nsig, mode)
        self.threshold, self.straight_through = threshold, straight_through
        if threshold is not None and not straight_through:
            # the hard threshold passes no gradient: freeze the kernel (as it effectively is in
            # the reference) so DDP does not wait for a gradient that never comes
            self.gauss.requires_grad_(False)

    def forward(self, s_prob: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        return jsm.ssm_depth_mask(
            s_prob, depth, self.gauss.kernel(), self.threshold, self.straight_through
        )
