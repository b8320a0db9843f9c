"""The API's event-loop path as Daphne serves it: config.asgi's lean handler, psycopg's async
pool on the real PostgreSQL (committed data), redis-py's asyncio client on the real Redis, and
the realtime hub's key cache. tests/jobs/test_api.py covers the contract through the ORM path;
this module proves the production path gives the same answers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import Client
from django.utils import timezone

from jobs import pg
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import sync_queue
from jobs.services import api_key_create, api_key_revoke
from realtime.hub import get_hub
from tests.support.api import asgi_api
from tests.support.updates import listen_to_tenant

pytestmark = pytest.mark.django_db(transaction=True)

SLEEP = {"type": "sleep", "payload": {"delayMs": 0}}


@pytest.fixture(autouse=True)
def postgres_store(settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "API_STORE": "postgres"}


@pytest.fixture
async def api(api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of config.asgi.application in this test's event loop (no server process)."""
    async with asgi_api(api_key) as client:
        yield client


def job_row(job_id: str) -> Job:
    return Job.objects.get(id=job_id)


async def test_create_writes_the_row_queues_it_and_broadcasts_pending(
    api: httpx.AsyncClient, tenant: Tenant, redis_prefix: str
) -> None:
    with listen_to_tenant(tenant.id) as listener:
        response = await api.post("/jobs", json={**SLEEP, "priority": 2})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["jobId"] == body["id"] and body["status"] == "PENDING"
        assert body["priority"] == 2 and body["tenantId"] == tenant.id
        updates = await asyncio.to_thread(listener.settle, 0.3)

    row = await sync_to_async(job_row)(body["id"])
    assert row.status == JobStatus.PENDING and row.payload == SLEEP["payload"]
    queue = sync_queue()
    assert queue.client.zscore(queue.keys.ready(tenant.id), body["id"]) is not None
    assert [(u["jobId"], u["status"]) for u in updates] == [(body["id"], "PENDING")]
    created = queue.client.hget(f"{redis_prefix}:metrics:events", f"created|sleep|{tenant.id}")
    assert created == b"1"


async def test_get_answers_exactly_what_the_orm_path_answers(
    api: httpx.AsyncClient, api_key: str, settings: Any
) -> None:
    created = (await api.post("/jobs", json={**SLEEP, "delayMs": 60_000})).json()
    fast = await api.get(f"/jobs/{created['id']}")
    assert fast.status_code == 200

    settings.JOBS = {**settings.JOBS, "API_STORE": "orm"}
    orm = await sync_to_async(Client().get)(
        f"/jobs/{created['id']}", HTTP_AUTHORIZATION=f"Bearer {api_key}"
    )
    assert orm.status_code == 200
    assert fast.json() == orm.json()
    assert {key: value for key, value in created.items() if key != "jobId"} == fast.json()


async def test_another_tenants_job_is_404(api: httpx.AsyncClient, other_api_key: str) -> None:
    created = (await api.post("/jobs", json=SLEEP)).json()
    response = await api.get(
        f"/jobs/{created['id']}", headers={"Authorization": f"Bearer {other_api_key}"}
    )
    assert response.status_code == 404
    assert response.json() == {"error": "Job not found"}
    assert (await api.get(f"/jobs/{uuid.uuid4()}")).status_code == 404


async def test_idempotency_key_replays_and_conflicts(api: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-17"}
    first = await api.post("/jobs", json=SLEEP, headers=headers)
    again = await api.post("/jobs", json=SLEEP, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    other = await api.post("/jobs", json={**SLEEP, "priority": 5}, headers=headers)
    assert other.status_code == 409
    assert await sync_to_async(Job.objects.count)() == 1


async def test_concurrent_requests_with_one_idempotency_key_make_one_job(
    api: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "burst"}
    responses = await asyncio.gather(
        *(api.post("/jobs", json=SLEEP, headers=headers) for _ in range(8))
    )
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await sync_to_async(Job.objects.count)() == 1


async def test_expired_idempotency_key_makes_a_new_job(api: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "old"}
    first = (await api.post("/jobs", json=SLEEP, headers=headers)).json()
    await sync_to_async(Job.objects.filter(id=first["id"]).update)(
        created_at=timezone.now() - timedelta(hours=25)
    )
    second = await api.post("/jobs", json=SLEEP, headers=headers)
    assert second.status_code == 201 and second.json()["id"] != first["id"]
    old = await sync_to_async(job_row)(first["id"])
    assert old.idempotency_key is None


async def test_batch_is_copied_in_order_and_queued(api: httpx.AsyncClient, tenant: Tenant) -> None:
    jobs = [{"type": "sleep", "payload": {"delayMs": i}} for i in range(1000)]
    response = await api.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 201, response.text
    ids = response.json()["jobIds"]
    rows = await sync_to_async(
        lambda: list(Job.objects.filter(tenant=tenant).order_by("created_at"))
    )()
    assert [str(job.id) for job in rows] == ids
    assert [job.payload["delayMs"] for job in rows] == list(range(1000))
    queue = sync_queue()
    ready = queue.client.zrange(queue.keys.ready(tenant.id), 0, -1)
    assert [i.decode() for i in ready] == ids


async def test_invalid_batch_item_writes_nothing(api: httpx.AsyncClient) -> None:
    jobs = [SLEEP, {"type": "sleep", "payload": {"delayMs": -1}}]
    response = await api.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 400
    assert response.json()["details"][0]["field"].startswith("jobs.1.payload")
    assert await sync_to_async(Job.objects.count)() == 0


async def test_rate_limit_on_the_event_loop(api: httpx.AsyncClient, tenant: Tenant) -> None:
    tenant.rate_limit = 2
    await sync_to_async(tenant.save)()
    statuses = [(await api.post("/jobs", json=SLEEP)).status_code for _ in range(4)]
    assert statuses[:2] == [201, 201] and statuses[2:] == [429, 429]


async def test_cached_key_is_refused_as_soon_as_it_is_revoked(
    api: httpx.AsyncClient, api_key: str
) -> None:
    assert await get_hub().wait_connected(5)
    assert (await api.get("/jobs")).status_code == 200  # cached from here on
    await sync_to_async(api_key_revoke)(prefix=api_key.split("_")[1])
    # The revocation is announced on Redis after commit; the hub drops the cached key.
    deadline = asyncio.get_running_loop().time() + 1.0
    while (await api.get("/jobs")).status_code != 401:
        assert asyncio.get_running_loop().time() < deadline, "revoked key still accepted"
        await asyncio.sleep(0.02)


async def test_deactivated_tenant_is_refused_at_once(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    assert await get_hub().wait_connected(5)
    assert (await api.post("/jobs", json=SLEEP)).status_code == 201
    tenant.is_active = False
    await sync_to_async(tenant.save)()
    deadline = asyncio.get_running_loop().time() + 1.0
    while (await api.post("/jobs", json=SLEEP)).status_code != 401:
        assert asyncio.get_running_loop().time() < deadline, "inactive tenant still accepted"
        await asyncio.sleep(0.02)


async def test_new_key_works_while_others_are_cached(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    assert (await api.get("/jobs")).status_code == 200
    _, fresh = await sync_to_async(api_key_create)(tenant=tenant)
    response = await api.get("/jobs", headers={"Authorization": f"Bearer {fresh}"})
    assert response.status_code == 200


async def test_lean_handler_keeps_host_checks_and_limits(
    api: httpx.AsyncClient, settings: Any
) -> None:
    bad_host = await api.get("/stats", headers={"Host": "evil.example"})
    assert bad_host.status_code == 400
    assert bad_host.json() == {"error": "Invalid Host header"}

    big = json.dumps({**SLEEP, "pad": "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE})
    too_big = await api.post("/jobs", content=big, headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413
    assert too_big.json()["error"] == "Request body too large"

    health = await api.get("/health")
    assert health.status_code == 200
    assert health.headers["X-Content-Type-Options"] == "nosniff"
    assert (await api.get("/jobs/not-a-path/at-all")).status_code == 404


async def test_database_unreachable_is_503(api: httpx.AsyncClient, settings: Any) -> None:
    assert (await api.get("/jobs")).status_code == 200  # key cached, pool open
    await pg.close_pools()
    db = connections["default"].settings_dict
    original = db["PORT"], db["OPTIONS"]
    db["PORT"] = 1  # nothing listens there
    db["OPTIONS"] = {**db["OPTIONS"], "pool": {"min_size": 0, "max_size": 2, "timeout": 1}}
    try:
        response = await api.post("/jobs", json=SLEEP)
    finally:
        await pg.close_pools()
        db["PORT"], db["OPTIONS"] = original
    assert response.status_code == 503
    assert response.json()["error"] == "Database unavailable"
    assert response.headers["Retry-After"] == "5"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/jobs", ["GET", "POST"]),
        ("DELETE", f"/jobs/{uuid.uuid4()}", ["GET"]),
        ("GET", "/jobs/batch", ["POST"]),
        ("POST", "/health", ["GET"]),
    ],
)
async def test_a_method_a_path_does_not_take_is_a_json_405(
    api: httpx.AsyncClient, method: str, path: str, allowed: list[str]
) -> None:
    response = await api.request(method, path)
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "Method not allowed", "details": {"allowed": allowed}}
    assert response.headers["allow"] == ", ".join(allowed)


@pytest.mark.parametrize("path", ["/jobs", "/admin/", "/dashboard/", "/docs"])
async def test_a_host_not_allowed_is_a_json_400_on_every_path(
    api: httpx.AsyncClient, path: str
) -> None:
    response = await api.get(path, headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


@pytest.mark.parametrize("path", ["/health", "/ready"])
async def test_probes_answer_whatever_the_host(api: httpx.AsyncClient, path: str) -> None:
    # A container health check or a load balancer calls by IP address, which ALLOWED_HOSTS
    # (the public name) does not list.
    response = await api.get(path, headers={"Host": "10.0.0.7:8000"})
    assert response.status_code == 200, response.text


async def test_the_webhook_endpoints_answer_on_the_lean_path(api: httpx.AsyncClient) -> None:
    """Signing secrets and event subscriptions are API paths like /jobs: JSON in and out, no
    CSRF token, through the lean handler."""
    rotated = await api.post("/signing-secrets/rotate")
    assert rotated.status_code == 201, rotated.text
    assert rotated.json()["secret"].startswith("whsec_")
    subscription = {"url": "https://example.com/hook", "events": ["job.completed"]}
    created = await api.post("/event-subscriptions", json=subscription)
    assert created.status_code == 201, created.text
    listed = await api.get("/event-subscriptions")
    assert [s["id"] for s in listed.json()["subscriptions"]] == [created.json()["id"]]
    missing = await api.delete(f"/event-subscriptions/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/json")
