"""SOD metrics of in-memory maps, for :mod:`jsm_dist.eval.evaluate`.

Holds the metric table (``METRICS``, ``METRIC_KEYS``, the curve keys), the validation of one
(pred, gt) pair, ``image_stats`` (every metric of one pair through PySODMetrics), the
``SODMetrics`` accumulator (``step``/``add``/``merge``/``get_results``), the process pool the
per-image work runs in, and the array entry points ``evaluate_pairs`` / ``evaluate_arrays``
with the bilinear ``resize_to`` they share with the folder evaluator.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from jsm_dist.data.masks import mask_from_array

# (key, what it is) in the order of the printed table; MAE is the only lower-is-better metric.
METRICS: tuple[tuple[str, str], ...] = (
    ("Sm", "S-measure (alpha=0.5)"),
    ("maxF", "max F-measure (beta^2=0.3)"),
    ("meanF", "mean F-measure over thresholds"),
    ("adpF", "adaptive F-measure (threshold 2*mean)"),
    ("maxE", "max E-measure"),
    ("meanE", "mean E-measure over thresholds"),
    ("adpE", "adaptive E-measure"),
    ("wF", "weighted F-measure (beta=1)"),
    ("MAE", "mean absolute error"),
)
METRIC_KEYS = tuple(k for k, _ in METRICS)
CURVE_KEYS = ("precision", "recall", "fmeasure", "emeasure")
_SCALARS = ("Sm", "MAE", "wF", "adpF", "adpE")
NUM_THRESHOLDS = 256


# ---------------------------------------------------------------- per-image work
def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) map, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if np.isnan(arr).any() or lo < 0.0 or hi > 1.0:
            raise ValueError(f"float {what} must lie in [0, 1] without NaN, got range [{lo}, {hi}]")
        return np.rint(arr * 255.0).astype(np.uint8)
    raise TypeError(f"{what} must be uint8, bool or float in [0, 1], got dtype {arr.dtype}")


def validate_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as uint8 (H, W); floats in [0, 1] are scaled to 0..255, bools to {0, 255};
    the GT as :func:`jsm_dist.data.masks.mask_from_array` reads masks (0/1 -> 0/255, 16-bit)."""
    pred_u8, gt_u8 = _to_uint8(pred, "pred"), mask_from_array(gt, "gt")
    if pred_u8.shape != gt_u8.shape:
        raise ValueError(
            f"pred shape {pred_u8.shape} != gt shape {gt_u8.shape}: resize the prediction "
            "to the GT size first (the folder evaluator does this and counts it)"
        )
    return pred_u8, gt_u8


def image_stats(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Every metric of one (pred, gt) pair, through PySODMetrics' public step/get_results.

    The pair is normalised once (``prepare_data``: min-max pred, ``gt > 128``) and each
    metric is stepped with ``normalize=False``; a fresh metric object per image makes its
    ``get_results()`` the per-image value, which keeps images independent (process pool).
    Returns the scalars of ``_SCALARS`` and the four curves of ``CURVE_KEYS`` (float64, 256,
    index t <-> ``pred >= t``).
    """
    import py_sod_metrics as psm
    from py_sod_metrics.utils import prepare_data

    pred_u8, gt_u8 = validate_pair(pred, gt)
    p, g = prepare_data(pred_u8, gt_u8)
    sm, mae, wfm, em = psm.Smeasure(alpha=0.5), psm.MAE(), psm.WeightedFmeasure(), psm.Emeasure()
    fmv2 = psm.FmeasureV2(
        metric_handlers={
            "fm": psm.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3),
            "pre": psm.PrecisionHandler(with_dynamic=True, with_adaptive=False),
            "rec": psm.RecallHandler(with_dynamic=True, with_adaptive=False),
        }
    )
    for metric in (sm, mae, wfm, em, fmv2):
        metric.step(p, g, normalize=False)
    f_res, e_res = fmv2.get_results(), em.get_results()["em"]
    return {
        "Sm": float(sm.get_results()["sm"]),
        "MAE": float(mae.get_results()["mae"]),
        "wF": float(wfm.get_results()["wfm"]),
        "adpF": float(f_res["fm"]["adaptive"]),
        "adpE": float(e_res["adp"]),
        # PySODMetrics orders curves from threshold 255 down to 0: flip to index = threshold.
        "precision": np.flip(f_res["pre"]["dynamic"]).astype(np.float64),
        "recall": np.flip(f_res["rec"]["dynamic"]).astype(np.float64),
        "fmeasure": np.flip(f_res["fm"]["dynamic"]).astype(np.float64),
        "emeasure": np.flip(np.asarray(e_res["curve"])).astype(np.float64),
    }


def smeasure_per_image(preds: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """S-measure of each (pred, gt) pair of two (n, h, w) stacks, float64 (n,): the ``Sm``
    of :func:`image_stats` (same normalisation) without the other metrics."""
    import py_sod_metrics as psm
    from py_sod_metrics.utils import prepare_data

    if len(preds) != len(gts):
        raise ValueError(f"smeasure_per_image: {len(preds)} preds vs {len(gts)} gts")
    out = np.empty(len(preds))
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        sm = psm.Smeasure(alpha=0.5)
        sm.step(*prepare_data(*validate_pair(pred, gt)), normalize=False)
        out[i] = sm.get_results()["sm"]
    return out


# ---------------------------------------------------------------- the accumulator
@dataclass
class SODMetrics:
    """All SOD metrics over many images: ``step(pred, gt)`` then ``get_results()``.

    Metrics (citations in PySODMetrics' classes): S-measure (Fan et al., ICCV 2017),
    F-measure (Achanta et al., CVPR 2009), E-measure (Fan et al., IJCAI 2018), weighted
    F-measure (Margolin et al., CVPR 2014), MAE (Perazzi et al., CVPR 2012).
    Accumulators merge (``merge``), so per-process partial results can be combined.
    """

    count: int = 0
    sums: dict = field(default_factory=lambda: {k: 0.0 for k in _SCALARS})
    sm_per_image: list = field(default_factory=list)  # in the order the images were added
    curve_sums: dict = field(
        default_factory=lambda: {k: np.zeros(NUM_THRESHOLDS) for k in CURVE_KEYS}
    )

    def step(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one pair: uint8 (H, W) maps, or float maps in [0, 1] / bool GT."""
        self.add(image_stats(pred, gt))

    def add(self, stats: dict) -> None:
        """Add the output of ``image_stats`` (computed here or in another process)."""
        self.count += 1
        self.sm_per_image.append(stats["Sm"])
        for k in _SCALARS:
            self.sums[k] += stats[k]
        for k in CURVE_KEYS:
            self.curve_sums[k] += stats[k]

    def merge(self, other: SODMetrics) -> None:
        self.count += other.count
        self.sm_per_image.extend(other.sm_per_image)
        for k in _SCALARS:
            self.sums[k] += other.sums[k]
        for k in CURVE_KEYS:
            self.curve_sums[k] += other.curve_sums[k]

    def get_results(self) -> dict:
        """Dataset means: the keys of ``METRIC_KEYS``, ``num_images`` and ``curves``
        (``threshold`` 0..255 and the mean curves of ``CURVE_KEYS``)."""
        if self.count == 0:
            raise ValueError("no images were evaluated: step() was never called")
        n = self.count
        curves = {k: v / n for k, v in self.curve_sums.items()}
        res = {k: self.sums[k] / n for k in _SCALARS}
        res.update(
            maxF=float(curves["fmeasure"].max()),
            meanF=float(curves["fmeasure"].mean()),
            maxE=float(curves["emeasure"].max()),
            meanE=float(curves["emeasure"].mean()),
        )
        out = {k: float(res[k]) for k in METRIC_KEYS}
        out["num_images"] = n
        out["curves"] = {"threshold": np.arange(NUM_THRESHOLDS), **curves}
        return out


def metric_pool(workers: int) -> ProcessPoolExecutor:
    # fork is fastest, but forking a process that runs torch's threads (the training job
    # calls evaluate_arrays) can deadlock: there, fork from a single-threaded forkserver
    # that imports the metric code once for all pools of this process.
    if "torch" in sys.modules:
        ctx = get_context("forkserver")
        ctx.set_forkserver_preload(["jsm_dist.eval.evaluate", "py_sod_metrics"])
    else:
        ctx = get_context("fork")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def stats_of_pair(pair: tuple[np.ndarray, np.ndarray]) -> dict:
    return image_stats(*pair)


def evaluate_pairs(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], *, workers: int = 1, per_image_sm: bool = False
):
    """Metrics of (pred, gt) pairs, uint8 (H, W) (or float in [0, 1]), same size per pair.

    ``workers > 1`` spreads images over a process pool (results are identical).
    Returns ``SODMetrics.get_results()``; with ``per_image_sm``, also each pair's S-measure
    (float64 array, in pair order): ``(results, sm)``.
    """
    acc = SODMetrics()
    if workers <= 1:
        for pred, gt in pairs:
            acc.step(pred, gt)
    else:
        pairs = list(pairs)
        chunk = max(1, len(pairs) // (workers * 8))
        with metric_pool(workers) as pool:
            for stats in pool.map(stats_of_pair, pairs, chunksize=chunk):
                acc.add(stats)
    if per_image_sm:
        return acc.get_results(), np.asarray(acc.sm_per_image, dtype=np.float64)
    return acc.get_results()


def evaluate_arrays(
    preds: np.ndarray, gts: np.ndarray, *, workers: int = 1, per_image_sm: bool = False
):
    """Metrics of stacked maps, e.g. a label-store generation vs GT: (n, h, w) each.

    ``preds`` may be uint8 or float in [0, 1]; when its (h, w) differs from the GT's, each
    map is resized to the GT size (bilinear), as the standard toolboxes do.
    ``per_image_sm``: see :func:`evaluate_pairs`.
    """
    preds, gts = np.asarray(preds), np.asarray(gts)
    if preds.ndim != 3 or gts.ndim != 3 or len(preds) != len(gts):
        raise ValueError(f"need (n, h, w) arrays of equal n, got {preds.shape} and {gts.shape}")
    if preds.shape[1:] != gts.shape[1:]:
        preds = np.stack([resize_to(_to_uint8(p, "pred"), gts.shape[1:]) for p in preds])
    return evaluate_pairs(zip(preds, gts), workers=workers, per_image_sm=per_image_sm)


def resize_to(pred: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a uint8 map to (H, W) ``shape`` (PySODMetrics' eval scripts)."""
    import cv2

    if tuple(pred.shape) == tuple(shape):
        return pred
    return cv2.resize(pred, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
