"""The rank-synchronized refinement pass: every rank refines the label shards it owns.

Protocol (one call of :func:`refine_labels`, all ranks together)::

    every rank : eval mode, no grad; stream the shards it owns (owner rule
                 ``shard % world_size == rank``), un-augmented, each sample once;
                 new labels = JSMModel.refine(batch) (+ optional dense CRF);
                 write them into generation g+1 of the store; samples its loader never
                 delivered (unreadable: corrupt member, truncated shard) keep their
                 generation-g label (``writer.carry_over``, counted); flush + fsync
    barrier    : LabelStore.commit(g+1): rank 0 checks every shard is complete and
                 switches the manifest atomically; barrier
    rank 0     : per-generation statistics (label change, JSM weights, foreground
                 fraction; quality of generation g and g+1 against GT when the corpus has it)

A crash anywhere before the commit leaves generation g current and intact; the training
loop checkpoints with ``refine_pending`` before calling this, so a resumed run redoes the
pass (refinement is deterministic: eval mode, fixed order) instead of losing it.

Unreadable samples. The loader skips and counts a sample it cannot decode (see
data/stream.py); the pass then carries that sample's previous label over into g+1 (marked
in the side data: its writer-generation column keeps the older generation, confidences
NaN) so one bad sample never blocks a commit. Carry-over covers exactly the samples the
loader reports as never arrived; a shard where the writer lacks more or fewer samples than
that is left incomplete, and the commit refuses it as before (a bug must not be papered
over).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from jsm_dist import dist, schema
from jsm_dist.config import Config
from jsm_dist.data.batching import to_float
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_eval_loader
from jsm_dist.labels import LabelStore
from jsm_dist.refine.stats import RefineAccumulator, RefineStats, to_label_size
from jsm_dist.refine.textfit import FitStats, fit_scorer

log = logging.getLogger(__name__)


def refine_step(
    model, corpus: Corpus, store: LabelStore, cfg: Config, *, device, refinement: int
) -> tuple[RefineStats, FitStats | None]:
    """The training job's refinement step (collective): fit the text scorer when
    ``train.text_fit_epochs`` asks for it, then one pass; returns its statistics and the
    fit's. ``refinement``: how many passes the run made before (seeds the fit)."""
    scorer, fit = None, None
    if cfg.train.text_fit_epochs > 0 and model.text is not None:
        scorer, fit = fit_scorer(
            model,
            corpus,
            cfg.data,
            device=device,
            epochs=cfg.train.text_fit_epochs,
            lr=cfg.train.text_fit_lr,
            seed=dist.derive_seed(cfg.train.seed, schema.SEED_TEXT_FIT, refinement),
            max_samples=cfg.train.text_fit_max_samples,
            clip=cfg.train.clip_value or None,
            negatives=cfg.train.text_fit_negatives,
        )
    stats = refine_labels(
        model,
        corpus,
        store,
        cfg.data,
        device=device,
        label_eval_max=cfg.train.label_eval_max,
        grid_samples=cfg.train.image_grid_samples,
        text=scorer,
    )
    return stats, fit


@torch.no_grad()
def refine_labels(
    model,
    corpus: Corpus,
    store: LabelStore,
    data_cfg: DataConfig,
    *,
    device: torch.device | None = None,
    label_eval_max: int = 2000,
    grid_samples: int = 0,
    progress: bool = True,
    text=None,
) -> RefineStats:
    """Run one refinement pass on every rank and commit generation ``g + 1``.

    ``model`` is the unwrapped ``JSMModel`` (no DDP/DeepSpeed wrapper: refinement has no
    collectives inside the forward, so ranks may see different batch counts). ``text``: the
    text network that scores the candidates (default the model's own; ``jsm_dist.refine.textfit``).
    """
    world = dist.world_info()
    device = device or torch.device("cpu")
    store.refresh()
    old_gen = store.generation
    new_gen = old_gen + 1
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()

    writer = store.writer(new_gen)
    loader = make_eval_loader(corpus, data_cfg, world=world)
    acc = RefineAccumulator(store.label_size, label_eval_max, grid_samples if world.is_main else 0)
    it = loader
    if progress and world.is_main:
        it = tqdm(loader, desc=f"refine gen {new_gen}", unit="batch", leave=False)
    phases = dict.fromkeys(("decode", "forward", "crf", "write", "evaluation", "commit"), 0.0)
    clock = _Clock(phases)
    for batch in it:
        clock.lap("decode")
        batch = to_float(batch, device)
        out = model.refine(batch, text=text, timings=phases)
        conf = out.get("conf")
        conf_np = conf.float().cpu().numpy().astype(np.float32) if conf is not None else None
        clock.lap("forward", minus="crf")
        new_u8 = to_label_size(out["label"], store.label_size)
        shards = batch[schema.SHARD].cpu().numpy()
        indices = batch[schema.INDEX].cpu().numpy()
        for s in np.unique(shards):
            sel = shards == s
            writer.write(
                int(s),
                indices[sel].tolist(),
                new_u8[sel],
                conf_np[sel] if conf_np is not None else None,
            )
        clock.lap("write")
        dist.fault_point("refine_batch", acc.samples_seen)  # crash tests: die mid-pass
        acc.step(batch, out, new_u8, conf_np)
        clock.lap("evaluation")
    clock.lap("decode")  # the loader's end of stream
    acc.carried(carry_over_undelivered(writer, loader.stats.get("missing", {})))
    writer.close()
    clock.lap("write")
    store.commit(new_gen)  # collective: barrier, rank-0 verify + manifest, barrier
    store.refresh()
    clock.lap("commit")
    if was_training:
        model.train()
    stats = acc.get_results(new_gen)  # collective: sums over ranks, GT scores on rank 0
    clock.lap("evaluation")
    dist.barrier()
    clock.lap("commit")
    stats.seconds = time.perf_counter() - t0
    stats.phases = phases
    return stats


class _Clock:
    """Adds the time since the last lap to ``phases[name]`` (``minus``: a phase timed inside
    that stretch by someone else, subtracted so that no second is counted twice)."""

    def __init__(self, phases: dict[str, float]):
        self.phases, self.t = phases, time.perf_counter()
        self.inner = 0.0

    def lap(self, name: str, minus: str | None = None) -> None:
        now = time.perf_counter()
        dt = now - self.t
        if minus is not None:
            dt -= self.phases[minus] - self.inner
            self.inner = self.phases[minus]
        self.phases[name] += dt
        self.t = now


def carry_over_undelivered(writer, missing: dict[int, int]) -> int:
    """Carry the previous label over for the samples of this rank's shards that the loader
    never delivered; returns how many.

    ``missing``: the eval loader's ``stats["missing"]`` ({shard: samples that never
    arrived}). A shard is carried over only when the writer lacks exactly that many samples;
    otherwise it is left incomplete (logged), and the commit refuses the generation on
    every rank (no rank raises here, so none is left waiting at the commit's barrier).
    """
    store, total = writer.store, 0
    for s in writer.owned:
        if store.shard_sizes[s] == 0:
            continue
        left = writer.unwritten(s)
        expected = int(missing.get(s, 0))
        if left.size != expected:
            log.error(
                "refinement of generation %d: shard %d lacks %d samples but its loader "
                "reported %d never arrived: not carried over (the commit will refuse it)",
                writer.generation,
                s,
                left.size,
                expected,
            )
            continue
        if left.size:
            total += writer.carry_over(s, left)
            log.warning(
                "refinement of generation %d: shard %d: %d unreadable samples keep their "
                "generation %d labels (carried over; first indices %s)",
                writer.generation,
                s,
                left.size,
                writer.generation - 1,
                left[:10].tolist(),
            )
    return total
