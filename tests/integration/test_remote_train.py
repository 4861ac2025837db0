"""A real 2-process training run (gloo, ``accelerate launch``) whose shards come from a
loopback HTTP server that drops one connection mid-shard, against the same run from the
local corpus: same steps, same losses, the same labels committed by its refinement."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_corpus
from shard_server import ShardServer

from jsm_dist.labels import LabelStore
from jsm_dist.launching.command import local_launch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHARDS = (9, 5, 7, 3)
ARGS = ["--model.encoder", "tiny", "--model.pretrained", "false", "--model.crf", "false",
        "--data.train_size", "32", "--data.batch_size", "4", "--data.num_workers", "1",
        "--tensorboard", "false", "--seed", "3", "--epochs", "1", "--tau", "1",
        "--text_fit_epochs", "1"]  # fmt: skip


def train(corpus: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd, env = local_launch(2, [*ARGS, "--corpus", str(corpus), "--out_dir", str(run), *extra])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("JSM_FAULT", None)
    res = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def labels(run: Path) -> np.ndarray:
    store = LabelStore.open(run / "labels")
    return np.stack([store.read(s, i) for s, n in enumerate(store.shard_sizes) for i in range(n)])


def test_training_from_an_http_server_matches_the_local_corpus(tmp_path):
    corpus = make_tiny_corpus(tmp_path, shard_sizes=SHARDS, size=32)
    train(corpus.root, tmp_path / "local")
    # what a user keeps after uploading the shards: corpus.json and labels/, no tar here
    view = tmp_path / "view"
    view.mkdir()
    shutil.copy(corpus.root / "corpus.json", view)
    shutil.copytree(corpus.label_dir, view / "labels")
    drop = corpus.shards[2].file
    with ShardServer(corpus.root, drop_once=(drop,)) as server:
        res = train(view, tmp_path / "remote", "--data.shard_base", server.url,
                    "--data.shard_retry_wait", "0.05")  # fmt: skip
    assert server.dropped == [drop] and "retry 1" in res.stdout + res.stderr
    assert set(server.requests) == {s.file for s in corpus.shards}  # every shard came from it
    local, remote = events(tmp_path / "local"), events(tmp_path / "remote")
    done = [[e for e in ev if e.get("name") == "done"][-1] for ev in (local, remote)]
    assert done[0]["steps_per_rank"] == done[1]["steps_per_rank"] == [3, 3]
    refines = [[e for e in ev if e.get("name") == "refine"] for ev in (local, remote)]
    assert [r["generation"] for r in refines[1]] == [1]
    # the refinement pass read every sample exactly once, as locally
    assert refines[1][0]["samples"] == refines[0][0]["samples"] == sum(SHARDS)
    assert refines[1][0]["text_fit"]["samples"] == sum(SHARDS)
    steps = [
        {e["step"]: e["loss"] for e in ev if e.get("kind") == "step"} for ev in (local, remote)
    ]
    assert sorted(steps[1]) == sorted(steps[0]) == [1, 2, 3]
    for step, loss in steps[0].items():  # the same batches, in the same order
        assert steps[1][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    np.testing.assert_array_equal(labels(tmp_path / "remote"), labels(tmp_path / "local"))
