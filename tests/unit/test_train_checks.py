"""Up-front checks of ``jsm_dist.train.main``: bad input ends with exit code 2 and one line
on stderr before any process group exists; questionable settings are logged before work.

``main`` is called in-process. Where a check must let the run go on, ``run`` is replaced by
a recorder: what is tested is what ``main`` does before it.
"""

from __future__ import annotations

import logging

import pytest
from helpers import make_tiny_corpus

from jsm_dist import train

SHARDS = (9, 5, 7, 3)  # 24 samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), shard_sizes=SHARDS, size=32)


@pytest.fixture
def no_launcher_env(monkeypatch):
    """A plain single process, whatever the shell that runs the tests has set."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "JSM_USE_SLURM_RANKS"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def runs(monkeypatch) -> list:
    """Replace ``train.run``: the configs main would have started, in order."""
    started: list = []
    monkeypatch.setattr(train, "run", started.append)
    return started


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # no traceback, no second line
    assert lines[0].startswith("jsm_dist.train: error: "), err
    return lines[0]


def test_malformed_yaml_is_one_line_with_its_position(tmp_path, capsys, runs):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  tau: [1, 2\n")
    assert train.main(["--config", str(bad)]) == 2
    line = one_line_error(capsys)
    assert f"{bad}: invalid YAML at line 4" in line and "started at line 3, column 8" in line
    assert runs == []


def test_malformed_json_is_one_line_with_its_position(tmp_path, capsys, runs):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {"epochs": 3,}}')
    assert train.main(["--config", str(bad)]) == 2
    line = one_line_error(capsys)
    assert f"{bad}: invalid JSON at line 1, column 24" in line
    assert runs == []


def test_resume_from_a_missing_directory(corpus, tmp_path, capsys, runs, no_launcher_env):
    missing = tmp_path / "run" / "checkpoints" / "step-00000099"
    argv = ["--corpus", str(corpus.root), "--out_dir", str(tmp_path / "run")]
    assert train.main([*argv, "--resume", str(missing)]) == 2
    line = one_line_error(capsys)
    assert f"--resume {missing}" in line and "no such directory" in line and "latest" in line
    assert runs == []


def test_resume_from_an_incomplete_checkpoint(corpus, tmp_path, capsys, runs, no_launcher_env):
    partial = tmp_path / "run" / "checkpoints" / "step-00000004.tmp"
    partial.mkdir(parents=True)  # a checkpoint being written when the run died
    argv = ["--corpus", str(corpus.root), "--out_dir", str(tmp_path / "run")]
    assert train.main([*argv, "--resume", str(partial)]) == 2
    line = one_line_error(capsys)
    assert str(partial) in line and "train_state.json" in line
    assert runs == []


def test_init_generation_the_corpus_store_lacks(corpus, tmp_path, capsys, runs, no_launcher_env):
    argv = ["--corpus", str(corpus.root), "--out_dir", str(tmp_path / "run")]
    assert train.main([*argv, "--init_generation", "5"]) == 2
    line = one_line_error(capsys)
    assert "no generation 5" in line and "train.init_generation" in line and "[0]" in line
    assert runs == []
    # resuming: the run's own store exists, the corpus generation is not read again
    done = tmp_path / "run" / "checkpoints" / "step-00000003"
    done.mkdir(parents=True)
    (done / "train_state.json").write_text("{}")
    assert train.main([*argv, "--init_generation", "5", "--resume", "latest"]) == 0
    assert len(runs) == 1


def test_fewer_nonempty_shards_than_ranks(tmp_path, capsys, runs, monkeypatch):
    small = make_tiny_corpus(tmp_path / "c", shard_sizes=(3, 0, 2))  # 2 non-empty shards
    monkeypatch.setenv("RANK", "0")  # as accelerate launch / torchrun set them, before
    monkeypatch.setenv("WORLD_SIZE", "3")  # any process group exists
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    argv = ["--corpus", str(small.root), "--out_dir", str(tmp_path / "run")]
    assert train.main(argv) == 2
    line = one_line_error(capsys)
    assert "2 non-empty shards for 3 ranks" in line
    assert runs == []


def test_batch_larger_than_the_corpus_per_rank_is_logged(
    corpus, tmp_path, caplog, runs, monkeypatch
):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--corpus", str(corpus.root), "--out_dir", str(tmp_path / "run")]
    with caplog.at_level(logging.WARNING, logger="jsm_dist.train"):
        assert train.main([*argv, "--data.batch_size", "16"]) == 0
    assert len(runs) == 1  # a warning, not a refusal
    text = caplog.text
    assert "data.batch_size=16 x 2 ranks" in text and "24 samples" in text
    assert "each epoch is 1 step" in text and "--data.batch_size 12 or less" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jsm_dist.train"):
        assert train.main([*argv, "--data.batch_size", "12"]) == 0  # exactly one step each
    assert "batch_size" not in caplog.text
    # shards of 20 + 4 samples: ranks take their batches from the epoch's order, not from
    # whole shards of their own, so 2 ranks x 8 <= 24 needs no warning
    uneven = make_tiny_corpus(tmp_path / "u", shard_sizes=(20, 4))
    argv = ["--corpus", str(uneven.root), "--out_dir", str(tmp_path / "run2")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jsm_dist.train"):
        assert train.main([*argv, "--data.batch_size", "8"]) == 0
    assert "batch_size" not in caplog.text


def test_resume_latest_without_checkpoint_says_it_starts_fresh(
    corpus, tmp_path, caplog, runs, no_launcher_env
):
    argv = ["--corpus", str(corpus.root), "--out_dir", str(tmp_path / "run"), "--resume", "latest"]
    with caplog.at_level(logging.INFO, logger="jsm_dist.train"):
        assert train.main(argv) == 0
    assert "no complete checkpoint" in caplog.text and "starting fresh" in caplog.text
    assert str(tmp_path / "run" / "checkpoints") in caplog.text
    assert len(runs) == 1
