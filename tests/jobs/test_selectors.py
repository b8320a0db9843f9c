"""jobs/selectors.py called directly, on the real PostgreSQL (and Redis for queue depths): every
read is scoped by tenant, orders are stable, bounds hold."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.errors import NotFound
from jobs.models import Job, JobStatus, Tenant
from jobs.selectors import (
    QueueDepth,
    job_counts_by_status,
    job_get,
    job_list,
    job_updated_since,
    tenant_queue_depths,
)
from jobs.services import JobSpec, job_enqueue_batch
from tests.support.jobs import make_job
from tests.support.redis_server import unreachable_redis

pytestmark = pytest.mark.django_db


def ids(jobs: list[Job]) -> list[uuid.UUID]:
    return [job.id for job in jobs]


# --- job_get ------------------------------------------------------------------------------------
def test_job_get_finds_the_tenants_own_job(tenant: Tenant) -> None:
    job = make_job(tenant, payload={"delayMs": 7})
    found = job_get(tenant=tenant, job_id=job.id)
    assert (found.id, found.payload) == (job.id, {"delayMs": 7})


def test_another_tenants_job_is_as_missing_as_an_unknown_one(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    theirs = make_job(other_tenant)
    with pytest.raises(NotFound) as foreign:
        job_get(tenant=tenant, job_id=theirs.id)
    with pytest.raises(NotFound) as unknown:
        job_get(tenant=tenant, job_id=uuid.uuid4())
    assert (foreign.value.status, foreign.value.message) == (404, "Job not found")
    assert (unknown.value.status, unknown.value.message) == (404, "Job not found")


# --- job_list -----------------------------------------------------------------------------------
def test_job_list_is_the_tenants_jobs_newest_first(tenant: Tenant, other_tenant: Tenant) -> None:
    now = timezone.now()
    oldest = make_job(tenant, created_at=now - timedelta(minutes=3))
    newest = make_job(tenant, created_at=now - timedelta(minutes=1))
    middle = make_job(tenant, created_at=now - timedelta(minutes=2))
    make_job(other_tenant, created_at=now)
    assert ids(list(job_list(tenant=tenant))) == ids([newest, middle, oldest])


def test_jobs_created_at_the_same_instant_keep_one_order_by_id(tenant: Tenant) -> None:
    at = timezone.now()
    jobs = [make_job(tenant, created_at=at) for _ in range(6)]
    expected = sorted(ids(jobs), reverse=True)
    assert ids(list(job_list(tenant=tenant))) == expected
    assert ids(list(job_list(tenant=tenant))) == expected  # the same order every time


def test_pages_of_job_list_add_up_to_the_whole_list(tenant: Tenant) -> None:
    at = timezone.now()
    for i in range(8):
        # Pairs share a timestamp: pages must not split a tie differently each time.
        make_job(tenant, created_at=at - timedelta(seconds=i // 2))
    listing = job_list(tenant=tenant)
    whole = ids(list(listing))
    assert listing.count() == 8
    pages = [ids(list(job_list(tenant=tenant)[offset : offset + 3])) for offset in (0, 3, 6)]
    assert [len(page) for page in pages] == [3, 3, 2]
    assert [job_id for page in pages for job_id in page] == whole


def test_job_list_filters_by_status_and_type(tenant: Tenant, other_tenant: Tenant) -> None:
    failed_sleep = make_job(tenant, status=JobStatus.FAILED)
    pending_sleep = make_job(tenant)
    failed_email = make_job(tenant, status=JobStatus.FAILED, type="email")
    make_job(other_tenant, status=JobStatus.FAILED)

    failed = job_list(tenant=tenant, status=JobStatus.FAILED)
    assert set(ids(list(failed))) == {failed_sleep.id, failed_email.id}
    sleeps = job_list(tenant=tenant, job_type="sleep")
    assert set(ids(list(sleeps))) == {failed_sleep.id, pending_sleep.id}
    both = job_list(tenant=tenant, status=JobStatus.FAILED, job_type="email")
    assert ids(list(both)) == [failed_email.id]
    assert list(job_list(tenant=tenant, status=JobStatus.RUNNING)) == []
    assert job_list(tenant=tenant, status=None, job_type=None).count() == 3


# --- job_updated_since --------------------------------------------------------------------------
def test_updated_since_is_the_changes_after_since_oldest_first(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    since = timezone.now() - timedelta(hours=1)
    make_job(tenant, updated_at=since - timedelta(seconds=1))
    make_job(tenant, updated_at=since)  # at `since` exactly: already seen
    late = make_job(tenant, updated_at=since + timedelta(minutes=30))
    early = make_job(tenant, updated_at=since + timedelta(minutes=10))
    make_job(other_tenant, updated_at=since + timedelta(minutes=20))

    changed = job_updated_since(tenant_id=tenant.id, since=since, limit=100)
    assert ids(changed) == ids([early, late])


def test_updated_since_returns_at_most_limit_and_breaks_ties_by_id(tenant: Tenant) -> None:
    since = timezone.now() - timedelta(hours=1)
    at = since + timedelta(minutes=5)
    tied = [make_job(tenant, updated_at=at) for _ in range(4)]
    later = make_job(tenant, updated_at=at + timedelta(minutes=1))
    in_order = [*sorted(ids(tied)), later.id]

    assert ids(job_updated_since(tenant_id=tenant.id, since=since, limit=100)) == in_order
    assert ids(job_updated_since(tenant_id=tenant.id, since=since, limit=3)) == in_order[:3]
    assert job_updated_since(tenant_id=tenant.id, since=later.updated_at, limit=100) == []


# --- counts and queue depths --------------------------------------------------------------------
def test_counts_by_status_name_every_status_of_the_tenant_only(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    make_job(tenant)
    make_job(tenant)
    make_job(tenant, status=JobStatus.FAILED)
    make_job(other_tenant, status=JobStatus.COMPLETED)
    assert job_counts_by_status(tenant=tenant) == {
        "WAITING": 0,
        "PENDING": 2,
        "RUNNING": 0,
        "COMPLETED": 0,
        "FAILED": 1,
        "CANCELLED": 0,
    }


@pytest.mark.django_db(transaction=True)
def test_queue_depths_count_ready_in_redis_and_delayed_and_running_in_the_database(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    sleep = JobSpec(type="sleep", payload={"delayMs": 0})
    job_enqueue_batch(tenant=tenant, specs=[sleep] * 3)
    job_enqueue_batch(tenant=other_tenant, specs=[sleep])
    later = timezone.now() + timedelta(hours=1)
    job_enqueue_batch(tenant=tenant, specs=[JobSpec(type="sleep", payload={}, run_at=later)])
    make_job(tenant, status=JobStatus.RUNNING, locked_by="worker-1")

    depths = tenant_queue_depths(tenant_ids=[tenant.id, other_tenant.id, "nobody"])
    assert depths == {
        tenant.id: QueueDepth(ready=3, delayed=1, running=1),
        other_tenant.id: QueueDepth(ready=1, delayed=0, running=0),
        "nobody": QueueDepth(ready=0, delayed=0, running=0),
    }
    assert tenant_queue_depths(tenant_ids=[]) == {}

    with unreachable_redis():
        # What the database knows still counts; what only Redis knows is unknown, not 0.
        down = tenant_queue_depths(tenant_ids=[tenant.id])
    assert down == {tenant.id: QueueDepth(ready=None, delayed=1, running=1)}
