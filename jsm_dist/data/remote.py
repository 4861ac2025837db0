"""Shards read from a server: ``http(s)://`` URLs and ``pipe:`` commands, with retries.

A shard *source* is what the loader opens for one shard: a local path, an ``http://`` or
``https://`` URL, or ``pipe:<shell command>`` whose stdout is the shard (``pipe:aws s3 cp
s3://bucket/corpus/shard-000000.tar -``, ``pipe:gsutil cat gs://...``). ``corpus.json`` keeps
the shard file names; :func:`resolve_source` maps a name onto a base (a directory, a base
URL, or a command template with ``{file}``), so a corpus packed here and uploaded to a
bucket trains from the bucket while corpus.json and the label store stay local.

Why our own reader instead of WebDataset's ``gopen`` (curl / ``Pipe``): a connection that
drops mid-shard surfaces there as an error in the middle of the tar stream, and the rest of
the shard is lost. :class:`ShardReader` is one sequential byte stream per shard that hides
drops: it counts the bytes it has delivered, and when a read fails (connection reset,
timeout, HTTP 5xx, a command exiting non-zero, a stream shorter than corpus.json's
``bytes``) it waits (exponential backoff), reopens the source and continues at that byte:
an HTTP ``Range`` request where the server honours it, else the new stream's first bytes
are read and discarded. The tar parser above it never sees the break, so no sample is lost
or doubled and sample ids stay those of the local corpus. Errors that retrying cannot fix
(HTTP 4xx, command not found, content that differs from corpus.json's size or sha256)
fail at once with the source in the message.

The loader's side (opening a pass's shards, the optional local shard cache) lives in
shard_open.py.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import random
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("http://", "https://", "pipe:")
MAX_WAIT_S = 60.0  # backoff cap between two attempts
CHUNK = 1 << 20  # read/buffer size for remote streams and cache copies
# HTTP answers that a later attempt may not get: timeout, rate limit, server-side trouble
TRANSIENT_HTTP = {408, 425, 429}
# shell exit codes that retrying cannot fix: "cannot execute", "command not found"
PERMANENT_EXIT = {126, 127}


def is_remote(source: str) -> bool:
    """True for ``http(s)://`` URLs and ``pipe:`` commands (anything else is a local path)."""
    return source.startswith(REMOTE_PREFIXES)


def resolve_source(root: Path, base: str, file: str) -> str:
    """The source of shard ``file`` (a name from corpus.json) under ``base``.

    ``file`` that is itself a URL or ``pipe:`` command is used as is. ``base`` with
    ``{file}`` gets the name substituted (the form a ``pipe:`` command needs); a base URL
    gets the name appended after a ``/``; a directory is joined (relative to ``root``, the
    corpus directory); an empty base means ``root``.
    """
    if is_remote(file):
        return file
    if not base:
        return str(root / file)
    if "{file}" in base:
        return base.replace("{file}", file)
    if base.startswith("pipe:"):
        raise ValueError(
            f"shard_base {base!r} is a pipe: command without {{file}}: write where the shard "
            "name goes, e.g. 'pipe:aws s3 cp s3://bucket/corpus/{file} -'"
        )
    if is_remote(base):
        return base.rstrip("/") + "/" + urllib.parse.quote(file)
    return str(root / base / file)


class ShardFetchError(OSError):
    """A remote shard that cannot be read: retrying cannot fix it, or retries ran out."""


class _Dropped(Exception):
    """One attempt failed in a way a later attempt may not (the reader retries)."""


@dataclass(frozen=True)
class FetchPolicy:
    """How remote shards are read (from the ``data`` settings, see :meth:`from_config`)."""

    retries: int = 6  # attempts after a failure without progress
    wait_s: float = 1.0  # first backoff; doubles per attempt, capped at MAX_WAIT_S
    timeout_s: float = 60.0  # no byte for this long = a dropped read
    cache_dir: str = ""  # keep verified copies here ("" = stream, keep nothing)

    @classmethod
    def from_config(cls, cfg) -> FetchPolicy:
        """From a ``DataConfig`` (its ``shard_*`` settings)."""
        return cls(cfg.shard_retries, cfg.shard_retry_wait, cfg.shard_timeout, cfg.shard_cache)


# ---- one attempt: an open HTTP response or command, positioned at a byte offset ----------
class _HttpAttempt:
    """GET ``url`` from byte ``start`` (``Range``); ``skip`` bytes to discard if ignored."""

    def __init__(self, url: str, start: int, size: int, timeout: float) -> None:
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            self.resp = urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout
            )
        except urllib.error.HTTPError as exc:
            exc.close()
            what = f"{url}: HTTP {exc.code} {exc.reason}"
            if exc.code in TRANSIENT_HTTP or exc.code >= 500:
                raise _Dropped(what) from None
            raise ShardFetchError(f"{what} (check the URL / data.shard_base)") from None
        self.skip = start
        if self.resp.status == 206:
            got = re.match(r"bytes (\d+)-", self.resp.headers.get("Content-Range", ""))
            if not got or int(got.group(1)) != start:
                self.close()
                raise ShardFetchError(f"{url}: asked for bytes {start}-, got {got and got[0]}")
            self.skip = 0
        elif size and not start:
            length = self.resp.headers.get("Content-Length")
            if length is not None and int(length) != size:
                self.close()
                raise ShardFetchError(
                    f"{url}: the server has {length} bytes, corpus.json says {size}: the "
                    "uploaded shard is not the one this corpus.json describes"
                )

    def readinto(self, view: memoryview) -> int:
        return self.resp.readinto(view)

    def finish(self) -> None:
        """End of the body reached: nothing more to check (the length is checked above)."""

    def close(self) -> None:
        self.resp.close()


class _PipeAttempt:
    """``sh -c <command>``; its stdout is the shard from byte 0, so ``skip = start``."""

    def __init__(self, command: str, start: int, timeout: float) -> None:
        self.command, self.timeout, self.skip = command, timeout, start
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        # its own process group: closing early stops the whole command, not just the shell
        self.proc = subprocess.Popen(
            command, shell=True, stdout=subprocess.PIPE, stderr=self.err, bufsize=0,
            start_new_session=True,
        )  # fmt: skip

    def readinto(self, view: memoryview) -> int:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            raise _Dropped(f"no data for {self.timeout:g} s")
        return self.proc.stdout.readinto(view)

    def finish(self) -> None:
        """End of output: the command must have succeeded (else its output is suspect)."""
        code = self.proc.wait()
        if code != 0:
            self.err.seek(0)
            tail = self.err.read()[-500:].decode(errors="replace").strip()
            what = f"command exited with status {code}" + (f": {tail}" if tail else "")
            if code in PERMANENT_EXIT:
                raise ShardFetchError(f"pipe:{self.command}: {what}")
            raise _Dropped(what)

    def close(self) -> None:
        """Stop the command if it still runs (closed early): SIGTERM, SIGKILL after 5 s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.proc.wait()
        self.proc.stdout.close()
        self.err.close()


# ---- the retrying reader ----------------------------------------------------------------
class ShardReader(io.RawIOBase):
    """One remote shard as a sequential, seamless byte stream (see the module docstring).

    ``size`` (corpus.json's; 0 = unknown): a shorter stream is a drop, retried; a longer
    one fails. ``sha256`` ("" = unknown): checked at the end, raised by :meth:`verify`.
    ``on_retry(source, attempt, wait_s, error)`` is told of every retry.
    ``cancel`` (an event) makes the next read fail (stops a background download).
    """

    def __init__(
        self,
        source: str,
        *,
        size: int = 0,
        sha256: str = "",
        policy: FetchPolicy = FetchPolicy(),
        on_retry: Callable[[str, int, float, str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self.source, self.size, self.sha256, self.policy = source, size, sha256, policy
        self.on_retry, self.cancel = on_retry, cancel
        self.pos = 0  # bytes delivered so far
        self.failed: Exception | None = None  # set when the reader gave up
        self.mismatch: ShardFetchError | None = None  # sha256 differs (see verify)
        self._hash = hashlib.sha256()
        self._attempt = None
        self._skip = 0  # bytes of the current attempt still to discard (resume without Range)
        self._failures = 0  # consecutive failed attempts without progress
        self._rng = random.Random()  # backoff jitter; never the global RNG

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.failed is not None:
            raise self.failed
        while True:
            try:
                n = self._read_some(view)
            except ShardFetchError as exc:
                self._give_up(exc)
            except (OSError, http.client.HTTPException, _Dropped) as exc:
                self._retry(exc)
                continue
            if n:
                self._hash.update(view[:n])
                self.pos += n
                self._failures = 0
            return n

    def _read_some(self, view: memoryview) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise ShardFetchError(f"{self.source}: cancelled")
        if self._attempt is None:
            self._attempt = self._open()
            self._skip = self._attempt.skip
        while self._skip:  # a server/command that cannot start mid-file: discard the prefix
            n = self._attempt.readinto(view[: min(self._skip, len(view))])
            if n == 0:
                raise _Dropped(f"stream ended before byte {self.pos} (where the read resumes)")
            self._skip -= n
        n = self._attempt.readinto(view)
        if n == 0:
            self._attempt.finish()
            self._check_end()
        elif self.size and self.pos + n > self.size:
            raise ShardFetchError(
                f"{self.source}: more than the {self.size} bytes corpus.json says: the source "
                "is not the shard this corpus.json describes"
            )
        return n

    def _open(self):
        if self.source.startswith("pipe:"):
            return _PipeAttempt(self.source[5:], self.pos, self.policy.timeout_s)
        return _HttpAttempt(self.source, self.pos, self.size, self.policy.timeout_s)

    def _check_end(self) -> None:
        if self.size and self.pos < self.size:
            raise _Dropped(f"stream ended at byte {self.pos} of {self.size}")
        if self.sha256 and self._hash.hexdigest() != self.sha256 and self.mismatch is None:
            # reported by verify(), once the reader above is done: raising here would cut
            # off whatever a buffered reader still holds, a tail that depends on buffering
            self.mismatch = ShardFetchError(
                f"{self.source}: sha256 {self._hash.hexdigest()[:16]}... differs from "
                f"corpus.json's {self.sha256[:16]}...: the source is not this corpus' shard"
            )

    def verify(self) -> None:
        """After the end of the stream: raise if its content differs from corpus.json's."""
        if self.mismatch is not None:
            raise self.mismatch

    def _retry(self, exc: BaseException) -> None:
        self._close_attempt()
        self._failures += 1
        reason = f"{type(exc).__name__}: {exc}"[:300]
        if self._failures > self.policy.retries:
            self._give_up(
                ShardFetchError(
                    f"{self.source}: giving up after {self._failures} failed attempts at byte "
                    f"{self.pos} (data.shard_retries={self.policy.retries}); last: {reason}"
                )
            )
        wait = min(self.policy.wait_s * 2 ** (self._failures - 1), MAX_WAIT_S)
        wait *= 0.5 + 0.5 * self._rng.random()  # jitter: ranks do not retry in lockstep
        if self.on_retry is not None:
            self.on_retry(self.source, self._failures, wait, reason)
        time.sleep(wait)

    def _give_up(self, exc: ShardFetchError):
        self._close_attempt()
        self.failed = exc
        raise exc

    def _close_attempt(self) -> None:
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            try:
                attempt.close()
            except Exception as exc:  # noqa: BLE001 - a broken connection may fail to close
                log.debug("%s: closing a failed attempt: %r", self.source, exc)

    def close(self) -> None:
        self._close_attempt()
        super().close()


def probe(source: str, policy: FetchPolicy, size: int = 0) -> None:
    """Read the first tar header of a remote shard: catches a wrong base URL, bucket or
    credentials before any training work (one small request; at most one retry)."""
    quick = FetchPolicy(min(policy.retries, 1), min(policy.wait_s, 1.0), policy.timeout_s)
    # HTTP announces its length up front (a wrong upload fails here); a command's output
    # length is known only at its end, so a short one must fail on its missing tar header
    size = 0 if source.startswith("pipe:") else size
    with ShardReader(source, size=size, policy=quick) as reader:
        head = bytearray(512)
        got = 0
        while got < 512 and (n := reader.readinto(memoryview(head)[got:])):
            got += n
    if got < 512 or head[257:262] != b"ustar":
        raise ShardFetchError(
            f"{source}: does not start with a tar header (got {bytes(head[:40])!r}...): "
            "check data.shard_base"
        )


def check_remote_shards(corpus, policy: FetchPolicy) -> None:
    """Up-front check of a corpus whose shards are remote: the first one must answer with a
    tar header (a wrong base URL, bucket, command or credentials fails here, before any
    work). The others are checked as they are read (size and sha256 against corpus.json).

    Raises ValueError naming the source and the setting to fix.
    """
    remote = [(src, info) for src, info in zip(corpus.shard_paths, corpus.shards)
              if is_remote(src) and info.count]  # fmt: skip
    if not remote:
        return
    source, info = remote[0]
    try:
        probe(source, policy, info.bytes)
    except (OSError, http.client.HTTPException, _Dropped) as exc:
        raise ValueError(
            f"corpus {corpus.root}: cannot read its first remote shard: {exc} "
            "(data.shard_base / corpus.json shard_base; docs/remote_shards.md)"
        ) from None
    log.info("corpus %s: %d remote shards, the first answers (%s); each is checked against "
             "corpus.json when read", corpus.root, len(remote), source)  # fmt: skip
