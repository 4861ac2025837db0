"""Offline tools on a label store: fsck, export, diff, and sample keys / GT from the corpus."""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jsm_dist import schema
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.masks import read_mask
from jsm_dist.labels import manifest as mf
from jsm_dist.labels.store import LabelStore

log = logging.getLogger(__name__)

CHUNK_SAMPLES = 256  # samples per read_many in bulk tools (bounded memory)
FLIP_CHANGED = 0.01  # a sample "changed" when > 1% of its pixels flip at threshold 128


def _bar(total: int, desc: str, unit: str = "it", enabled: bool | None = None, **kw):
    """tqdm on stderr: ``enabled`` None = only on a terminal, True = always, False = never."""
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, **kw)


# ---------------------------------------------------------------- the store's corpus
def store_dir(path: str | Path) -> Path:
    """The label store a CLI argument names: a store, a packed corpus (its ``labels/``
    store) or a training run directory (its ``labels/`` store)."""
    path = Path(path)
    if (path / mf.MANIFEST).is_file():
        return path
    if (path / "corpus.json").is_file():
        return Corpus.load(path).label_dir
    if (path / "labels" / mf.MANIFEST).is_file():
        return path / "labels"
    return path  # LabelStore.open names what is missing


def read_keys(root: Path) -> list[list[str]] | None:
    """Sample keys per shard from ``<root>/keys.json``, None when the store has none."""
    path = Path(root) / mf.KEYS
    return mf.read_json(path)["shards"] if path.is_file() else None


def corpus_link(corpus, store_root: Path, generation: int) -> dict:
    """The manifest field that ties a run's store to the corpus it was seeded from."""
    root = Path(corpus.root).resolve()
    return {
        "root": str(root),
        "relative": os.path.relpath(root, Path(store_root).resolve()),
        "name": corpus.name,
        "labels": str(Path(corpus.label_dir).resolve()),
        "generation": int(generation),
    }


def _linked_corpus(store: LabelStore, link: dict):

    for cand in (Path(link.get("root", "")), store.root.resolve() / link.get("relative", "")):
        if (cand / "corpus.json").is_file():
            return Corpus.load(cand)
    raise mf.LabelStoreError(
        f"label store {store.root} was seeded from corpus {link.get('root')}, which has no "
        "corpus.json any more (moved or deleted?): put the corpus back there"
    )


def check_belongs(store: LabelStore, corpus) -> None:
    """Raise WrongCorpusError unless ``store`` holds labels of ``corpus``'s samples: same
    shard sizes and, where both record them, the same sample keys (two corpora can share
    shard sizes; their keys tell them apart)."""
    where = f"label store {store.root} and corpus {corpus.root}"
    if list(store.shard_sizes) != list(corpus.shard_sizes):
        raise mf.WrongCorpusError(
            f"{where} do not match: shard sizes {store.shard_sizes[:5]}... vs "
            f"{corpus.shard_sizes[:5]}..."
        )
    if store.root.resolve() == Path(corpus.label_dir).resolve():
        return  # the corpus's own store
    mine, theirs = read_keys(store.root), read_keys(corpus.label_dir)
    if mine is None or theirs is None:
        log.warning("%s: sample keys not recorded on both sides; not compared", where)
        return
    for s, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            raise mf.WrongCorpusError(
                f"{where} do not match: the store belongs to another corpus (sample keys "
                f"differ: shard {s} index {i} is {a[i]!r} in the store's {mf.KEYS}, "
                f"{b[i]!r} in the corpus)"
            )


def corpus_of(store: LabelStore):
    """The packed corpus the store belongs to, or None when it knows of none.

    The corpus around it (the store is ``<corpus>/labels``), else the corpus its manifest
    links to (a training run's store, seeded from that corpus). Either way the store is
    checked against it (:func:`check_belongs`: shard sizes and sample keys).
    """

    parent = store.root.resolve().parent
    corpus = None
    if (parent / "corpus.json").is_file():
        corpus = Corpus.load(parent)
        if corpus.label_dir.resolve() != store.root.resolve():
            corpus = None
    if corpus is None:
        link = store.manifest.get("corpus")
        if not link:
            return None
        corpus = _linked_corpus(store, link)
    check_belongs(store, corpus)
    return corpus


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def iter_tar_samples(path: str, want: tuple[str, ...] = ()):
    """Yield (key, {ext: bytes}) per sample of a WebDataset tar, in shard order; only the
    members whose extension is in ``want`` are read."""
    key, fields = None, {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_member(member.name)
            if k != key:
                if key is not None:
                    yield key, fields
                key, fields = k, {}
            if ext in want:
                fields[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


def sample_keys(store: LabelStore, shard: int) -> list[str]:
    """Sample keys of one shard: keys.json (given at create), else the corpus tars, else
    ``s<shard>-i<index>`` names."""
    n = store.shard_sizes[shard]
    stored = read_keys(store.root)
    if stored is not None:
        keys = stored[shard]
    else:
        corpus = corpus_of(store)
        if corpus is None:
            return [f"s{shard:06d}-i{i:06d}" for i in range(n)]
        keys = [k for k, _ in iter_tar_samples(corpus.shard_paths[shard])]
    if len(keys) != n:
        raise mf.CorruptStoreError(f"shard {shard}: {len(keys)} keys for {n} samples")
    return keys


def _decode_gt(data: bytes, size: tuple[int, int], what: str = "gt") -> np.ndarray:
    """A GT mask (any storage, :mod:`jsm_dist.data.masks`) at ``size`` (h, w), bilinear."""
    from PIL import Image

    gt = read_mask(data, what)
    if gt.shape != tuple(size):
        gt = np.asarray(Image.fromarray(gt).resize((size[1], size[0]), Image.BILINEAR))
    return gt


def load_gt(store: LabelStore, shard: int, gt_dir: Path | None) -> list[np.ndarray | None]:
    """Ground truth of a shard at the store resolution (None where a sample has none):
    ``<gt_dir>/<key>.png`` when gt_dir is given, else the corpus' ``gt.png`` members."""
    n = store.shard_sizes[shard]
    if gt_dir is not None:
        out: list[np.ndarray | None] = []
        for key in sample_keys(store, shard):
            p = Path(gt_dir) / f"{key}.png"
            out.append(
                _decode_gt(p.read_bytes(), store.label_size, str(p)) if p.is_file() else None
            )
        return out
    corpus = corpus_of(store)
    if corpus is None or not corpus.has_gt:
        return [None] * n
    out = [
        _decode_gt(f[schema.MEMBER_GT], store.label_size) if schema.MEMBER_GT in f else None
        for _, f in iter_tar_samples(corpus.shard_paths[shard], want=(schema.MEMBER_GT,))
    ]
    if len(out) != n:
        raise mf.CorruptStoreError(f"corpus shard {shard} has {len(out)} samples, store {n}")
    return out


# ---------------------------------------------------------------- fsck
@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)  # damage: non-zero exit
    notes: list[str] = field(default_factory=list)  # worth knowing, harmless
    checked: list[int] = field(default_factory=list)  # generations verified

    @property
    def ok(self) -> bool:
        return not self.problems


def fsck(
    store: LabelStore, all_generations: bool = False, progress: bool | None = None
) -> FsckReport:
    """Verify shapes, sizes and checksums of the current (or every retained) generation."""
    rep = FsckReport()
    m = store.manifest
    h, w = store.label_size
    k = len(store.side_columns)
    keys = read_keys(store.root)
    if keys is not None:
        lens = [len(x) for x in keys]
        if lens != store.shard_sizes:
            rep.problems.append(f"{mf.KEYS}: keys per shard {lens[:8]} != shard sizes")
    try:  # the corpus around the store, or the one a run's store was seeded from
        corpus_of(store)
    except mf.WrongCorpusError as e:
        rep.problems.append(str(e))
    except (mf.LabelStoreError, OSError, ValueError) as e:
        rep.notes.append(f"corpus: {e}")
    if store.generation < 0:
        rep.notes.append("no committed generation yet")
    gens = (
        store.generations
        if all_generations
        else ([store.generation] if store.generation >= 0 else [])
    )
    committed = set(store.generations)
    if store.generation >= 0 and store.generation not in committed:
        rep.problems.append(f"manifest: current generation {store.generation} has no entry")
        gens = [g for g in gens if g in committed]
    total = len(gens) * store.num_samples * (h * w + 4 * k)
    with _bar(total, "fsck", "B", progress, unit_scale=True) as bar:
        for g in gens:
            entry = mf.generation_entry(m, g)
            if len(entry["shards"]) != store.num_shards:
                rep.problems.append(
                    f"gen {g}: manifest lists {len(entry['shards'])} shards, not {store.num_shards}"
                )
                continue
            for s, n in enumerate(store.shard_sizes):
                if n == 0:
                    continue
                sums = entry["shards"][s]
                for suffix, size, want in (
                    (mf.LABEL_SUFFIX, n * h * w, sums["sha256"]),
                    (mf.SIDE_SUFFIX, n * k * 4, sums["side_sha256"]),
                ):
                    p = store.shard_path(g, s, suffix)
                    if not p.is_file():
                        rep.problems.append(f"gen {g} shard {s}: {p.name} missing")
                    elif p.stat().st_size != size:
                        rep.problems.append(
                            f"gen {g} shard {s}: {p.name} is {p.stat().st_size} bytes, expected {size}"
                        )
                    elif mf.sha256_file(p) != want:
                        rep.problems.append(
                            f"gen {g} shard {s}: {p.name} checksum mismatch (corrupted)"
                        )
                    bar.update(size)
            rep.checked.append(g)
    for g in sorted(mf.list_gen_dirs(store.root)):
        if g not in committed:
            state = "being written or interrupted" if g > store.generation else "abandoned"
            rep.notes.append(
                f"gen {g}: uncommitted directory ({state}); never read, removed by the next writer/prune"
            )
    for g in store.pinned:
        if g not in committed:
            rep.problems.append(f"pinned generation {g} is not retained")
    return rep


# ---------------------------------------------------------------- export
def export(
    store: LabelStore,
    generation: int,
    out: Path,
    progress: bool | None = None,
    limit: int | None = None,
) -> int:
    """Write generation ``generation`` as ``<out>/<key>.png``; returns the number written."""
    from PIL import Image

    out = Path(out)
    total = store.num_samples if limit is None else min(limit, store.num_samples)
    written = 0
    with _bar(total, f"export gen {generation}", "img", progress) as bar:
        for s, n in enumerate(store.shard_sizes):
            if written >= total:
                break
            keys = sample_keys(store, s)
            stop = min(n, total - written)
            for lo in range(0, stop, CHUNK_SAMPLES):
                idx = list(range(lo, min(stop, lo + CHUNK_SAMPLES)))
                labels = store.read_many([s] * len(idx), idx, generation=generation)
                for i, lab in zip(idx, labels):
                    path = out / f"{keys[i]}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(lab).save(path)
                written += len(idx)
                bar.update(len(idx))
    return written


# ---------------------------------------------------------------- diff
def check_gt_dir(store: LabelStore, gt_dir: Path) -> int:
    """How many samples have ``<gt_dir>/<key>.png``; raises when none has (a GT folder whose
    names do not match the store's keys must never be ignored silently) and warns with the
    count when only some have."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise mf.LabelStoreError(f"--gt-dir {gt_dir} is not a directory")
    keys = [k for s in range(store.num_shards) for k in sample_keys(store, s)]
    have = [(gt_dir / f"{k}.png").is_file() for k in keys]
    found = sum(have)
    if keys and found == 0:
        there = sorted(p.name for p in gt_dir.iterdir())[:3]
        hint = ""
        if read_keys(store.root) is None and corpus_of(store) is None:
            hint = (
                " This store records no sample keys (no keys.json, no corpus): its samples "
                "are named s<shard>-i<index>."
            )
        raise mf.LabelStoreError(
            f"--gt-dir {gt_dir}: none of the store's {len(keys)} samples has a ground-truth "
            f"file there: expected <key>.png, e.g. {keys[0]}.png; the folder holds "
            f"{there or 'nothing'}.{hint}"
        )
    if found < len(keys):
        missing = [k for k, h in zip(keys, have) if not h]
        log.warning(
            "--gt-dir %s: ground truth for %d of %d samples only; %d have no <key>.png "
            "there (e.g. %s.png) and are compared without it",
            gt_dir,
            found,
            len(keys),
            len(missing),
            missing[0],
        )
    return found


def diff(
    store: LabelStore,
    a: int,
    b: int,
    gt_dir: Path | None = None,
    use_gt: bool = True,
    progress: bool | None = None,
) -> tuple[list[dict], dict]:
    """Per-sample change between generations a and b, and their quality against GT.

    Per sample: ``mean_abs`` (mean |b - a| in [0, 1]), ``flip`` (fraction of pixels whose
    label at threshold 128 differs), ``fg_a``/``fg_b`` (foreground fraction at 128); with
    GT: ``mae_a/b`` and ``sm_a/b`` (PySODMetrics MAE and S-measure, alpha 0.5).
    Returns (rows, summary of means).
    """
    from py_sod_metrics import MAE, Smeasure

    if use_gt and gt_dir is not None:
        check_gt_dir(store, gt_dir)
    rows: list[dict] = []
    mae, sm = MAE(), Smeasure()
    with _bar(store.num_samples, f"diff {a}->{b}", "img", progress) as bar:
        for s, n in enumerate(store.shard_sizes):
            if n == 0:
                continue
            keys = sample_keys(store, s)
            gts = load_gt(store, s, gt_dir) if use_gt else [None] * n
            for lo in range(0, n, CHUNK_SAMPLES):
                idx = list(range(lo, min(n, lo + CHUNK_SAMPLES)))
                la = store.read_many([s] * len(idx), idx, generation=a)
                lb = store.read_many([s] * len(idx), idx, generation=b)
                fa, fb = la >= 128, lb >= 128
                d = np.abs(la.astype(np.int16) - lb.astype(np.int16)).mean(axis=(1, 2)) / 255.0
                flip = (fa != fb).mean(axis=(1, 2))
                for j, i in enumerate(idx):
                    row = {
                        schema.SHARD: s,
                        schema.INDEX: i,
                        schema.KEY: keys[i],
                        "mean_abs": float(d[j]),
                        "flip": float(flip[j]),
                        "fg_a": float(fa[j].mean()),
                        "fg_b": float(fb[j].mean()),
                    }
                    gt = gts[i]
                    if gt is not None:
                        for tag, lab in (("a", la[j]), ("b", lb[j])):
                            mae.step(lab, gt)
                            sm.step(lab, gt)
                            row[f"mae_{tag}"] = float(mae.maes[-1])
                            row[f"sm_{tag}"] = float(sm.sms[-1])
                    rows.append(row)
                bar.update(len(idx))
    summary = {"a": a, "b": b, "samples": len(rows)}
    if rows:
        for col in ("mean_abs", "flip", "fg_a", "fg_b"):
            summary[col] = float(np.mean([r[col] for r in rows]))
        summary["changed_samples"] = int(sum(r["flip"] > FLIP_CHANGED for r in rows))
        with_gt = [r for r in rows if "mae_a" in r]
        summary["samples_with_gt"] = len(with_gt)
        summary["samples_without_gt"] = len(rows) - len(with_gt)
        for col in ("mae_a", "mae_b", "sm_a", "sm_b"):
            if with_gt:
                summary[col] = float(np.mean([r[col] for r in with_gt]))
    return rows, summary
