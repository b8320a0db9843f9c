"""A TCP proxy in front of the API that fails the first connections the way networks and load
balancers do, then passes everything through: for tests of the SDK's retries.

In order, the proxy: is not listening at all until `listen()` (connection refused); answers the
first `unavailable` connections itself with a 503, as a load balancer whose backend is down;
forwards the next `lose_answers` requests to the API and closes the connection as soon as the
API starts answering (the request took effect, its answer never arrives); relays the rest."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from tests.support.stack import free_port

_BODY = b'{"error": "no backend available"}'
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 0\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)


class FlakyProxy:
    def __init__(self, upstream_port: int, *, unavailable: int = 0, lose_answers: int = 0) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.unavailable = unavailable
        self.lose_answers = lose_answers
        self.connections = 0
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def listen(self) -> FlakyProxy:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        for sock in [self._server, *self._sockets]:
            if sock is not None:
                sock.close()

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client, number), daemon=True).start()

    def _serve(self, client: socket.socket, number: int) -> None:
        try:
            if number <= self.unavailable:
                _read_request(client)
                client.sendall(UNAVAILABLE)
            elif number <= self.unavailable + self.lose_answers:
                upstream = self._upstream()
                upstream.sendall(_read_request(client))
                upstream.recv(1)  # the API has committed and starts answering: drop the answer
                upstream.close()
            else:
                upstream = self._upstream()
                threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
                _pump(client, upstream)
        except OSError:
            pass
        finally:
            client.close()

    def _upstream(self) -> socket.socket:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
        with self._lock:
            self._sockets.append(upstream)
        return upstream


def _read_request(sock: socket.socket) -> bytes:
    """One whole HTTP request (head and a Content-Length body) as sent."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
