"""Fair scheduling with real worker processes: a noisy neighbour does not delay a small
tenant, priorities order a tenant's jobs, and a tenant's concurrency limit holds across
workers while other tenants keep flowing."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from django.db import connection
from django.db.models import Count

from jobs.models import Job, JobStatus, Tenant
from jobs.services import api_key_create
from tests.e2e.conftest import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def make_tenant(tenant_id: str, **fields: Any) -> str:
    tenant = Tenant.objects.create(id=tenant_id, **fields)
    return api_key_create(tenant=tenant)[1]


def completed_after(tenant_id: str, start: Any, end: Any) -> int:
    return Job.objects.filter(
        tenant_id=tenant_id, status=JobStatus.COMPLETED, finished_at__gt=start, finished_at__lt=end
    ).count()


NOOP = {"type": "sleep", "payload": {"delayMs": 5}}


@pytest.mark.parametrize(
    ("noisy", "workers"),
    [(["big"], 1), (["big", "huge"], 4)],
    ids=["1-noisy-tenant-1-worker", "2-noisy-tenants-4-workers"],
)
def test_small_tenant_is_not_stuck_behind_a_backlog(
    stack: Stack, noisy: list[str], workers: int
) -> None:
    keys = {tenant_id: make_tenant(tenant_id) for tenant_id in noisy}
    small_key = make_tenant("small")
    stack.start_api()
    for key in keys.values():
        stack.create_batch(key, [NOOP] * 5000)
    for n in range(workers):
        stack.start_worker("--concurrency", "1", name=f"w{n}")
    wait_until(
        lambda: Job.objects.filter(tenant_id=noisy[0], status=JobStatus.COMPLETED).count() >= 20,
        timeout=30,
        message="backlog not draining",
    )
    response = httpx.post(
        f"{stack.base_url}/jobs", json=NOOP, headers={"Authorization": f"Bearer {small_key}"}
    )
    small = Job.objects.get(id=response.json()["id"])
    wait_until(
        lambda: Job.objects.filter(id=small.id, status=JobStatus.COMPLETED).exists(),
        timeout=30,
        message="the small tenant's job did not run",
    )
    small.refresh_from_db()
    # Jobs of the big tenant that finished while the small one waited: only those already
    # running, then at most one per worker turn.
    for tenant_id in noisy:
        overtaken = completed_after(tenant_id, small.created_at, small.finished_at)
        assert overtaken < 10, (tenant_id, overtaken)
    remaining = Job.objects.filter(tenant_id=noisy[0], status=JobStatus.PENDING).count()
    assert remaining > 4000, "the test must run while the backlog is still there"


def test_priority_orders_a_tenants_jobs_and_equal_priority_is_fifo(stack: Stack) -> None:
    key = make_tenant("acme")
    stack.start_api()
    jobs = [
        {**NOOP, "priority": priority, "payload": {"delayMs": 0}}
        for priority in (0, -5, 0, 5, 0, 10, -5)
    ]
    ids = stack.create_batch(key, jobs)
    stack.start_worker("--concurrency", "1")
    wait_until(
        lambda: Job.objects.filter(id__in=ids, status=JobStatus.COMPLETED).count() == len(ids),
        timeout=30,
        message="jobs did not complete",
    )
    started = [
        str(i)
        for i in Job.objects.filter(id__in=ids).order_by("started_at").values_list("id", flat=True)
    ]
    expected = [ids[5], ids[3], ids[0], ids[2], ids[4], ids[1], ids[6]]
    assert started == expected


def test_concurrency_limit_holds_across_three_workers(stack: Stack) -> None:
    limited_key = make_tenant("limited", max_concurrency=2)
    free_key = make_tenant("free")
    stack.start_api()
    limited = stack.create_batch(limited_key, [{"type": "sleep", "payload": {"delayMs": 300}}] * 16)
    free = stack.create_batch(free_key, [{"type": "sleep", "payload": {"delayMs": 50}}] * 60)
    samples: list[dict[str, int]] = []
    stop = threading.Event()

    def sample() -> None:
        try:
            while not stop.is_set():
                rows = (
                    Job.objects.filter(status=JobStatus.RUNNING)
                    .values_list("tenant_id")
                    .annotate(n=Count("id"))
                    .order_by()
                )
                samples.append(dict(rows))
                time.sleep(0.01)
        finally:
            connection.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for n in range(3):
            stack.start_worker("--concurrency", "4", name=f"w{n}")
        wait_until(
            lambda: Job.objects.filter(id__in=free, status=JobStatus.COMPLETED).count() == 60,
            timeout=60,
            message="the unlimited tenant's jobs did not flow",
        )
        free_done_while_limited_waiting = (
            Job.objects.filter(id__in=limited, status=JobStatus.PENDING).count() > 0
        )
        wait_until(
            lambda: Job.objects.filter(id__in=limited, status=JobStatus.COMPLETED).count() == 16,
            timeout=60,
            message="the limited tenant's jobs did not complete",
        )
    finally:
        stop.set()
        sampler.join()
    peak = max(s.get("limited", 0) for s in samples)
    assert peak == 2, f"limited tenant peaked at {peak} RUNNING (limit 2)"
    assert max(s.get("free", 0) for s in samples) > 2, "idle slots were left unused"
    assert free_done_while_limited_waiting
