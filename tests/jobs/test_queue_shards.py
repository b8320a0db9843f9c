"""The queue split into several shards (`JOBS_QUEUE_SHARDS`), on one Redis: every shard is
served, claims rotate over them, fair shares hold across them, and the reads, releases and
recoveries find jobs in every shard. The same code runs on a Redis Cluster
(tests/e2e/test_redis_cluster.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from django.conf import settings as django_settings

from jobs.queue import Keys, Queue, QueueEntry, parse_claim, ready_score
from tests.jobs.test_queue import NOW, entry

SHARDS = 4


def tenants_in_distinct_shards(count: int, shards: int = SHARDS) -> list[str]:
    """Tenant ids, one per shard, the first `count` shards."""
    keys = Keys("x", shards)
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        found.setdefault(keys.shard_of(f"tenant-{n}"), f"tenant-{n}")
        n += 1
    return [found[k] for k in sorted(found)[:count]]


@pytest.fixture
def queue(settings: Any, redis_client: redis.Redis, redis_prefix: str) -> Queue:
    settings.JOBS = {**settings.JOBS, "TENANT_FAIR_SHARE": 0.5, "TENANT_FAIR_SHARE_RESERVE": 0}
    queue = Queue(redis_client, prefix=redis_prefix, shards=SHARDS)
    queue.beat(worker="w1", slots=4)
    return queue


def claim(queue: Queue, count: int, worker: str = "w1") -> list[str]:
    return parse_claim(queue.claim(worker=worker, count=count)).job_ids


def test_tenant_keys_share_a_slot_tag_and_shards_are_stable() -> None:
    keys = Keys("p", 16)
    assert keys.rate("acme") == "p:{t:acme}:rate"
    assert keys.email_recipients_total("acme") == "p:{t:acme}:email-recipients:total"
    shard = keys.shard_of("acme")
    assert keys.ready("acme") == f"p:{{q{shard}}}:ready:acme"
    assert keys.shard_of("acme") == Keys("p", 16).shard_of("acme")  # crc32, not hash()
    assert {keys.shard_of(f"t{i}") for i in range(200)} == set(range(16))
    assert Keys("p").shard_of("acme") == 0


def test_every_shard_is_served_and_claims_start_one_shard_further(queue: Queue) -> None:
    tenants = tenants_in_distinct_shards(SHARDS)
    queue.enqueue(entry(t, f"{t}-{i}", age_s=i) for t in tenants for i in range(3))
    assert queue.queue_depths(alive_since_ms=0).ready == 3 * SHARDS
    assert queue.queue_depths(alive_since_ms=0).tenants_ready == SHARDS
    # One job per claim: the shards take turns.
    firsts = [claim(queue, 1)[0].rsplit("-", 1)[0] for _ in range(SHARDS)]
    assert sorted(firsts) == sorted(tenants)
    # The rest: each tenant up to its share, then lent (nobody else is waiting).
    assert len(claim(queue, 100)) == 2 * SHARDS
    assert queue.queue_depths(alive_since_ms=0).ready == 0
    assert queue.queue_depths(alive_since_ms=0).running == 3 * SHARDS


def test_a_tenant_over_its_share_in_one_shard_waits_for_the_others(queue: Queue) -> None:
    flood, small = tenants_in_distinct_shards(2)
    queue.enqueue(entry(flood, f"f{i}", age_s=i) for i in range(50))
    # Alone, the flooding tenant takes every free slot (lent: nobody else wants them).
    assert len(claim(queue, 3)) == 3
    queue.enqueue([entry(small, "s0"), entry(small, "s1", age_s=1)])
    # Over its share (2 of 4 slots): whichever shard the claim starts at, the small tenant's
    # jobs come first, before anything is lent to the flood.
    for start in range(SHARDS):
        queue.next_shard = start
        assert claim(queue, 1) == ["s0"]
        queue.requeue(worker="w1", job_ids=["s0"])
    assert claim(queue, 1) == ["s0"]
    queue.release(worker="w1", job_ids=["s0"])
    queue.next_shard = 0
    assert claim(queue, 1) == ["s1"]


def test_release_and_recovery_find_claims_in_every_shard(
    queue: Queue, redis_client: redis.Redis
) -> None:
    tenants = tenants_in_distinct_shards(SHARDS)
    queue.enqueue(entry(t, f"{t}-j") for t in tenants)
    ids = claim(queue, SHARDS)
    assert len(ids) == SHARDS
    # Another process's queue (it does not know where each id came from) releases one.
    other = Queue(redis_client, prefix=queue.prefix, shards=SHARDS)
    assert other.release(worker="w1", job_ids=[ids[0]]) == 1
    assert queue.release(worker="w1", job_ids=[ids[1]]) == 1
    # The worker dies: its other claims go back to their tenants' ready sets.
    assert other.requeue(worker="w1") == SHARDS - 2
    assert redis_client.zscore(queue.keys.workers, "w1") is None
    depths = queue.queue_depths(alive_since_ms=0)
    assert (depths.ready, depths.running) == (SHARDS - 2, 0)
    assert sorted(claim(queue, SHARDS, worker="w2")) == sorted(ids[2:])


def test_delayed_jobs_limits_and_removal_per_shard(queue: Queue) -> None:
    a, b = tenants_in_distinct_shards(2)
    queue.replace_tenant_limits({a: 1, b: 5})
    queue.enqueue([entry(a, "a0"), entry(a, "a1", age_s=1), entry(b, "b0", delay_ms=150)])
    assert queue.queue_depths(alive_since_ms=0).delayed == 1
    assert claim(queue, 5) == ["a0"]  # a's limit; b0 not due yet
    time.sleep(0.2)
    assert claim(queue, 5) == ["b0"]
    queue.remove([QueueEntry(a, "a1", ready_score(priority=0, created_at=NOW), 0)])
    assert queue.ready_counts([a, b]) == {a: 0, b: 0}


def test_the_asyncio_client_runs_the_same_operations(redis_prefix: str) -> None:
    async def run() -> tuple[list[str], int]:
        client = aioredis.Redis.from_url(django_settings.REDIS_URL)
        try:
            queue = Queue(client, prefix=redis_prefix, shards=SHARDS)
            tenants = tenants_in_distinct_shards(SHARDS)
            await queue.enqueue(entry(t, f"{t}-j") for t in tenants)
            ids = parse_claim(await queue.claim(worker="w1", count=10)).job_ids
            released = await queue.release(worker="w1", job_ids=ids)
            return ids, released
        finally:
            await client.aclose()

    ids, released = asyncio.run(run())
    assert len(ids) == SHARDS
    assert released == SHARDS
