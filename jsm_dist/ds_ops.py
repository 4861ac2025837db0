"""DeepSpeed's CPU communication op: built once per machine, never waited on forever.

On CPU, DeepSpeed JIT-compiles a small shared-memory op (``deepspeed_shm_comm``) the first
time a process group starts, under ``torch.utils.cpp_extension``'s lock file
``<extensions dir>/deepspeed_shm_comm/lock``. A process killed during that build (Ctrl-C, a
Slurm requeue, a test timeout) leaves the lock file behind, and every later DeepSpeed run on
the machine then waits on it forever without a word.

:func:`load_cpu_comm_op` loads the op before DeepSpeed asks for it (DeepSpeed then finds it
already loaded), holding a kernel lock (``fcntl.flock``, released when its holder dies) while
it builds. Holding that lock, a torch lock file left by one of our own earlier builds is
known to be stale and is removed at once; a lock file some other program made is waited on
for ``JSM_EXT_LOCK_WAIT_S`` seconds (default 300) and then removed, with a warning each time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

OP = "ShareMemCommBuilder"
WAIT_ENV = "JSM_EXT_LOCK_WAIT_S"
DEFAULT_WAIT_S = 300.0


def _builder():
    """DeepSpeed's builder of the CPU op, or None where there is none to build."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return None
    builder = get_accelerator().create_op_builder(OP)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def build_dir(name: str) -> Path:
    """Where torch builds extension ``name`` (``TORCH_EXTENSIONS_DIR`` honoured)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def clear_stale_lock(directory: Path, *, wait_s: float, poll_s: float = 1.0) -> str:
    """Make sure no dead build's lock file blocks ``directory``; the caller holds the flock.

    Returns what was found: ``"none"``, ``"released"`` (another program finished its
    build while we waited), ``"ours"`` (left by a build of ours that died: removed) or
    ``"foreign"`` (still there after ``wait_s``: removed).
    """
    baton = directory / "lock"
    if not baton.exists():
        return "none"
    marker = directory / "jsm-building"
    if marker.exists():  # our builder wrote it before building and removes it after
        log.warning(
            "removing %s: a DeepSpeed op build of ours (%s) died while holding it",
            baton,
            marker.read_text().strip() or "pid unknown",
        )
        baton.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        return "ours"
    deadline = time.monotonic() + wait_s
    while baton.exists() and time.monotonic() < deadline:
        time.sleep(poll_s)
    if not baton.exists():
        return "released"
    log.warning(
        "removing %s: it outlived %g s of waiting (%s); no build of ours holds it",
        baton,
        wait_s,
        WAIT_ENV,
    )
    baton.unlink(missing_ok=True)
    return "foreign"


def load_cpu_comm_op(*, wait_s: float | None = None):
    """Load (building if needed) DeepSpeed's CPU communication op; None where not applicable.

    Safe to call from every rank at once: one process builds, the others wait on the flock
    and then import the cached build.
    """
    builder = _builder()
    if builder is None:
        return None
    if wait_s is None:
        wait_s = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    directory = build_dir(builder.name)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{builder.name}.jsm.flock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            clear_stale_lock(directory, wait_s=wait_s)
            marker = directory / "jsm-building"
            marker.write_text(f"pid {os.getpid()}\n")
            try:
                return builder.load(verbose=False)
            finally:  # a build that raised released torch's lock itself
                marker.unlink(missing_ok=True)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
