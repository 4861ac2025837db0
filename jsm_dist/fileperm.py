"""File modes that follow the umask, whichever library wrote the file.

A file this package creates should get ``0o666 & ~umask``, what a plain ``open()`` gives,
so that a model or checkpoint is as readable as everything else in the run directory
(by a teammate, or the account that serves the model). Some writers do not: files made
by ``tempfile.mkstemp`` and by safetensors (accelerate's checkpoint weights; it writes
through a temporary file) are 0600, readable by their owner only. :func:`file_mode` gives
the mode to set on such a file, :func:`follow_umask` puts a whole written tree right.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux
    /proc/self/status): the portable way, set-and-restore, briefly gives any file another
    thread creates meanwhile a wrong mode."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def follow_umask(root: str | os.PathLike) -> None:
    """Give every regular file under ``root`` (or ``root`` itself) :func:`file_mode`.

    Directories are left alone (``mkdir`` follows the umask already). A file that
    vanishes during the walk (another process renaming its temporary file into place) is
    skipped: its writer fixes it in its own walk.
    """
    mode = file_mode()
    root = Path(root)
    for path in [root] if root.is_file() else root.rglob("*"):
        try:
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)
        except FileNotFoundError:
            continue
