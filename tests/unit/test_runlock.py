"""The run lock: one job per run directory; stale locks (dead holders) are taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jsm_dist import runlock
from jsm_dist.runlock import LOCK_NAME, RunLockedError

HOLD = """
import os, sys, time
from jsm_dist import runlock
lock = runlock.acquire(sys.argv[1])
child = os.fork() if len(sys.argv) > 2 else -1  # a child (loader worker) that outlives us
if child == 0:
    time.sleep(60)
    os._exit(0)
print("held", child, flush=True)
time.sleep(120)
"""


def holder(run: Path, *fork: str) -> tuple[subprocess.Popen, int]:
    """A separate process that takes the lock of ``run`` and keeps it, and the pid of the
    long-lived child it forks after that (``"fork"``; else -1)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run), *fork],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    word, child = proc.stdout.readline().split()
    assert word == "held"
    return proc, int(child)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = runlock.acquire(run)
    info = runlock.read(run)  # from memory: reopening the file would drop our own lock
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
    with pytest.raises(RunLockedError):  # a second holder, even in this process
        runlock.acquire(run)
    lock.release()
    assert not (run / LOCK_NAME).exists() and not run.exists()  # it made run/: gone again
    with runlock.hold(run) as again:
        assert again.info["pid"] == info["pid"]
    with runlock.hold(run, enabled=False) as none:  # other ranks: no lock
        assert none is None and not run.exists()


def test_live_lock_of_another_process_refuses(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc, child = holder(run, "fork")
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLockedError) as err:
            runlock.acquire(run)
        assert time.monotonic() - t0 < 5  # refused at once, not after a wait
        msg = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg
        assert str(run) in msg and "--out_dir" in msg
    finally:
        proc.kill()
        proc.wait()
    # the holder died without cleaning up (SIGKILL): its lock is stale and taken over,
    # although the child it forked still runs (and has the lock file open)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid
    try:
        os.kill(child, 0)  # still alive
        lock = runlock.acquire(run)
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="jsm_dist.runlock"):
        lock = runlock.acquire(run)
    assert f"stale lock of pid {pid}" in caplog.text
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == lock.info["pid"]
    lock.release()
    assert run.is_dir()  # not made by acquire(): kept


def test_lock_of_a_live_process_is_kept_even_without_flock(tmp_path: Path) -> None:
    """Second guard for filesystems that do not enforce flock: a lock naming a process
    that is alive on this host (same pid and start tick) is never taken over."""
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = {"pid": sleeper.pid, "host": socket.gethostname(),
                "boot_id": runlock._boot_id(), "proc_start": runlock._proc_start(sleeper.pid)}  # fmt: skip
        (run / LOCK_NAME).write_text(json.dumps(info))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            runlock.acquire(run)
        info["proc_start"] = info["proc_start"] + 1  # same pid, another process: reused pid
        (run / LOCK_NAME).write_text(json.dumps(info))
        runlock.acquire(run).release()
    finally:
        sleeper.kill()
        sleeper.wait()
