"""Limits enforced by the real server stack (Daphne in front of Django)."""

from __future__ import annotations

import socket

import httpx
import pytest

from jobs.models import Tenant
from jobs.services import api_key_create
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_oversized_headers_and_bodies_are_refused(stack: Stack) -> None:
    _, key = api_key_create(tenant=Tenant.objects.create(id="acme"))
    stack.start_api()
    huge_header = b"X-Filler: " + b"a" * 20_000 + b"\r\n"
    answer = raw_request(
        stack.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + huge_header + b"\r\n"
    )
    # Twisted drops a connection whose header line passes 16 KiB, before Django sees it.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    many_headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(600))
    answer = raw_request(
        stack.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many_headers + b"\r\n"
    )
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    body = b'{"type": "sleep", "payload": {"delayMs": 1}, "x": "' + b"a" * 5_000_000 + b'"}'
    response = httpx.post(
        f"{stack.base_url}/jobs",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"] == "Request body too large"
    assert httpx.get(f"{stack.base_url}/health", timeout=5).status_code == 200
