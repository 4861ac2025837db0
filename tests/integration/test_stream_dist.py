"""Streaming loaders under 2 real gloo processes (2 loader workers each), uneven shards.

Each rank (this file run as a script, see ``_rank`` at the bottom) takes the world from the
initialised process group, streams the evaluation loader and gathers the sample ids, then
runs one training epoch with an all-reduce after every batch: unequal batch counts would
hang it (the test's timeout) instead of passing silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jsm_dist.launching.command import free_port

TIMEOUT = 240  # seconds; generous for a loaded 2-core machine


@pytest.mark.slow
def test_two_processes_exactly_once_eval_and_equal_train_steps(tmp_path):
    from helpers import all_ids, make_tiny_corpus

    corpus = make_tiny_corpus(tmp_path, shard_sizes=[9, 2, 6, 1, 5, 3, 4])
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONUNBUFFERED": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(corpus.root), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("ranks did not finish: a hang (unequal batch counts?)")
        outputs.append(out)
        assert p.returncode == 0, out[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    eval_ids = [tuple(x) for r in results for x in r["eval_ids"]]
    assert len(eval_ids) == len(set(eval_ids)) == corpus.num_samples
    assert set(eval_ids) == all_ids(corpus)
    for r, res in enumerate(results):
        assert res["world"] == [r, 2]
        assert all(s % 2 == r for s, _ in res["eval_ids"])  # owner rule
        # 30 samples over 2 ranks x 4: 4 steps, the last one 3 + 3
        assert res["train_batches"] == res["train_len"] == 4
        assert res["eval_skipped"] == 0 and res["train_skipped"] == 0
    train_ids = [tuple(x) for r in results for x in r["train_ids"]]
    assert sorted(train_ids) == sorted(all_ids(corpus))  # one epoch: every sample once


def _rank(corpus_dir: str, out_dir: str) -> None:
    import torch
    import torch.distributed as td

    from jsm_dist import dist
    from jsm_dist.data.corpus import Corpus
    from jsm_dist.data.stream import DataConfig, make_eval_loader, make_train_loader

    td.init_process_group("gloo")
    world = dist.world_info()
    corpus = Corpus.load(corpus_dir)
    cfg = DataConfig(train_size=32, batch_size=4, num_workers=2, shuffle_buffer=8)
    ev = make_eval_loader(corpus, cfg)  # world from the process group
    ids = [(int(s), int(i)) for b in ev for s, i in zip(b["shard"], b["index"])]
    tr = make_train_loader(corpus, cfg, epoch=0, seed=1)
    n = 0
    train_ids = []
    for b in tr:
        train_ids += [(int(s), int(i)) for s, i in zip(b["shard"], b["index"])]
        t = torch.ones(1)
        td.all_reduce(t)  # a collective per step, as DDP does
        n += 1
    td.barrier()
    record = {
        "world": [world.rank, world.world_size],
        "eval_ids": ids,
        "eval_skipped": ev.stats["skipped"],
        "train_batches": n,
        "train_len": len(tr),
        "train_ids": train_ids,
        "train_skipped": tr.stats["skipped"],
    }
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(record))
    td.destroy_process_group()


if __name__ == "__main__":
    code = 0
    try:
        _rank(sys.argv[1], sys.argv[2])
    except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # docs/platform.md: gloo processes may abort at interpreter shutdown otherwise
