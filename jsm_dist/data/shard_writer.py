"""Shard writing for :mod:`jsm_dist.data.pack`: samples in, a corpus on disk out.

Holds the encoding of one sample into WebDataset members (``encode_sample``,
``encode_meta``; keys come from ``schema.sample_key``), deterministic tar writing (``write_tar``), the
handcrafted generation-0 labels at the store resolution (``label_inputs``,
``saliency_u8``, ``initial_labels``), the pool task that turns one list of records into
shard tar(s) plus label files (``pack_task``, validating each sample and deciding its
depth orientation on the way, :mod:`jsm_dist.data.orientation`), and
``finalize_corpus``, which numbers the tars, writes label generation 0 and saves
corpus.json. tests/helpers.py builds its corpora from the same functions.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from jsm_dist import dist, schema
from jsm_dist.data import decode, orientation, sources
from jsm_dist.data.corpus import Corpus, ShardInfo
from jsm_dist.data.decode import BadInput
from jsm_dist.data.initial import initial_saliency
from jsm_dist.data.vocab import find_word
from jsm_dist.labels import LabelStore


# ---- encoding and tar writing (shared with tests/helpers.py) ---------------------------
def encode_sample(raw: dict, *, rgb_format: str = "jpg", quality: int = 90) -> dict:
    """Raw sample -> {member extension: bytes} plus ``__key__`` (``json`` added by
    :func:`encode_meta` once the sample's index in its shard is known)."""
    if rgb_format == "jpg":
        rgb_member = (
            schema.MEMBER_RGB_JPG,
            raw.get("rgb_jpeg") or decode.encode_jpeg(raw[schema.RGB], quality),
        )
    else:
        rgb_member = (schema.MEMBER_RGB_PNG, decode.encode_png(raw[schema.RGB]))
    members = {"__key__": raw[schema.KEY], rgb_member[0]: rgb_member[1]}
    members[schema.MEMBER_DEPTH] = decode.encode_png(raw[schema.DEPTH])
    if raw.get(schema.GT) is not None:
        members[schema.MEMBER_GT] = decode.encode_png(raw[schema.GT])
    return members


def encode_meta(meta: dict, index: int) -> bytes:
    """The ``json`` member: SampleMeta with the sample's ``index`` in its shard."""
    meta = {k: v for k, v in meta.items() if k != "shard"}
    meta[schema.INDEX] = int(index)
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()


def write_tar(path: Path, samples: list[dict]) -> tuple[str, int]:
    """Deterministic tar (fixed mtime/owner) of encoded samples -> (sha256, bytes)."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for members in samples:
            for ext, data in members.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{members['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest, path.stat().st_size


def label_inputs(rgb: np.ndarray, depth: np.ndarray, convention: str, size: int):
    """(rgb uint8, raw depth) -> (rgb uint8, depth float32 [0,1] near=1) at size x size."""
    small = (size, size)
    rgb_s = cv2.resize(rgb, small, interpolation=cv2.INTER_AREA)
    dep_s = cv2.resize(
        decode.normalize_depth(depth, convention), small, interpolation=cv2.INTER_AREA
    )
    return rgb_s, dep_s


def saliency_u8(rgbs: list[np.ndarray], depths: list[np.ndarray], size: int) -> np.ndarray:
    """initial_saliency on label_inputs() outputs -> uint8 (n, size, size)."""

    if not rgbs:
        return np.zeros((0, size, size), np.uint8)
    sal = np.asarray(initial_saliency(np.stack(rgbs), np.stack(depths)), dtype=np.float32)
    return (np.clip(sal, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def initial_labels(
    rgbs: list[np.ndarray],
    depths: list[np.ndarray],
    convention: str | Sequence[str],
    size: int,
):
    """Handcrafted generation-0 labels of full-size samples: uint8 (n, size, size).

    ``convention``: one for all samples, or one per sample (the packer's decisions)."""
    conventions = [convention] * len(rgbs) if isinstance(convention, str) else list(convention)
    small = [label_inputs(r, d, c, size) for r, d, c in zip(rgbs, depths, conventions, strict=True)]
    return saliency_u8([r for r, _ in small], [d for _, d in small], size)


# ---- one task: records -> one (or more, if size-bounded) shard tars --------------------
def _prepare(cfg, raw: dict, has_text: bool) -> dict:  # cfg: the run's pack.PackConfig
    """Validate a loaded raw sample in place (sizes, depth, caption/word); apply --resize."""
    depth = decode.to_storable_depth(raw[schema.DEPTH])
    rgb = np.asarray(raw[schema.RGB])
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise BadInput(f"rgb must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    gt = raw.get(schema.GT)
    decode.check_sizes(rgb, depth, gt)
    if cfg.resize:
        s = (cfg.resize, cfg.resize)
        rgb = cv2.resize(rgb, s, interpolation=cv2.INTER_AREA)
        depth = cv2.resize(depth, s, interpolation=cv2.INTER_NEAREST)
        gt = None if gt is None else cv2.resize(gt, s, interpolation=cv2.INTER_NEAREST)
        raw["rgb_jpeg"] = None
    meta = dict(raw["meta"])
    if has_text:
        caption, word = str(meta.get(schema.CAPTION) or ""), str(meta.get(schema.WORD) or "")
        if not caption.strip():
            raise BadInput("empty caption")
        if not word.strip():
            raise BadInput("no salient word")
        pos = find_word(caption, word, meta.get(schema.WORD_POS))
        if pos is None:
            raise BadInput(f"caption without its salient word {word!r}: {caption!r}")
        meta[schema.WORD_POS] = pos
    else:
        meta.update(caption="", word="", word_pos=0)
    return {**raw, schema.RGB: rgb, schema.DEPTH: depth, schema.GT: gt, "meta": meta}


def _orient(mode: str, sample: dict, tally: orientation.OrientationTally) -> str:
    """Decide (or take) the sample's depth orientation, record it in its meta (the json
    member) and in ``tally``, with the ground truth's opinion where there is one."""
    convention, found = orientation.decide(mode, sample[schema.RGB], sample[schema.DEPTH])
    meta = sample["meta"]
    meta["depth_convention"] = convention
    if found is not None:
        meta["depth_orientation"] = found.to_meta()
    gt = sample.get(schema.GT)
    gt_said = orientation.gt_implied(sample[schema.DEPTH], gt) if gt is not None else None
    tally.add(str(meta.get("name") or sample[schema.KEY]), convention, found, gt_said)
    return convention


def pack_task(args: tuple) -> dict:
    """Pool worker: pack one task's records into temp tar(s) + label .npy file(s)."""
    cfg, task_id, records, tmp_dir, label_size, has_text = args
    max_bytes = int(cfg.max_shard_mb * (1 << 20))
    parts: list[dict] = []
    bad: list[dict] = []
    cur: dict = {}

    def reset() -> None:
        cur.update(samples=[], rgbs=[], depths=[], bytes=0, sizes=set(), all_gt=True)

    def close_part() -> None:
        if not cur["samples"]:
            return
        tar = Path(tmp_dir) / f"task-{task_id:06d}-{len(parts):03d}.tar"
        digest, nbytes = write_tar(tar, cur["samples"])
        labels = saliency_u8(cur["rgbs"], cur["depths"], label_size)
        npy = tar.with_suffix(".npy")
        np.save(npy, labels)
        keys = [m["__key__"] for m in cur["samples"]]
        parts.append(
            {
                "tar": str(tar),
                "labels": str(npy),
                "count": len(keys),
                "sha256": digest,
                "bytes": nbytes,
                "keys": keys,
                "sizes": sorted(cur["sizes"]),
                schema.HAS_GT: cur["all_gt"],
            }
        )
        reset()

    tally = orientation.OrientationTally(cfg.depth_convention)
    reset()
    for record, raw in sources.load_records(cfg, records):
        try:
            if isinstance(raw, BadInput):
                raise raw
            sample = _prepare(cfg, raw, has_text)
            convention = _orient(cfg.depth_convention, sample, tally)
            members = encode_sample(sample, rgb_format=cfg.rgb_format, quality=cfg.jpeg_quality)
        except BadInput as exc:
            bad.append({"source": record.get("source", "?"), "reason": str(exc)})
            continue
        size = sum(len(v) + 1536 for k, v in members.items() if k != "__key__")
        if cur["samples"] and cur["bytes"] + size > max_bytes:
            close_part()  # size bound: this sample starts the next shard
        members[schema.MEMBER_META] = encode_meta(sample["meta"], len(cur["samples"]))
        cur["samples"].append(members)
        rgb_s, dep_s = label_inputs(
            sample[schema.RGB], sample[schema.DEPTH], convention, label_size
        )
        cur["rgbs"].append(rgb_s)  # only label-size copies are kept until the shard closes
        cur["depths"].append(dep_s)
        cur["bytes"] += size
        cur["sizes"].add(tuple(sample[schema.RGB].shape[:2]))
        cur["all_gt"] &= sample.get(schema.GT) is not None
    close_part()
    return {
        "task": task_id,
        "parts": parts,
        "bad": bad,
        "records": len(records),
        "orientation": tally,
    }


# ---- the corpus: numbered shards, label generation 0, corpus.json --------------------
def finalize_corpus(
    out: Path,
    name: str,
    vocab: list[str],
    parts: list[dict],
    *,
    label_size: int,
    depth_convention: str,
    has_text: bool,
    bad: list[dict],
    keep: int = 3,
    depth_orientation: dict | None = None,
) -> Corpus:
    """Rename part tars to shard-%06d.tar, write label generation 0, save corpus.json.

    ``parts`` (in shard order): dicts with ``tar`` (path), ``labels`` (uint8 (n,h,w) array
    or a .npy path), ``count``, ``sha256``, ``bytes``, ``keys``, ``sizes`` (image (H, W)s
    seen) and ``has_gt``. ``depth_orientation``: the pack run's OrientationTally as a dict.
    """

    shards = []
    for i, part in enumerate(parts):
        fname = f"shard-{i:06d}.tar"
        os.replace(part["tar"], out / fname)
        shards.append(
            ShardInfo(file=fname, count=part["count"], sha256=part["sha256"], bytes=part["bytes"])
        )
    sizes = {tuple(s) for p in parts for s in p["sizes"]}
    corpus = Corpus(
        root=out,
        name=name,
        vocab=vocab,
        shards=shards,
        label_size=(label_size, label_size),
        image_size=next(iter(sizes)) if len(sizes) == 1 else None,
        depth_convention=depth_convention,
        has_gt=all(p.get(schema.HAS_GT, True) for p in parts),
        has_text=has_text,
        bad_samples=bad,
        depth_orientation=depth_orientation or {},
    )
    single = dist.WorldInfo()
    store = LabelStore.create(
        corpus.label_dir,
        corpus.shard_sizes,
        corpus.label_size,
        keep=keep,
        keys=[p["keys"] for p in parts],
        overwrite=True,
    )
    writer = store.writer(0, world=single)
    for i, part in enumerate(parts):
        labels = part["labels"]
        if not isinstance(labels, np.ndarray):  # a temp .npy written by a pool worker
            labels = np.load(labels)
            Path(part["labels"]).unlink(missing_ok=True)
        if part["count"]:
            writer.write(i, list(range(part["count"])), labels, None)
    writer.close()
    store.commit(0, world=single)
    # training runs seed their own stores from generation 0: retention must never prune it
    store.pin(0)
    corpus.save()
    return corpus
