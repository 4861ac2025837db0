"""Offline tools on a label store: fsck, export, diff, and sample keys / GT from the corpus."""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


# ---------------------------------------------------------------- corpus next to the store
def corpus_of(store: LabelStore):
    """The packed corpus the store belongs to (store at <corpus>/labels), or None."""
    parent = store.root.resolve().parent
    if not (parent / "corpus.json").is_file():
        return None
    from jsm_dist.data.corpus import Corpus

    corpus = Corpus.load(parent)
    if corpus.label_dir.resolve() != store.root.resolve():
        return None
    if corpus.shard_sizes != store.shard_sizes:
        raise mf.LabelStoreError(
            f"corpus {parent} shard sizes {corpus.shard_sizes[:5]}... differ from the store's "
            f"{store.shard_sizes[:5]}..."
        )
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
    path = store.root / mf.KEYS
    if path.is_file():
        keys = mf.read_json(path)["shards"][shard]
    else:
        corpus = corpus_of(store)
        if corpus is None:
            return [f"s{shard:06d}-i{i:06d}" for i in range(n)]
        keys = [k for k, _ in iter_tar_samples(corpus.shard_paths[shard])]
    if len(keys) != n:
        raise mf.CorruptStoreError(f"shard {shard}: {len(keys)} keys for {n} samples")
    return keys


def _decode_gt(data: bytes, size: tuple[int, int], what: str = "gt") -> np.ndarray:
    """A GT mask (any storage, :mod:`jsm_dist.masks`) at ``size`` (h, w), bilinear."""
    from PIL import Image

    from jsm_dist.masks import read_mask

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
        _decode_gt(f["gt.png"], store.label_size) if "gt.png" in f else None
        for _, f in iter_tar_samples(corpus.shard_paths[shard], want=("gt.png",))
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
    keys_path = store.root / mf.KEYS
    if keys_path.is_file():
        lens = [len(x) for x in mf.read_json(keys_path)["shards"]]
        if lens != store.shard_sizes:
            rep.problems.append(f"{mf.KEYS}: keys per shard {lens[:8]} != shard sizes")
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
                        "shard": s,
                        "index": i,
                        "key": keys[i],
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
        for col in ("mae_a", "mae_b", "sm_a", "sm_b"):
            if with_gt:
                summary[col] = float(np.mean([r[col] for r in with_gt]))
    return rows, summary
