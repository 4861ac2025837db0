"""Streaming loaders over packed WebDataset shards: training and evaluation/refinement.

Training (positions of the epoch's canonical order; see order.py for the order and how
ranks share it, shard_index.py for the reads)::

    this worker's steps k (k % workers == worker), each this rank's positions [a, b) of
    the global batch of step k, from the loader's ``start`` (the data position) on
      -> (shard, index) of each position (order.epoch_order: a pure function of seed, epoch)
    raw sample by random access: the shard's tar header index, then seek + read of its
    members (remote: read whole, once, from the stream or the shard cache)
      -> {"__key__", "__url__", "rgb.jpg"|"rgb.png", "depth.png", "json", ["gt.png"]}
    decode + label lookup (corrupt samples skipped and counted: a hole in their batch)
      -> numpy {"rgb" u8 HxWx3, "depth" u16 = [0,1] near=1 x 65535, "label" u8 (store size),
                "gt"? (never with ``read_gt=False``: gt.png is left undecoded), ids, text}
    joint augmentation, its draws seeded by (seed, epoch, shard, index), + resize to
    train_size, straight into the sample's row of a free shared-memory slot of this worker
      -> {"_slot", "_stats" (this worker's counters), ids, text, ["_padding"]}

Evaluation / refinement (a stream, each sample once)::

    shard ids of this worker, in order                                  (_one_pass)
      -> {"url": source, "file", "bytes", "sha256"} (source: path, URL or pipe: command)
    open each shard: local file; remote: retrying, resuming stream, or the verified copy
    in the shard cache (the next one downloads meanwhile)     (shard_open.shard_streams)
    tar members grouped by key              (wds tar_file_expander + group_by_keys)
    decode + label lookup, resize to train_size into a shared slot (no augmentation)

  main process (StreamLoader):
    slot -> batch dict (schema keys) of owned tensors, slot freed (batching.expand_batch)
      evaluation: float32 images; training: integer images when ``float_on_device``
      (the training step calls ``batching.to_float(batch, device)``), else float32

Training position. The loader serves positions ``[start, end)`` of the epoch: ``len()`` =
``ceil((end - start) / (world_size * batch_size))`` steps, the same on every rank (no DDP
hang at epoch end, whatever the shard sizes); step k's global batch is positions
``start + k W B ..`` and each rank takes its part of it. Every position of the epoch is
delivered once over all ranks (the last global batch may be partial), and a resume at
``start`` reads nothing before it: skipping costs nothing, whatever ``start`` is.
Batch k comes from worker ``k % num_workers`` (the DataLoader's round-robin order), so
each worker makes exactly its steps and stops. Evaluation: rank r reads exactly the shards
with ``dist.owner_of_shard(s, world) == r`` (the shards whose labels it refines and
writes), in order, each sample once, the last batch of each worker possibly partial.

Corrupt data (a truncated tar, an undecodable member, a missing member): skipped with a
warning; every worker counts them and sends its counters with each batch (and with an
end-of-stream marker the wrapper swallows), so nothing is lost across process boundaries.
At the end of an epoch the loader logs the totals and keeps them in ``loader.stats``;
the evaluation loader also reports samples of its shards that never arrived.

Remote shards (``http(s)://`` URLs, ``pipe:`` commands; see remote.py, shard_open.py and
docs/remote_shards.md): a dropped connection is retried with backoff and resumed at the
byte where it broke, so the stream above sees the same bytes as from a local file: the same
samples, ids and label-store addressing. Retries are counted (``loader.stats["retries"]``);
a shard that stays unreadable counts like a corrupt tar (its unread samples are missing).

Workers: ``num_workers`` processes per rank (0 = in the main process; evaluation: never more
than the rank's shards, clamped with a warning), started with ``start_method``. With ``fork`` (the
default, fast) the loader first sets OpenCV to one thread in this process: forking while
OpenCV's pool has live threads left workers deadlocked in OpenCV (observed here).
``forkserver``/``spawn`` need the usual ``if __name__ == "__main__"`` guard in scripts.
Batches come back through pre-allocated shared-memory slots (see batching.py). Workers keep
freed memory for reuse (``batching.keep_freed_memory``) and decode, augment and write one
sample at a time, so its images are still in cache when they are warped.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import multiprocessing
import random
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from jsm_dist import dist, schema
from jsm_dist.data import augment, decode, order, remote, shard_index, shard_open
from jsm_dist.data.batching import (
    SharedBatchRing,
    WorkerStats,
    describe,
    empty_images,
    expand_batch,
    keep_freed_memory,
    rows,
)
from jsm_dist.data.corpus import Corpus
from jsm_dist.labels import LabelStore
from jsm_dist.settings import above, at_least, check_fields, setting

log = logging.getLogger(__name__)


@dataclass
class DataConfig(augment.AugmentConfig):
    """Loader settings (the ``data`` section of a run config); the augmentation fields
    (flip, crop, rotate_deg, rotate_prob, color_jitter) come from ``AugmentConfig``."""

    train_size: int = setting(
        256, "side of the square images in a batch, pixels", check=at_least(8)
    )
    batch_size: int = setting(8, "samples per batch per rank", check=at_least(1))
    num_workers: int = setting(
        2, "loader processes per rank (0 = main process); <= shards per rank", check=at_least(0)
    )
    shuffle_buffer: int = setting(
        256,
        "training shuffle window, samples: consecutive shards of the epoch's shard order are "
        "shuffled together in groups of at least this many samples (0 or 1: shard order, "
        "samples in tar order); a worker keeps a group's shards open",
        check=at_least(0),
    )
    augment: bool = setting(True, "training augmentation on/off (evaluation never augments)")
    read_labels: bool = setting(True, "read the label from the label store (False: zeros)")
    prefetch_factor: int = setting(2, "batches prefetched per worker", check=at_least(1))
    pin_memory: bool = setting(False, "pin batch memory (CUDA training)")
    start_method: Literal["fork", "forkserver", "spawn"] = setting(
        "fork", "how loader worker processes start (fork: fast start)"
    )
    float_on_device: bool = setting(
        True,
        "training batches keep integer images (rgb/label/gt uint8, depth uint16) and the "
        "training step makes them float after the move to the device (free on a GPU, off the "
        "loader's cores); False: float32 from the loader. Evaluation loaders always hand out "
        "float32",
    )

    shard_base: str = setting(
        "",
        "where the training corpus' shards are read from, instead of corpus.json's "
        "shard_base or the corpus directory: a directory, an http(s):// base URL, or a pipe: "
        "command with {file} (e.g. 'pipe:aws s3 cp s3://bucket/corpus/{file} -'); corpus.json "
        "and labels/ stay local (docs/remote_shards.md)",
    )
    shard_cache: str = setting(
        "",
        "directory keeping a verified copy of each remote shard (downloaded once, reused by "
        "later epochs and refinement passes); empty: stream remote shards, keep nothing",
    )
    shard_retries: int = setting(
        6,
        "retries of a remote shard read that failed or dropped without progress (the read "
        "resumes where it broke)",
        check=at_least(0),
    )
    shard_retry_wait: float = setting(
        1.0, "first wait before a retry, seconds (doubles per retry, up to 60)", check=above(0)
    )
    shard_timeout: float = setting(
        60.0,
        "a remote shard read with no data for this long is dropped and retried, seconds",
        check=above(0),
    )

    def __post_init__(self) -> None:
        check_fields(self, "data")


# ---- shard assignment -----------------------------------------------------------------
def balanced_split(
    shards: list[int], sizes: list[int], parts: int, seed: int | None = None
) -> list[list[int]]:
    """Deal ``shards`` to ``parts`` groups, largest first, each to the lightest group.

    ``seed`` shuffles the order first (ties between equal sizes then fall differently
    each epoch); the result is a pure function of the arguments, so every rank computes
    the same split. Groups keep shards in dealing order.
    """
    order = list(shards)
    if seed is not None:
        random.Random(seed).shuffle(order)
    order.sort(key=lambda s: -sizes[s])  # stable: shuffled order among equal sizes
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for s in order:
        k = min(range(parts), key=lambda i: (loads[i], len(groups[i]), i))
        groups[k].append(s)
        loads[k] += sizes[s]
    return groups


# ---- the per-worker pipeline --------------------------------------------------------
class _ShardStream(IterableDataset):
    """The per-worker pipeline (see the module docstring); yields batch dicts."""

    def __init__(
        self,
        corpus: Corpus,
        cfg: DataConfig,
        worker_shards: list[list[int]],
        *,
        store,
        plan: order.TrainPlan | None = None,
        read_gt: bool = True,
    ) -> None:
        super().__init__()
        self.corpus, self.cfg, self.worker_shards = corpus, cfg, worker_shards
        self.store, self.plan = store, plan
        self.train = plan is not None
        self.read_gt = read_gt  # False: gt.png is dropped undecoded, batches carry zero gt
        self.ring: SharedBatchRing | None = None  # set by StreamLoader when it has workers

    def _one_pass(self, shards: list[int], stats: WorkerStats):
        """Decoded samples of one pass over this worker's shards, in shard order (eval)."""
        paths, infos = self.corpus.shard_paths, self.corpus.shards
        items = [
            {"url": paths[s], "file": infos[s].file, "bytes": infos[s].bytes,
             "sha256": infos[s].sha256}
            for s in shards
        ]  # fmt: skip
        return wds.DataPipeline(
            # shard order -> {"url": shard source, "file", "bytes", "sha256"}
            lambda: iter(items),
            # -> raw samples {"__key__", "__url__", "<ext>": bytes}: opened (remote: retried,
            # cached), tar members grouped by key; bad tars and unreadable shards counted
            wds.pipelinefilter(shard_open.tar_samples)(self._opener, handler=stats.tar_error),
            # raw -> decoded numpy samples + label from the store; corrupt ones counted, skipped
            wds.map(self._decoder, handler=stats.decode_error),
        )

    def _eval_batches(self, shards: list[int], stats: WorkerStats):
        """Eval: lists of up to ``batch_size`` decoded samples, one pass, in shard order."""
        samples = iter(self._one_pass(shards, stats))
        while batch := list(itertools.islice(samples, self.cfg.batch_size)):
            yield batch, False

    def _train_batches(self, worker: int, n_workers: int, stats: WorkerStats):
        """Train: this worker's steps (``k % n_workers == worker``, the DataLoader's
        round-robin), each the decoded samples of this rank's positions of step k.

        Positions are read by (shard, index) from the canonical order: nothing before
        ``plan.start`` is read or decoded. A corrupt sample leaves a hole in its batch and
        shifts nothing. A batch with no readable sample (none left for this rank, or all
        corrupt) becomes a padding batch of one sample, flagged ``_padding`` (the trainer
        weights it zero)."""
        plan, cfg = self.plan, self.cfg
        ids = order.epoch_order(self.corpus.shard_sizes, plan.seed, plan.epoch, cfg.shuffle_buffer)
        keep = order.max_group_shards(self.corpus.shard_sizes, cfg.shuffle_buffer) + 1
        reader = shard_index.SampleReader(self.corpus, self._opener, keep, stats.tar_error)

        def decoded(pos: int) -> dict | None:
            shard, index = (int(v) for v in ids[pos])
            try:
                return self._decoder(reader.raw(shard, index))
            except Exception as exc:  # noqa: BLE001 - WebDataset-style handler: count, go on
                stats.decode_error(exc)
                return None

        try:
            for k in range(worker, plan.n_steps, n_workers):
                a, b = plan.rank_span(k)
                batch = [x for x in map(decoded, range(a, b)) if x is not None]
                if batch:
                    yield batch, False
                    continue
                lo = plan.step_span(k)[0]  # padding: the first readable from here on
                for pos in itertools.chain(range(lo, len(ids)), range(lo)):
                    if (x := decoded(pos)) is not None:
                        yield [x], True
                        break
                else:
                    raise RuntimeError("no readable training sample in the corpus")
        finally:
            reader.close()

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        stats = WorkerStats(worker, log)
        cfg = self.cfg
        if self.store is not None:
            self.store.refresh()
        url_to_shard = {p: i for i, p in enumerate(self.corpus.shard_paths)}
        decoder = decode.SampleDecoder(self.corpus, self.store, url_to_shard, self.read_gt)

        def decode_one(raw: dict) -> dict:
            sample = decoder(raw)
            stats.delivered[sample[schema.SHARD]] += 1
            return sample

        self._decoder = decode_one

        def retried(source: str, attempt: int, wait: float, reason: str) -> None:
            stats.retries += 1
            log.warning("worker %d: %s failed (%s); retry %d in %.1f s",
                        worker, source, reason, attempt, wait)  # fmt: skip

        self._opener = shard_open.ShardOpener(remote.FetchPolicy.from_config(cfg), retried)
        augmenting = self.train and cfg.augment
        jitter = augmenting and cfg.color_jitter
        out_hw = (cfg.train_size, cfg.train_size)
        scratch: dict = {}  # this worker's reusable intermediate images
        # without GT the batch's gt rows stay zero: shared slots start zeroed and nothing
        # writes them (their pages are never even touched), fallback batches are zeroed
        zero_gt = not self.read_gt
        plan = self.plan

        def fill(sample: dict, rows: dict) -> None:
            """Joint augmentation (train) + resize to train size, into the batch's rows.

            The draws come from the sample's own generator, seeded by (seed, epoch, shard,
            index): the same augmentation whichever rank, worker or resume delivers it."""
            rng = None
            if augmenting:
                rng = np.random.default_rng(
                    dist.derive_seed(plan.seed, schema.SEED_AUGMENT, plan.epoch,
                                     int(sample[schema.SHARD]), int(sample[schema.INDEX]))
                )  # fmt: skip
            geom = augment.sample_geometry(rng, cfg) if augmenting else augment.IDENTITY
            augment.apply_into(sample, rows, geom, rng, jitter, scratch)

        ring = self.ring if info is not None else None
        if self.train:
            batches = self._train_batches(worker, n_workers, stats)
        else:
            batches = self._eval_batches(self.worker_shards[worker], stats)
        for samples, padding in batches:
            # a free shared slot of this worker if it has one; else the DataLoader's own
            # transfer (the consumer is holding on to earlier batches)
            slot = ring.take(worker) if ring is not None else None
            if slot is not None:
                images = ring.views(worker, slot)
            else:
                images = empty_images(cfg.batch_size, *out_hw)
                if zero_gt:
                    images[schema.GT].fill(0)
                stats.unslotted += ring is not None
            # each sample is augmented into its row right after decoding (still in cache);
            # only its ids and text are kept
            metas = []
            for sample in samples:
                sample_rows = rows(images, len(metas))
                if zero_gt:
                    del sample_rows[schema.GT]
                fill(sample, sample_rows)
                meta = {k: sample[k] for k in _META_KEYS}
                meta[schema.GT] = True if sample.get(schema.GT) is not None else None  # for has_gt
                metas.append(meta)
            batch = describe(metas)
            if padding:
                batch["_padding"] = True
            if slot is not None:
                batch["_slot"] = slot
            else:
                batch.update({k: torch.from_numpy(v[: len(metas)]) for k, v in images.items()})
            batch["_stats"] = stats.snapshot()
            yield batch
        yield {"_stats": stats.snapshot(), "_end": True}


_META_KEYS = (*schema.INT_KEYS, *schema.STR_KEYS)


def _as_is(batch: dict) -> dict:
    return batch


def _worker_init(start_method: str, _: int) -> None:
    if start_method != "fork":  # a fresh interpreter: safe to configure OpenCV's pool
        cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe
    keep_freed_memory()


class StreamLoader:
    """Iterable of batch dicts with ``len()`` = batches per epoch and ``stats`` after it."""

    def __init__(
        self,
        dataset: _ShardStream,
        *,
        num_workers: int,
        n_batches: int,
        expected: dict[int, int] | None,
        name: str,
    ) -> None:
        self.dataset, self.num_workers, self.n_batches = dataset, num_workers, n_batches
        self.expected, self.name = expected, name
        self.stats: dict = {}

    def __len__(self) -> int:
        return self.n_batches

    @property
    def plan(self) -> order.TrainPlan | None:
        """Training: the positions each step consumes (None for evaluation)."""
        return self.dataset.plan

    def __iter__(self):
        cfg = self.dataset.cfg
        to_float32 = not (self.dataset.train and cfg.float_on_device)
        # collate_fn: batches are already what the main process needs (the default walks
        # every list of every batch, converting nothing)
        kwargs = {"batch_size": None, "num_workers": self.num_workers, "collate_fn": _as_is}
        pin = cfg.pin_memory and torch.cuda.is_available()
        if self.num_workers > 0:
            if cfg.start_method == "fork":
                # Forking while OpenCV's thread pool has live threads leaves the children a
                # pool they deadlock on (seen here: a worker hung in cv2.setNumThreads). One
                # thread in this process = no pool threads to inherit.
                cv2.setNumThreads(1)
            kwargs.update(
                prefetch_factor=cfg.prefetch_factor,
                worker_init_fn=functools.partial(_worker_init, cfg.start_method),
                multiprocessing_context=cfg.start_method,
            )
            ctx = multiprocessing.get_context(cfg.start_method)
            # prefetched batches + the one the consumer holds while it asks for the next
            slots = cfg.prefetch_factor + 2
            ring = SharedBatchRing(ctx, self.num_workers, slots, cfg.batch_size, cfg.train_size)
        else:
            ring = None
        self.dataset.ring = ring
        per_worker: dict[int, dict] = {}
        batches = samples = 0
        last = None  # the final training batch, handed out after the workers are shut down
        # A private generator: DataLoader otherwise draws its base seed from the global torch
        # RNG, so creating a loader would shift dropout randomness and break exact resume.
        kwargs["generator"] = torch.Generator().manual_seed(0)
        it = iter(DataLoader(self.dataset, **kwargs))
        try:
            for item in it:
                snap = item.pop("_stats")
                per_worker[snap["worker"]] = snap
                if item.pop("_end", False):
                    continue
                batches += 1
                n = len(item[schema.KEY])
                samples += n
                slot, w = item.pop("_slot", None), snap["worker"]
                if slot is None:
                    batch = expand_batch(item, pin, to_float32=to_float32)
                elif to_float32 or pin:  # converted / copied out: the slot is free again
                    views = {k: v[:n] for k, v in ring.views(w, slot).items()}
                    batch = expand_batch(item, pin, views, to_float32)
                    ring.give_back(w, slot)
                else:  # integer batch: views of the slot, freed when the batch is dropped
                    batch = expand_batch(
                        item, source=ring.lend(w, slot, n), to_float32=False, copy=False
                    )
                if self.dataset.train and batches >= self.n_batches:
                    last = batch  # a caller taking exactly len() batches never resumes us:
                    break  # stop the workers now, not when this generator is collected
                yield batch
        finally:
            del it  # shuts the workers down (they never wait for a slot)
            self.dataset.ring = None
            self._finish(per_worker, batches, samples)
        if last is not None:
            yield last

    def _finish(self, per_worker: dict[int, dict], batches: int, samples: int) -> None:
        reasons: Counter = Counter()
        delivered: Counter = Counter()
        for snap in per_worker.values():
            reasons.update(snap["reasons"])
            delivered.update({int(k): v for k, v in snap["delivered"].items()})
        skipped = sum(s["skipped"] for s in per_worker.values())
        missing = {}
        if self.expected is not None:
            missing = {
                s: n - delivered.get(s, 0)
                for s, n in self.expected.items()
                if delivered.get(s, 0) < n
            }
        self.stats = {
            "batches": batches,
            "samples": samples,
            "skipped": skipped,
            "shard_errors": sum(s["shard_errors"] for s in per_worker.values()),
            "reasons": dict(reasons),
            "missing": missing,
            # batches that found every shared slot in use (the consumer kept earlier ones)
            "unslotted": sum(s.get("unslotted", 0) for s in per_worker.values()),
            # remote shard reads retried after a dropped connection / failed command
            "retries": sum(s.get("retries", 0) for s in per_worker.values()),
            "read_gt": self.dataset.read_gt,  # False: gt rows are zeros, has_gt all False
        }
        if skipped or self.stats["shard_errors"] or missing:
            log.warning(
                "%s: %d batches, %d samples; skipped %d corrupt samples, %d unreadable shard "
                "reads (%s); samples that never arrived: %s",
                self.name,
                batches,
                samples,
                skipped,
                self.stats["shard_errors"],
                dict(reasons),
                sum(missing.values()) if missing else 0,
            )
        else:
            log.info("%s: %d batches, %d samples, no corrupt data", self.name, batches, samples)
        if self.stats["retries"]:
            log.warning("%s: %d remote shard reads retried", self.name, self.stats["retries"])


# ---- factories --------------------------------------------------------------------------
def _open_store(corpus: Corpus, cfg: DataConfig):
    if not cfg.read_labels:
        return None

    store = LabelStore.open(corpus.label_dir)
    if list(store.shard_sizes) != corpus.shard_sizes:
        raise ValueError(
            f"label store {corpus.label_dir} shard sizes {list(store.shard_sizes)[:8]} do not "
            f"match corpus {corpus.shard_sizes[:8]}"
        )
    return store


def _clamp_workers(requested: int, n_shards: int, what: str) -> int:
    if requested > n_shards:
        log.warning(
            "%s: %d workers but only %d shards on this rank: using %d",
            what,
            requested,
            n_shards,
            n_shards,
        )
        return n_shards
    return requested


def check_shards_cover_ranks(corpus: Corpus, world_size: int) -> list[int]:
    """The non-empty shards; a ValueError when there are fewer than ranks (a training rank
    reads whole shards, so one without any would have nothing to train on)."""
    nonempty = [s for s, n in enumerate(corpus.shard_sizes) if n > 0]
    if len(nonempty) < world_size:
        raise ValueError(
            f"corpus {corpus.root} has {len(nonempty)} non-empty shards for {world_size} "
            "ranks: every rank needs one (repack with a smaller --samples-per-shard, or "
            "launch fewer processes)"
        )
    return nonempty


def make_train_loader(
    corpus: Corpus,
    cfg: DataConfig,
    *,
    epoch: int,
    seed: int,
    world: dist.WorldInfo | None = None,
    read_gt: bool = True,
    start: int = 0,
    end: int | None = None,
) -> StreamLoader:
    """This rank's batches of epoch ``epoch`` from position ``start`` (samples of the epoch's
    canonical order already consumed, order.py) up to ``end`` (default: all samples).

    ``len()`` is the same on every rank: one batch per global step. ``read_gt=False``: the
    ground-truth masks are never decoded or warped; every batch's ``gt`` is zeros and
    ``has_gt`` is all False (the trainer sets it for the model modes that do not train on
    GT; only ``full`` does). Evaluation loaders always read GT.
    """
    world = world or dist.world_info()
    check_shards_cover_ranks(corpus, world.world_size)
    end = corpus.num_samples if end is None else end
    if not 0 <= start <= end <= corpus.num_samples:
        raise ValueError(
            f"train loader: positions [{start}, {end}) outside the epoch's "
            f"{corpus.num_samples} samples (a checkpoint of another corpus?)"
        )
    plan = order.TrainPlan(epoch, seed, start, end, world.rank, world.world_size, cfg.batch_size)
    # workers share the steps round-robin; more workers than steps would idle
    workers = min(cfg.num_workers, max(1, plan.n_steps))
    ds = _ShardStream(corpus, cfg, [], store=_open_store(corpus, cfg), plan=plan, read_gt=read_gt)
    return StreamLoader(
        ds,
        num_workers=workers,
        n_batches=plan.n_steps,
        expected=None,
        name=f"train loader (rank {world.rank}, epoch {epoch}, from {start})",
    )


def make_eval_loader(
    corpus: Corpus,
    cfg: DataConfig,
    *,
    world: dist.WorldInfo | None = None,
    shards: list[int] | None = None,
) -> StreamLoader:
    """Un-augmented, unshuffled; rank r reads the shards it owns (``shard % world == r``).

    ``shards`` restricts the candidates (the owner rule still applies). Every sample of
    the selected shards arrives exactly once over all ranks; ``len()`` assumes none is
    corrupt. Ranks may get different batch counts (evaluation has no DDP step).
    """
    world = world or dist.world_info()
    sizes = corpus.shard_sizes
    candidates = range(len(sizes)) if shards is None else shards
    for s in candidates:
        if not 0 <= s < len(sizes):
            raise ValueError(f"shard {s} out of range: corpus has {len(sizes)} shards")
    mine = [
        s
        for s in candidates
        if dist.owner_of_shard(s, world.world_size) == world.rank and sizes[s] > 0
    ]
    workers = _clamp_workers(cfg.num_workers, len(mine), "eval loader")
    worker_shards = balanced_split(mine, sizes, max(1, workers)) if mine else [[]]
    n_batches = sum(math.ceil(sum(sizes[s] for s in g) / cfg.batch_size) for g in worker_shards)
    ds = _ShardStream(corpus, cfg, worker_shards, store=_open_store(corpus, cfg))
    return StreamLoader(
        ds,
        num_workers=workers,
        n_batches=n_batches,
        expected={s: sizes[s] for s in mine},
        name=f"eval loader (rank {world.rank})",
    )
