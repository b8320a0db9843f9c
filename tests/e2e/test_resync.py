"""Never silent (SPEC §10, issue 14), for real: every way a WebSocket subscriber can miss updates,
done to the real server (`manage.py serve`) with a real worker, and each time the subscriber is
told (RESYNC, or its socket closes) and, resubscribing from the cursor it was given, ends with
exactly the database's state, job by job.

The client (`Mirror`) is what a careful application does: it keeps each job's frame with the
highest cursor, remembers the cursor of the last SUBSCRIBED or RESYNC (the point it holds every
change up to), resubscribes from it after a RESYNC and after a reconnection. A resubscription
replays every job changed after that point, so a state the client already got live after it may
come again (same cursor); what must never happen is the same change twice within one
subscription (frames that arrive while a SUBSCRIBE is unanswered may still be the previous
subscription's, which the new one may replay).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from channels.db import database_sync_to_async
from websockets.exceptions import ConnectionClosed

from jobs.models import TERMINAL_STATUSES, Job, Tenant
from jobs.services import api_key_create
from realtime.broadcast import job_update_message
from realtime.consumers import SLOW_READER, UPDATES_DROPPED
from tests.support.processes import child_pids
from tests.support.redis_server import private_redis
from tests.support.stack import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TENANT = "acme"
SLEEP_0 = {"type": "sleep", "payload": {"delayMs": 0}}
# How long a scenario may take to settle (every job finished, the client caught up).
SETTLE_S = 30
# How long a restarted API process may take to accept connections again.
RECONNECT_S = 30


class Mirror:
    """A tenant's jobs as a WebSocket subscriber knows them (see the module docstring)."""

    def __init__(self, url: str, key: str) -> None:
        self.url = f"{url}?token={key}"
        self.ws: websockets.ClientConnection | None = None
        self.state: dict[str, dict[str, Any]] = {}
        self.cursor = "0"
        # Per change received: the SUBSCRIBE count then, and whether one was unanswered (then
        # the change may be the previous subscription's, which the new one may replay).
        self.received: dict[tuple[str, str], tuple[int, bool]] = {}
        self.subscriptions = 0
        self.answered = 0
        self.repeated_without_resubscribing: list[tuple[str, str]] = []
        self.resent_by_resubscription = 0
        self.resyncs: list[dict[str, Any]] = []
        self.unavailable = 0
        self.reconnections = 0
        self.closes: list[int | None] = []

    async def connect(self, **options: Any) -> None:
        self.ws = await websockets.connect(self.url, ping_interval=None, **options)
        hello = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        assert hello["type"] == "CONNECTED", hello
        await self.subscribe()

    async def subscribe(self) -> None:
        assert self.ws is not None
        self.subscriptions += 1
        await self.ws.send(
            json.dumps({"type": "SUBSCRIBE", "tenantId": TENANT, "cursor": self.cursor})
        )

    async def handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "JOB_UPDATE":
            change = (frame["jobId"], frame["cursor"])
            if change in self.received:
                subscriptions, unanswered = self.received[change]
                if subscriptions == self.subscriptions and not unanswered:
                    self.repeated_without_resubscribing.append(change)
                else:
                    self.resent_by_resubscription += 1
            self.received[change] = (self.subscriptions, self.answered < self.subscriptions)
            held = self.state.get(frame["jobId"])
            if held is None or int(frame["cursor"]) > int(held["cursor"]):
                self.state[frame["jobId"]] = frame
        elif kind == "SUBSCRIBED":
            self.answered += 1
            assert frame["cursor"] is not None, frame
            self.cursor = frame["cursor"]
        elif kind == "ERROR" and frame.get("code") == "RESYNC":
            self.resyncs.append(frame)
            self.cursor = frame["cursor"]
            if frame.get("retryAfterMs"):
                await asyncio.sleep(frame["retryAfterMs"] / 1000)
            await self.subscribe()
        elif kind == "ERROR" and frame["message"].startswith("live updates are unavailable"):
            # The API process cannot reach Redis yet: the same SUBSCRIBE, a little later.
            self.answered += 1
            self.unavailable += 1
            await asyncio.sleep(0.3)
            await self.subscribe()
        else:
            raise AssertionError(f"unexpected frame {frame}")

    async def read(self, seconds: float) -> None:
        """Handle what arrives for `seconds`; a dropped socket is reconnected (and
        resubscribed from the cursor held), as a client does after a restart."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                assert self.ws is not None
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except TimeoutError:
                return
            except ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else None)
                self.answered = self.subscriptions  # that socket will answer nothing more
                await self._reconnect(time.monotonic() + RECONNECT_S)
                continue
            await self.handle(json.loads(raw))

    async def _reconnect(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                await self.connect(open_timeout=2)
            except (OSError, TimeoutError, websockets.InvalidStatus, ConnectionClosed):
                await asyncio.sleep(0.2)
                continue
            self.reconnections += 1
            return
        raise AssertionError("could not reconnect")

    async def catch_up(self, database: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Read until the state equals the database's (every job finished first)."""
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            expected = await database_sync_to_async(database)()
            if self.state == expected and all(
                frame["status"] in TERMINAL_STATUSES for frame in expected.values()
            ):
                return
            await self.read(0.5)
        differ = {
            job_id: (self.state.get(job_id, {}).get("cursor"), frame["cursor"])
            for job_id, frame in expected.items()
            if self.state.get(job_id) != frame
        }
        raise AssertionError(
            f"{len(differ)} of {len(expected)} jobs differ (held, database): "
            f"{list(differ.items())[:5]}; {len(self.state) - len(expected)} extra"
        )

    def check(self) -> None:
        assert self.repeated_without_resubscribing == [], self.repeated_without_resubscribing

    def summary(self) -> str:
        return (
            f"{len(self.state)} jobs mirrored, {len(self.resyncs)} RESYNC, "
            f"{self.subscriptions} SUBSCRIBE, {self.reconnections} reconnections, "
            f"{self.resent_by_resubscription} states resent by a resubscription"
        )

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


def database_state() -> dict[str, dict[str, Any]]:
    """The tenant's jobs as JOB_UPDATE frames, from the database."""
    return {str(job.id): job_update_message(job) for job in Job.objects.filter(tenant_id=TENANT)}


def start_stack(stack: Stack, *, concurrency: int = 4, processes: int = 1) -> subprocess.Popen:
    """The worker, then the API (both boot meanwhile); the API's supervisor."""
    stack.start_worker("--concurrency", str(concurrency))
    return stack.start_api(processes=processes)


def worker_running(stack: Stack, key: str) -> list[str]:
    """Create a few jobs and wait until the worker has run them (their ids)."""
    ids = stack.create_batch(key, [SLEEP_0] * 20)
    wait_until(
        lambda: Job.objects.filter(id__in=ids, status__in=TERMINAL_STATUSES).count() == len(ids),
        timeout=30,
        message="the worker did not run the first jobs",
    )
    return ids


def tenant_key() -> str:
    tenant = Tenant.objects.create(id=TENANT)
    _, key = api_key_create(tenant=tenant)
    return key


@contextmanager
def producing(stack: Stack, key: str, every_s: float = 0.02) -> Iterator[list[str]]:
    """Jobs created one by one in a thread meanwhile (failures, e.g. while the API is down, are
    skipped); their ids."""
    created: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=5) as client:
            while not stop.is_set():
                try:
                    response = client.post(f"{stack.base_url}/jobs", json=SLEEP_0)
                    if response.status_code == 201:
                        created.append(response.json()["id"])
                except httpx.HTTPError:
                    pass
                time.sleep(every_s)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        yield created
    finally:
        stop.set()
        thread.join(timeout=10)


# --- 1. a client that stops reading ---------------------------------------------------------
BUFFER_BYTES = 64 * 1024
JOBS = 3000


def test_slow_reader_over_its_send_buffer_gets_resync_and_catches_up(stack: Stack) -> None:
    key = tenant_key()
    # The kernel takes up to net.ipv4.tcp_wmem's max (4 MB) before anything waits in the
    # server; 3,000 jobs make about 3.4 MB of frames.
    stack.env["JOBS_WS_SEND_BUFFER_BYTES"] = str(BUFFER_BYTES)
    start_stack(stack, concurrency=16)
    worker_running(stack, key)

    async def scenario() -> Mirror:
        mirror = Mirror(stack.ws_url, key)
        # A receive buffer the kernel cannot grow, and a client that stops taking frames from
        # it once one waits: what the server sends piles up on its side.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", stack.port))
        await mirror.connect(sock=sock, max_queue=1)
        await mirror.read(1.0)  # SUBSCRIBED
        # Not reading now: 3,000 jobs, three updates each, about 3.5 MB of frames.
        await asyncio.to_thread(stack.create_batch, key, [SLEEP_0] * JOBS)
        await asyncio.to_thread(
            wait_until,
            lambda: f"websocket send buffer over {BUFFER_BYTES} bytes" in stack.log("api"),
            timeout=20,
            message="the server never found the socket over its buffer",
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # reading again
        await mirror.catch_up(database_state)
        await mirror.close()
        return mirror

    mirror = asyncio.run(scenario())
    kinds = collections.Counter(r["message"] for r in mirror.resyncs)
    print(f"\nslow reader: {mirror.summary()}; {dict(kinds)}")
    assert [r["message"] for r in mirror.resyncs][:1] == [SLOW_READER]
    assert mirror.resyncs[0]["tenantId"] == TENANT
    assert mirror.reconnections == 0, "the socket stays open"
    assert len(mirror.state) == JOBS + 20
    mirror.check()


# --- 2. the API's Redis connection killed ---------------------------------------------------
def test_killed_pubsub_connection_resyncs_open_sockets(stack: Stack, tmp_path: Path) -> None:
    key = tenant_key()
    with private_redis(tmp_path) as redis_server:
        stack.env["REDIS_URL"] = redis_server.url
        start_stack(stack)
        worker_running(stack, key)

        async def scenario() -> Mirror:
            mirror = Mirror(stack.ws_url, key)
            await mirror.connect()
            with producing(stack, key) as created:
                await mirror.read(1.0)
                killed = redis_server.client().client_kill_filter(_type="pubsub")
                assert killed >= 1
                await mirror.read(1.5)
            assert len(created) > 20
            await mirror.catch_up(database_state)
            await mirror.close()
            return mirror

        mirror = asyncio.run(scenario())
    print(f"\npub/sub connection killed: {mirror.summary()}")
    assert mirror.resyncs and mirror.resyncs[0]["message"] == UPDATES_DROPPED
    assert mirror.closes == [] and mirror.reconnections == 0, "sockets stay open (no 1011)"
    mirror.check()


# --- 3. Redis restarted ---------------------------------------------------------------------
def test_redis_restarted_resyncs_and_state_matches(stack: Stack, tmp_path: Path) -> None:
    key = tenant_key()
    with private_redis(tmp_path) as redis_server:
        stack.env["REDIS_URL"] = redis_server.url
        stack.env["JOBS_RECONCILE_INTERVAL_S"] = "1"
        start_stack(stack)
        worker_running(stack, key)

        async def scenario() -> Mirror:
            mirror = Mirror(stack.ws_url, key)
            await mirror.connect()
            with producing(stack, key) as created:
                await mirror.read(1.0)
                redis_server.kill()
                await mirror.read(1.5)  # Redis down: jobs are still created
                redis_server.start()
                await mirror.read(1.5)
            assert len(created) > 20
            await mirror.catch_up(database_state)
            await mirror.close()
            return mirror

        mirror = asyncio.run(scenario())
    print(f"\nredis restarted: {mirror.summary()}, {mirror.unavailable} SUBSCRIBE retried")
    assert mirror.resyncs and mirror.resyncs[0]["message"] == UPDATES_DROPPED
    assert mirror.closes == [] and mirror.reconnections == 0, "sockets stay open"
    mirror.check()


# --- 4. the API process restarted -----------------------------------------------------------
def test_api_process_killed_client_reconnects_from_its_cursor(stack: Stack) -> None:
    key = tenant_key()
    api = start_stack(stack)
    (daphne,) = wait_until(lambda: child_pids(api.pid), timeout=10, message="no API process")
    earlier = worker_running(stack, key)

    async def scenario() -> Mirror:
        mirror = Mirror(stack.ws_url, key)
        await mirror.connect()
        with producing(stack, key) as created:
            await mirror.read(1.0)
            # Past the jobs run before it came: a reconnection replays only what followed.
            assert int(mirror.cursor) >= len(earlier)
            os.kill(daphne, signal.SIGKILL)  # `serve` starts another one
            await mirror.read(3.0)
        assert len(created) > 20
        await mirror.catch_up(database_state)
        await mirror.close()
        return mirror

    mirror = asyncio.run(scenario())
    print(f"\nAPI process killed: {mirror.summary()}")
    assert mirror.reconnections >= 1
    assert mirror.closes[:1] == [None], "the socket died without a close frame"
    assert child_pids(api.pid) - {daphne}, "serve restarted the process"
    mirror.check()


# --- 5. a replay cut short ------------------------------------------------------------------
def test_truncated_replays_are_followed_until_caught_up(stack: Stack) -> None:
    key = tenant_key()
    stack.start_api()

    async def scenario() -> Mirror:
        mirror = Mirror(stack.ws_url, key)
        await mirror.connect()
        await mirror.read(0.5)
        await mirror.close()
        # Disconnected meanwhile: 2,500 jobs created, more than two replays (1,000 each) and
        # the tenant's replay budget (2,000 at once) hold; some of them run during the replays.
        await asyncio.to_thread(stack.create_batch, key, [SLEEP_0] * 2500)
        stack.start_worker("--concurrency", "8")
        await mirror.connect()
        await mirror.catch_up(database_state)
        await mirror.close()
        return mirror

    mirror = asyncio.run(scenario())
    messages = {r["message"] for r in mirror.resyncs}
    print(f"\ntruncated replays: {mirror.summary()}; {sorted(messages)}")
    assert "replay truncated, resubscribe with cursor" in messages
    assert len(mirror.resyncs) >= 2
    assert len(mirror.state) == 2500
    mirror.check()
