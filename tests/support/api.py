"""The REST API through Django's test client, as a client sends it: JSON bodies, a Bearer key,
and the spec's error JSON checked the same way everywhere."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import Client

SLEEP: dict[str, Any] = {"type": "sleep", "payload": {"delayMs": 10}}


def post(client: Client, path: str, body: Any, key: str | None, **headers: str) -> Any:
    """POST `body` (JSON unless already text or bytes) with the key and extra `headers`."""
    extra = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items()}
    if key:
        extra["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **extra)


def get(client: Client, path: str, key: str | None, **params: Any) -> Any:
    extra = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    return client.get(path, params, **extra)


def assert_error(response: Any, status: int, message: str | None = None) -> dict:
    """The response is the spec's error JSON with `status` (and `message`); its body."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str)
    if message is not None:
        assert body["error"] == message
    return body


@contextlib.asynccontextmanager
async def asgi_api(api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of config.asgi.application (the production path: the lean handler, psycopg's
    async pool, redis-py's asyncio client) in the test's event loop, with no server process.
    The pool, hub and Redis client it starts belong to that loop and are closed with it."""
    from config.asgi import application
    from jobs import pg
    from jobs.queue import close_async_queue
    from realtime.hub import close_hub

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://127.0.0.1",
        headers={"Authorization": f"Bearer {api_key}"},
    ) as client:
        yield client
    await pg.close_pools()
    await close_hub()
    await close_async_queue()
    await sync_to_async(connections.close_all)()
