"""Checks a training run makes before any compute: damaged shards of the corpus."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import garble_member, make_tiny_corpus

from jsm_dist.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
# settings of a run that would be quick if a check failed to stop it
CHEAP = ["--model.encoder", "tiny", "--model.pretrained", "false", "--model.crf", "false",
         "--data.train_size", "32", "--data.num_workers", "0", "--epochs", "1", "--tau", "0",
         "--max_steps_per_epoch", "1", "--tensorboard", "false"]  # fmt: skip


def test_truncated_shard_is_named_before_any_work(tmp_path: Path) -> None:
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[3, 4, 2])
    path = Path(corpus.shard_paths[1])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jsm_dist.train", "--corpus", str(corpus.root),
           "--out_dir", str(run), *CHEAP]  # fmt: skip
    res = subprocess.run(
        cmd,
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"shard-000001.tar: {len(data) // 2} bytes, corpus.json records {len(data)}" in (
        res.stderr
    )
    assert "shard-000000.tar" not in res.stderr and "shard-000002.tar" not in res.stderr
    assert "Traceback" not in res.stderr
    assert not run.exists()  # nothing was written


def test_garbled_shard_is_named_with_verify_shards(tmp_path: Path, capsys) -> None:
    corpus = make_tiny_corpus(tmp_path, shard_sizes=[3, 4])
    garble_member(corpus.shard_paths[0], "tiny_000_0001.depth.png")  # same size, new bytes
    assert corpus.damaged_shards() == []  # the cheap check cannot see it
    assert corpus.damaged_shards(checksums=True) == [
        "shard-000000.tar: sha256 differs from corpus.json"
    ]
    os.remove(corpus.shard_paths[1])
    assert corpus.damaged_shards() == ["shard-000001.tar: missing"]
    run = tmp_path / "run"
    args = ["--corpus", str(corpus.root), "--out_dir", str(run), "--verify_shards", "true", *CHEAP]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "2 damaged shard(s)" in err and "shard-000000.tar: sha256 differs" in err
    assert not run.exists()
