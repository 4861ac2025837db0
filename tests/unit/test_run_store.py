"""A training run's own label store: a start never destroys labels it does not own.

One real (tiny, 1-process) training run makes the store; the label tools and the trainer
are then driven through their main() functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_tiny_corpus

from jsm_dist.config import TrainConfig
from jsm_dist.labels import LabelStore
from jsm_dist.labels.cli import main as labels_main
from jsm_dist.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
SIZES = (3, 2)
TINY = ["--model.encoder", "tiny", "--model.pretrained", "false", "--model.crf", "false",
        "--data.train_size", "32", "--data.batch_size", "2", "--data.num_workers", "0",
        "--tensorboard", "false", "--image_grid_samples", "0", "--epochs", "1",
        "--max_steps_per_epoch", "1"]  # fmt: skip


def labels_cli(*args) -> int:
    return labels_main(["--progress", "off", *map(str, args)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(corpus, run directory) of a finished run: generation 0 seeded, generation 1 refined."""
    tmp = tmp_path_factory.mktemp("runstore")
    corpus = make_tiny_corpus(tmp, shard_sizes=SIZES)
    run = tmp / "run"
    cmd = [sys.executable, "-m", "jsm_dist.train", "--corpus", str(corpus.root), "--out_dir",
           str(run), "--tau", "1", *TINY]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                         timeout=600, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert LabelStore.open(run / "labels").generations == [0, 1]
    return corpus, run


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if
            p.is_file() and p.name != ".lock"}  # fmt: skip


# ---- starting a run never destroys labels -----------------------------------------------------
def test_new_run_refuses_an_existing_store(trained, tmp_path, capsys) -> None:
    corpus, run = trained
    before = snapshot(run / "labels")
    new = tmp_path / "new"
    args = ["--corpus", str(corpus.root), *TINY]
    assert train_main([*args, "--out_dir", str(new), "--label_store", str(run / "labels")]) == 2
    err = capsys.readouterr().err
    assert f"a label store already exists at {run / 'labels'}" in err
    assert "--resume latest" in err and "another --out_dir" in err
    assert train_main([*args, "--out_dir", str(run)]) == 2  # the same out_dir, no --resume
    assert f"a label store already exists at {run / 'labels'}" in capsys.readouterr().err
    assert snapshot(run / "labels") == before
    assert not new.exists()


def test_the_corpus_store_is_never_a_run_store(trained, tmp_path, capsys) -> None:
    corpus, _ = trained
    before = snapshot(corpus.label_dir)
    args = ["--corpus", str(corpus.root), "--out_dir", str(tmp_path / "r"), *TINY]
    assert train_main([*args, "--label_store", str(corpus.label_dir)]) == 2
    err = capsys.readouterr().err
    assert f"train.label_store {corpus.label_dir} is the corpus's own label store" in err
    assert "--train.label_store corpus" in err
    assert snapshot(corpus.label_dir) == before
    assert LabelStore.open(corpus.label_dir).has_generation(0)


def test_resume_with_a_corpus_of_other_samples_is_refused(trained, tmp_path, capsys) -> None:
    _, run = trained
    before = snapshot(run / "labels")
    other = make_tiny_corpus(tmp_path, shard_sizes=SIZES, key_prefix="other", name="other")
    args = ["--corpus", str(other.root), "--out_dir", str(run), "--resume", "latest", *TINY]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "the store belongs to another corpus" in err
    assert "'tiny_000_0000'" in err and "'other_000_0000'" in err
    assert snapshot(run / "labels") == before


def test_plan_reseeds_only_its_own_store_before_a_first_checkpoint(trained, tmp_path) -> None:
    from jsm_dist.labels.runstore import plan_label_store

    corpus, run = trained
    own = TrainConfig(corpus=str(corpus.root), out_dir=str(run), resume="latest")
    plan = plan_label_store(own, corpus, resuming=False)  # as if no checkpoint were there
    assert plan.action == "seed" and plan.overwrite and plan.root == run / "labels"
    assert plan_label_store(own, corpus, resuming=True).action == "open"
    foreign = TrainConfig(corpus=str(corpus.root), out_dir=str(tmp_path / "x"), resume="latest",
                          label_store=str(run / "labels"))  # fmt: skip
    with pytest.raises(ValueError, match="already exists"):
        plan_label_store(foreign, corpus, resuming=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no label store"):
        plan_label_store(TrainConfig(label_store=str(junk)), corpus, resuming=False)
    fresh = plan_label_store(TrainConfig(label_store=str(tmp_path / "empty")), corpus, False)
    assert fresh.action == "seed" and not fresh.overwrite
