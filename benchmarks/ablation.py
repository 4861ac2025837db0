"""Mode ablation: label quality per generation and the final RGB-only model, per setting.

    python -m benchmarks.ablation [--corpus DIR] [--out runs/ablation] [--seeds 0,1]
                                  [--variants blend,regions-notext,regions-text]

Packs a synthetic corpus with a held-out split (unless ``--corpus`` names one packed with
``--holdout``; the demo's corpus is ``shards/demo``), then trains once per variant and seed
with ``accelerate launch`` (2 CPU processes), every run with ``configs/demo.yaml`` (the demo's
budget) unless options override it. Label-update variants (the default set):

- ``blend``           the paper's update: w_g L_g + w_d L_d, text-weighted (reference)
- ``regions-notext``  region repair, regions scored by the saliency network's confidence
- ``regions-text``    region repair, regions scored by the text network

Older mode variants:

- ``weak``          JSM: text-weighted update (captions), reference post-processing + CRF;
                    the candidates are scored by a text network fitted ``--text-fit-epochs``
                    epochs on cached features before each pass (``train.text_fit_epochs``)
- ``weak-nofit``    the same, scored by the jointly trained text network as it is (reference)
- ``weak-odds``     ``weak`` with the candidates scored by the log-odds of the word against
                    "negative" (``model.jsm_score=word_vs_negative``) instead of ``log p(word)``
- ``weak-nopost``   ``weak`` without sigmoid/min-max/CRF post-processing
- ``unsupervised``  SSM/BNS update without the text network (fixed weights)
- ``none``          no refinement: trains on the handcrafted labels throughout

and prints one markdown table of label quality per generation (training split, vs GT:
S-measure, max-F, MAE, foreground fraction, JSM weights, text confidence, share of samples
whose update favoured the candidate better by S-measure) plus the final
model's held-out metrics, the GT-free generation choice and the GT-best generation.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jsm_dist.launching.command import local_launch

VARIANTS = {
    "weak": ["--model.mode", "weak"],
    "weak-nofit": ["--model.mode", "weak", "--text_fit_epochs", "0"],
    "weak-odds": ["--model.mode", "weak", "--model.jsm_score", "word_vs_negative"],
    "weak-nopost": [
        "--model.mode",
        "weak",
        "--model.crf",
        "false",
        "--model.post_sigmoid",
        "false",
        "--model.post_minmax",
        "false",
    ],
    "unsupervised": ["--model.mode", "unsupervised"],
    "none": ["--model.mode", "weak", "--tau", "0"],
    # the label-update comparison (the README's results table): the paper's blend, region
    # repair scored without text (saliency confidence), region repair scored by the text
    # network; everything else as in configs/demo.yaml
    "blend": ["--model.mode", "weak", "--model.label_update", "blend"],
    "regions-notext": [
        "--model.mode", "weak", "--model.label_update", "regions",
        "--model.region_score", "saliency",
    ],
    "regions-text": [
        "--model.mode", "weak", "--model.label_update", "regions",
        "--model.region_score", "text",
    ],
}  # fmt: skip
UPDATE_VARIANTS = ("blend", "regions-notext", "regions-text")


def _fmt(v) -> str:
    return (
        "-"
        if v is None or (isinstance(v, float) and math.isnan(v))
        else (f"{v:.3f}" if isinstance(v, float) else str(v))
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation", description=__doc__.split("\n")[0]
    )
    p.add_argument("--corpus", default="", help="corpus root packed with --holdout (train/, test/)")
    p.add_argument("--out", default="runs/ablation", help="output directory")
    p.add_argument("--samples", type=int, default=480, help="synthetic scenes when packing")
    p.add_argument("--size", type=int, default=128, help="image and train size")
    p.add_argument("--config", default="configs/demo.yaml", help="training config of every run")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the config's)")
    p.add_argument("--tau", type=int, default=None, help="train.tau (default: the config's)")
    p.add_argument("--procs", type=int, default=2, help="processes per run")
    p.add_argument("--lr", type=float, default=None, help="train.lr (default: the config's)")
    p.add_argument("--encoder", default=None, help="model.encoder (default: the config's)")
    p.add_argument(
        "--text-fit-epochs",
        type=int,
        default=None,
        help="train.text_fit_epochs of the weak variants (default: the config's; weak-nofit: 0)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values; one run each")
    p.add_argument(
        "--variants",
        default=",".join(UPDATE_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.corpus) if args.corpus else out / "corpus"
    if not (root / "train" / "corpus.json").is_file():
        from jsm_dist.data import pack

        pack.main(
            [
                "synth",
                "--out",
                str(root),
                "--num-samples",
                str(args.samples),
                "--image-size",
                str(args.size),
                "--holdout",
                "0.2",
                "--samples-per-shard",
                "64",
                "--overwrite",
                "--no-progress",
            ]
        )
    from jsm_dist.eval import runreport

    table, models, notes = [], [], []
    finals: dict[str, list[dict]] = {}  # variant -> per seed: last generation + held-out
    # the run report's label columns, less the per-pass ones that do not compare variants
    cols = [
        c
        for c in runreport.LABEL_COLS
        if c not in ("generation", "L_d better", "change", "carried over")
    ]
    optional = [
        (args.epochs, "--epochs"), (args.tau, "--tau"), (args.lr, "--lr"),
        (args.encoder, "--model.encoder"), (args.text_fit_epochs, "--text_fit_epochs"),
    ]  # fmt: skip
    runs = [
        (v, int(seed))
        for seed in args.seeds.split(",")
        if seed
        for v in args.variants.split(",")
        if v
    ]
    for variant, seed in runs:
        name = f"{variant}-s{seed}"
        run = out / name
        shutil.rmtree(run, ignore_errors=True)  # a new run (training refuses to overwrite one)
        train_args = [
            "--config", args.config, "--corpus", str(root / "train"), "--out_dir", str(run),
            "--data.train_size", str(args.size), "--tensorboard", "false", "--seed", str(seed),
            *(x for v, flag in optional if v is not None for x in (flag, str(v))),
            *VARIANTS[variant],
        ]  # fmt: skip
        cmd, env = local_launch(args.procs, train_args)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        (out / f"{name}.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            print(f"{name}: training failed (exit {res.returncode}), see {out / name}.log")
            continue
        wall = time.perf_counter() - t0
        runreport.build_report(run, str(root / "test"), run)
        summary = json.loads((run / "summary.json").read_text())
        rows = summary["labels"]
        table += [[name, r["generation"], *(r.get(c) for c in cols)] for r in rows]
        if rows:
            ch = runreport.choose_generation(rows)
            notes.append(
                f"- {name}: GT-free rule picks gen {ch['chosen']} (Sm "
                f"{_fmt(ch['chosen_Sm'])}), GT-best gen {ch['gt_best']} (Sm "
                f"{_fmt(ch['best_Sm'])}); wall {wall:.0f} s"
            )
        held = summary.get("heldout", {}).get("JSM model (RGB only)", {})
        base = summary.get("heldout", {}).get("CDCP initial labels (RGB-D)", {})
        if rows:
            finals.setdefault(variant, []).append(
                {"first": rows[0], "last": rows[-1], "held": held, "base": base, "seed": seed}
            )
        models.append(
            [
                name,
                held.get("Sm"),
                held.get("maxF"),
                held.get("MAE"),
                base.get("Sm"),
                base.get("maxF"),
                base.get("MAE"),
            ]
        )
    hdr = ["variant", "gen", *cols]
    lines = [
        "## Label quality per generation (training split vs GT)",
        "",
        "| " + " | ".join(hdr) + " |",
        "|" + "---|" * len(hdr),
    ]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in table]
    lines += ["", *notes, "", "## Final RGB-only model on the held-out split", ""]
    hdr2 = ["variant", "Sm", "maxF", "MAE", "CDCP Sm", "CDCP maxF", "CDCP MAE"]
    lines += ["| " + " | ".join(hdr2) + " |", "|" + "---|" * len(hdr2)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in models]
    lines += ["", *summary_table(finals)]
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    print(text)
    return 0


def _mean(xs: list) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else math.nan


def summary_table(finals: dict[str, list[dict]]) -> list[str]:
    """Means over seeds: the initial labels, then each variant's last generation and its
    held-out model (CDCP's held-out S-measure beside it); and, per seed, the text's gain
    (regions-text minus regions-notext, last-generation label Sm)."""
    if not finals:
        return []
    hdr = ["labels", "seeds", "label Sm", "label maxF", "main off", "held-out Sm",
           "held-out maxF", "held-out MAE", "CDCP held-out Sm"]  # fmt: skip
    out = [
        "## Summary (means over seeds)",
        "",
        "| " + " | ".join(hdr) + " |",
        "|" + "---|" * len(hdr),
    ]
    any_runs = next(iter(finals.values()))
    first = [r["first"] for r in any_runs]
    base = [r["base"] for r in any_runs]
    out.append("| " + " | ".join(_fmt(c) for c in [
        "initial (CDCP)", len(first), _mean([f.get("Sm") for f in first]),
        _mean([f.get("maxF") for f in first]), _mean([f.get("main off") for f in first]),
        _mean([b.get("Sm") for b in base]), _mean([b.get("maxF") for b in base]),
        _mean([b.get("MAE") for b in base]), _mean([b.get("Sm") for b in base]),
    ]) + " |")  # fmt: skip
    for variant, rs in finals.items():
        out.append("| " + " | ".join(_fmt(c) for c in [
            variant, len(rs), _mean([r["last"].get("Sm") for r in rs]),
            _mean([r["last"].get("maxF") for r in rs]),
            _mean([r["last"].get("main off") for r in rs]),
            _mean([r["held"].get("Sm") for r in rs]), _mean([r["held"].get("maxF") for r in rs]),
            _mean([r["held"].get("MAE") for r in rs]), _mean([r["base"].get("Sm") for r in rs]),
        ]) + " |")  # fmt: skip
    text = {r["seed"]: r["last"].get("Sm") for r in finals.get("regions-text", [])}
    notext = {r["seed"]: r["last"].get("Sm") for r in finals.get("regions-notext", [])}
    both = sorted(set(text) & set(notext))
    if both:
        gains = [text[s] - notext[s] for s in both]
        out += ["", "Text gain (regions-text minus regions-notext, last-generation label Sm): "
                + ", ".join(f"seed {s}: {g:+.3f}" for s, g in zip(both, gains))
                + f"; mean {_mean(gains):+.3f}"]  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
