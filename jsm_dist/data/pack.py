"""Pack a raw corpus into WebDataset shards + corpus.json + label-store generation 0.

Sources::

    jsm-pack synth     --out DIR --num-samples N --image-size S [--seed K]
    jsm-pack caps      --input DIR --out DIR   # RGB/ depth/ [GT/] CapS.csv (utf-8 or GBK)
    jsm-pack benchmark --input DIR --out DIR   # RGB/ depth/ GT/, matching basenames, no text

Work plan: the parent scans the source into a list of records (cheap: paths and CSV
rows, or synthetic indices), splits it into tasks of ``--samples-per-shard`` records and
hands the tasks to a process pool (one task = one shard; a task that would exceed
``--max-shard-mb`` rolls over into a further shard). Each task loads and validates every
record, encodes the members, writes its tar to a temp name and computes the handcrafted
initial labels (``initial_saliency``) at the store resolution. The parent then numbers the
tars in task order (``shard-%06d.tar``), writes every shard's labels as generation 0 of the
label store and saves corpus.json (counts, sha256 per shard, vocabulary, bad samples).

Depth orientation: ``--depth-convention auto`` (the default) decides every sample's
orientation from its own RGB and depth (:mod:`jsm_dist.data.orientation`) and records it
in the sample's json (``depth_convention``, plus the cue scores in ``depth_orientation``);
the initial labels and the loader use that per-sample value. corpus.json
``depth_orientation`` counts the decisions (and, where there is ground truth, how often
the GT agrees); a corpus that mixes orientations, uncertain decisions and decisions the GT
contradicts are logged as warnings and printed in the summary.

Bad inputs (unreadable/truncated image, missing depth, size mismatch, NaN/inf depth,
caption without its word, ...) are skipped, listed with their reason in the printed
summary and in corpus.json ``bad_samples``; the exit code is non-zero only when nothing
could be packed. ``--holdout F`` writes two corpora, ``<out>/train`` and ``<out>/test``
(a seeded random fraction F of the records; same vocabulary, so class ids agree).

The shard member layout is documented in shards/README.md and jsm_dist/schema.py. A
sample's ``json`` holds its ``index`` in its shard; the shard number is the position of
the tar in corpus.json ``shards`` (the loader maps ``__url__`` to it), so shards can be
numbered after the parallel tasks finish.

This module holds the settings, the orchestration and the CLI; sample encoding, tar
writing, the pool task and corpus finalisation are in :mod:`jsm_dist.data.shard_writer`.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from jsm_dist import schema
from jsm_dist.data import sources
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.orientation import OrientationTally
from jsm_dist.data.shard_writer import (
    finalize_corpus,
    pack_task,
)
from jsm_dist.settings import above, add_arguments, at_least, check_fields, setting, within

log = logging.getLogger(__name__)


@dataclass
class PackConfig:
    """Everything a pack run needs: one field per ``jsm-pack`` option (the parser is built
    from these declarations)."""

    source: Literal["synth", "caps", "benchmark"] = setting(
        help="synth (the generator) | caps (captioned folder) | benchmark (RGB-D SOD folder)"
    )
    out: str = setting(help="output corpus directory (with --holdout: parent of train/ and test/)")
    input: str = setting("", "source folder (caps, benchmark)")
    name: str = setting("", "corpus name (default: the output folder's name)")
    samples_per_shard: int = setting(
        256, "records per shard (the last shard of a task may hold fewer)", check=at_least(1)
    )
    max_shard_mb: float = setting(
        512.0, "a shard never grows beyond this many MiB (rolls over)", check=above(0)
    )
    label_size: int = setting(
        0, "square label-store side in pixels; 0 = min(256, image side)", check=at_least(0)
    )
    resize: int = setting(
        0, "store every image resized to SxS; 0 = keep the source size", check=at_least(0)
    )
    rgb_format: Literal["jpg", "png"] = setting(
        "jpg", "RGB member format: jpg (source JPEGs are stored untouched) | png (lossless)"
    )
    jpeg_quality: int = setting(90, "JPEG quality when re-encoding", check=within(1, 100))
    depth_convention: Literal["auto", "near_is_large", "far_is_large"] = setting(
        schema.DEPTH_AUTO,
        "orientation of the raw depth values: auto decides per sample from its RGB and depth "
        "(docs/depth_orientation.md); near_is_large / far_is_large set it for every sample",
    )
    workers: int = setting(0, "pack processes; 0 = one per CPU", check=at_least(0))
    holdout: float = setting(
        0.0,
        "fraction of records held out: writes OUT/train and OUT/test instead of OUT",
        check=within(0.0, 1.0, hi_open=True),
    )
    split_seed: int = setting(0, "seed of the holdout split")
    keep_generations: int = setting(3, "label-store generations kept", check=at_least(2))
    overwrite: bool = setting(False, "replace a corpus already in --out")
    progress: bool = setting(True, "show a progress bar")
    num_samples: int = setting(1000, "synth: number of scenes", check=at_least(1))
    image_size: int = setting(128, "synth: scene side in pixels", check=at_least(8))
    seed: int = setting(0, "synth: generator seed")

    def __post_init__(self) -> None:
        check_fields(self, "pack")
        if self.source != "synth" and not self.input:
            raise ValueError(f"invalid pack setting input='': required for source {self.source}")


@dataclass
class PackResult:
    corpus: Corpus | None
    packed: int
    bad: list[dict] = field(default_factory=list)


# ---- orchestration ---------------------------------------------------------------------
def _run_tasks(cfg: PackConfig, tasks: list[tuple], total: int, desc: str) -> list[dict]:
    from tqdm.auto import tqdm

    workers = cfg.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    results = []
    with tqdm(total=total, unit="sample", desc=desc, disable=not cfg.progress) as bar:
        if workers == 1:
            for t in tasks:
                results.append(pack_task(t))
                bar.update(results[-1]["records"])
        else:
            # no live OpenCV pool threads when forking (children would deadlock on it)
            cv2.setNumThreads(1)
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for res in pool.imap_unordered(pack_task, tasks):
                    results.append(res)
                    bar.update(res["records"])
    return sorted(results, key=lambda r: r["task"])


def _clear_out(out: Path, overwrite: bool) -> None:
    if (out / "corpus.json").exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a corpus (corpus.json); use --overwrite")
        for p in out.glob("shard-*.tar"):
            p.unlink()
        (out / "corpus.json").unlink()
        shutil.rmtree(out / "labels", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def pack_records(
    cfg: PackConfig,
    out: Path,
    records: list[dict],
    vocab: list[str],
    has_text: bool,
    label_size: int,
    name: str,
) -> PackResult:
    """Pack one corpus (all its records) into ``out``."""
    _clear_out(out, cfg.overwrite)
    bad = [{"source": r["source"], "reason": r["bad"]} for r in records if r.get("bad")]
    good = [r for r in records if not r.get("bad")]
    tmp = out / f".pack-tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    try:
        chunks = [
            good[i : i + cfg.samples_per_shard] for i in range(0, len(good), cfg.samples_per_shard)
        ]
        tasks = [(cfg, t, chunk, str(tmp), label_size, has_text) for t, chunk in enumerate(chunks)]
        results = _run_tasks(cfg, tasks, len(good), f"pack {name}")
        parts = [p for r in results for p in r["parts"]]
        bad += [b for r in results for b in r["bad"]]
        if not parts:
            return PackResult(None, 0, bad)
        tally = OrientationTally(cfg.depth_convention)
        for r in results:  # task order: sample names stay in pack order
            tally.merge(r["orientation"])
        corpus = finalize_corpus(
            out,
            name,
            vocab,
            parts,
            label_size=label_size,
            depth_convention=(
                tally.majority
                if cfg.depth_convention == schema.DEPTH_AUTO
                else cfg.depth_convention
            ),
            has_text=has_text,
            bad=bad,
            keep=cfg.keep_generations,
            depth_orientation=tally.to_dict(),
        )
        for warning in tally.warnings():
            log.warning("%s: %s", name, warning)
        return PackResult(corpus, corpus.num_samples, bad)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded random split: (train, test) with round(fraction * n) records in test."""
    n_test = round(fraction * len(records))
    order = np.random.default_rng(seed).permutation(len(records))
    test_ids = set(order[:n_test].tolist())
    train = [r for i, r in enumerate(records) if i not in test_ids]
    test = [r for i, r in enumerate(records) if i in test_ids]
    return train, test


def pack(cfg: PackConfig) -> list[PackResult]:
    """Scan the source and pack it (one corpus, or train + test with ``holdout``)."""
    records, vocab, has_text = sources.scan(cfg)
    label_size = cfg.label_size or sources.auto_label_size(cfg, records)
    out = Path(cfg.out)
    name = cfg.name or out.resolve().name
    if cfg.holdout <= 0:
        return [pack_records(cfg, out, records, vocab, has_text, label_size, name)]
    train, test = split_records(records, cfg.holdout, cfg.split_seed)
    return [
        pack_records(cfg, out / split, recs, vocab, has_text, label_size, f"{name}-{split}")
        for split, recs in (("train", train), ("test", test))
    ]


def _summary(results: list[PackResult]) -> str:
    lines = []
    for res in results:
        c = res.corpus
        if c is None:
            lines.append(f"nothing packed ({len(res.bad)} bad samples)")
        else:
            mb = sum(s.bytes for s in c.shards) / (1 << 20)
            lines.append(
                f"{c.root}: {c.num_samples} samples in {len(c.shards)} shards "
                f"({mb:.1f} MiB), vocab {len(c.vocab)}, labels {c.label_size}, "
                f"{len(res.bad)} bad samples skipped"
            )
            if c.depth_orientation:
                tally = OrientationTally.from_dict(c.depth_orientation)
                lines.append(f"  {tally.summary()}")
                lines += [f"  warning: {w}" for w in tally.warnings()]
        for b in res.bad[:50]:
            lines.append(f"  bad: {b['source']}: {b['reason']}")
        if len(res.bad) > 50:
            lines.append(f"  ... {len(res.bad) - 50} more in corpus.json bad_samples")
    return "\n".join(lines)


OUTPUT_OPTIONS = (
    "out",
    "name",
    "samples_per_shard",
    "max_shard_mb",
    "label_size",
    "resize",
    "rgb_format",
    "jpeg_quality",
    "depth_convention",
    "workers",
    "holdout",
    "split_seed",
    "keep_generations",
    "overwrite",
    "progress",
)
SYNTH_OPTIONS = ("num_samples", "image_size", "seed")
FOLDERS = {
    "caps": "CapS-style folder (RGB/ depth/ [GT/] CapS.csv)",
    "benchmark": "RGB-D SOD benchmark folder (RGB/ depth/ GT/)",
}


def build_parser() -> argparse.ArgumentParser:
    """``jsm-pack SOURCE [options]``: every option comes from a PackConfig declaration."""
    common = argparse.ArgumentParser(add_help=False)
    add_arguments(common.add_argument_group("output"), PackConfig, OUTPUT_OPTIONS, required={"out"})
    p = argparse.ArgumentParser(prog="jsm-pack", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    s = sub.add_parser("synth", parents=[common], help="the synthetic generator")
    add_arguments(s, PackConfig, SYNTH_OPTIONS)
    for src, what in FOLDERS.items():
        f = sub.add_parser(src, parents=[common], help=what)
        add_arguments(f, PackConfig, ("input",), required={"input"})
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = PackConfig(**vars(args))
        results = pack(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"jsm-pack: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(results))
    packed = sum(r.packed for r in results)
    if packed == 0:
        print("jsm-pack: nothing could be packed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
