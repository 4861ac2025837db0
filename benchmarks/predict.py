"""Prediction throughput of ``jsm-predict`` per encoder, side by side.

    python -m benchmarks.predict [--encoders tiny resnet50] [--num-images 16] [--size 352]

For each encoder: a JSMModel with random weights (weights do not change the cost), then
(1) the whole ``predict_images`` path on a folder of synthetic JPEGs of benchmark-like sizes
(decode, resize to size x size, forward, resize back, PNG write) and (2) the forward pass
alone on a random batch. Prints images/s and the ratio to the first encoder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jsm_dist.dist import WorldInfo
from jsm_dist.predict import PredictConfig, list_inputs, predict_images

# (width, height) of the synthetic test images, as in NJU2K / NLPR / SIP
IMAGE_SIZES = ((640, 480), (480, 640), (500, 375), (992, 744))


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        w, h = IMAGE_SIZES[k % len(IMAGE_SIZES)]
        img = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(img).resize((w, h), Image.BILINEAR).save(
            folder / f"{k:04d}.jpg", quality=90
        )


def build_model(encoder: str):
    from jsm_dist.models import JSMModel, ModelConfig

    # "unsupervised" has no text network; predict() uses the saliency network only anyway.
    cfg = ModelConfig(encoder=encoder, mode="unsupervised", pretrained=False)
    return JSMModel(cfg, ["<negative>", "object"]).eval()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--encoders", nargs="+", default=["tiny", "resnet50"], help="encoders to compare"
    )
    ap.add_argument("--num-images", type=int, default=16, help="synthetic JPEGs per run")
    ap.add_argument("--size", type=int, default=352, help="network input side (pixels)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader decode workers")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    import torch

    cfg = PredictConfig(size=args.size, batch_size=args.batch_size, num_workers=args.workers,
                        device=args.device, progress=False)  # fmt: skip
    world = WorldInfo()
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        make_images(src, args.num_images)
        items = list_inputs(src)
        for enc in args.encoders:
            model = build_model(enc)
            n_params = sum(p.numel() for p in model.saliency.parameters())
            predict_images(model, items[: args.batch_size], Path(tmp) / "warm", cfg, world)
            t0 = time.perf_counter()
            predict_images(model, items, Path(tmp) / enc, cfg, world)
            e2e = len(items) / (time.perf_counter() - t0)
            x = torch.rand(
                args.batch_size, 3, args.size, args.size, device=next(model.parameters()).device
            )
            reps = max(1, args.num_images // args.batch_size)
            t0 = time.perf_counter()
            for _ in range(reps):
                model.predict(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            fwd = reps * args.batch_size / (time.perf_counter() - t0)
            figures[enc] = {"predict_images_per_s": e2e, "forward_images_per_s": fwd,
                            "saliency_params": n_params}  # fmt: skip
    base = figures[args.encoders[0]]
    print(f"{args.num_images} JPEGs of {'/'.join(f'{w}x{h}' for w, h in IMAGE_SIZES)} at input {args.size}x{args.size}, "
          f"batch {args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(
        f"{'encoder':<12} {'params':>8} {'jsm-predict img/s':>18} {'forward img/s':>14} {'ratio':>7}"
    )
    for enc, f in figures.items():
        f["ratio_vs_" + args.encoders[0]] = f["predict_images_per_s"] / base["predict_images_per_s"]
        print(f"{enc:<12} {f['saliency_params'] / 1e6:7.1f}M {f['predict_images_per_s']:18.2f} "
              f"{f['forward_images_per_s']:14.2f} {f['ratio_vs_' + args.encoders[0]]:6.2f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"size": args.size, "batch_size": args.batch_size, "runs": figures}, fh, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
