"""LabelStore: reading, committing and managing generations (protocol: see package docstring)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jsm_dist import dist
from jsm_dist.labels import manifest as mf
from jsm_dist.labels.manifest import (
    CorruptStoreError,
    GenerationGoneError,
    IncompleteGenerationError,
    LabelStoreError,
)
from jsm_dist.labels.writer import GenerationWriter, verify_generation

log = logging.getLogger(__name__)

DEFAULT_CONF_NAMES = ("w_g", "w_d")
GENERATION_COLUMN = "generation"  # last side column: the generation that wrote the sample
# Label shard files one process keeps open for reading; beyond this the one opened first is
# closed (a loader worker reads its shards one after another, so this never thrashes; one
# descriptor per shard would pass a 1024-descriptor limit on a corpus of a few 1M samples).
MAX_OPEN_READS = 128


def resolve_world(world: dist.WorldInfo | None) -> dist.WorldInfo:
    """``world`` or the current one; skips importing torch (~2 s) when no group can exist."""
    if world is not None:
        return world
    env = os.environ
    if "torch" not in sys.modules and "RANK" not in env and "SLURM_PROCID" not in env:
        return dist.WorldInfo()
    return dist.world_info()


def _group_ready() -> bool:
    td = sys.modules.get("torch.distributed")
    return bool(td is not None and td.is_available() and td.is_initialized())


def _commit_ids(manifest: dict) -> dict[int, str | None]:
    return {e["generation"]: e.get("commit_id") for e in manifest["generations"]}


class LabelStore:
    """A sharded, generational, memory-mappable pseudo-label store.

    Open with :meth:`open` (or :meth:`create`). Cheap to construct and to pickle: file
    descriptors are opened lazily in the process that reads, and dropped when the process
    id changes (DataLoader workers, forks), so one instance can be handed to workers.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict) -> None:
        self.root = Path(root)
        self._m = manifest
        self._pid = os.getpid()
        self._fds: dict[tuple[int, int, str], int] = {}
        self._writing: set[int] = set()  # generations with an open writer in this instance

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        shard_sizes: Sequence[int],
        label_size: tuple[int, int],
        keep: int = 3,
        *,
        keys: Sequence[Sequence[str]] | None = None,
        conf_names: Sequence[str] = DEFAULT_CONF_NAMES,
        overwrite: bool = False,
        extra: dict | None = None,
    ) -> LabelStore:
        """Create an empty store (no generation yet) in ``root``. Not collective: call it
        on one process, then let the others :meth:`open` it after a barrier.

        Args:
            shard_sizes: samples per label shard (= per data shard), in shard order.
            label_size: (h, w) store resolution.
            keep: committed generations kept by retention (>= 2, so that a reader one
                commit behind never loses its generation).
            keys: optional sample keys per shard (used by ``export`` / ``diff --gt-dir``).
            conf_names: names of the per-sample float32 side values a writer may pass.
            overwrite: replace an existing store (its generations are deleted).
            extra: more top-level manifest fields, kept across commits (a training run's
                store records its corpus and run directory here: ``labels/runstore.py``).
        """
        root = Path(root)
        sizes = [int(n) for n in shard_sizes]
        if not sizes or any(n < 0 for n in sizes):
            raise ValueError(
                f"shard_sizes must be a non-empty list of counts >= 0, got {sizes[:8]}"
            )
        h, w = (int(v) for v in label_size)
        if h <= 0 or w <= 0:
            raise ValueError(f"label_size must be two positive ints (h, w), got {label_size!r}")
        if int(keep) < 2:
            raise ValueError(f"keep must be >= 2 (current + one for lagging readers), got {keep}")
        conf_names = [str(c) for c in conf_names]
        if GENERATION_COLUMN in conf_names or len(set(conf_names)) != len(conf_names):
            raise ValueError(f"conf_names must be distinct and not {GENERATION_COLUMN!r}")
        if keys is not None:
            keys = [[str(k) for k in ks] for ks in keys]
            lens = [len(ks) for ks in keys]
            if lens != sizes:
                raise ValueError(f"keys per shard {lens[:8]} do not match shard_sizes {sizes[:8]}")
        if (root / mf.MANIFEST).exists():
            if not overwrite:
                raise FileExistsError(f"a label store already exists at {root} (overwrite=True)")
            for p in mf.list_gen_dirs(root).values():
                shutil.rmtree(p)
            (root / mf.KEYS).unlink(missing_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        if keys is not None:
            mf.write_json_atomic(root / mf.KEYS, {"shards": keys})
        data = {
            "format": mf.FORMAT,
            "label_size": [h, w],
            "dtype": "uint8",
            "shard_sizes": sizes,
            "side_columns": [*conf_names, GENERATION_COLUMN],
            "keep": int(keep),
            "pinned": [],
            "current": -1,
            "generations": [],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if clash := sorted(set(extra or {}) & set(data)):
            raise ValueError(f"extra manifest fields {clash} would replace the store's own")
        data.update(extra or {})
        with mf.locked(root):
            mf.write_json_atomic(root / mf.MANIFEST, data)
        return cls(root, data)

    @classmethod
    def open(cls, root: str | os.PathLike) -> LabelStore:
        """Open an existing store: reads manifest.json only (no shard file is touched)."""
        root = Path(root)
        return cls(root, mf.read_manifest(root))

    def refresh(self) -> bool:
        """Re-read the manifest (after another process committed). Returns True when the
        current generation changed. Reads issued after it come from the new current one."""
        old, old_ids = self._m["current"], _commit_ids(self._m)
        self._m = mf.read_manifest(self.root)
        ids = _commit_ids(self._m)
        # Drop descriptors of generations that are gone, or were rolled back and rewritten.
        for key in [k for k in self._fds if k[0] not in ids or ids[k[0]] != old_ids.get(k[0])]:
            self._close_fd(key)
        return self._m["current"] != old

    # ------------------------------------------------------------------ properties
    @property
    def generation(self) -> int:
        """The committed generation reads use by default (-1 before the first commit)."""
        return int(self._m["current"])

    @property
    def generations(self) -> list[int]:
        """Committed generations still on disk, ascending."""
        return sorted(e["generation"] for e in self._m["generations"])

    @property
    def label_size(self) -> tuple[int, int]:
        return tuple(self._m["label_size"])

    @property
    def shard_sizes(self) -> list[int]:
        return list(self._m["shard_sizes"])

    @property
    def num_shards(self) -> int:
        return len(self._m["shard_sizes"])

    @property
    def num_samples(self) -> int:
        return sum(self._m["shard_sizes"])

    @property
    def side_columns(self) -> list[str]:
        return list(self._m["side_columns"])

    @property
    def conf_names(self) -> list[str]:
        return self.side_columns[:-1]

    @property
    def keep(self) -> int:
        return int(self._m["keep"])

    @property
    def pinned(self) -> list[int]:
        return sorted(self._m.get("pinned", []))

    @property
    def manifest(self) -> dict:
        return self._m

    def has_generation(self, generation: int) -> bool:
        """True when ``generation`` is committed and still retained (readable, rollback-able)."""
        return mf.generation_entry(self._m, generation) is not None

    # ------------------------------------------------------------------ paths
    def gen_dir(self, generation: int) -> Path:
        return self.root / mf.gen_name(generation)

    def shard_path(self, generation: int, shard: int, suffix: str = mf.LABEL_SUFFIX) -> Path:
        return self.gen_dir(generation) / f"{mf.shard_name(shard)}{suffix}"

    @property
    def frame_bytes(self) -> int:
        h, w = self.label_size
        return h * w

    # ------------------------------------------------------------------ reading
    def _resolve(self, generation: int | None) -> int:
        g = self.generation if generation is None else int(generation)
        if g < 0:
            raise LabelStoreError(f"label store {self.root} has no committed generation yet")
        if generation is not None and not self.has_generation(g):
            raise LabelStoreError(
                f"generation {g} is not committed in {self.root} (retained: {self.generations})"
            )
        return g

    def _check(self, shard: int, index: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards})")
        n = self._m["shard_sizes"][shard]
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for shard {shard} ({n} samples)")

    def _fd(self, generation: int, shard: int, suffix: str = mf.LABEL_SUFFIX) -> int:
        if self._pid != os.getpid():
            # Forked (DataLoader worker): the inherited descriptors belong to the parent's
            # bookkeeping; open our own.
            self._fds = {}
            self._pid = os.getpid()
        key = (generation, shard, suffix)
        fd = self._fds.get(key)
        if fd is None:
            path = self.shard_path(generation, shard, suffix)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as e:
                raise GenerationGoneError(
                    f"{path} is gone: generation {generation} was deleted (retention keeps "
                    f"{self.keep}, or a rollback); call refresh() to follow the current one"
                ) from e
            width = self.frame_bytes if suffix == mf.LABEL_SUFFIX else 4 * len(self.side_columns)
            want = self._m["shard_sizes"][shard] * width
            if os.fstat(fd).st_size != want:
                os.close(fd)
                raise CorruptStoreError(f"{path}: size {os.path.getsize(path)} != {want} bytes")
            while len(self._fds) >= MAX_OPEN_READS:
                self._close_fd(next(iter(self._fds)))
            self._fds[key] = fd
        return fd

    def _close_fd(self, key: tuple[int, int, str]) -> None:
        fd = self._fds.pop(key)
        if self._pid == os.getpid():
            os.close(fd)

    def read(self, shard: int, index: int, generation: int | None = None) -> np.ndarray:
        """Label of sample (shard, index) as uint8 (h, w): one pread, no file open."""
        g = self._resolve(generation)
        self._check(shard, index)
        out = np.empty(self.label_size, np.uint8)
        fb = self.frame_bytes
        if os.preadv(self._fd(g, shard), [out], index * fb) != fb:
            raise CorruptStoreError(f"short read: shard {shard} index {index} of generation {g}")
        return out

    def read_many(
        self, shards: Sequence[int], indices: Sequence[int], generation: int | None = None
    ) -> np.ndarray:
        """Labels of samples (shards[i], indices[i]) as uint8 (n, h, w), all from ONE
        generation (the pinned current one unless ``generation`` is given)."""
        if len(shards) != len(indices):
            raise ValueError(f"{len(shards)} shards but {len(indices)} indices")
        g = self._resolve(generation)
        out = np.empty((len(shards), *self.label_size), np.uint8)
        fb = self.frame_bytes
        for i, (s, j) in enumerate(zip(shards, indices)):
            s, j = int(s), int(j)
            self._check(s, j)
            if os.preadv(self._fd(g, s), [out[i]], j * fb) != fb:
                raise CorruptStoreError(f"short read: shard {s} index {j} of generation {g}")
        return out

    def read_side(
        self, shard: int, indices: Sequence[int] | None = None, generation: int | None = None
    ) -> np.ndarray:
        """Per-sample float32 side data (n, len(side_columns)): confidences (NaN where the
        writer gave none) and the generation that wrote the sample."""
        g = self._resolve(generation)
        n = self._m["shard_sizes"][shard]
        k = len(self.side_columns)
        full = np.empty((n, k), np.float32)
        if n and os.preadv(self._fd(g, shard, mf.SIDE_SUFFIX), [full], 0) != full.nbytes:
            raise CorruptStoreError(f"short read: side data of shard {shard}, generation {g}")
        return full if indices is None else full[np.asarray(indices, dtype=np.int64)]

    def memmap(self, shard: int, generation: int | None = None) -> np.ndarray:
        """Read-only np.memmap (n, h, w) of one label shard, for bulk tools. Pages it
        touches count in this process's RSS; the training path uses :meth:`read`."""
        g = self._resolve(generation)
        n = self._m["shard_sizes"][shard]
        if n == 0:  # numpy cannot map an empty file
            return np.zeros((0, *self.label_size), np.uint8)
        return np.memmap(self.shard_path(g, shard), np.uint8, "r", shape=(n, *self.label_size))

    def close(self) -> None:
        """Close this process's descriptors (reads reopen them lazily)."""
        for key in list(self._fds):
            self._close_fd(key)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        state["_writing"] = set()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: os may be torn down
            self.close()

    def __repr__(self) -> str:
        return (
            f"LabelStore({str(self.root)!r}, generation={self.generation}, "
            f"shards={self.num_shards}, samples={self.num_samples}, label_size={self.label_size})"
        )

    # ------------------------------------------------------------------ writing
    def writer(self, generation: int, world: dist.WorldInfo | None = None):
        """A :class:`GenerationWriter` for the next generation (current + 1, or 0 first).

        Call it on every rank. It (re)starts the generation for the shards this rank owns
        (``dist.owner_of_shard``): partial files of those shards from a crashed attempt are
        discarded, so nothing stale can reach a commit.
        """

        self.refresh()
        if generation != self.generation + 1:
            raise LabelStoreError(
                f"can only write generation {self.generation + 1} (current is "
                f"{self.generation}), not {generation}; rollback first to rewrite an older one"
            )
        if generation in self._writing:
            raise LabelStoreError(f"a writer for generation {generation} is already open")
        return GenerationWriter(self, generation, resolve_world(world))

    def commit(
        self,
        generation: int,
        world: dist.WorldInfo | None = None,
        verify_checksums: bool = False,
    ) -> None:
        """Make ``generation`` current. Collective when torch.distributed is initialised.

        barrier (every rank closed its writer: data fsynced) -> rank 0 verifies every shard
        is complete and writes the manifest (temp + os.replace + dir fsync) -> broadcast of
        the outcome (the second barrier) -> every rank refreshes. Raises
        IncompleteGenerationError on every rank when a sample or shard is missing; then
        the previous generation stays current.
        """
        w = resolve_world(world)
        if w.world_size > 1 and not _group_ready():
            raise LabelStoreError(
                f"world size {w.world_size} but torch.distributed is not initialised: a "
                "multi-rank commit needs a process group for its barriers"
            )
        if generation in self._writing:
            raise LabelStoreError(f"close() the writer of generation {generation} before commit")
        if w.world_size > 1:
            dist.barrier()  # every rank has closed its writer: its shards are on disk
        outcome, err = None, None
        if w.rank == 0:
            try:
                self._commit_as_rank0(generation, w.world_size, verify_checksums)
            except Exception as e:  # noqa: BLE001 - ANY failure must reach the other ranks
                err = e
                outcome = (type(e).__name__, str(e))
        if w.world_size > 1:
            outcome = dist.broadcast_object(outcome, src=0)
        if err is not None:
            raise err
        if outcome is not None:
            cls = IncompleteGenerationError if outcome[0] == "IncompleteGenerationError" else None
            raise (cls or LabelStoreError)(f"commit failed on rank 0: {outcome[1]}")
        self.refresh()
        if w.rank == 0:
            try:  # retention after the commit; a failure here never undoes the commit
                self.prune()
            except OSError as e:
                log.warning("label store %s: pruning old generations failed: %s", self.root, e)

    def verify_generation(self, generation: int, verify_checksums: bool = False) -> list[dict]:
        """Check every shard of an uncommitted ``generation`` (what rank 0 does at commit);
        return the manifest's shard entries or raise IncompleteGenerationError."""

        return verify_generation(self, generation, verify_checksums)

    def _commit_as_rank0(self, generation: int, world_size: int, verify: bool) -> None:
        entries = self.verify_generation(generation, verify)
        self.gen_dir(generation).mkdir(exist_ok=True)  # only matters when every shard is empty
        mf.fsync_dir(self.gen_dir(generation))

        def change(m: dict) -> None:
            if generation != m["current"] + 1:
                raise LabelStoreError(
                    f"cannot commit generation {generation}: current is {m['current']}"
                )
            m["generations"] = [e for e in m["generations"] if e["generation"] < generation]
            m["generations"].append(
                {
                    "generation": generation,
                    "commit_id": uuid.uuid4().hex,  # tells a rewrite after rollback apart
                    "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": socket.gethostname(),
                    "world_size": world_size,
                    # samples that kept their previous label (writer.carry_over)
                    "carried_over": sum(e["carried_over"] for e in entries),
                    "shards": entries,
                }
            )
            m["current"] = generation

        self._m = mf.update_manifest(self.root, change)
        carried = mf.generation_entry(self._m, generation)["carried_over"]
        log.info(
            "label store %s: committed generation %d%s",
            self.root,
            generation,
            f" ({carried} samples carried over from generation {generation - 1})"
            if carried
            else "",
        )

    # ------------------------------------------------------------------ management
    def prune(self, keep: int | None = None) -> list[int]:
        """Delete committed generations beyond the ``keep`` newest (never the current or a
        pinned one), and abandoned uncommitted directories below the current generation.
        Rank 0 / one process only. Returns the deleted generation numbers."""
        keep = self.keep if keep is None else int(keep)
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        gone: list[int] = []

        def change(m: dict) -> None:
            live = mf.retained(m, keep)
            gone.extend(e["generation"] for e in m["generations"] if e["generation"] not in live)
            m["generations"] = [e for e in m["generations"] if e["generation"] in live]

        with mf.locked(self.root):
            m = mf.read_manifest(self.root)
            change(m)
            if gone:
                mf.write_json_atomic(self.root / mf.MANIFEST, m)
            committed = {e["generation"] for e in m["generations"]}
            for g, path in mf.list_gen_dirs(self.root).items():
                if g < m["current"] and g not in committed:
                    shutil.rmtree(path, ignore_errors=True)
            self._m = m
        if gone:
            log.info("label store %s: deleted generation(s) %s", self.root, gone)
        return sorted(gone)

    def rollback(self, to: int) -> None:
        """Make committed generation ``to`` current again; newer generations are deleted.
        Rank 0 / one process only (others refresh() after a barrier); no writer may be
        running. The next writer then rewrites generation ``to + 1``."""

        def change(m: dict) -> None:
            if mf.generation_entry(m, to) is None:
                have = sorted(e["generation"] for e in m["generations"])
                raise LabelStoreError(f"cannot roll back to {to}: retained generations are {have}")
            m["generations"] = [e for e in m["generations"] if e["generation"] <= to]
            m["pinned"] = [p for p in m.get("pinned", []) if p <= to]
            m["current"] = to

        with mf.locked(self.root):
            m = mf.read_manifest(self.root)
            old = m["current"]
            change(m)
            mf.write_json_atomic(self.root / mf.MANIFEST, m)
            for g, path in mf.list_gen_dirs(self.root).items():
                if g > to:
                    shutil.rmtree(path, ignore_errors=True)
        self._m = m
        log.info("label store %s: rolled back from generation %d to %d", self.root, old, to)

    def pin(self, generation: int) -> None:
        """Protect a committed generation from retention (e.g. one a checkpoint names)."""

        def change(m: dict) -> None:
            if mf.generation_entry(m, generation) is None:
                raise LabelStoreError(f"cannot pin {generation}: not a retained generation")
            m["pinned"] = sorted(set(m.get("pinned", [])) | {generation})

        self._m = mf.update_manifest(self.root, change)

    def unpin(self, generation: int) -> None:
        def change(m: dict) -> None:
            m["pinned"] = sorted(set(m.get("pinned", [])) - {generation})

        self._m = mf.update_manifest(self.root, change)
