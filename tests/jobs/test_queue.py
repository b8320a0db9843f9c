"""The Redis side on the real Redis: round robin, priorities, delays, limits, requeue; and the
typed methods the API, the worker and the realtime path use instead of raw commands."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from jobs.counters import EventCount, bucket_index
from jobs.models import Job, JobStatus
from jobs.queue import (
    CLAIM_TTL_S,
    CapReached,
    Keys,
    Queue,
    QueueDepths,
    QueueEntry,
    RateDecision,
    RecipientBudget,
    ReplayGrant,
    parse_claim,
    parse_email_budget,
    parse_rate_limit,
    ready_score,
)

NOW = datetime.now(UTC)


def entry(
    tenant: str, job_id: str, *, priority: int = 0, age_s: float = 0, delay_ms: int = 0
) -> QueueEntry:
    created = NOW - timedelta(seconds=1000 - age_s)
    return QueueEntry(
        tenant=tenant,
        job_id=job_id,
        score=ready_score(priority=priority, created_at=created),
        run_at_ms=int(time.time() * 1000) + delay_ms,
    )


@pytest.fixture
def queue(redis_client: redis.Redis, redis_prefix: str) -> Queue:
    return Queue(redis_client, prefix=redis_prefix)


def claim(queue: Queue, count: int, worker: str = "w1") -> list[str]:
    return parse_claim(queue.claim(worker=worker, count=count)).job_ids


def test_ready_score_orders_priority_then_age() -> None:
    old = ready_score(priority=0, created_at=NOW - timedelta(seconds=5))
    new = ready_score(priority=0, created_at=NOW)
    urgent = ready_score(priority=5, created_at=NOW)
    assert urgent < old < new
    assert ready_score(priority=10, created_at=NOW) < ready_score(priority=-10, created_at=NOW)
    assert ready_score(priority=-10, created_at=datetime(2035, 12, 31, tzinfo=UTC)) < 2**53


def test_round_robin_across_tenants(queue: Queue) -> None:
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(100))
    queue.enqueue([entry("b", "b0"), entry("c", "c0")])
    first = claim(queue, 3)
    assert sorted(first) == ["a0", "b0", "c0"]
    assert claim(queue, 2) == ["a1", "a2"]


def test_one_job_per_turn_puts_small_tenant_near_the_front(queue: Queue) -> None:
    queue.enqueue(entry("big", f"big{i}", age_s=i) for i in range(500))
    taken = claim(queue, 5)
    queue.enqueue([entry("small", "s0")])
    order = []
    for _ in range(5):
        order.extend(claim(queue, 1))
    assert "s0" in order[:2], order
    assert taken == [f"big{i}" for i in range(5)]


def test_priority_then_fifo_within_tenant(queue: Queue) -> None:
    queue.enqueue(
        [
            entry("t", "low", priority=-1, age_s=0),
            entry("t", "n1", age_s=1),
            entry("t", "n2", age_s=2),
            entry("t", "high", priority=5, age_s=3),
        ]
    )
    assert claim(queue, 4) == ["high", "n1", "n2", "low"]


def test_duplicate_push_is_one_entry(
    queue: Queue, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue.enqueue([entry("t", "x")])
    queue.enqueue([entry("t", "x")])
    assert redis_client.zcard(Keys(redis_prefix).ready("t")) == 1
    assert redis_client.llen(Keys(redis_prefix).ring()) == 1


def test_delayed_job_moves_when_due(queue: Queue) -> None:
    queue.enqueue([entry("t", "later", delay_ms=300)])
    claimed = parse_claim(queue.claim(worker="w1", count=5))
    assert claimed.job_ids == []
    assert claimed.next_due_ms is not None and claimed.next_due_ms > time.time() * 1000
    time.sleep(0.35)
    assert claim(queue, 5) == ["later"]


def test_concurrency_limit_skips_tenant_without_blocking_others(queue: Queue) -> None:
    queue.set_tenant_limit("a", 2)
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(10))
    queue.enqueue(entry("b", f"b{i}", age_s=i) for i in range(10))
    got = claim(queue, 10)
    assert len([i for i in got if i.startswith("a")]) == 2
    assert len(got) == 10
    queue.release(worker="w1", job_ids=["a0"])
    assert claim(queue, 1) == ["a2"]


def test_limit_alone_returns_nothing_instead_of_spinning(queue: Queue) -> None:
    queue.set_tenant_limit("a", 1)
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(3))
    assert claim(queue, 3) == ["a0"]
    assert claim(queue, 3) == []


def test_requeue_all_returns_claims_of_a_dead_worker(
    queue: Queue, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue.enqueue(entry("t", f"j{i}", age_s=i) for i in range(3))
    redis_client.zadd(f"{redis_prefix}:workers", {"dead": 1})
    assert claim(queue, 2, worker="dead") == ["j0", "j1"]
    assert redis_client.hlen(Keys(redis_prefix).processing("dead")) == 2
    assert queue.requeue(worker="dead") == 2
    assert redis_client.exists(Keys(redis_prefix).processing("dead")) == 0
    assert redis_client.zscore(f"{redis_prefix}:workers", "dead") is None
    assert redis_client.hget(Keys(redis_prefix).running(), "t") is None
    assert claim(queue, 3, worker="alive") == ["j0", "j1", "j2"]


def test_remove_takes_job_out_of_ready_and_delayed(queue: Queue) -> None:
    ready, delayed = entry("t", "r"), entry("t", "d", delay_ms=60_000)
    queue.enqueue([ready, delayed])
    assert queue.remove([ready, delayed]) == 2
    assert claim(queue, 5) == []


def test_enqueue_wakes_idle_workers(queue: Queue, redis_client: redis.Redis) -> None:
    queue.enqueue([entry("t", "x")])
    assert redis_client.blpop([queue.wake_key], timeout=1) is not None


def test_running_count_follows_claims_and_releases(
    queue: Queue, redis_client: Any, redis_prefix: str
) -> None:
    queue.enqueue(entry("t", f"j{i}", age_s=i) for i in range(3))
    claim(queue, 3)
    assert int(redis_client.hget(Keys(redis_prefix).running(), "t")) == 3
    queue.release(worker="w1", job_ids=["j0", "j1", "j2", "unknown"])
    assert redis_client.hget(Keys(redis_prefix).running(), "t") is None


def fair_queue(
    settings: Any, redis_client: redis.Redis, prefix: str, *, share: float, reserve: int = 0
) -> Queue:
    """A queue with fair shares on, and one registered worker of 4 slots (a share of 0.5 is 2)."""
    settings.JOBS = {
        **settings.JOBS,
        "TENANT_FAIR_SHARE": share,
        "TENANT_FAIR_SHARE_RESERVE": reserve,
    }
    queue = Queue(redis_client, prefix=prefix)
    queue.beat(worker="w1", slots=4)
    return queue


def test_tenant_at_its_fair_share_is_passed_over_while_another_has_work(
    settings: Any, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue = fair_queue(settings, redis_client, redis_prefix, share=0.5)
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(10))
    assert claim(queue, 2) == ["a0", "a1"]
    queue.enqueue([entry("b", "b0")])
    assert claim(queue, 1) == ["b0"]
    # B has nothing left: A may go over its share rather than leave the slot idle.
    assert claim(queue, 1) == ["a2"]


def test_one_claim_serves_the_other_tenant_first_then_lends_the_rest(
    settings: Any, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue = fair_queue(settings, redis_client, redis_prefix, share=0.5)
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(10))
    assert claim(queue, 2) == ["a0", "a1"]
    queue.enqueue([entry("b", "b0"), entry("b", "b1", age_s=1)])
    assert claim(queue, 4) == ["b0", "b1", "a2", "a3"]


def test_a_tenant_alone_fills_every_slot(
    settings: Any, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue = fair_queue(settings, redis_client, redis_prefix, share=0.5)
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(10))
    assert claim(queue, 4) == ["a0", "a1", "a2", "a3"]


def test_the_explicit_limit_still_caps_a_tenant_alone(
    settings: Any, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue = fair_queue(settings, redis_client, redis_prefix, share=0.5)
    queue.set_tenant_limit("a", 3)
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(10))
    assert claim(queue, 4) == ["a0", "a1", "a2"]


def test_fair_share_zero_turns_it_off(
    settings: Any, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue = fair_queue(settings, redis_client, redis_prefix, share=0)
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(10))
    assert claim(queue, 2) == ["a0", "a1"]
    queue.enqueue([entry("b", "b0")])
    assert claim(queue, 1) == ["a2"]


def test_reserve_keeps_slots_free_for_a_tenant_that_arrives_later(
    settings: Any, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue = fair_queue(settings, redis_client, redis_prefix, share=0.5, reserve=1)
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(10))
    assert claim(queue, 4) == ["a0", "a1", "a2"]
    assert claim(queue, 1) == []
    queue.enqueue([entry("b", "b0")])
    assert claim(queue, 1) == ["b0"]
    # A job of A ends: A is over its share, and the freed slot is the reserve again.
    queue.release(worker="w1", job_ids=["a0"])
    assert claim(queue, 1) == []


def test_fair_share_is_of_the_slots_of_registered_workers(
    settings: Any, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue = fair_queue(settings, redis_client, redis_prefix, share=0.5)
    queue.beat(worker="w2", slots=4)  # 8 slots: a share of 4
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(10))
    assert claim(queue, 3) == ["a0", "a1", "a2"]
    queue.enqueue([entry("b", "b0"), entry("b", "b1", age_s=1)])
    assert claim(queue, 1) == ["a3"]
    queue.release(worker="w1", job_ids=["a3"])
    assert claim(queue, 1) == ["b0"]
    # w2 stops (unregisters): 4 slots, a share of 2, which A's 3 jobs are over. The sum is
    # cached for a second.
    queue.requeue(worker="w2")
    redis_client.delete(Keys(redis_prefix).slots_total())
    assert claim(queue, 1) == ["b1"]
    assert redis_client.hkeys(Keys(redis_prefix).shard_slots()) == [b"w1"]


# --- constants shared with the scripts --------------------------------------------------------
def test_claims_and_heartbeats_keep_the_processing_hash_for_the_claim_ttl(
    queue: Queue, redis_client: redis.Redis, redis_prefix: str
) -> None:
    processing = Keys(redis_prefix).processing("w1")
    queue.enqueue([entry("t", "x")])
    claim(queue, 1)
    assert CLAIM_TTL_S - 5 < redis_client.ttl(processing) <= CLAIM_TTL_S
    redis_client.expire(processing, 10)
    queue.beat(worker="w1", slots=1)
    assert CLAIM_TTL_S - 5 < redis_client.ttl(processing) <= CLAIM_TTL_S


def test_requeue_caps_wake_tokens_at_the_python_constant(
    queue: Queue, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jobs.queue.WAKE_TOKENS_MAX", 3)
    queue.enqueue(entry("t", f"j{i}", age_s=i) for i in range(10))
    assert redis_client.llen(queue.wake_key) == 3
    assert len(claim(queue, 10)) == 10
    redis_client.delete(queue.wake_key)
    assert queue.requeue(worker="w1") == 10
    assert redis_client.llen(queue.wake_key) == 3


def test_requeue_of_some_ids_leaves_the_others_claimed(
    queue: Queue, redis_client: redis.Redis, redis_prefix: str
) -> None:
    queue.enqueue(entry("t", f"j{i}", age_s=i) for i in range(3))
    assert claim(queue, 3) == ["j0", "j1", "j2"]
    assert queue.requeue(worker="w1", job_ids=["j1", "unknown"]) == 1
    processing = Keys(redis_prefix).processing("w1")
    assert sorted(redis_client.hkeys(processing)) == [b"j0", b"j2"]
    assert claim(queue, 3, worker="w2") == ["j1"]


# --- typed reads (sync client) ------------------------------------------------------------------
def test_depths_count_ready_delayed_running_and_live_workers(queue: Queue) -> None:
    queue.enqueue(entry("a", f"a{i}", age_s=i) for i in range(3))
    queue.enqueue([entry("b", "b0"), entry("b", "later", delay_ms=60_000)])
    queue.beat(worker="w1", slots=2)
    claim(queue, 2)
    now_ms = int(time.time() * 1000)
    assert queue.ready_counts(["a", "b", "c"]) == {"a": 2, "b": 0, "c": 0}
    assert queue.queue_depths(alive_since_ms=now_ms - 60_000) == QueueDepths(
        ready=2, delayed=1, running=2, workers_alive=1, tenants_ready=1
    )
    assert queue.queue_depths(alive_since_ms=now_ms + 60_000).workers_alive == 0


def test_worker_beats_say_when_each_worker_was_last_seen(queue: Queue) -> None:
    before = datetime.now(UTC)
    queue.beat(worker="w1", slots=2)
    (beat,) = queue.worker_beats()
    assert beat.name == "w1"
    assert before - timedelta(seconds=1) <= beat.last_seen <= datetime.now(UTC)


def test_counted_events_and_timings_read_back_typed(queue: Queue) -> None:
    done = Job(tenant_id="t1", type="sleep", status=JobStatus.COMPLETED)
    queue.enqueue([], counters=queue.event_increments("created", [done, done]))
    (created,) = queue.job_event_metrics().events
    assert created == EventCount(event="created", job_type="sleep", tenant="t1", count=2)


def test_login_failures_count_per_user_name_and_address(queue: Queue) -> None:
    for _ in range(3):
        queue.count_login_failure(username="op", address="10.0.0.1", window_s=60)
    queue.count_login_failure(username="other", address="10.0.0.1", window_s=60)
    assert queue.login_failures(username="op", address=None) == 3
    assert queue.login_failures(username="op", address="10.0.0.1") == 4
    queue.clear_login_failures(username="op")
    assert queue.login_failures(username="op", address=None) == 0
    assert queue.login_failures(username="nobody", address="10.0.0.2") == 0


def test_rate_limit_and_email_budget_replies_parse_to_typed_answers(queue: Queue) -> None:
    assert parse_rate_limit(queue.rate_limit(tenant="t", rate=1, burst=1, cost=1)) == (
        RateDecision(allowed=True, retry_ms=0)
    )
    refused = parse_rate_limit(queue.rate_limit(tenant="t", rate=1, burst=1, cost=1))
    assert not refused.allowed and 0 < refused.retry_ms <= 1000
    spend = {"tenant": "t", "limit": 5, "window_ms": 60_000}
    assert parse_email_budget(queue.spend_email_recipients(cost=4, **spend)) == (
        RecipientBudget(allowed=True, total=4, retry_ms=0)
    )
    refused_budget = parse_email_budget(queue.spend_email_recipients(cost=2, **spend))
    assert not refused_budget.allowed and refused_budget.total == 4
    assert 0 < refused_budget.retry_ms <= 60_000


# --- the worker's side (asyncio client) ---------------------------------------------------------
@pytest.fixture
async def aqueue(redis_prefix: str) -> AsyncIterator[Queue]:
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    yield Queue(client, prefix=redis_prefix)
    await client.aclose()


async def test_wait_for_wake_takes_a_token_or_times_out(aqueue: Queue) -> None:
    assert await aqueue.wait_for_wake(0.01) is False
    assert await aqueue.wait_for_wake(0) is False  # never "block for ever"
    await aqueue.enqueue([entry("t", "x")])
    assert await aqueue.wait_for_wake(1) is True
    assert await aqueue.client.llen(aqueue.wake_key) == 0


async def test_a_lock_has_one_owner_until_it_expires(aqueue: Queue, redis_prefix: str) -> None:
    assert await aqueue.try_lock("reconcile", owner="w1", ttl_s=5) is True
    assert await aqueue.try_lock("reconcile", owner="w2", ttl_s=5) is False
    assert await aqueue.try_lock("other", owner="w2", ttl_s=5) is True
    lock = Keys(redis_prefix).lock("reconcile")
    assert await aqueue.client.get(lock) == b"w1"
    assert 0 < await aqueue.client.pttl(lock) <= 5000
    await aqueue.client.delete(lock)  # as if it expired
    assert await aqueue.try_lock("reconcile", owner="w2", ttl_s=5) is True


async def test_dead_workers_are_those_silent_since_the_cutoff(
    aqueue: Queue, redis_prefix: str
) -> None:
    workers = {"old": 1_000, "edge": 2_000, "alive": 3_000}
    await aqueue.client.zadd(Keys(redis_prefix).workers, workers)
    assert sorted(await aqueue.dead_workers(silent_since_ms=2_000)) == ["edge", "old"]
    assert await aqueue.dead_workers(silent_since_ms=999) == []


async def subscribed(queue: Queue, expected: int) -> bool:
    """Whether the cancel channel has `expected` subscribers."""
    ((_, count),) = await queue.client.pubsub_numsub(queue.cancel_channel)
    return int(count) == expected


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_cancel_requests_yield_published_ids_and_unsubscribe_when_closed(
    aqueue: Queue,
) -> None:
    requests = aqueue.cancel_requests()
    first = asyncio.ensure_future(anext(requests))
    await until(lambda: subscribed(aqueue, 1))
    await aqueue.publish_cancel("job-1")
    assert await asyncio.wait_for(first, 5) == "job-1"
    await aqueue.publish_cancel("job-2")
    assert await asyncio.wait_for(anext(requests), 5) == "job-2"
    await requests.aclose()
    await until(lambda: subscribed(aqueue, 0))


async def test_cancel_requests_raise_when_redis_is_unreachable(redis_prefix: str) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = aioredis.Redis(port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(redis.ConnectionError):
            await anext(Queue(client, prefix=redis_prefix).cancel_requests())
    finally:
        await client.aclose()


async def test_starts_and_outcomes_are_counted_and_timed(aqueue: Queue) -> None:
    now = datetime.now(UTC)
    started = now - timedelta(seconds=2)

    def job(status: str, job_type: str = "sleep") -> Job:
        run_at = started - timedelta(seconds=0.3)
        return Job(tenant_id="t1", type=job_type, status=status, run_at=run_at, started_at=started)

    await aqueue.record_starts([job(JobStatus.RUNNING), job(JobStatus.RUNNING, "email")])
    await aqueue.record_outcomes(
        [job(JobStatus.COMPLETED), job(JobStatus.COMPLETED), job(JobStatus.PENDING)], now
    )
    await aqueue.record_outcomes([], now)  # nothing to add: no round trip, no error

    metrics = Queue(redis.Redis.from_url(settings.REDIS_URL), prefix=aqueue.prefix)
    try:
        read = metrics.job_event_metrics()
    finally:
        metrics.client.close()
    assert read.events == [
        EventCount(event="completed", job_type="sleep", tenant="t1", count=2),
        EventCount(event="retried", job_type="sleep", tenant="t1", count=1),
    ]
    (duration,) = read.durations
    assert duration.job_type == "sleep"
    assert duration.buckets[bucket_index(2.0)] == 3 and sum(duration.buckets) == 3
    assert duration.sum == pytest.approx(6.0)
    assert [(w.job_type, sum(w.buckets), w.sum) for w in read.waits] == [
        ("email", 1, pytest.approx(0.3)),
        ("sleep", 1, pytest.approx(0.3)),
    ]


# --- the realtime side (asyncio client) ---------------------------------------------------------
async def test_sockets_are_admitted_under_caps_summed_over_processes(aqueue: Queue) -> None:
    admit = {"ttl_ms": 20_000, "tenant_cap": 2, "key_cap": 0, "fields": ("t:a", "k:1")}
    assert await aqueue.admit_socket(process="p1", **admit) is None
    assert await aqueue.admit_socket(process="p2", **admit) is None
    assert await aqueue.admit_socket(process="p2", **admit) == CapReached(field="t:a", open=2)
    await aqueue.release_socket(process="p1", fields=("total", "t:a", "k:1"))
    assert await aqueue.admit_socket(process="p2", **admit) is None
    await aqueue.sync_sockets(process="p2", ttl_ms=20_000, counts={"total": 5})
    await aqueue.sync_sockets(process="p1", ttl_ms=20_000, counts={})
    metrics = Queue(redis.Redis.from_url(settings.REDIS_URL), prefix=aqueue.prefix)
    try:
        assert metrics.open_sockets() == 5
    finally:
        metrics.client.close()


async def test_replay_rows_come_from_a_budget_that_refills(aqueue: Queue) -> None:
    take = {"tenant": "t", "rate": 1, "burst": 5}
    assert await aqueue.take_replay_rows(wanted=3, **take) == ReplayGrant(granted=3, retry_ms=0)
    assert (await aqueue.take_replay_rows(wanted=9, **take)).granted == 2
    spent = await aqueue.take_replay_rows(wanted=1, **take)
    assert spent.granted == 0 and 0 < spent.retry_ms <= 1000
    await aqueue.take_replay_rows(wanted=-2, **take)  # given back
    assert (await aqueue.take_replay_rows(wanted=9, **take)).granted == 2
