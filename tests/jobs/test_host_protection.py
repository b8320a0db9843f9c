"""Destination protection for webhook requests (jobs/destinations.py) on the real Redis,
PostgreSQL and local HTTP receivers: the per-host cap and circuit breaker scripts
(host_acquire.lua, host_release.lua), the held outcome the lifecycle writes, and the worker
end to end with one receiver down and one up."""

from __future__ import annotations

import asyncio
import copy
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.utils import timezone

from jobs import pg, store
from jobs.handlers import HeldBack
from jobs.lifecycle import Outcome, RetryPolicy, WorkerTransitions
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import Queue, close_async_queue, parse_host_pass, sync_queue
from jobs.services import JobSpec, job_enqueue
from jobs.worker import Worker, WorkerOptions
from tests.support.handlers import allow_webhook_hosts, run_async
from tests.support.stack import free_port
from tests.support.updates import listen_to_tenant
from tests.support.webhook_server import Reply, WebhookServer, webhook_server

HOST = "example.com:443"


@pytest.fixture
def queue(redis_client: redis.Redis, redis_prefix: str) -> Queue:
    return Queue(redis_client, prefix=redis_prefix)


def acquire(
    queue: Queue,
    holder: str,
    *,
    host: str = HOST,
    limit: int = 8,
    lease_ms: int = 10_000,
    cooldown_ms: int = 60_000,
) -> Any:
    return parse_host_pass(
        queue.acquire_host(
            host=host, holder=holder, limit=limit, lease_ms=lease_ms, cooldown_ms=cooldown_ms
        )
    )


def release(
    queue: Queue,
    holder: str,
    verdict: str,
    *,
    host: str = HOST,
    failures: int = 3,
    cooldown_ms: int = 60_000,
) -> str:
    state = queue.release_host(
        host=host,
        holder=holder,
        verdict=verdict,
        failures_to_open=failures,
        cooldown_ms=cooldown_ms,
        keep_ms=3_600_000,
    )
    return state.decode() if isinstance(state, bytes) else state


def fail_times(queue: Queue, n: int, *, host: str = HOST, **kwargs: Any) -> str:
    state = "closed"
    for _ in range(n):
        holder = uuid.uuid4().hex
        assert acquire(queue, holder, host=host).granted
        state = release(queue, holder, "failed", host=host, **kwargs)
    return state


# --- the scripts ------------------------------------------------------------------------------
def test_the_cap_grants_up_to_its_limit_and_a_release_frees_a_slot(queue: Queue) -> None:
    assert acquire(queue, "a", limit=2).granted
    assert acquire(queue, "b", limit=2).granted
    refused = acquire(queue, "c", limit=2)
    assert not refused.granted and refused.reason == "busy"
    release(queue, "a", "ok")
    assert acquire(queue, "c", limit=2).granted


def test_expired_holders_are_dropped_on_acquire(queue: Queue, redis_client: redis.Redis) -> None:
    # Two holders whose worker died mid-request: their leases run out, the slots come back.
    assert acquire(queue, "dead-1", limit=2, lease_ms=50).granted
    assert acquire(queue, "dead-2", limit=2, lease_ms=50).granted
    assert not acquire(queue, "c", limit=2).granted
    time.sleep(0.1)
    assert acquire(queue, "c", limit=2).granted
    holders = redis_client.zrange(queue.keys.host_slots(HOST), 0, -1)
    assert holders == [b"c"]
    assert redis_client.pttl(queue.keys.host_slots(HOST)) > 0  # the set itself expires too


def test_the_breaker_opens_after_consecutive_failures_only(queue: Queue) -> None:
    assert fail_times(queue, 2) == "closed"
    assert release(queue, "x", "ok") == "closed"  # a success resets the count
    assert fail_times(queue, 2) == "closed"
    assert queue.open_circuits() == []
    assert fail_times(queue, 1) == "open"
    started_ms = time.time() * 1000
    refused = acquire(queue, "next")
    assert not refused.granted and refused.reason == "open"
    assert started_ms + 55_000 < refused.retry_at_ms <= started_ms + 61_000
    [circuit] = queue.open_circuits()
    assert (circuit.host, circuit.state, circuit.failures) == (HOST, "open", 3)
    assert abs(circuit.until.timestamp() * 1000 - refused.retry_at_ms) < 2


def test_after_the_cool_down_one_probe_goes_and_its_success_closes(queue: Queue) -> None:
    fail_times(queue, 3, cooldown_ms=100)
    assert not acquire(queue, "early", cooldown_ms=100).granted
    time.sleep(0.15)
    probe = acquire(queue, "probe", cooldown_ms=100)
    assert probe.granted and probe.probe
    waiting = acquire(queue, "other", cooldown_ms=100)
    assert not waiting.granted and waiting.reason == "probing"
    assert [c.state for c in queue.open_circuits()] == ["half_open"]
    assert release(queue, "probe", "ok") == "closed"
    assert acquire(queue, "other").granted
    assert queue.open_circuits() == []


def test_a_failed_probe_opens_the_circuit_again(queue: Queue) -> None:
    fail_times(queue, 3, cooldown_ms=100)
    time.sleep(0.15)
    assert acquire(queue, "probe", cooldown_ms=100).probe
    assert release(queue, "probe", "failed", cooldown_ms=100) == "open"
    refused = acquire(queue, "next", cooldown_ms=100)
    assert not refused.granted and refused.reason == "open"
    [circuit] = queue.open_circuits()
    assert circuit.failures == 4


def test_a_probe_without_verdict_lets_the_next_caller_probe(queue: Queue) -> None:
    fail_times(queue, 3, cooldown_ms=100)
    time.sleep(0.15)
    assert acquire(queue, "probe", cooldown_ms=100).probe
    assert release(queue, "probe", "none") == "half_open"  # e.g. cancelled before an answer
    assert acquire(queue, "second", cooldown_ms=100).probe


def test_hosts_are_independent(queue: Queue) -> None:
    fail_times(queue, 3, host="down.example:443")
    for holder in ("a", "b"):
        assert acquire(queue, holder, host="busy.example:443", limit=2).granted
    assert not acquire(queue, "x", host="down.example:443").granted
    assert not acquire(queue, "y", host="busy.example:443", limit=2).granted
    assert acquire(queue, "z", host=HOST, limit=2).granted
    assert [c.host for c in queue.open_circuits()] == ["down.example:443"]


# --- the handler ------------------------------------------------------------------------------
@pytest.fixture
def protect(settings: Any) -> None:
    allow_webhook_hosts(settings, "127.0.0.1")
    settings.JOBS = {
        **settings.JOBS,
        "WEBHOOK_BREAKER_FAILURES": 3,
        "WEBHOOK_BREAKER_COOLDOWN_S": 60,
    }


@pytest.mark.usefixtures("protect")
async def test_5xx_opens_the_circuit_and_later_calls_are_held_unsent() -> None:
    with webhook_server() as server:
        server.statuses["/hook"] = [503]
        for _ in range(3):
            with pytest.raises(Exception, match="HTTP 503"):
                await run_async("webhook", {"url": server.url()})
        with pytest.raises(HeldBack) as held:
            await run_async("webhook", {"url": server.url()})
        assert len(server.calls()) == 3
    assert held.value.reason.startswith(f"circuit open for host 127.0.0.1:{server.port} until ")
    assert held.value.until > timezone.now() + timedelta(seconds=55)
    await close_async_queue()


@pytest.mark.usefixtures("protect")
async def test_4xx_answers_do_not_count_as_failures() -> None:
    with webhook_server() as server:
        server.statuses["/hook"] = [404]
        for _ in range(5):
            with pytest.raises(Exception, match="HTTP 404"):
                await run_async("webhook", {"url": server.url()})
        assert len(server.calls()) == 5
    await close_async_queue()


# --- the lifecycle ----------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_held_outcome_writes_pending_later_with_the_attempt_given_back(tenant: Tenant) -> None:
    job, _ = job_enqueue(tenant=tenant, spec=JobSpec(type="sleep", payload={"delayMs": 0}))
    [claimed] = store.claim_jobs(job_ids=[str(job.id)], worker="w1")
    assert claimed.attempts == 1
    stale = copy.copy(claimed)  # the worker's copy, with the claim's lease token
    until = timezone.now() + timedelta(seconds=30)

    async def finish(items: list[tuple[Job, Outcome]]) -> list[Job | None]:
        client = aioredis.Redis.from_url(settings.REDIS_URL)
        jobs = store.JobStore(threads=2)
        try:
            transitions = WorkerTransitions(
                jobs=jobs, queue=Queue(client), policy=RetryPolicy.from_settings()
            )
            return await transitions.finish(items)
        finally:
            jobs.close()
            await pg.close_pools()
            await client.aclose()

    with listen_to_tenant(tenant.id) as listener:
        [written] = asyncio.run(finish([(claimed, Outcome.held(until, "circuit open for x"))]))
        updates = listener.settle()
    assert written is not None
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING and job.attempts == 0
    assert job.run_at == until and job.error == "held: circuit open for x"
    assert job.lease_token is None
    assert [(u["jobId"], u["status"]) for u in updates] == [(str(job.id), "PENDING")]
    # Indexed for later (the delayed set), counted as held, not as a retry.
    queue = sync_queue()
    delayed = queue.client.zrange(queue.keys.delayed(), 0, -1, withscores=True)
    assert [(m.decode().rsplit("|", 1)[1], int(s)) for m, s in delayed] == [
        (str(job.id), int(until.timestamp() * 1000))
    ]
    events = {(e.event, e.job_type): e.count for e in queue.job_event_metrics().events}
    assert events.get(("held", "sleep")) == 1 and ("retried", "sleep") not in events
    # Fenced: the same outcome with the spent lease writes nothing.
    assert asyncio.run(finish([(stale, Outcome.held(until, "again"))])) == [None]


# --- the worker, end to end -------------------------------------------------------------------
class BackgroundWorker:
    """A worker (not burst) on its own event loop in a thread, until `stop`."""

    def __init__(self, **options: Any) -> None:
        self.worker = Worker(
            WorkerOptions(name=f"test-{uuid.uuid4().hex[:6]}", grace_s=5, **options)
        )
        self.loop = asyncio.new_event_loop()
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = self.loop.run_until_complete(self.worker.run())
        finally:
            self.loop.close()

    def __enter__(self) -> BackgroundWorker:
        self.thread.start()
        # Started up (registered in Redis) before the test measures anything.
        wait_until(
            lambda: any(beat.name == self.worker.name for beat in sync_queue().worker_beats()),
            timeout=10,
            what="the worker to start",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(30)
        assert not self.thread.is_alive() and self.exit_code == 0


def wait_until(condition: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def webhook(tenant: Tenant, url: str, **kwargs: Any) -> Job:
    spec = JobSpec(type="webhook", payload={"url": url, "timeoutMs": 2000}, **kwargs)
    return job_enqueue(tenant=tenant, spec=spec)[0]


def latencies_ms(jobs: list[Job]) -> list[float]:
    rows = Job.objects.filter(id__in=[j.id for j in jobs])
    assert all(row.status == JobStatus.COMPLETED for row in rows), [r.error for r in rows]
    return sorted((row.finished_at - row.created_at).total_seconds() * 1000 for row in rows)


def p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.95))]


def completed(jobs: list[Job]) -> bool:
    ids = [j.id for j in jobs]
    return Job.objects.filter(id__in=ids, status=JobStatus.COMPLETED).count() == len(ids)


def settled(jobs: list[Job]) -> list[Job]:
    """The jobs' rows at a moment none of them is RUNNING (a claimed job holds its attempt
    until it is held or fails): one snapshot, read again until it has no RUNNING row."""
    ids = [j.id for j in jobs]
    deadline = time.monotonic() + 5
    while True:
        rows = list(Job.objects.filter(id__in=ids))
        if all(row.status != JobStatus.RUNNING for row in rows):
            return rows
        assert time.monotonic() < deadline, "jobs kept running"
        time.sleep(0.01)


@pytest.fixture
def healthy() -> Iterator[WebhookServer]:
    with webhook_server() as server:
        yield server


@pytest.mark.django_db(transaction=True)
def test_a_dead_host_is_held_while_a_healthy_one_keeps_its_latency(
    tenant: Tenant, settings: Any, healthy: WebhookServer
) -> None:
    failures, cooldown_s, cap = 5, 1.0, 4
    allow_webhook_hosts(settings, "127.0.0.1")
    settings.JOBS = {
        **settings.JOBS,
        "WEBHOOK_HOST_CONCURRENCY": cap,
        "WEBHOOK_BREAKER_FAILURES": failures,
        "WEBHOOK_BREAKER_COOLDOWN_S": cooldown_s,
        "RETRY_BASE_MS": 20,
        "RETRY_MAX_MS": 100,
    }
    healthy.statuses["/hook"] = [Reply(status=200, delay_s=0.02)]
    dead_port = free_port()  # nothing listens: every connection is refused
    dead_url = f"http://127.0.0.1:{dead_port}/hook"

    with BackgroundWorker(concurrency=8):
        # Before: the healthy host alone.
        before = []
        for _ in range(30):
            before.append(webhook(tenant, healthy.url()))
            time.sleep(0.01)
        wait_until(lambda: completed(before), timeout=15, what="deliveries before the outage")

        # During: 40 jobs to the dead host (25 attempts each) among 30 more to the healthy one.
        dead = [webhook(tenant, dead_url, max_attempts=25) for _ in range(40)]
        during = []
        for _ in range(30):
            during.append(webhook(tenant, healthy.url()))
            time.sleep(0.01)
        wait_until(lambda: completed(during), timeout=15, what="deliveries during the outage")
        # Let the dead host's circuit open, cool down and fail a probe or two.
        time.sleep(2.5 * cooldown_s)
        rows = settled(dead)
        assert all(row.status == JobStatus.PENDING for row in rows)
        held = [row for row in rows if (row.error or "").startswith("held: ")]
        attempts_spent = sum(row.attempts for row in rows)
        circuits = sync_queue().open_circuits()

        # The dead host comes back.
        with webhook_server(port=dead_port) as revived:
            wait_until(lambda: completed(dead), timeout=20, what="deliveries after recovery")
            received = [call.headers["webhook-id"] for call in revived.calls()]

    before_ms, during_ms = latencies_ms(before), latencies_ms(during)
    figures = {
        "healthy p50/p95 before (ms)": (statistics.median(before_ms), p95(before_ms)),
        "healthy p50/p95 during (ms)": (statistics.median(during_ms), p95(during_ms)),
        "dead-host jobs": len(dead),
        "held at the check": len(held),
        "attempts spent on the dead host": attempts_spent,
        "deliveries after recovery": len(received),
        "distinct webhook-ids": len(set(received)),
    }
    print("\ndead-receiver test:", figures)

    assert statistics.median(during_ms) < 2 * statistics.median(before_ms) + 200
    assert p95(during_ms) < 2 * p95(before_ms) + 200
    assert [c.host for c in circuits] == [f"127.0.0.1:{dead_port}"]
    # Requests tried against the dead host: the threshold (and the requests already in flight
    # when it was reached: at most cap - 1 more), plus one probe per cool-down.
    bound = failures + (cap - 1) + int(2.5 / cooldown_s) + 1
    assert attempts_spent <= bound, attempts_spent
    assert len(held) >= len(dead) - bound
    assert sorted(received) == sorted({f"msg_{job.id}" for job in dead})


@pytest.mark.django_db(transaction=True)
def test_the_cap_bounds_requests_in_flight_per_host(tenant: Tenant, settings: Any) -> None:
    allow_webhook_hosts(settings, "127.0.0.1")
    settings.JOBS = {**settings.JOBS, "WEBHOOK_HOST_CONCURRENCY": 2}
    with webhook_server() as slow, webhook_server() as fast:
        slow.statuses["/hook"] = [Reply(status=200, delay_s=0.3)]
        with BackgroundWorker(concurrency=8):
            slow_jobs = [webhook(tenant, slow.url()) for _ in range(8)]
            fast_jobs = [webhook(tenant, fast.url()) for _ in range(4)]
            wait_until(lambda: completed(fast_jobs), timeout=10, what="the other host's jobs")
            wait_until(lambda: completed(slow_jobs), timeout=20, what="the slow host's jobs")
        assert slow.max_in_flight == 2
        assert len(slow.calls()) == 8 and len(fast.calls()) == 4
    fast_ms = latencies_ms(fast_jobs)
    print(
        f"\ncap test: slow host max in flight {slow.max_in_flight},",
        f"other host p95 {p95(fast_ms):.0f} ms",
    )
    assert p95(fast_ms) < 1000
    rows = Job.objects.filter(id__in=[j.id for j in slow_jobs])
    assert all(row.attempts == 1 for row in rows)
