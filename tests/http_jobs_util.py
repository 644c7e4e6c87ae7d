"""A scripted HTTP server for the tests of kind http (strings-queue's jobs): a real socket on
loopback, answering by path, recording every request it gets."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    start: float
    end: float = 0.0
    dropped: bool = False  # the client closed the connection before the answer


@dataclass
class Scripted:
    """Answers by path (the part before ``?``):

    ``/code/N``           status N, body ``METHOD N`` (strings-queue's test handlers' body)
    ``/slow/S``           sleeps S seconds, then 200
    ``/seq/NAME``         the next code of ``seqs[NAME]`` (its last one repeats)
    ``/hdr/N``            status N with the headers in ``headers_for[path]``
    ``/hold``             200 after ``release`` is set (or 30 s); a client that closes the
                          connection meanwhile ends the call (``Call.dropped``)
    ``/body/NAME``        200 with ``bodies[NAME]`` as the body
    """

    calls: list[Call] = field(default_factory=list)
    seqs: dict[str, list[int]] = field(default_factory=dict)
    headers_for: dict[str, dict[str, str]] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: dict[str, int] = field(default_factory=dict)  # x-bitlancer-job-id -> requests in progress
    most_at_once: dict[str, int] = field(default_factory=dict)
    in_progress: int = 0
    peak: int = 0
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def of(self, path: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.path == path]

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        path = h.path.split("?", 1)[0]
        call = Call(h.command, path, body, {k.lower(): v for k, v in h.headers.items()}, time.time())
        job = call.headers.get("x-bitlancer-job-id", "")
        with self.lock:
            self.calls.append(call)
            self.running[job] = self.running.get(job, 0) + 1
            self.most_at_once[job] = max(self.most_at_once.get(job, 0), self.running[job])
            self.in_progress += 1
            self.peak = max(self.peak, self.in_progress)
        try:
            if path == "/hold" and not self._hold(h):
                call.dropped = True
                h.close_connection = True
                return
            code, extra = self._route(path)
            out = f"{h.command} {code}".encode()
            if path.startswith("/body/"):
                out = self.bodies[path[6:]]
            try:
                h.send_response(code)
                for k, v in extra.items():
                    h.send_header(k, v)
                h.send_header("Content-Length", str(len(out)))
                h.end_headers()
                if h.command != "HEAD":
                    h.wfile.write(out)
            except OSError:
                pass  # the client gave up (a timeout test)
        finally:
            with self.lock:
                call.end = time.time()
                self.running[job] -= 1
                self.in_progress -= 1

    def _hold(self, h: BaseHTTPRequestHandler) -> bool:
        """Wait for ``release``; False if the client closed the connection first."""
        conn = h.connection
        for _ in range(600):
            if self.release.wait(0.05):
                return True
            r, _, _ = select.select([conn], [], [], 0)
            if r:
                try:
                    if conn.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except OSError:
                    return False
        return True

    def _route(self, path: str) -> tuple[int, dict[str, str]]:
        parts = path.strip("/").split("/")
        if parts[0] == "code":
            return int(parts[1]), {}
        if parts[0] == "slow":
            time.sleep(float(parts[1]))
            return 200, {}
        if parts[0] == "seq":
            with self.lock:
                s = self.seqs[parts[1]]
                code = s.pop(0) if len(s) > 1 else s[0]
            return code, {}
        if parts[0] == "hdr":
            return int(parts[1]), self.headers_for.get(path, {})
        if parts[0] in ("hold", "body"):
            return 200, {}
        return 404, {}


def start_server() -> tuple[Scripted, ThreadingHTTPServer]:
    s = Scripted()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            s.answer(self)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    s.port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return s, srv


def scripted_server() -> Iterator[Scripted]:
    """Generator behind the ``srv`` fixtures: a server for the test, shut down after it."""
    s, server = start_server()
    yield s
    s.release.set()
    server.shutdown()
    server.server_close()


class Trickle:
    """A server that answers a status line, then one header byte every ``every`` seconds
    until the client goes away: a request that never ends unless its client ends it."""

    def __init__(self, every: float = 0.2) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.every = every
        self.lock = threading.Lock()
        self.open = 0
        self.job_ids: list[str] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        with self.lock:
            self.open += 1
        try:
            req = c.recv(65536).decode(errors="replace")
            for line in req.split("\r\n"):
                if line.lower().startswith("x-bitlancer-job-id:"):
                    self.job_ids.append(line.split(":", 1)[1].strip())
            c.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self.stop.is_set():
                time.sleep(self.every)
                c.sendall(b"a")
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
            c.close()
