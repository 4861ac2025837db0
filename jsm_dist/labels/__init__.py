"""The pseudo-label store: sharded, memory-mappable, with atomic rank-synchronized generations.

JSM replaces every training label after each refinement. The reference code rewrote a PNG
folder (plus a full backup copy) and ran one CRF subprocess per image; here each update is a
new *generation* of raw label shards, made visible all at once by one manifest rename.

Layout (``<store>`` is ``<corpus>/labels``)::

    <store>/manifest.json                   the ONLY thing readers follow
    <store>/keys.json                       optional: sample keys per shard (given at create)
    <store>/.lock                           flock serialising manifest updates
    <store>/gen-000003/shard-000000.u8      uint8 (n, h, w), C order, no header (np.memmap-able)
    <store>/gen-000003/shard-000000.side    float32 (n, k + 1): confidences (w_g, w_d; NaN when
                                            not given) then the generation that wrote the sample
                                            (older than gen-000003: carried over, see below)
    <store>/gen-000003/shard-000000.json    the owner's write record: samples written, first
                                            missing indices, sha256 of .u8 and .side

``manifest.json`` (format ``jsm-labels/1``): ``label_size`` [h, w], ``dtype``, ``shard_sizes``,
``side_columns``, ``keep``, ``pinned``, ``current`` (-1 before the first commit) and
``generations``: one entry per committed, retained generation with ``committed_at``, ``host``,
``world_size``, ``carried_over`` and per-shard ``sha256`` / ``side_sha256``. Label shard i
mirrors data shard i; a sample's address is (shard, index in shard) and never the order a
loader delivers.

A training run's own store (``<out_dir>/labels``, seeded from a corpus store: see
``labels/runstore.py``) has ``keys.json`` (the corpus's sample keys) and two more manifest
fields: ``corpus`` (``root``, absolute, and ``relative`` to the store; ``name``; ``labels``, the
corpus store; ``generation``, the one it was seeded from) and ``run_dir``. ``tools.corpus_of``
finds a store's corpus (the directory around it, else that link) and checks that shard sizes
and sample keys agree, so every tool works on a run's store as on a corpus's.

Protocol: writing generation g = current + 1 (g = 0: the initial labels, at pack time)
  1. every rank: ``w = store.writer(g)``. It creates ``gen-g/`` and deletes what a crashed
     attempt left in the shards THIS rank owns (``dist.owner_of_shard(s, world) == rank``):
     an attempt always restarts its shards, so nothing stale can be committed, and no two
     ranks ever touch the same file.
  2. ``w.write(shard, indices, labels, conf)``, owned shards only (others raise): ``pwrite``
     into a sparse file at index * h * w; an in-memory bitmap records written samples.
     ``w.carry_over(shard, indices)``: samples that could not be refined (the pass never
     received them: a corrupt member, a truncated shard) keep their generation g - 1 label
     byte for byte; their side row keeps the generation that wrote that label (so
     ``side[:, -1] < g`` marks a carried-over sample, and says how old its label is) with
     NaN confidences. Only for samples not written: it never replaces a new label, and it
     is an explicit call (the refinement pass makes it for exactly the samples its loader
     reported as never arrived); ``w.unwritten(shard)`` lists what is still missing.
  3. ``w.close()``: fsync each shard file, hash it (page cache), write + fsync the side file,
     write the shard record (temp + ``os.replace``; ``carried_over`` counts the samples
     carried over), fsync ``gen-g/``.
  4. ``store.commit(g)`` (collective under torch.distributed, via ``jsm_dist.dist``):
     barrier -> rank 0 checks every shard's record (its generation, written == n, file
     sizes; checksums too with ``verify_checksums=True``). Any sample neither written nor
     carried over, or a missing shard, raises IncompleteGenerationError on EVERY rank and
     changes nothing (unwritten samples are never committed as zeros). Otherwise, under the
     lock, rank 0 writes the manifest with g appended (its entry's ``carried_over`` = the
     samples carried over) and ``current = g`` (temp + fsync + ``os.replace`` + fsync of
     the store directory) -> broadcast of the outcome (the second barrier) -> every rank
     refreshes -> rank 0 prunes old generations.
  A crash anywhere before the ``os.replace`` leaves g-1 current and intact (readers never
  look into an uncommitted ``gen-g/``; fsck calls it "being written or interrupted"); after
  it, g is complete and durable. The rerun simply calls ``writer(g)`` again.

Reading
  ``LabelStore.open`` reads the manifest only. ``read`` / ``read_many`` are one ``preadv``
  per sample from a per-(generation, shard) descriptor opened lazily in the reading process:
  O(1), no per-sample open, nothing loaded up front. A pid change (fork: DataLoader workers)
  reopens descriptors; pickling drops them (spawn). pread rather than mmap on the hot path:
  same file, same addressing, but touched pages stay in the page cache instead of counting
  in the process's RSS (a mapping read end to end would grow RSS with the corpus);
  ``memmap()`` remains for bulk tools.
  Consistent read: a store object is pinned to the generation named by the manifest at
  ``open()`` / the last ``refresh()``; every read until the next ``refresh()`` (in particular
  every ``read_many``) comes from that one generation, whose files never change once
  committed. ``refresh()`` re-reads the manifest: call it between reads (e.g. per batch or
  per epoch) to follow new commits. Descriptors already open survive deletion of their
  generation; a shard first touched after its generation was deleted (a reader more than
  ``keep - 1`` commits behind, or a rollback) raises GenerationGoneError: refresh().

Retention, rollback, pins (rank 0 / one process; manifest updates hold ``.lock``)
  Retention keeps the current generation, pinned ones, and the ``keep`` (>= 2) newest
  <= current; it runs after each commit (and via ``prune(keep)``), dropping entries from
  the manifest first and deleting directories second. ``rollback(to)`` makes a retained
  generation current and deletes newer ones; run it with no writer active (training resume
  rolls back to the generation its checkpoint names). ``pin(g)`` protects g from retention.
  ``has_generation(g)`` says whether g is committed and retained.

Requirements: every rank sees the store on one shared filesystem (rank 0 checks the other
ranks' records); ``flock`` must work there (local disks, Lustre/GPFS with flock enabled).

CLI: ``jsm-labels {info,fsck,export,diff,rollback,pin} STORE ...`` (``--help`` on each);
STORE may also be a packed corpus or a training run directory (their ``labels/``).
"""

from jsm_dist.labels.cli import main
from jsm_dist.labels.manifest import (
    CorruptStoreError,
    GenerationGoneError,
    IncompleteGenerationError,
    LabelStoreError,
    WrongCorpusError,
)
from jsm_dist.labels.store import LabelStore
from jsm_dist.labels.writer import GenerationWriter

__all__ = [
    "CorruptStoreError",
    "GenerationGoneError",
    "GenerationWriter",
    "IncompleteGenerationError",
    "LabelStore",
    "LabelStoreError",
    "WrongCorpusError",
    "main",
]
