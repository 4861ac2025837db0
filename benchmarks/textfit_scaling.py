"""Text fitting with N processes vs 1: time and rank 0's peak memory, same corpus and model.

    python -m benchmarks.textfit_scaling --corpus DIR [--procs 2] [--epochs 30]
                                             [--repeats 2] [--encoder efficientnet_lite0]

Runs :func:`jsm_dist.refine.textfit.fit_scorer` (what ``train.text_fit_epochs`` does before each
refinement) in 1 process and in ``--procs`` gloo processes, alternating, ``--repeats`` times
each, every process on ``--threads`` torch threads, and prints per run:

- the wall time of the whole call (cache collection included; the slowest rank) and of the
  fitting alone (``FitStats.seconds``);
- the CPU time of the fitting on the busiest rank's main thread: about the wall time on
  cores of its own, waits for the other ranks aside. On a shared machine it is the steadier
  figure: other work stretches the wall time of 2 processes, which wait for each other at
  every step, more than that of 1;
- rank 0's resident memory before the call, at its peak during the call (``VmHWM`` after a
  reset through ``/proc/self/clear_refs``) and at its peak during the fitting (``VmRSS``
  sampled every 5 ms over the call's last ``FitStats.seconds``; the cache collection before
  it peaks higher with a large image encoder). Linux only.

The model is the demo's (pretrained EfficientNet-Lite0 unless ``--encoder``; the text
network as configured by default). Without ``--corpus`` a synthetic one is packed like the
demo's. On a 2-core machine shared with other work the ratios are noisy: compare runs of
one invocation, and read the load average printed with each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.procstat import memory_kib, reset_peak
from jsm_dist.launching.command import free_port


def _sample(samples: list[tuple[float, int, float]], done: threading.Event) -> None:
    """Append (time, VmRSS KiB, the main thread's CPU seconds) every 5 ms until ``done``."""
    clock = time.pthread_getcpuclockid(threading.main_thread().ident)
    while not done.wait(0.005):
        samples.append((time.perf_counter(), memory_kib("VmRSS"), time.clock_gettime(clock)))


def _rank(args: argparse.Namespace) -> int:
    """One process of a run: fit once, write this rank's figures to ``args.out``."""
    import torch
    import torch.distributed as td

    from jsm_dist import dist
    from jsm_dist.data.corpus import Corpus
    from jsm_dist.data.stream import DataConfig
    from jsm_dist.models import JSMModel, ModelConfig
    from jsm_dist.refine.textfit import fit_scorer

    torch.set_num_threads(args.threads)
    if args.world > 1:
        url = f"tcp://127.0.0.1:{args.port}"
        td.init_process_group("gloo", init_method=url, rank=args.rank, world_size=args.world)
    corpus = Corpus.load(args.corpus)
    torch.manual_seed(0)  # the same model in every process
    model = JSMModel(ModelConfig(encoder=args.encoder, crf=False), corpus.vocab)
    data = DataConfig(train_size=args.size, batch_size=8, num_workers=0)
    dist.barrier()
    reset_peak()  # the peak from here on (model loading peaks elsewhere)
    rss = memory_kib("VmRSS")
    samples: list[tuple[float, int, float]] = []  # what happens inside the fitting
    done = threading.Event()
    sampler = threading.Thread(target=_sample, args=(samples, done), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    _, stats = fit_scorer(
        model,
        corpus,
        data,
        device=torch.device("cpu"),
        epochs=args.epochs,
        lr=1e-3,
        seed=1,
        clip=0.5,
    )
    t1 = time.perf_counter()
    done.set()
    sampler.join()
    # the fitting closes the call (cache collection first): its window is the last fit_s
    in_fit = [(kib, cpu) for t, kib, cpu in samples if t >= t1 - stats.seconds]
    record = {
        "rank": args.rank,
        "wall_s": t1 - t0,
        "fit_s": stats.seconds,
        "samples": stats.samples,
        "loss_last": stats.loss_last,
        "rss_before_mib": rss / 1024,
        "rss_peak_mib": memory_kib("VmHWM") / 1024,
        "rss_fit_peak_mib": max((kib for kib, _ in in_fit), default=0) / 1024,
        "fit_cpu_s": in_fit[-1][1] - in_fit[0][1] if in_fit else 0.0,
    }
    Path(args.out).write_text(json.dumps(record))
    if args.world > 1:
        td.destroy_process_group()
    return 0


def run(corpus: str, procs: int, args: argparse.Namespace, tmp: Path) -> dict:
    """One fit with ``procs`` processes: the slowest rank's wall time, rank 0's figures."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    outs = [tmp / f"p{procs}_r{r}_{time.monotonic_ns()}.json" for r in range(procs)]
    cmd = [sys.executable, "-m", "benchmarks.textfit_scaling", "--corpus", corpus]
    children = [
        subprocess.Popen(
            [
                *cmd,
                "--epochs",
                str(args.epochs),
                "--encoder",
                args.encoder,
                "--size",
                str(args.size),
            ]
            + ["--threads", str(args.threads), "--rank", str(r), "--world", str(procs)]
            + ["--port", port, "--out", str(outs[r])],
            env=env,
        )
        for r in range(procs)
    ]
    codes = [c.wait() for c in children]
    if any(codes) or not all(o.is_file() for o in outs):
        raise SystemExit(f"text fitting with {procs} process(es) failed (exit codes {codes})")
    recs = [json.loads(o.read_text()) for o in outs]
    return {
        "procs": procs,
        "wall_s": max(r["wall_s"] for r in recs),
        "fit_s": recs[0]["fit_s"],
        "fit_cpu_s": max(r["fit_cpu_s"] for r in recs),
        "samples": recs[0]["samples"],
        "loss_last": recs[0]["loss_last"],
        "rss_before_mib": recs[0]["rss_before_mib"],
        "rss_peak_mib": recs[0]["rss_peak_mib"],
        "rss_fit_peak_mib": recs[0]["rss_fit_peak_mib"],
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.textfit_scaling", description=__doc__.split("\n")[0]
    )
    p.add_argument("--corpus", default="", help="packed corpus (default: pack a synthetic one)")
    p.add_argument("--procs", type=int, default=2, help="processes of the distributed fit")
    p.add_argument("--epochs", type=int, default=30, help="fitting epochs (the demo's 30)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each process count")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--encoder", default="efficientnet_lite0", help="model.encoder")
    p.add_argument("--size", type=int, default=128, help="data.train_size (the demo's 128)")
    p.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)  # child processes
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank >= 0:
        return _rank(args)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if not corpus:
            corpus = str(Path(tmp) / "corpus")
            pack = [sys.executable, "-m", "jsm_dist.data.pack", "synth", "--out", corpus]
            pack += ["--num-samples", "480", "--image-size", str(args.size), "--seed", "0"]
            pack += ["--holdout", "0.2"]  # the demo's training split: 384 scenes, 6 shards
            subprocess.run([*pack, "--samples-per-shard", "64"], check=True)
            corpus = str(Path(corpus) / "train")
        rows = []
        for _ in range(args.repeats):
            for procs in (1, args.procs):
                rows.append(run(corpus, procs, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    for procs in (1, args.procs):
        mine = [r for r in rows if r["procs"] == procs]
        best = min(mine, key=lambda r: r["wall_s"])
        print(
            f"{procs} process(es): call {best['wall_s']:.1f} s, fitting {best['fit_s']:.1f} s "
            f"(best of {len(mine)}); rank 0 RSS {best['rss_before_mib']:.0f} MiB before, "
            f"peak {max(r['rss_peak_mib'] for r in mine):.0f} MiB during the call, "
            f"{max(r['rss_fit_peak_mib'] for r in mine):.0f} MiB during the fitting"
        )
    one = min(r["wall_s"] for r in rows if r["procs"] == 1)
    many = min(r["wall_s"] for r in rows if r["procs"] == args.procs)
    fit_one = min(r["fit_s"] for r in rows if r["procs"] == 1)
    fit_many = min(r["fit_s"] for r in rows if r["procs"] == args.procs)
    cpu_one = min(r["fit_cpu_s"] for r in rows if r["procs"] == 1)
    cpu_many = min(r["fit_cpu_s"] for r in rows if r["procs"] == args.procs)
    print(
        f"{args.procs} vs 1 process(es), time ratio (best runs): call {many / one:.2f}, "
        f"fitting {fit_many / fit_one:.2f}; CPU time of the fitting (busiest rank's main "
        f"thread) {cpu_many / cpu_one:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
