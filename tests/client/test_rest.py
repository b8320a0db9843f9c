"""The SDK's REST side against the real API: create and its retries (never a second job),
batches, typed errors, listing every page, cancel and retry."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
from jobqueue_client import (
    STATUSES,
    TERMINAL_STATUSES,
    AsyncClient,
    AuthenticationError,
    Client,
    Conflict,
    Job,
    NotFound,
    RateLimited,
    ValidationError,
)

from jobs.models import Tenant
from jobs.services import api_key_create
from tests.client.conftest import LATER_MS, Service
from tests.client.flaky_proxy import FlakyProxy

pytestmark = pytest.mark.e2e

SLEEP = {"delayMs": 10}
NUMBERS = {"values": [1], "operations": ["sum"]}


def test_create_sends_camel_case_options_and_returns_a_typed_job(service: Service) -> None:
    with service.client() as client:
        job = client.create(
            "sleep", {"delayMs": 10}, priority=5, max_attempts=2, delay_ms=LATER_MS, timeout_ms=5000
        )
        assert isinstance(job, Job)
        assert (job.type, job.status, job.tenant_id) == ("sleep", "PENDING", service.tenant.id)
        assert (job.priority, job.max_attempts, job.timeout_ms) == (5, 2, 5000)
        assert job.payload == {"delayMs": 10}
        assert job.run_at is not None and job.created_at is not None
        assert (job.run_at - job.created_at).total_seconds() == pytest.approx(
            LATER_MS / 1000, abs=1
        )
        assert job.cursor is not None and job.cursor.isdigit()
        assert client.get(job.id) == job

        # The caller's own key: the same request again is the same job.
        first = client.create("sleep", {"delayMs": 1}, idempotency_key="order-42")
        again = client.create("sleep", {"delayMs": 1}, idempotency_key="order-42")
        assert again.id == first.id
        with pytest.raises(Conflict):
            client.create("sleep", {"delayMs": 2}, idempotency_key="order-42")
    assert service.job_count() == 2


def test_create_retries_refused_unavailable_and_lost_answers_without_a_second_job(
    service: Service,
) -> None:
    # The sync client meets a proxy that is not listening yet, then answers 503, then forwards
    # the create and loses its answer; the create still makes exactly one job.
    proxy = FlakyProxy(service.port, unavailable=1, lose_answers=1)
    threading.Timer(0.3, proxy.listen).start()
    with proxy, Client(proxy.url, service.key, max_retries=8) as client:
        started = time.monotonic()
        job = client.create("sleep", SLEEP)
        assert time.monotonic() - started >= 0.3
    assert proxy.connections == 3  # 503, lost answer, the retry that got the job
    assert service.job_count() == 1

    async def async_create() -> Job:
        with FlakyProxy(service.port, lose_answers=1).listen() as lossy:
            async with AsyncClient(lossy.url, service.key) as client:
                created = await client.create("sleep", SLEEP)
            assert lossy.connections == 2
        return created

    second = asyncio.run(async_create())
    assert second.id != job.id
    assert service.job_count() == 2


def test_a_batch_whose_answer_was_lost_is_retried_and_created_once(service: Service) -> None:
    jobs = [{"type": "sleep", "payload": SLEEP, "priority": 1} for _ in range(3)]
    with FlakyProxy(service.port, lose_answers=1).listen() as proxy:
        with Client(proxy.url, service.key) as client:
            ids = client.create_batch(jobs)
        assert proxy.connections == 2  # the lost answer, then the repeat with the same key
    assert len(ids) == 3
    assert service.job_count() == 3  # created once: the repeat was answered with the same ids

    with service.client() as client:
        ids = client.create_batch([*jobs, {"type": "sleep", "payload": SLEEP, "max_attempts": 1}])
        assert len(ids) == 4
        assert client.get(ids[3]).max_attempts == 1
        assert client.get(ids[0]).priority == 1
    assert service.job_count() == 7


def test_a_graph_in_one_batch_and_a_job_after_it(service: Service) -> None:
    later = {"type": "sleep", "payload": SLEEP, "delay_ms": LATER_MS}
    with service.client() as client:
        first, second = client.create_batch([later, {**later, "depends_on": ["$0"]}])
        after = client.create("sleep", SLEEP, depends_on=[first, second])
        waiting = client.get(second)
        listed = list(client.list(status="WAITING"))

    assert after.status == "WAITING" and after.depends_on == (first, second)
    assert waiting.status == "WAITING" and waiting.depends_on == (first,)
    assert {job.id for job in listed} == {second, after.id}
    assert "WAITING" in STATUSES and "WAITING" not in TERMINAL_STATUSES


def test_api_errors_are_typed(service: Service) -> None:
    with Client(service.url, "jq_000000000000_" + "x" * 43) as stranger:
        with pytest.raises(AuthenticationError) as unauthenticated:
            stranger.get(uuid.uuid4())
        assert unauthenticated.value.status == 401

    with service.client() as client:
        with pytest.raises(NotFound) as missing:
            client.get(uuid.uuid4())
        assert missing.value.status == 404 and missing.value.message == "Job not found"

        with pytest.raises(ValidationError) as invalid:
            client.create("sleep", {"delayMs": "soon"})
        assert invalid.value.status == 400
        assert [d["field"] for d in invalid.value.details] == ["payload.delayMs"]

        job = client.create("sleep", SLEEP, delay_ms=LATER_MS)
        client.cancel(job.id)
        with pytest.raises(Conflict) as conflict:
            client.cancel(job.id)
        assert conflict.value.details == {"status": "CANCELLED"}


def test_rate_limited_carries_retry_after_and_create_waits_it_out(service: Service) -> None:
    slow = Tenant.objects.create(id=f"{service.tenant.id}-slow", rate_limit=1)
    _, key = api_key_create(tenant=slow)
    with Client(service.url, key, max_retries=0) as impatient:
        impatient.create("sleep", SLEEP)
        with pytest.raises(RateLimited) as limited:
            impatient.create("sleep", SLEEP)
    assert limited.value.status == 429
    assert limited.value.retry_after == 1
    assert limited.value.details["ratePerSecond"] == 1

    with Client(service.url, key) as patient:
        started = time.monotonic()
        patient.create("sleep", SLEEP)
        patient.create("sleep", SLEEP)  # refused at first, created after the Retry-After
        assert time.monotonic() - started >= 0.5
    assert slow.jobs.count() == 3


def test_list_walks_every_page_newest_first_with_filters(service: Service) -> None:
    with service.client() as client:
        sleeps = client.create_batch(
            [{"type": "sleep", "payload": SLEEP, "delay_ms": LATER_MS}] * 25
        )
        numbers = client.create_batch(
            [{"type": "data_processing", "payload": NUMBERS, "delayMs": LATER_MS}] * 3
        )
        newest_first = [*reversed(numbers), *reversed(sleeps)]

        assert [job.id for job in client.list(page_size=10)] == newest_first
        assert [job.id for job in client.list(type="data_processing")] == newest_first[:3]
        assert [job.id for job in client.list(status="PENDING", page_size=7)] == newest_first
        assert list(client.list(status="FAILED")) == []

    async def async_ids() -> list[str]:
        async with AsyncClient(service.url, service.key) as client:
            return [job.id async for job in client.list(type="sleep", page_size=9)]

    assert asyncio.run(async_ids()) == newest_first[3:]


def test_cancel_and_retry(service: Service) -> None:
    async def scenario() -> None:
        async with AsyncClient(service.url, service.key) as client:
            job = await client.create("sleep", SLEEP, delay_ms=LATER_MS)
            cancelled = await client.cancel(job.id)
            assert (cancelled.status, cancelled.error) == ("CANCELLED", "cancelled")
            assert cancelled.finished_at is not None
            retried = await client.retry(job.id)
            assert (retried.status, retried.attempts, retried.error) == ("PENDING", 0, None)
            with pytest.raises(Conflict):
                await client.retry(job.id)
            with pytest.raises(NotFound):
                await client.cancel(uuid.uuid4())

    asyncio.run(scenario())
