"""A real local HTTP server for webhook tests: records every request and every connection, and
answers from a script (a status, or a whole `Reply`: body, headers, a delay, an endless body)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STREAM_CHUNK = b"x" * 65536
STREAM_CHUNKS_MAX = 4096  # 256 MiB: far past any client's cap, bounded for safety


@dataclass
class Recorded:
    """One request as the server read it; header names in lower case."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class Reply:
    """One scripted answer. `body` None is `{"ok": true|false}` as JSON; `delay_s` waits before
    answering (cut short when the server closes); `endless` streams a body until the client
    hangs up, which sets the server's `client_hung_up`."""

    status: int = 200
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    endless: bool = False


@dataclass
class WebhookServer:
    """Answers `statuses[path]` in turn (the last one repeats; a status or a Reply), 200 by
    default. `path` is the request target as sent, query string included."""

    host: str
    port: int
    requests: list[Recorded] = field(default_factory=list)
    statuses: dict[str, list[int | Reply]] = field(default_factory=dict)
    connections: int = 0
    # Requests being answered right now, and the most there ever were at once.
    in_flight: int = 0
    max_in_flight: int = 0
    client_hung_up: threading.Event = field(default_factory=threading.Event)
    closing: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/hook", *, host: str | None = None) -> str:
        """This server's URL for `path`; `host` names it otherwise (a name or another spelling
        of its address), the port staying the same."""
        if host is None:
            host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def calls(self, path: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if path is None or r.path == path]

    def next_reply(self, path: str) -> Reply:
        """What the server answers to the next request for `path` (taken from the script)."""
        with self.lock:
            script = self.statuses.get(path)
            if not script:
                return Reply()
            answer = script.pop(0) if len(script) > 1 else script[0]
        return answer if isinstance(answer, Reply) else Reply(status=answer)


def _handler(server: WebhookServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: without this, Nagle plus delayed ACKs
        # add 40 ms to every call.
        disable_nagle_algorithm = True

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            with server.lock:
                server.requests.append(Recorded(self.command, self.path, headers, body))
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._answer(server.next_reply(self.path))
            finally:
                with server.lock:
                    server.in_flight -= 1

        def _answer(self, reply: Reply) -> None:
            if reply.delay_s:
                server.closing.wait(reply.delay_s)
            if reply.endless:
                self._stream()
                return
            payload = (
                reply.body
                if reply.body is not None
                else json.dumps({"ok": reply.status < 400}).encode()
            )
            self.send_response(reply.status)
            headers = {"Content-Type": "application/json", **reply.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            try:
                for _ in range(STREAM_CHUNKS_MAX):
                    if server.closing.is_set():
                        return
                    self.wfile.write(STREAM_CHUNK)
            except OSError:
                server.client_hung_up.set()
            self.close_connection = True

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler


@contextmanager
def webhook_server(host: str = "127.0.0.1", port: int = 0) -> Iterator[WebhookServer]:
    """Serve on `port` (0: a free one) of `host` in a background thread for the duration of
    the block (raises OSError if it cannot be bound here)."""
    state = WebhookServer(host=host, port=port)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

        def verify_request(self, request: Any, client_address: Any) -> bool:
            # Called for every accepted TCP connection, before any byte is read.
            with state.lock:
                state.connections += 1
            return True

    httpd = Server((host, port), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield state
    finally:
        state.closing.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
