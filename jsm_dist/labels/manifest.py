"""On-disk names, the manifest, and the durability helpers of the label store.

Everything that touches ``manifest.json`` goes through :func:`read_manifest` and
:func:`update_manifest` (read-modify-write under an exclusive ``flock`` on ``<store>/.lock``,
written via temp file + fsync + ``os.replace`` + fsync of the directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

FORMAT = "jsm-labels/1"
MANIFEST = "manifest.json"
KEYS = "keys.json"
LOCK = ".lock"
LABEL_SUFFIX = ".u8"  # raw C-order uint8 array (n, h, w)
SIDE_SUFFIX = ".side"  # raw C-order float32 array (n, len(side_columns))
RECORD_SUFFIX = ".json"  # per-shard write record, written by the owner at close()
GEN_RE = re.compile(r"^gen-(\d{6,})$")
CHUNK = 8 << 20  # bytes per read when hashing a shard file


class LabelStoreError(RuntimeError):
    """Base class of the store's errors (a CLI turns them into exit code 1)."""


class IncompleteGenerationError(LabelStoreError):
    """A commit found unwritten samples or missing shard files: nothing was committed."""


class GenerationGoneError(LabelStoreError, FileNotFoundError):
    """A reader's pinned generation was deleted (retention or rollback); call refresh()."""


class CorruptStoreError(LabelStoreError):
    """A file has the wrong size (or the manifest is unreadable)."""


class WrongCorpusError(LabelStoreError, ValueError):
    """A store does not belong to the corpus it is used with (shard sizes or sample keys
    differ). A ValueError too: a training run refuses it as a bad setting (exit code 2)."""


def gen_name(generation: int) -> str:
    return f"gen-{generation:06d}"


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def list_gen_dirs(root: Path) -> dict[int, Path]:
    """Every ``gen-NNNNNN`` directory under ``root`` (committed or not), by number."""
    out = {}
    if root.is_dir():
        for p in root.iterdir():
            m = GEN_RE.match(p.name)
            if m and p.is_dir():
                out[int(m.group(1))] = p
    return out


def fsync_dir(path: Path) -> None:
    """Make a rename/create inside ``path`` durable (POSIX needs the directory fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict, sync_dir: bool = True) -> None:
    """Temp file in the same directory, fsync, os.replace, fsync the directory (callers
    writing many files in one directory pass ``sync_dir=False`` and fsync it once)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptStoreError(f"{path}: not valid JSON ({e})") from e


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no label store at {root} (missing {MANIFEST}); create one with "
            "LabelStore.create(...) or pack a corpus (jsm-pack --help)"
        )
    data = read_json(path)
    if data.get("format") != FORMAT:
        raise CorruptStoreError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Exclusive advisory lock serialising manifest updates (commit, prune, pin, rollback).

    Readers never take it: they only ever see a complete manifest thanks to os.replace.
    """
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def update_manifest(root: Path, change: Callable[[dict], None]) -> dict:
    """Read the manifest, apply ``change`` in place, write it atomically; all under the lock."""
    with locked(root):
        data = read_manifest(root)
        change(data)
        write_json_atomic(root / MANIFEST, data)
        return data


def sha256_fd(fd: int, size: int) -> str:
    """SHA-256 of the first ``size`` bytes of an open file (pread: no offset side effects)."""
    h = hashlib.sha256()
    off = 0
    while off < size:
        buf = os.pread(fd, min(CHUNK, size - off), off)
        if not buf:
            break
        h.update(buf)
        off += len(buf)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sha256_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def generation_entry(data: dict, generation: int) -> dict | None:
    for e in data["generations"]:
        if e["generation"] == generation:
            return e
    return None


def retained(data: dict, keep: int) -> set[int]:
    """Generations retention keeps: the current one, pinned ones, the ``keep`` newest <= current."""
    cur = data["current"]
    committed = sorted(e["generation"] for e in data["generations"] if e["generation"] <= cur)
    return {cur} | set(data.get("pinned", [])) | set(committed[-keep:]) if cur >= 0 else set()
