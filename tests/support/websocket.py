"""WebSocket tests in process: Channels' WebsocketCommunicator on the real ASGI application
(config.asgi), with the realtime hub on the real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from config.asgi import application
from realtime.consumers import _jobs_updated_since

Headers = Sequence[tuple[bytes, bytes]]

# Real Redis round trips: generous, but a hang still fails fast.
RECEIVE_TIMEOUT = 5
ALLOWED_ORIGIN = b"http://localhost:8000"
FOREIGN_ORIGIN = b"https://evil.example"


def ws_path(token: str | None = None) -> str:
    return "/ws" if token is None else f"/ws?token={quote(token, safe='')}"


def communicator(*, token: str | None = None, headers: Headers = ()) -> WebsocketCommunicator:
    """A socket not yet connected, as a browser on http://localhost:8000 would open it
    (ALLOWED_ORIGIN is that page's origin)."""
    if not any(name == b"host" for name, _ in headers):
        headers = [(b"host", b"localhost:8000"), *headers]
    return WebsocketCommunicator(application, ws_path(token), headers=list(headers))


async def receive(comm: WebsocketCommunicator) -> dict[str, Any]:
    return await comm.receive_json_from(timeout=RECEIVE_TIMEOUT)


@asynccontextmanager
async def open_ws(
    *, token: str | None = None, headers: Headers = ()
) -> AsyncIterator[WebsocketCommunicator]:
    """A connected socket whose CONNECTED frame was received; always disconnected at the end."""
    comm = communicator(token=token, headers=headers)
    try:
        connected, _ = await comm.connect(timeout=RECEIVE_TIMEOUT)
        assert connected, "handshake refused"
        hello = await receive(comm)
        assert hello["type"] == "CONNECTED"
        assert isinstance(hello["message"], str)
        yield comm
    finally:
        await comm.disconnect()


async def subscribe(
    comm: WebsocketCommunicator, tenant_id: str, *, since: str | None = None
) -> dict[str, Any]:
    """SUBSCRIBE (with `since`, a replay follows) and its SUBSCRIBED answer."""
    message: dict[str, Any] = {"type": "SUBSCRIBE", "tenantId": tenant_id}
    if since is not None:
        message["since"] = since
    await comm.send_json_to(message)
    answer = await receive(comm)
    assert answer["type"] == "SUBSCRIBED", answer
    assert answer["tenantId"] == tenant_id
    return answer


async def assert_alive(comm: WebsocketCommunicator) -> None:
    """The socket is still open and answering (after an ERROR, say)."""
    await comm.send_json_to({"type": "PING"})
    assert await receive(comm) == {"type": "PONG"}


def session_cookie(user: AbstractBaseUser) -> tuple[bytes, bytes]:
    """A `Cookie` header carrying a real logged-in Django session of the user."""
    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return (b"cookie", f"{name}={client.cookies[name].value}".encode())


class ReplayGate:
    """Holds a consumer's `since` replay just before (or after) its database read until
    `release()`.

    Lets a test put published updates exactly between "subscribed" and "read the
    database". It waits in the event loop, not in the sync thread, so other sockets keep running.
    """

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.released = asyncio.Event()
        # Hold after the read instead: for a write committed after the snapshot was taken.
        self.after_read = False

    async def read(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        frames = await _jobs_updated_since(*args, **kwargs) if self.after_read else None
        self.entered.set()
        await asyncio.wait_for(self.released.wait(), RECEIVE_TIMEOUT * 2)
        return frames if frames is not None else await _jobs_updated_since(*args, **kwargs)

    async def wait_entered(self) -> None:
        await asyncio.wait_for(self.entered.wait(), RECEIVE_TIMEOUT)

    def release(self) -> None:
        self.released.set()
