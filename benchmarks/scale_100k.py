"""Scale check: pack, load and refine a 100k-scene corpus on 2 ranks, against a 10k one.

    python -m benchmarks.scale_100k [--samples 100000] [--small 10000] [--image-size 64]
                                    [--ranks 2] [--work DIR] [--keep] [--json FILE]

For each corpus size (``--small`` first, then ``--samples``) one run does:

1. **pack**: ``jsm-pack synth`` (``python -m jsm_dist.data.pack``) with ``--pack-workers``
   processes (the packer's own pool, one shard per task). Reported: samples/s of wall
   time, and samples per CPU-second of the packer and its pool (getrusage of the
   children), i.e. the rate of one fully used core.
2. **loader**: one epoch of ``make_train_loader`` (weak-mode training: augmentation on, no
   GT decode) on ``--ranks`` processes joined in a gloo group, each rank iterating its
   ``len()`` batches; samples/s over all ranks (the slowest rank's wall time).
3. **refine**: one ``refine_labels`` pass over every sample (generation 0 -> 1) on
   ``--ranks`` gloo processes with a small real model: ``JSMModel`` with the ``tiny``
   encoder, random init, the tiny text network, CRF off, no text fitting. Reported: the
   pass's wall time per sample (slowest rank) and CPU time per sample (both ranks and their
   loader workers; steadier on a shared machine), its parts on rank 0 (the batch loop, the
   writer's close: fsync + per-shard records, the commit call: barriers + rank 0's check of
   every shard + manifest, and statistics), rank 0's own commit work alone, and per rank
   the peak RSS of the rank process during the pass (``VmHWM`` after a reset at its start)
   and of its loader workers (``ru_maxrss`` of the children).
4. **disk**: bytes per sample of the shards, of one label-store generation, and of the
   whole label store (generations 0 and 1).

The goals printed at the end: refinement time per sample and peak RSS per rank at the
large size within 10% of the small one (linear time, flat memory). Every process runs on
one torch thread (``--threads``). The machine may be shared: read the load average
printed with each phase, and compare the two sizes of one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.procstat import children_cpu_s, children_peak_kib, memory_kib, reset_peak
from jsm_dist.launching.command import free_port

GOAL = 0.10  # the large corpus may cost at most 10% more per sample (time, memory per rank)


# ---- one rank of a phase (a child process) --------------------------------------------
def _data_config(args: argparse.Namespace):
    from jsm_dist.data.stream import DataConfig

    return DataConfig(
        train_size=args.image_size, batch_size=args.batch, num_workers=args.loader_workers
    )


def _timed(obj, name: str, spent: dict[str, float], on_start: Callable | None = None) -> None:
    """Wrap method ``name`` of the instance ``obj`` so that its wall time adds up in
    ``spent[name]`` (a measuring hook: the library code stays as it runs in training)."""
    inner = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        if on_start is not None:
            on_start(t)
        try:
            return inner(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def _loader_phase(args: argparse.Namespace, corpus) -> dict:
    from jsm_dist import dist
    from jsm_dist.data.stream import make_train_loader

    loader = make_train_loader(
        corpus, _data_config(args), epoch=0, seed=0, world=dist.world_info(), read_gt=False
    )
    dist.barrier()
    reset_peak()
    t0 = time.perf_counter()
    samples = batches = 0
    for batch in loader:
        samples += int(batch["rgb"].shape[0])
        batches += 1
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "samples": samples, "batches": batches}


def _refine_phase(args: argparse.Namespace, corpus) -> dict:
    import torch

    from jsm_dist import dist
    from jsm_dist.labels import LabelStore
    from jsm_dist.models import JSMModel, ModelConfig
    from jsm_dist.refine.refinement import refine_labels

    torch.manual_seed(0)  # the same model on every rank
    model = JSMModel(ModelConfig(encoder="tiny", pretrained=False, crf=False), corpus.vocab)
    store = LabelStore.open(corpus.label_dir)
    spent: dict[str, float] = {}
    marks: dict[str, float] = {}

    def timed_writer(*a, **k):
        writer = make_writer(*a, **k)
        _timed(writer, "close", spent, on_start=loop_done)
        return writer

    def loop_done(t: float) -> None:
        marks.setdefault("close", t)
        # descriptors open at the end of the batch loop: the writer holds one per shard
        marks["open_fds"] = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc") else -1

    make_writer = store.writer
    store.writer = timed_writer
    _timed(store, "commit", spent)
    _timed(store, "_commit_as_rank0", spent)  # rank 0's own work: verify + manifest
    _timed(store, "prune", spent)
    dist.barrier()
    reset_peak()
    rss_before = memory_kib("VmRSS")
    cpu0, workers0, t0 = time.process_time(), children_cpu_s(), time.perf_counter()
    stats = refine_labels(model, corpus, store, _data_config(args), progress=False)
    wall = time.perf_counter() - t0
    cpu, workers_cpu = time.process_time() - cpu0, children_cpu_s() - workers0
    store.refresh()
    close_s, commit_s = spent.get("close", 0.0), spent.get("commit", 0.0)
    loop_s = marks.get("close", t0 + wall) - t0
    return {
        "wall_s": wall,
        "cpu_s": cpu,  # this rank's process (all its threads)
        "workers_cpu_s": workers_cpu,  # its loader workers
        "samples": stats.samples,
        "generation": store.generation,
        "commit_world_size": store.manifest["generations"][-1]["world_size"],
        "open_fds_end_of_loop": marks.get("open_fds", -1),
        "loop_s": loop_s,
        "close_s": close_s,
        "commit_s": commit_s,
        "commit_rank0_s": spent.get("_commit_as_rank0", 0.0),
        "prune_s": spent.get("prune", 0.0),
        "stats_s": wall - loop_s - close_s - commit_s,
        "rss_before_mib": rss_before / 1024,
    }


def _rank_main(args: argparse.Namespace) -> int:
    """One rank of one phase: joins the group, runs it, writes its record to ``args.out``."""
    import torch
    import torch.distributed as td

    from jsm_dist.data.corpus import Corpus

    torch.set_num_threads(args.threads)
    if args.world > 1:
        td.init_process_group("gloo", rank=args.rank, world_size=args.world)
    corpus = Corpus.load(args.corpus)
    phase = {"loader": _loader_phase, "refine": _refine_phase}[args.phase]
    record = phase(args, corpus)
    record.update(
        rank=args.rank,
        rss_peak_mib=memory_kib("VmHWM") / 1024,
        workers_peak_mib=children_peak_kib() / 1024,
    )
    Path(args.out).write_text(json.dumps(record))
    if args.world > 1:
        td.barrier()
        td.destroy_process_group()
    return 0


# ---- the parent: phases, figures, table -----------------------------------------------
def _run_ranks(args: argparse.Namespace, phase: str, corpus: Path, tmp: Path) -> list[dict]:
    """Start ``args.ranks`` processes of ``phase`` and return their records (rank order)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(args.ranks),
    }
    outs = [tmp / f"{phase}_{corpus.name}_r{r}.json" for r in range(args.ranks)]
    base = [sys.executable, "-m", "benchmarks.scale_100k", "--phase", phase]
    base += ["--corpus", str(corpus), "--world", str(args.ranks), "--threads", str(args.threads)]
    base += ["--image-size", str(args.image_size), "--batch", str(args.batch)]
    base += ["--loader-workers", str(args.loader_workers)]
    children = [
        subprocess.Popen(
            [*base, "--rank", str(r), "--out", str(outs[r])],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(args.ranks)
    ]
    codes = [c.wait() for c in children]
    if any(codes) or not all(o.is_file() for o in outs):
        raise SystemExit(f"{phase} on {corpus} failed (exit codes {codes})")
    return [json.loads(o.read_text()) for o in outs]


def _disk_bytes(path: Path) -> int:
    """Bytes the files under ``path`` occupy on disk (allocated blocks, like ``du``)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _pack(args: argparse.Namespace, n: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "jsm_dist.data.pack", "synth", "--out", str(out)]
    cmd += ["--num-samples", str(n), "--image-size", str(args.image_size), "--seed", "0"]
    cmd += ["--workers", str(args.pack_workers), "--depth-convention", args.depth_convention]
    cmd += ["--samples-per-shard", str(args.samples_per_shard), "--no-progress", "--overwrite"]
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-4000:])
        raise SystemExit(f"packing {n} scenes failed (exit {res.returncode})")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "samples_per_s": n / wall,
        "samples_per_cpu_s": n / cpu,
        "workers": args.pack_workers,
        "load": os.getloadavg()[0],
    }


def measure(args: argparse.Namespace, n: int, work: Path) -> dict:
    """Pack an ``n``-scene corpus in ``work`` and run the loader and refinement phases."""
    from jsm_dist.data.corpus import Corpus

    root = work / f"synth{n}"
    row: dict = {"samples": n}
    print(f"[{n}] packing ...", flush=True)
    row["pack"] = _pack(args, n, root)
    corpus = Corpus.load(root)
    if corpus.num_samples != n:
        raise SystemExit(f"packed {corpus.num_samples} of {n} scenes (see corpus.json)")
    shards = sum(_disk_bytes(root / s.file) for s in corpus.shards)
    gen0 = _disk_bytes(corpus.label_dir / "gen-000000")
    print(f"[{n}] loader epoch on {args.ranks} rank(s) ...", flush=True)
    ranks = _run_ranks(args, "loader", root, work)
    wall = max(r["wall_s"] for r in ranks)
    row["loader"] = {
        "wall_s": wall,
        "samples": sum(r["samples"] for r in ranks),
        "samples_per_rank": [r["samples"] for r in ranks],
        "samples_per_s": sum(r["samples"] for r in ranks) / wall,
        "rss_peak_mib": [r["rss_peak_mib"] for r in ranks],
        "workers_peak_mib": [r["workers_peak_mib"] for r in ranks],
        "load": os.getloadavg()[0],
    }
    print(f"[{n}] refinement pass on {args.ranks} rank(s) ...", flush=True)
    ranks = _run_ranks(args, "refine", root, work)
    wall = max(r["wall_s"] for r in ranks)
    r0 = ranks[0]
    row["refine"] = {
        "wall_s": wall,
        "ms_per_sample": 1000 * wall / n,
        # CPU time of both ranks and their loader workers: steadier than wall time when
        # other work shares the cores
        "cpu_ms_per_sample": 1000 * sum(r["cpu_s"] + r["workers_cpu_s"] for r in ranks) / n,
        "samples": r0["samples"],
        "generation": r0["generation"],
        "commit_world_size": r0["commit_world_size"],
        "open_fds_end_of_loop": [r["open_fds_end_of_loop"] for r in ranks],
        "rank0_parts_s": {k: r0[k] for k in ("loop_s", "close_s", "commit_s", "stats_s")},
        "commit_s": max(r["commit_s"] for r in ranks),
        "commit_rank0_s": r0["commit_rank0_s"],
        "prune_s": r0["prune_s"],
        "rss_before_mib": [r["rss_before_mib"] for r in ranks],
        "rss_peak_mib": [r["rss_peak_mib"] for r in ranks],
        "workers_peak_mib": [r["workers_peak_mib"] for r in ranks],
        "load": os.getloadavg()[0],
    }
    store = _disk_bytes(corpus.label_dir)
    row["disk"] = {
        "shards_bytes_per_sample": shards / n,
        "label_generation_bytes_per_sample": gen0 / n,
        "label_store_bytes_per_sample": store / n,
        "shards": len(corpus.shards),
    }
    return row


def compare(small: dict, large: dict) -> dict:
    """Large-vs-small ratios of the per-sample and per-rank figures, and the goals."""
    t = large["refine"]["ms_per_sample"] / small["refine"]["ms_per_sample"]
    cpu = large["refine"]["cpu_ms_per_sample"] / small["refine"]["cpu_ms_per_sample"]
    loop = (large["refine"]["rank0_parts_s"]["loop_s"] / large["samples"]) / (
        small["refine"]["rank0_parts_s"]["loop_s"] / small["samples"]
    )
    rss = max(large["refine"]["rss_peak_mib"]) / max(small["refine"]["rss_peak_mib"])
    workers = max(large["refine"]["workers_peak_mib"]) / max(small["refine"]["workers_peak_mib"])
    return {
        "refine_time_per_sample": t,
        "refine_loop_time_per_sample": loop,
        "refine_cpu_time_per_sample": cpu,
        "refine_rss_peak_per_rank": rss,
        "refine_workers_rss_peak": workers,
        "loader_samples_per_s": large["loader"]["samples_per_s"] / small["loader"]["samples_per_s"],
        "time_goal_met": t <= 1 + GOAL,
        "memory_goal_met": rss <= 1 + GOAL,
    }


def table(rows: list[dict], ratios: dict | None) -> str:
    """The figures as a fixed-width text table (one column per corpus size)."""

    def mib(xs: list[float]) -> str:
        return "/".join(f"{x:.0f}" for x in xs)

    lines = [
        ("samples", lambda r: f"{r['samples']}"),
        ("pack samples/s (wall)", lambda r: f"{r['pack']['samples_per_s']:.1f}"),
        ("pack samples/s per core", lambda r: f"{r['pack']['samples_per_cpu_s']:.1f}"),
        ("loader epoch samples/s", lambda r: f"{r['loader']['samples_per_s']:.0f}"),
        ("refine wall s", lambda r: f"{r['refine']['wall_s']:.1f}"),
        ("refine ms/sample", lambda r: f"{r['refine']['ms_per_sample']:.3f}"),
        ("refine CPU ms/sample", lambda r: f"{r['refine']['cpu_ms_per_sample']:.3f}"),
        ("  rank 0 loop s", lambda r: f"{r['refine']['rank0_parts_s']['loop_s']:.1f}"),
        ("  rank 0 writer close s", lambda r: f"{r['refine']['rank0_parts_s']['close_s']:.2f}"),
        ("  commit call s", lambda r: f"{r['refine']['commit_s']:.2f}"),
        ("  rank 0 commit work s", lambda r: f"{r['refine']['commit_rank0_s']:.3f}"),
        ("  rank 0 statistics s", lambda r: f"{r['refine']['rank0_parts_s']['stats_s']:.2f}"),
        ("refine peak RSS MiB/rank", lambda r: mib(r["refine"]["rss_peak_mib"])),
        ("refine workers peak MiB", lambda r: mib(r["refine"]["workers_peak_mib"])),
        ("open fds end of loop/rank", lambda r: mib(r["refine"]["open_fds_end_of_loop"])),
        ("loader peak RSS MiB/rank", lambda r: mib(r["loader"]["rss_peak_mib"])),
        ("shards bytes/sample", lambda r: f"{r['disk']['shards_bytes_per_sample']:.0f}"),
        (
            "labels bytes/sample/gen",
            lambda r: f"{r['disk']['label_generation_bytes_per_sample']:.0f}",
        ),
        ("label store bytes/sample", lambda r: f"{r['disk']['label_store_bytes_per_sample']:.0f}"),
        ("load avg (after refine)", lambda r: f"{r['refine']['load']:.1f}"),
    ]
    out = [f"{'':<26}" + "".join(f"{r['samples']:>14}" for r in rows)]
    out += [f"{name:<26}" + "".join(f"{fmt(r):>14}" for r in rows) for name, fmt in lines[1:]]
    if ratios:
        out.append("large vs small (per sample / per rank):")
        for key in (
            "refine_time_per_sample",
            "refine_loop_time_per_sample",
            "refine_cpu_time_per_sample",
            "refine_rss_peak_per_rank",
            "refine_workers_rss_peak",
            "loader_samples_per_s",
        ):
            out.append(f"  {key:<30} {ratios[key]:.3f}")
        out.append(
            f"  goals (within {GOAL:.0%}): time {'met' if ratios['time_goal_met'] else 'missed'}, "
            f"memory {'met' if ratios['memory_goal_met'] else 'missed'}"
        )
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_100k", description=__doc__.split("\n")[0]
    )
    p.add_argument("--samples", type=int, default=100_000, help="scenes of the large corpus")
    p.add_argument("--small", type=int, default=10_000, help="scenes of the reference corpus")
    p.add_argument("--image-size", type=int, default=64, help="scene side = train size, px")
    p.add_argument("--ranks", type=int, default=2, help="processes of the loader and refine")
    p.add_argument("--samples-per-shard", type=int, default=256, help="jsm-pack option")
    p.add_argument("--pack-workers", type=int, default=2, help="jsm-pack --workers")
    p.add_argument(
        "--depth-convention",
        default="near_is_large",
        help="jsm-pack --depth-convention (the generator's own is near_is_large; auto adds "
        "the per-sample orientation decision to the packing cost)",
    )
    p.add_argument("--loader-workers", type=int, default=1, help="loader processes per rank")
    p.add_argument("--batch", type=int, default=32, help="batch size per rank")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--work", default="", help="working directory (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the corpora in the work dir")
    p.add_argument("--json", default="", help="write the figures here (default: WORK/scale.json)")
    # one rank of a phase (the parent starts these)
    p.add_argument("--phase", choices=("loader", "refine"), help=argparse.SUPPRESS)
    p.add_argument("--corpus", default="", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.phase:
        return _rank_main(args)
    if args.small >= args.samples:
        raise SystemExit(f"--small ({args.small}) must be below --samples ({args.samples})")
    work = Path(args.work or tempfile.mkdtemp(prefix="jsm-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in (args.small, args.samples):
            rows.append(measure(args, n, work))
            print(table(rows, None), flush=True)
            if not args.keep:
                shutil.rmtree(work / f"synth{n}", ignore_errors=True)
        ratios = compare(rows[0], rows[1])
        result = {
            "command": " ".join(["python -m benchmarks.scale_100k", *(argv or sys.argv[1:])]),
            "settings": {k: v for k, v in vars(args).items() if k not in {"phase", "out"}},
            "rows": rows,
            "large_vs_small": ratios,
            "cpus": os.cpu_count(),
        }
        json_path = Path(args.json) if args.json else work / "scale.json"
        json_path.write_text(json.dumps(result, indent=1))
        print(table(rows, ratios))
        print(f"figures: {json_path}")
    finally:
        if not args.keep and not args.work and not args.json:
            print(f"(work dir {work} kept for its scale.json)")
        elif not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
