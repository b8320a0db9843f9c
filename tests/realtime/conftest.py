"""Fixtures of the WebSocket tests (helpers: tests/support/websocket.py): real ASGI application,
real Redis pub/sub, real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connections

from jobs.queue import close_async_queue
from realtime.hub import close_hub
from tests.support.websocket import ReplayGate, session_cookie


@pytest.fixture(autouse=True)
async def close_sync_thread_connections() -> AsyncIterator[None]:
    """Close the database connection that the consumers' sync thread keeps (CONN_MAX_AGE),
    or the test database cannot be dropped at the end of the session."""
    yield
    await sync_to_async(connections.close_all)()
    # The hub and the Redis client belong to this test's event loop, which ends with it.
    await close_hub()
    await close_async_queue()


@pytest.fixture
def staff_cookie(staff_user: AbstractBaseUser) -> tuple[bytes, bytes]:
    return session_cookie(staff_user)


@pytest.fixture
def plain_user_cookie(db: None) -> tuple[bytes, bytes]:
    user = get_user_model().objects.create_user(username="customer", is_staff=False)
    return session_cookie(user)


@pytest.fixture
def replay_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReplayGate]:
    gate = ReplayGate()
    monkeypatch.setattr("realtime.consumers._jobs_updated_since", gate.read)
    yield gate
    gate.release()
