"""The worker in-process against the real Redis and PostgreSQL: lifecycle, retries, timeouts,
fencing, recovery, reconciliation, cancellation and broadcasts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core import mail
from django.db import OperationalError, connection
from django.utils import timezone
from pydantic import BaseModel

from jobs import store
from jobs.handlers.registry import register, unregister
from jobs.lifecycle import Outcome, RetryPolicy
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import entry_for, parse_claim, sync_queue
from jobs.services import JobSpec, job_cancel, job_enqueue
from jobs.worker import Worker, WorkerOptions
from tests.support.updates import listen_to_tenant
from tests.support.webhook_server import WebhookServer, webhook_server

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fast_settings(settings: Any) -> None:
    settings.JOBS = {
        **settings.JOBS,
        "RETRY_BASE_MS": 20,
        "RETRY_MAX_MS": 100,
        "LEASE_S": 2,
        "WEBHOOK_ALLOWED_HOSTS": ["127.0.0.1"],
    }


@pytest.fixture
def server() -> Iterator[WebhookServer]:
    with webhook_server() as srv:
        yield srv


def closing(fn: Any) -> Any:
    """Run `fn` from async code in a thread, closing that thread's connection afterwards."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return sync_to_async(call, thread_sensitive=False)


def enqueue(tenant: Tenant, job_type: str, payload: dict, **kwargs: Any) -> Job:
    job, _ = job_enqueue(tenant=tenant, spec=JobSpec(type=job_type, payload=payload, **kwargs))
    return job


def make_worker(name: str | None = None, **kwargs: Any) -> Worker:
    options = WorkerOptions(
        name=name or f"test-{uuid.uuid4().hex[:6]}", concurrency=4, burst=True, grace_s=5
    )
    for key, value in kwargs.items():
        setattr(options, key, value)
    return Worker(options)


def run_burst(**kwargs: Any) -> Worker:
    worker = make_worker(**kwargs)
    assert asyncio.run(asyncio.wait_for(worker.run(), timeout=60)) == 0
    return worker


def test_jobs_of_every_type_complete_with_results(tenant: Tenant, server: WebhookServer) -> None:
    jobs = [
        enqueue(tenant, "sleep", {"delayMs": 20}),
        enqueue(tenant, "data_processing", {"values": [1, 2, 3, 4], "operations": ["sum", "mean"]}),
        enqueue(tenant, "email", {"to": "a@example.com", "subject": "hi", "body": "hello"}),
        enqueue(tenant, "webhook", {"url": server.url(), "body": {"n": 1}}),
    ]
    run_burst()
    by_type = {job.type: Job.objects.get(id=job.id) for job in jobs}
    for job in by_type.values():
        assert job.status == JobStatus.COMPLETED, (job.type, job.error)
        assert job.attempts == 1
        assert job.started_at is not None and job.finished_at is not None
        assert job.lease_token is None
    assert by_type["sleep"].result == {"sleptMs": 20}
    assert by_type["data_processing"].result == {"sum": 10, "mean": 2.5}
    assert by_type["email"].result == {"sent": 1}
    assert by_type["webhook"].result["statusCode"] == 200
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["a@example.com"]
    calls = server.calls("/hook")
    assert len(calls) == 1 and calls[0].json() == {"n": 1}


def test_failed_attempts_are_retried_with_backoff(tenant: Tenant, server: WebhookServer) -> None:
    server.statuses["/flaky"] = [500, 503, 200]
    job = enqueue(tenant, "webhook", {"url": server.url("/flaky")}, max_attempts=3)
    run_burst()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED and job.attempts == 3
    assert len(server.calls("/flaky")) == 3


def test_attempts_exhausted_fail_with_last_error(tenant: Tenant, server: WebhookServer) -> None:
    server.statuses["/down"] = [500]
    job = enqueue(tenant, "webhook", {"url": server.url("/down")}, max_attempts=2)
    run_burst()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and job.attempts == 2
    assert "500" in job.error
    assert len(server.calls("/down")) == 2


def test_permanent_error_is_not_retried(tenant: Tenant, server: WebhookServer) -> None:
    server.statuses["/gone"] = [404]
    job = enqueue(tenant, "webhook", {"url": server.url("/gone")}, max_attempts=5)
    run_burst()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and job.attempts == 1
    assert "404" in job.error
    assert len(server.calls("/gone")) == 1


def test_timeout_fails_the_attempt(tenant: Tenant) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 5000}, timeout_ms=200, max_attempts=1)
    started = time.monotonic()
    run_burst()
    job.refresh_from_db()
    assert time.monotonic() - started < 4
    assert job.status == JobStatus.FAILED
    assert "timed out" in job.error


def test_delayed_job_does_not_run_early(tenant: Tenant) -> None:
    run_at = timezone.now() + timedelta(milliseconds=700)
    job = enqueue(tenant, "sleep", {"delayMs": 0}, run_at=run_at)
    run_burst()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.started_at >= run_at


def test_duplicate_ids_in_redis_run_once(tenant: Tenant, server: WebhookServer) -> None:
    jobs = [enqueue(tenant, "webhook", {"url": server.url(f"/d{i}")}) for i in range(20)]
    # The same ids pushed again (e.g. by reconciliation) must not run twice.
    sync_queue().enqueue(entry_for(job) for job in jobs)
    other = [enqueue(tenant, "sleep", {"delayMs": 0}) for _ in range(3)]
    sync_queue().enqueue(entry_for(job) for job in jobs)

    async def two_workers() -> None:
        await asyncio.gather(make_worker().run(), make_worker().run())

    asyncio.run(asyncio.wait_for(two_workers(), timeout=60))
    for i, job in enumerate(jobs):
        job.refresh_from_db()
        assert job.status == JobStatus.COMPLETED and job.attempts == 1
        assert len(server.calls(f"/d{i}")) == 1
    assert all(Job.objects.get(id=j.id).status == JobStatus.COMPLETED for j in other)


def test_final_write_is_fenced_by_lease_token(tenant: Tenant) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 0})
    [claimed] = store.claim_jobs(job_ids=[str(job.id)], worker="slow")
    Job.objects.filter(id=job.id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    [recovered] = store.recover_expired_leases(policy=RetryPolicy.from_settings(), limit=10)
    assert recovered.status == JobStatus.PENDING
    # The slow worker wakes up and tries to complete with its old lease: nothing is written.
    late = RetryPolicy.from_settings().after_attempt(
        claimed, Outcome(result={"late": True}), timezone.now()
    )
    assert store.write_outcomes(planned=[(claimed, late)]) == [None]
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING and job.result is None and job.attempts == 1


def test_dead_workers_job_is_recovered_and_completed(tenant: Tenant, redis_client: Any) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 0})
    queue = sync_queue()
    queue.claim(worker="dead", count=1)
    store.claim_jobs(job_ids=[str(job.id)], worker="dead")
    redis_client.zadd(queue.workers_key, {"dead": int(time.time() * 1000) - 60_000})
    Job.objects.filter(id=job.id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    run_burst()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.attempts == 2
    assert redis_client.exists(queue.keys.processing("dead")) == 0


def test_recovery_fails_job_when_attempts_are_used_up(tenant: Tenant) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 0}, max_attempts=1)
    store.claim_jobs(job_ids=[str(job.id)], worker="dead")
    Job.objects.filter(id=job.id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    run_burst()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and "lease expired" in job.error


def test_reconciliation_pushes_jobs_redis_lost(
    tenant: Tenant, redis_client: Any, redis_prefix: str
) -> None:
    jobs = [enqueue(tenant, "sleep", {"delayMs": 0}) for _ in range(5)]
    delayed = enqueue(
        tenant, "sleep", {"delayMs": 0}, run_at=timezone.now() + timedelta(milliseconds=300)
    )
    keys = list(redis_client.scan_iter(match=f"{redis_prefix}:*"))
    redis_client.delete(*keys)  # this test's keys only: as if Redis had been flushed
    run_burst()
    for job in [*jobs, delayed]:
        job.refresh_from_db()
        assert job.status == JobStatus.COMPLETED


def test_every_state_change_is_broadcast_in_order(tenant: Tenant) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 10})
    mine = collect_updates(tenant, [job])
    assert [u["status"] for u in mine] == ["RUNNING", "COMPLETED"]
    assert mine[-1]["result"] == {"sleptMs": 10} and mine[-1]["tenantId"] == tenant.id


def test_cancel_running_job_stops_its_handler(tenant: Tenant) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 20_000})

    async def scenario() -> float:
        worker = make_worker(burst=False)
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 10
        while (await closing(lambda: Job.objects.get(id=job.id).status)()) != "RUNNING":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        cancelled_at = time.monotonic()
        await closing(job_cancel)(tenant=tenant, job_id=job.id)
        while worker.running:
            assert time.monotonic() - cancelled_at < 1.0, "handler not stopped within a second"
            await asyncio.sleep(0.01)
        stopped_after = time.monotonic() - cancelled_at
        worker.stop()
        assert await asyncio.wait_for(task, timeout=10) == 0
        return stopped_after

    assert asyncio.run(scenario()) < 1.0
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.result is None


def test_warm_stop_finishes_running_jobs(tenant: Tenant) -> None:
    jobs = [enqueue(tenant, "sleep", {"delayMs": 300}) for _ in range(3)]

    async def scenario() -> None:
        worker = make_worker(burst=False)
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 10
        while len(worker.running) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        worker.stop()
        assert await asyncio.wait_for(task, timeout=10) == 0

    asyncio.run(scenario())
    assert all(Job.objects.get(id=j.id).status == JobStatus.COMPLETED for j in jobs)


def test_cold_stop_puts_unfinished_jobs_back(tenant: Tenant, redis_client: Any) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 20_000})

    async def scenario() -> None:
        worker = make_worker(burst=False, grace_s=0.2)
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 10
        while not worker.running:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        worker.stop()
        assert await asyncio.wait_for(task, timeout=10) == 0

    asyncio.run(scenario())
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING and job.attempts == 0 and job.lease_token is None
    ready = sync_queue().keys.ready(tenant.id)
    assert redis_client.zscore(ready, str(job.id)) is not None


def test_max_jobs_recycles_the_worker(tenant: Tenant) -> None:
    jobs = [enqueue(tenant, "sleep", {"delayMs": 0}) for _ in range(6)]
    run_burst(concurrency=1, max_jobs=2, burst=False)
    statuses = [Job.objects.get(id=j.id).status for j in jobs]
    assert statuses.count(JobStatus.COMPLETED) == 2
    assert statuses.count(JobStatus.PENDING) == 4


def test_cold_stop_before_jobs_start_still_puts_them_back(tenant: Tenant) -> None:
    jobs = [enqueue(tenant, "sleep", {"delayMs": 20_000}) for _ in range(2)]

    async def scenario() -> None:
        worker = make_worker(burst=False)
        started, _ = await worker.claim_and_start(2)
        assert started == 2
        # Both signals arrive before the job tasks ever ran a step.
        worker.stop()
        worker.stop()
        await worker.drain()
        await worker.close()

    asyncio.run(scenario())
    for job in jobs:
        job.refresh_from_db()
        assert job.status == JobStatus.PENDING and job.attempts == 0


class BlockingPayload(BaseModel):
    seconds: float


def blocking_handler(payload: BlockingPayload, ctx: Any) -> dict:
    # Blocks its thread the way a CPU-bound or blocking-I/O handler would.
    time.sleep(payload.seconds)
    return {"blocked": payload.seconds}


@pytest.fixture
def blocking_type() -> Iterator[str]:
    register("test_blocking", schema=BlockingPayload, timeout_s=30)(blocking_handler)
    yield "test_blocking"
    unregister("test_blocking")


def test_blocking_handler_does_not_stall_heartbeats(tenant: Tenant, blocking_type: str) -> None:
    # Lease 2 s, handler blocking 3.5 s: only heartbeats renewing the lease keep the job from
    # being recovered by the worker's own recovery loop and run a second time.
    job = enqueue(tenant, blocking_type, {"seconds": 3.5})
    run_burst()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.attempts == 1 and job.error is None


def test_cancelled_pending_job_never_runs(tenant: Tenant, redis_client: Any) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 0})
    later = enqueue(tenant, "sleep", {"delayMs": 0}, run_at=timezone.now() + timedelta(hours=1))
    job_cancel(tenant=tenant, job_id=job.id)
    job_cancel(tenant=tenant, job_id=later.id)
    queue = sync_queue()
    assert redis_client.zcard(queue.keys.ready(tenant.id)) == 0
    assert redis_client.zcard(queue.keys.delayed()) == 0
    run_burst()
    for cancelled in (job, later):
        cancelled.refresh_from_db()
        assert cancelled.status == JobStatus.CANCELLED
        assert cancelled.started_at is None and cancelled.attempts == 0


def test_max_memory_recycles_the_worker(tenant: Tenant) -> None:
    jobs = [enqueue(tenant, "sleep", {"delayMs": 0}) for _ in range(4)]
    run_burst(concurrency=1, max_memory_mb=1, burst=False)
    statuses = [Job.objects.get(id=j.id).status for j in jobs]
    assert statuses.count(JobStatus.COMPLETED) == 1


def test_stale_ids_ahead_in_redis_do_not_end_a_burst_early(tenant: Tenant) -> None:
    # Two finished jobs whose ids are still in Redis (e.g. pushed again by reconciliation),
    # ahead of a runnable one: a claim that hands out only stale ids is not "queue empty".
    stale = [enqueue(tenant, "sleep", {"delayMs": 0}) for _ in range(2)]
    runnable = enqueue(tenant, "sleep", {"delayMs": 0})
    Job.objects.filter(id__in=[j.id for j in stale]).update(status=JobStatus.COMPLETED)
    run_burst(concurrency=2)
    runnable.refresh_from_db()
    assert runnable.status == JobStatus.COMPLETED


def collect_updates(tenant: Tenant, jobs: list[Job]) -> list[dict]:
    """Run a burst worker while listening to the tenant's channel; every update received."""
    with listen_to_tenant(tenant.id) as listener:
        asyncio.run(asyncio.wait_for(make_worker().run(), timeout=60))
        updates = listener.settle()
    ids = {str(job.id) for job in jobs}
    return [u for u in updates if u["jobId"] in ids]


def test_progress_is_stored_and_broadcast_in_order(tenant: Tenant) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 2500})
    updates = collect_updates(tenant, [job])
    statuses = [u["status"] for u in updates]
    assert statuses[0] == "RUNNING" and statuses[-1] == "COMPLETED"
    assert statuses.count("COMPLETED") == 1
    progress = [u["progress"] for u in updates[1:-1]]
    assert len(progress) >= 3, updates
    assert progress == sorted(progress) and all(0 < p <= 100 for p in progress)
    assert all(u["status"] == "RUNNING" for u in updates[1:-1])
    assert "of 2500 ms" in updates[-2]["progressMessage"]
    # The final frame keeps the last progress written, as the row and a replay do.
    job.refresh_from_db()
    final = updates[-1]
    assert (final["progress"], final["progressMessage"]) == (
        progress[-1],
        updates[-2]["progressMessage"],
    )
    assert (job.progress, job.progress_message) == (final["progress"], final["progressMessage"])


class ChattyPayload(BaseModel):
    reports: int


def chatty_handler(payload: ChattyPayload, ctx: Any) -> dict:
    for i in range(payload.reports):
        ctx.report_progress(100 * i / payload.reports, f"step {i}")
        time.sleep(0.001)
    return {"reports": payload.reports}


def test_chatty_progress_is_rate_limited(tenant: Tenant) -> None:
    register("test_chatty", schema=ChattyPayload, timeout_s=30)(chatty_handler)
    try:
        job = enqueue(tenant, "test_chatty", {"reports": 1000})
        started = time.monotonic()
        updates = collect_updates(tenant, [job])
        elapsed = time.monotonic() - started
    finally:
        unregister("test_chatty")
    progress_frames = [u for u in updates if u["status"] == "RUNNING" and u["progress"] is not None]
    # 1,000 reports over about a second: at most one write per 0.5 s gets through.
    assert 1 <= len(progress_frames) <= elapsed / 0.5 + 1, len(progress_frames)
    assert updates[-1]["status"] == "COMPLETED"
    job.refresh_from_db()
    assert job.progress is not None and job.progress_message.startswith("step ")
    assert updates[-1]["progressMessage"] == job.progress_message


def test_worker_log_lines_carry_job_context(tenant: Tenant, caplog: Any) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 0})
    with caplog.at_level("INFO", logger="jobs.worker"):
        worker = run_burst()
    completed = [r for r in caplog.records if r.getMessage().startswith("COMPLETED")]
    assert len(completed) == 1
    record = completed[0]
    assert record.job_id == str(job.id) and record.tenant == tenant.id
    assert record.job_type == "sleep" and record.attempt == 1 and record.worker == worker.name
    assert all(getattr(r, "worker", None) == worker.name for r in caplog.records)


def test_heartbeat_renews_only_the_jobs_being_run(tenant: Tenant) -> None:
    running, stuck = (enqueue(tenant, "sleep", {"delayMs": 0}) for _ in range(2))
    store.claim_jobs(job_ids=[str(running.id), str(stuck.id)], worker="w")
    past = timezone.now() - timedelta(seconds=1)
    Job.objects.filter(id__in=[running.id, stuck.id]).update(lease_expires_at=past)
    assert store.renew_leases(worker="w", job_ids=[str(running.id)]) == 1
    running.refresh_from_db()
    stuck.refresh_from_db()
    assert running.lease_expires_at > timezone.now()
    # A job whose outcome could not be written is not kept alive: its lease runs out.
    assert stuck.lease_expires_at == past


def test_worker_restarted_under_its_name_returns_its_old_claims(
    tenant: Tenant, redis_client: Any
) -> None:
    tenant.max_concurrency = 1
    tenant.save()
    job = enqueue(tenant, "sleep", {"delayMs": 0})
    queue = sync_queue()
    queue.set_tenant_limit(tenant.id, 1)
    # An earlier process named "same" claimed the job in Redis and died before the database.
    assert parse_claim(queue.claim(worker="same", count=1)).job_ids == [str(job.id)]
    assert int(redis_client.hget(queue.keys.running(), tenant.id)) == 1
    run_burst(name="same")
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert redis_client.hget(queue.keys.running(), tenant.id) is None


def test_database_error_during_a_claim_puts_the_ids_back(tenant: Tenant, redis_client: Any) -> None:
    job = enqueue(tenant, "sleep", {"delayMs": 0})

    async def scenario() -> None:
        worker = make_worker(burst=False)

        async def database_down(**kwargs: Any) -> list[Job]:
            raise OperationalError("server closed the connection unexpectedly")

        worker.jobs.claim = database_down  # type: ignore[method-assign]
        with pytest.raises(OperationalError):
            await worker.claim_and_start(5)
        await worker.close()

    asyncio.run(scenario())
    queue = sync_queue()
    assert redis_client.zscore(queue.keys.ready(tenant.id), str(job.id)) is not None
    assert redis_client.hget(queue.keys.running(), tenant.id) is None
    assert redis_client.keys(f"{queue.prefix}:*:processing:*") == []


def test_an_unreadable_row_is_failed_alone_and_the_batch_runs(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    """A row whose time is outside Python's range (year 0 in UTC, stored before the API bounded
    times, or by hand) is failed on its own; the other tenant's job claimed in the same batch
    completes, and maintenance keeps running."""
    good = enqueue(other_tenant, "sleep", {"delayMs": 0})
    bad = enqueue(tenant, "sleep", {"delayMs": 0})
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE jobs_job SET run_at = '0001-01-01T00:00:00+14:00' WHERE id = %s", [bad.id]
        )
    worker = make_worker()
    assert asyncio.run(asyncio.wait_for(worker.run(), timeout=60)) == 0
    assert Job.objects.get(id=good.id).status == JobStatus.COMPLETED
    status, error = Job.objects.filter(id=bad.id).values_list("status", "error").get()
    assert status == JobStatus.FAILED
    assert "unreadable row" in error
    assert not Job.objects.filter(status=JobStatus.RUNNING).exists()


def test_reconciliation_skips_an_unreadable_row(
    tenant: Tenant, redis_client: Any, redis_prefix: str
) -> None:
    lost = enqueue(tenant, "sleep", {"delayMs": 0})
    bad = enqueue(tenant, "sleep", {"delayMs": 0})
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE jobs_job SET run_at = '0001-01-01T00:00:00+14:00' WHERE id = %s", [bad.id]
        )
    keys = list(redis_client.scan_iter(match=f"{redis_prefix}:*"))
    redis_client.delete(*keys)  # as if Redis had been flushed
    # A burst run reconciles first: the lost job is found and run, the bad row is left alone.
    run_burst()
    assert Job.objects.get(id=lost.id).status == JobStatus.COMPLETED
    assert Job.objects.filter(id=bad.id).values_list("status", flat=True).get() == "PENDING"


def test_one_failing_maintenance_task_does_not_stop_the_others(tenant: Tenant) -> None:
    worker = make_worker()
    worker.upkeep.reconcile_interval_s = 0
    ran: list[str] = []
    reconciled_twice = asyncio.Event()

    async def broken_recovery() -> int:
        ran.append("recover")
        raise RuntimeError("a row it cannot read")

    async def reconcile() -> int:
        ran.append("reconcile")
        if ran.count("reconcile") >= 2:
            reconciled_twice.set()
        return 0

    worker.upkeep.recover = broken_recovery  # type: ignore[method-assign]
    worker.upkeep.reconcile = reconcile  # type: ignore[method-assign]

    async def scenario() -> None:
        loop = asyncio.create_task(worker.upkeep.run_forever())
        try:
            await reconciled_twice.wait()
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            await worker.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))
    assert ran.count("recover") >= 2


def test_a_side_task_that_dies_stops_the_worker_and_puts_its_jobs_back(
    tenant: Tenant, caplog: Any
) -> None:
    """Without a supervisor, a dead outcome writer left the worker claiming jobs whose outcomes
    could never be written (each job task waiting forever)."""
    job = enqueue(tenant, "sleep", {"delayMs": 20_000})

    async def scenario() -> int:
        worker = make_worker(burst=False)

        async def writer_that_breaks() -> None:
            # Once the job is running, as if a write had crashed the writer.
            await asyncio.sleep(0.5)
            assert worker.running
            raise RuntimeError("writer broke")

        worker.outcomes.run_forever = writer_that_breaks  # type: ignore[method-assign]
        return await worker.run()

    with caplog.at_level("ERROR", logger="jobs.worker"):
        code = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert code == 1
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING and job.attempts == 0
    assert any(
        r.getMessage().startswith("outcome writer stopped (RuntimeError: writer broke)")
        for r in caplog.records
    )
