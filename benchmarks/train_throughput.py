"""Training throughput: samples/s with N processes vs 1 process, same corpus and settings.

    python -m benchmarks.train_throughput [--corpus DIR] [--procs 2] [--epochs 2]

Runs ``jsm_dist.train`` under ``accelerate launch`` twice, side by side in one invocation
(1 process, then N), and prints samples/s of each from the runs' own telemetry (``done``
event: samples over summed step time, data wait included), their ratio, and the share of
wall time the refinement passes took. Without ``--corpus`` a small synthetic corpus is
packed first. On a 2-core CPU machine, 2 processes share the same 2 cores: the ratio
measures the distributed overhead as much as any speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jsm_dist.launching.command import local_launch


def run_training(corpus: str, out: Path, procs: int, extra: list[str]) -> dict:
    cmd, env = local_launch(procs, ["--corpus", corpus, "--out_dir", str(out), *extra], mode="cpu")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"training with {procs} process(es) failed (exit {res.returncode})")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    done = [r for r in recs if r.get("name") == "done"][-1]
    refine_s = sum(r.get("seconds", 0.0) for r in recs if r.get("name") == "refine")
    return {
        "procs": procs,
        "samples_per_s": done["samples_per_s"],
        "wall_s": wall,
        "refine_s": refine_s,
        "steps": done["steps_per_rank"][0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--corpus", default="", help="packed corpus (default: pack a synthetic one)")
    p.add_argument("--procs", type=int, default=2, help="processes of the distributed run")
    p.add_argument("--samples", type=int, default=192, help="synthetic scenes when packing")
    p.add_argument("--size", type=int, default=96, help="image / train size")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run")
    p.add_argument("--encoder", default="tiny", help="model.encoder of both runs")
    p.add_argument("--batch", type=int, default=8, help="batch size per rank")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if not corpus:
            from jsm_dist.data import pack

            pack.main(
                [
                    "synth",
                    "--out",
                    f"{tmp}/c",
                    "--num-samples",
                    str(args.samples),
                    "--image-size",
                    str(args.size),
                    "--samples-per-shard",
                    "32",
                    "--no-progress",
                ]
            )
            corpus = f"{tmp}/c"
        extra = [
            "--epochs",
            str(args.epochs),
            "--tau",
            "1",
            "--model.encoder",
            args.encoder,
            "--data.train_size",
            str(args.size),
            "--data.batch_size",
            str(args.batch),
            "--data.num_workers",
            "1",
            "--tensorboard",
            "false",
            "--model.crf",
            "false",
        ]
        one = run_training(corpus, Path(tmp) / "p1", 1, extra)
        many = run_training(corpus, Path(tmp) / f"p{args.procs}", args.procs, extra)
    print(
        f"{'processes':>10} {'samples/s':>10} {'steps/rank':>10} {'wall s':>8} {'refine share':>12}"
    )
    for r in (one, many):
        print(
            f"{r['procs']:>10} {r['samples_per_s']:>10.1f} {r['steps']:>10} {r['wall_s']:>8.1f} "
            f"{r['refine_s'] / r['wall_s']:>12.1%}"
        )
    print(
        f"ratio samples/s {args.procs} vs 1 process: "
        f"{many['samples_per_s'] / one['samples_per_s']:.2f}x (cores: {os.cpu_count()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
