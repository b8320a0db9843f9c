"""One API process of `manage.py serve`: Daphne, with a stop that drains before it ends.

Daphne's own SIGTERM handler stops the Twisted reactor at once: it cancels every running
application instance and stops the asyncio loop while Django's request threads still run. Each
of those threads later hands the rest of its request back to the loop (`AsyncToSync`, e.g. from
WhiteNoise's middleware to the next one) and waits for a loop that will never run again; the
interpreter's exit joins every `ThreadPoolExecutor` thread, so the process hangs until SIGKILL.

Here the first SIGTERM or SIGINT stops accepting connections, closes WebSockets with 1001
("going away"), lets each HTTP connection finish the request it is on (then closes it), and
stops the reactor only once no application instance is left (every request thread included:
asgiref waits for the request's thread before the instance ends), or when the grace period is
over. A second signal stops at once. If a thread still outlives the reactor, the process exits
without it after `EXIT_WATCHDOG_S` instead of hanging.

Responses carry no `Server` header (Daphne would name itself on each), and the access log shows
no `?token=` (an API key in the URL).

A WebSocket close sent with a `reason` carries it to the client (Daphne alone drops it).

WebSocket applications are also offered a way to send one message to many sockets cheaply (the
`jobqueue.prepared_frames` ASGI extension, below), and WebSocket and HTTP applications a way to
know how much of what they sent still waits for a slow client (`pending()`, in that extension
and in `jobqueue.send_buffer`).

Event streams (`text/event-stream` responses, `GET /events`) are ended by the server as soon as
it starts to stop, as WebSockets are closed: they never end by themselves, and their clients
reconnect (a browser's EventSource by itself, from the last event id it got).

Run as `python -m config.daphne_server --fd N --grace S [daphne options] config.asgi:application`;
every `daphne` option is accepted.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

from autobahn.websocket.protocol import PreparedMessage
from daphne.access import AccessLogGenerator
from daphne.cli import CommandLineInterface
from daphne.endpoints import build_endpoint_description_strings
from daphne.http_protocol import WebRequest
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import reactor, tcp

from config.logging import AccessLog
from config.memory import freeze_startup_objects
from realtime.hub import PREPARED_FRAMES, SEND_BUFFER

# Named, not __name__: this module runs as __main__.
logger = logging.getLogger("config.daphne_server")

DRAIN_TICK_S = 0.1
# A normal interpreter exit after the reactor stopped takes far less. Longer means a request
# thread outlived the grace period and waits for the stopped loop: exit without it.
EXIT_WATCHDOG_S = 2.0
GOING_AWAY = 1001
# `?token=<api key>` in a logged request line.
TOKEN_IN_QUERY = re.compile(r"([?&])token=[^&#]*")
# RFC 6455: a close frame's payload is at most 125 bytes, two of them the code.
MAX_CLOSE_REASON_BYTES = 123


class GracefulServer(Server):
    """Daphne whose stop signal drains connections before the reactor stops."""

    def __init__(
        self, *args: Any, grace_s: float, listen_fd: int | None = None, **kwargs: Any
    ) -> None:
        # Twisted's handlers would stop the reactor at once; ours are installed in run().
        super().__init__(*args, signal_handlers=False, **kwargs)
        if (
            isinstance(self.action_logger, AccessLogGenerator)
            and self.action_logger.stream is sys.stdout
        ):
            # Daphne writes its access log to stdout in its own format: go through logging,
            # in LOG_FORMAT like every other line (one JSON object per line under json).
            self.action_logger = AccessLog()
        self.grace_s = grace_s
        self.listen_fd = listen_fd
        if listen_fd is not None:
            # Daphne's `fd:` endpoint adopts the socket as IPv4 whatever its family (an IPv6
            # client's address comes out garbled); run() adopts it with its own family.
            self.endpoints.remove(build_endpoint_description_strings(file_descriptor=listen_fd)[0])
        self.ports: list[Any] = []
        self.stop_deadline: float | None = None
        self.stop_started = 0.0
        self.stopped_cleanly = True
        self.closed_sockets: set[WebSocketProtocol] = set()

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        # The application is loaded: keep its objects out of every later collection.
        freeze_startup_objects()
        if self.listen_fd is not None:
            reactor.callWhenRunning(self._adopt_listening_socket, self.listen_fd)
        try:
            super().run()
        finally:
            start_exit_watchdog()

    def _adopt_listening_socket(self, fd: int) -> None:
        probe = socket.socket(fileno=fd)
        family = probe.family
        probe.detach()
        try:
            # What reactor.adoptStreamPort() does, with a port that shares bursts.
            port = SharedSocketPort._fromListeningDescriptor(reactor, fd, family, self.http_factory)
            port.startListening()
        except Exception:
            logger.exception(
                "cannot listen on the inherited socket (fd %d)", fd, extra=log_context()
            )
            self.stopped_cleanly = False
            self._stop_reactor()
            return
        # Twisted listens on a copy; without closing this one, the socket would keep taking
        # connections into its backlog after the stop, until this process exits.
        os.close(fd)
        self.listen_success(port)

    def listen_success(self, port: Any) -> None:
        self.ports.append(port)
        super().listen_success(port)

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
        if self.stop_deadline is not None and isinstance(protocol, WebRequest):
            # A request that arrived on a kept-alive connection while draining: serve it, then
            # close the connection, so every connection ends after at most one more request.
            _close_after_response(protocol)
        if isinstance(protocol, WebSocketProtocol):
            scope.setdefault("extensions", {})[PREPARED_FRAMES] = {
                "prepare": self._prepare_text,
                "send": functools.partial(self._send_prepared, protocol),
                "pending": functools.partial(websocket_pending_bytes, protocol),
            }
        elif isinstance(protocol, WebRequest):
            scope.setdefault("extensions", {})[SEND_BUFFER] = {
                "pending": functools.partial(request_pending_bytes, protocol),
            }
        return super().create_application(protocol, scope)

    async def handle_reply(self, protocol: Any, message: dict[str, Any]) -> None:
        # Daphne drops a close's `reason` (ASGI lets applications give one, RFC 6455 carries up
        # to 123 bytes of it and clients show it): send it.
        reason = message.get("reason") if message.get("type") == "websocket.close" else None
        details = self.connections.get(protocol)
        if (
            reason
            and isinstance(protocol, WebSocketProtocol)
            and protocol.state == protocol.STATE_OPEN
            and details is not None
            and not details.get("disconnected")
        ):
            truncated = reason.encode("utf-8")[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
            protocol.sendClose(code=message.get("code") or 1000, reason=truncated)
            return
        await super().handle_reply(protocol, message)

    def log_action(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        # An EventSource (like a browser's WebSocket) can only send its key in the URL.
        path = details.get("path")
        if isinstance(path, str) and "token=" in path:
            details = {**details, "path": TOKEN_IN_QUERY.sub(r"\1token=[redacted]", path)}
        super().log_action(protocol, action, details)

    def _prepare_text(self, text: str) -> PreparedMessage:
        """A text message framed once, to be sent on many sockets (autobahn's broadcast)."""
        return self.ws_factory.prepareMessage(text.encode("utf-8"), isBinary=False)

    def _send_prepared(self, protocol: WebSocketProtocol, prepared: PreparedMessage) -> None:
        # What Server.handle_reply and serverSend do for a text frame, minus the framing.
        details = self.connections.get(protocol)
        if details is None or details.get("disconnected") or protocol.state != protocol.STATE_OPEN:
            return
        protocol.sendPreparedMessage(prepared)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(self.begin_stop, signal.Signals(signum).name)

    def begin_stop(self, signal_name: str) -> None:
        """Stop accepting and drain; a second call stops the reactor at once."""
        if self.stop_deadline is not None:
            logger.warning(
                "%s again: stopping now, cancelling what still runs",
                signal_name,
                extra=log_context(),
            )
            self.stopped_cleanly = False
            self._stop_reactor()
            return
        self.stop_started = time.monotonic()
        self.stop_deadline = self.stop_started + self.grace_s
        for port in self.ports:
            port.stopListening()
        logger.info(
            "%s: stopped accepting, draining %d connections (grace %.1fs)",
            signal_name,
            sum(1 for details in self.connections.values() if not details.get("disconnected")),
            self.grace_s,
            extra=log_context(),
        )
        self._drain()

    def _drain(self) -> None:
        if not reactor.running:
            return
        busy = 0
        for protocol, details in list(self.connections.items()):
            try:
                self._wind_down(protocol, details)
            except Exception:
                logger.exception("could not close %r while draining", protocol, extra=log_context())
            instance = details.get("application_instance")
            if not details.get("disconnected") or (instance is not None and not instance.done()):
                busy += 1
        elapsed = time.monotonic() - self.stop_started
        if busy == 0:
            logger.info("drained in %.2fs", elapsed, extra=log_context())
            self._stop_reactor()
        elif self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
            logger.warning(
                "grace period over with %d connections or requests still running: cancelling them",
                busy,
                extra=log_context(),
            )
            self.stopped_cleanly = False
            self._stop_reactor()
        else:
            reactor.callLater(DRAIN_TICK_S, self._drain)

    def _wind_down(self, protocol: Any, details: dict[str, Any]) -> None:
        if isinstance(protocol, WebSocketProtocol):
            if protocol.state == protocol.STATE_OPEN and protocol not in self.closed_sockets:
                self.closed_sockets.add(protocol)
                # serverClose() only allows 1000 and 3000-4999; "going away" is the standard
                # code for a server that stops, and clients reconnect on it.
                protocol.sendCloseFrame(code=GOING_AWAY, isReply=False)
        elif not details.get("disconnected"):
            _close_after_response(protocol)
            if _is_event_stream(protocol) and not protocol.finished:
                # It would run until the grace period is over: end it now (the client sees a
                # clean end of the response, and the application an `http.disconnect`).
                protocol.finish()

    def _stop_reactor(self) -> None:
        if reactor.running:
            reactor.stop()


class SharedSocketPort(tcp.Port):
    """A listening port that accepts one connection each time the socket is ready. Twisted
    accepts up to 100 (and more under load) in one go, so of the processes sharing the socket,
    the first one awake took a whole burst of connections (wrk's 16 all went to one process);
    one at a time, they split it, and the less busy process takes more."""

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass  # Twisted adapts it after every accept round; keep it at 1


def log_context() -> dict[str, int]:
    return {"pid": os.getpid()}


def pending_bytes(transport: Any) -> int:
    """Bytes written to a connection that the kernel has not taken yet: Twisted keeps them in
    its transport, `dataBuffer` from `offset` plus the `_tempDataLen` bytes not yet joined to
    it. A wrapping transport (TLS) is looked through to the socket's. 0 if none is found."""
    for _ in range(3):
        if transport is None:
            return 0
        if hasattr(transport, "dataBuffer"):
            return (
                len(transport.dataBuffer) - transport.offset + getattr(transport, "_tempDataLen", 0)
            )
        transport = getattr(transport, "transport", None)
    return 0


def websocket_pending_bytes(protocol: WebSocketProtocol) -> int:
    """What a WebSocket's client has yet to receive: the transport's buffer and autobahn's own
    send queue (used only for chopped or synchronous sends; empty otherwise). 0 once the
    connection is closed: nothing will be sent any more, so nothing should wait for it."""
    if protocol.state == protocol.STATE_CLOSED:
        return 0
    send_queue = getattr(protocol, "send_queue", None)
    queued = sum(len(data) for data, _ in send_queue) if send_queue else 0
    return pending_bytes(protocol.transport) + queued


def request_pending_bytes(request: WebRequest) -> int:
    """What an HTTP response's client has yet to receive."""
    channel = request.channel
    return 0 if channel is None else pending_bytes(channel.transport)


def _is_event_stream(request: WebRequest) -> bool:
    if not getattr(request, "_response_started", False):
        return False
    content_type = (request.responseHeaders.getRawHeaders(b"content-type") or [b""])[0]
    return content_type.split(b";")[0].strip().lower() == b"text/event-stream"


def _close_after_response(request: WebRequest) -> None:
    channel = request.channel
    if channel is None:
        return
    channel.persistent = False
    if not request.startedWriting:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])


def start_exit_watchdog() -> None:
    """Leave the process after `EXIT_WATCHDOG_S` even if a thread that can no longer finish
    (parked on the stopped loop) would block the interpreter's exit."""

    def watch() -> None:
        time.sleep(EXIT_WATCHDOG_S)
        stuck = [
            thread.name
            for thread in threading.enumerate()
            if thread is not threading.main_thread() and not thread.daemon
        ]
        logger.error(
            "exit blocked %.0fs by %d threads (%s): exiting without them",
            EXIT_WATCHDOG_S,
            len(stuck),
            ", ".join(stuck[:5]),
            extra=log_context(),
        )
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)

    threading.Thread(target=watch, name="exit-watchdog", daemon=True).start()


class GracefulCommandLineInterface(CommandLineInterface):
    description = "Daphne for `manage.py serve`: SIGTERM/SIGINT drain before the server stops"

    def __init__(self) -> None:
        super().__init__()
        self.parser.add_argument(
            "--grace",
            type=float,
            default=30.0,
            help="seconds open requests get to finish after SIGTERM/SIGINT (default 30)",
        )
        # An empty name: no `Server` header at all (Daphne's default, "daphne", names the
        # software on every HTTP response and WebSocket handshake). `--server-name` still works.
        self.parser.set_defaults(server_name="")

    def run(self, args: list[str]) -> None:
        options = self.parser.parse_args(args)
        self.server_class = functools.partial(
            GracefulServer, grace_s=options.grace, listen_fd=options.file_descriptor
        )
        super().run(args)


def main() -> None:
    cli = GracefulCommandLineInterface()
    cli.run(sys.argv[1:])
    sys.exit(0 if cli.server.stopped_cleanly else 1)


if __name__ == "__main__":
    main()
