"""A real HTTP server for shard files on loopback, for tests (``from shard_server import ...``).

``ShardServer(dir)`` serves the files of ``dir`` on ``127.0.0.1:<free port>`` from a
thread while used as a context manager. It counts every request per file name and the
body bytes it sent, can honour ``Range: bytes=N-`` requests (``ranges=True``; off, it
answers 200 with the whole file, like ``python -m http.server``), and can drop the
connection mid-body: it announces the full ``Content-Length``, sends part of the body
and closes the socket, once per name in ``drop_once`` or on every request for names in
``drop_always``.
"""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self


class ShardServer:
    def __init__(
        self,
        root: str | Path,
        *,
        ranges: bool = False,
        drop_once: tuple[str, ...] = (),
        drop_always: tuple[str, ...] = (),
        drop_fraction: float = 0.5,
    ) -> None:
        self.root, self.ranges = Path(root), ranges
        self.drop_once, self.drop_always = set(drop_once), set(drop_always)
        self.drop_fraction = drop_fraction
        self.requests: Counter = Counter()  # file name -> GET requests
        self.sent: Counter = Counter()  # file name -> body bytes sent
        self.range_starts: list[tuple[str, int]] = []  # (name, first byte) of Range requests
        self.dropped: list[str] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def total_requests(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def __enter__(self) -> Self:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def _plan(self, name: str, start: int, length: int) -> int | None:
        """Bytes of this response's body to send before dropping, or None (send all)."""
        with self.lock:
            if start:
                self.range_starts.append((name, start))
            drop = name in self.drop_always or name in self.drop_once
            self.drop_once.discard(name)
            if drop:
                self.dropped.append(name)
                return int(length * self.drop_fraction)
        return None


def _handler(server: ShardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server calls do_<METHOD>
            name = self.path.lstrip("/")
            with server.lock:
                server.requests[name] += 1
            path = server.root / name
            if "/" in name or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            got = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if server.ranges and got:
                start = int(got.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = server._plan(name, start, len(body))
            if cut is not None:  # a connection that breaks mid-body
                body = body[:cut]
            self.wfile.write(body)
            self.wfile.flush()
            with server.lock:
                server.sent[name] += len(body)
            if cut is not None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler
