"""Text fitting before a refinement pass: more text-network steps on cached visual tokens.

Why: the JSM weights are only as good as the text network, and a short run starves it. The
reference trains it for 60 epochs x ~220 steps (~13k steps) before its last updates; the
demo gives it 48 steps before the first refinement (384 scenes, 2 ranks, batch 8), and there
it still guesses the masked word at chance: the JSM weights come out at 0.50 +- 0.01, i.e.
the "weak" update is the text-free one (measured: docs/experiments.md, "Text fitting").

What: the text loss never reaches the image networks (the visual feature and the saliency
map are detached, paper/reference), so training the text network alone with the image
networks frozen is *exactly* joint training continued with the image learning rates at 0.
Pooling is linear, so ``GAP(feat * S)`` and ``GAP(feat * (1 - S))`` can be computed once per
sample and cached; an epoch of text-only training on the cache then costs milliseconds.

Protocol (all ranks, inside the refinement step, before the label update)::

    every rank : eval mode, no grad; stream the shards it owns, un-augmented, each sample once
                 (the refinement loader); cache the pooled pair and the caption per sample
    every rank : fit its own COPY of the text network on its own cache, data-parallel, for
                 ``epochs`` epochs (Adam, the run's value clipping): each global batch is
                 split over the ranks that hold its samples, the gradients are summed over
                 the ranks (one all-reduce per step), clipped, and every rank takes the
                 same optimizer step
    check      : a digest of the fitted weights is compared across ranks (they must be
                 identical); the refinement pass scores the candidates with this copy
                 (``JSMModel.refine(batch, text=...)``)

Split-invariant: the global sample order is (shard, index) over the shards all ranks cache,
which every rank derives from the corpus' shard sizes without communication. One shuffle per
epoch, seeded by (seed, epoch) and the same on every rank, cuts that order into global
batches, so a sample lands in the same batch whichever rank holds it; a rank holding none of
a batch takes part with an empty micro-batch. A batch's loss is the TSM loss over all its
samples (each rank's sums over the batch's global counts), so the summed gradient is the
full-batch one: the fit equals the single-process fit up to float summation order and the
dropout masks (drawn per rank). Memory per rank: its own cache (nothing is gathered) plus
two int64 arrays of the corpus' sample count per epoch for the shuffle.

Cost: the batch of 8 is small, so a step is mostly fixed cost (demo text network on one CPU
thread: ~5 ms + 1.6 ms per sample) and every step waits for the slowest rank. Demo corpus
on 2 CPU cores (``benchmarks.textfit_scaling``): with 2 ranks the busiest one spends
0.6-0.7x the CPU time of one process, the wall time is 0.84-1.02x on a quiet machine and
worse when other work shares the cores.

The copy is a scorer only: the text network inside the DDP/DeepSpeed engine is untouched (a
ZeRO optimizer would overwrite in-place edits from its fp32 partitions), and every fit starts
from the engine's current text weights. Deterministic (fixed order, seeded shuffles, seeded
dropout per rank, eval-mode features), so a run killed during refinement redoes the same fit
on resume.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from jsm_dist import dist, schema
from jsm_dist.data.batching import to_float
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_eval_loader
from jsm_dist.models.text import TSM, TextBatch

log = logging.getLogger(__name__)


@dataclass
class FitStats:
    samples: int = 0  # samples the scorer was fitted on (all ranks)
    epochs: int = 0
    loss_first: float = float("nan")  # mean TSM loss of the first / last fitting epoch
    loss_last: float = float("nan")
    seconds: float = 0.0  # the whole fit (fit_scorer: collecting the features included)
    collect_seconds: float = 0.0  # of which collecting (a saliency forward per sample)


def fit_pooled(
    text: TSM,
    pooled: torch.Tensor,
    captions: list[str],
    word_pos: torch.Tensor,
    words: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 8,
    seed: int = 0,
    clip: float | None = 0.5,
    positions: torch.Tensor | None = None,
    total: int = 0,
) -> tuple[TSM, FitStats]:
    """A copy of ``text`` trained ``epochs`` epochs on cached pooled features.

    ``pooled``: (2, N, C) = ``masked_pool(feat, [S, 1 - S])`` per sample; the loss is the
    TSM pair (salient region -> the word, background -> class 0). (2 + R, N, C): R more
    rows of other objects, each another 'negative' where not all zero
    (:func:`batch_loss_share`). ``text`` is not modified.
    Returns the copy in eval mode and the loss of the first and last epochs.

    Single process (``positions`` None): these N samples are all there is. Data-parallel
    (``positions`` given; collective, every rank calls it with its own samples):
    ``positions`` (N,) are the samples' places in the global order ``0 .. total - 1``
    (each sample on one rank); every rank gets the same weights (checked) and the same
    stats, counted over all ranks, with ``batch_size`` the global batch.
    """
    t0 = time.perf_counter()
    collective = positions is not None
    if positions is None:
        positions, total = torch.arange(pooled.shape[1]), int(pooled.shape[1])
    reduce = dist.all_reduce_tensor if collective else _same
    rank = dist.world_info().rank if collective else 0
    fitted = copy.deepcopy(text)
    device = next(fitted.parameters()).device
    positions = torch.as_tensor(positions, dtype=torch.long).cpu()
    stats = FitStats(samples=_global_count(positions, total, device, reduce), epochs=epochs)
    if epochs <= 0 or stats.samples == 0:  # the same decision on every rank
        stats.seconds = time.perf_counter() - t0
        return fitted.eval(), stats
    pooled = pooled.to(device)
    words = torch.as_tensor(words, dtype=torch.long)
    tokens = None
    if len(positions):  # a rank may own no samples at all
        tokens = fitted.encode_text(list(captions), word_pos, words, device)
    rows = _used_rows(fitted, tokens, device, reduce)
    full = _swap_in_rows(fitted, rows) if rows is not None else None
    if full is not None and tokens is not None:
        lookup = torch.full((full.num_embeddings,), -1, dtype=torch.long, device=device)
        lookup[rows] = torch.arange(len(rows), device=device)
        tokens = TextBatch(lookup[tokens.input_ids], tokens.attention_mask, tokens.mask_index)
    params = [p for p in fitted.parameters() if p.requires_grad]
    opt = _adam(params, lr)
    gen = torch.Generator().manual_seed(seed)
    fitted.train()
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout draws from a seeded stream: repeatable
        # rank 0 keeps the single-process stream; the others draw their own masks
        torch.manual_seed(seed if rank == 0 else dist.derive_seed(seed, rank))
        part = _Part(pooled, tokens, words.to(device), positions, total)
        _fit_epochs(fitted, opt, params, part, gen, epochs, batch_size, clip, reduce, stats)
    if full is not None:
        _swap_out_rows(fitted, full, rows)
    if collective:
        check_same_weights(fitted)
    stats.seconds = time.perf_counter() - t0
    return fitted.eval(), stats


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _adam(params, lr: float) -> torch.optim.Adam:
    """Adam, fused where torch supports it (CPU and CUDA): the same update up to float
    rounding, and 1.6x faster fitting on CPU (0.91 vs 1.43 s per epoch of 384 samples, one
    thread, when the fit still stepped the whole 30522 x 128 token embedding)."""
    try:
        return torch.optim.Adam(params, lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr)


def _global_count(positions: torch.Tensor, total: int, device, reduce) -> int:
    """Samples over all ranks; fails on every rank alike when a rank's places are out of
    range or the ranks disagree on ``total`` (a collective mismatch would hang instead)."""
    bad = int(((positions < 0) | (positions >= total)).sum())
    got = reduce(torch.tensor([len(positions), bad, total, 1], device=device)).tolist()
    if got[1]:
        raise ValueError(
            f"text fitting: {got[1]} cached samples lie outside the corpus' shard sizes "
            "(corpus.json does not match the shards' contents: re-pack the corpus)"
        )
    if got[2] != total * got[3]:
        raise ValueError(
            f"text fitting: the ranks disagree on the corpus size ({total} here, "
            f"{got[2]} summed over {got[3]} ranks): every rank must read the same corpus.json"
        )
    return got[0]


def _used_rows(fitted: TSM, tokens: TextBatch | None, device, reduce) -> torch.Tensor | None:
    """The token-embedding rows that the cached captions of any rank use (sorted), or None
    when the input embedding is not a plain ``nn.Embedding``.

    Why: with the MiniLM tokenizer the token embedding is 30522 x 128, 92% of the text
    network's weights, and a corpus' captions use a few hundred of its rows. Every other row
    gets a zero gradient at every step, and Adam (fresh for each fit, no weight decay) leaves
    a weight whose gradient and moments are all zero exactly where it is, so fitting the used
    rows alone is the same fit with a ~10x smaller gradient all-reduce and Adam step.
    """
    emb = fitted.bert.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        return None
    used = torch.zeros(emb.num_embeddings, dtype=torch.int32, device=device)
    if tokens is not None:
        used[tokens.input_ids.flatten()] = 1
    return reduce(used).nonzero().flatten()


def _swap_in_rows(fitted: TSM, rows: torch.Tensor) -> nn.Embedding:
    """Give ``fitted`` an input embedding of ``rows`` only; returns the full one."""
    full = fitted.bert.get_input_embeddings()
    pad = None
    if full.padding_idx is not None:  # its gradient stays zero in the small one too
        hit = (rows == full.padding_idx).nonzero().flatten()
        pad = int(hit[0]) if len(hit) else None
    w = full.weight
    small = nn.Embedding(len(rows), w.shape[1], padding_idx=pad, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        small.weight.copy_(w[rows])
    fitted.bert.set_input_embeddings(small)
    return full


def _swap_out_rows(fitted: TSM, full: nn.Embedding, rows: torch.Tensor) -> None:
    """Write the fitted rows back into the full embedding and put it back in place."""
    with torch.no_grad():
        full.weight[rows] = fitted.bert.get_input_embeddings().weight
    fitted.bert.set_input_embeddings(full)


@dataclass
class _Part:
    """This rank's share of the fitting data (tokens None: the rank holds no samples)."""

    pooled: torch.Tensor  # (2 + R, N, C) on the fitting device (R: other-object negatives)
    tokens: TextBatch | None
    words: torch.Tensor  # (N,) on the fitting device
    positions: torch.Tensor  # (N,) CPU: places in the global order
    total: int  # size of the global order


def _fit_epochs(fitted, opt, params, part: _Part, gen, epochs, batch_size, clip, reduce, stats):
    device = part.pooled.device
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
    has_word = part.words.cpu() != 0
    sums = []
    for _ in range(epochs):
        order, mine, counts = _epoch_plan(part, has_word, batch_size, gen, reduce)
        loss_sum = 0.0
        for idx, n, n_word in zip(order.split(mine), *counts):
            if n == 0:  # no rank holds a sample of this batch (never with complete caches)
                continue
            opt.zero_grad(set_to_none=True)
            if len(idx):  # else an empty micro-batch: zero gradient, same collectives
                idx = idx.to(device)
                pooled, tokens = part.pooled[:, idx], part.tokens.select(idx)
                valid = pooled[2:].abs().amax(-1) > 0  # an empty region pools to zeros
                # rows of absent regions carry no loss: they are not computed at all
                rows = torch.cat([valid.new_ones(2, len(idx)), valid])
                logp = torch.log_softmax(fitted.forward_rows(pooled, tokens, rows), -1)
                loss = batch_loss_share(logp, part.words[idx], n, n_word, valid)
                loss.backward()
                loss_sum += float(loss.detach()) * n
            _reduce_grads(params, flat, clip, reduce)
            opt.step()
        sums.append(loss_sum)
    first, last = reduce(torch.tensor([sums[0], sums[-1]], dtype=torch.float64, device=device))
    stats.loss_first = float(first) / stats.samples
    stats.loss_last = float(last) / stats.samples


def _epoch_plan(part: _Part, has_word: torch.Tensor, batch_size: int, gen, reduce):
    """One epoch's global batches as this rank sees them.

    Returns this rank's sample indices in the order of the epoch's global shuffle (one
    ``randperm`` of the global order from ``gen``, drawn alike on every rank: the batches
    of the single-process fit), how many of them fall in each global batch, and each batch's
    global counts (samples, samples with a salient word), summed over ranks.
    """
    total = part.total
    perm = torch.randperm(total, generator=gen)
    place = torch.empty(total, dtype=torch.long)
    place[perm] = torch.arange(total)
    key = place[part.positions]
    order = key.argsort(stable=True)
    batch = key[order] // batch_size
    steps = -(-total // batch_size)
    mine = torch.stack(
        [
            torch.bincount(batch, minlength=steps),
            torch.bincount(batch[has_word[order]], minlength=steps),
        ]
    )
    counts = reduce(mine.to(part.pooled.device, copy=True)).cpu()  # in place: not on mine
    return order, mine[0].tolist(), counts.tolist()


def batch_loss_share(
    logp: torch.Tensor,
    word: torch.Tensor,
    n: int,
    n_word: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's share of the TSM loss of a global batch of ``n`` samples, ``n_word`` of
    them with a salient word: :func:`jsm_dist.jsm.tsm_loss` with the batch's global counts
    as denominators, so the shares of all ranks (and their gradients) sum to the loss of
    the whole batch. ``logp`` (2 + R, b, C), ``word`` (b,): this rank's part of the batch.

    Rows 2.. are other objects (``train.text_fit_negatives``), each a further 'negative'
    example where ``valid`` (R, b) says the image has one: ``neg = -(sum_b log p(0 | bg_b)
    + sum_{r,b valid} log p(0 | region_rb)) / n`` (R = 0: the reference pair)."""
    has_word = word != 0
    pos = logp[0].gather(1, word[:, None].long())[:, 0]
    pos_nll = -(pos * has_word).sum() / max(n_word, 1)
    neg = logp[1, :, 0].sum()
    if logp.shape[0] > 2 and valid is not None:
        neg = neg + (logp[2:, :, 0] * valid).sum()
    return (pos_nll - neg / n) / 2.0


def _reduce_grads(params, flat: torch.Tensor, clip: float | None, reduce) -> None:
    """Sum the step's gradients over the ranks (one all-reduce of one buffer), clip them by
    value (after the sum: identical on every rank) and hand them to the optimizer."""
    views, start = [], 0
    for p in params:
        view = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
        if p.grad is None:  # an empty micro-batch
            view.zero_()
        else:
            view.copy_(p.grad)
        views.append(view)
    reduce(flat)
    if clip is not None:
        flat.clamp_(-clip, clip)
    for p, view in zip(params, views):
        p.grad = view


def state_digest(module: nn.Module) -> str:
    """A digest of a module's state (names, shapes, dtypes, bytes): equal iff bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for name, value in module.state_dict().items():
        flat = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def check_same_weights(module: nn.Module) -> None:
    """Collective: raise on every rank when the ranks' copies of ``module`` differ."""
    digests = dist.all_gather_object(state_digest(module))
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"text fitting: the fitted weights differ across ranks (digests by rank: {digests}); "
            "every rank must start from the same text weights, on the same kind of device"
        )


@torch.no_grad()
def capped_shards(corpus: Corpus, world_size: int, rank: int, max_samples: int) -> list[int]:
    """The shards ``rank`` owns, in order, up to the first one that brings their sample count
    to ``max_samples`` (whole shards: the cap is rounded up; 0 = all of them)."""
    mine, n = [], 0
    for s, size in enumerate(corpus.shard_sizes):
        if dist.owner_of_shard(s, world_size) != rank or size == 0:
            continue
        if max_samples > 0 and n >= max_samples:
            break
        mine.append(s)
        n += size
    return mine


def global_positions(
    corpus: Corpus, world_size: int, max_samples: int, shard, index
) -> tuple[np.ndarray, int]:
    """Places of the cached samples (``shard``, ``index``) in the global order, and its size.

    The global order is (shard, index) over the shards all ranks cache (:func:`capped_shards`
    of each rank with the per-rank cap ``max_samples``), from the corpus' shard sizes alone:
    the same on every rank, without communication. A sample outside it gets -1 (the fit then
    fails on every rank).
    """
    sizes = np.asarray(corpus.shard_sizes, np.int64)
    start = np.full(len(sizes) + 1, -1, np.int64)  # the extra slot: shards out of range
    total = 0
    for s in sorted(
        s for r in range(world_size) for s in capped_shards(corpus, world_size, r, max_samples)
    ):
        start[s] = total
        total += int(sizes[s])
    shard = np.asarray(shard, np.int64)
    index = np.asarray(index, np.int64)
    shard = np.where((shard >= 0) & (shard < len(sizes)), shard, len(sizes))
    size = np.append(sizes, 0)[shard]
    ok = (start[shard] >= 0) & (index >= 0) & (index < size)
    return np.where(ok, start[shard] + index, -1), total


def collect_pooled(
    model,
    corpus: Corpus,
    data_cfg: DataConfig,
    device: torch.device,
    max_samples: int = 0,
    negatives: int = 0,
) -> dict:
    """This rank's cache: pooled ``[S, 1 - S]`` (+ ``negatives`` other-object regions)
    features of the shards it owns (eval mode).

    ``max_samples`` (> 0) caps the cache per rank, rounded up to whole shards
    (:func:`capped_shards`). Returns numpy/list fields keyed ``pooled`` (N, 2 + negatives, C) float32,
    ``caption``, ``word_pos``, ``word``, ``shard``, ``index``.
    """
    world = dist.world_info()
    shards = capped_shards(corpus, world.world_size, world.rank, max_samples)
    was_training = model.training
    model.eval()
    out = {k: [] for k in ("pooled", "caption", "word_pos", "word", "shard", "index")}
    try:
        for batch in make_eval_loader(corpus, data_cfg, world=world, shards=shards):
            batch = to_float(batch, device)
            pooled = model.text_pooled(batch[schema.RGB], batch, negatives)  # (2 + R, B, C)
            out["pooled"].append(pooled.transpose(0, 1).float().cpu().numpy())
            out["caption"] += list(batch[schema.CAPTION])
            for key, name in (
                (schema.WORD_POS, "word_pos"),
                (schema.WORD, "word"),
                (schema.SHARD, "shard"),
                (schema.INDEX, "index"),
            ):
                out[name].append(batch[key].cpu().numpy())
    finally:
        model.train(was_training)
    c = model.text.v_conv.in_channels
    cat = {
        k: np.concatenate(v) if v else np.zeros(0, np.int64)
        for k, v in out.items()
        if k != "caption"
    }
    if not out["pooled"]:
        cat["pooled"] = np.zeros((0, 2 + negatives, c), np.float32)
    cat["caption"] = out["caption"]
    return cat


def fit_scorer(
    model,
    corpus: Corpus,
    data_cfg: DataConfig,
    *,
    device: torch.device,
    epochs: int,
    lr: float,
    seed: int,
    max_samples: int = 0,
    clip: float | None = None,
    negatives: int = 0,
) -> tuple[TSM, FitStats]:
    """Collective: every rank caches its shards and fits the same scorer, data-parallel.

    ``model`` is the unwrapped weak-mode ``JSMModel``. ``max_samples`` caps the cache over
    all ranks, split evenly and rounded up to whole shards (0 = every sample). ``clip``:
    gradient value clipping of the fit (the run's ``train.clip_value``; None = off).
    ``negatives``: other-object regions per sample trained as 'negative'
    (``train.text_fit_negatives``; :meth:`JSMModel.text_pooled`).
    """
    world = dist.world_info()
    t0 = time.perf_counter()
    per_rank = -(-max_samples // world.world_size) if max_samples > 0 else 0
    mine = collect_pooled(model, corpus, data_cfg, device, per_rank, negatives)
    collect_s = time.perf_counter() - t0
    order = np.lexsort((mine["index"], mine["shard"]))  # a fixed order within the rank
    positions, total = global_positions(
        corpus, world.world_size, per_rank, mine["shard"][order], mine["index"][order]
    )
    fitted, stats = fit_pooled(
        model.text,
        torch.from_numpy(mine["pooled"][order]).transpose(0, 1).contiguous(),
        [mine["caption"][i] for i in order],
        torch.from_numpy(mine["word_pos"][order]),
        torch.from_numpy(mine["word"][order]),
        epochs=epochs,
        lr=lr,
        seed=seed,
        clip=clip,
        positions=torch.from_numpy(positions),
        total=total,
    )
    stats.collect_seconds, stats.seconds = collect_s, time.perf_counter() - t0
    if world.is_main:
        log.info(
            "text fitting: %d samples, %d epochs, %d ranks, loss %.4f -> %.4f, %.1fs",
            stats.samples,
            stats.epochs,
            world.world_size,
            stats.loss_first,
            stats.loss_last,
            stats.seconds,
        )
    return fitted.to(device).eval(), stats
