"""Resume cost: time to the first training batch when resuming at 90% of an epoch vs at 0%.

    python -m benchmarks.resume_skip [--corpus DIR] [--samples 20000] [--size 32]

Packs a synthetic corpus first (``jsm-pack synth``, ``--samples`` scenes at ``--size`` px)
unless ``--corpus`` is given. Then, side by side in one run, alternating over
``--repeats`` rounds: a training loader (one rank, ``--workers`` loader processes,
``--batch`` samples) is made at data position 0 and at 90% of the epoch, and the time from
making it to holding its first batch is taken; medians and their ratio are printed (goal:
at most 1.5x). The resumed loader reads no sample before its position (docs/resume.md).
``--replay`` also times what replaying the consumed 90% (decoding and dropping every
batch, as resuming used to) takes to reach the same batch.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_train_loader
from jsm_dist.dist import WorldInfo


def pack(out: Path, samples: int, size: int) -> Corpus:
    cmd = [sys.executable, "-m", "jsm_dist.data.pack", "synth", "--out", str(out),
           "--num-samples", str(samples), "--image-size", str(size), "--workers", "2",
           "--no-progress"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"packed {samples} samples at {size} px in {time.perf_counter() - t0:.0f} s")
    return Corpus.load(out)


def first_batch_s(corpus: Corpus, cfg: DataConfig, start: int, skip_batches: int = 0) -> float:
    """Seconds from making the loader to holding its first batch (after ``skip_batches``
    batches decoded and dropped: the replay way)."""
    gc.collect()
    t0 = time.perf_counter()
    loader = make_train_loader(corpus, cfg, epoch=0, seed=0, world=WorldInfo(), start=start)
    it = iter(loader)
    for _ in range(skip_batches + 1):
        batch = next(it)
    took = time.perf_counter() - t0
    assert len(batch["key"]) == cfg.batch_size
    it.close()  # stops the workers now
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.resume_skip", description=__doc__.split("\n")[0]
    )
    p.add_argument("--corpus", default="", help="packed corpus (default: pack a synthetic one)")
    p.add_argument("--samples", type=int, default=20000, help="synthetic scenes when packing")
    p.add_argument("--size", type=int, default=32, help="image side when packing, train size")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--repeats", type=int, default=5, help="rounds of (0%%, 90%%)")
    p.add_argument("--replay", action="store_true", help="also time the replay way, once")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = (
            Corpus.load(args.corpus)
            if args.corpus
            else pack(Path(tmp) / "c", args.samples, args.size)
        )
        cfg = DataConfig(train_size=args.size, batch_size=args.batch, num_workers=args.workers)
        n = corpus.num_samples
        at90 = (int(0.9 * n) // args.batch) * args.batch
        first_batch_s(corpus, cfg, 0)  # warm the page cache and imports for both
        times: dict[str, list[float]] = {"0%": [], "90%": []}
        for _ in range(args.repeats):
            times["0%"].append(first_batch_s(corpus, cfg, 0))
            times["90%"].append(first_batch_s(corpus, cfg, at90))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"corpus: {n} samples in {len(corpus.shards)} shards; batch {args.batch}, "
              f"{args.workers} workers, {args.repeats} rounds")  # fmt: skip
        print("| resume at | first batch after, s (median) | all rounds, s |")
        print("|---|---|---|")
        for k, v in times.items():
            print(f"| {k} (sample {0 if k == '0%' else at90}) | {med[k]:.3f} | "
                  + ", ".join(f"{x:.3f}" for x in v) + " |")  # fmt: skip
        ratio = med["90%"] / med["0%"]
        print(f"ratio 90% / 0%: {ratio:.2f}x (goal <= 1.5x)")
        if args.replay:
            replay = first_batch_s(corpus, cfg, 0, skip_batches=at90 // args.batch)
            print(f"replaying the consumed 90% instead: {replay:.2f} s "
                  f"({replay / med['90%']:.0f}x the resumed loader)")  # fmt: skip
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
