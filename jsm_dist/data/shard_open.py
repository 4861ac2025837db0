"""Opening the shards of a loader pass: local files, remote streams, the shard cache.

The pipeline stage :func:`tar_samples` is WebDataset's ``tarfile_to_samples`` with
:func:`shard_streams` as its opener: a local path opens as a file, a remote source (see
remote.py) as a buffered :class:`remote.ShardReader` that retries and resumes dropped reads.
When the parser is done with a remote stream it is drained and verified (size, exit status,
sha256 against corpus.json); a failure counts like a corrupt tar.

Optional cache (``data.shard_cache``): each remote shard is downloaded whole into the cache
directory (temp file, size and sha256 checked against corpus.json, then ``os.replace``) and
read from there; later epochs and refinement passes find it and send no request. While a
worker reads one shard, the next shard of its pass downloads in a background thread.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from jsm_dist.data.remote import CHUNK, FetchPolicy, ShardReader, is_remote

log = logging.getLogger(__name__)


def drain(stream: BinaryIO) -> None:
    """Read a remote stream to its end and verify it: its size, exit status and sha256 are
    checked there (a tar parser stops at the end-of-archive block, before the padding)."""
    raw = getattr(stream, "raw", None)
    if isinstance(raw, ShardReader) and raw.failed is None and not stream.closed:
        while stream.read(CHUNK):
            pass
        raw.verify()


# ---- the local cache ---------------------------------------------------------------------
def cache_path(cache_dir: str | Path, source: str, file: str, sha256: str) -> Path:
    """Where the cache keeps a shard: by content (sha256) when corpus.json has it, so a
    re-uploaded shard with a new corpus.json is fetched anew; else by source."""
    key = sha256[:32] if sha256 else "src-" + hashlib.sha256(source.encode()).hexdigest()[:32]
    name = os.path.basename(file) if file and not is_remote(file) else "shard.tar"
    return Path(cache_dir) / f"{key}-{name}"


def fetch_to_cache(
    source: str,
    *,
    file: str = "",
    size: int = 0,
    sha256: str = "",
    policy: FetchPolicy,
    on_retry=None,
    cancel: threading.Event | None = None,
) -> Path:
    """The cached copy of a remote shard, downloaded (and verified) first if needed.

    A download goes to a temp file beside the target and becomes visible only by
    ``os.replace`` once complete and checked, so a crash never leaves a partial shard and
    processes fetching the same shard at once each write their own temp file.
    """
    path = cache_path(policy.cache_dir, source, file, sha256)
    if path.is_file():
        have = path.stat().st_size
        if not size or have == size:
            return path
        log.warning("shard cache: %s has %d bytes, corpus.json says %d: fetching again",
                    path, have, size)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    reader = ShardReader(
        source, size=size, sha256=sha256, policy=policy, on_retry=on_retry, cancel=cancel
    )
    try:
        with reader, open(tmp, "wb") as out:
            buf = bytearray(CHUNK)
            while n := reader.readinto(buf):
                out.write(memoryview(buf)[:n])
            reader.verify()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class _Download(threading.Thread):
    """A background :func:`fetch_to_cache`; ``result()`` waits and returns or raises."""

    def __init__(self, item: dict, opener: ShardOpener) -> None:
        super().__init__(daemon=True, name=f"fetch {item['url'][:60]}")
        self.item, self.opener = item, opener
        self.cancel = threading.Event()
        self.path: Path | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.path = self.opener.fetch(self.item, self.cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self.error = exc

    def result(self) -> Path:
        self.join()
        if self.error is not None:
            raise self.error
        return self.path


class ShardOpener:
    """Opens shard items ``{"url", "file", "bytes", "sha256"}`` for one loader worker.

    Local paths: a plain file. Remote without a cache: a buffered :class:`ShardReader`.
    Remote with a cache: the cached file, downloaded first (or by :meth:`prefetch`).
    ``on_retry`` is told of every retry (the worker counts them).
    """

    def __init__(self, policy: FetchPolicy, on_retry=None) -> None:
        self.policy, self.on_retry = policy, on_retry
        self._ahead: dict[str, _Download] = {}

    def open(self, item: dict) -> BinaryIO:
        source = item["url"]
        if not is_remote(source):
            return open(source, "rb")
        if not self.policy.cache_dir:
            reader = ShardReader(
                source,
                size=item.get("bytes", 0),
                sha256=item.get("sha256", ""),
                policy=self.policy,
                on_retry=self.on_retry,
            )
            return io.BufferedReader(reader, CHUNK)
        download = self._ahead.pop(source, None)
        path = download.result() if download is not None else self.fetch(item)
        return open(path, "rb")

    def fetch(self, item: dict, cancel: threading.Event | None = None) -> Path:
        return fetch_to_cache(
            item["url"],
            file=item.get("file", ""),
            size=item.get("bytes", 0),
            sha256=item.get("sha256", ""),
            policy=self.policy,
            on_retry=self.on_retry,
            cancel=cancel,
        )

    def prefetch(self, item: dict) -> None:
        """Start downloading a shard this worker opens next (cache only; no-op otherwise)."""
        source = item["url"]
        if not (self.policy.cache_dir and is_remote(source)) or source in self._ahead:
            return
        path = cache_path(self.policy.cache_dir, source, item.get("file", ""),
                          item.get("sha256", ""))  # fmt: skip
        if path.is_file():
            return
        self._ahead[source] = download = _Download(item, self)
        download.start()

    def cancel(self) -> None:
        """Stop background downloads nobody will read (the worker stops mid-pass)."""
        for download in self._ahead.values():
            download.cancel.set()
        self._ahead.clear()


# ---- the pipeline stage ------------------------------------------------------------------
def shard_streams(
    items: Iterable[dict], opener: ShardOpener, handler: Callable[[Exception], bool]
) -> Iterator[dict]:
    """``{"url", ...}`` -> the same + ``"stream"``, each closed when the next is asked for.

    A remote stream is drained then (:func:`drain`), which checks its size and sha256.
    Failures go to ``handler`` (WebDataset's convention: True = go on with the next shard).
    """
    items = list(items)
    try:
        for i, item in enumerate(items):
            if i + 1 < len(items):
                opener.prefetch(items[i + 1])
            try:
                stream = opener.open(item)
            except Exception as exc:  # noqa: BLE001 - WebDataset handler convention
                exc.args = (*exc.args, item["url"])
                if handler(exc):
                    continue
                return
            try:
                yield {**item, "stream": stream}
                try:
                    drain(stream)
                except Exception as exc:  # noqa: BLE001 - WebDataset handler convention
                    if not handler(exc):
                        return
            finally:
                stream.close()
    finally:
        opener.cancel()


def tar_samples(
    items: Iterable[dict], opener: ShardOpener, handler: Callable[[Exception], bool]
) -> Iterator[dict]:
    """``{"url", ...}`` per shard -> raw samples ``{"__key__", "__url__", "<ext>": bytes}``:
    WebDataset's ``tarfile_to_samples`` with :func:`shard_streams` as its opener."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    streams = shard_streams(items, opener, handler)
    return group_by_keys(tar_file_expander(streams, handler=handler), handler=handler)
