"""Fair scheduling with real worker processes: a noisy neighbour does not delay a small
tenant, priorities order a tenant's jobs, a tenant's concurrency limit holds across workers
while other tenants keep flowing, and a tenant's long jobs cannot hold every slot (fair
share)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from django.db import connection
from django.db.models import Count

from jobs.models import Job, JobStatus, Tenant
from jobs.services import JobSpec, api_key_create, job_enqueue_batch
from tests.support.stack import Stack, wait_until

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


LONG_SLEEP_MS = 3000


def enqueue_sleeps(tenant_id: str, delay_ms: int, n: int) -> list[str]:
    """Jobs created by the service the API calls (the API itself is not what these tests are
    about, and starting it would double their time)."""
    tenant = Tenant.objects.get_or_create(id=tenant_id)[0]
    spec = JobSpec(type="sleep", payload={"delayMs": delay_ms})
    return [str(job.id) for job in job_enqueue_batch(tenant=tenant, specs=[spec] * n)]


def running_count(tenant_id: str) -> int:
    return Job.objects.filter(tenant_id=tenant_id, status=JobStatus.RUNNING).count()


def test_long_jobs_do_not_hold_every_slot_while_another_tenant_waits(stack: Stack) -> None:
    """The reported attack, scaled down: with round robin alone, each slot a short job frees
    goes to the hog in turn until its 3 s sleeps hold all four, and the other tenant's jobs
    wait for them. With a fair share (2 of the 4 slots) they never do; alone, the hog then
    takes every slot."""
    enqueue_sleeps("hog", LONG_SLEEP_MS, 8)
    small_ids = enqueue_sleeps("small", 0, 10)
    stack.start_worker("--concurrency", "4")
    wait_until(
        lambda: Job.objects.filter(id__in=small_ids, status=JobStatus.COMPLETED).count() == 10,
        timeout=20,
        message="the small tenant's jobs did not run",
    )
    assert not Job.objects.filter(tenant_id="hog", status=JobStatus.COMPLETED).exists(), (
        "the small tenant waited for the hog's long jobs to end"
    )
    hog_starts = Job.objects.filter(tenant_id="hog").exclude(started_at=None)
    first_hog_start = min(hog_starts.values_list("started_at", flat=True))
    last_small_end = max(Job.objects.filter(id__in=small_ids).values_list("finished_at", flat=True))
    assert (last_small_end - first_hog_start).total_seconds() < LONG_SLEEP_MS / 2000
    # Work-conserving: with nobody else waiting, the hog fills the slots it was kept from.
    wait_until(
        lambda: running_count("hog") == 4, timeout=LONG_SLEEP_MS / 2000, message="slots left idle"
    )


def test_reserve_starts_a_late_tenants_job_while_long_jobs_fill_the_cluster(
    stack: Stack,
) -> None:
    """With JOBS_TENANT_FAIR_SHARE_RESERVE=1 a tenant alone leaves one slot free, so another
    tenant's job that arrives after the hog's long jobs started runs at once."""
    stack.env["JOBS_TENANT_FAIR_SHARE_RESERVE"] = "1"
    stack.start_worker("--concurrency", "4")
    enqueue_sleeps("hog", LONG_SLEEP_MS, 8)
    wait_until(lambda: running_count("hog") >= 3, timeout=20, message="the hog's jobs did not run")
    [late] = enqueue_sleeps("small", 0, 1)
    wait_until(
        lambda: Job.objects.filter(id=late, status=JobStatus.COMPLETED).exists(),
        timeout=LONG_SLEEP_MS / 2000,
        message="the late tenant's job waited for a slot of the hog",
    )
    assert running_count("hog") == 3
