"""Benchmark inputs on disk, for :mod:`jsm_dist.eval.evaluate`.

Holds the benchmark folder conventions (dataset names and aliases, GT folder names, image
extensions), the bad-input kinds that are counted and reported (``ISSUE_HELP``) and the
missing-prediction policies, and the functions that find and read inputs: dataset and
prediction folder discovery, ``list_images`` (stem -> path, duplicates), ``read_gray`` (a
prediction map) and ``load_pair``, which reads (the GT through :mod:`jsm_dist.data.masks`),
checks and scores one file pair in a pool worker.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jsm_dist.data.masks import read_mask
from jsm_dist.eval.metrics import image_stats, resize_to

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


# ---------------------------------------------------------------- files and folders
def canonical_dataset(name: str) -> str:
    """The canonical benchmark name for a folder name (``NJUD`` -> ``NJU2K``); else ``name``."""
    upper = name.upper()
    for canon, aliases in DATASET_ALIASES.items():
        if upper in aliases:
            return canon
    return name


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """A prediction map file as uint8 (H, W) (colour converted to luminance, 16-bit
    scaled). Ground truth is read by :func:`jsm_dist.data.masks.read_mask` (0/1 and palette
    masks)."""
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
        gt = read_mask(gt_path)
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


def load_pair_star(args: tuple) -> tuple[dict | None, list[str], str | None]:
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
