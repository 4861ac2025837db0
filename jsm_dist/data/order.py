"""The canonical sample order of a training epoch, and how ranks share it.

The position inside an epoch is one number: ``consumed``, the samples of the epoch's
canonical order already trained on. The order depends only on (seed, epoch, shard sizes,
shuffle window), never on the world size, so a checkpoint's ``consumed`` means the same to
a job of any size, and a resume starts at that position without reading what came before.

Order of epoch ``e`` (:func:`epoch_order`):

1. the non-empty shards, permuted with a seed from (seed, e);
2. cut, in that order, into *groups* of consecutive shards holding at least
   ``window`` samples together (``data.shuffle_buffer``; at least one shard per group);
3. the samples of each group in one seeded permutation (seed, e, group): a group's shards
   are interleaved and shuffled together. ``window`` <= 1: samples in shard order.

Sharing (:func:`step_span`, :func:`rank_span`): training step ``k`` of a job that starts at
``consumed = c`` consumes the *global batch* of positions ``[c + k W B, c + (k+1) W B)``
(world size W, per-rank batch B), cut at the epoch's end. Rank r takes the r-th of W
near-equal contiguous parts of it (exactly ``[.. + rB, .. + (r+1)B)`` for a full batch).
After the step, ``consumed`` is the global batch's end, whatever W is: a job of another
size re-slices the remaining positions the same way. The last global batch of an epoch may
be partial; its positions are spread over the ranks (each gets the floor or ceiling of
its share), so every position of the epoch is trained on exactly once. Only when fewer
positions than ranks are left does a rank get none: it then takes one step on a padding
sample with zero loss weight (it must join the gradient all-reduce) that counts as nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jsm_dist import dist, schema


def shard_groups(order: list[int], sizes: list[int], window: int) -> list[list[int]]:
    """Consecutive shards of ``order`` grouped until a group holds >= ``window`` samples."""
    groups: list[list[int]] = []
    current: list[int] = []
    held = 0
    for s in order:
        current.append(s)
        held += sizes[s]
        if held >= max(1, window):
            groups.append(current)
            current, held = [], 0
    if current:
        groups.append(current)
    return groups


def epoch_order(sizes: list[int], seed: int, epoch: int, window: int) -> np.ndarray:
    """(n, 2) int64 array: the (shard, index) of every sample of epoch ``epoch``, in order.

    A pure function of its arguments (every rank and worker computes the same array).
    """
    shards = [s for s, n in enumerate(sizes) if n > 0]
    rng = np.random.default_rng(dist.derive_seed(seed, schema.SEED_SHARD_ORDER, epoch))
    order = [shards[i] for i in rng.permutation(len(shards))]
    parts = []
    for g, group in enumerate(shard_groups(order, sizes, window)):
        ids = np.concatenate(
            [np.stack([np.full(sizes[s], s), np.arange(sizes[s])], axis=1) for s in group]
        )
        if window > 1:
            ids = ids[
                np.random.default_rng(
                    dist.derive_seed(seed, schema.SEED_SHUFFLE, epoch, g)
                ).permutation(len(ids))
            ]
        parts.append(ids)
    if not parts:
        return np.zeros((0, 2), np.int64)
    return np.concatenate(parts).astype(np.int64)


def steps_between(start: int, end: int, world_size: int, batch_size: int) -> int:
    """Training steps that consume positions ``[start, end)`` (the last may be partial)."""
    per_step = world_size * batch_size
    return max(0, -(-(end - start) // per_step))


def step_span(start: int, end: int, world_size: int, batch_size: int, k: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of the global batch of step ``k`` of a job starting at ``start``."""
    per_step = world_size * batch_size
    lo = start + k * per_step
    return lo, min(lo + per_step, end)


def rank_span(lo: int, hi: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part of the global batch ``[lo, hi)``: near-equal parts,
    in rank order (a full batch of W x B gives each rank exactly B)."""
    n = hi - lo
    return lo + rank * n // world_size, lo + (rank + 1) * n // world_size


def epoch_end(num_samples: int, world_size: int, batch_size: int, max_steps: int) -> int:
    """Positions an epoch consumes: all samples, or ``max_steps`` global batches of this
    world size when ``train.max_steps_per_epoch`` caps it (a debugging knob)."""
    if max_steps:
        return min(num_samples, max_steps * world_size * batch_size)
    return num_samples


def max_group_shards(sizes: list[int], window: int) -> int:
    """The most shards one shuffle group can hold, whatever the permutation: the smallest
    shards taken until they reach ``window`` (a loader worker keeps that many open)."""
    held = count = 0
    for n in sorted(n for n in sizes if n > 0):
        count += 1
        held += n
        if held >= max(1, window):
            break
    return max(1, count)


@dataclass(frozen=True)
class TrainPlan:
    """What a training loader delivers: the steps over positions ``[start, end)`` of epoch
    ``epoch``'s canonical order, this rank's part of each global batch."""

    epoch: int
    seed: int
    start: int  # positions of the epoch consumed before this loader (the data position)
    end: int  # the epoch's last position + 1
    rank: int
    world_size: int
    batch_size: int

    @property
    def n_steps(self) -> int:
        return steps_between(self.start, self.end, self.world_size, self.batch_size)

    def step_span(self, k: int) -> tuple[int, int]:
        """Global positions ``[lo, hi)`` consumed by step ``k`` (all ranks together)."""
        return step_span(self.start, self.end, self.world_size, self.batch_size, k)

    def rank_span(self, k: int) -> tuple[int, int]:
        """This rank's positions of step ``k`` (empty only when fewer are left than ranks)."""
        return rank_span(*self.step_span(k), self.rank, self.world_size)
