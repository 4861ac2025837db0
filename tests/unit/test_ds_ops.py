"""DeepSpeed's CPU communication op: a dead build's lock file must not hang later runs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jsm_dist.ds_ops import clear_stale_lock

REPO = Path(__file__).resolve().parents[2]


def test_no_lock_file_is_left_alone(tmp_path):
    assert clear_stale_lock(tmp_path, wait_s=5) == "none"


def test_a_lock_from_a_dead_build_of_ours_is_removed_at_once(tmp_path):
    (tmp_path / "lock").touch()
    (tmp_path / "jsm-building").write_text("pid 12345\n")
    t0 = time.monotonic()
    assert clear_stale_lock(tmp_path, wait_s=60) == "ours"
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "lock").exists() and not (tmp_path / "jsm-building").exists()


def test_a_foreign_lock_released_while_waiting_is_not_touched(tmp_path):
    baton = tmp_path / "lock"
    baton.touch()
    threading.Timer(0.3, baton.unlink).start()
    assert clear_stale_lock(tmp_path, wait_s=30, poll_s=0.05) == "released"


def test_a_foreign_lock_is_removed_after_the_wait(tmp_path):
    (tmp_path / "lock").touch()
    t0 = time.monotonic()
    assert clear_stale_lock(tmp_path, wait_s=0.5, poll_s=0.05) == "foreign"
    assert time.monotonic() - t0 >= 0.5
    assert not (tmp_path / "lock").exists()


SCRIPT = """
import sys
from deepspeed.comm.torch import build_shm_op
from jsm_dist.ds_ops import build_dir, load_cpu_comm_op, _builder
if _builder() is None:
    sys.exit("DeepSpeed has no CPU communication op to build here")
d = build_dir(_builder().name)
d.mkdir(parents=True, exist_ok=True)
(d / "lock").touch()  # a build killed in the middle
if sys.argv[1] == "ours":
    (d / "jsm-building").write_text("pid 1\\n")
op = load_cpu_comm_op()
assert op is not None and build_shm_op() is op  # DeepSpeed's own load finds it loaded
assert not (d / "lock").exists()
print("LOADED")
"""


@pytest.mark.parametrize("who", ["ours", "foreign"])
def test_deepspeed_starts_despite_a_killed_build(tmp_path, who):
    """The real op, built in a fresh extensions dir whose lock a killed build left behind:
    without the guard DeepSpeed's own loader waits on that file forever."""
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "JSM_EXT_LOCK_WAIT_S": "2",
        "DS_ACCELERATOR": "cpu",
    }
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, who],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "LOADED" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
