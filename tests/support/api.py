"""The REST API through Django's test client, as a client sends it: JSON bodies, a Bearer key,
and the spec's error JSON checked the same way everywhere."""

from __future__ import annotations

import json
from typing import Any

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
