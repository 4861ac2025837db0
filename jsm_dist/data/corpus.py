"""``corpus.json``: what a packed corpus holds, written by the packer, read by everyone.

Layout of a packed corpus directory::

    <corpus>/corpus.json
    <corpus>/shard-000000.tar ...      WebDataset shards (see schema.py for members)
    <corpus>/labels/                   the pseudo-label store (see jsm_dist/labels.py)

``corpus.json`` fields:
    format            "jsm-corpus/1"
    name              corpus name
    image_size        [H, W] images were stored at, or null when sizes vary (benchmarks)
    label_size        [h, w] resolution of the label store
    depth_convention  "near_is_large" | "far_is_large": the majority orientation of the raw
                      depth PNGs; a sample's json ``depth_convention`` overrides it (corpora
                      packed before per-sample orientation have only this one)
    vocab             salient-word vocabulary; index = class id, index 0 = "<negative>"
    num_samples       total number of samples
    has_gt            every sample carries gt.png
    has_text          samples carry captions (False for benchmark folders)
    shards            [{"file", "count", "sha256", "bytes"}] in shard-index order
    bad_samples       [{"source", "reason"}]: inputs the packer skipped, and why
    labels            label-store directory, relative to the corpus directory
    depth_orientation what the packer decided (jsm_dist.data.orientation.OrientationTally):
                      mode ("auto" or the explicit convention), margin, near_is_large /
                      far_is_large / uncertain counts, uncertain_samples, gt_checked,
                      gt_agree, gt_disagree_samples (names); {} for older corpora
    shard_base        optional: where the shard files are read from instead of the corpus
                      directory: a directory, an http(s):// base URL, or a pipe: command
                      with {file} (see data/remote.py); a shard ``file`` that is itself a
                      URL or pipe: command is read from there. The label store stays local.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jsm_dist import schema
from jsm_dist.data.remote import REMOTE_PREFIXES, is_remote, resolve_source

FORMAT = "jsm-corpus/1"


@dataclass
class ShardInfo:
    file: str
    count: int
    sha256: str = ""
    bytes: int = 0


@dataclass
class Corpus:
    root: Path
    name: str
    vocab: list[str]
    shards: list[ShardInfo]
    label_size: tuple[int, int]
    image_size: tuple[int, int] | None = None
    depth_convention: str = schema.NEAR_IS_LARGE
    has_gt: bool = False
    has_text: bool = True
    bad_samples: list[dict] = field(default_factory=list)
    labels: str = "labels"
    depth_orientation: dict = field(default_factory=dict)
    shard_base: str = ""

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.vocab or self.vocab[0] != schema.NEGATIVE_WORD:
            raise ValueError(
                f"vocab must start with {schema.NEGATIVE_WORD!r} (class 0), got {self.vocab[:3]!r}"
            )
        if self.depth_convention not in schema.DEPTH_CONVENTIONS:
            raise ValueError(
                f"depth_convention must be one of {schema.DEPTH_CONVENTIONS}, "
                f"got {self.depth_convention!r}"
            )
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        self.label_size = tuple(self.label_size)
        if self.image_size is not None:
            self.image_size = tuple(self.image_size)

    # ---- derived ----
    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def shard_sizes(self) -> list[int]:
        return [s.count for s in self.shards]

    @property
    def shard_paths(self) -> list[str]:
        """Where each shard is read from: a local path, an http(s):// URL or a ``pipe:``
        command (with ``shard_base``; see data/remote.py). The loader's sample ids map
        these sources back to shard indices."""
        return [resolve_source(self.root, self.shard_base, s.file) for s in self.shards]

    @property
    def label_dir(self) -> Path:
        return self.root / self.labels

    @property
    def word_to_class(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}

    def damaged_shards(self, checksums: bool = False) -> list[str]:
        """One line per shard file that is not what corpus.json recorded, [] when all are.

        Cheap by default: every file exists and has the recorded size (a truncated or
        half-copied shard is caught without reading it). ``checksums=True`` also hashes
        every file against the recorded sha256 (reads the whole corpus; catches garbled
        bytes too). Shards recorded without a size or checksum are not checked for it; remote
        shards (URLs, pipe: commands) are skipped.
        """
        import hashlib

        problems = []
        for info, path in zip(self.shards, self.shard_paths):
            if is_remote(path):  # checked by reading it (remote.check_remote_shards)
                continue
            p = Path(path)
            if not p.is_file():
                problems.append(f"{info.file}: missing")
                continue
            size = p.stat().st_size
            if info.bytes and size != info.bytes:
                problems.append(f"{info.file}: {size} bytes, corpus.json records {info.bytes}")
            elif checksums and info.sha256:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
                if h.hexdigest() != info.sha256:
                    problems.append(f"{info.file}: sha256 differs from corpus.json")
        return problems

    # ---- io ----
    @classmethod
    def load(cls, root: str | os.PathLike, shard_base: str = "") -> Corpus:
        """Read ``<root>/corpus.json``; a non-empty ``shard_base`` (``data.shard_base``)
        replaces the file's (a relative directory then counts from the working directory)."""
        root = Path(root)
        path = root / "corpus.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no corpus.json in {root}: pack a corpus first (jsm-pack --help)"
            )
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        data.pop("format")
        data.pop("num_samples", None)
        if shard_base:
            local_dir = not shard_base.startswith(REMOTE_PREFIXES) and "{file}" not in shard_base
            data["shard_base"] = os.path.abspath(shard_base) if local_dir else shard_base
        return cls(root=root, **data)

    def save(self) -> Path:
        """Write corpus.json atomically (temp file + os.replace)."""
        data = asdict(self)
        data.pop("root")
        if not data["shard_base"]:
            data.pop("shard_base")  # local shards: corpus.json as the packer always wrote it
        data = {"format": FORMAT, "num_samples": self.num_samples, **data}
        path = self.root / "corpus.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
        return path
