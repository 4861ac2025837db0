"""Standard RGB-D SOD evaluation: S-measure, F-measure, E-measure, weighted F, MAE.

Every number comes from PySODMetrics (``py_sod_metrics``), the implementation the field
cross-checks against Fan et al.'s MATLAB toolbox. This module adds what a benchmark run
needs around it: one accumulator for all metrics (``SODMetrics``), per-image work that can
run in a process pool, the benchmark folder layout, bad-input accounting, and the CLI::

    jsm-eval --gt-root data/test --pred-root results --out reports/eval
    # <gt-root>/<DATASET>/GT/*.png   <pred-root>/<METHOD>/<DATASET>/*.png

Conventions (those of PySODMetrics and the MATLAB toolbox): the prediction is an 8-bit map,
min-max normalised per image; the ground truth is binarised with ``gt > 128``; curves are
averaged over images and then maximised (``maxF``/``maxE``), thresholds are ``pred >= t``
for t = 0..255. Curves here are indexed by threshold (index t <-> ``pred >= t``; PySODMetrics
stores them from t = 255 down).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

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

# Canonical benchmark names (paper order) and the folder names they go by.
DATASET_ALIASES: dict[str, tuple[str, ...]] = {
    "NJU2K": ("NJU2K", "NJUD", "NJU2000", "NJU2K-TEST", "NJU2K_TEST"),
    "NLPR": ("NLPR",),
    "STERE": ("STERE", "STERE1000"),
    "SIP": ("SIP",),
    "LFSD": ("LFSD",),
    "DES": ("DES", "RGBD135"),
    "SSD": ("SSD", "SSD100"),
    "DUT-RGBD": ("DUT-RGBD", "DUT", "DUTLF-DEPTH", "DUT-D", "DUTRGBD"),
}
GT_DIR_NAMES = ("gt", "mask", "masks", "test_masks", "groundtruth")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Bad-input kinds: every one is counted per (method, dataset) and listed in the report.
ISSUE_HELP: dict[str, str] = {
    "missing_gt": "prediction without ground truth (not evaluated)",
    "missing_pred": "ground truth without prediction (skipped, or scored as an all-zero map)",
    "resized": "prediction size differs from GT: resized to GT size (bilinear), evaluated",
    "nonbinary_gt": "GT not in {0,255}: binarised at >128, evaluated",
    "unreadable": "file could not be decoded (not evaluated)",
    "duplicate": "several files share one name stem (first in sorted order used)",
    "empty": "no ground-truth images in the dataset folder (nothing evaluated)",
    "missing_dataset": "method has no folder for this dataset (nothing evaluated)",
}
MISSING_PRED_POLICIES = ("skip", "zero", "error")
# what PIL raises on a truncated or foreign file
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)


# ---------------------------------------------------------------- inputs and per-image work
def canonical_dataset(name: str) -> str:
    """The canonical benchmark name for a folder name (``NJUD`` -> ``NJU2K``); else ``name``."""
    upper = name.upper()
    for canon, aliases in DATASET_ALIASES.items():
        if upper in aliases:
            return canon
    return name


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
    """Both maps as uint8 (H, W); floats in [0, 1] are scaled to 0..255, bools to {0, 255}."""
    pred_u8, gt_u8 = _to_uint8(pred, "pred"), _to_uint8(gt, "gt")
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
    curve_sums: dict = field(
        default_factory=lambda: {k: np.zeros(NUM_THRESHOLDS) for k in CURVE_KEYS}
    )

    def step(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one pair: uint8 (H, W) maps, or float maps in [0, 1] / bool GT."""
        self.add(image_stats(pred, gt))

    def add(self, stats: dict) -> None:
        """Add the output of ``image_stats`` (computed here or in another process)."""
        self.count += 1
        for k in _SCALARS:
            self.sums[k] += stats[k]
        for k in CURVE_KEYS:
            self.curve_sums[k] += stats[k]

    def merge(self, other: SODMetrics) -> None:
        self.count += other.count
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


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork is fastest, but forking a process that runs torch's threads (the training job
    # calls evaluate_arrays) can deadlock: there, fork from a single-threaded forkserver
    # that imports the metric code once for all pools of this process.
    if "torch" in sys.modules:
        ctx = get_context("forkserver")
        ctx.set_forkserver_preload(["jsm_dist.evaluate", "py_sod_metrics"])
    else:
        ctx = get_context("fork")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _stats_of_pair(pair: tuple[np.ndarray, np.ndarray]) -> dict:
    return image_stats(*pair)


def evaluate_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]], *, workers: int = 1) -> dict:
    """Metrics of (pred, gt) pairs, uint8 (H, W) (or float in [0, 1]), same size per pair.

    ``workers > 1`` spreads images over a process pool (results are identical).
    Returns ``SODMetrics.get_results()``.
    """
    acc = SODMetrics()
    if workers <= 1:
        for pred, gt in pairs:
            acc.step(pred, gt)
    else:
        pairs = list(pairs)
        chunk = max(1, len(pairs) // (workers * 8))
        with _pool(workers) as pool:
            for stats in pool.map(_stats_of_pair, pairs, chunksize=chunk):
                acc.add(stats)
    return acc.get_results()


def evaluate_arrays(preds: np.ndarray, gts: np.ndarray, *, workers: int = 1) -> dict:
    """Metrics of stacked maps, e.g. a label-store generation vs GT: (n, h, w) each.

    ``preds`` may be uint8 or float in [0, 1]; when its (h, w) differs from the GT's, each
    map is resized to the GT size (bilinear), as the standard toolboxes do.
    """
    preds, gts = np.asarray(preds), np.asarray(gts)
    if preds.ndim != 3 or gts.ndim != 3 or len(preds) != len(gts):
        raise ValueError(f"need (n, h, w) arrays of equal n, got {preds.shape} and {gts.shape}")
    if preds.shape[1:] != gts.shape[1:]:
        preds = np.stack([resize_to(_to_uint8(p, "pred"), gts.shape[1:]) for p in preds])
    return evaluate_pairs(zip(preds, gts), workers=workers)


def resize_to(pred: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a uint8 map to (H, W) ``shape`` (PySODMetrics' eval scripts)."""
    import cv2

    if tuple(pred.shape) == tuple(shape):
        return pred
    return cv2.resize(pred, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)


# ---------------------------------------------------------------- files and folders
def read_gray(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 (H, W) (colour converted to luminance, 16-bit scaled)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I"):
            return (np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        return np.asarray(im.convert("L"))


def load_pair(pred_path: str | None, gt_path: str) -> tuple[dict | None, list[str], str | None]:
    """Read, check and score one file pair. ``pred_path`` None means an all-zero map.

    Returns (stats or None, issue kinds that apply, error text or None).
    """
    kinds: list[str] = []
    try:
        gt = read_gray(gt_path)
    except _DECODE_ERRORS as exc:  # a broken file is counted, never fatal for the run
        return None, ["unreadable"], f"{gt_path}: {exc}"
    try:
        pred = np.zeros_like(gt) if pred_path is None else read_gray(pred_path)
    except _DECODE_ERRORS as exc:
        return None, ["unreadable"], f"{pred_path}: {exc}"
    if np.any((gt != 0) & (gt != 255)):
        kinds.append("nonbinary_gt")
    if pred.shape != gt.shape:
        kinds.append("resized")
        pred = resize_to(pred, gt.shape)
    return image_stats(pred, gt), kinds, None


def _load_pair_star(args: tuple) -> tuple[dict | None, list[str], str | None]:
    return load_pair(*args)


def list_images(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """{stem: path} of the images in ``folder`` (sorted), and the duplicated stems."""
    found: dict[str, Path] = {}
    dups: list[str] = []
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                if p.stem in found:
                    dups.append(p.name)
                else:
                    found[p.stem] = p
    return found, dups


def find_gt_dir(dataset_dir: Path) -> Path | None:
    """The ground-truth subfolder of a benchmark folder (``GT``, ``masks``, ...)."""
    for sub in sorted(dataset_dir.iterdir()) if dataset_dir.is_dir() else []:
        if sub.is_dir() and sub.name.lower() in GT_DIR_NAMES:
            return sub
    return None


def discover_datasets(gt_root: Path, only: Sequence[str] | None = None) -> dict[str, Path]:
    """{canonical name: GT folder} of the benchmarks under ``gt_root``, in paper order."""
    gt_root = Path(gt_root)
    if not gt_root.is_dir():
        raise FileNotFoundError(f"--gt-root {gt_root} is not a directory")
    found: dict[str, Path] = {}
    own = find_gt_dir(gt_root)  # gt_root may itself be one benchmark folder
    candidates = [gt_root] if own is not None else sorted(gt_root.iterdir())
    for d in candidates:
        gt_dir = find_gt_dir(d) if d.is_dir() else None
        if gt_dir is not None:
            found.setdefault(canonical_dataset(d.name), gt_dir)
    if only:
        wanted = [canonical_dataset(n) for n in only]
        missing = [n for n in wanted if n not in found]
        if missing:
            raise FileNotFoundError(
                f"datasets {missing} not found under {gt_root} (found {sorted(found)})"
            )
        found = {n: found[n] for n in wanted}
    order = list(DATASET_ALIASES)
    return dict(
        sorted(found.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0]))
    )


def find_pred_dir(method_dir: Path, dataset: str) -> Path | None:
    """The folder of ``method_dir`` that holds predictions for ``dataset`` (any alias)."""
    names = {a.upper() for a in DATASET_ALIASES.get(dataset, (dataset,))} | {dataset.upper()}
    for sub in sorted(method_dir.iterdir()) if method_dir.is_dir() else []:
        if sub.is_dir() and sub.name.upper() in names:
            return sub
    return None


def evaluate_folder(
    pred_dir: Path | None,
    gt_dir: Path,
    *,
    workers: int = 1,
    missing_pred: str = "skip",
    label: str = "",
) -> dict:
    """Evaluate ``pred_dir/*`` against ``gt_dir/*`` matched by file stem.

    Returns ``SODMetrics.get_results()`` (absent when nothing could be evaluated) plus
    ``issues`` {kind: [file names]} and ``num_images``; every problem is logged.
    """
    if missing_pred not in MISSING_PRED_POLICIES:
        raise ValueError(
            f"missing_pred must be one of {MISSING_PRED_POLICIES}, got {missing_pred!r}"
        )
    issues: dict[str, list[str]] = {}
    gts, gt_dups = list_images(gt_dir)
    preds, pred_dups = ({}, []) if pred_dir is None else list_images(pred_dir)
    if pred_dir is None:
        issues["missing_dataset"] = [label]
    if gt_dups or pred_dups:
        issues["duplicate"] = gt_dups + pred_dups
    if not gts:
        issues["empty"] = [str(gt_dir)]
    if extra := sorted(set(preds) - set(gts)):
        issues["missing_gt"] = [preds[s].name for s in extra]
    if lacking := sorted(set(gts) - set(preds)):
        issues["missing_pred"] = [gts[s].name for s in lacking]
        if missing_pred == "error" and pred_dir is not None:
            raise FileNotFoundError(
                f"{label}: {len(lacking)} GT images have no prediction in {pred_dir}, "
                f"e.g. {issues['missing_pred'][:3]}"
            )
    jobs = [(str(preds[s]), str(gts[s])) for s in gts if s in preds]
    if missing_pred == "zero" and pred_dir is not None:
        jobs += [(None, str(gts[s])) for s in lacking]
    acc = SODMetrics()
    if workers > 1 and len(jobs) > 1:
        with _pool(workers) as pool:
            outs = list(
                pool.map(_load_pair_star, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
            )
    else:
        outs = [load_pair(*j) for j in jobs]
    for (pred_path, gt_path), (stats, kinds, err) in zip(jobs, outs):
        name = Path(pred_path or gt_path).name
        for kind in kinds:
            issues.setdefault(kind, []).append(name)
        if err is not None:
            log.warning("%s: unreadable: %s", label, err)
        if stats is not None:
            acc.add(stats)
    for kind, names in issues.items():
        log.warning(
            "%s: %d x %s (%s), e.g. %s", label, len(names), kind, ISSUE_HELP[kind], names[:3]
        )
    out = acc.get_results() if acc.count else {"num_images": 0}
    out["issues"] = issues
    return out


def evaluate_methods(
    gt_root: Path,
    methods: dict[str, Path],
    *,
    datasets: Sequence[str] | None = None,
    workers: int = 1,
    missing_pred: str = "skip",
) -> dict[str, dict[str, dict]]:
    """results[method][dataset] for method folders laid out as ``<dir>/<DATASET>/*.png``."""
    gt_dirs = discover_datasets(gt_root, datasets)
    if not gt_dirs:
        raise FileNotFoundError(
            f"no benchmark folders under {gt_root}: expected <DATASET>/GT (or masks) subfolders"
        )
    results: dict[str, dict[str, dict]] = {}
    for method, method_dir in methods.items():
        results[method] = {}
        for dataset, gt_dir in gt_dirs.items():
            pred_dir = find_pred_dir(Path(method_dir), dataset)
            log.info("evaluating %s on %s (%s vs %s)", method, dataset, pred_dir, gt_dir)
            results[method][dataset] = evaluate_folder(
                pred_dir,
                gt_dir,
                workers=workers,
                missing_pred=missing_pred,
                label=f"{method}/{dataset}",
            )
    return results


def evaluate_label_store(
    labels: str | os.PathLike,
    *,
    generations: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    workers: int = 1,
) -> dict[str, dict[str, dict]]:
    """Every retained label-store generation vs the corpus GT: results["gen-<g>"][corpus].

    ``labels`` is a packed corpus folder or its label store. Labels (stored at the store
    resolution) are resized to each GT's original size; samples without ``gt.png`` are
    counted as ``missing_gt``. ``shards`` restricts to a split (e.g. held-out shards).
    """
    from io import BytesIO

    from jsm_dist.labels import LabelStore
    from jsm_dist.labels.tools import corpus_of, iter_tar_samples

    root = Path(labels)
    if (root / "corpus.json").is_file():
        from jsm_dist.data.corpus import Corpus

        root = Corpus.load(root).label_dir
    store = LabelStore.open(root)
    corpus = corpus_of(store)
    if corpus is None:
        raise FileNotFoundError(f"label store {root} has no packed corpus beside it (no GT)")
    gens = list(generations) if generations is not None else store.generations
    if gone := sorted(set(gens) - set(store.generations)):
        raise ValueError(f"generations {gone} not retained in {root} (have {store.generations})")
    accs = {g: SODMetrics() for g in gens}
    issues: dict[str, list[str]] = {}
    with _pool(workers) if workers > 1 else nullcontext() as pool:
        for s in shards if shards is not None else range(store.num_shards):
            samples = list(iter_tar_samples(corpus.shard_paths[s], want=("gt.png",)))
            idx = [i for i, (_, f) in enumerate(samples) if "gt.png" in f]
            gts = [read_gray(BytesIO(samples[i][1]["gt.png"])) for i in idx]
            issues.setdefault("missing_gt", []).extend(k for k, f in samples if "gt.png" not in f)
            issues.setdefault("nonbinary_gt", []).extend(
                samples[i][0] for i, g in zip(idx, gts) if np.any((g != 0) & (g != 255))
            )
            for g in gens:
                labs = store.read_many([s] * len(idx), idx, generation=g)
                pairs = [(resize_to(lab, gt.shape), gt) for lab, gt in zip(labs, gts)]
                stats = pool.map(_stats_of_pair, pairs) if pool else map(_stats_of_pair, pairs)
                for st in stats:
                    accs[g].add(st)
    issues = {k: v for k, v in issues.items() if v}
    return {
        f"gen-{g}": {
            corpus.name: {
                **(acc.get_results() if acc.count else {"num_images": 0}),
                "issues": issues,
            }
        }
        for g, acc in accs.items()
    }


# ---------------------------------------------------------------- CLI
def _parse_method(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--method wants NAME=DIR, got {spec!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jsm-eval",
        description="Evaluate saliency maps on RGB-D SOD benchmarks (S/F/E-measure, wF, MAE), "
        "or the generations of a label store against the corpus ground truth.",
    )
    add = ap.add_argument
    add("--gt-root", type=Path, help="folder of benchmarks <DATASET>/GT/*.png (or one benchmark)")
    add(
        "--pred-root",
        type=Path,
        action="append",
        default=[],
        help="folder of methods <METHOD>/<DATASET>/*.png; each subfolder is a method (repeatable)",
    )
    add(
        "--method",
        type=_parse_method,
        action="append",
        default=[],
        help="one method as NAME=DIR with DIR/<DATASET>/*.png (repeatable)",
    )
    add("--methods", nargs="+", default=None, help="only these methods of --pred-root")
    add("--datasets", nargs="+", default=None, help="only these benchmarks, e.g. NJU2K NLPR")
    add(
        "--labels",
        type=Path,
        default=None,
        help="packed corpus (or its label store): evaluate every retained label generation",
    )
    add("--generations", type=int, nargs="+", default=None, help="only these label generations")
    add("--shards", type=int, nargs="+", default=None, help="only these corpus shards (a split)")
    add("--out", type=Path, default=None, help="write results.json, report.md and plots here")
    add("--title", default="RGB-D salient object detection: evaluation", help="report title")
    add(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes for per-image metrics (1 = in this process)",
    )
    add(
        "--missing-pred",
        choices=MISSING_PRED_POLICIES,
        default="skip",
        help="GT without prediction: skip it (counted, as the standard toolboxes do), "
        "score an all-zero map, or stop with an error",
    )
    add("--no-plots", action="store_true", help="skip the PNG curve plots")
    add("--log-level", default="WARNING", help="logging level (INFO shows progress)")
    return ap  # fmt: skip


def _methods_of(args: argparse.Namespace) -> dict[str, Path]:
    methods: dict[str, Path] = {}
    for root in args.pred_root:
        if not root.is_dir():
            raise SystemExit(f"jsm-eval: --pred-root {root} is not a directory")
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            methods.setdefault(d.name, d)
    if args.methods:
        if unknown := sorted(set(args.methods) - set(methods)):
            raise SystemExit(f"jsm-eval: methods {unknown} not in --pred-root ({sorted(methods)})")
        methods = {m: methods[m] for m in args.methods}
    methods.update(dict(args.method))
    return methods


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    methods = _methods_of(args)
    if not (methods and args.gt_root) and not args.labels:
        raise SystemExit(
            "jsm-eval: nothing to evaluate: give --gt-root with --pred-root DIR and/or "
            "--method NAME=DIR, or --labels CORPUS"
        )
    results: dict[str, dict[str, dict]] = {}
    try:
        if methods and args.gt_root:
            results = evaluate_methods(args.gt_root, methods, datasets=args.datasets,
                                       workers=args.workers, missing_pred=args.missing_pred)  # fmt: skip
        if args.labels:
            results.update(evaluate_label_store(args.labels, generations=args.generations,
                                                shards=args.shards, workers=args.workers))  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"jsm-eval: {exc}") from None
    from jsm_dist import report

    print(report.format_text_tables(results))
    if args.out is not None:
        files = report.write_report(results, args.out, args.title, plots=not args.no_plots)
        print(f"report: {files['markdown']}  json: {files['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
