"""Region-level label repair: put the label on the object the caption names.

The paper's update (``jsm.jsm_update``) blends two whole-image candidates, the current label
``L_g`` and the depth-refined ``L_d``. When both cover the same object it can only change
the extent; when the current label sits on the wrong object (a distractor nearer than the
salient one, a bright window) neither candidate fixes it. Region repair adds a choice of
*which object* before that blend:

1. **Candidate regions** (:func:`extract_regions`, per image, OpenCV connected components
   at 8-connectivity): the components of the current label ``L_g > 0.5``, of the saliency
   network's prediction ``S > 0.5``, of the depth-refined candidate ``L_d > 0.5`` and of
   two near-depth layers (``depth >`` its 80th / 90th percentile, 1 = near), each kept
   when its area lies in ``[min_area, max_area]`` of the image; a region that overlaps an
   earlier one at IoU >= ``dedupe_iou`` is dropped; at most ``max_regions`` per image, in
   that source order.
2. **Scores** (K regions x B images): with text, ``log p(word | feat * R) - log p(negative |
   feat * R)`` of the text network on the region's mask, the same odds score as the blend's
   ``word_vs_negative`` (:func:`jsm.candidate_score`); without text (the fair unsupervised
   counterpart, :func:`confidence_scores`), the log-odds of the saliency network's mean
   probability inside the region (nats too, so ``keep_margin`` means the same for both).
3. **Selection** (:func:`select_regions`): the best-scoring region is kept; so is every
   component of the current label that scores within ``keep_margin`` of it (more than one
   salient object). Everything else is dropped.
4. **Repair** (:func:`repair_candidates`): ``D`` = the dropped regions, less the kept ones
   grown by ``grow`` pixels. ``L_g' = max(L_g, A) * (1 - D)`` where ``A`` is the kept
   regions' own soft source map (``S``, ``L_d`` or the binary depth layer): a kept region
   the current label missed is *added*, a dropped one is cleared; ``L_d' = L_d * (1 - D)``.
   Pixels in no region keep their values, so the blend can still grow the object's extent.
   The paper's blend, its post-processing and the CRF then run on ``(L_g', L_d')``
   unchanged.

An image whose best region scores no better than ``min_score`` (no region the text network
names; or no region at all) keeps the plain blend: nothing is dropped on weak evidence.
Everything after region extraction is a batched tensor equation over (K, B) with no
per-sample loop; ``tests/unit/test_regions.py`` checks each against a direct per-sample
transcription.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# region sources, in extraction (and priority) order
SOURCE_LABEL, SOURCE_SALIENCY, SOURCE_CANDIDATE, SOURCE_DEPTH = 0, 1, 2, 3
SOURCE_NAMES = ("label", "saliency", "candidate", "depth")
DEPTH_LAYER_QUANTILES = (0.8, 0.9)


@dataclass(frozen=True)
class RegionParams:
    """Region extraction and selection settings (``ModelConfig.region_*``)."""

    max_regions: int = 8
    min_area: float = 0.004  # fraction of the image
    max_area: float = 0.5
    dedupe_iou: float = 0.8
    keep_margin: float = 1.0  # score units (nats for the text score)
    min_score: float = float("-inf")  # repair only when the best region scores above this
    grow: int = 2  # pixels the keep mask is grown by


@dataclass
class Regions:
    """K candidate regions per image of a batch of B.

    ``masks`` (K, B, 1, H, W) float {0, 1} (all zero where ``valid`` is False), ``soft``
    (K, B, 1, H, W) the region's own source map inside it, ``valid`` (K, B) bool,
    ``source`` (K, B) long (``SOURCE_*``; -1 where invalid).
    """

    masks: torch.Tensor
    soft: torch.Tensor
    valid: torch.Tensor
    source: torch.Tensor

    @property
    def count(self) -> torch.Tensor:
        """Valid regions per image, (B,)."""
        return self.valid.sum(0)


def _components(mask: np.ndarray, lo: int, hi: int) -> list[np.ndarray]:
    """Boolean masks of the 8-connected components of ``mask`` with area in [lo, hi]."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    out = []
    for i in range(1, n):
        if lo <= stats[i, cv2.CC_STAT_AREA] <= hi:
            out.append(lab == i)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def extract_regions(
    label: torch.Tensor,
    s_prob: torch.Tensor,
    cand: torch.Tensor,
    depth: torch.Tensor,
    params: RegionParams,
) -> Regions:
    """Candidate regions of each image (per-image OpenCV components; see the module doc).

    All inputs (B, 1, H, W) in [0, 1] at one size; ``depth`` 1 = near.
    """
    b, _, h, w = label.shape
    lo, hi = params.min_area * h * w, params.max_area * h * w
    k = params.max_regions
    sources = [
        (SOURCE_LABEL, label),
        (SOURCE_SALIENCY, s_prob),
        (SOURCE_CANDIDATE, cand),
    ]
    np_maps = {src: m[:, 0].detach().float().cpu().numpy() for src, m in sources}
    np_depth = depth[:, 0].detach().float().cpu().numpy()
    masks = np.zeros((k, b, h, w), np.float32)
    soft = np.zeros((k, b, h, w), np.float32)
    valid = np.zeros((k, b), bool)
    source = np.full((k, b), -1, np.int64)
    for i in range(b):
        found: list[tuple[int, np.ndarray, np.ndarray]] = []
        for src, _ in sources:
            m = np_maps[src][i]
            found += [(src, c, m) for c in _components(m > 0.5, lo, hi)]
        d = np_depth[i]
        for q in DEPTH_LAYER_QUANTILES:
            layer = d > np.quantile(d, q)
            found += [(SOURCE_DEPTH, c, c.astype(np.float32)) for c in _components(layer, lo, hi)]
        kept: list[np.ndarray] = []
        for src, comp, m in found:
            if len(kept) == k:
                break
            if any(_iou(comp, o) >= params.dedupe_iou for o in kept):
                continue
            j = len(kept)
            kept.append(comp)
            masks[j, i] = comp
            soft[j, i] = np.where(comp, m, 0.0)
            valid[j, i] = True
            source[j, i] = src
    dev = label.device
    return Regions(
        torch.from_numpy(masks)[:, :, None].to(dev),
        torch.from_numpy(soft)[:, :, None].to(dev),
        torch.from_numpy(valid).to(dev),
        torch.from_numpy(source).to(dev),
    )


def confidence_scores(regions: Regions, s_prob: torch.Tensor) -> torch.Tensor:
    """Text-free region score: ``logit(mean of S inside the region)``, (K, B); ``-inf``
    where invalid. (The mean is clamped to [1e-4, 1 - 1e-4].)"""
    area = regions.masks.sum((-3, -2, -1))
    inside = (regions.masks * s_prob.unsqueeze(0)).sum((-3, -2, -1))
    mean = (inside / area.clamp(min=1.0)).clamp(1e-4, 1.0 - 1e-4)
    score = torch.log(mean) - torch.log1p(-mean)
    return score.masked_fill(~regions.valid, float("-inf"))


def select_regions(
    scores: torch.Tensor, regions: Regions, keep_margin: float, min_score: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which regions to keep: ``(keep (K, B) bool, repaired (B,) bool)``.

    ``scores`` (K, B), ``-inf`` where invalid. Kept: the best region, and every valid
    current-label component scoring at least ``best - keep_margin``. ``repaired`` is False
    for an image with no valid region or a best score ``<= min_score``: it keeps the plain
    blend (``keep`` all False there).
    """
    scores = scores.masked_fill(~regions.valid, float("-inf"))
    best, arg = scores.max(0)  # (B,)
    repaired = regions.valid.any(0) & (best > min_score)
    is_best = torch.zeros_like(regions.valid)
    is_best.scatter_(0, arg[None], True)
    close = (regions.source == SOURCE_LABEL) & (scores >= best[None] - keep_margin)
    keep = (is_best | close) & regions.valid & repaired[None]
    return keep, repaired


def repair_candidates(
    l_g: torch.Tensor,
    l_d: torch.Tensor,
    regions: Regions,
    keep: torch.Tensor,
    repaired: torch.Tensor,
    grow: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_g', L_d', D)`` of the module docstring, (B, 1, H, W) each.

    ``K`` = union of the kept regions, ``D`` = union of the dropped (valid, not kept)
    regions minus ``K`` grown by ``grow`` px (max-pool), so an object's own pixels are never
    dropped because a larger region (a depth layer with the floor) contained them.
    ``L_g' = max(L_g, A) * (1 - D)`` with ``A`` = the kept regions' soft source maps (a
    kept region the label missed is added); ``L_d' = L_d * (1 - D)``. Images with
    ``repaired`` False get ``D = 0`` and their inputs back unchanged.
    """
    k = keep[:, :, None, None, None].to(l_g.dtype)
    dropped = (regions.valid & ~keep)[:, :, None, None, None].to(l_g.dtype)
    kept = (regions.masks * k).amax(0)  # (B, 1, H, W)
    added = (regions.soft * k).amax(0)
    if grow > 0:
        kept = F.max_pool2d(kept, 2 * grow + 1, stride=1, padding=grow)
    drop = (regions.masks * dropped).amax(0) * (1.0 - kept)
    r = repaired[:, None, None, None]
    drop = torch.where(r, drop, torch.zeros_like(drop))
    g = torch.where(r, torch.maximum(l_g, added), l_g) * (1.0 - drop)
    return g, l_d * (1.0 - drop), drop
