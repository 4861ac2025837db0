"""Label store under real processes: 2 gloo ranks committing a generation, a rank killed
mid-write, a live rank submitting an incomplete generation, and readers running while
generations are committed.

The rank/reader processes are this file run as a script (see ``_child`` at the bottom).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jsm_dist.labels import LabelStore
from jsm_dist.labels.cli import main as labels_cli
from jsm_dist.launching.command import free_port

SIZES = [
    7,
    3,
    11,
    1,
    5,
]  # 5 shards over 2 ranks: rank 0 owns 0, 2, 4 (23 samples), rank 1 owns 1, 3 (4)
HW = (16, 12)
CHILD_TIMEOUT = 120  # seconds; generous for a loaded 2-core machine


def value(g: int, s: int, i: int) -> int:
    """The label value of sample (s, i) in generation g: differs across all three."""
    return (g * 37 + s * 11 + i * 3) % 256


def fill(store: LabelStore, g: int) -> None:
    """Write and commit generation g in this (single) process."""
    with store.writer(g) as w:
        for s, n in enumerate(store.shard_sizes):
            labels = np.stack(
                [np.full(store.label_size, value(g, s, i), np.uint8) for i in range(n)]
            )
            w.write(s, range(n), labels, np.array([[g, i] for i in range(n)], np.float32))
    store.commit(g)


def check_generation(store: LabelStore, g: int) -> None:
    assert store.generation == g
    for s, n in enumerate(store.shard_sizes):
        for i in range(n):
            lab = store.read(s, i)
            assert lab.min() == lab.max() == value(g, s, i), (g, s, i)
        side = store.read_side(s)
        np.testing.assert_array_equal(side[:, 0], np.full(n, g, np.float32))
        np.testing.assert_array_equal(side[:, 2], np.full(n, g, np.float32))


def launch_ranks(root: Path, mode: str, tmp: Path) -> list[subprocess.Popen]:
    port = str(free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return [
        subprocess.Popen(
            [sys.executable, __file__, "rank", str(root), str(r), "2", port, mode, str(tmp)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]


def wait_all(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    st = LabelStore.create(tmp_path / "labels", SIZES, HW, keep=3)
    fill(st, 0)
    return st


@pytest.mark.slow  # two torch processes
def test_two_ranks_commit_uneven_shards(store: LabelStore, tmp_path: Path) -> None:
    results = wait_all(launch_ranks(store.root, "full", tmp_path))
    for rc, text in results:
        assert rc == 0, text
    reports = [json.loads(text.strip().splitlines()[-1]) for _, text in results]
    assert [r["generation"] for r in reports] == [1, 1]  # both ranks see the commit
    assert sorted(reports[0]["owned"] + reports[1]["owned"]) == list(range(len(SIZES)))
    store.refresh()
    check_generation(store, 1)
    entry = store.manifest["generations"][-1]
    assert entry["generation"] == 1 and entry["world_size"] == 2
    assert labels_cli(["--progress", "off", "fsck", str(store.root), "--all"]) == 0


@pytest.mark.slow  # four torch processes: ~4 s idle, > 10 s on a loaded 2-core machine
def test_rank_killed_mid_write_leaves_previous_generation(
    store: LabelStore, tmp_path: Path
) -> None:
    procs = launch_ranks(store.root, "stall", tmp_path)
    marker = tmp_path / "rank1-stalled"
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not marker.exists():
        assert time.monotonic() < deadline and procs[1].poll() is None, "rank 1 never stalled"
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)  # mid-write: shard 1 half written, nothing closed
    results = wait_all(procs)
    assert results[1][0] == -signal.SIGKILL
    assert results[0][0] != 0, "rank 0 must not report success without its peer"
    # Partial files of generation 1 exist on disk, but nothing follows them.
    assert (store.root / "gen-000001" / "shard-000001.u8").exists()
    store.refresh()
    check_generation(store, 0)
    assert labels_cli(["--progress", "off", "fsck", str(store.root)]) == 0
    # Rerun: the writers restart generation 1 over the debris and commit it.
    for rc, text in wait_all(launch_ranks(store.root, "full", tmp_path)):
        assert rc == 0, text
    store.refresh()
    check_generation(store, 1)
    assert labels_cli(["--progress", "off", "fsck", str(store.root), "--all"]) == 0


@pytest.mark.slow  # two torch processes
def test_incomplete_generation_is_refused_on_every_rank(store: LabelStore, tmp_path: Path) -> None:
    """Rank 1 lives but leaves sample (1, 1) unwritten: the commit must fail on BOTH ranks
    (rank 0 verifies, the others learn it from the outcome broadcast) and change nothing."""
    manifest = (store.root / "manifest.json").read_text()
    gen0 = {p.name: p.read_bytes() for p in store.gen_dir(0).iterdir()}
    results = wait_all(launch_ranks(store.root, "skip", tmp_path))
    for r, (rc, text) in enumerate(results):
        report = json.loads(text.strip().splitlines()[-1])
        assert rc == 1 and report["rank"] == r, text
        assert report["error"] == "IncompleteGenerationError", text
        assert "refusing to commit generation 1" in report["message"], text
        assert "shard 1: 2 of 3 samples written" in report["message"], text
        assert report["generation"] == 0, text  # the manifest as this rank reads it afterwards
    assert json.loads((store.root / "manifest.json").read_text()) == json.loads(manifest)
    assert {p.name: p.read_bytes() for p in store.gen_dir(0).iterdir()} == gen0
    store.refresh()
    check_generation(store, 0)


@pytest.mark.slow  # a reader process beside 40 commits
def test_readers_see_one_generation_per_read_during_commits(tmp_path: Path) -> None:
    """Generation g holds the constant g everywhere. A reader process pins a generation
    (refresh), then reads random samples with two read_many calls; a consistent read means
    every pixel of both calls equals the pinned generation. Commits run meanwhile."""
    st = LabelStore.create(tmp_path / "labels", [40, 25, 33, 40], (48, 48), keep=2)
    commit_constant(st, 0)
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, __file__, "reader", str(st.root), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = reader.stdout.readline()  # the reader has done its first read
        assert ready.strip() == "ready", ready + reader.stderr.read()
        n_commits = 40
        for g in range(1, n_commits + 1):
            commit_constant(st, g)
        stop.touch()
        out, err = reader.communicate(timeout=CHILD_TIMEOUT)
    finally:
        reader.kill() if reader.poll() is None else None
    assert reader.returncode == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["mixed"] == 0, rep
    assert rep["reads"] > 50, rep
    assert len(rep["seen"]) >= 3, rep  # the reader really ran across several commits
    assert max(rep["seen"]) <= n_commits
    assert st.generations == [n_commits - 1, n_commits]  # retention kept 2


def commit_constant(store: LabelStore, g: int) -> None:
    with store.writer(g) as w:
        for s, n in enumerate(store.shard_sizes):
            w.write(s, range(n), np.full((n, *store.label_size), g % 256, np.uint8))
    store.commit(g)


# ---------------------------------------------------------------- child processes
def _rank_main(root: str, rank: int, world: int, port: str, mode: str, tmp: str) -> int:
    from datetime import timedelta

    import torch.distributed as td

    from jsm_dist import dist

    td.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    code = 0
    try:
        store = LabelStore.open(root)
        g = store.generation + 1
        w = store.writer(g)
        owned = [s for s in range(store.num_shards) if dist.owner_of_shard(s, world) == rank]
        for s in owned:
            n = store.shard_sizes[s]
            for i in range(n):  # one sample per call: the way a loader delivers them
                if mode == "skip" and rank == 1 and (s, i) == (1, 1):
                    continue  # a live rank that leaves a sample out
                w.write(s, [i], np.full((1, *store.label_size), value(g, s, i), np.uint8), [[g, i]])
                if mode == "stall" and rank == 1 and i == n // 2:
                    Path(tmp, "rank1-stalled").touch()
                    time.sleep(CHILD_TIMEOUT)  # killed here
        w.close()
        store.commit(g)
        print(json.dumps({"rank": rank, "generation": store.generation, "owned": owned}))
    except Exception as e:  # noqa: BLE001 - report, then exit non-zero
        print(f"rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        gen = LabelStore.open(root).generation
        report = {"rank": rank, "error": type(e).__name__, "message": str(e), "generation": gen}
        print(json.dumps(report), flush=True)
        code = 1
    with contextlib.suppress(Exception):  # a dead peer can make teardown fail
        td.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # docs/platform.md: avoids gloo's sporadic abort at interpreter exit


def _reader_main(root: str, stop: str) -> int:
    from jsm_dist.labels import GenerationGoneError

    store = LabelStore.open(root)
    rng = np.random.default_rng(0)
    shards = np.repeat(np.arange(store.num_shards), store.shard_sizes)
    offsets = np.concatenate([np.arange(n) for n in store.shard_sizes])
    reads = mixed = gone = 0
    seen: set[int] = set()
    while True:
        done = Path(stop).exists()
        store.refresh()
        pick = rng.integers(0, len(shards), 24)
        try:
            first = store.read_many(shards[pick], offsets[pick])
            second = store.read_many(shards[pick[::-1]], offsets[pick[::-1]])
        except GenerationGoneError:
            gone += 1  # fell more than keep-1 commits behind before opening a shard
            continue
        g = store.generation
        values = np.unique(np.concatenate([first.ravel(), second.ravel()]))
        if values.tolist() != [g % 256]:
            mixed += 1
        seen.add(g)
        reads += 1
        if reads == 1:
            print("ready", flush=True)
        if done:
            break
    print(json.dumps({"reads": reads, "mixed": mixed, "gone": gone, "seen": sorted(seen)}))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "rank":
        a = sys.argv[2:]
        _rank_main(a[0], int(a[1]), int(a[2]), a[3], a[4], a[5])
    elif sys.argv[1] == "reader":
        sys.exit(_reader_main(sys.argv[2], sys.argv[3]))
