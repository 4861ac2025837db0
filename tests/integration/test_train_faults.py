"""Faults a 2-process training job must survive or end cleanly: a hung rank, a slow rank,
bad input (which must end it before any process group exists, in one line per rank).

Real processes (gloo) through ``accelerate launch``. The faults are real signals and real
sleeps at named points (``JSM_FAULT``, see ``dist.fault_point``): ``stop`` makes a rank
SIGSTOP itself, alive but frozen as a hung peer is, at a known step. Every process of a
job carries a tag in its environment, so the test finds all of them in /proc (launcher,
ranks, loader workers) and never leaves one behind, stopped or not, even when it fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import TINY_TRAIN_ARGS, make_tiny_corpus

from jsm_dist.launching.command import free_port, local_launch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHARDS = (9, 5, 7, 3)  # rank 1 owns shards 1 and 3 in a refinement pass
TAG_VAR = "JSM_TEST_JOB"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), shard_sizes=SHARDS, size=32)


def job_processes(tag: str) -> dict[int, str]:
    """pid -> state letter (R, S, T, Z, ...) of every live process whose environment has
    the job's tag (read from /proc: the launcher's children inherit it)."""
    found = {}
    mark = f"{TAG_VAR}={tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if mark not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile, or not ours
            continue
        state = stat[stat.rindex(")") + 2]
        if state not in "ZX":  # a zombie is dead, only not yet reaped
            found[int(entry)] = state
    return found


def end_job(tag: str) -> None:
    """SIGCONT + SIGKILL whatever is left of the job (a stopped process ignores SIGTERM)."""
    for pid in job_processes(tag):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


class Job:
    """A 2-process training launch, running in the background, tagged, logged to a file."""

    def __init__(self, args: list[str], log: Path, fault: dict[str, str] | None = None):
        cmd, env = local_launch(2, [*TINY_TRAIN_ARGS, *args])
        for key in ("JSM_FAULT", "JSM_FAULT_RANK", "JSM_FAULT_ACTION"):
            env.pop(key, None)
        self.tag = uuid.uuid4().hex
        env.update(OMP_NUM_THREADS="1", **{TAG_VAR: self.tag}, **(fault or {}))
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_stopped_process(self, limit_s: float) -> float:
        """monotonic time at which a process of the job was first seen stopped (state T)."""
        end = time.monotonic() + limit_s
        while time.monotonic() < end and self.proc.poll() is None:
            if "T" in job_processes(self.tag).values():
                return time.monotonic()
            time.sleep(0.1)
        raise AssertionError("no rank stopped:\n" + self.output()[-3000:])

    def leftovers(self, grace_s: float = 15.0) -> dict[int, str]:
        """Processes of the job still alive ``grace_s`` after the launcher ended (orphaned
        loader workers notice their parent's death within a few seconds)."""
        end = time.monotonic() + grace_s
        while (left := job_processes(self.tag)) and time.monotonic() < end:
            time.sleep(0.25)
        return left


def test_stopped_rank_ends_the_job_within_the_timeout(corpus, tmp_path):
    """A SIGSTOPped rank: its peer's collective times out after train.dist_timeout_s, the
    peer exits with one line naming the phase and the setting, torchrun ends the stopped
    rank (SIGTERM, which a stopped process ignores, then SIGKILL 30 s later), nothing
    survives."""
    timeout = 20
    args = ["--corpus", str(corpus.root), "--out_dir", str(tmp_path / "run"), "--epochs", "3",
            "--tau", "0", "--dist_timeout_s", str(timeout)]  # fmt: skip
    # rank 1 freezes after its 2nd step (of 9): rank 0 waits in step 3's gradient all-reduce
    fault = {"JSM_FAULT": "step:2", "JSM_FAULT_RANK": "1", "JSM_FAULT_ACTION": "stop"}
    job = Job(args, tmp_path / "job.log", fault)
    try:
        stopped_at = job.wait_for_stopped_process(limit_s=300)
        try:
            rc = job.proc.wait(timeout=timeout + 120)  # fail, not hang, if it never ends
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - stopped_at
        out = job.output()
        print(f"SIGSTOP -> job exit: {took:.1f} s (timeout {timeout} s)")
        assert rc is not None and rc != 0, out[-3000:]
        assert took <= timeout + 60, f"{took:.1f} s from SIGSTOP to exit\n{out[-3000:]}"
        # a progress bar shares the terminal: lines end in \r as well as \n
        errors = [x for x in re.split(r"[\r\n]", out) if x.startswith("jsm_dist.train: error:")]
        assert len(errors) == 1, out[-3000:]  # rank 0's; the stopped rank 1 says nothing
        assert errors[0].startswith(
            "jsm_dist.train: error: rank 0: a collective of phase 'training' timed out after "
            f"{timeout} s"
        )
        assert errors[0].endswith("raise train.dist_timeout_s")
        assert "training failed" not in out  # the one line, not a traceback of the rank
        assert job.leftovers() == {}, "processes of the job survived it"
    finally:
        end_job(job.tag)
        job.proc.kill()
        job.proc.wait()


def test_refinement_may_wait_longer_than_the_job_timeout(corpus, tmp_path):
    """Rank 1 is 35 s late into the refinement commit, past train.dist_timeout_s (20 s) but
    within train.refine_timeout_s: the run completes."""
    args = ["--corpus", str(corpus.root), "--out_dir", str(tmp_path / "run"), "--epochs", "1",
            "--tau", "1", "--dist_timeout_s", "20", "--refine_timeout_s", "120"]  # fmt: skip
    fault = {"JSM_FAULT": "refine_batch:0", "JSM_FAULT_RANK": "1", "JSM_FAULT_ACTION": "sleep:35"}
    job = Job(args, tmp_path / "job.log", fault)
    try:
        rc = job.proc.wait(timeout=400)
        out = job.output()
        assert rc == 0, out[-3000:]
        assert "fault point refine_batch(0): sleep 35" in out  # the delay did happen
        assert "label store" in out and "committed generation 1" in out
    finally:
        end_job(job.tag)
        job.proc.kill()
        job.proc.wait()


def test_malformed_yaml_ends_the_ranks_in_one_line_each(corpus, tmp_path):
    """Straight through ``accelerate launch``: a rank prints the one line and exits 2 before
    the process group; no traceback of the training code (torchrun adds its own report of
    the failed ranks)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  tau: [1, 2\n")
    args = ["--config", str(bad), "--corpus", str(corpus.root), "--out_dir", str(tmp_path / "r")]
    start = time.monotonic()
    job = Job(args, tmp_path / "job.log")
    try:
        rc = job.proc.wait(timeout=240)
        took = time.monotonic() - start
        out = job.output()
        assert rc != 0, out[-3000:]
        errors = [x for x in out.splitlines() if x.startswith("jsm_dist.train: error: ")]
        # one per rank that got that far: torchrun ends the other ranks when one exits
        assert 1 <= len(errors) <= 2, out[-3000:]
        assert all(f"{bad}: invalid YAML at line 4" in e for e in errors), errors
        assert "exitcode  : 2" in out  # torchrun's report: the ranks exited with 2
        assert not re.search(r'File ".*jsm_dist/', out), out[-3000:]  # no rank traceback
        assert "process group timeouts" not in out  # it never got that far
        assert took < 120, f"{took:.0f} s"
        assert job.leftovers() == {}
    finally:
        end_job(job.tag)
        job.proc.kill()
        job.proc.wait()


def test_launcher_refuses_a_missing_resume_dir_before_starting_ranks(corpus, tmp_path):
    """Through the project's launcher (launch/train.sh): checked once, before any rank
    starts: one line, exit 2, no traceback at all."""
    missing = tmp_path / "run" / "checkpoints" / "step-00000042"
    cmd = [sys.executable, "-m", "jsm_dist.launching.cli", "--procs-per-node", "2", "--port",
           str(free_port()), "--", *TINY_TRAIN_ARGS, "--corpus", str(corpus.root),
           "--out_dir", str(tmp_path / "run"), "--resume", str(missing)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    res = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert res.stderr.strip().splitlines() == [
        f"jsm_dist.train: error: --resume {missing}: no such directory; give a checkpoint "
        + f"directory (none complete in {checkpoints}) or --resume latest"
    ]
    assert "Traceback" not in res.stdout + res.stderr
