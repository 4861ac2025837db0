"""The refinement pass under 2 real processes (``accelerate launch``, gloo), uneven shards.

Each rank (this file run as a script, see ``_rank_main`` at the bottom) sets up accelerate
the way the training entry point does (``dist.make_accelerator``) and runs
``refine_labels`` with the stand-in model of tests/refine_stub.py, whose label and
confidences encode (shard, index, generation). The ranks then own different numbers of
samples and batches; the test checks every sample's committed label and side columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import all_ids, label_value, make_tiny_corpus
from refine_stub import check_refined_generation, stub_weights

from jsm_dist.labels import LabelStore
from jsm_dist.launching.command import LaunchConfig, build_command, build_env, free_port

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SHARDS = (5, 3, 7, 1, 4)  # rank 0 owns shards 0, 2, 4 (16 samples), rank 1 owns 1, 3 (4)
TIMEOUT = 240  # seconds; generous for a loaded 2-core machine


def test_two_ranks_refine_every_sample_once_with_its_own_label(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=SHARDS, size=32, label_size=16)
    store = LabelStore.open(corpus.label_dir)
    gen0 = {p.name: p.read_bytes() for p in store.gen_dir(0).iterdir()}
    cfg = LaunchConfig(
        mode="cpu",
        procs_per_node=2,
        main_process_port=free_port(),
        train_target=__file__,
        train_args=(str(corpus.root), str(tmp_path)),
        accelerate_bin=str(Path(sys.executable).with_name("accelerate")),
    )
    env = build_env(cfg)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    cmd = build_command(cfg)
    res = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    check_refined_generation(store, 1)
    assert store.manifest["generations"][-1]["world_size"] == 2
    assert {p.name: p.read_bytes() for p in store.gen_dir(0).iterdir()} == gen0
    seen = [tuple(x) for rec in ranks for x in rec["seen"]]
    assert sorted(seen) == sorted((s, i, label_value(s, i)) for s, i in all_ids(corpus))
    for r, rec in enumerate(ranks):
        assert rec["world"] == [r, 2]
        assert {s for s, _, _ in rec["seen"]} == {s for s in range(len(SHARDS)) if s % 2 == r}
        # every rank reports the committed generation and the statistics over both ranks
        assert rec["store_generation"] == rec["stats_generation"] == 1
        assert rec["samples"] == corpus.num_samples
    w_g = np.mean([stub_weights(s, i, 1)[0] for s, i in all_ids(corpus)])
    assert ranks[0]["w_g_mean"] == ranks[1]["w_g_mean"] == pytest.approx(w_g)


# ---------------------------------------------------------------- the ranks
def _rank_main(corpus_dir: str, out_dir: str) -> None:
    from refine_stub import IdModel, data_config

    from jsm_dist import dist
    from jsm_dist.data.corpus import Corpus
    from jsm_dist.refine.refinement import refine_labels

    accelerator = dist.make_accelerator()  # gloo on CPU; fails when the world is not 2
    world = dist.world_info()
    corpus = Corpus.load(corpus_dir)
    store = LabelStore.open(corpus.label_dir)
    model = IdModel(generation=store.generation + 1)
    # two loader workers: the samples of a rank arrive interleaved from two shard groups
    stats = refine_labels(model, corpus, store, data_config(num_workers=2), progress=False)
    record = {
        "world": [world.rank, world.world_size],
        "seen": model.seen,
        "samples": stats.samples,
        "stats_generation": stats.generation,
        "store_generation": store.generation,
        "w_g_mean": stats.w_g_mean,
    }
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    code = 0
    try:
        _rank_main(sys.argv[1], sys.argv[2])
    except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # docs/platform.md: gloo processes may abort at interpreter shutdown otherwise
