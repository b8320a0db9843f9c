"""jobs/lifecycle.py: the retry policy (pure), and the publish step every transition ends in,
on the real Redis (what is indexed, what is broadcast, what is counted)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.utils import timezone

from jobs import lifecycle
from jobs.lifecycle import Outcome, RetryPolicy, put_back_fields
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import Keys, Queue
from tests.support.updates import listen_to_tenant

POLICY = RetryPolicy(base_ms=1000, max_ms=8000)


def job(**fields: Any) -> Job:
    now = timezone.now()
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "tenant_id": "tenant-1",
        "type": "sleep",
        "payload": {"delayMs": 0},
        "status": JobStatus.RUNNING,
        "attempts": 1,
        "max_attempts": 3,
        "run_at": now,
        "created_at": now,
        "updated_at": now,
        "locked_by": "w1",
    }
    values.update(fields)
    return Job(**values)


# --- the retry policy -----------------------------------------------------------------------
@pytest.mark.parametrize(("attempt", "ceiling_ms"), [(1, 1000), (2, 2000), (3, 4000), (9, 8000)])
def test_backoff_doubles_up_to_its_cap_with_full_jitter(attempt: int, ceiling_ms: int) -> None:
    delays = [POLICY.backoff(attempt) for _ in range(200)]
    assert all(timedelta(0) <= d <= timedelta(milliseconds=ceiling_ms) for d in delays)
    assert max(delays) > timedelta(milliseconds=ceiling_ms / 2)  # jittered over the range


def test_an_attempt_that_succeeds_completes() -> None:
    now = timezone.now()
    fields = POLICY.after_attempt(job(), Outcome(result={"ok": 1}), now)
    assert fields["status"] == JobStatus.COMPLETED and fields["result"] == {"ok": 1}
    assert fields["finished_at"] == now and fields["lease_token"] is None


def test_a_failed_attempt_with_attempts_left_runs_again_later() -> None:
    now = timezone.now()
    fields = POLICY.after_attempt(job(attempts=2), Outcome(error="boom"), now)
    assert fields["status"] == JobStatus.PENDING and fields["error"] == "boom"
    assert now <= fields["run_at"] <= now + timedelta(seconds=2)
    assert fields["finished_at"] is None


@pytest.mark.parametrize(
    ("attempts", "permanent"), [(3, False), (1, True)], ids=["attempts spent", "permanent"]
)
def test_a_failed_attempt_fails_the_job_when_spent_or_permanent(
    attempts: int, permanent: bool
) -> None:
    now = timezone.now()
    fields = POLICY.after_attempt(
        job(attempts=attempts), Outcome(error="boom", permanent=permanent), now
    )
    assert fields["status"] == JobStatus.FAILED and fields["finished_at"] == now


@pytest.mark.parametrize(("attempts", "status"), [(1, "PENDING"), (3, "FAILED")])
def test_a_lost_lease_spends_the_attempt_by_the_same_rule(attempts: int, status: str) -> None:
    fields = POLICY.after_lost_lease(job(attempts=attempts), timezone.now())
    assert fields["status"] == status
    assert fields["error"] == "worker w1 stopped heartbeating (lease expired)"


def test_a_job_put_back_does_not_spend_its_attempt() -> None:
    fields = put_back_fields(job(attempts=2), timezone.now())
    assert fields["status"] == JobStatus.PENDING and fields["attempts"] == 1


# --- publish ----------------------------------------------------------------------------------
@pytest.mark.django_db
def test_publish_indexes_runnable_jobs_broadcasts_all_and_counts_the_event(
    tenant: Tenant, redis_client: redis.Redis, redis_prefix: str
) -> None:
    pending, cancelled = job(status=JobStatus.PENDING), job(status=JobStatus.CANCELLED)
    with listen_to_tenant(tenant.id) as listener:
        lifecycle.publish([pending, cancelled], event="created")
        updates = listener.settle()
    assert [(u["jobId"], u["status"]) for u in updates] == [
        (str(pending.id), "PENDING"),
        (str(cancelled.id), "CANCELLED"),
    ]
    ready = redis_client.zrange(Keys(redis_prefix).ready(tenant.id), 0, -1)
    assert ready == [str(pending.id).encode()]
    counted = redis_client.hget(f"{redis_prefix}:metrics:events", f"created|sleep|{tenant.id}")
    assert int(counted) == 2


@pytest.mark.django_db
def test_publish_never_raises_when_redis_is_away(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    nowhere = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    monkeypatch.setattr(lifecycle, "sync_queue", lambda: Queue(nowhere))
    lifecycle.publish([job(status=JobStatus.PENDING)], event="created")
    assert any("reconciliation will requeue" in r.getMessage() for r in caplog.records)
