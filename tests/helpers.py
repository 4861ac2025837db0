"""Tiny packed corpora for tests (import as ``from helpers import make_tiny_corpus``).

``make_tiny_corpus`` writes real WebDataset shards with chosen (uneven) sizes, a label
store with generation 0 and corpus.json, through the packer's own writers, in well under a
second. Samples are drawn with numpy (no synthetic generator needed): a textured
background with one bright square object that is nearer in depth; ``gt`` is the square.

Label modes (generation 0):
    "id"      a constant image per sample whose value encodes (shard, index):
              ``label_value(shard, index)``; lets a test check that the loader paired every
              sample with its own label.
    "gt"      the ground-truth mask (for geometric checks).
    "initial" the real handcrafted initial saliency (jsm_dist.data.initial).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from jsm_dist import schema
from jsm_dist.data import shard_writer
from jsm_dist.data.corpus import Corpus
from jsm_dist.data.vocab import build_vocab

WORDS = ("ball", "cube", "star", "ring")

# settings of a small, quick training run on a tiny corpus (2 CPU processes in seconds)
TINY_TRAIN_ARGS = (
    "--model.encoder", "tiny", "--model.pretrained", "false", "--model.crf", "false",
    "--data.train_size", "32", "--data.batch_size", "4", "--data.num_workers", "1",
    "--tensorboard", "false", "--seed", "3",
)  # fmt: skip


def label_value(shard: int, index: int) -> int:
    """The uint8 value of the "id" label of sample (shard, index): distinct for small ids."""
    return (shard * 37 + index * 11) % 251 + 2


def make_raw_sample(
    shard: int,
    index: int,
    size: int = 32,
    *,
    with_text: bool = True,
    with_gt: bool = True,
    depth_dtype=np.uint16,
    key_prefix: str = "tiny",
) -> dict:
    """One raw sample as the packer takes it (see jsm_dist.data.sources)."""
    rng = np.random.default_rng([shard, index])
    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.stack(
        [(xx * 5 + yy * 3) % 256, (xx * 2 + shard * 40) % 256, (yy * 7 + index * 9) % 256], -1
    )
    rgb = (rgb + rng.integers(0, 20, rgb.shape)).clip(0, 255).astype(np.uint8)
    s = max(4, size // 4)
    x0, y0 = rng.integers(0, size - s, 2)
    mask = np.zeros((size, size), bool)
    mask[y0 : y0 + s, x0 : x0 + s] = True
    rgb[mask] = (250, 240, 30)
    top = 60000 if depth_dtype == np.uint16 else 250
    depth = (1000 + yy * (top // (4 * size)) + rng.integers(0, 50, (size, size))).astype(
        depth_dtype
    )
    depth[mask] = top
    depth[0, :3] = 0  # a few holes
    word = WORDS[(shard + index) % len(WORDS)]
    meta = {"name": f"s{shard}_{index}", "source": "tiny", "tags": [word], "category": "shape"}
    if with_text:
        meta.update(caption=f"a {word} in front of the wall", word=word, word_pos=1)
    return {
        "key": f"{key_prefix}_{shard:03d}_{index:04d}",
        "rgb": rgb,
        "rgb_jpeg": None,
        "depth": depth,
        "gt": (mask * 255).astype(np.uint8) if with_gt else None,
        "meta": meta,
    }


# File stems a real benchmark folder can hold: CJK, spaces vs underscores, dots, dashes,
# accents, a very long one. Every one must survive packing with its own key.
ODD_NAMES = (
    "雨伞",
    "雨伞 2",
    "猫",
    "a b",
    "a_b",
    "a.b",
    "a.b.c",
    "a--b",
    "-dash",
    "Ünïcödé café",
    "x" * 180,
    "img_0001",
)


def write_benchmark_folder(root: str | Path, names=ODD_NAMES, size: int = 32) -> Path:
    """RGB/<name>.jpg, depth/<name>.png (16-bit), GT/<name>.png: one tiny sample per name."""
    from PIL import Image

    root = Path(root)
    for sub in ("RGB", "depth", "GT"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        raw = make_raw_sample(0, i, size, with_text=False)
        Image.fromarray(raw["rgb"]).save(root / "RGB" / f"{name}.jpg", quality=95)
        Image.fromarray(raw["depth"]).save(root / "depth" / f"{name}.png")
        Image.fromarray(raw["gt"]).save(root / "GT" / f"{name}.png")
    return root


def make_tiny_corpus(
    tmp_path: str | Path,
    n: int | None = None,
    shard_sizes: list[int] | tuple[int, ...] = (5, 3, 7, 1),
    *,
    size: int = 32,
    label_size: int | None = None,
    labels: str = "id",
    with_text: bool = True,
    with_gt: bool = True,
    rgb_format: str = "png",
    name: str = "tiny",
    key_prefix: str = "tiny",
) -> Corpus:
    """Write a packed corpus to ``tmp_path/name`` and return it (loaded from disk).

    ``n`` (optional) splits n samples into shards of ``shard_sizes[0]`` each instead.
    ``rgb_format="png"`` keeps RGB lossless so tests can compare pixels exactly.
    ``key_prefix`` starts every sample key (``<prefix>_<shard>_<index>``): two corpora
    with the same shard sizes but other prefixes hold different samples.
    """
    if n is not None:
        k = shard_sizes[0]
        shard_sizes = [min(k, n - i) for i in range(0, n, k)]
    out = Path(tmp_path) / name
    out.mkdir(parents=True, exist_ok=True)
    label_size = label_size or size
    parts = []
    for s, count in enumerate(shard_sizes):
        raws = [
            make_raw_sample(s, i, size, with_text=with_text, with_gt=with_gt, key_prefix=key_prefix)
            for i in range(count)
        ]
        encoded = []
        for i, raw in enumerate(raws):
            members = shard_writer.encode_sample(raw, rgb_format=rgb_format)
            members["json"] = shard_writer.encode_meta(raw["meta"], i)
            encoded.append(members)
        tar = out / f"part-{s:06d}.tar"
        digest, nbytes = shard_writer.write_tar(tar, encoded)
        if labels == "id":
            lab = (
                np.stack(
                    [
                        np.full((label_size, label_size), label_value(s, i), np.uint8)
                        for i in range(count)
                    ]
                )
                if count
                else np.zeros((0, label_size, label_size), np.uint8)
            )
        elif labels == "gt":
            import cv2

            lab = (
                np.stack(
                    [
                        cv2.resize(r["gt"], (label_size, label_size), interpolation=cv2.INTER_AREA)
                        for r in raws
                    ]
                )
                if count
                else np.zeros((0, label_size, label_size), np.uint8)
            )
        elif labels == "initial":
            lab = shard_writer.initial_labels(
                [r["rgb"] for r in raws],
                [r["depth"] for r in raws],
                schema.NEAR_IS_LARGE,
                label_size,
            )
        else:
            raise ValueError(f"labels must be id|gt|initial, got {labels!r}")
        parts.append(
            {
                "tar": str(tar),
                "labels": lab,
                "count": count,
                "sha256": digest,
                "bytes": nbytes,
                "keys": [r["key"] for r in raws],
                "sizes": [(size, size)],
                "has_gt": with_gt,
            }
        )
    vocab = build_vocab(WORDS if with_text else [])
    shard_writer.finalize_corpus(
        out,
        name,
        vocab,
        parts,
        label_size=label_size,
        depth_convention=schema.NEAR_IS_LARGE,
        has_text=with_text,
        bad=[],
    )
    return Corpus.load(out)


def all_ids(corpus: Corpus) -> set[tuple[int, int]]:
    """Every (shard, index) of a corpus."""
    return {(s, i) for s, n in enumerate(corpus.shard_sizes) for i in range(n)}


def garble_member(path: str | Path, name: str) -> None:
    """Overwrite a tar member's bytes in place with garbage: the tar structure and the
    file size stay valid, the member no longer decodes (a corrupt sample)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
    with open(path, "r+b") as f:
        f.seek(info.offset_data)
        f.write(b"\x00garbage" * (info.size // 8) + b"\x00" * (info.size % 8))
