"""GenerationWriter: one rank's writes into a new, not yet committed generation."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import numpy as np

from jsm_dist import dist
from jsm_dist.labels import manifest as mf
from jsm_dist.labels.manifest import IncompleteGenerationError, LabelStoreError

if TYPE_CHECKING:
    from jsm_dist.labels.store import LabelStore

log = logging.getLogger(__name__)

RANGE_TOL = 1e-3  # float labels may overshoot [0, 1] by rounding noise, not more
# Shard files one writer keeps open at once. A rank owns shards / world of them (a
# 1M-sample corpus in 256-sample shards on 2 ranks: ~1950), more than a common soft limit
# of 1024 descriptors; beyond this the least recently written one is fsynced, closed,
# and reopened (never truncated) when written again.
MAX_OPEN_SHARDS = 64


def to_uint8(labels, n: int, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) | (n, 1, h, w) uint8 / bool / float in [0, 1] (numpy or torch) -> uint8
    (n, *size), C-contiguous. Other resolutions are resized bilinearly."""
    if hasattr(labels, "detach"):  # a torch tensor, possibly on a GPU; torch is not imported
        labels = labels.detach().float().cpu().numpy()
    a = np.asarray(labels)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2 and n == 1:
        a = a[None]
    if a.ndim != 3 or a.shape[0] != n:
        raise ValueError(f"labels must be (n={n}, h, w) or (n, 1, h, w), got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if a.size:
            lo, hi = float(np.min(a)), float(np.max(a))
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
                raise ValueError(f"float labels must lie in [0, 1], got min {lo} max {hi}")
        a = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise TypeError(f"labels must be uint8, bool or float in [0, 1], got dtype {a.dtype}")
    if a.shape[1:] != tuple(size):
        from PIL import Image

        h, w = size
        a = (
            np.stack(
                [
                    np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR), dtype=np.uint8)
                    for x in a
                ]
            )
            if n
            else np.zeros((0, h, w), np.uint8)
        )
    return np.ascontiguousarray(a)


@dataclass
class _Shard:
    fd: int | None  # None: closed to bound the open descriptors (reopened on demand)
    done: np.ndarray  # bool (n,): which samples this writer wrote (or carried over)
    side: np.ndarray  # float32 (n, k + 1): confidences, then the writing generation
    carried: np.ndarray  # bool (n,): which of them keep the previous generation's label


class GenerationWriter:
    """Writes the label shards this rank owns into generation ``g`` (not visible until
    :meth:`LabelStore.commit`). Get one from :meth:`LabelStore.writer`; use as a context
    manager or call :meth:`close` (flush + fsync + per-shard record) before committing."""

    def __init__(self, store: LabelStore, generation: int, world: dist.WorldInfo) -> None:
        self.store = store
        self.generation = generation
        self.rank, self.world_size = world.rank, world.world_size
        self.dir = store.gen_dir(generation)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.owned = [
            s
            for s in range(store.num_shards)
            if dist.owner_of_shard(s, self.world_size) == self.rank
        ]
        # Restart semantics: whatever a crashed attempt left in OUR shards is discarded
        # (record first, so a half-deleted shard can never look complete).
        for s in self.owned:
            for suffix in (mf.RECORD_SUFFIX, mf.LABEL_SUFFIX, mf.SIDE_SUFFIX):
                store.shard_path(generation, s, suffix).unlink(missing_ok=True)
        self._shards: dict[int, _Shard] = {}
        self._open: dict[int, None] = {}  # shards with an open descriptor, oldest write first
        self.closed = False
        store._writing.add(generation)

    def _state(self, shard: int) -> _Shard:
        st = self._shards.get(shard)
        if st is None:
            n = self.store.shard_sizes[shard]
            path = self.store.shard_path(self.generation, shard)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            os.ftruncate(fd, n * self.store.frame_bytes)  # sparse; `done` tracks what is real
            side = np.full((n, len(self.store.side_columns)), np.nan, np.float32)
            st = _Shard(fd, np.zeros(n, np.bool_), side, np.zeros(n, np.bool_))
            self._shards[shard] = st
            self._opened(shard)
        return st

    def _opened(self, shard: int) -> None:
        """Record ``shard``'s descriptor as the most recent; close the oldest beyond
        ``MAX_OPEN_SHARDS``."""
        self._open.pop(shard, None)
        self._open[shard] = None
        while len(self._open) > MAX_OPEN_SHARDS:
            old = next(iter(self._open))
            del self._open[old]
            # fsync before closing: a write-back error must reach this writer, and a
            # descriptor opened later might not be told of it
            os.fsync(self._shards[old].fd)
            os.close(self._shards[old].fd)
            self._shards[old].fd = None

    def _fd(self, shard: int) -> int:
        """The open descriptor of a started shard (reopened, never truncated, if it was
        closed to bound the open descriptors)."""
        st = self._shards[shard]
        if st.fd is None:
            path = self.store.shard_path(self.generation, shard)
            st.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._opened(shard)
        return st.fd

    def _owned_indices(self, shard: int, indices: Sequence[int]) -> tuple[int, np.ndarray]:
        """Validate (shard, indices) for this writer: open, owned shard, indices in range."""
        if self.closed:
            raise LabelStoreError(f"writer of generation {self.generation} is closed")
        shard = int(shard)
        if not 0 <= shard < self.store.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.store.num_shards})")
        owner = dist.owner_of_shard(shard, self.world_size)
        if owner != self.rank:
            raise LabelStoreError(
                f"rank {self.rank} does not own shard {shard} (owner: rank {owner} of "
                f"{self.world_size}); only the owner may write it"
            )
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.store.shard_sizes[shard]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(
                f"indices out of range [0, {n}) for shard {shard}: {idx.min()}..{idx.max()}"
            )
        return shard, idx

    def _pwrite(self, fd: int, idx: np.ndarray, arr: np.ndarray) -> None:
        """Write frames ``arr`` (sorted ``idx``): one pwrite per run of consecutive indices
        (a whole in-order batch = one syscall)."""
        fb = self.store.frame_bytes
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, idx.size]):
            view, off = memoryview(arr[a:b]).cast("B"), int(idx[a]) * fb
            while view:
                done = os.pwrite(fd, view, off)
                view, off = view[done:], off + done

    def write(
        self,
        shard: int,
        indices: Sequence[int],
        labels,
        conf=None,
    ) -> None:
        """Write labels of samples ``indices`` of ``shard`` (a shard this rank owns).

        Args:
            labels: uint8 (n, h, w), or float (n, h, w) / (n, 1, h, w) in [0, 1] (rounded
                to uint8), numpy or torch; resized when not at the store resolution.
            conf: optional float32 (n, k), k = len(store.conf_names) (JSM's w_g, w_d).
        """
        shard, idx = self._owned_indices(shard, indices)
        arr = to_uint8(labels, idx.size, self.store.label_size)
        k = len(self.store.conf_names)
        if conf is not None:
            if hasattr(conf, "detach"):
                conf = conf.detach().float().cpu().numpy()
            conf = np.asarray(conf, dtype=np.float32)
            if conf.shape != (idx.size, k):
                raise ValueError(
                    f"conf must be ({idx.size}, {k}) {self.store.conf_names}, got {conf.shape}"
                )
        st = self._state(shard)
        if idx.size == 0:
            return
        order = np.argsort(idx, kind="stable")  # stable: a repeated index keeps the last write
        if not np.array_equal(order, np.arange(idx.size)):
            idx, arr = idx[order], arr[order]
        self._pwrite(self._fd(shard), idx, arr)
        st.done[idx] = True
        st.carried[idx] = False  # written after all: a real new label
        st.side[idx, :k] = np.nan if conf is None else conf[order]
        st.side[idx, k] = self.generation

    def unwritten(self, shard: int) -> np.ndarray:
        """Indices of the samples of ``shard`` (owned) that this writer has neither written
        nor carried over yet: what the commit would refuse."""
        shard, _ = self._owned_indices(shard, [])
        st = self._shards.get(shard)
        if st is None:
            return np.arange(self.store.shard_sizes[shard], dtype=np.int64)
        return np.flatnonzero(~st.done)

    def carry_over(self, shard: int, indices: Sequence[int]) -> int:
        """Keep the previous generation's labels for samples that could not be refined.

        A deliberate call, for samples the refinement pass never received (an unreadable
        sample or shard): each keeps its label of generation ``g - 1`` byte for byte and,
        in the side data, the generation that wrote that label (so ``side[:, -1] < g``
        marks it as carried over) with NaN confidences. Samples this writer already wrote
        are refused: carrying over never replaces a new label. Without this call an
        unwritten sample still makes the commit fail. Returns the number carried over.
        """
        shard, idx = self._owned_indices(shard, indices)
        src = self.generation - 1
        if src < 0 or not self.store.has_generation(src):
            raise LabelStoreError(
                f"cannot carry samples over into generation {self.generation}: generation "
                f"{src} is not committed in {self.store.root}"
            )
        idx = np.unique(idx)
        st = self._state(shard)
        if idx.size == 0:
            return 0
        if st.done[idx].any():
            raise LabelStoreError(
                f"shard {shard}: cannot carry over samples this writer already wrote: "
                f"{idx[st.done[idx]][:10].tolist()}"
            )
        labels = self.store.read_many([shard] * idx.size, idx, generation=src)
        writers = self.store.read_side(shard, idx, generation=src)[:, -1]
        self._pwrite(self._fd(shard), idx, labels)
        st.done[idx] = True
        st.carried[idx] = True
        st.side[idx, :-1] = np.nan
        st.side[idx, -1] = writers
        return int(idx.size)

    def close(self) -> None:
        """Flush + fsync every shard this writer touched and write its record (what rank 0
        checks at commit). Idempotent."""
        if self.closed:
            return
        for shard, st in sorted(self._shards.items()):
            n = st.done.size
            fd = self._fd(shard)
            os.fsync(fd)
            sha = mf.sha256_fd(fd, n * self.store.frame_bytes)
            os.close(fd)
            st.fd = None
            self._open.pop(shard, None)
            side = st.side.tobytes()
            with open(self.store.shard_path(self.generation, shard, mf.SIDE_SUFFIX), "wb") as f:
                f.write(side)
                f.flush()
                os.fsync(f.fileno())
            missing = np.flatnonzero(~st.done)
            carried = np.flatnonzero(st.carried)
            record = {
                "generation": self.generation,
                "shard": shard,
                "count": n,
                "written": int(n - missing.size),  # carried-over samples included
                "missing_head": missing[:10].tolist(),
                "carried_over": int(carried.size),
                "carried_head": carried[:10].tolist(),
                "sha256": sha,
                "side_sha256": hashlib.sha256(side).hexdigest(),
                "rank": self.rank,
                "world_size": self.world_size,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "closed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            rec_path = self.store.shard_path(self.generation, shard, mf.RECORD_SUFFIX)
            mf.write_json_atomic(rec_path, record, sync_dir=False)
            if missing.size:
                log.warning(
                    "generation %d shard %d: %d of %d samples never written",
                    self.generation,
                    shard,
                    missing.size,
                    n,
                )
        mf.fsync_dir(self.dir)  # records (and the new shard files) are now durable
        self._finish()

    def abort(self) -> None:
        """Drop this attempt without records (a commit will refuse the generation)."""
        if not self.closed:
            for st in self._shards.values():
                if st.fd is not None:
                    os.close(st.fd)
            self._finish()

    def _finish(self) -> None:
        self._shards = {}
        self._open = {}
        self.closed = True
        self.store._writing.discard(self.generation)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()


def verify_generation(
    store: LabelStore, generation: int, verify_checksums: bool = False
) -> list[dict]:
    """Check every shard of an uncommitted ``generation``; return the manifest's shard
    entries or raise IncompleteGenerationError naming every problem."""
    h, w = store.label_size
    k = len(store.side_columns)
    entries, problems = [], []
    for s, n in enumerate(store.shard_sizes):
        if n == 0:
            entries.append(
                {"sha256": hashlib.sha256(b"").hexdigest(), "side_sha256": "", "carried_over": 0}
            )
            continue
        rec_path = store.shard_path(generation, s, mf.RECORD_SUFFIX)
        if not rec_path.is_file():
            problems.append(f"shard {s}: not written (no record: its owner never closed a writer)")
            continue
        rec = mf.read_json(rec_path)
        if rec.get("generation") != generation:
            problems.append(f"shard {s}: record is for generation {rec.get('generation')}")
        elif rec.get("written") != n:
            problems.append(
                f"shard {s}: {rec.get('written')} of {n} samples written "
                f"(first missing indices: {rec.get('missing_head')})"
            )
        for suffix, size in ((mf.LABEL_SUFFIX, n * h * w), (mf.SIDE_SUFFIX, n * k * 4)):
            p = store.shard_path(generation, s, suffix)
            if not p.is_file() or p.stat().st_size != size:
                have = p.stat().st_size if p.is_file() else "missing"
                problems.append(f"shard {s}: {p.name} is {have}, expected {size} bytes")
        path = store.shard_path(generation, s)
        if verify_checksums and not problems and mf.sha256_file(path) != rec.get("sha256"):
            problems.append(f"shard {s}: checksum differs from its writer's record")
        entries.append(
            {
                "sha256": rec.get("sha256"),
                "side_sha256": rec.get("side_sha256"),
                "carried_over": int(rec.get("carried_over", 0)),
            }
        )
    if problems:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise IncompleteGenerationError(
            f"refusing to commit generation {generation} of {store.root}: "
            f"{len(problems)} problem(s):\n  {head}{more}"
        )
    return entries
