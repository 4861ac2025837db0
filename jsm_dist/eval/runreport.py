"""Report of a training run: label quality per generation and the final RGB-only model.

``python -m jsm_dist.eval.runreport --run runs/demo --corpus shards/demo/train
--eval-corpus shards/demo/test`` reads the run's ``metrics.jsonl`` (written by the training
job's telemetry) and ``model.pt``, evaluates the model on the held-out corpus with RGB
only, and writes ``<run>/report.md`` with tables, PR / F-measure curves and image grids.

Label generations are scored against GT during training (every refinement pass scores
the generation it read and the one it wrote, on the training split, where labels exist);
the held-out split has no refined labels, so there the final model is compared with the
handcrafted initial labels (generation 0 of the held-out corpus's store: CDCP on RGB-D).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jsm_dist import dist, schema
from jsm_dist.config import build_config
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.stream import DataConfig, make_eval_loader
from jsm_dist.eval.metrics import evaluate_arrays
from jsm_dist.eval.report import write_report
from jsm_dist.models import load_model
from jsm_dist.telemetry import image_grid

log = logging.getLogger(__name__)

LABEL_COLS = (
    "generation",
    "Sm",
    "maxF",
    "MAE",
    "fg",
    "main off",
    "any off",
    "mass out",
    "w_g mean",
    "w_g std",
    "text conf",
    "favours better",
    "L_d better",
    "change",
    "carried over",
)


def read_log(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} a training run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def label_rows(records: list[dict]) -> list[dict]:
    """One row per label generation from the run's refine events (generation 0 first)."""
    events = [r for r in records if r.get("kind") == "event" and r.get("name") == "refine"]
    rows: dict[int, dict] = {}
    for ev in events:
        gen = int(ev["generation"])
        if gen - 1 not in rows and ev.get("quality_old"):
            q = ev["quality_old"]
            rows[gen - 1] = {"generation": gen - 1, **_q(q), "fg": ev.get("fg_old", math.nan)}
        q = ev.get("quality_new") or {}
        rows[gen] = {
            "generation": gen,
            **_q(q),
            "fg": ev.get("fg_new", math.nan),
            "w_g mean": ev.get("w_g_mean", math.nan),
            "w_g std": ev.get("w_g_std", math.nan),
            "text conf": ev.get("text_conf", math.nan),
            "change": ev.get("mean_abs_change", math.nan),
            # samples the pass could not read (they kept their previous label)
            "carried over": ev.get("carried_over", math.nan),
            "favours better": (ev.get("choice") or {}).get("favours_better", math.nan),
            "L_d better": (ev.get("choice") or {}).get("cand_better", math.nan),
            "seconds": ev.get("seconds", math.nan),
        }
    return [rows[g] for g in sorted(rows)]


def _q(q: dict) -> dict:
    return {
        "Sm": q.get("Sm", math.nan),
        "maxF": q.get("maxF", math.nan),
        "MAE": q.get("MAE", math.nan),
        "main off": q.get("main_off", math.nan),
        "any off": q.get("any_off", math.nan),
        "mass out": q.get("mass_out", math.nan),
    }


def choose_generation(rows: list[dict]) -> dict:
    """The GT-free rule vs the GT-best generation.

    Rule: among refined generations, take the one whose labels the text network finds most
    consistent with the captions (highest mean text confidence of the salient word); fall
    back to the newest when no confidence was logged. GT-best: highest S-measure.
    """
    refined = [r for r in rows if r["generation"] > 0]
    scored = [r for r in refined if not math.isnan(r.get("text conf", math.nan))]
    chosen = max(scored, key=lambda r: r["text conf"]) if scored else (refined or rows)[-1]
    with_sm = [r for r in rows if not math.isnan(r.get("Sm", math.nan))]
    best = max(with_sm, key=lambda r: r["Sm"]) if with_sm else chosen
    return {
        "chosen": chosen["generation"],
        "gt_best": best["generation"],
        "chosen_Sm": chosen.get("Sm", math.nan),
        "best_Sm": best.get("Sm", math.nan),
    }


@torch.no_grad()
def predict_corpus(model, corpus, data_cfg, max_samples: int = 10_000):
    """RGB-only predictions of the model, GT and stored generation-0 labels of a corpus."""

    preds, gts, init, grid = [], [], [], []
    model.eval()
    n = 0
    for batch in make_eval_loader(corpus, data_cfg, world=dist.WorldInfo()):
        prob = model.predict(batch[schema.RGB]).float()
        if prob.shape[-2:] != batch[schema.GT].shape[-2:]:
            prob = F.interpolate(prob, size=batch[schema.GT].shape[-2:], mode="bilinear")
        preds.append(_u8(prob))
        gts.append(_u8(batch[schema.GT]))
        init.append(_u8(batch[schema.LABEL]))
        for i in range(min(len(prob), 8 - len(grid))):
            grid.append(
                {
                    "rgb": batch[schema.RGB][i].permute(1, 2, 0).numpy(),
                    "depth": batch[schema.DEPTH][i, 0].numpy(),
                    "CDCP (gen 0)": batch[schema.LABEL][i, 0].numpy(),
                    "model (RGB only)": prob[i, 0].numpy(),
                    "gt": batch[schema.GT][i, 0].numpy(),
                }
            )
        n += len(prob)
        if n >= max_samples:
            break
    return np.concatenate(preds), np.concatenate(gts), np.concatenate(init), grid


def heldout_data_config(cfg, model):
    """The run's data settings (defaults without a run config) at the input size the model
    was trained at: the size recorded in its model file, else the run's ``data.train_size``."""
    from dataclasses import replace

    data = cfg.data if cfg is not None else DataConfig()
    size = getattr(model, "train_size", None)
    return data if size in (None, data.train_size) else replace(data, train_size=size)


def _u8(x: torch.Tensor) -> np.ndarray:
    return (x[:, 0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def plot_label_quality(rows: list[dict], path: Path) -> Path | None:
    """Sm, max-F and foreground fraction of every label generation, one line each."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [r["generation"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for key, style in (("Sm", "o-"), ("maxF", "s-"), ("fg", "^--")):
        ax.plot(gens, [r.get(key, math.nan) for r in rows], style, label=key)
    ax.set_xlabel("label generation (0 = CDCP)")
    ax.set_xticks(gens)
    ax.set_title("pseudo-label quality vs GT (training split)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def timing(records: list[dict]) -> dict:
    steps = [r for r in records if r.get("kind") == "step"]
    refines = [r for r in records if r.get("name") == "refine"]
    train_s = sum(r.get("step_time", 0.0) for r in steps)
    refine_s = sum(r.get("seconds", 0.0) for r in refines)
    fit_s = sum((r.get("text_fit") or {}).get("seconds", 0.0) for r in refines)
    samples = sum(r.get("samples", 0) for r in steps)
    wait = sum(r.get("data_time", 0.0) for r in steps)
    total = train_s + refine_s + fit_s
    phases: dict[str, float] = {}
    for r in refines:
        fit = r.get("text_fit") or {}
        parts = {
            "collect": fit.get("collect_seconds", 0.0),
            "fit": fit.get("seconds", 0.0) - fit.get("collect_seconds", 0.0),
            **(r.get("phases") or {}),
        }
        for k, v in parts.items():
            phases[k] = phases.get(k, 0.0) + v
    return {
        "phases": phases,
        "train_s": train_s,
        "text_fit_s": fit_s,
        "refine_s": refine_s,
        "steps": len(steps),
        "samples_per_s": samples / train_s if train_s else math.nan,
        "data_wait_frac": wait / train_s if train_s else math.nan,
        "refine_share": (refine_s + fit_s) / total if total else math.nan,
    }


def build_report(run: Path, eval_corpus: str | None, out: Path) -> Path:

    records = read_log(run)
    rows = label_rows(records)
    md = [f"# Run report: {run}", ""]
    cfg_path = run / "config.json"
    cfg = build_config(json.loads(cfg_path.read_text())) if cfg_path.is_file() else None
    if not eval_corpus and cfg is not None:
        eval_corpus = cfg.train.eval_corpus or None  # the corpus the run was started with
    if cfg is not None:
        t = cfg.train
        md += [
            (
                f"Mode **{cfg.model.mode}**, encoder **{cfg.model.encoder}**, {t.epochs} epochs, "
                f"refinement every {t.tau} epochs, CRF {'on' if cfg.model.crf else 'off'}, "
                f"train size {cfg.data.train_size}, batch {cfg.data.batch_size} per rank."
            ),
            "",
        ]
    tm = timing(records)
    md += [
        "## Throughput",
        "",
        _table(
            ["train s", "text fit s", "refine s", "refine share", "samples/s", "data wait"],
            [
                [
                    tm["train_s"],
                    tm["text_fit_s"],
                    tm["refine_s"],
                    tm["refine_share"],
                    tm["samples_per_s"],
                    tm["data_wait_frac"],
                ]
            ],
        ),
        "",
    ]
    if tm["phases"]:
        names = list(tm["phases"])
        md += [
            (
                "Refinement time by phase (seconds on rank 0, all passes): text fitting "
                "(`collect` = the saliency forward that caches its features, `fit` = its epochs), "
                "then the pass (`decode` = waiting for the loader, `forward` = the label update "
                "without the CRF, `write` = the label store, `evaluation` = statistics and GT "
                "scores, `commit` = the collective commit)."
            ),
            "",
            _table(names, [[tm["phases"][k] for k in names]]),
            "",
        ]
    md += [
        "## Pseudo-label quality per generation (training split, vs GT)",
        "",
        (
            "Generation 0 = handcrafted CDCP labels. `fg` = mean fraction of pixels > 0.5 "
            "(watch for shrinking labels: MAE alone rewards them). Is the label on the right "
            "object (components of label > 0.5, 8-connected; off-object = under 30% of its "
            "pixels inside the GT): `main off` = share of images whose largest component is "
            "off-object, `any off` = share with any off-object component, `mass out` = share "
            "of the label mass outside the GT. `w_g` = JSM weight of the "
            "current label vs the depth-refined candidate; `text conf` = mean probability the "
            "text network gives the salient word (the GT-free selection signal). "
            "`favours better` = share of samples whose update weighted the candidate with "
            "the higher S-measure against GT more (a weight within 0.01 of 0.5 counts as "
            "not); `L_d better` = share where that is the depth-refined candidate (the base "
            "rate). Both need GT in the training corpus (diagnostics only). `carried over` "
            "= samples the pass could not read (corrupt or truncated data): they keep the "
            "previous generation's label."
        ),
        "",
    ]
    md.append(_table(LABEL_COLS, [[r.get(c, math.nan) for c in LABEL_COLS] for r in rows]))
    if rows:
        ch = choose_generation(rows)
        g0 = rows[0]
        refined = [r for r in rows if r["generation"] > 0]
        best = max(refined, key=lambda r: r["Sm"]) if refined else None
        md += [
            "",
            (
                f"- GT-free rule (highest text confidence) picks generation {ch['chosen']} "
                f"(Sm {_fmt(ch['chosen_Sm'])}); the GT-best generation is {ch['gt_best']} "
                f"(Sm {_fmt(ch['best_Sm'])})."
            ),
        ]
        if best is not None:
            beats = best["Sm"] > g0["Sm"] and best["maxF"] > g0["maxF"]
            md.append(
                f"- Best refined generation {best['generation']} vs initial labels: Sm "
                f"{_fmt(best['Sm'])} vs {_fmt(g0['Sm'])}, maxF {_fmt(best['maxF'])} vs "
                f"{_fmt(g0['maxF'])}: refined labels "
                f"{'beat' if beats else 'do NOT beat'} the initial ones on both."
            )
    if plot_label_quality(rows, out / "label_quality.png"):
        md += ["", "![label quality per generation](label_quality.png)"]
    summary = {"labels": rows, "timing": tm}
    imgs = sorted((run / "images").glob("*.png")) if (run / "images").is_dir() else []
    if imgs:
        md += [
            "",
            (
                "Label grids written at each refinement (rgb | depth | label | candidate | "
                "refined | gt):"
            ),
            "",
        ]
        md += [
            f"![{p.stem}]({p.relative_to(out) if out in p.parents else p.resolve()})"
            for p in imgs[-2:]
        ]
    model_path = run / "model.pt"
    if eval_corpus and model_path.is_file():
        corpus = Corpus.load(eval_corpus)
        model = load_model(model_path)
        preds, gts, init, grid = predict_corpus(model, corpus, heldout_data_config(cfg, model))

        name = corpus.name or "held-out"
        results = {
            "JSM model (RGB only)": {name: evaluate_arrays(preds, gts)},
            "CDCP initial labels (RGB-D)": {name: evaluate_arrays(init, gts)},
        }
        rep = write_report(results, out / "heldout", f"Held-out split ({len(preds)} scenes)")
        from PIL import Image

        Image.fromarray(image_grid(grid)).save(out / "heldout_grid.png")
        md += ["", f"## Final model on the held-out split ({len(preds)} scenes, RGB only)", ""]
        md.append(Path(rep["markdown"]).read_text().split("\n", 1)[1].replace("](", "](heldout/"))
        md += ["", "![held-out predictions](heldout_grid.png)"]
        summary["heldout"] = {
            m: {k: float(v) for k, v in r[name].items() if isinstance(v, (int, float, np.number))}
            for m, r in results.items()
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jsm_dist.eval.runreport", description=__doc__.split("\n")[0]
    )
    p.add_argument("--run", required=True, help="training run directory (holds metrics.jsonl)")
    p.add_argument("--corpus", default="", help="training corpus (informational)")
    p.add_argument(
        "--eval-corpus",
        default="",
        help="held-out packed corpus with GT (default: the run's train.eval_corpus)",
    )
    p.add_argument("--out", default="", help="report directory (default: the run directory)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run = Path(args.run)
    try:
        path = build_report(run, args.eval_corpus or None, Path(args.out) if args.out else run)
    except (FileNotFoundError, ValueError) as e:
        print(f"runreport: error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
