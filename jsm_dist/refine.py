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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from jsm_dist import dist, schema
from jsm_dist.data.batching import to_float
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_eval_loader
from jsm_dist.labels import LabelStore

log = logging.getLogger(__name__)


@dataclass
class RefineStats:
    generation: int  # the generation this pass committed
    samples: int = 0
    seconds: float = 0.0
    mean_abs_change: float = 0.0  # mean |L_new - L_old| over pixels, in [0, 1]
    fg_fraction_old: float = 0.0  # mean fraction of pixels > 0.5
    fg_fraction_new: float = 0.0
    w_g_mean: float = 0.5  # JSM weight of the current label
    w_g_std: float = 0.0
    text_conf: float = float("nan")  # mean text-network probability of the word (GT-free)
    quality_old: dict = field(default_factory=dict)  # metrics of generation g vs GT
    quality_new: dict = field(default_factory=dict)  # metrics of generation g+1 vs GT
    choice: dict = field(default_factory=dict)  # candidate_choice() vs GT (rank 0)
    carried_over: int = 0  # unreadable samples that kept their generation-g label (all ranks)
    grid: list = field(default_factory=list)  # a few rows for the image grid (rank 0)


def _to_label_size(x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B,1,H,W) float in [0,1] -> (B,h,w) uint8 at the store resolution."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    return (x[:, 0].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


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
    text network that scores the candidates (default the model's own; ``jsm_dist.textfit``).
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
    # per-rank sums: samples, |change|, fg old, fg new, w_g, w_g^2, text conf, text-conf
    # count, carried over
    sums = np.zeros(9, dtype=np.float64)
    # (old, new, gt, candidate) uint8 at the store size, w_d float32
    evals: list[tuple[np.ndarray, ...]] = []
    n_eval = 0
    grid: list[dict] = []
    it = loader
    if progress and world.is_main:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=f"refine gen {new_gen}", unit="batch", leave=False)
    for batch in it:
        batch = to_float(batch, device)
        out = model.refine(batch, text=text)
        new = out["label"].float()
        old = batch[schema.LABEL].float()
        new_u8 = _to_label_size(new, store.label_size)
        conf = out.get("conf")
        conf_np = conf.float().cpu().numpy().astype(np.float32) if conf is not None else None
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
        dist.fault_point("refine_batch", int(sums[0]))  # crash tests: die mid-pass
        b = new.shape[0]
        sums[0] += b
        sums[1] += (new - old).abs().mean(dim=(1, 2, 3)).sum().item()
        sums[2] += (old > 0.5).float().mean(dim=(1, 2, 3)).sum().item()
        sums[3] += (new > 0.5).float().mean(dim=(1, 2, 3)).sum().item()
        if conf is not None:
            sums[4] += conf[:, 0].float().sum().item()
            sums[5] += (conf[:, 0].float() ** 2).sum().item()
        if out.get("text_conf") is not None:
            sums[6] += out["text_conf"].float().sum().item()
            sums[7] += b
        has_gt = batch.get(schema.HAS_GT)
        if has_gt is not None and bool(has_gt.all()) and n_eval < label_eval_max:
            take = min(b, label_eval_max - n_eval)
            gt_u8 = _to_label_size(batch[schema.GT][:take], store.label_size)
            cand = out.get("candidate")
            evals.append(
                (
                    _to_label_size(old[:take], store.label_size),
                    new_u8[:take],
                    gt_u8,
                    None if cand is None else _to_label_size(cand[:take], store.label_size),
                    None if conf_np is None else conf_np[:take, 1],
                )
            )
            n_eval += take
        if world.is_main and len(grid) < grid_samples:
            for i in range(min(b, grid_samples - len(grid))):
                grid.append(
                    {
                        "rgb": batch[schema.RGB][i].permute(1, 2, 0).cpu().numpy(),
                        "depth": batch[schema.DEPTH][i, 0].cpu().numpy(),
                        "label": old[i, 0].cpu().numpy(),
                        "candidate": out["candidate"][i, 0].float().cpu().numpy()
                        if out.get("candidate") is not None
                        else new[i, 0].cpu().numpy(),
                        "refined": new[i, 0].cpu().numpy(),
                        "gt": batch[schema.GT][i, 0].cpu().numpy(),
                    }
                )
    sums[8] = carry_over_undelivered(writer, loader.stats.get("missing", {}))
    writer.close()
    store.commit(new_gen)  # collective: barrier, rank-0 verify + manifest, barrier
    store.refresh()
    if was_training:
        model.train()

    tot = dist.all_reduce_sum(sums.tolist())
    n = max(tot[0], 1.0)
    stats = RefineStats(generation=new_gen, samples=int(tot[0]), carried_over=int(tot[8]))
    stats.mean_abs_change = tot[1] / n
    stats.fg_fraction_old = tot[2] / n
    stats.fg_fraction_new = tot[3] / n
    stats.w_g_mean = tot[4] / n
    stats.w_g_std = float(np.sqrt(max(tot[5] / n - stats.w_g_mean**2, 0.0)))
    if tot[7] > 0:
        stats.text_conf = tot[6] / tot[7]
    gathered = dist.all_gather_object(evals)
    if world.is_main:
        pairs = [e for part in gathered for e in part]
        if pairs:
            from jsm_dist.evaluate import evaluate_arrays

            old_a = np.concatenate([p[0] for p in pairs])[:label_eval_max]
            new_a = np.concatenate([p[1] for p in pairs])[:label_eval_max]
            gt_a = np.concatenate([p[2] for p in pairs])[:label_eval_max]
            q_old, sm_old = evaluate_arrays(old_a, gt_a, per_image_sm=True)
            stats.quality_old = _scalar_metrics(q_old)
            stats.quality_new = _scalar_metrics(evaluate_arrays(new_a, gt_a))
            if all(p[3] is not None and p[4] is not None for p in pairs):
                from jsm_dist.eval_metrics import smeasure_per_image

                cand_a = np.concatenate([p[3] for p in pairs])[:label_eval_max]
                w_d = np.concatenate([p[4] for p in pairs])[:label_eval_max]
                sm_cand = smeasure_per_image(cand_a, gt_a)
                stats.choice = candidate_choice(sm_old, sm_cand, w_d)
        stats.grid = grid
    stats.seconds = time.perf_counter() - t0
    dist.barrier()
    return stats


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


def candidate_choice(
    s_old: np.ndarray, s_cand: np.ndarray, w_d: np.ndarray, tie: float = 0.01
) -> dict:
    """Did the update favour the better of its two candidates? (GT diagnostics)

    ``s_old`` / ``s_cand``: per-sample S-measure against GT of the current label ``L_g`` and
    of the depth-refined ``L_d`` (``eval_metrics.smeasure_per_image``; by S-measure, not
    MAE, which rewards shrinking labels); ``w_d`` the JSM weight of ``L_d`` (N,). A weight
    within ``tie`` of 0.5 is *undecided* and counted as not favouring the better one. Returns
    the shares ``favours_better`` (all samples), ``favours_better_decided`` (undecided left
    out), ``undecided``, ``cand_better`` (base rate: ``L_d`` better), ``favours_cand`` and the
    correlation of ``w_d`` with ``S(L_d) - S(L_g)``.
    """
    n = len(w_d)
    if not (len(s_old) == len(s_cand) == n) or n == 0:
        raise ValueError(f"candidate_choice: sizes {len(s_old)}, {len(s_cand)}, {n}")
    s = np.stack([np.asarray(s_old, np.float64), np.asarray(s_cand, np.float64)])
    w_d = np.asarray(w_d, dtype=np.float64)
    better_d = s[1] > s[0]
    favour_d = w_d > 0.5
    undecided = np.abs(w_d - 0.5) < tie
    right = (favour_d == better_d) & ~undecided
    d_s = s[1] - s[0]
    corr = float(np.corrcoef(w_d, d_s)[0, 1]) if n > 1 and w_d.std() > 0 and d_s.std() > 0 else 0.0
    return {
        "n": n,
        "favours_better": float(right.mean()),
        "favours_better_decided": float(right[~undecided].mean()) if (~undecided).any() else 0.0,
        "undecided": float(undecided.mean()),
        "cand_better": float(better_d.mean()),
        "favours_cand": float(favour_d.mean()),
        "corr_wd_dS": corr,
        "S_old": float(s[0].mean()),
        "S_cand": float(s[1].mean()),
    }


def _scalar_metrics(res: dict) -> dict:
    """Keep the scalar metrics of an evaluation result (drop curves)."""
    return {k: float(v) for k, v in res.items() if isinstance(v, (int, float, np.floating))}
