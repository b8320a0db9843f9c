"""Helpers for WebSocket tests: real ASGI application, real Redis pub/sub, real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import quote

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connections
from django.test import Client
from django.utils import timezone

from config.asgi import application
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import close_async_queue
from realtime.consumers import _jobs_updated_since
from realtime.hub import close_hub
from tests.support.users import create_operator

Headers = Sequence[tuple[bytes, bytes]]

# Real Redis round trips: generous, but a hang still fails fast.
RECEIVE_TIMEOUT = 5
ALLOWED_ORIGIN = b"http://localhost:8000"
FOREIGN_ORIGIN = b"https://evil.example"


@pytest.fixture(autouse=True)
async def close_sync_thread_connections() -> AsyncIterator[None]:
    """Close the database connection that the consumers' sync thread keeps (CONN_MAX_AGE),
    or the test database cannot be dropped at the end of the session."""
    yield
    await sync_to_async(connections.close_all)()
    # The hub and the Redis client belong to this test's event loop, which ends with it.
    await close_hub()
    await close_async_queue()


def ws_path(token: str | None = None) -> str:
    return "/ws" if token is None else f"/ws?token={quote(token, safe='')}"


def communicator(*, token: str | None = None, headers: Headers = ()) -> WebsocketCommunicator:
    # As a browser on http://localhost:8000 would send it (ALLOWED_ORIGIN is that page's origin).
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


async def create_job(
    tenant: Tenant | str,
    *,
    updated_at: datetime | None = None,
    status: str = JobStatus.PENDING,
    job_type: str = "sleep",
) -> Job:
    now = timezone.now()
    tenant_id = tenant if isinstance(tenant, str) else tenant.id
    return await Job.objects.acreate(
        tenant_id=tenant_id,
        type=job_type,
        payload={"delayMs": 0},
        status=status,
        run_at=now,
        created_at=updated_at or now,
        updated_at=updated_at or now,
    )


def session_cookie(user: AbstractBaseUser) -> tuple[bytes, bytes]:
    """A `Cookie` header carrying a real logged-in Django session of the user."""
    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return (b"cookie", f"{name}={client.cookies[name].value}".encode())


@pytest.fixture
def staff_user(db: None) -> AbstractBaseUser:
    # Staff who may view jobs: the dashboard and staff sockets need that permission.
    return create_operator()


@pytest.fixture
def staff_cookie(staff_user: AbstractBaseUser) -> tuple[bytes, bytes]:
    return session_cookie(staff_user)


@pytest.fixture
def plain_user_cookie(db: None) -> tuple[bytes, bytes]:
    user = get_user_model().objects.create_user(username="customer", is_staff=False)
    return session_cookie(user)


class ReplayGate:
    """Holds a consumer's `since` replay just before (or after) its database read until
    `release()`.

    Lets a test put published updates exactly between "subscribed" and "read the
    database". It waits in the event loop, not in the sync thread, so other sockets keep running.
    """

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self._released = asyncio.Event()
        # Hold after the read instead: for a write committed after the snapshot was taken.
        self.after_read = False

    async def read(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        frames = await _jobs_updated_since(*args, **kwargs) if self.after_read else None
        self.entered.set()
        await asyncio.wait_for(self._released.wait(), RECEIVE_TIMEOUT * 2)
        return frames if frames is not None else await _jobs_updated_since(*args, **kwargs)

    async def wait_entered(self) -> None:
        await asyncio.wait_for(self.entered.wait(), RECEIVE_TIMEOUT)

    def release(self) -> None:
        self._released.set()


@pytest.fixture
def replay_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReplayGate]:
    gate = ReplayGate()
    monkeypatch.setattr("realtime.consumers._jobs_updated_since", gate.read)
    yield gate
    gate.release()
