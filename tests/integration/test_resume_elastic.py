"""Resume without replay, on the same or another world size: real jobs (``accelerate
launch``, gloo), killed mid-epoch by ``JSM_FAULT`` and resumed; every step's samples are
recorded by ``JSM_RECORD_SAMPLES`` (jsm_dist/sample_record.py).

What must hold (docs/resume.md): the samples of the interrupted epoch are each trained on
exactly once over the killed and the resumed job, whatever their sizes; each sample gets the
augmentation an uninterrupted run gives it; the learning rate at a given sample count is
the uninterrupted run's; a corrupt sample in the consumed part shifts nothing after it.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from helpers import TINY_TRAIN_ARGS, all_ids, garble_member, make_tiny_corpus

from jsm_dist.data import order
from jsm_dist.launching.command import local_launch
from jsm_dist.sample_record import ENV as RECORD_ENV

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# 25 samples, batch 4: on 2 ranks 3 steps of 8 and a last one of 1 (rank 0 trains on a
# zero-weight padding sample), on 1 rank 6 steps of 4 and one of 1
SHARDS = (9, 5, 7, 4)
SEED, WINDOW = 3, 256  # TINY_TRAIN_ARGS' seed; data.shuffle_buffer's default


def launch(procs: int, args: list[str], record: Path, fault: str = ""):
    cmd, env = local_launch(procs, [*TINY_TRAIN_ARGS, *args], mode="cpu")
    env["OMP_NUM_THREADS"] = "1"
    env[RECORD_ENV] = str(record)
    env.pop("JSM_FAULT", None)
    if fault:
        env["JSM_FAULT"] = fault
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def run_args(corpus, run: Path) -> list[str]:
    """One epoch, no refinement, a checkpoint after every step, a learning rate that moves."""
    return ["--corpus", str(corpus.root), "--out_dir", str(run), "--epochs", "1", "--tau", "0",
            "--checkpoint_every", "1", "--lr_schedule", "cosine"]  # fmt: skip


def read_records(path: Path, up_to_step: int | None = None) -> list[dict]:
    recs = [json.loads(x) for x in path.read_text().splitlines() if x]
    return [r for r in recs if up_to_step is None or r["step"] <= up_to_step]


def per_sample(recs: list[dict]) -> dict[str, str]:
    """key -> rgb digest (asserting no sample came twice)."""
    counts = Counter(k for r in recs for k in r["keys"])
    twice = sorted(k for k, n in counts.items() if n > 1)
    assert not twice, f"samples trained on twice: {twice}"
    return {k: d for r in recs for k, d in zip(r["keys"], r["rgb"])}


def lr_by_position(recs: list[dict]) -> dict[int, float]:
    return {r["pos"]: r["lr"] for r in recs}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), shard_sizes=SHARDS, size=32)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Uninterrupted 1-epoch runs on 1 and on 2 processes: their records by world size."""
    out = {}
    for procs in (1, 2):
        base = tmp_path_factory.mktemp(f"ref{procs}")
        res = launch(procs, run_args(corpus, base / "run"), base / "samples.jsonl")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        out[procs] = read_records(base / "samples.jsonl")
    return out


def kill_then_resume(corpus, tmp_path: Path, before: int, after: int, kill_at: int):
    """A ``before``-process job killed after step ``kill_at`` (its newest checkpoint is
    step ``kill_at - 1``), resumed by an ``after``-process job: (records of the steps the
    checkpoint kept, records of the resumed job, checkpointed train state)."""
    run = tmp_path / "run"
    res = launch(before, run_args(corpus, run), tmp_path / "killed.jsonl", f"step:{kill_at}")
    assert res.returncode != 0, "the fault did not kill the run"
    state = json.loads(max((run / "checkpoints").glob("step-*/train_state.json")).read_text())
    assert state["global_step"] == kill_at - 1
    res = launch(after, [*run_args(corpus, run), "--resume", "latest"], tmp_path / "resumed.jsonl")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kept = read_records(tmp_path / "killed.jsonl", up_to_step=state["global_step"])
    return kept, read_records(tmp_path / "resumed.jsonl"), state


def test_resume_on_the_same_world_size_repeats_the_uninterrupted_run(corpus, reference, tmp_path):
    kept, resumed, state = kill_then_resume(corpus, tmp_path, 2, 2, kill_at=2)
    assert state["samples_in_epoch"] == 8  # 1 step x 2 ranks x 4
    ref = reference[2]
    # 4 steps on each rank; rank 0's last was padding (recorded by nobody)
    assert Counter(r["rank"] for r in ref) == {0: 3, 1: 4}
    key = lambda r: (r["step"], r["rank"])
    assert sorted(kept + resumed, key=key) == sorted(ref, key=key)  # keys, digests, lr, pos


@pytest.mark.parametrize(
    "before, after, kill_at, consumed",
    [(2, 1, 2, 8), (1, 2, 2, 4)],  # 2 -> 1: 17 left = 4 x 4 + 1; 1 -> 2: 21 = 8, 8, 5 (2 + 3)
)
def test_resume_on_another_world_size_trains_on_each_sample_once(
    corpus, reference, tmp_path, before, after, kill_at, consumed
):
    kept, resumed, state = kill_then_resume(corpus, tmp_path, before, after, kill_at)
    assert state["samples_in_epoch"] == state["samples_seen"] == consumed
    seen = per_sample(kept + resumed)  # asserts nothing came twice
    assert sorted(seen) == sorted(f"tiny_{s:03d}_{i:04d}" for s, i in all_ids(corpus))
    # the killed job consumed exactly the first positions of the canonical order
    head = order.epoch_order(list(SHARDS), SEED, 0, WINDOW)[:consumed].tolist()
    assert sorted(k for r in kept for k in r["keys"]) == sorted(
        f"tiny_{s:03d}_{i:04d}" for s, i in head
    )
    # each sample got the augmentation both uninterrupted runs give it
    for procs in (1, 2):
        assert per_sample(reference[procs]) == seen
    # the learning rate follows the samples: equal to the uninterrupted run at each position
    # both step at (the resumed job's world size steps at other positions too)
    lr = lr_by_position(resumed)
    ref_lr = lr_by_position(reference[before])
    common = sorted(set(lr) & set(ref_lr))
    assert len(common) >= 2, (sorted(lr), sorted(ref_lr))
    for pos in common:
        assert lr[pos] == pytest.approx(ref_lr[pos], rel=1e-9), pos
    assert resumed[0]["pos"] == consumed  # the resumed job starts at the checkpoint's position


def test_corrupt_sample_in_the_consumed_part_shifts_nothing(corpus, reference, tmp_path):
    broken = make_tiny_corpus(tmp_path / "broken", shard_sizes=SHARDS, size=32)
    s, i = order.epoch_order(list(SHARDS), SEED, 0, WINDOW)[2].tolist()  # in step 1
    garble_member(broken.shard_paths[s], f"tiny_{s:03d}_{i:04d}.rgb.png")
    kept, resumed, state = kill_then_resume(broken, tmp_path, 2, 2, kill_at=2)
    assert f"tiny_{s:03d}_{i:04d}" not in {k for r in kept for k in r["keys"]}
    after = [r for r in reference[2] if r["pos"] >= state["samples_in_epoch"]]
    strip = lambda r: (r["step"], r["rank"], r["pos"], r["keys"], r["rgb"])
    # what the resumed job trains on is what the clean corpus's uninterrupted run trained on
    assert sorted(map(strip, resumed)) == sorted(map(strip, after))
