"""Statistics of one refinement pass: an accumulator (``step`` per batch, ``get_results``
at the end, the protocol PySODMetrics uses) and the ``RefineStats`` it hands back.

Per rank the accumulator keeps named running sums (samples, label change, foreground
fractions, JSM weights, text confidence, carried-over samples) and, for up to
``label_eval_max`` samples with GT, the arrays the GT diagnostics need. ``get_results``
is collective: it sums over ranks, and rank 0 scores generation g and g+1 against GT (the
SOD metrics and whether the label sits on the right object, eval/objects.py) and checks whether the update favoured the better candidate (:func:`candidate_choice`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from jsm_dist import dist, schema
from jsm_dist.eval.metrics import evaluate_arrays, smeasure_per_image
from jsm_dist.eval.objects import object_diagnostics


@dataclass
class RefineStats:
    """What one refinement pass did; every field but ``grid`` goes into the ``refine``
    event of metrics.jsonl as it is named here (:meth:`to_log`)."""

    generation: int  # the generation this pass committed
    samples: int = 0
    seconds: float = 0.0
    carried_over: int = 0  # unreadable samples that kept their generation-g label (all ranks)
    mean_abs_change: float = 0.0  # mean |L_new - L_old| over pixels, in [0, 1]
    fg_old: float = 0.0  # mean fraction of pixels > 0.5 of generation g
    fg_new: float = 0.0  # ... of generation g+1
    w_g_mean: float = 0.5  # JSM weight of the current label
    w_g_std: float = 0.0
    text_conf: float = float("nan")  # mean text-network probability of the word (GT-free)
    quality_old: dict = field(default_factory=dict)  # metrics of generation g vs GT
    quality_new: dict = field(default_factory=dict)  # metrics of generation g+1 vs GT
    choice: dict = field(default_factory=dict)  # candidate_choice() vs GT (rank 0)
    # rank 0's seconds by phase: decode (waiting for the loader), forward (the model's
    # update without the CRF), crf, write (to the store), evaluation (statistics and GT
    # scores), commit (the collective commit and the last barrier)
    phases: dict = field(default_factory=dict)
    grid: list = field(default_factory=list)  # a few rows for the image grid (rank 0)

    def to_log(self) -> dict:
        """The event fields: everything but the image rows."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "grid"}


@dataclass
class _Sums:
    """One rank's running sums (summed over ranks by ``dist.all_reduce_sum``)."""

    samples: float = 0.0
    change: float = 0.0  # sum over samples of mean |new - old|
    fg_old: float = 0.0
    fg_new: float = 0.0
    w_g: float = 0.0
    w_g_sq: float = 0.0
    text_conf: float = 0.0
    text_conf_n: float = 0.0
    carried_over: float = 0.0


def to_label_size(x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B,1,H,W) float in [0,1] -> (B,h,w) uint8 at the store resolution."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    return (x[:, 0].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


class RefineAccumulator:
    """Running statistics of one refinement pass on one rank."""

    def __init__(self, label_size: tuple[int, int], label_eval_max: int, grid_samples: int):
        self.label_size = tuple(label_size)
        self.label_eval_max = label_eval_max
        self.grid_samples = grid_samples
        self.sums = _Sums()
        self.evals: list[tuple] = []  # (old, new, gt, candidate, w_d) at the store size
        self.n_eval = 0
        self.grid: list[dict] = []

    @property
    def samples_seen(self) -> int:
        return int(self.sums.samples)

    def step(
        self,
        batch: dict,
        out: schema.RefineOutput,
        new_u8: np.ndarray,
        conf_np: np.ndarray | None = None,
    ) -> None:
        """Add one batch: its current labels, the model's refine output, the written labels
        and (when the update has them) the JSM weights as written (float32 (B, 2))."""
        s = self.sums
        new = out["label"].float()
        old = batch[schema.LABEL].float()
        conf = out.get("conf")
        b = new.shape[0]
        s.samples += b
        s.change += (new - old).abs().mean(dim=(1, 2, 3)).sum().item()
        s.fg_old += (old > 0.5).float().mean(dim=(1, 2, 3)).sum().item()
        s.fg_new += (new > 0.5).float().mean(dim=(1, 2, 3)).sum().item()
        if conf is not None:
            s.w_g += conf[:, 0].float().sum().item()
            s.w_g_sq += (conf[:, 0].float() ** 2).sum().item()
        if out.get("text_conf") is not None:
            s.text_conf += out["text_conf"].float().sum().item()
            s.text_conf_n += b
        has_gt = batch.get(schema.HAS_GT)
        if has_gt is not None and bool(has_gt.all()) and self.n_eval < self.label_eval_max:
            take = min(b, self.label_eval_max - self.n_eval)
            cand = out.get("candidate")
            w_d = None if conf_np is None else conf_np[:take, 1]
            self.evals.append(
                (
                    to_label_size(old[:take], self.label_size),
                    new_u8[:take],
                    to_label_size(batch[schema.GT][:take], self.label_size),
                    None if cand is None else to_label_size(cand[:take], self.label_size),
                    w_d,
                )
            )
            self.n_eval += take
        for i in range(min(b, self.grid_samples - len(self.grid))):
            cand = out.get("candidate")
            self.grid.append(
                {
                    "rgb": batch[schema.RGB][i].permute(1, 2, 0).cpu().numpy(),
                    "depth": batch[schema.DEPTH][i, 0].cpu().numpy(),
                    "label": old[i, 0].cpu().numpy(),
                    "candidate": (cand if cand is not None else new)[i, 0].float().cpu().numpy(),
                    "refined": new[i, 0].cpu().numpy(),
                    "gt": batch[schema.GT][i, 0].cpu().numpy(),
                }
            )

    def carried(self, n: int) -> None:
        """Count samples whose previous label was carried over (unreadable samples)."""
        self.sums.carried_over += n

    def get_results(self, generation: int) -> RefineStats:
        """Collective: the pass's statistics on every rank (GT scores and grid on rank 0)."""
        tot = _Sums(*dist.all_reduce_sum(list(dataclasses.astuple(self.sums))))
        n = max(tot.samples, 1.0)
        stats = RefineStats(
            generation=generation,
            samples=int(tot.samples),
            carried_over=int(tot.carried_over),
            mean_abs_change=tot.change / n,
            fg_old=tot.fg_old / n,
            fg_new=tot.fg_new / n,
            w_g_mean=tot.w_g / n,
        )
        stats.w_g_std = float(np.sqrt(max(tot.w_g_sq / n - stats.w_g_mean**2, 0.0)))
        if tot.text_conf_n > 0:
            stats.text_conf = tot.text_conf / tot.text_conf_n
        gathered = dist.all_gather_object(self.evals)
        if dist.world_info().is_main:
            pairs = [e for part in gathered for e in part]
            if pairs:
                self._score(pairs, stats)
            stats.grid = self.grid
        return stats

    def _score(self, pairs: list[tuple], stats: RefineStats) -> None:
        """Generation g and g+1 against GT, and whether the update favoured the better one."""
        cap = self.label_eval_max
        old_a = np.concatenate([p[0] for p in pairs])[:cap]
        new_a = np.concatenate([p[1] for p in pairs])[:cap]
        gt_a = np.concatenate([p[2] for p in pairs])[:cap]
        q_old, sm_old = evaluate_arrays(old_a, gt_a, per_image_sm=True)
        stats.quality_old = _scalar_metrics(q_old) | _objects(old_a, gt_a)
        stats.quality_new = _scalar_metrics(evaluate_arrays(new_a, gt_a)) | _objects(new_a, gt_a)
        if all(p[3] is not None and p[4] is not None for p in pairs):
            cand_a = np.concatenate([p[3] for p in pairs])[:cap]
            w_d = np.concatenate([p[4] for p in pairs])[:cap]
            stats.choice = candidate_choice(sm_old, smeasure_per_image(cand_a, gt_a), w_d)


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


def _objects(labels: np.ndarray, gts: np.ndarray) -> dict:
    """Is the label on the right object (eval/objects.py): main_off, any_off, mass_out."""
    d = object_diagnostics(labels, gts)
    return {k: d[k] for k in ("main_off", "any_off", "mass_out")}


def _scalar_metrics(res: dict) -> dict:
    """Keep the scalar metrics of an evaluation result (drop curves)."""
    return {k: float(v) for k, v in res.items() if isinstance(v, (int, float, np.floating))}
