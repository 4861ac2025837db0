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
    gather     : rank 0 collects every rank's cache, sorts it by (shard, index) (so the
                 result does not depend on the world size), and fits a COPY of the text
                 network for ``epochs`` epochs (Adam, the model's value clipping)
    broadcast  : every rank receives the fitted weights; the refinement pass scores the
                 candidates with this copy (``JSMModel.refine(batch, text=...)``)

The copy is a scorer only: the text network inside the DDP/DeepSpeed engine is untouched (a
ZeRO optimizer would overwrite in-place edits from its fp32 partitions), and every fit starts
from the engine's current text weights. Deterministic (fixed order, seeded shuffles, eval-mode
features), so a run killed during refinement redoes the same fit on resume.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from jsm_dist import dist, jsm, schema
from jsm_dist.data.batching import to_float
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_eval_loader
from jsm_dist.models.text import TSM

log = logging.getLogger(__name__)


@dataclass
class FitStats:
    samples: int = 0  # samples the scorer was fitted on (all ranks)
    epochs: int = 0
    loss_first: float = float("nan")  # mean TSM loss of the first / last fitting epoch
    loss_last: float = float("nan")
    seconds: float = 0.0


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
) -> tuple[TSM, FitStats]:
    """A copy of ``text`` trained ``epochs`` epochs on cached pooled features.

    ``pooled``: (2, N, C) = ``masked_pool(feat, [S, 1 - S])`` per sample; the loss is the
    TSM pair (salient region -> the word, background -> class 0). ``text`` is not modified.
    Returns the copy in eval mode and the loss of the first and last epochs.
    """
    t0 = time.perf_counter()
    fitted = copy.deepcopy(text)
    stats = FitStats(samples=int(pooled.shape[1]), epochs=epochs)
    if epochs <= 0 or pooled.shape[1] == 0:
        stats.seconds = time.perf_counter() - t0
        return fitted.eval(), stats
    device = next(fitted.parameters()).device
    pooled = pooled.to(device)
    words = torch.as_tensor(words, dtype=torch.long, device=device)
    tokens = fitted.encode_text(list(captions), word_pos, words, device)
    params = [p for p in fitted.parameters() if p.requires_grad]
    opt = _adam(params, lr)
    gen = torch.Generator().manual_seed(seed)
    fitted.train()
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout draws from a seeded stream: repeatable
        torch.manual_seed(seed)
        _fit_epochs(
            fitted, opt, params, pooled, tokens, words, gen, epochs, batch_size, clip, stats
        )
    stats.seconds = time.perf_counter() - t0
    return fitted.eval(), stats


def _adam(params, lr: float) -> torch.optim.Adam:
    """Adam, fused where torch supports it (CPU and CUDA): the same update up to float
    rounding, and 1.6x faster fitting on CPU (0.91 vs 1.43 s per epoch of 384 samples, one
    thread), where the step over the 30522 x 128 token embedding dominates."""
    try:
        return torch.optim.Adam(params, lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr)


def _fit_epochs(fitted, opt, params, pooled, tokens, words, gen, epochs, batch_size, clip, stats):
    n = pooled.shape[1]
    device = pooled.device
    for epoch in range(epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            idx = idx.to(device)
            logp = torch.log_softmax(fitted.forward_pooled(pooled[:, idx], tokens.select(idx)), -1)
            loss = jsm.tsm_loss(logp, words[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_value_(params, clip)
            opt.step()
            total += float(loss.detach()) * len(idx)
        if epoch == 0:
            stats.loss_first = total / n
        stats.loss_last = total / n


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


def collect_pooled(
    model, corpus: Corpus, data_cfg: DataConfig, device: torch.device, max_samples: int = 0
) -> dict:
    """This rank's cache: pooled ``[S, 1 - S]`` features of the shards it owns (eval mode).

    ``max_samples`` (> 0) caps the cache per rank, rounded up to whole shards
    (:func:`capped_shards`). Returns numpy/list fields keyed ``pooled`` (N, 2, C) float32,
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
            pooled = model.text_pooled(batch[schema.RGB])  # (2, B, C)
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
        cat["pooled"] = np.zeros((0, 2, c), np.float32)
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
) -> tuple[TSM, FitStats]:
    """Collective: every rank caches, rank 0 fits, every rank gets the fitted scorer.

    ``model`` is the unwrapped weak-mode ``JSMModel``. ``max_samples`` caps the cache over
    all ranks, split evenly and rounded up to whole shards (0 = every sample). ``clip``:
    gradient value clipping of the fit (the run's ``train.clip_value``; None = off).
    """
    world = dist.world_info()
    per_rank = -(-max_samples // world.world_size) if max_samples > 0 else 0
    mine = collect_pooled(model, corpus, data_cfg, device, per_rank)
    parts = dist.gather_object(mine)  # rank 0 alone fits: only it needs the caches
    fitted, state, stats = None, None, FitStats()
    if world.is_main:
        order_keys = [(int(s), int(i)) for p in parts for s, i in zip(p["shard"], p["index"])]
        order = sorted(range(len(order_keys)), key=order_keys.__getitem__)
        pooled = torch.from_numpy(np.concatenate([p["pooled"] for p in parts])[order])
        captions = [c for p in parts for c in p["caption"]]
        fitted, stats = fit_pooled(
            model.text,
            pooled.transpose(0, 1).contiguous(),
            [captions[i] for i in order],
            torch.from_numpy(np.concatenate([p["word_pos"] for p in parts])[order]),
            torch.from_numpy(np.concatenate([p["word"] for p in parts])[order]),
            epochs=epochs,
            lr=lr,
            seed=seed,
            clip=clip,
        )
        state = {k: v.cpu() for k, v in fitted.state_dict().items()}
        log.info(
            "text fitting: %d samples, %d epochs, loss %.4f -> %.4f, %.1fs",
            stats.samples,
            stats.epochs,
            stats.loss_first,
            stats.loss_last,
            stats.seconds,
        )
    state, stats = dist.broadcast_object((state, stats))
    if fitted is None:  # the other ranks build the same scorer from rank 0's weights
        fitted = copy.deepcopy(model.text)
        fitted.load_state_dict(state)
    return fitted.to(device).eval(), stats
