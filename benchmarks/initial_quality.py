"""How good (and how wrong) are the handcrafted initial labels on the synthetic corpus?

``python -m benchmarks.initial_quality [--num 300] [--size 128] [--grid grid.png]``

Generates ``--num`` scenes, computes CDCP initial labels (jsm_dist.data.initial) and three
single-cue baselines on the same scenes, and prints per method: MAE, S-measure, max
F-measure (PySODMetrics), the mean foreground fraction (mean map value) and the fraction
of scenes where the map is "noticeably wrong" (per-image S-measure < ``--wrong-below``).
Also prints generator and initial-label throughput (samples/s, one process) measured in
the same run. ``--grid`` writes a PNG with rows RGB | depth | GT | initial label.

Baselines:
- center: isotropic Gaussian centre prior (sigma = 1/4 of the side);
- depth-only: hole-filled disparity, min-max normalised (nearest = most salient);
- CDCP+depth-con: CDCP with the DES depth-contrast cue the reference computes but leaves unused;
- colour-only: frequency-tuned colour contrast, |mean Lab - blurred Lab| (Achanta et al.,
  "Frequency-tuned salient region detection", CVPR 2009).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import cv2
import numpy as np
import py_sod_metrics as sod

from jsm_dist.data.initial import CDCPConfig, _fill_holes, initial_saliency
from jsm_dist.data.synth import SynthConfig, render

log = logging.getLogger(__name__)


def center_prior(rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
    h, w = depth.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sigma = 0.25 * min(h, w)
    return np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * sigma**2)).astype(np.float32)


def depth_only(rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
    d = _fill_holes(depth.astype(np.float32))
    return ((d - d.min()) / max(float(d.max() - d.min()), 1e-6)).astype(np.float32)


def colour_only(rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    blur = cv2.GaussianBlur(lab, (5, 5), 0)
    sal = np.linalg.norm(blur - lab.reshape(-1, 3).mean(0), axis=2)
    return (sal / max(float(sal.max()), 1e-6)).astype(np.float32)


def to_float_depth(depth_u16: np.ndarray) -> np.ndarray:
    """uint16 near_is_large (0 = hole) -> float32 in [0, 1], near = 1, hole = 0."""
    return depth_u16.astype(np.float32) / 65535.0


class Scores:
    """Dataset-level MAE / S / max-F plus per-image S-measure for one method."""

    def __init__(self) -> None:
        self.mae = sod.MAE()
        self.fm = sod.FmeasureV2(
            metric_handlers={"fm": sod.FmeasureHandler(with_adaptive=False, with_dynamic=True)}
        )
        self.per_image_s: list[float] = []
        self.fg: list[float] = []

    def step(self, pred: np.ndarray, gt: np.ndarray) -> None:
        p8 = np.clip(pred * 255 + 0.5, 0, 255).astype(np.uint8)
        self.mae.step(p8, gt)
        self.fm.step(p8, gt)
        sm = sod.Smeasure()
        sm.step(p8, gt)
        self.per_image_s.append(float(sm.get_results()["sm"]))
        self.fg.append(float(pred.mean()))

    def results(self, wrong_below: float) -> dict[str, float]:
        s = np.asarray(self.per_image_s)
        return {
            "mae": float(self.mae.get_results()["mae"]),
            "s_measure": float(s.mean()),
            "max_f": float(self.fm.get_results()["fm"]["dynamic"].max()),
            "fg_fraction": float(np.mean(self.fg)),
            "wrong_fraction": float((s < wrong_below).mean()),
        }


def write_grid(path: str, samples: list[dict], labels: list[np.ndarray]) -> None:
    """Rows of RGB | depth (holes magenta) | GT | initial label, upscaled 2x."""
    rows = []
    for smp, lab in zip(samples, labels):
        d = to_float_depth(smp["depth"])
        dv = np.repeat((d * 255).astype(np.uint8)[..., None], 3, 2)
        dv[smp["depth"] == 0] = (255, 0, 255)
        gt = np.repeat(smp["gt"][..., None], 3, 2)
        lv = np.repeat((lab * 255).astype(np.uint8)[..., None], 3, 2)
        sep = np.full((smp["rgb"].shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([smp["rgb"], sep, dv, sep, gt, sep, lv], 1))
    grid = np.concatenate(rows, 0)
    grid = cv2.resize(grid, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(path, grid[..., ::-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="initial_quality", description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=300, help="number of synthetic scenes")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument(
        "--wrong-below",
        type=float,
        default=0.6,
        help="per-image S-measure under which a map counts as noticeably wrong",
    )
    p.add_argument("--grid", default=None, help="write an RGB|depth|GT|initial PNG grid here")
    p.add_argument("--grid-count", type=int, default=8, help="rows in the grid")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = SynthConfig(num_samples=args.num, image_size=args.size, seed=args.seed)

    t0 = time.perf_counter()
    rendered = [render(cfg, i) for i in range(cfg.num_samples)]  # what generate() does
    t_gen = time.perf_counter() - t0
    samples = [smp for smp, _ in rendered]

    rgb = np.stack([s["rgb"] for s in samples])
    depth = np.stack([to_float_depth(s["depth"]) for s in samples])
    t0 = time.perf_counter()
    initial = initial_saliency(rgb, depth)
    t_init = time.perf_counter() - t0
    with_depth = initial_saliency(rgb, depth, CDCPConfig(depth_contrast=True))

    methods: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "center": center_prior,
        "depth-only": depth_only,
        "colour-only": colour_only,
    }
    scores = {name: Scores() for name in ("CDCP (initial)", "CDCP+depth-con", *methods)}
    for i, smp in enumerate(samples):
        scores["CDCP (initial)"].step(initial[i], smp["gt"])
        scores["CDCP+depth-con"].step(with_depth[i], smp["gt"])
        for name, fn in methods.items():
            scores[name].step(fn(smp["rgb"], depth[i]), smp["gt"])
    if args.grid:
        k = min(args.grid_count, len(samples))
        write_grid(args.grid, samples[:k], list(initial[:k]))
        log.info("wrote %s", args.grid)

    gt_fg = float(np.mean([(s["gt"] > 0).mean() for s in samples]))
    print(
        f"\n{args.num} synthetic scenes at {args.size}x{args.size} (seed {args.seed}); "
        f"mean GT foreground fraction {gt_fg:.3f}; wrong = per-image S < {args.wrong_below}"
    )
    print(f"{'method':<16}{'MAE':>8}{'S':>8}{'maxF':>8}{'fg':>8}{'wrong':>8}")
    for name, sc in scores.items():
        r = sc.results(args.wrong_below)
        print(
            f"{name:<16}{r['mae']:>8.3f}{r['s_measure']:>8.3f}{r['max_f']:>8.3f}"
            f"{r['fg_fraction']:>8.3f}{r['wrong_fraction']:>8.2f}"
        )
    wrong = np.asarray(scores["CDCP (initial)"].per_image_s) < args.wrong_below
    kinds = {
        "camouflage": [info["camouflage"] for _, info in rendered],
        "distractor in front": [
            any(o["role"] == "front" for o in info["objects"]) for _, info in rendered
        ],
        "no distractor": [len(info["objects"]) == 1 for _, info in rendered],
    }
    print("CDCP wrong fraction by scene kind:")
    for kind, flags in kinds.items():
        f = np.asarray(flags)
        rest = wrong[~f].mean() if (~f).any() else float("nan")
        print(
            f"  {kind:<20} {wrong[f].mean() if f.any() else float('nan'):.2f} "
            f"({f.sum()} scenes) vs {rest:.2f} otherwise"
        )
    gen_rate, init_rate = args.num / t_gen, args.num / t_init
    print(f"generator:        {gen_rate:8.1f} samples/s")
    print(
        f"initial_saliency: {init_rate:8.1f} samples/s  (generator/initial = {gen_rate / init_rate:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
