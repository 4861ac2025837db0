"""GPU training throughput: DDP vs DeepSpeed ZeRO-2, ResNet-50 saliency network at 352 px.

    python -m benchmarks.gpu_throughput [--procs N] [--steps 60] [--size 352] [--batch 16]
                                        [--precision bf16] [--corpus DIR] [--dry-run]

Packs a small synthetic corpus at ``--size`` px (unless ``--corpus``), then trains
``jsm_dist.train`` twice through ``accelerate launch`` on ``--procs`` GPUs (default: all
torch sees): mode ``gpu`` (DDP over NCCL) and mode ``deepspeed`` (ZeRO stage 2 from the
repo's ds_config.json), one epoch of ``--steps`` steps each, no refinement pass. The
encoder is ``resnet50`` (transformers' ResNet-50 built from its config, random init:
nothing is downloaded). Reported per mode, from the run's own metrics.jsonl (the first
``--warmup`` steps left out: cuDNN autotuning, allocator growth): samples/s over all
GPUs, the share of step time spent waiting for the loader (``data_wait_frac``), and the
mean GPU utilisation and peak memory that pynvml read during the steps
(``jsm_dist.telemetry.GpuMonitor``, every 10th step).

Without a CUDA device it prints one line saying so and exits 0 (``--dry-run`` prints the
two launch commands instead, which works anywhere). ``launch/gpu_check.sh`` runs the
``gpu``-marked tests and then this.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jsm_dist.launching.command import local_launch

REPO = Path(__file__).resolve().parents[1]
MODES = ("gpu", "deepspeed")
NO_CUDA = "gpu_throughput: no CUDA device (torch.cuda.is_available() is False): nothing measured"


def train_args(args: argparse.Namespace, corpus: str, out: Path) -> list[str]:
    """The training settings both modes share (the throughput run, no refinement)."""
    return [
        "--corpus", corpus, "--out_dir", str(out),
        "--epochs", "1", "--tau", "0", "--train.refine_last_epoch", "false",
        "--train.max_steps_per_epoch", str(args.steps),
        "--train.mixed_precision", args.precision,
        "--train.tensorboard", "false", "--train.image_grid_samples", "0",
        "--model.encoder", "resnet50", "--model.pretrained", "false", "--model.crf", "false",
        "--data.train_size", str(args.size), "--data.batch_size", str(args.batch),
        "--data.num_workers", str(args.workers), "--data.pin_memory", "true",
    ]  # fmt: skip


def launch(args: argparse.Namespace, mode: str, corpus: str, out: Path):
    """(argv, env) of one training run in ``mode``."""
    return local_launch(
        args.procs,
        train_args(args, corpus, out),
        mode=mode,
        deepspeed_config_file=str(REPO / "ds_config.json"),
        mixed_precision=args.precision,
    )


def summarize(metrics: Path, warmup: int) -> dict:
    """Throughput, data wait and GPU readings of the steps after ``warmup``."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    steps = [r for r in recs if r.get("kind") == "step"]
    kept = steps[warmup:] if len(steps) > warmup else steps
    step_s = sum(r["step_time"] for r in kept)
    util = [r["gpu_util"] for r in kept if "gpu_util" in r]
    mem = [r["gpu_mem_used_mb"] for r in kept if "gpu_mem_used_mb" in r]
    return {
        "steps": len(kept),
        "samples_per_s": sum(r["samples"] for r in kept) / step_s if step_s else math.nan,
        "data_wait_frac": sum(r["data_time"] for r in kept) / step_s if step_s else math.nan,
        "gpu_util_mean": sum(util) / len(util) if util else math.nan,
        "gpu_mem_used_mb_max": max(mem) if mem else math.nan,
        "gpu_readings": len(util),
    }


def loader_workers(procs: int) -> int:
    """Loader processes per GPU: 6 (a 352 px decode runs at ~300 samples/s per core), fewer
    when the cores would be oversubscribed (one core per training process left free)."""
    return max(1, min(6, (os.cpu_count() or 2) // procs - 1))


def pack_corpus(args: argparse.Namespace, out: Path) -> str:
    """A synthetic corpus big enough for one epoch of ``--steps`` steps on every GPU."""
    n = max(256, args.steps * args.batch * args.procs)
    cmd = [sys.executable, "-m", "jsm_dist.data.pack", "synth", "--out", str(out)]
    cmd += ["--num-samples", str(n), "--image-size", str(args.size), "--seed", "0"]
    cmd += ["--samples-per-shard", "64", "--depth-convention", "near_is_large", "--no-progress"]
    subprocess.run(cmd, check=True)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--procs", type=int, default=0, help="GPUs / processes (0: all visible)")
    p.add_argument("--steps", type=int, default=60, help="training steps per mode")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures")
    p.add_argument("--size", type=int, default=352, help="image and train size, px")
    p.add_argument("--batch", type=int, default=16, help="batch size per GPU")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="loader processes per GPU (0: up to 6, cores allowing)",
    )
    p.add_argument("--precision", default="bf16", choices=("no", "fp16", "bf16"))
    p.add_argument("--corpus", default="", help="packed corpus (default: pack a synthetic one)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--dry-run", action="store_true", help="print the launch commands only")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    import torch

    cuda = torch.cuda.is_available()
    if args.dry_run:
        args.procs = args.procs or max(1, torch.cuda.device_count())
        args.workers = args.workers or loader_workers(args.procs)
        for mode in MODES:
            cmd, _ = launch(args, mode, args.corpus or "CORPUS", Path(f"OUT/{mode}"))
            print(f"{mode}: {shlex.join(cmd)}")
        return 0
    if not cuda:
        print(NO_CUDA)
        return 0
    args.procs = args.procs or torch.cuda.device_count()
    args.workers = args.workers or loader_workers(args.procs)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="jsm-gpu-") as tmp:
        corpus = args.corpus or pack_corpus(args, Path(tmp) / "corpus")
        for mode in MODES:
            out = Path(tmp) / mode
            cmd, env = launch(args, mode, corpus, out)
            t0 = time.perf_counter()
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.stderr.write(res.stdout[-2000:] + res.stderr[-4000:])
                raise SystemExit(f"training in mode {mode} failed (exit {res.returncode})")
            rows[mode] = {
                "wall_s": time.perf_counter() - t0,
                **summarize(out / "metrics.jsonl", args.warmup),
            }
    name = torch.cuda.get_device_name(0)
    print(f"{args.procs} x {name}, ResNet-50 CPD at {args.size} px, batch {args.batch}/GPU, "
          f"{args.precision}, {args.steps} steps ({args.warmup} warm-up left out)")  # fmt: skip
    print(f"{'mode':<10} {'samples/s':>10} {'data wait':>10} {'GPU util %':>10} "
          f"{'GPU MiB':>8} {'wall s':>7}")  # fmt: skip
    for mode, r in rows.items():
        print(f"{mode:<10} {r['samples_per_s']:>10.1f} {r['data_wait_frac']:>10.1%} "
              f"{r['gpu_util_mean']:>10.0f} {r['gpu_mem_used_mb_max']:>8.0f} {r['wall_s']:>7.0f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "procs": args.procs, **rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
