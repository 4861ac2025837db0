"""Evaluation throughput: our evaluator vs the reference JSM repository's torch evaluator.

    python -m benchmarks.evaluate [--num-images 32] [--size 352] [--workers 2]

The reference (github.com/jiwei0921/JSM, ``JSM_weakly/evaluateSOD/{evaluator,dataloader}.py``)
re-reads every pair once per metric, min-max normalises the prediction to uint8, turns both
maps into torch tensors and loops in Python over 255 thresholds per image for the PR curve
and again for the E-measure curve. ``ReferenceStyleEvaluator`` below is our own
re-implementation of that style (same formulas, same loop structure, pairs held in memory
on both sides so file decoding is not timed). Both run side by side on the same synthetic
pairs; the ratio is printed, with the metric values of both so they can be compared.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np

from jsm_dist.eval.metrics import evaluate_pairs, resize_to


def synthetic_pairs(n: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (pred, gt) uint8 pairs: an ellipse GT and a blurred, noisy, shifted prediction."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    pairs = []
    for _ in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.1, 0.3, 2) * size
        gt = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).astype(np.uint8) * 255
        shift = rng.integers(-size // 20, size // 20 + 1, 2)
        pred = np.roll(gt, tuple(shift), axis=(0, 1)).astype(np.float32)
        pred = cv2.GaussianBlur(pred, (0, 0), sigmaX=size / 40) + rng.normal(0, 25, gt.shape)
        pairs.append((np.clip(pred, 0, 255).astype(np.uint8), gt))
    return pairs


class ReferenceStyleEvaluator:
    """MAE, max F (beta^2 = 0.3), max E and S-measure in the reference repository's style:
    per image, per metric pass, torch tensors, Python loops over 255 thresholds."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.pairs = pairs

    def loader(self):
        """The reference EvalDataset + transforms.ToTensor(): resize, min-max, /255."""
        import torch

        for pred, gt in self.pairs:
            if pred.shape != gt.shape:
                pred = resize_to(pred, gt.shape)
            p = pred.astype(np.float64)
            p = ((p - p.min()) / (p.max() - p.min()) * 255).astype(np.uint8)
            yield (
                torch.from_numpy(p).float().div(255).unsqueeze(0),
                torch.from_numpy(np.ascontiguousarray(gt)).float().div(255).unsqueeze(0),
            )

    def run(self) -> dict:
        import torch

        with torch.no_grad():
            return {
                "MAE": self.eval_mae(),
                "maxF": self.eval_fmeasure(),
                "maxE": self.eval_emeasure(),
                "Sm": self.eval_smeasure(),
            }

    def eval_mae(self) -> float:
        import torch

        avg, n = 0.0, 0
        for pred, gt in self.loader():
            mea = (pred - gt).abs().mean()
            if not torch.isnan(mea):  # NaN guard, as in the reference
                avg += mea
                n += 1
        return float(avg / n)

    def eval_fmeasure(self, beta2: float = 0.3) -> float:
        import torch

        avg, n = 0.0, 0
        for pred, gt in self.loader():
            prec, recall = self._eval_pr(pred, gt, 255)
            f = (1 + beta2) * prec * recall / (beta2 * prec + recall)
            f[torch.isnan(f)] = 0
            avg, n = avg + f, n + 1
        return float((avg / n).max())

    def eval_emeasure(self) -> float:
        import torch

        scores, n = torch.zeros(255), 0
        for pred, gt in self.loader():
            scores += self._eval_e(pred, gt, 255)
            n += 1
        return float((scores / n).max())

    def eval_smeasure(self, alpha: float = 0.5) -> float:
        avg, n = 0.0, 0
        for pred, gt in self.loader():
            y = gt.mean()
            if y == 0:
                q = 1.0 - pred.mean()
            elif y == 1:
                q = pred.mean()
            else:
                gt = (gt >= 0.5).float()
                q = alpha * self._s_object(pred, gt) + (1 - alpha) * self._s_region(pred, gt)
                q = max(float(q), 0.0)
            avg += float(q)
            n += 1
        return avg / n

    @staticmethod
    def _eval_e(y_pred, y, num):
        import torch

        score = torch.zeros(num)
        thlist = torch.linspace(0, 1 - 1e-10, num)
        for i in range(num):
            y_pred_th = (y_pred >= thlist[i]).float()
            fm = y_pred_th - y_pred_th.mean()
            gt = y - y.mean()
            align = 2 * gt * fm / (gt * gt + fm * fm + 1e-20)
            enhanced = ((align + 1) * (align + 1)) / 4
            score[i] = torch.sum(enhanced) / (y.numel() - 1 + 1e-20)
        return score

    @staticmethod
    def _eval_pr(y_pred, y, num):
        import torch

        prec, recall = torch.zeros(num), torch.zeros(num)
        thlist = torch.linspace(0, 1 - 1e-10, num)
        for i in range(num):
            y_temp = (y_pred >= thlist[i]).float()
            tp = (y_temp * y).sum()
            prec[i], recall[i] = tp / (y_temp.sum() + 1e-20), tp / (y.sum() + 1e-20)
        return prec, recall

    def _s_object(self, pred, gt):
        import torch

        fg = torch.where(gt == 0, torch.zeros_like(pred), pred)
        bg = torch.where(gt == 1, torch.zeros_like(pred), 1 - pred)
        u = gt.mean()
        return u * self._object(fg, gt) + (1 - u) * self._object(bg, 1 - gt)

    @staticmethod
    def _object(pred, gt):
        temp = pred[gt == 1]
        x = temp.mean()
        return 2.0 * x / (x * x + 1.0 + temp.std() + 1e-20)

    def _s_region(self, pred, gt):
        import torch

        h, w = gt.shape[-2:]
        g, p = gt.view(h, w), pred.view(h, w)
        total = g.sum()
        if total == 0:
            x, y = round(w / 2), round(h / 2)
        else:
            x = int(torch.round((g.sum(dim=0) * torch.arange(w).float()).sum() / total))
            y = int(torch.round((g.sum(dim=1) * torch.arange(h).float()).sum() / total))
        area = h * w
        w1, w2, w3 = x * y / area, (w - x) * y / area, x * (h - y) / area
        weights = (w1, w2, w3, 1 - w1 - w2 - w3)
        blocks = ((slice(0, y), slice(0, x)), (slice(0, y), slice(x, w)),
                  (slice(y, h), slice(0, x)), (slice(y, h), slice(x, w)))  # fmt: skip
        return sum(wt * self._ssim(p[b], g[b]) for wt, b in zip(weights, blocks))

    @staticmethod
    def _ssim(pred, gt):
        h, w = pred.shape[-2:]
        n = h * w
        x, y = pred.mean(), gt.mean()
        sigma_x2 = ((pred - x) * (pred - x)).sum() / (n - 1 + 1e-20)
        sigma_y2 = ((gt - y) * (gt - y)).sum() / (n - 1 + 1e-20)
        sigma_xy = ((pred - x) * (gt - y)).sum() / (n - 1 + 1e-20)
        a = 4 * x * y * sigma_xy
        b = (x * x + y * y) * (sigma_x2 + sigma_y2)
        if a != 0:
            return float(a / (b + 1e-20))
        return 1.0 if b == 0 else 0.0


def _timed(fn) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=32, help="synthetic pairs to evaluate")
    ap.add_argument("--size", type=int, default=352, help="side of the square maps (pixels)")
    ap.add_argument("--workers", type=int, default=2, help="processes for our parallel run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic pairs")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    pairs = synthetic_pairs(args.num_images, args.size, args.seed)
    # Our pool forks while torch is not imported (eval_metrics.metric_pool), so time ours first.
    evaluate_pairs(pairs[:1])  # warm the imports so neither side pays them in the timing
    runs = {
        "ours (1 process)": _timed(lambda: evaluate_pairs(pairs)),
        f"ours ({args.workers} processes)": _timed(
            lambda: evaluate_pairs(pairs, workers=args.workers)
        ),
    }
    import torch

    ReferenceStyleEvaluator(pairs[:1]).run()
    runs[f"reference style (torch, {torch.get_num_threads()} threads)"] = _timed(
        lambda: ReferenceStyleEvaluator(pairs).run()
    )
    n = len(pairs)
    ref_name = list(runs)[-1]
    ref_rate = n / runs[ref_name][0]
    print(f"{n} pairs of {args.size}x{args.size}; ours computes 9 metrics + 4 curves, "
          "the reference style 4 metrics")  # fmt: skip
    print(f"{'evaluator':<36} {'images/s':>9} {'vs ref':>7}  Sm      maxF    maxE    MAE")
    figures = {}
    for name, (secs, res) in runs.items():
        rate = n / secs
        figures[name] = {"images_per_s": rate, "ratio_vs_reference": rate / ref_rate,
                         **{k: res[k] for k in ("Sm", "maxF", "maxE", "MAE")}}  # fmt: skip
        print(f"{name:<36} {rate:9.2f} {rate / ref_rate:6.1f}x  "
              + "  ".join(f"{res[k]:.4f}" for k in ("Sm", "maxF", "maxE", "MAE")))  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"num_images": n, "size": args.size, "runs": figures}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
