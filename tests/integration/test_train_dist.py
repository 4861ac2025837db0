"""The training job for real: 2 processes (gloo) through ``accelerate launch``.

Crashes are real SIGKILLs at named points (``JSM_FAULT``, see ``dist.fault_point``), so the
tests are deterministic about *where* a run dies without mocking anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAIN_ARGS, make_tiny_corpus

from jsm_dist.labels import LabelStore
from jsm_dist.launcher import local_launch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHARDS = (9, 5, 7, 3)  # uneven: rank 0 owns 16 samples for refinement, rank 1 owns 8
COMMON = list(TINY_TRAIN_ARGS)


def launch(args: list[str], *, deepspeed: bool = False, fault: str = "", timeout: int = 300):
    cmd, env = local_launch(
        2,
        [*COMMON, *args],
        mode="deepspeed" if deepspeed else "cpu",
        deepspeed_config_file=str(REPO / "ds_config.json"),
    )
    env["OMP_NUM_THREADS"] = "1"
    env.pop("JSM_FAULT", None)
    if fault:
        env["JSM_FAULT"] = fault
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def crash_test_args(corpus, run: Path) -> list[str]:
    """The settings of the reference run, so a crashed + resumed run can be compared to it."""
    return ["--corpus", str(corpus.root), "--out_dir", str(run), "--epochs", "2", "--tau", "1",
            "--checkpoint_every", "2", "--text_fit_epochs", "2"]  # fmt: skip


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def losses_by_step(run: Path) -> dict[int, float]:
    """The loss logged at each step (the LAST record wins: a resumed run re-logs steps)."""
    return {r["step"]: r["loss"] for r in records(run) if r.get("kind") == "step"}


def store_labels(run: Path) -> np.ndarray:
    store = LabelStore.open(run / "labels")
    return np.stack([store.read(s, i) for s, n in enumerate(store.shard_sizes) for i in range(n)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), shard_sizes=SHARDS, size=32)


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """Uninterrupted DDP run: 2 epochs, a refinement after each, checkpoints every 2 steps."""
    run = tmp_path_factory.mktemp("ref") / "run"
    res = launch(crash_test_args(corpus, run))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


def test_ddp_equal_steps_and_one_commit_per_refinement(reference_run):
    recs = records(reference_run)
    done = [r for r in recs if r.get("name") == "done"][-1]
    # 24 samples / (2 ranks * batch 4) = 3 steps per epoch on each rank, despite uneven shards
    assert done["steps_per_rank"] == [6, 6]
    refines = [r for r in recs if r.get("name") == "refine"]
    assert [r["generation"] for r in refines] == [1, 2]
    assert all(r["samples"] == sum(SHARDS) for r in refines)  # both ranks' shards refined
    # the text scorer was fitted on every sample of both ranks before each pass
    assert [r["text_fit"]["samples"] for r in refines] == [sum(SHARDS)] * 2
    assert all(r["text_fit"]["epochs"] == 2 for r in refines)
    # the candidate-choice diagnostics cover both ranks' samples (the corpus has GT)
    for r in refines:
        c = r["choice"]
        assert c["n"] == sum(SHARDS), c
        assert 0.0 <= c["favours_better"] <= c["favours_better_decided"] <= 1.0
        assert 0.0 <= c["undecided"] <= 1.0 and 0.0 <= c["cand_better"] <= 1.0
    store = LabelStore.open(reference_run / "labels")
    assert store.generation == 2 and store.generations == [0, 1, 2]
    assert (reference_run / "model.pt").is_file()


def test_resume_after_kill_mid_epoch_matches_uninterrupted(corpus, reference_run, tmp_path):
    run = tmp_path / "run"
    args = crash_test_args(corpus, run)
    # step 5 is mid epoch 2 (3 steps per epoch); the newest checkpoint is then step 4
    res = launch(args, fault="step:5")
    assert res.returncode != 0, "the fault did not kill the run"
    state = json.loads(max((run / "checkpoints").glob("step-*/train_state.json")).read_text())
    assert state["global_step"] == 4 and state["step_in_epoch"] == 1
    res = launch(args + ["--resume", "latest"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ref, got = losses_by_step(reference_run), losses_by_step(run)
    assert sorted(got) == sorted(ref)
    for step in (5, 6):  # the steps replayed after the resume
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step
    np.testing.assert_allclose(store_labels(run), store_labels(reference_run), atol=1)


def test_kill_during_refinement_then_resume_loses_nothing(corpus, reference_run, tmp_path):
    run = tmp_path / "run"
    args = crash_test_args(corpus, run)
    res = launch(args, fault="refine_batch")  # dies after writing its first refined batch
    assert res.returncode != 0
    store = LabelStore.open(run / "labels")
    assert store.generation == 0  # the half-written generation 1 is invisible
    res = launch(args + ["--resume", "latest"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    store = LabelStore.open(run / "labels")
    assert store.generation == 2
    done = [r for r in records(run) if r.get("name") == "done"][-1]
    assert done["refinements"] == 2
    np.testing.assert_allclose(store_labels(run), store_labels(reference_run), atol=1)


def test_deepspeed_zero2_train_refine_and_resume(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["--corpus", str(corpus.root), "--out_dir", str(run), "--tau", "1",
            "--text_fit_epochs", "1"]  # fmt: skip
    res = launch(args + ["--epochs", "1"], deepspeed=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the default group and DeepSpeed's own (made in prepare) have train.dist_timeout_s
    seen = re.findall(r"process group timeouts read back: \[(.*)\] s", res.stderr)
    groups = [v.split(", ") for v in seen]
    assert len(groups) == 2 and all(len(g) >= 2 and set(g) == {"600.0"} for g in groups), seen
    ckpt = max((run / "checkpoints").glob("step-*"))
    assert (ckpt / "pytorch_model").is_dir(), "not a DeepSpeed checkpoint"
    res = launch(args + ["--epochs", "2", "--resume", "latest"], deepspeed=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = records(run)
    done = [r for r in recs if r.get("name") == "done"][-1]
    assert done["steps_per_rank"] == [6, 6] and done["refinements"] == 2
    steps = sorted(r["step"] for r in recs if r.get("kind") == "step")
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at step 4, nothing trained twice
    fits = [r["text_fit"] for r in recs if r.get("name") == "refine"]
    assert [f["samples"] for f in fits] == [sum(SHARDS)] * 2  # scorer fitted beside ZeRO-2


def test_bad_settings_fail_before_work(corpus, tmp_path):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "jsm_dist.train", "--corpus", str(tmp_path / "nope")]
    res = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 2 and "no corpus.json" in res.stderr
    cmd = [
        sys.executable,
        "-m",
        "jsm_dist.train",
        "--corpus",
        str(corpus.root),
        "--data.batch_size",
        "0",
    ]
    res = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 2 and "batch_size" in res.stderr
