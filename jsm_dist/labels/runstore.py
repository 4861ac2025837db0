"""A training run's own label store: where it lives, when a start may create or reuse it,
and seeding it from the corpus store.

``train.label_store`` = ``run`` (``<out_dir>/labels``) or a directory: the run refines a
store of its own, seeded from the corpus store's generation ``train.init_generation``.
Nothing a start does may destroy labels that are not its own to replace:

* the corpus's own store (``<corpus>/labels``, generation 0 = the initial labels every
  run starts from) is never a run's store: ``train.label_store=corpus`` is the explicit
  way to refine it in place;
* an existing store is never overwritten by a new run: resuming (a checkpoint to resume
  from) reopens it, after checking that it holds labels of this corpus (shard sizes and
  sample keys); a fresh start refuses, except when the store was seeded by this same run
  directory and ``--resume latest`` finds no checkpoint yet (the run died before its
  first checkpoint: it is re-seeded);
* a directory that holds something other than a label store is not written into.

The seeded store knows where it came from: ``keys.json`` (the corpus's sample keys, so
``jsm-labels export`` names files ``<key>.png``) and two manifest fields, ``corpus`` (the
corpus root, absolute and relative to the store, its name, its store and the generation
seeded from; ``labels.tools.corpus_of`` follows it) and ``run_dir`` (the run that seeded it).
Every check here reads files only, so it runs on every rank before the process group starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jsm_dist import dist
from jsm_dist.labels import manifest as mf
from jsm_dist.labels.store import LabelStore
from jsm_dist.labels.tools import check_belongs, corpus_link, sample_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorePlan:
    """What a run does with its label store: refine the corpus store in place (``corpus``),
    reopen its own store (``open``: resuming) or create and seed one (``seed``)."""

    root: Path
    action: str
    overwrite: bool = False  # seed over a store this run directory seeded before


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def plan_label_store(train, corpus, resuming: bool) -> StorePlan:
    """Decide (and check) the run's label store; raises ValueError naming the path and
    what to do when a start would destroy or misuse labels.

    Args:
        train: the run's ``TrainConfig`` (label_store, out_dir, resume).
        corpus: the training corpus.
        resuming: a checkpoint to resume from exists.
    """
    if train.label_store == "corpus":
        return StorePlan(Path(corpus.label_dir), "corpus")
    out = Path(train.out_dir)
    root = out / "labels" if train.label_store == "run" else Path(train.label_store)
    if _same_dir(root, Path(corpus.label_dir)):
        raise ValueError(
            f"train.label_store {root} is the corpus's own label store (its generation "
            f"{train.init_generation} holds the labels every run starts from): use "
            "--train.label_store run (the default) or another directory for this run's "
            "labels, or --train.label_store corpus to refine the corpus store in place"
        )
    if (root / mf.MANIFEST).is_file():
        store = LabelStore.open(root)
        if resuming:
            check_belongs(store, corpus)
            return StorePlan(root, "open")
        seeded_by = store.manifest.get("run_dir")
        if train.resume == "latest" and seeded_by and _same_dir(Path(seeded_by), out):
            log.warning(
                "%s: no checkpoint yet, so the run starts over; its label store %s is seeded again",
                out,
                root,
            )
            return StorePlan(root, "seed", overwrite=True)
        owner = f", seeded by run {seeded_by}" if seeded_by else ""
        raise ValueError(
            f"a label store already exists at {root} (generations {store.generations}, "
            f"current {store.generation}{owner}) and a new run would overwrite it: use "
            "--resume latest to continue the run it belongs to, or another --out_dir / "
            "--train.label_store"
        )
    if root.is_dir() and any(root.iterdir()):
        raise ValueError(
            f"train.label_store {root} is a directory that is not empty and holds no label "
            "store: give a new or empty directory"
        )
    return StorePlan(root, "seed")


def seed_run_store(plan: StorePlan, corpus, src: LabelStore, train) -> LabelStore:
    """Create the run's store (rank 0) and copy generation ``train.init_generation`` of the
    corpus store into its generation 0: every rank copies the shards it owns, then one
    collective commit (the protocol of a refinement). Collective: call on every rank."""
    world = dist.world_info()
    root = plan.root
    if world.is_main:
        LabelStore.create(
            root,
            src.shard_sizes,
            src.label_size,
            keep=train.keep_generations,
            keys=[sample_keys(src, s) for s in range(src.num_shards)],
            overwrite=plan.overwrite,
            extra={
                "corpus": corpus_link(corpus, root, train.init_generation),
                "run_dir": str(Path(train.out_dir).resolve()),
            },
        )
    dist.barrier()
    store = LabelStore.open(root)
    writer = store.writer(0)
    for s, n in enumerate(src.shard_sizes):
        if dist.owner_of_shard(s, world.world_size) == world.rank and n:
            idx = list(range(n))
            labels = src.read_many([s] * n, idx, generation=train.init_generation)
            writer.write(s, idx, labels)
    writer.close()
    store.commit(0)
    store.refresh()
    return store
