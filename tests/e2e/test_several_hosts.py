"""Several hosts, for real: two API servers and three workers as if on three machines (each its
own working directory, local state and temporary files, `Stack.host`; nothing shared but
PostgreSQL, Redis and the settings), with a WebSocket client on each API server, and jobs
created through both.

What a user would notice, asserted: each subscriber, whichever server it is on, gets every job's
PENDING, RUNNING and COMPLETED, once each and in that order, with no RESYNC; and no job runs
twice: each webhook's URL is called exactly once at a local HTTP receiver, every job has one
attempt.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any

import httpx
import pytest
import websockets

from jobs.models import Job, JobStatus, Tenant
from jobs.queue import sync_queue
from jobs.services import api_key_create
from tests.support.stack import Stack, free_port, wait_until
from tests.support.webhook_server import webhook_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TENANT = "acme"
JOBS_PER_API = 150
SETTLE_S = 60


class Subscriber:
    """A WebSocket client of one API server: every JOB_UPDATE's status, per job, in order."""

    def __init__(self, ws_url: str, key: str) -> None:
        self.url = f"{ws_url}?token={key}"
        self.statuses: dict[str, list[str]] = collections.defaultdict(list)
        self.other: list[dict[str, Any]] = []
        self.ws: websockets.ClientConnection | None = None

    async def subscribe(self) -> None:
        self.ws = await websockets.connect(self.url, ping_interval=None)
        hello = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        assert hello["type"] == "CONNECTED", hello
        await self.ws.send(json.dumps({"type": "SUBSCRIBE", "tenantId": TENANT}))
        answer = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        assert answer["type"] == "SUBSCRIBED", answer

    async def read_until(self, done: int, deadline: float) -> None:
        """Read until `done` jobs have COMPLETED here, or the deadline."""
        assert self.ws is not None
        while self.completed() < done and (left := deadline - time.monotonic()) > 0:
            try:
                frame = json.loads(await asyncio.wait_for(self.ws.recv(), left))
            except TimeoutError:
                return
            if frame["type"] == "JOB_UPDATE":
                self.statuses[frame["jobId"]].append(frame["status"])
            else:
                self.other.append(frame)

    def completed(self) -> int:
        return sum(JobStatus.COMPLETED in seen for seen in self.statuses.values())


def test_two_api_hosts_three_worker_hosts(stack: Stack) -> None:
    tenant = Tenant.objects.create(id=TENANT)
    _, key = api_key_create(tenant=tenant)
    # All 24 worker slots may call the one receiver at once (else the per-destination cap puts
    # jobs back to PENDING, which is right but not what this test is about).
    stack.env["JOBS_WEBHOOK_HOST_CONCURRENCY"] = "32"
    ports = [free_port(), free_port()]
    for n, port in enumerate(ports):
        stack.spawn_api(f"api-{n}", port, env=stack.host(f"app-{n}"))
    workers = [f"worker-{host}" for host in ("app-0", "app-1", "jobs-0")]
    for name, host in zip(workers, ("app-0", "app-1", "jobs-0"), strict=True):
        stack.start_worker("--concurrency", "8", name=name, env=stack.host(host))
    # Every worker host registered (its first heartbeat) before the jobs come: on a loaded
    # machine one may take seconds to start, and this test is about three hosts sharing them.
    wait_until(
        lambda: {beat.name for beat in sync_queue().worker_beats()} >= set(workers),
        timeout=30,
        message="a worker did not register",
    )
    apis = [f"http://127.0.0.1:{port}" for port in ports]

    with webhook_server() as receiver:

        async def scenario() -> tuple[list[Subscriber], list[str]]:
            subscribers = [Subscriber(f"ws://127.0.0.1:{port}/ws", key) for port in ports]
            for subscriber in subscribers:
                await subscriber.subscribe()
            ids: list[str] = []
            async with httpx.AsyncClient(
                headers={"Authorization": f"Bearer {key}"}, timeout=10
            ) as client:
                for i in range(JOBS_PER_API):
                    for n, api in enumerate(apis):
                        url = receiver.url(f"/hook/{n}/{i}")
                        body = {"type": "webhook", "payload": {"url": url}}
                        response = await client.post(f"{api}/jobs", json=body)
                        assert response.status_code == 201, response.text
                        ids.append(response.json()["id"])
            deadline = time.monotonic() + SETTLE_S
            await asyncio.gather(*(s.read_until(len(ids), deadline) for s in subscribers))
            for subscriber in subscribers:
                assert subscriber.ws is not None
                await subscriber.ws.close()
            return subscribers, ids

        started = time.monotonic()
        subscribers, ids = asyncio.run(scenario())
        elapsed = time.monotonic() - started
        wait_until(
            lambda: len(receiver.calls()) >= len(ids), timeout=10, message="webhooks missing"
        )
        paths = collections.Counter(call.path for call in receiver.calls())

    jobs = Job.objects.filter(id__in=ids)
    assert set(jobs.values_list("status", flat=True)) == {JobStatus.COMPLETED}
    assert set(jobs.values_list("attempts", flat=True)) == {1}
    assert len(paths) == len(ids) and set(paths.values()) == {1}, "a webhook called twice"
    by_worker = collections.Counter(jobs.values_list("locked_by", flat=True))
    assert set(by_worker) == set(workers), by_worker
    assert subscribers[0].statuses == subscribers[1].statuses
    for subscriber in subscribers:
        assert subscriber.other == []  # no RESYNC, no ERROR
        assert set(subscriber.statuses) == set(ids)
        assert {tuple(seen) for seen in subscriber.statuses.values()} == {
            ("PENDING", "RUNNING", "COMPLETED")
        }
    updates = sum(len(seen) for s in subscribers for seen in s.statuses.values())
    print(
        f"\nseveral hosts: {len(ids)} jobs through 2 API servers, run by {dict(by_worker)},"
        f" each webhook called once; {len(subscribers)} subscribers got {updates} updates"
        f" ({updates // len(subscribers)} each, 3 per job) in {elapsed:.1f}s"
    )
