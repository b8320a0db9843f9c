"""Server-Sent Events as a client reads them: a parser of the `text/event-stream` format, and
`GET /events` in process (the ASGI application driven message by message, so a stream that never
ends can be read as it goes)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from asgiref.testing import ApplicationCommunicator

RECEIVE_TIMEOUT = 5


@dataclass
class Event:
    """One dispatched block: `event`, `id`, `data` (lines joined), `retry`, and comments."""

    event: str | None = None
    id: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        assert self.data is not None, self
        return json.loads(self.data)


class EventParser:
    """Feed text as it arrives; complete blocks come out (`text/event-stream`, WHATWG HTML
    9.2.6: a field per line, `:` starts a comment, a blank line ends a block)."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        while "\n\n" in self.buffer:
            block, self.buffer = self.buffer.split("\n\n", 1)
            event = Event()
            data: list[str] = []
            for line in block.split("\n"):
                if line.startswith(":"):
                    event.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event.event = value
                elif name == "id":
                    event.id = value
                elif name == "retry":
                    event.retry = int(value)
            event.data = "\n".join(data) if data else None
            events.append(event)
        return events


class InProcessStream:
    """`GET /events` on config.asgi's application: the response's status and headers, then its
    events as they come. Always `close()` it (a disconnect, as when the client goes away).
    Waiting longer than asked for fails the test and cancels the application (asgiref)."""

    def __init__(
        self,
        application: Any,
        *,
        key: str | None,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        raw_headers = [(b"host", b"localhost:8000")]
        if key is not None:
            raw_headers.append((b"authorization", f"Bearer {key}".encode()))
        for name, value in (headers or {}).items():
            raw_headers.append((name.lower().encode(), value.encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/events",
            "raw_path": b"/events",
            "query_string": urlencode(query or {}).encode(),
            "root_path": "",
            "headers": raw_headers,
            "client": ("127.0.0.1", 40000),
            "server": ("localhost", 8000),
        }
        self.comm = ApplicationCommunicator(application, scope)
        self.parser = EventParser()
        self.pending: list[Event] = []
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.ended = False

    async def open(self) -> int:
        """Send the request; the response's status (headers in `headers`)."""
        await self.comm.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await self.comm.receive_output(RECEIVE_TIMEOUT)
        assert start["type"] == "http.response.start", start
        self.status = start["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return self.status

    async def read_body(self) -> bytes:
        """The whole body of a response that ends (an error)."""
        while not self.ended:
            await self._receive()
        return self.body

    async def _receive(self, within_s: float = RECEIVE_TIMEOUT) -> None:
        message = await self.comm.receive_output(within_s)
        assert message["type"] == "http.response.body", message
        chunk = message.get("body", b"")
        self.body += chunk
        self.pending.extend(self.parser.feed(chunk.decode()))
        if not message.get("more_body", False):
            self.ended = True

    async def next_event(self, within_s: float = RECEIVE_TIMEOUT) -> Event:
        """The next block (event or comment); fails if the stream ended or nothing came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not self.pending:
            assert not self.ended, "the stream ended"
            await self._receive(max(0.01, deadline - loop.time()))
        return self.pending.pop(0)

    async def events_until_end(self, within_s: float = RECEIVE_TIMEOUT) -> list[Event]:
        """Every block until the server ends the stream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not self.ended:
            await self._receive(max(0.01, deadline - loop.time()))
        events, self.pending = self.pending, []
        return events

    async def assert_nothing(self, within_s: float = 0.3) -> None:
        assert not self.pending, self.pending
        assert await self.comm.receive_nothing(within_s), "something more was sent"

    async def close(self) -> None:
        """Disconnect as a client does, and wait for the application to finish."""
        if not self.ended:
            await self.comm.send_input({"type": "http.disconnect"})
        await self.comm.wait(RECEIVE_TIMEOUT)
