"""Batches: compact worker-side collation, shared-memory slots, float conversion.

Worker -> main process transfer. A DataLoader worker normally returns tensors by moving
each one into a *new* shared-memory segment, whose pages are faulted in by the worker that
fills them and again by the process that reads them; on the machines measured here that
cost about 1 ms per 352x352 sample. So:

* images travel as integers (:func:`collate`): rgb uint8 (B,3,H,W), depth uint16
  (B,1,H,W) = round(depth * 65535), label uint8 (the store's own 1/255 resolution), gt
  uint8 {0,1}: ~3.5x fewer bytes than float32; ids and text travel as plain lists;
* every worker owns ``slots`` pre-allocated shared slots (:class:`SharedBatchRing`) and a
  shared busy flag per slot; it writes a batch into a free slot, marks it busy and sends
  only the slot number. The main process either converts the slot to a float32 batch
  (:func:`expand_batch`) and frees the slot at once, or -- integer batches -- *lends* the
  slot: the batch's tensors are views of it and the slot is freed when the last of them
  is garbage collected (no copy, no fresh pages to fault in). A worker that finds no free
  slot (a consumer holding on to many batches) sends that batch the ordinary way, so
  nothing ever waits for the consumer. Only the owning worker sets a flag, only the main
  process clears it, so a slot is never overwritten while a batch still refers to it.

Integer or float batches. Converting to float32 in the main process costs 0.5-1.3 ms per
352x352 sample here (fresh float32 pages + the conversion: up to two thirds of the decode
cost, on a core the workers need); handing out a lent slot costs ~0.02 ms. The training
loader hands out integer batches by default (``DataConfig.float_on_device``) and the
training step calls :func:`to_float` after moving the batch to its device, where the
conversion is free; :func:`to_float` of a float batch only moves it.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from collections import Counter

import cv2
import numpy as np
import torch

from jsm_dist import schema
from jsm_dist.data import decode, remote

MAX_WARNINGS_PER_WORKER = 20  # detailed warnings per worker; later ones are only counted
IMAGE_KEYS = (schema.RGB, schema.DEPTH, schema.LABEL, schema.GT)


def collate(
    samples: list[dict],
    out: dict[str, np.ndarray] | None = None,
    fill=None,
    hw: tuple[int, int] | None = None,
) -> dict:
    """Samples -> a *compact* batch.

    Images travel to the main process as integers, ~3.5x fewer bytes than float32: rgb
    uint8 (B,3,H,W), depth uint16 (B,1,H,W) = round(depth * 65535), label uint8 (the
    store's resolution of 1/255), gt uint8 {0,1} (zeros when a sample has none). With
    ``out`` (a slot of a :class:`SharedBatchRing`) they are written there and left out of
    the returned dict; :func:`expand_batch` (main process) turns either form into tensors.

    By default the samples are at train size already (``augment.apply`` output) and are
    copied in. ``fill(sample, rows)`` instead writes each sample's images into its rows
    (:func:`rows`) itself -- e.g. ``augment.apply_into``, which warps straight into the
    batch -- and ``hw`` is then the batch's (H, W).
    """
    n = len(samples)
    h, w = hw if hw is not None else samples[0][schema.DEPTH].shape
    batch = {}
    if out is None:
        out = empty_images(n, h, w)
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
    fill = fill or _copy_images
    for i, s in enumerate(samples):
        fill(s, rows(out, i))
    batch.update(describe(samples))
    return batch


def empty_images(n: int, h: int, w: int) -> dict[str, np.ndarray]:
    """Uninitialised image arrays of a compact batch of ``n`` samples."""
    return {
        schema.RGB: np.empty((n, 3, h, w), np.uint8),
        schema.DEPTH: np.empty((n, 1, h, w), np.uint16),
        schema.LABEL: np.empty((n, 1, h, w), np.uint8),
        schema.GT: np.empty((n, 1, h, w), np.uint8),
    }


def rows(images: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Sample ``i``'s rows of compact batch images: rgb (3,H,W), depth / label / gt (H,W)."""
    return {k: v[i] if k == schema.RGB else v[i, 0] for k, v in images.items() if k in IMAGE_KEYS}


def describe(samples: list[dict]) -> dict:
    """The non-image part of a compact batch: ``has_gt``, ids and text as plain lists
    (every tensor would cost its own shared-memory segment on the way to the main process).
    """
    batch: dict = {schema.HAS_GT: [s.get(schema.GT) is not None for s in samples]}
    for k in schema.INT_KEYS:
        batch[k] = [int(s[k]) for s in samples]
    for k in schema.STR_KEYS:
        batch[k] = [s[k] for s in samples]
    return batch


def _copy_images(sample: dict, rows: dict[str, np.ndarray]) -> None:
    """One train-size sample (``augment.apply`` output) into its rows of a compact batch."""
    cv2.split(sample[schema.RGB], [rows[schema.RGB][c] for c in range(3)])  # HWC -> CHW planes
    depth = sample[schema.DEPTH]
    if depth.dtype == np.uint16:  # already x 65535 (the loader's decoder)
        rows[schema.DEPTH][...] = depth
    else:
        np.add(depth * np.float32(65535.0), 0.5, out=rows[schema.DEPTH], casting="unsafe")
    for key in (schema.LABEL, schema.GT):
        arr = sample.get(key)
        if arr is None:
            rows[key].fill(0)
        elif arr.dtype == np.uint8:
            rows[key][...] = arr
        else:  # float label in [0, 1]
            np.add(arr * np.float32(255.0), 0.5, out=rows[key], casting="unsafe")


_SCALES = {np.dtype(np.uint8): 1.0 / 255.0, np.dtype(np.uint16): 1.0 / 65535.0}


def expand_batch(
    batch: dict,
    pin_memory: bool = False,
    source: dict[str, np.ndarray] | None = None,
    to_float32: bool = True,
    copy: bool = True,
) -> dict:
    """Compact batch (see :func:`collate`) -> batch of tensors, in the main process.

    ``source`` holds the images when they came in a shared slot (already sliced to the
    batch). With ``to_float32`` the images become the float32 batch (what :func:`to_float`
    gives), else they keep their integer dtypes. The result refers to ``source`` only
    when ``copy`` is False (integer, unpinned): a lent slot (:meth:`SharedBatchRing.lend`).
    numpy does the work: single-threaded and predictable, where torch's intra-op threads
    would fight the loader workers for the cores.
    """
    for key in IMAGE_KEYS:
        arr = source[key] if source is not None else batch[key].numpy()
        if to_float32:
            t = torch.empty(arr.shape, dtype=torch.float32, pin_memory=pin_memory)
            np.multiply(arr, np.float32(_scale(key, arr.dtype)), out=t.numpy(), dtype=np.float32)
        elif pin_memory or (source is not None and copy):
            t = torch.empty(arr.shape, dtype=_TORCH[arr.dtype], pin_memory=pin_memory)
            np.copyto(t.numpy(), arr)
        else:
            t = torch.from_numpy(arr)  # the worker's tensor, or a view of a lent slot
        batch[key] = t
    batch[schema.HAS_GT] = torch.tensor(batch[schema.HAS_GT], dtype=torch.bool)
    for k in schema.INT_KEYS:
        batch[k] = torch.tensor(batch[k], dtype=torch.int64)
    return batch


def _scale(key: str, dtype) -> float:
    return 1.0 if key == schema.GT else _SCALES[np.dtype(dtype)]


_TORCH = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16}
_TORCH_SCALES = {torch.uint8: 1.0 / 255.0, torch.uint16: 1.0 / 65535.0}


def to_float(batch: dict, device=None, non_blocking: bool = False) -> dict:
    """Move a batch's tensors to ``device`` and make its images float32 there.

    Integer images (an integer batch of the training loader) become what the float batch
    holds: rgb and label / 255, depth / 65535 (1 = near), gt {0, 1}. Float images and
    the other tensors are only moved; non-tensor values pass through. Call it after the
    DataLoader, in the training step (on an accelerator the conversion costs nothing).
    Returns a new dict.
    """
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            out[k] = v
        elif k in IMAGE_KEYS and not v.is_floating_point():
            out[k] = _image_to_float(k, v, device, non_blocking)
        else:
            out[k] = v if device is None else v.to(device, non_blocking=non_blocking)
    return out


def _image_to_float(key: str, v: torch.Tensor, device, non_blocking: bool) -> torch.Tensor:
    if v.dtype == torch.uint16:
        # few kernels exist for uint16 (on GPUs too): move the same bits as int16, then
        # widen to int32 and mask back to 0..65535 (exact) before scaling
        v = v.view(torch.int16)
        if device is not None:
            v = v.to(device, non_blocking=non_blocking)
        return v.to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32).mul_(1.0 / 65535.0)
    if device is not None:
        v = v.to(device, non_blocking=non_blocking)
    scale = 1.0 if key == schema.GT else _TORCH_SCALES[v.dtype]
    v = v.to(torch.float32)
    return v if scale == 1.0 else v.mul_(scale)


# ---- worker side: counters and memory ------------------------------------------------
class WorkerStats:
    """Counters of one worker process; travel to the main process inside each batch."""

    def __init__(self, worker: int, log: logging.Logger) -> None:
        self.worker, self.log = worker, log
        self.skipped = 0  # samples dropped as corrupt
        self.shard_errors = 0  # tar-level errors (rest of that shard lost)
        self.reasons: Counter = Counter()
        self.delivered: Counter = Counter()  # shard -> samples decoded
        self.unslotted = 0  # batches sent without a shared slot (all were still in use)
        self.retries = 0  # remote shard reads retried after a failure (data/remote.py)
        self._last_tar_error: Exception | None = None
        self.warned = 0

    def _warn(self, msg: str) -> None:
        self.warned += 1
        if self.warned <= MAX_WARNINGS_PER_WORKER:
            self.log.warning("skipping corrupt data (worker %d): %s", self.worker, msg)
        elif self.warned == MAX_WARNINGS_PER_WORKER + 1:
            self.log.warning("worker %d: further corrupt samples are only counted", self.worker)

    def tar_error(self, exc: Exception) -> bool:
        """wds handler for tar-level failures: count, warn, go on with the next shard.

        WebDataset hands one failed read to its handlers twice (the member being read, then
        the next header); a remote shard that gave up re-raises the same exception object,
        counted once here."""
        if exc is self._last_tar_error:
            return True
        self._last_tar_error = exc
        self.shard_errors += 1
        unavailable = isinstance(exc, remote.ShardFetchError)
        self.reasons["unreadable shard source" if unavailable else "unreadable tar"] += 1
        self._warn(f"tar read error: {type(exc).__name__}: {str(exc)[:300]}")
        return True

    def decode_error(self, exc: Exception) -> bool:
        """wds handler for the decode stage: count the sample as skipped and go on."""
        self.skipped += 1
        reason = exc.reason if isinstance(exc, decode.CorruptMember) else type(exc).__name__
        self.reasons[reason] += 1
        self._warn(str(exc)[:400])
        return True

    def snapshot(self) -> dict:
        return {
            "worker": self.worker,
            "skipped": self.skipped,
            "shard_errors": self.shard_errors,
            "reasons": dict(self.reasons),
            "delivered": dict(self.delivered),
            "unslotted": self.unslotted,
            "retries": self.retries,
        }


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let this (worker) process reuse freed image buffers instead of returning them to the
    kernel: glibc serves blocks over 128 KiB with fresh mmap()s, so every decoded or warped
    image (150-400 KiB here) cost its page faults again, ~0.6 ms per 352x352 sample (half
    the loader's work after decoding). Blocks up to 32 MiB now come from the heap, which
    keeps up to 256 MiB of free memory. glibc only; elsewhere nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    return mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1 and ok


class SharedBatchRing:
    """``slots`` compact-batch slots for each of ``workers`` workers, in shared memory, zeroed.

    With ``fork`` workers the slots and busy flags are one anonymous shared mapping made
    before the fork (inherited by the children; pages are faulted in on first use,
    nothing is copied). Other start methods pickle the ring to the workers: there they are
    torch shared tensors (``share_memory_()`` copies every page once, ~40 ms per epoch).
    """

    def __init__(self, ctx, workers: int, slots: int, batch: int, size: int) -> None:
        dims = {schema.RGB: 3, schema.DEPTH: 1, schema.LABEL: 1, schema.GT: 1}
        dtypes = {
            schema.RGB: np.uint8,
            schema.DEPTH: np.uint16,
            schema.LABEL: np.uint8,
            schema.GT: np.uint8,
            _BUSY: np.uint8,
        }
        shapes = {k: (workers, slots, batch, dims[k], size, size) for k in IMAGE_KEYS}
        shapes[_BUSY] = (workers, slots)
        self.tensors: dict[str, torch.Tensor] | None = None
        self._mmap = None
        self._views: dict | None = None
        if ctx.get_start_method() == "fork":
            nbytes = {
                k: int(np.prod(shp)) * np.dtype(dtypes[k]).itemsize for k, shp in shapes.items()
            }
            self._mmap = mmap.mmap(-1, sum(nbytes.values()))  # MAP_SHARED | MAP_ANONYMOUS: zeros
            self._views, offset = {}, 0
            for k, shp in shapes.items():
                n = int(np.prod(shp))
                self._views[k] = np.frombuffer(self._mmap, dtypes[k], n, offset).reshape(shp)
                offset += nbytes[k]
        else:
            self.tensors = {
                k: torch.zeros(shp, dtype=_TORCH[np.dtype(dtypes[k])]).share_memory_()
                for k, shp in shapes.items()
            }
        self.slots = slots

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._views is None:  # built lazily: numpy views are per process
            self._views = {k: t.numpy() for k, t in self.tensors.items()}
        return self._views

    def views(self, worker: int, slot: int) -> dict[str, np.ndarray]:
        """numpy views of one slot (writable, shared between processes)."""
        return {k: v[worker, slot] for k, v in self._arrays().items() if k != _BUSY}

    def take(self, worker: int) -> int | None:
        """Worker side: this worker's lowest free slot, now marked busy; None if all are
        busy. (The lowest: the fewest distinct slots in use, each already faulted in and
        likely still in cache.)"""
        busy = self._arrays()[_BUSY][worker]
        for slot in range(self.slots):
            if not busy[slot]:
                busy[slot] = 1
                return slot
        return None

    def give_back(self, worker: int, slot: int) -> None:
        """Main side: the slot has been read; its worker may fill it again."""
        self._arrays()[_BUSY][worker, slot] = 0

    def lend(self, worker: int, slot: int, n: int) -> dict[str, np.ndarray]:
        """Main side: views of the slot's first ``n`` samples; the slot is given back when
        the last of them (and of the tensors made from them) has been garbage collected."""
        busy = self._arrays()[_BUSY]
        views = {k: v[:n] for k, v in self.views(worker, slot).items()}
        left = [len(views)]

        def one_gone() -> None:
            left[0] -= 1
            if left[0] == 0:
                busy[worker, slot] = 0

        for v in views.values():
            weakref.finalize(v, one_gone).atexit = False
        return views

    def busy_slots(self) -> int:
        return int(self._arrays()[_BUSY].sum())

    def __getstate__(self) -> dict:
        if self._mmap is not None:
            raise TypeError("a fork-only SharedBatchRing cannot be pickled (use fork workers)")
        state = dict(self.__dict__)
        state["_views"] = None
        return state


_BUSY = "_busy"
