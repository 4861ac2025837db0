"""The training job for real: 2 processes (gloo) through ``accelerate launch``.

Crashes are real SIGKILLs at named points (``JSM_FAULT``, see ``dist.fault_point``), so the
tests are deterministic about *where* a run dies without mocking anything.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAIN_ARGS, garble_member, label_value, make_tiny_corpus

from jsm_dist import ds_ops
from jsm_dist.labels import LabelStore
from jsm_dist.launching.command import local_launch
from jsm_dist.models import load_model

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
    # the model file records the training size (--data.train_size 32): jsm-predict's default
    assert load_model(reference_run / "model.pt").train_size == 32


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
    # a build of DeepSpeed's CPU op killed half-way (as by a Ctrl-C or a requeue) left its lock
    ext = ds_ops.build_dir(ds_ops._builder().name)
    ext.mkdir(parents=True, exist_ok=True)
    (ext / "lock").touch()
    (ext / "jsm-building").write_text("pid 1\n")
    res = launch(args + ["--epochs", "1"], deepspeed=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "died while holding it" in res.stderr and not (ext / "lock").exists()
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


@pytest.mark.gpu
def test_one_gpu_bf16_run_trains_refines_and_reads_the_gpu(corpus, tmp_path):
    """The entry point as one plain process on a GPU with bf16 autocast: it trains, refines
    on the device, and its step records carry real pynvml readings."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jsm_dist.train", *COMMON, "--corpus", str(corpus.root),
           "--out_dir", str(run), "--epochs", "1", "--tau", "1",
           "--train.mixed_precision", "bf16"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "JSM_FAULT"))}
    res = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = records(run)
    assert [r["gpu"] for r in recs if r.get("kind") == "start"] == [True]
    steps = [r for r in recs if r.get("kind") == "step"]
    assert len(steps) == sum(SHARDS) // 4  # one process, batches of 4
    assert all(np.isfinite(r["loss"]) and r["gpu_mem_used_mb"] > 0 for r in steps), steps[-1]
    refines = [r for r in recs if r.get("name") == "refine"]
    assert [(r["generation"], r["samples"]) for r in refines] == [(1, sum(SHARDS))]
    assert LabelStore.open(run / "labels").generation == 1
    assert json.loads((run / "config.json").read_text())["train"]["mixed_precision"] == "bf16"
    assert (run / "model.pt").is_file()


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


# ---- unreadable data; one job per run directory ------------------------------------------------
def test_unreadable_sample_keeps_its_label_through_a_crash_and_resume(tmp_path):
    corpus = make_tiny_corpus(tmp_path / "c", shard_sizes=SHARDS, size=32)
    garble_member(corpus.shard_paths[1], "tiny_001_0002.rgb.png")  # rank 1 refines shard 1
    run = tmp_path / "run"
    args = ["--corpus", str(corpus.root), "--out_dir", str(run), "--epochs", "1", "--tau", "1"]
    res = launch(args, fault="refine_batch")  # rank 0 killed during the first refinement
    assert res.returncode != 0
    assert (run / "run.lock").is_file()  # left behind by the killed main process: stale
    res = launch(args + ["--resume", "latest"])  # takes the stale lock over, redoes the pass
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "taking over the stale lock" in res.stderr
    refines = [r for r in records(run) if r.get("name") == "refine"]
    assert [(r["carried_over"], r["samples"]) for r in refines] == [(1, sum(SHARDS) - 1)]
    store = LabelStore.open(run / "labels")
    assert store.generation == 1
    kept = store.read(1, 2, generation=1)
    assert kept.tobytes() == store.read(1, 2, generation=0).tobytes()  # byte for byte
    assert (kept == label_value(1, 2)).all()  # = the corpus's generation-0 label
    side = store.read_side(1, generation=1)
    assert side[:, -1].tolist() == [1, 1, 0, 1, 1]  # the carried one: still generation 0's
    assert store.manifest["generations"][-1]["carried_over"] == 1
    assert not (run / "run.lock").exists()


def test_second_run_on_the_same_out_dir_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["--corpus", str(corpus.root), "--out_dir", str(run), "--epochs", "2", "--tau", "1"]
    cmd, env = local_launch(2, [*COMMON, *args], mode="cpu")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("JSM_FAULT", None)
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run / "run.lock").is_file() or not (run / "run.lock").read_text():
            assert first.poll() is None and time.monotonic() < deadline, "no lock taken"
            time.sleep(0.2)
        holder = json.loads((run / "run.lock").read_text())
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "jsm_dist.train", *COMMON, *args], cwd=REPO,
            env=dict(os.environ), capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        took = time.monotonic() - t0
        running = first.poll() is None
        out, err = first.communicate(timeout=600)
        assert running, "the first run ended before the second was checked: " + err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {holder['pid']} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr
    assert took < 120, f"refusal took {took:.0f} s"  # before any training work (loaded host)
    assert first.returncode == 0, out[-3000:] + err[-3000:]  # the first run is unharmed
    done = [r for r in records(run) if r.get("name") == "done"]
    assert len(done) == 1 and done[0]["steps_per_rank"] == [6, 6]
    assert [r["generation"] for r in records(run) if r.get("name") == "refine"] == [1, 2]
    assert LabelStore.open(run / "labels").generation == 2
    assert not (run / "run.lock").exists()
