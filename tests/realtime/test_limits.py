"""What one tenant may take from the realtime path: open sockets per key and per tenant (over
every API process), rows replayed per second; and counts that a killed consumer does not leak.
Real Channels consumers, real Redis, real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
import redis
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from jobs.models import Job, JobStatus, Tenant
from jobs.queue import Queue
from jobs.services import api_key_create
from realtime.hub import get_hub
from realtime.limits import PROCESS_TTL_S, Presence
from tests.support.websocket import (
    ALLOWED_ORIGIN,
    RECEIVE_TIMEOUT,
    assert_alive,
    communicator,
    open_ws,
    receive,
    subscribe,
)

pytestmark = pytest.mark.django_db(transaction=True)


def set_jobs(settings: Any, **values: Any) -> None:
    settings.JOBS = {**settings.JOBS, **values}


async def refused_for_too_many(token: str) -> dict[str, Any]:
    """Connect and expect the cap's ERROR then a 4029 close; returns the ERROR."""
    comm = communicator(token=token)
    try:
        connected, _ = await comm.connect(timeout=RECEIVE_TIMEOUT)
        assert connected
        error = await receive(comm)
        closed = await comm.receive_output(timeout=RECEIVE_TIMEOUT)
        assert closed == {"type": "websocket.close", "code": 4029, "reason": error["message"]}
        return error
    finally:
        await comm.disconnect()


@asynccontextmanager
async def sockets(token: str, count: int) -> AsyncIterator[list[WebsocketCommunicator]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_ws(token=token)) for _ in range(count)]


def redis_open(redis_client: redis.Redis, prefix: str) -> int:
    """The deployment's open sockets as /metrics reports them."""
    return Queue(redis_client, prefix=prefix).open_sockets()


# --- socket caps ----------------------------------------------------------------------------
async def test_sockets_per_key_are_capped_and_a_closed_one_frees_its_place(
    settings: Any, tenant: Tenant, api_key: str
) -> None:
    set_jobs(settings, WS_MAX_PER_KEY=3, WS_MAX_PER_TENANT=0)
    async with sockets(api_key, 3) as open_ones:
        error = await refused_for_too_many(api_key)
        assert error == {
            "type": "ERROR",
            "code": "TOO_MANY_CONNECTIONS",
            "message": "too many open connections for this API key (at most 3)",
        }
        # The sockets already open keep working.
        await subscribe(open_ones[0], tenant.id)
        await assert_alive(open_ones[2])
        # Another key of the same tenant has its own allowance.
        _, other_key = await database_sync_to_async(api_key_create)(tenant=tenant, name="second")
        async with open_ws(token=other_key):
            pass
        await open_ones[1].disconnect()
        # The close is counted in a task of its own: the place frees within moments.
        for _ in range(50):
            comm = communicator(token=api_key)
            await comm.connect(timeout=RECEIVE_TIMEOUT)
            hello = await receive(comm)
            await comm.disconnect()
            if hello["type"] == "CONNECTED":
                break
            await asyncio.sleep(0.05)
        assert hello["type"] == "CONNECTED"


async def test_sockets_per_tenant_are_capped_over_all_its_keys_and_others_unaffected(
    settings: Any, tenant: Tenant, api_key: str, other_api_key: str
) -> None:
    set_jobs(settings, WS_MAX_PER_KEY=0, WS_MAX_PER_TENANT=4)
    _, second_key = await database_sync_to_async(api_key_create)(tenant=tenant, name="second")
    async with sockets(api_key, 2), sockets(second_key, 2):
        error = await refused_for_too_many(second_key)
        assert error["message"] == "too many open connections for this tenant (at most 4)"
        # Another tenant is not affected by this one's sockets.
        async with sockets(other_api_key, 4):
            pass


async def test_caps_count_the_sockets_of_every_api_process(
    settings: Any, tenant: Tenant, api_key: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    set_jobs(settings, WS_MAX_PER_KEY=0, WS_MAX_PER_TENANT=3)
    # Another API process holds two of the tenant's sockets (its mirror in Redis), and a third
    # process died holding many: its counts expired with it and no longer count.
    now_ms = int(timezone.now().timestamp() * 1000)
    redis_client.zadd(f"{redis_prefix}:ws:procs", {"api-2": now_ms + 60_000, "dead": now_ms - 1})
    redis_client.hset(f"{redis_prefix}:ws:proc:api-2", mapping={"total": 2, "t:tenant-1": 2})
    redis_client.hset(f"{redis_prefix}:ws:proc:dead", mapping={"total": 90, "t:tenant-1": 90})
    async with open_ws(token=api_key):
        await refused_for_too_many(api_key)
        assert redis_open(redis_client, redis_prefix) == 3
    assert not redis_client.exists(f"{redis_prefix}:ws:proc:dead")


async def test_staff_sockets_are_counted_but_not_capped(
    settings: Any,
    tenant: Tenant,
    staff_cookie: tuple[bytes, bytes],
    redis_client: redis.Redis,
    redis_prefix: str,
) -> None:
    set_jobs(settings, WS_MAX_PER_KEY=1, WS_MAX_PER_TENANT=1)
    headers = [staff_cookie, (b"origin", ALLOWED_ORIGIN)]
    async with open_ws(headers=headers), open_ws(headers=headers):
        assert redis_open(redis_client, redis_prefix) == 2


# --- counts that do not leak ----------------------------------------------------------------
async def test_a_killed_consumer_is_no_longer_counted_nor_delivered_to(
    tenant: Tenant, api_key: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The server cancels a consumer's task when it does not stop in time after its client
    went away (Daphne's application_close_timeout): no disconnect handler runs then."""
    comms = [communicator(token=api_key) for _ in range(5)]
    for comm in comms:
        assert (await comm.connect(timeout=RECEIVE_TIMEOUT))[0]
        assert (await receive(comm))["type"] == "CONNECTED"
        await subscribe(comm, tenant.id)
    assert redis_open(redis_client, redis_prefix) == 5
    hub = get_hub()
    assert hub.listener_count(tenant.id) == 5

    for comm in comms:
        comm.future.cancel()
    await asyncio.gather(*(c.future for c in comms), return_exceptions=True)

    for _ in range(50):
        if redis_open(redis_client, redis_prefix) == 0:
            break
        await asyncio.sleep(0.05)
    assert redis_open(redis_client, redis_prefix) == 0
    assert hub.attached(Presence).open == 0
    assert hub.listener_count(tenant.id) == 0


async def test_counts_of_a_process_are_rewritten_from_memory_and_expire_with_it(
    tenant: Tenant, api_key: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    async with open_ws(token=api_key), open_ws(token=api_key):
        presence = get_hub().attached(Presence)
        own = f"{redis_prefix}:ws:proc:{presence.process}"
        # Drift (a lost release, an operator's edit) is undone by the next sync.
        redis_client.hset(own, mapping={"total": 40, "t:tenant-1": 40})
        await presence.sync()
        assert redis_open(redis_client, redis_prefix) == 2
        assert 0 < redis_client.pttl(own) <= PROCESS_TTL_S * 1000
    # The last socket closed: the process's counts go (the hub's close removes them too).
    await get_hub().attached(Presence).sync()
    assert redis_open(redis_client, redis_prefix) == 0
    assert not redis_client.exists(own)


# --- replay budget --------------------------------------------------------------------------
async def make_jobs(tenant: Tenant, count: int) -> None:
    start = timezone.now() - timedelta(minutes=5)

    def insert() -> None:
        Job.objects.bulk_create(
            Job(
                tenant=tenant,
                type="sleep",
                payload={"delayMs": 0},
                status=JobStatus.COMPLETED,
                run_at=start,
                created_at=start,
                updated_at=start + timedelta(milliseconds=i),
            )
            for i in range(count)
        )

    await database_sync_to_async(insert)()


async def replay(
    comm: WebsocketCommunicator, tenant_id: str, since: str, frames: int
) -> list[dict[str, Any]]:
    """SUBSCRIBE with `since` and read `frames` frames."""
    await subscribe(comm, tenant_id, since=since)
    return [await receive(comm) for _ in range(frames)]


async def test_replays_are_budgeted_per_tenant_and_others_keep_theirs(
    settings: Any, tenant: Tenant, other_tenant: Tenant, api_key: str, other_api_key: str
) -> None:
    # One row a second, in a bucket of one full replay (100 rows).
    set_jobs(settings, SINCE_REPLAY_LIMIT=100, WS_REPLAY_ROWS_PER_S=1)
    await make_jobs(tenant, 60)
    await make_jobs(other_tenant, 60)
    since = (timezone.now() - timedelta(hours=1)).isoformat()

    async with open_ws(token=api_key) as first, open_ws(token=api_key) as second:
        # The first replay takes 60 of the 100 rows; the next gets the 40 left, and is told
        # where to resume.
        assert {f["type"] for f in await replay(first, tenant.id, since, 60)} == {"JOB_UPDATE"}
        *updates, truncated = await replay(second, tenant.id, since, 41)
        assert {f["type"] for f in updates} == {"JOB_UPDATE"}
        assert truncated["type"] == "ERROR"
        assert truncated["message"] == "replay truncated, resubscribe with since"
        # The budget is spent: a third replay is refused, with when to come back.
        await second.send_json_to({"type": "UNSUBSCRIBE", "tenantId": tenant.id})
        assert (await receive(second))["type"] == "UNSUBSCRIBED"
        (spent,) = await replay(second, tenant.id, since, 1)
        assert spent["type"] == "ERROR"
        assert spent["message"] == (
            "replay budget of this tenant spent, resubscribe with since later"
        )
        assert spent["since"] and 0 < spent["retryAfterMs"] <= 1000
        await assert_alive(second)

    # Another tenant's replays are untouched by the first tenant's.
    async with open_ws(token=other_api_key) as other:
        frames = await replay(other, other_tenant.id, since, 60)
        assert {f["type"] for f in frames} == {"JOB_UPDATE"}
        await assert_alive(other)
