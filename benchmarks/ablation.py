"""Mode ablation: label quality per generation and the final RGB-only model, per setting.

    python -m benchmarks.ablation [--corpus DIR] [--out runs/ablation] [--epochs 6]

Packs a synthetic corpus with a held-out split (unless ``--corpus`` names one packed with
``--holdout``), then trains once per variant with ``accelerate launch`` (2 CPU processes):

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
}


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
    p.add_argument("--epochs", type=int, default=6, help="epochs per variant")
    p.add_argument("--tau", type=int, default=2, help="refine every tau epochs")
    p.add_argument("--procs", type=int, default=2, help="processes per run")
    p.add_argument("--lr", type=float, default=5e-4, help="train.lr of every variant")
    p.add_argument("--encoder", default="efficientnet_lite0", help="model.encoder")
    p.add_argument(
        "--text-fit-epochs",
        type=int,
        default=30,
        help="train.text_fit_epochs of the weak variants (weak-nofit: 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="train.seed of every variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
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
    # the run report's label columns, less the per-pass ones that do not compare variants
    cols = [
        c
        for c in runreport.LABEL_COLS
        if c not in ("generation", "L_d better", "change", "carried over")
    ]
    for name in [v for v in args.variants.split(",") if v]:
        run = out / name
        shutil.rmtree(run, ignore_errors=True)  # a new run (training refuses to overwrite one)
        train_args = [
            "--corpus", str(root / "train"), "--out_dir", str(run), "--epochs", str(args.epochs),
            "--tau", str(args.tau), "--model.encoder", args.encoder, "--data.train_size",
            str(args.size), "--data.batch_size", "8", "--data.num_workers", "1",
            "--tensorboard", "false", "--lr", str(args.lr),
            "--text_fit_epochs", str(args.text_fit_epochs), "--seed", str(args.seed),
            *VARIANTS[name],
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
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
