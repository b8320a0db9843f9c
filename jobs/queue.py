"""The Redis side of the queue: a fast, rebuildable index of what is runnable.

PostgreSQL is the source of truth; everything here can be lost and rebuilt by reconciliation.
Key layout (P is `JOBS_REDIS_PREFIX`), documented in docs/architecture.md:

    P:ready:{tenant}      ZSET  job id -> ready score (priority band, then enqueue time: FIFO)
    P:tenants             LIST  ring of tenants that have ready jobs (round robin)
    P:active              SET   tenants currently in the ring (each at most once)
    P:delayed             ZSET  "{tenant}|{ready score}|{job id}" -> due time (ms)
    P:processing:{worker} HASH  job id -> "{tenant}|{ready score}" claimed by that worker
    P:running             HASH  tenant -> jobs claimed and not yet released (all workers)
    P:limits              HASH  tenant -> concurrency limit (absent: unlimited)
    P:workers             ZSET  worker name -> last heartbeat (ms)
    P:slots               HASH  worker name -> its concurrency (the cluster's slots: their sum)
    P:slots:total         STRING the sum, cached by the claim script for one second
    P:wake                LIST  wake-up tokens for idle workers (BLPOP)
    P:cancel              pub/sub channel: ids of RUNNING jobs to cancel
    P:lock:{name}         STRING short-lived locks (reconciliation)
    P:rate:{tenant}       STRING rate limit state (GCRA arrival time), expires when idle

Every method returns what the redis client returns: a value for `redis.Redis`, an awaitable for
`redis.asyncio.Redis`, so the API (sync) and the worker (async) share one implementation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings

from jobs.models import PRIORITY_MAX, PRIORITY_MIN, Job

LUA_DIR = Path(__file__).with_name("lua")
# Ready scores order a tenant's jobs by priority band, then by creation time in microseconds
# since SCORE_EPOCH. 21 bands x 4e14 us stays below 2**53, exact in a Redis double, until 2036.
SCORE_EPOCH_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
SCORE_BAND_US = 400_000_000_000_000
WAKE_TOKENS_MAX = 256


def ready_score(*, priority: int, created_at: datetime) -> int:
    """Lower runs first: higher priority, then older job (FIFO within a priority)."""
    priority = max(PRIORITY_MIN, min(PRIORITY_MAX, priority))
    created_us = int(created_at.timestamp() * 1_000_000) - SCORE_EPOCH_US
    return (PRIORITY_MAX - priority) * SCORE_BAND_US + max(0, min(created_us, SCORE_BAND_US - 1))


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """What Redis needs to know of a runnable job."""

    tenant: str
    job_id: str
    score: int
    run_at_ms: int


def entry_for(job: Job) -> QueueEntry:
    """The queue entry of a job row (its ready score and due time)."""
    return QueueEntry(
        tenant=job.tenant_id,
        job_id=str(job.id),
        score=ready_score(priority=job.priority, created_at=job.created_at),
        run_at_ms=int(job.run_at.timestamp() * 1000),
    )


@dataclass(frozen=True, slots=True)
class Claimed:
    """Ids a worker took from the ready sets, and when the next delayed job is due."""

    job_ids: list[str]
    next_due_ms: int | None


@cache
def _lua(name: str) -> str:
    """A script's source with the shared helpers of `_common.lua` in front."""
    return (LUA_DIR / "_common.lua").read_text() + "\n" + (LUA_DIR / f"{name}.lua").read_text()


class Queue:
    """Operations on the Redis index, each one atomic (a Lua script or a single command)."""

    def __init__(self, client: redis.Redis | aioredis.Redis, prefix: str | None = None) -> None:
        self.client = client
        self.prefix = prefix or settings.JOBS["REDIS_PREFIX"]
        self.fair_share: float = settings.JOBS["TENANT_FAIR_SHARE"]
        self.fair_share_reserve: int = settings.JOBS["TENANT_FAIR_SHARE_RESERVE"]
        self._enqueue = client.register_script(_lua("enqueue"))
        self._claim = client.register_script(_lua("claim"))
        self._release = client.register_script(_lua("release"))
        self._requeue = client.register_script(_lua("requeue"))
        self._remove = client.register_script(_lua("remove"))
        self._rate_limit = client.register_script(_lua("rate_limit"))

    # --- keys ---------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def wake_key(self) -> str:
        return self.key("wake")

    @property
    def cancel_channel(self) -> str:
        return self.key("cancel")

    @property
    def workers_key(self) -> str:
        return self.key("workers")

    @property
    def slots_key(self) -> str:
        return self.key("slots")

    # --- producers ----------------------------------------------------------------------------
    def enqueue(
        self,
        entries: Iterable[QueueEntry],
        *,
        publish: Iterable[tuple[str, str]] = (),
        counters: Iterable[tuple[str, str, int]] = (),
    ) -> Any:
        """Index jobs (due ones into their tenant's ready set, later ones into the delayed set),
        then PUBLISH each (channel, message) and add each (key, field, amount): one atomic call."""
        args: list[str | int] = [self.prefix, WAKE_TOKENS_MAX, 0]
        for entry in entries:
            args.extend((entry.tenant, entry.job_id, entry.score, entry.run_at_ms))
        args[2] = (len(args) - 3) // 4
        publishes = list(publish)
        args.append(len(publishes))
        for channel, message in publishes:
            args.extend((channel, message))
        for key, field, amount in counters:
            args.extend((key, field, amount))
        return self._enqueue(keys=[], args=args)

    def remove(self, entries: Iterable[QueueEntry]) -> Any:
        """Take jobs out of the ready and delayed sets (a cancelled job never runs)."""
        args: list[str | int] = [self.prefix]
        for entry in entries:
            args.extend((entry.tenant, entry.job_id, entry.score))
        return self._remove(keys=[], args=args)

    def rate_limit(self, *, tenant: str, rate: int, burst: int, cost: int) -> Any:
        """GCRA for job creation: returns [allowed (1/0), ms until `cost` would be allowed]."""
        return self._rate_limit(keys=[], args=[self.prefix, tenant, rate, burst, cost])

    def publish_cancel(self, job_id: str) -> Any:
        return self.client.publish(self.cancel_channel, job_id)

    def set_tenant_limit(self, tenant: str, limit: int | None) -> Any:
        if limit is None:
            return self.client.hdel(self.key("limits"), tenant)
        return self.client.hset(self.key("limits"), tenant, limit)

    def replace_tenant_limits(self, limits: dict[str, int]) -> Any:
        """Make the limits hash equal to `limits` (tenant -> max jobs running), atomically."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.key("limits"))
        if limits:
            pipe.hset(self.key("limits"), mapping=limits)
        return pipe.execute()

    # --- workers ------------------------------------------------------------------------------
    def beat(self, *, worker: str, slots: int) -> Any:
        """Mark a worker alive now with its concurrency (its part of the cluster's slots, which
        fair shares are taken of), and keep its claims from expiring: one round trip."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self.workers_key, {worker: int(time.time() * 1000)})
        pipe.hset(self.slots_key, worker, slots)
        pipe.expire(self.key("processing", worker), 86400)
        return pipe.execute()

    def claim(self, *, worker: str, count: int) -> Any:
        """Take up to `count` ids, one tenant per turn round robin, a tenant over its fair share
        only when no other tenant yields a job; due delayed jobs first move."""
        return self._claim(
            keys=[],
            args=[
                self.prefix,
                worker,
                count,
                WAKE_TOKENS_MAX,
                self.fair_share,
                self.fair_share_reserve,
            ],
        )

    def release(self, *, worker: str, job_ids: Iterable[str]) -> Any:
        """Forget ids a worker has finished with (or failed to claim in the database)."""
        return self._release(keys=[], args=[self.prefix, worker, *job_ids])

    def requeue(self, *, worker: str, job_ids: Iterable[str] | None = None) -> Any:
        """Put a worker's claimed ids back in the ready sets: all of them if `job_ids` is None."""
        ids = list(job_ids) if job_ids is not None else []
        return self._requeue(
            keys=[], args=[self.prefix, worker, "all" if job_ids is None else "some", *ids]
        )


def parse_claim(raw: list[Any]) -> Claimed:
    ids, next_due = raw
    return Claimed(
        job_ids=[i.decode() if isinstance(i, bytes) else str(i) for i in ids],
        next_due_ms=int(next_due) if next_due not in (None, b"", "", False, -1, b"-1") else None,
    )


@cache
def sync_client() -> redis.Redis:
    """The API process's Redis client (a connection pool shared by its threads)."""
    return redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30
    )


def sync_queue() -> Queue:
    return Queue(sync_client())


_async_queues: dict[asyncio.AbstractEventLoop, Queue] = {}


def async_queue() -> Queue:
    """The running event loop's queue on redis-py's asyncio client (the API's hot paths)."""
    loop = asyncio.get_running_loop()
    queue = _async_queues.get(loop)
    if queue is None or queue.prefix != settings.JOBS["REDIS_PREFIX"]:
        for old in [key for key in _async_queues if key.is_closed()]:
            del _async_queues[old]
        client = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30
        )
        queue = _async_queues[loop] = Queue(client)
    return queue


async def close_async_queue() -> None:
    """Close the running loop's client, if any (tests, which run one loop per test)."""
    queue = _async_queues.pop(asyncio.get_running_loop(), None)
    if queue is not None:
        await queue.client.aclose()
