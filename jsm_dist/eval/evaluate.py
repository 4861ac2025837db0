"""Standard RGB-D SOD evaluation: S-measure, F-measure, E-measure, weighted F, MAE.

Every number comes from PySODMetrics (``py_sod_metrics``), the implementation the field
cross-checks against Fan et al.'s MATLAB toolbox. This module adds what a benchmark run
needs around it: one accumulator for all metrics (``SODMetrics``), per-image work that can
run in a process pool (both in ``jsm_dist.eval.metrics``), the benchmark folder layout
(``jsm_dist.eval.inputs``), bad-input accounting, and the CLI::

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
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from jsm_dist import schema
from jsm_dist.data.masks import read_mask
from jsm_dist.eval import report
from jsm_dist.eval.inputs import (
    DATASET_ALIASES,
    GT_DIR_NAMES,
    IMAGE_EXTS,
    ISSUE_HELP,
    MISSING_PRED_POLICIES,
    canonical_dataset,
    discover_datasets,
    find_gt_dir,
    find_pred_dir,
    list_images,
    load_pair,
    load_pair_star,
    read_gray,
)
from jsm_dist.eval.metrics import (
    CURVE_KEYS,
    METRIC_KEYS,
    METRICS,
    NUM_THRESHOLDS,
    SODMetrics,
    evaluate_arrays,
    evaluate_pairs,
    image_stats,
    metric_pool,
    resize_to,
    stats_of_pair,
    validate_pair,
)
from jsm_dist.labels import LabelStore, LabelStoreError
from jsm_dist.labels.tools import corpus_of, iter_tar_samples, store_dir

# Metrics of in-memory maps live in eval_metrics, input discovery and reading in eval_inputs;
# both are re-exported here, where callers have always imported them from.
__all__ = [
    "CURVE_KEYS",
    "DATASET_ALIASES",
    "GT_DIR_NAMES",
    "IMAGE_EXTS",
    "ISSUE_HELP",
    "METRICS",
    "METRIC_KEYS",
    "MISSING_PRED_POLICIES",
    "NUM_THRESHOLDS",
    "SODMetrics",
    "build_parser",
    "canonical_dataset",
    "discover_datasets",
    "evaluate_arrays",
    "evaluate_folder",
    "evaluate_label_store",
    "evaluate_methods",
    "evaluate_pairs",
    "find_gt_dir",
    "find_pred_dir",
    "image_stats",
    "list_images",
    "load_pair",
    "main",
    "read_gray",
    "read_mask",
    "resize_to",
    "validate_pair",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- folders of maps
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
        with metric_pool(workers) as pool:
            outs = list(
                pool.map(load_pair_star, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
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

    ``labels`` is a packed corpus folder or its label store, or a training run's store (or
    run directory): its manifest names the corpus it was seeded from. Labels (stored at the
    store resolution) are resized to each GT's original size; samples without ``gt.png``
    are counted as ``missing_gt``. ``shards`` restricts to a split (e.g. held-out shards).
    """

    root = store_dir(labels)
    store = LabelStore.open(root)
    try:
        corpus = corpus_of(store)
    except LabelStoreError as e:
        raise ValueError(str(e)) from e
    if corpus is None:
        raise FileNotFoundError(
            f"label store {root} knows no corpus (it is not a corpus's labels/ and records "
            "none), so there is no GT to compare with"
        )
    gens = list(generations) if generations is not None else store.generations
    if gone := sorted(set(gens) - set(store.generations)):
        raise ValueError(f"generations {gone} not retained in {root} (have {store.generations})")
    accs = {g: SODMetrics() for g in gens}
    issues: dict[str, list[str]] = {}
    with metric_pool(workers) if workers > 1 else nullcontext() as pool:
        for s in shards if shards is not None else range(store.num_shards):
            samples = list(iter_tar_samples(corpus.shard_paths[s], want=(schema.MEMBER_GT,)))
            idx = [i for i, (_, f) in enumerate(samples) if schema.MEMBER_GT in f]
            gts = [
                read_mask(samples[i][1][schema.MEMBER_GT], f"gt of {samples[i][0]}") for i in idx
            ]
            issues.setdefault("missing_gt", []).extend(
                k for k, f in samples if schema.MEMBER_GT not in f
            )
            issues.setdefault("nonbinary_gt", []).extend(
                samples[i][0] for i, g in zip(idx, gts) if np.any((g != 0) & (g != 255))
            )
            for g in gens:
                labs = store.read_many([s] * len(idx), idx, generation=g)
                pairs = [(resize_to(lab, gt.shape), gt) for lab, gt in zip(labs, gts)]
                stats = pool.map(stats_of_pair, pairs) if pool else map(stats_of_pair, pairs)
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
        help="packed corpus, label store or training run directory: evaluate every "
        "retained label generation against the corpus GT",
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

    print(report.format_text_tables(results))
    if args.out is not None:
        files = report.write_report(results, args.out, args.title, plots=not args.no_plots)
        print(f"report: {files['markdown']}  json: {files['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
