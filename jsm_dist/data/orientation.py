"""Per-sample depth orientation: is near stored as large values or as small ones?

Benchmarks disagree: disparity-like maps store near surfaces bright (``near_is_large``),
distance-like maps (raw Kinect depth, maps "normalised to physical common sense") store
them dark (``far_is_large``), and one folder may mix both. A wrong orientation silently
inverts the depth target, so the packer decides it per sample (``jsm-pack
--depth-convention auto``, the default) from the RGB and the depth alone, never from the
ground truth. docs/depth_orientation.md has the measurements behind the rule.

The rule adds two cues, each signed so that > 0 means near is large, and flips sign
exactly when the depth is flipped (so the decision does too):

- ``ground``: Pearson correlation between the row index (top -> bottom) and the depth
  over valid pixels, the median over 4 vertical strips. The ground plane (floor, table,
  street) makes the bottom of most photos nearer than the top, where walls and sky are.
  In [-1, 1].
- ``object``: depth inside a rough RGB-only object mask minus depth in a ring around it,
  in units of the depth's standard deviation, clipped to [-1, 1]. The mask is the 20% of
  pixels whose colour differs most from the image border, weighted by a centre prior:
  whatever stands out is usually nearer than what surrounds it. It decides where the
  ground cue is weak (close-ups, top-down views).

``score = ground + object``; ``|score| < margin`` (default 0.25) marks the decision
uncertain (it is still made). Holes (0) are excluded everywhere. A map with too few
valid pixels or a single value has no orientation: score 0, ``near_is_large``, uncertain.

:func:`gt_implied` is the reference the rule is measured against (and the packer's
check where ground truth exists): mean depth inside the GT mask vs a ring around it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np

from jsm_dist import schema

WORK_SIDE = 64  # cues run at this longer side (pixels): orientation is a global property
MARGIN = 0.25  # |score| below this marks the decision uncertain
MIN_VALID = 0.05  # fewer valid (non-hole) pixels than this fraction: no decision
OBJECT_QUANTILE = 0.8  # the object mask is the top 20% of the RGB distinctness map
RING = 0.08  # ring width around the object mask, fraction of the work image's longer side
BORDER = 0.08  # border band whose colours model the background, fraction of the shorter side
CENTRE_SIGMA = 0.35  # centre prior width, fraction of each side
BG_COLOURS = 100  # about this many border pixels model the background colours
STRIPS = 4  # the ground cue is the median over this many vertical strips
GT_SIDE = 256  # gt_implied runs at this longer side (pixels)
GT_RING = 0.05  # gt_implied ring width, fraction of the longer side


@dataclass(frozen=True)
class Orientation:
    """One sample's decision; ``score`` > 0 means near is large, ``|score|`` its confidence."""

    convention: str  # schema.NEAR_IS_LARGE | schema.FAR_IS_LARGE
    score: float
    ground: float
    object: float
    uncertain: bool

    def to_meta(self) -> dict:
        """The sample json's ``depth_orientation`` record (rounded: stable across machines)."""
        return {
            "score": round(self.score, 4),
            "ground": round(self.ground, 4),
            "object": round(self.object, 4),
            "uncertain": self.uncertain,
        }


# ---- helpers ------------------------------------------------------------------------------
def _work_shape(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    h, w = shape[:2]
    s = side / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))  # OpenCV (width, height)


def _shrink(a: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Every k-th pixel (k so that about 4 x ``side`` remain), contiguous, and the target
    (width, height): area resampling a full-size photo costs more than the whole decision,
    and orientation is read from structures much larger than k pixels."""
    step = max(1, max(a.shape[:2]) // (4 * side))
    return np.ascontiguousarray(a[::step, ::step]), _work_shape(a.shape, side)


def valid_depth(depth: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """Raw depth (0 = hole) -> float32 at ``side`` (longer side), min-max normalised in the
    stored orientation, NaN where the area is mostly holes. (Both cues and
    :func:`gt_implied` are invariant to shifting and scaling the depth: the normalisation
    only makes the numbers readable.)"""
    d, size = _shrink(np.asarray(depth), side)
    valid = d > 0
    # normalised area resampling (holes are 0: they add nothing to the sum and are divided
    # out), so holes neither count nor drag their neighbours towards 0
    num = cv2.resize(d.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    den = cv2.resize(valid.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    x = np.where(den >= 0.5, num / np.maximum(den, 1e-6), np.nan).astype(np.float32)
    if not valid.any():
        return x
    lo, hi = float(d[valid].min()), float(d[valid].max())
    if hi <= lo:  # a single value: no structure (and no resampling noise blown up)
        return np.where(np.isnan(x), np.nan, 0.0).astype(np.float32)
    return (x - lo) / (hi - lo)


def _ring(mask: np.ndarray, radius: int) -> np.ndarray:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return (cv2.dilate(mask.astype(np.uint8), k) > 0) & ~mask


def _contrast(d: np.ndarray, inside: np.ndarray, around: np.ndarray) -> float:
    """mean(d[inside]) - mean(d[around]) over valid pixels; NaN if either side is empty."""
    valid = ~np.isnan(d)
    a, b = inside & valid, around & valid
    if not a.any() or not b.any():
        return float("nan")
    return float(d[a].mean() - d[b].mean())


# ---- cues -----------------------------------------------------------------------------
def _row_correlation(d: np.ndarray) -> float:
    valid = ~np.isnan(d)
    rows = np.broadcast_to(np.arange(d.shape[0], dtype=np.float64)[:, None], d.shape)[valid]
    vals = d[valid].astype(np.float64)
    if vals.size < 3 or rows.std() == 0 or vals.std() == 0:
        return 0.0
    return float(np.corrcoef(rows, vals)[0, 1])


def ground_cue(d: np.ndarray) -> float:
    """Correlation of depth with the row index (> 0: bottom larger), the median over
    ``STRIPS`` vertical strips: a ground plane spans the width, a blob in one corner does
    not carry the cue. 0 when undefined."""
    w = d.shape[1]
    bounds = np.linspace(0, w, min(STRIPS, w) + 1).round().astype(int)
    return float(np.median([_row_correlation(d[:, a:b]) for a, b in itertools.pairwise(bounds)]))


def object_mask(rgb: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """RGB-only rough object mask at ``side``: colour distinct from the border, central."""
    small, size = _shrink(np.asarray(rgb), side)
    lab = cv2.cvtColor(cv2.resize(small, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2LAB)
    lab = lab.astype(np.float32)
    h, w = lab.shape[:2]
    b = max(1, round(BORDER * min(h, w)))
    border = np.zeros((h, w), bool)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    bg = lab[border][:: max(1, int(border.sum()) // BG_COLOURS)]
    px = lab.reshape(-1, 3)
    dist = np.zeros((len(px), len(bg)), np.float32)
    for c in range(3):  # summed per channel: no BLAS thread pool inside pack workers
        diff = px[:, c, None] - bg[None, :, c]
        dist += diff * diff
    k = max(1, len(bg) // 10)  # distance to the closest tenth of the background colours
    distinct = np.sqrt(np.partition(dist, k - 1, axis=1)[:, :k]).mean(1).reshape(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    prior = np.exp(
        -(((yy - (h - 1) / 2) / (CENTRE_SIGMA * h)) ** 2)
        - ((xx - (w - 1) / 2) / (CENTRE_SIGMA * w)) ** 2
    )
    sal = distinct * prior
    threshold = np.quantile(sal, OBJECT_QUANTILE)
    # a flat background (many pixels at the minimum) must not join the mask
    return sal >= threshold if threshold > sal.min() else sal > threshold


def object_cue(d: np.ndarray, mask: np.ndarray) -> float:
    """(depth in mask - depth in its ring) / depth std, clipped to [-1, 1]; 0 if undefined."""
    radius = max(2, round(RING * max(d.shape)))
    diff = _contrast(d, mask, _ring(mask, radius))
    sd = float(np.nanstd(d)) if (~np.isnan(d)).any() else 0.0
    if not np.isfinite(diff) or sd <= 0:
        return 0.0
    return float(np.clip(diff / sd, -1.0, 1.0))


# ---- the decision ---------------------------------------------------------------------
def detect(rgb: np.ndarray, depth: np.ndarray, margin: float = MARGIN) -> Orientation:
    """Decide one sample's orientation from uint8 RGB (H,W,3) and raw depth (H,W), 0 = hole."""
    d = valid_depth(depth)
    valid = ~np.isnan(d)
    if valid.mean() < MIN_VALID or np.nanmax(d) - np.nanmin(d) <= 0:
        return Orientation(schema.NEAR_IS_LARGE, 0.0, 0.0, 0.0, True)
    ground = ground_cue(d)
    obj = object_cue(d, object_mask(rgb))
    score = ground + obj
    convention = schema.NEAR_IS_LARGE if score >= 0 else schema.FAR_IS_LARGE
    return Orientation(convention, score, ground, obj, abs(score) < margin)


def gt_implied(depth: np.ndarray, gt: np.ndarray) -> str | None:
    """The orientation the ground truth implies: the object (GT > 128) is nearer than a ring
    around it. None when undefined (empty or full mask, no valid depth on either side)."""
    d = valid_depth(depth, GT_SIDE)
    small, size = _shrink(np.asarray(gt), GT_SIDE)
    mask = cv2.resize((small > 128).astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
    if not mask.any() or mask.all():
        return None
    diff = _contrast(d, mask, _ring(mask, max(3, round(GT_RING * max(d.shape)))))
    if not np.isfinite(diff) or diff == 0:
        return None
    return schema.NEAR_IS_LARGE if diff > 0 else schema.FAR_IS_LARGE


def flip_depth(depth: np.ndarray) -> np.ndarray:
    """The same map in the other orientation: valid values mirrored within their range
    (lo <-> hi), holes kept at 0, dtype kept. Used to test that decisions flip."""
    d = np.asarray(depth)
    valid = d > 0
    if not valid.any():
        return d.copy()
    wide = d.astype(np.int64 if np.issubdtype(d.dtype, np.integer) else np.float64)
    lo, hi = wide[valid].min(), wide[valid].max()
    return np.where(valid, (hi + lo) - wide, 0).astype(d.dtype)


# ---- the packer's side: one sample's record, a corpus' tally ----------------------------
def decide(mode: str, rgb: np.ndarray, depth: np.ndarray) -> tuple[str, Orientation | None]:
    """``mode`` "auto" -> (detected convention, its Orientation); an explicit convention
    -> (that convention, None): the flag overrides detection for every sample."""
    if mode == schema.DEPTH_AUTO:
        found = detect(rgb, depth)
        return found.convention, found
    if mode not in schema.DEPTH_CONVENTIONS:
        raise ValueError(
            f"depth convention must be one of {schema.DEPTH_CONVENTION_CHOICES}, got {mode!r}"
        )
    return mode, None


@dataclass
class OrientationTally:
    """What a pack run decided, summed over samples (and merged over pool tasks).

    ``uncertain`` and ``gt_disagree`` hold sample names (file stems), in pack order, so a
    user can look at exactly those files.
    """

    mode: str  # "auto" or the explicit convention
    near_is_large: int = 0
    far_is_large: int = 0
    uncertain: list[str] = field(default_factory=list)
    gt_checked: int = 0  # samples whose ground truth implies an orientation
    gt_agree: int = 0
    gt_disagree: list[str] = field(default_factory=list)

    def add(self, name: str, convention: str, found: Orientation | None, gt_said: str | None):
        if convention == schema.NEAR_IS_LARGE:
            self.near_is_large += 1
        else:
            self.far_is_large += 1
        if found is not None and found.uncertain:
            self.uncertain.append(name)
        if gt_said is not None:
            self.gt_checked += 1
            if gt_said == convention:
                self.gt_agree += 1
            else:
                self.gt_disagree.append(name)

    def merge(self, other: OrientationTally) -> None:
        self.near_is_large += other.near_is_large
        self.far_is_large += other.far_is_large
        self.uncertain += other.uncertain
        self.gt_checked += other.gt_checked
        self.gt_agree += other.gt_agree
        self.gt_disagree += other.gt_disagree

    @property
    def majority(self) -> str:
        """The corpus-level convention: the more frequent decision (near_is_large on a tie)."""
        if self.far_is_large > self.near_is_large:
            return schema.FAR_IS_LARGE
        return schema.NEAR_IS_LARGE

    def to_dict(self) -> dict:
        """corpus.json ``depth_orientation``."""
        return {
            "mode": self.mode,
            "margin": MARGIN,
            "near_is_large": self.near_is_large,
            "far_is_large": self.far_is_large,
            "uncertain": len(self.uncertain),
            "uncertain_samples": list(self.uncertain),
            "gt_checked": self.gt_checked,
            "gt_agree": self.gt_agree,
            "gt_disagree_samples": list(self.gt_disagree),
        }

    @classmethod
    def from_dict(cls, data: dict) -> OrientationTally:
        return cls(
            mode=data["mode"],
            near_is_large=data["near_is_large"],
            far_is_large=data["far_is_large"],
            uncertain=list(data["uncertain_samples"]),
            gt_checked=data["gt_checked"],
            gt_agree=data["gt_agree"],
            gt_disagree=list(data["gt_disagree_samples"]),
        )

    def summary(self) -> str:
        """One line for the pack summary."""
        line = (
            f"depth orientation ({self.mode}): {self.near_is_large} near_is_large, "
            f"{self.far_is_large} far_is_large"
        )
        if self.mode == schema.DEPTH_AUTO:
            line += f", {len(self.uncertain)} uncertain"
        if self.gt_checked:
            line += (
                f"; agrees with the GT on {self.gt_agree}/{self.gt_checked} "
                f"({100.0 * self.gt_agree / self.gt_checked:.1f}%)"
            )
        return line

    def warnings(self, shown: int = 5) -> list[str]:
        """Mixed, uncertain or GT-contradicted decisions, each with a few sample names."""

        def some(names: list[str]) -> str:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            return ", ".join(names[:shown]) + more

        def samples(n: int) -> str:
            return f"{n} sample" + ("s" if n != 1 else "")

        out = []
        if self.near_is_large and self.far_is_large:
            out.append(
                f"the corpus mixes depth orientations: {samples(self.near_is_large)} "
                f"near_is_large, {self.far_is_large} far_is_large (per sample: json "
                "depth_convention). If the folder is one benchmark, check the minority or "
                "pass --depth-convention near_is_large|far_is_large"
            )
        if self.uncertain:
            out.append(
                f"{samples(len(self.uncertain))} with an uncertain depth orientation "
                f"(|score| < {MARGIN}): {some(self.uncertain)}; see corpus.json "
                "depth_orientation.uncertain_samples"
            )
        if self.gt_disagree:
            out.append(
                f"{len(self.gt_disagree)} of {samples(self.gt_checked)} with a depth orientation "
                "their ground truth contradicts (object not nearer than its surroundings): "
                f"{some(self.gt_disagree)}; see corpus.json depth_orientation.gt_disagree_samples"
            )
        return out
