"""jobs/services.py called directly (no HTTP), on the real PostgreSQL and Redis: what each write
leaves in the database, what a worker is then handed from Redis, and what subscribers hear.

Every test commits (transactional database): the Redis side happens after commit, as in
production. The HTTP contract of the same operations is in tests/jobs/test_api.py."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.core.exceptions import ValidationError
from django.db import DataError, connection, transaction
from django.utils import timezone

from jobs.errors import Conflict, NotFound
from jobs.models import ApiKey, Job, JobStatus, Tenant
from jobs.queue import parse_claim, sync_queue
from jobs.services import (
    JobSpec,
    api_key_authenticate,
    api_key_create,
    api_key_revoke,
    hash_api_key,
    job_cancel,
    job_enqueue,
    job_enqueue_batch,
    job_retry,
    tenant_create,
    tenant_save,
)
from jobs.store import pending_jobs
from tests.support.jobs import make_job
from tests.support.redis_server import unreachable_redis
from tests.support.stack import wait_until
from tests.support.updates import UpdateListener, listen_to_tenant

pytestmark = pytest.mark.django_db(transaction=True)

SLEEP = JobSpec(type="sleep", payload={"delayMs": 0})


def handed_to_a_worker(count: int = 100) -> list[str]:
    """The ids a worker would be handed now, in order (taken, as a worker's claim takes them)."""
    return parse_claim(sync_queue().claim(worker="probe", count=count)).job_ids


def enqueue(tenant: Tenant, spec: JobSpec = SLEEP, **kwargs: Any) -> Job:
    job, created = job_enqueue(tenant=tenant, spec=spec, **kwargs)
    assert created
    return job


def heard(listener: UpdateListener, job: Job, statuses: list[str]) -> None:
    """Subscribers of the job's tenant heard exactly these statuses of it."""
    wait_until(
        lambda: listener.statuses(str(job.id)) == statuses,
        timeout=5,
        message=f"updates heard: {listener.updates}",
    )


def running_job(tenant: Tenant) -> Job:
    """A job a worker holds: RUNNING, with a lease."""
    now = timezone.now()
    return make_job(
        tenant,
        status=JobStatus.RUNNING,
        attempts=1,
        started_at=now,
        locked_by="worker-1",
        lease_token=uuid.uuid4(),
        lease_expires_at=now + timedelta(seconds=30),
    )


# --- enqueue ------------------------------------------------------------------------------------
def test_an_enqueued_job_is_committed_pending_handed_to_a_worker_and_announced(
    tenant: Tenant,
) -> None:
    with listen_to_tenant(tenant.id) as listener:
        job = enqueue(tenant, JobSpec(type="sleep", payload={"delayMs": 5}, priority=3))
        heard(listener, job, ["PENDING"])

    row = Job.objects.get(id=job.id)
    assert (row.tenant_id, row.type, row.payload, row.priority) == (
        tenant.id,
        "sleep",
        {"delayMs": 5},
        3,
    )
    assert (row.status, row.attempts, row.max_attempts) == (JobStatus.PENDING, 0, 3)
    assert row.run_at <= timezone.now()
    assert handed_to_a_worker() == [str(job.id)]


def test_a_job_reaches_redis_only_once_its_transaction_commits(tenant: Tenant) -> None:
    with transaction.atomic():
        job = enqueue(tenant)
        assert handed_to_a_worker() == []
    assert handed_to_a_worker() == [str(job.id)]


def test_a_job_in_a_rolled_back_transaction_never_reaches_redis(tenant: Tenant) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        enqueue(tenant)
        raise RuntimeError("the caller gave up")
    assert not Job.objects.exists()
    assert handed_to_a_worker() == []


def test_a_job_due_later_is_not_handed_out_before_its_time(tenant: Tenant) -> None:
    run_at = timezone.now() + timedelta(minutes=1)
    enqueue(tenant, JobSpec(type="sleep", payload={"delayMs": 0}, run_at=run_at))
    claimed = parse_claim(sync_queue().claim(worker="probe", count=10))
    assert claimed.job_ids == []
    assert claimed.next_due_ms == int(run_at.timestamp() * 1000)


def test_higher_priority_is_handed_out_first_then_oldest_first(tenant: Tenant) -> None:
    low = enqueue(tenant, JobSpec(type="sleep", payload={"delayMs": 0}, priority=-1))
    first = enqueue(tenant)
    second = enqueue(tenant)
    urgent = enqueue(tenant, JobSpec(type="sleep", payload={"delayMs": 0}, priority=5))
    assert handed_to_a_worker() == [str(j.id) for j in (urgent, first, second, low)]


def test_an_idempotent_replay_returns_the_original_job_and_creates_nothing(
    tenant: Tenant,
) -> None:
    original = enqueue(tenant, idempotency_key="order-1")
    again, created = job_enqueue(tenant=tenant, spec=SLEEP, idempotency_key="order-1")
    assert created is False
    assert again.id == original.id
    assert Job.objects.count() == 1
    assert handed_to_a_worker() == [str(original.id)]  # pushed once


@pytest.mark.parametrize(
    "other",
    [
        JobSpec(type="sleep", payload={"delayMs": 1}),
        JobSpec(type="sleep", payload={"delayMs": 0}, priority=2),
        JobSpec(type="sleep", payload={"delayMs": 0}, max_attempts=5),
        JobSpec(type="sleep", payload={"delayMs": 0}, delay_ms=5000),
    ],
    ids=["payload", "priority", "max_attempts", "delay"],
)
def test_the_same_idempotency_key_with_another_request_is_a_conflict(
    tenant: Tenant, other: JobSpec
) -> None:
    enqueue(tenant, idempotency_key="order-1")
    with pytest.raises(Conflict, match="Idempotency-Key was already used"):
        job_enqueue(tenant=tenant, spec=other, idempotency_key="order-1")
    assert Job.objects.count() == 1


def test_an_idempotency_key_belongs_to_its_tenant(tenant: Tenant, other_tenant: Tenant) -> None:
    mine = enqueue(tenant, idempotency_key="same")
    theirs = enqueue(other_tenant, idempotency_key="same")
    assert mine.id != theirs.id
    assert Job.objects.count() == 2


def test_an_idempotency_key_older_than_a_day_creates_a_new_job(tenant: Tenant) -> None:
    old = enqueue(tenant, idempotency_key="order-1")
    Job.objects.filter(id=old.id).update(created_at=timezone.now() - timedelta(hours=25))
    new = enqueue(tenant, JobSpec(type="sleep", payload={"delayMs": 9}), idempotency_key="order-1")
    assert new.id != old.id
    assert Job.objects.get(id=new.id).idempotency_key == "order-1"
    assert Job.objects.get(id=old.id).idempotency_key is None


def test_concurrent_requests_with_one_idempotency_key_create_one_job(tenant: Tenant) -> None:
    results: list[tuple[bool, uuid.UUID]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        try:
            barrier.wait(5)
            job, created = job_enqueue(tenant=tenant, spec=SLEEP, idempotency_key="race")
            results.append((created, job.id))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(created for created, _ in results) == [False] * 7 + [True]
    assert len({job_id for _, job_id in results}) == 1
    assert Job.objects.count() == 1


def test_a_batch_is_committed_and_handed_out_in_its_order(tenant: Tenant) -> None:
    specs = [JobSpec(type="sleep", payload={"delayMs": i}) for i in range(600)]
    with listen_to_tenant(tenant.id) as listener:
        jobs = job_enqueue_batch(tenant=tenant, specs=specs)
        wait_until(lambda: len(listener.updates) == 600, timeout=10, message="600 PENDING updates")
    assert [job.payload["delayMs"] for job in jobs] == list(range(600))
    assert Job.objects.filter(tenant=tenant, status=JobStatus.PENDING).count() == 600
    assert handed_to_a_worker(1000) == [str(job.id) for job in jobs]


def test_a_batch_that_fails_to_insert_leaves_no_job_anywhere(tenant: Tenant) -> None:
    # The 551st job is longer than the type column: the second INSERT (500 rows each) fails
    # after the first one succeeded, and the first must go too.
    specs = [SLEEP] * 550 + [JobSpec(type="x" * 65, payload={})] + [SLEEP] * 49
    with listen_to_tenant(tenant.id) as listener:
        with pytest.raises(DataError):
            job_enqueue_batch(tenant=tenant, specs=specs)
        assert listener.settle(quiet_s=0.3) == []
    assert not Job.objects.exists()
    assert handed_to_a_worker(1000) == []


def test_with_redis_down_jobs_are_committed_and_left_for_reconciliation(
    tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR), unreachable_redis():
        job = enqueue(tenant)
        batch = job_enqueue_batch(tenant=tenant, specs=[SLEEP] * 3)

    # Nothing was undone because Redis was away, and each failure names its jobs.
    created = [job, *batch]
    assert {row.id for row in Job.objects.filter(status=JobStatus.PENDING)} == {
        j.id for j in created
    }
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert all(str(j.id) in logged for j in created)
    # Redis never heard of them: the worker's reconciliation scan is what will push them.
    assert handed_to_a_worker() == []
    horizon = timezone.now() + timedelta(minutes=1)
    due = pending_jobs(after=None, horizon=horizon, limit=100)
    assert {j.id for j in created} <= {j.id for j in due}


# --- cancel -------------------------------------------------------------------------------------
def test_cancelling_a_pending_job_takes_it_out_of_the_queue(tenant: Tenant) -> None:
    kept = enqueue(tenant)
    job = enqueue(tenant)
    with listen_to_tenant(tenant.id) as listener:
        cancelled = job_cancel(tenant=tenant, job_id=job.id)
        heard(listener, job, ["CANCELLED"])

    assert cancelled.status == JobStatus.CANCELLED
    row = Job.objects.get(id=job.id)
    assert (row.status, row.error) == (JobStatus.CANCELLED, "cancelled")
    assert row.finished_at is not None
    assert handed_to_a_worker() == [str(kept.id)]


def test_cancelling_a_running_job_tells_its_worker_and_fences_it_out(
    tenant: Tenant, redis_client: redis.Redis
) -> None:
    job = running_job(tenant)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(sync_queue().cancel_channel)
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
        job_cancel(tenant=tenant, job_id=job.id)
        message = wait_until(
            lambda: pubsub.get_message(timeout=0.2), timeout=5, message="no cancel message"
        )
    finally:
        pubsub.close()

    assert message["type"] == "message" and message["data"] == str(job.id).encode()
    row = Job.objects.get(id=job.id)
    assert row.status == JobStatus.CANCELLED
    # The worker's final write is fenced by its lease token, which is gone.
    assert row.lease_token is None and row.lease_expires_at is None


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_finished_job_cannot_be_cancelled(tenant: Tenant, status: str) -> None:
    job = make_job(tenant, status=status)
    with pytest.raises(Conflict) as info:
        job_cancel(tenant=tenant, job_id=job.id)
    assert info.value.status == 409
    assert info.value.details == {"status": status}
    assert Job.objects.get(id=job.id).status == status


# --- retry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.CANCELLED])
def test_retrying_a_failed_or_cancelled_job_runs_it_again_from_scratch(
    tenant: Tenant, status: str
) -> None:
    earlier = timezone.now() - timedelta(hours=1)
    job = make_job(
        tenant,
        status=status,
        attempts=3,
        error="boom",
        result={"partial": True},
        run_at=earlier,
        started_at=earlier,
        locked_by="worker-1",
    )
    with listen_to_tenant(tenant.id) as listener:
        job_retry(tenant=tenant, job_id=job.id)
        heard(listener, job, ["PENDING"])

    row = Job.objects.get(id=job.id)
    assert (row.status, row.attempts, row.error, row.result) == (JobStatus.PENDING, 0, None, None)
    assert row.started_at is None and row.finished_at is None and row.locked_by is None
    assert row.run_at > earlier
    assert handed_to_a_worker() == [str(job.id)]


@pytest.mark.parametrize("status", [JobStatus.PENDING, JobStatus.RUNNING, JobStatus.COMPLETED])
def test_only_failed_or_cancelled_jobs_can_be_retried(tenant: Tenant, status: str) -> None:
    job = make_job(tenant, status=status)
    with pytest.raises(Conflict) as info:
        job_retry(tenant=tenant, job_id=job.id)
    assert info.value.details == {"status": status}
    assert Job.objects.get(id=job.id).status == status
    assert handed_to_a_worker() == []


# --- tenancy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("service", [job_cancel, job_retry], ids=["cancel", "retry"])
@pytest.mark.parametrize("status", [JobStatus.PENDING, JobStatus.FAILED])
def test_another_tenants_job_is_not_found_and_left_alone(
    tenant: Tenant, other_tenant: Tenant, service: Any, status: str
) -> None:
    theirs = make_job(other_tenant, status=status)
    with pytest.raises(NotFound) as info:
        service(tenant=tenant, job_id=theirs.id)
    assert info.value.status == 404
    assert Job.objects.get(id=theirs.id).status == status
    with pytest.raises(NotFound):
        service(tenant=tenant, job_id=uuid.uuid4())


# --- tenants ------------------------------------------------------------------------------------
def test_a_tenant_is_created_once() -> None:
    tenant = tenant_create(tenant_id="acme", name="Acme Inc")
    assert Tenant.objects.get(id="acme").name == "Acme Inc"
    assert tenant_create(tenant_id="plain").name == "plain"
    with pytest.raises(Conflict, match="'acme' already exists"):
        tenant_create(tenant_id=tenant.id)
    with pytest.raises(ValidationError):
        tenant_create(tenant_id="not a slug!")
    assert sorted(Tenant.objects.values_list("id", flat=True)) == ["acme", "plain"]


def test_a_tenants_concurrency_limit_caps_what_workers_are_handed(tenant: Tenant) -> None:
    jobs = [enqueue(tenant) for _ in range(3)]
    tenant.max_concurrency = 1
    tenant_save(tenant=tenant)
    assert handed_to_a_worker() == [str(jobs[0].id)]
    tenant.max_concurrency = None
    tenant_save(tenant=tenant)
    assert handed_to_a_worker() == [str(j.id) for j in jobs[1:]]


# --- API keys -----------------------------------------------------------------------------------
def test_a_created_key_authenticates_as_its_tenant_and_only_its_hash_is_stored(
    tenant: Tenant,
) -> None:
    key, raw = api_key_create(tenant=tenant, name="ci")
    assert raw.startswith(f"jq_{key.prefix}_")
    stored = ApiKey.objects.get(id=key.id)
    assert stored.key_hash == hash_api_key(raw) and raw not in stored.key_hash
    assert api_key_authenticate(raw_key=raw) == tenant
    _, second = api_key_create(tenant=tenant)
    assert second != raw and api_key_authenticate(raw_key=second) == tenant


def test_the_right_prefix_with_a_wrong_secret_is_refused(tenant: Tenant) -> None:
    _, raw = api_key_create(tenant=tenant)
    forged = raw[:-4] + ("AAAA" if not raw.endswith("AAAA") else "BBBB")
    assert api_key_authenticate(raw_key=forged) is None


@pytest.mark.parametrize(
    "raw",
    ["", "jq_", "nope", "Bearer x", "jq_\x00abc_x", "jq_0123456789ab_" + "a" * 200, "jq_%00"],
)
def test_strings_that_are_not_keys_are_refused_without_a_query(
    tenant: Tenant, raw: str, django_assert_num_queries: Any
) -> None:
    with django_assert_num_queries(0):
        assert api_key_authenticate(raw_key=raw) is None


@pytest.mark.parametrize("spelling", ["prefix", "jq_prefix", "full key"])
def test_a_revoked_key_is_refused_and_revoking_again_changes_nothing(
    tenant: Tenant, spelling: str
) -> None:
    key, raw = api_key_create(tenant=tenant)
    _, kept = api_key_create(tenant=tenant)
    given = {"prefix": key.prefix, "jq_prefix": f"jq_{key.prefix}", "full key": raw}[spelling]

    revoked = api_key_revoke(prefix=given)
    assert revoked.id == key.id and revoked.revoked_at is not None
    assert api_key_authenticate(raw_key=raw) is None
    assert api_key_authenticate(raw_key=kept) == tenant
    assert api_key_revoke(prefix=given).revoked_at == revoked.revoked_at


def test_revoking_an_unknown_prefix_is_not_found() -> None:
    with pytest.raises(NotFound, match="no API key with prefix '0123456789ab'"):
        api_key_revoke(prefix="0123456789ab")


def test_an_inactive_tenants_keys_are_refused_until_it_is_active_again(tenant: Tenant) -> None:
    _, raw = api_key_create(tenant=tenant)
    Tenant.objects.filter(id=tenant.id).update(is_active=False)
    assert api_key_authenticate(raw_key=raw) is None
    Tenant.objects.filter(id=tenant.id).update(is_active=True)
    assert api_key_authenticate(raw_key=raw) == tenant


def test_last_use_is_written_at_most_once_a_minute(tenant: Tenant) -> None:
    key, raw = api_key_create(tenant=tenant)
    assert key.last_used_at is None
    api_key_authenticate(raw_key=raw)
    first = ApiKey.objects.get(id=key.id).last_used_at
    assert first is not None
    api_key_authenticate(raw_key=raw)
    assert ApiKey.objects.get(id=key.id).last_used_at == first
    ApiKey.objects.filter(id=key.id).update(last_used_at=first - timedelta(minutes=2))
    api_key_authenticate(raw_key=raw)
    assert ApiKey.objects.get(id=key.id).last_used_at > first  # type: ignore[operator]
