"""One job per run directory: ``<out_dir>/run.lock``, held by the main process for the job's life.

Two jobs started with the same ``--out_dir`` would share checkpoints, logs and the run's
label store: the second would re-seed the first's labels under its feet. The main process
(global rank 0) therefore takes the run lock before it writes anything, and keeps it until
it exits; a second job's main process finds it taken and stops with exit code 2, naming the
holder.

How it works: ``run.lock`` holds one JSON line (pid, host, start time, the process's boot
id and start tick), and the holder keeps an exclusive POSIX record lock (``fcntl.lockf``)
on it. The kernel drops that lock when its process dies, however it dies, so a lock file
whose lock is free is stale: its job is gone (a SIGKILL, a node crash). A stale lock is
taken over with a warning, so ``--resume latest`` after a crash just works. A POSIX lock,
unlike ``flock``, is owned by the process and not shared with forked children: a loader
worker that outlives a killed main process for a few seconds does not keep the run locked.
(The flip side: closing ANY descriptor of ``run.lock`` in the holding process drops the
lock, so the holder never opens the file again; :func:`read` answers from memory there.)
As a second guard (filesystems that do not enforce locks), a lock that names a process
still alive on this host (same pid, same start tick, same boot) is never taken over. A lock
from another host whose lock is free is stale by the lock alone. The holder removes the
file when it exits normally.

Locks must work on the filesystem of the run directory (local disks and NFS do; on
Lustre/GPFS they must be enabled): the label store needs them too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """The run directory is held by a live job."""


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _me() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "boot_id": _boot_id(),
        "proc_start": _proc_start(os.getpid()),
    }


def holder_alive(info: dict) -> bool | None:
    """Is the process a lock names still running? None: it is on another host (unknown)."""
    if info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if info.get("boot_id") and info["boot_id"] != _boot_id():
        return False  # the machine rebooted since
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = _proc_start(pid)
    return start is None or info.get("proc_start") in (None, start)  # else: a reused pid


def describe(info: dict) -> str:
    return (
        f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started_at', '?')})"
    )


_HELD: dict[Path, dict] = {}  # run locks this process holds: path -> info


def read(run_dir: str | os.PathLike) -> dict | None:
    """The lock's content (None when there is no lock file or it is empty/unreadable)."""
    path = (Path(run_dir) / LOCK_NAME).absolute()
    if path in _HELD:  # opening (and closing) the file here would drop our own lock
        return dict(_HELD[path])
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class RunLock:
    """A held run lock; :meth:`release` (or leaving :func:`hold`) gives it back."""

    path: Path
    fd: int
    info: dict
    created_dir: bool = False  # acquire() made the run directory

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding the lock: nobody takes a dying lock
        os.close(self.fd)
        self.fd = -1
        _HELD.pop(self.path, None)
        if self.created_dir:  # a run refused before it wrote anything leaves nothing behind
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


def _refuse(run_dir: Path, info: dict | None) -> RunLockedError:
    who = describe(info) if info else "another process"
    return RunLockedError(
        f"run directory {run_dir} is in use by {who}: its lock {run_dir / LOCK_NAME} is held. "
        "Wait for that run to finish (or stop it), or use another --out_dir; to continue a "
        "run that has stopped, use --resume latest"
    )


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Take the run lock of ``run_dir`` (created if needed) or raise RunLockedError."""
    run_dir = Path(run_dir)
    path = (run_dir / LOCK_NAME).absolute()
    if path in _HELD:  # this process holds it already (a POSIX lock would just be re-granted)
        raise _refuse(run_dir, _HELD[path])
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                info = None
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                    raw = os.pread(fd, 1 << 16, 0).decode()
                    info = json.loads(raw) if raw.strip() else None
                os.close(fd)
                raise _refuse(run_dir, info) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("%s: locks unsupported here (%s): relying on the pid check", path, e)
        # The holder we raced with may have unlinked the file before we locked it: only the
        # file that is still at `path` counts.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    prev = None
    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
        raw = os.pread(fd, 1 << 16, 0).decode()
        prev = json.loads(raw) if raw.strip() else None
    if prev is not None:
        if holder_alive(prev) and prev.get("pid") != os.getpid():
            os.close(fd)  # locks not enforced here, but its holder lives: never take it
            raise _refuse(run_dir, prev)
        log.warning(
            "run directory %s: taking over the stale lock of %s: that process is gone",
            run_dir,
            describe(prev),
        )
    info = _me()
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    _HELD[path] = info
    return RunLock(path, fd, info, created)


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[RunLock | None]:
    """``with hold(out_dir, enabled=is_main):`` the run lock for the block (None if disabled)."""
    if not enabled:
        yield None
        return
    lock = acquire(run_dir)
    try:
        yield lock
    finally:
        lock.release()
