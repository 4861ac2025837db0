"""Random access to the samples of a shard: a tar member index, then reads by sample index.

The training loader reads samples in the epoch's canonical order (order.py), which jumps
between the shards of a shuffle group, and a resumed epoch starts mid-way: it needs sample
``i`` of shard ``s`` without reading (let alone decoding) samples ``0 .. i-1``.

Index: the shard's tar headers are scanned once per worker when the shard is first needed
(``tarfile`` reads each 512-byte header and seeks past the member's data), giving per sample
(in tar order = sample index order, as the packer writes them) its key and the offset and
size of each member. Nothing is decoded and no member data is read. A truncated tar gives
the samples before the break; later ones read as missing (a corrupt sample).

Sources: a local shard is read in place (seek + read per member). A remote one (http(s)://,
``pipe:``; see remote.py) is read sequentially: from the verified copy in the shard cache
(``data.shard_cache``), else whole into this worker's memory through the retrying,
resuming reader (size and sha256 checked). Reading it then costs its bytes once, never a
decode of the samples a resume skips.
"""

from __future__ import annotations

import io
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

from jsm_dist.data import decode
from jsm_dist.data.remote import is_remote
from jsm_dist.data.shard_open import ShardOpener, drain


@dataclass
class ShardIndex:
    """Where each sample's members lie in a shard (sample ``i`` = the i-th key in tar order)."""

    keys: list[str] = field(default_factory=list)
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # ext -> (off, size)
    error: str = ""  # why the scan stopped early ("" when the tar was read to its end)


def scan(stream: BinaryIO) -> ShardIndex:
    """Index a seekable tar stream by reading its headers only."""
    index = ShardIndex()
    where: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                parts = base_plus_ext(info.name)
                if parts is None:
                    continue
                key, ext = parts
                if key not in where:
                    where[key] = len(index.keys)
                    index.keys.append(key)
                    index.members.append({})
                index.members[where[key]][ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        index.error = f"{type(exc).__name__}: {exc}"
    return index


class _OpenShard:
    def __init__(self, stream: BinaryIO, url: str) -> None:
        self.stream, self.url = stream, url
        self.index = scan(stream)

    def raw(self, i: int, shard_size: int) -> dict:
        """Sample ``i`` as the streaming pipeline yields it: ``{"__key__", "__url__", ext: bytes}``."""
        if i >= len(self.index.keys):
            why = f"tar ends after {len(self.index.keys)} samples"
            if self.index.error:
                why += f" ({self.index.error[:200]})"
            raise decode.CorruptMember("missing sample", f"{self.url}:#{i}", why)
        sample = {"__key__": self.index.keys[i], "__url__": self.url}
        for ext, (offset, size) in self.index.members[i].items():
            self.stream.seek(offset)
            data = self.stream.read(size)
            if len(data) != size:
                raise decode.CorruptMember("short member", f"{self.url}:{sample['__key__']}.{ext}")
            sample[ext] = data
        return sample

    def close(self) -> None:
        self.stream.close()


class SampleReader:
    """Raw samples by (shard, index) for one loader worker; keeps the last ``keep`` shards
    open (a shuffle group's shards are read in turn, each many times).

    ``on_shard_error(exc)`` is told once when a shard cannot be opened at all; its samples
    then raise :class:`decode.CorruptMember` ("unreadable shard"), like any corrupt sample.
    """

    def __init__(self, corpus, opener: ShardOpener, keep: int, on_shard_error) -> None:
        self.paths, self.infos, self.sizes = corpus.shard_paths, corpus.shards, corpus.shard_sizes
        self.opener, self.keep, self.on_shard_error = opener, max(1, keep), on_shard_error
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._failed: dict[int, str] = {}

    def _item(self, shard: int) -> dict:
        info = self.infos[shard]
        return {"url": self.paths[shard], "file": info.file, "bytes": info.bytes,
                "sha256": info.sha256}  # fmt: skip

    def _load(self, shard: int) -> _OpenShard:
        item = self._item(shard)
        url = item["url"]
        if is_remote(url) and not self.opener.policy.cache_dir:
            stream = self.opener.open(item)  # retrying reader: read it whole, then verify
            try:
                data = stream.read()
                drain(stream)
            finally:
                stream.close()
            return _OpenShard(io.BytesIO(data), url)
        return _OpenShard(self.opener.open(item), url)  # local file or the cached copy

    def get(self, shard: int) -> _OpenShard:
        if shard in self._failed:
            raise decode.CorruptMember("unreadable shard source", self.paths[shard],
                                       self._failed[shard])  # fmt: skip
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        try:
            opened = self._load(shard)
        except Exception as exc:  # noqa: BLE001 - counted once, then its samples are corrupt
            self._failed[shard] = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.on_shard_error(exc)
            raise decode.CorruptMember(
                "unreadable shard source", self.paths[shard], self._failed[shard]
            ) from None
        self._open[shard] = opened
        while len(self._open) > self.keep:
            self._open.popitem(last=False)[1].close()
        return opened

    def raw(self, shard: int, index: int) -> dict:
        return self.get(shard).raw(index, self.sizes[shard])

    def close(self) -> None:
        for opened in self._open.values():
            opened.close()
        self._open.clear()
