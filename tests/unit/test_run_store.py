"""A training run's own label store: never destroys other labels, knows its corpus and keys.

One real (tiny, 1-process) training run makes the store; the label tools and the trainer
are then driven through their main() functions.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_corpus
from PIL import Image

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


# ---- the run's store knows its corpus and keys ------------------------------------------------
def test_info_and_fsck_on_a_run_store(trained, capsys) -> None:
    corpus, run = trained
    assert labels_cli("info", run / "labels", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["corpus"]["root"] == str(corpus.root.resolve()) and info["keys"]
    assert info["run_dir"] == str(run.resolve()) and info["corpus"]["generation"] == 0
    assert labels_cli("info", run) == 0  # a run directory is accepted too
    assert f"corpus       {corpus.root.resolve()}" in capsys.readouterr().out
    assert labels_cli("fsck", run / "labels", "--all") == 0
    out = capsys.readouterr().out
    assert "clean" in out and "corpus:" not in out


def test_export_names_files_by_sample_key(trained, tmp_path) -> None:
    corpus, run = trained
    assert labels_cli("export", run / "labels", "--gen", 1, "--out", tmp_path) == 0
    store = LabelStore.open(run / "labels")
    keys = json.loads((corpus.label_dir / "keys.json").read_text())["shards"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{k}.png" for ks in keys for k in ks
    )
    for s, ks in enumerate(keys):
        for i, k in enumerate(ks):
            got = np.asarray(Image.open(tmp_path / f"{k}.png"))
            np.testing.assert_array_equal(got, store.read(s, i, generation=1))


def test_diff_compares_with_the_corpus_gt(trained, tmp_path, capsys) -> None:
    _, run = trained
    table = tmp_path / "d.csv"
    assert labels_cli("diff", run / "labels", "--a", 0, "--b", 1, "--csv", table) == 0
    assert f"vs GT ({sum(SIZES)} samples)" in capsys.readouterr().out
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert len(rows) == sum(SIZES) and all(r["mae_a"] and r["sm_b"] for r in rows)


def test_diff_gt_dir_is_never_ignored(trained, tmp_path, capsys, caplog) -> None:
    corpus, run = trained
    keys = [k for ks in json.loads((corpus.label_dir / "keys.json").read_text())["shards"]
            for k in ks]  # fmt: skip
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for i in range(len(keys)):  # GT named otherwise than the store's keys
        Image.fromarray(mask).save(wrong / f"img_{i:04d}.png")
    with caplog.at_level(logging.ERROR):
        assert labels_cli("diff", run / "labels", "--a", 0, "--b", 1, "--gt-dir", wrong) == 1
    assert "none of the store's 5 samples has a ground-truth file" in caplog.text
    assert f"{keys[0]}.png" in caplog.text and "img_0000.png" in caplog.text
    part = tmp_path / "part"
    part.mkdir()
    for k in keys[:3]:
        Image.fromarray(mask).save(part / f"{k}.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert labels_cli("diff", run / "labels", "--a", 0, "--b", 1, "--gt-dir", part) == 0
    assert "ground truth for 3 of 5 samples only; 2 have no <key>.png" in caplog.text
    out = capsys.readouterr().out
    assert "vs GT (3 samples)" in out and "without GT             2 samples" in out


def test_jsm_eval_labels_on_a_run_store(trained, capsys) -> None:
    from jsm_dist.eval.evaluate import main as eval_main

    _, run = trained
    assert eval_main(["--labels", str(run / "labels"), "--workers", "1", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "gen-0" in out and "gen-1" in out


def test_rollback_on_a_run_store(trained, tmp_path, capsys) -> None:
    _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert labels_cli("rollback", copy / "labels", "--to", 0) == 0
    assert LabelStore.open(copy / "labels").generations == [0]
    assert "from generation 1 to 0" in capsys.readouterr().out


def test_a_run_store_linked_to_another_corpus_is_damage(trained, tmp_path, capsys) -> None:
    _, run = trained
    other = make_tiny_corpus(tmp_path, shard_sizes=SIZES, key_prefix="other", name="other")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "labels" / "manifest.json").read_text())
    manifest["corpus"]["root"] = str(other.root.resolve())  # points at a look-alike corpus
    (copy / "labels" / "manifest.json").write_text(json.dumps(manifest))
    assert labels_cli("fsck", copy / "labels") == 1
    out = capsys.readouterr().out
    assert "DAMAGE" in out and "sample keys differ" in out
    assert "'tiny_000_0000'" in out and "'other_000_0000'" in out


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
