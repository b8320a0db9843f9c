"""The Redis index on the real Redis: round robin, priorities, delays, limits, requeue."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from jobs.queue import Queue, QueueEntry, parse_claim, ready_score

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
    assert redis_client.zcard(f"{redis_prefix}:ready:t") == 1
    assert redis_client.llen(f"{redis_prefix}:tenants") == 1


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
    assert redis_client.hlen(f"{redis_prefix}:processing:dead") == 2
    assert queue.requeue(worker="dead") == 2
    assert redis_client.exists(f"{redis_prefix}:processing:dead") == 0
    assert redis_client.zscore(f"{redis_prefix}:workers", "dead") is None
    assert redis_client.hget(f"{redis_prefix}:running", "t") is None
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
    assert int(redis_client.hget(f"{redis_prefix}:running", "t")) == 3
    queue.release(worker="w1", job_ids=["j0", "j1", "j2", "unknown"])
    assert redis_client.hget(f"{redis_prefix}:running", "t") is None


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
    redis_client.delete(f"{redis_prefix}:slots:total")
    assert claim(queue, 1) == ["b1"]
    assert redis_client.hkeys(f"{redis_prefix}:slots") == [b"w1"]
