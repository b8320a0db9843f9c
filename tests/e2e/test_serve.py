"""`manage.py serve`: one port, several Daphne processes; HTTP and WebSockets on every one of
them, a stop within the grace period even under load, restarts of a killed process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from jobs.models import Tenant
from jobs.services import api_key_create
from tests.support.processes import child_pids, is_running
from tests.support.stack import Stack, wait_until
from tests.support.wrk import finish_wrk, start_wrk

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

GRACE_S = 10


def daphne_processes(supervisor_pid: int, count: int) -> set[int]:
    return wait_until(
        lambda: len(pids := child_pids(supervisor_pid)) == count and pids,
        timeout=30,
        message=f"the supervisor did not run {count} processes",
    )


@contextmanager
def paused(pids: set[int]) -> Iterator[None]:
    """SIGSTOP these processes meanwhile, so that only the others accept connections."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def subscribe(stack: Stack, key: str, tenant_id: str) -> None:
    with connect(f"{stack.ws_url}?token={key}", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "CONNECTED"
        ws.send(json.dumps({"type": "SUBSCRIBE", "tenantId": tenant_id}))
        assert json.loads(ws.recv(timeout=10))["type"] == "SUBSCRIBED"


def test_every_process_serves_http_and_websockets_on_one_port_and_sigterm_stops_all(
    stack: Stack,
) -> None:
    tenant = Tenant.objects.create(id="acme")
    _, key = api_key_create(tenant=tenant)
    api = stack.start_api("--grace", str(GRACE_S), processes=2)
    processes = daphne_processes(api.pid, 2)

    for serving in sorted(processes):
        with paused(processes - {serving}):
            response = httpx.get(f"{stack.base_url}/health", timeout=30)
            assert response.status_code == 200
            subscribe(stack, key, tenant.id)

    with connect(f"{stack.ws_url}?token={key}", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "CONNECTED"
        api.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=GRACE_S)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001  # going away
    assert api.wait(timeout=GRACE_S) == 0, stack.log("api")
    assert not any(is_running(pid) for pid in processes)
    assert "stopped cleanly" in stack.log("api")


@pytest.mark.parametrize(
    ("path", "when"),
    [("/admin/login/", "after"), ("/health", "after"), ("/admin/login/", "during")],
)
def test_sigterm_right_after_or_during_load_exits_within_the_grace_period(
    stack: Stack, path: str, when: str
) -> None:
    api = stack.start_api("--grace", str(GRACE_S), processes=2)
    processes = daphne_processes(api.pid, 2)
    load = start_wrk(f"{stack.base_url}{path}", connections=64, duration_s=3)
    if when == "after":
        result = finish_wrk(load)
    else:
        time.sleep(1.5)  # halfway through the load

    api.send_signal(signal.SIGTERM)
    stopping_since = time.monotonic()
    try:
        code = api.wait(timeout=GRACE_S + 10)
    finally:
        stop_s = time.monotonic() - stopping_since
        if when == "during":
            result = finish_wrk(load)
    log = stack.log("api")
    print(
        f"\nSIGTERM {when} wrk -c64 on {path}: {result.requests} requests, "
        f"{result.non_2xx_3xx} non-2xx/3xx; exit {code} after {stop_s:.2f}s (grace {GRACE_S}s)"
    )
    assert result.requests > 0, result.output
    assert code == 0, log[-4000:]
    assert stop_s < GRACE_S
    assert "SIGKILL" not in log and "exit blocked" not in log
    assert not any(is_running(pid) for pid in processes)


def test_a_killed_process_is_restarted_and_serves(stack: Stack) -> None:
    api = stack.start_api(processes=2)
    processes = daphne_processes(api.pid, 2)
    victim = min(processes)

    os.kill(victim, signal.SIGKILL)
    now = wait_until(
        lambda: len(pids := child_pids(api.pid)) == 2 and victim not in pids and pids,
        timeout=30,
        message="the killed process was not replaced",
    )
    with paused(processes - {victim}):  # only the new process can answer
        assert httpx.get(f"{stack.base_url}/health", timeout=30).status_code == 200
    assert re.search(rf"exited with signal SIGKILL .*\[child=\d+ pid={victim}\]", stack.log("api"))
    assert len(now - processes) == 1

    api.send_signal(signal.SIGTERM)
    assert api.wait(timeout=30) == 0, stack.log("api")


def test_processes_stop_when_the_supervisor_is_killed(stack: Stack) -> None:
    api = stack.start_api(processes=1)
    processes = daphne_processes(api.pid, 1)

    api.send_signal(signal.SIGKILL)
    api.wait()
    wait_until(
        lambda: not any(is_running(pid) for pid in processes),
        timeout=20,
        message="a Daphne process outlived its supervisor",
    )


def raw_response_head(port: int, request: bytes) -> tuple[str, dict[str, str]]:
    """Send `request` as is (httpx would clean it up) and read the status line and headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    status, *lines = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    return status, {
        name.strip().lower(): value.strip()
        for name, value in (line.split(":", 1) for line in lines)
    }


def test_no_response_names_the_server_software(stack: Stack) -> None:
    """No `Server` header (Daphne sends `Server: daphne`) on any path a response can take."""
    tenant = Tenant.objects.create(id="acme")
    _, key = api_key_create(tenant=tenant)
    stack.start_api()
    seen: dict[str, httpx.Headers | dict[str, str]] = {}

    with httpx.Client(base_url=stack.base_url, timeout=30) as client:
        for path in (
            "/health",  # the lean API handler (config/handlers.py)
            "/jobs",  # ... with an error (401)
            "/admin/login/",  # Django's handler and middleware
            "/docs",
            "/static/admin/css/base.css",  # WhiteNoise
            "/no-such-page",  # Django's 404
        ):
            response = client.get(path)
            assert response.status_code in (200, 401, 404), (path, response.status_code)
            seen[path] = response.headers
    # The server's own error, before any application code runs.
    status, headers = raw_response_head(
        stack.port, b"GET /health?\xff HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert status.startswith("HTTP/1.1 400"), status
    seen["400 for a non-ASCII query"] = headers
    # WebSocket handshakes, accepted and refused.
    with connect(f"{stack.ws_url}?token={key}", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "CONNECTED"
        assert ws.response is not None and ws.response.status_code == 101
        seen["ws accepted"] = dict(ws.response.headers.raw_items())
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{stack.ws_url}?token=wrong", open_timeout=30)
    assert refused.value.response.status_code == 403
    seen["ws refused"] = dict(refused.value.response.headers.raw_items())

    server_headers = {
        where: {name.lower(): value for name, value in dict(headers).items()}.get("server")
        for where, headers in seen.items()
    }
    assert server_headers == dict.fromkeys(seen)
