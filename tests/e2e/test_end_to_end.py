"""End to end: Daphne and a worker as real processes, jobs of every type created over HTTP,
their updates received over a real WebSocket, the webhook received by a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from jobs.models import Job, JobStatus, Tenant
from jobs.services import api_key_create
from tests.support.stack import Stack, wait_until
from tests.support.webhook_server import webhook_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


async def collect_updates(
    ws: Any, job_ids: set[str], *, until: set[str], seconds: float
) -> dict[str, list[str]]:
    """Statuses per job, in arrival order, until every job reached one of `until`."""
    seen: dict[str, list[str]] = {job_id: [] for job_id in job_ids}

    async def read() -> None:
        while not all(seen[j] and seen[j][-1] in until for j in job_ids):
            frame = json.loads(await ws.recv())
            if frame["type"] == "JOB_UPDATE":
                assert frame["jobId"] in seen, f"update of a job not ours: {frame}"
                seen[frame["jobId"]].append(frame["status"])

    async with asyncio.timeout(seconds):
        await read()
    return seen


def test_jobs_of_every_type_run_and_stream_over_websocket(stack: Stack) -> None:
    tenant = Tenant.objects.create(id="acme", name="Acme")
    _, key = api_key_create(tenant=tenant)
    other = Tenant.objects.create(id="other")
    _, other_key = api_key_create(tenant=other)
    stack.start_api()
    stack.start_worker("--concurrency", "4")

    with webhook_server() as server:
        jobs = [
            {"type": "sleep", "payload": {"delayMs": 50}},
            {
                "type": "data_processing",
                "payload": {"values": [3, 1, 2], "operations": ["median", "max"]},
            },
            {
                "type": "email",
                "payload": {"to": ["ops@example.com"], "subject": "E2E", "body": "hi"},
            },
            {"type": "webhook", "payload": {"url": server.url("/e2e"), "body": {"hello": "world"}}},
        ]

        async def scenario() -> tuple[dict[str, str], dict[str, list[str]]]:
            headers = {"Authorization": f"Bearer {key}"}
            async with websockets.connect(f"{stack.ws_url}?token={key}") as ws:
                assert json.loads(await ws.recv())["type"] == "CONNECTED"
                await ws.send(json.dumps({"type": "SUBSCRIBE", "tenantId": "acme"}))
                subscribed = json.loads(await ws.recv())
                assert subscribed["type"] == "SUBSCRIBED" and subscribed["tenantId"] == "acme"
                async with httpx.AsyncClient(base_url=stack.base_url, headers=headers) as http:
                    # Another tenant's job must never reach this subscriber.
                    noise = await http.post(
                        "/jobs",
                        json={"type": "sleep", "payload": {"delayMs": 0}},
                        headers={"Authorization": f"Bearer {other_key}"},
                    )
                    assert noise.status_code == 201
                    created = {}
                    for body in jobs:
                        response = await http.post("/jobs", json=body)
                        assert response.status_code == 201, response.text
                        created[response.json()["jobId"]] = body["type"]
                seen = await collect_updates(
                    ws, set(created), until={"COMPLETED", "FAILED"}, seconds=30
                )
                return created, seen

        created, seen = asyncio.run(scenario())
        for job_id, statuses in seen.items():
            assert statuses[-1] == "COMPLETED", (created[job_id], statuses, stack.log("e2e-worker"))
            assert "RUNNING" in statuses
            assert statuses.index("RUNNING") < statuses.index("COMPLETED")
        calls = server.calls("/e2e")
        assert len(calls) == 1 and calls[0].json() == {"hello": "world"}

    listed = httpx.get(
        f"{stack.base_url}/jobs", headers={"Authorization": f"Bearer {key}"}, params={"limit": 10}
    ).json()
    assert listed["total"] == 4
    results = {job["type"]: job["result"] for job in listed["jobs"]}
    assert results["sleep"] == {"sleptMs": 50}
    assert results["data_processing"] == {"median": 2, "max": 3}
    assert results["email"] == {"sent": 1}
    assert results["webhook"]["statusCode"] == 200
    mails = list(Path(stack.env["EMAIL_URL"].removeprefix("file://")).glob("*"))
    assert len(mails) == 1 and "Subject: E2E" in mails[0].read_text()


def test_sigterm_lets_running_jobs_finish_and_exits_zero(stack: Stack) -> None:
    tenant = Tenant.objects.create(id="acme")
    _, key = api_key_create(tenant=tenant)
    stack.start_api()
    worker = stack.start_worker("--concurrency", "3")
    headers = {"Authorization": f"Bearer {key}"}
    ids = [
        httpx.post(
            f"{stack.base_url}/jobs",
            json={"type": "sleep", "payload": {"delayMs": 1500}},
            headers=headers,
        ).json()["id"]
        for _ in range(3)
    ]
    wait_until(
        lambda: Job.objects.filter(id__in=ids, status=JobStatus.RUNNING).count() == 3,
        timeout=15,
        message="jobs did not start",
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, stack.log("e2e-worker")
    statuses = set(Job.objects.filter(id__in=ids).values_list("status", flat=True))
    assert statuses == {JobStatus.COMPLETED}


def test_second_signal_puts_running_jobs_back(stack: Stack) -> None:
    tenant = Tenant.objects.create(id="acme")
    _, key = api_key_create(tenant=tenant)
    stack.start_api()
    worker = stack.start_worker("--concurrency", "2")
    headers = {"Authorization": f"Bearer {key}"}
    ids = [
        httpx.post(
            f"{stack.base_url}/jobs",
            json={"type": "sleep", "payload": {"delayMs": 60_000}},
            headers=headers,
        ).json()["id"]
        for _ in range(2)
    ]
    wait_until(
        lambda: Job.objects.filter(id__in=ids, status=JobStatus.RUNNING).count() == 2,
        timeout=15,
        message="jobs did not start",
    )
    worker.send_signal(signal.SIGTERM)
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=20) == 0, stack.log("e2e-worker")
    jobs = list(Job.objects.filter(id__in=ids))
    assert {job.status for job in jobs} == {JobStatus.PENDING}
    assert all(job.attempts == 0 and job.locked_by is None for job in jobs)
    # A fresh worker picks them up again.
    stack.start_worker("--concurrency", "2", name="second")
    wait_until(
        lambda: Job.objects.filter(id__in=ids, status=JobStatus.RUNNING).count() == 2,
        timeout=15,
        message="put-back jobs were not picked up again",
    )
