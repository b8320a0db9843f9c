"""SPEC §5 over a real socket stack: config.asgi, the realtime hub on Redis, PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis.asyncio
from channels.db import database_sync_to_async
from django.conf import settings as django_settings
from django.utils import timezone

from jobs import cursors
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import async_queue
from realtime.broadcast import iso, job_update_message, update_messages
from realtime.consumers import REPLAY_TRUNCATED, UPDATES_DROPPED, JobUpdatesConsumer
from realtime.hub import get_hub, updates_channel
from tests.support.jobs import amake_job
from tests.support.websocket import (
    ALLOWED_ORIGIN,
    RECEIVE_TIMEOUT,
    ReplayGate,
    assert_alive,
    open_ws,
    receive,
    subscribe,
)

pytestmark = pytest.mark.django_db(transaction=True)

JOB_UPDATE_FIELDS = {
    "type",
    "tenantId",
    "jobId",
    "status",
    "attempts",
    "error",
    "result",
    "updatedAt",
    "cursor",
}


async def advance(job: Job, status: str, **changes: Any) -> Job:
    """Write a state change to the database, then broadcast it (as the worker does)."""
    job.status = status
    job.updated_at = timezone.now()
    for name, value in changes.items():
        setattr(job, name, value)
    await job.asave()
    await database_sync_to_async(cursors.fill)([job])  # as the service's writes return it
    await publish([job])
    return job


async def publish(jobs: list[Job]) -> None:
    """Publish the jobs' updates as the API and the workers do (without indexing them)."""
    await async_queue().enqueue([], publish=update_messages(jobs))


async def create_and_broadcast(tenant: Tenant) -> Job:
    job = await amake_job(tenant)
    await publish([job])
    return job


async def expect_error(comm: Any, message: dict[str, Any] | str, contains: str) -> None:
    if isinstance(message, str):
        await comm.send_to(text_data=message)
    else:
        await comm.send_json_to(message)
    answer = await receive(comm)
    assert answer["type"] == "ERROR", answer
    assert contains in answer["message"]
    await assert_alive(comm)


# --- subscribing ----------------------------------------------------------------------------
async def test_subscribe_own_tenant(api_key: str) -> None:
    async with open_ws(token=api_key) as comm:
        before = timezone.now()
        answer = await subscribe(comm, "tenant-1")
        server_time = datetime.fromisoformat(answer["serverTime"])
        assert answer["serverTime"].endswith("Z")
        assert before <= server_time <= timezone.now()


async def test_subscribe_other_tenant_is_an_error_and_socket_stays_open(
    api_key: str, other_tenant: Tenant
) -> None:
    async with open_ws(token=api_key) as comm:
        await expect_error(comm, {"type": "SUBSCRIBE", "tenantId": "tenant-2"}, "not allowed")
        # A tenant that does not exist gets the same answer: a key learns nothing of others.
        await expect_error(comm, {"type": "SUBSCRIBE", "tenantId": "nobody"}, "not allowed")


async def test_resubscribe_is_idempotent(api_key: str, tenant: Tenant) -> None:
    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1")
        await subscribe(comm, "tenant-1")
        job = await create_and_broadcast(tenant)
        frame = await receive(comm)
        assert frame["jobId"] == str(job.id)
        # One group membership, so one copy of the update.
        assert await comm.receive_nothing(timeout=0.3)


# --- live updates ---------------------------------------------------------------------------
async def test_job_update_arrives_with_all_fields(api_key: str, tenant: Tenant) -> None:
    job = await amake_job(tenant)
    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1")
        await advance(job, JobStatus.COMPLETED, attempts=1, result={"sleptMs": 0}, error=None)
        frame = await receive(comm)
        assert frame.keys() >= JOB_UPDATE_FIELDS
        assert frame == {
            "type": "JOB_UPDATE",
            "tenantId": "tenant-1",
            "jobId": str(job.id),
            "jobType": "sleep",
            "status": "COMPLETED",
            "attempts": 1,
            "error": None,
            "result": {"sleptMs": 0},
            "progress": None,
            "progressMessage": None,
            "updatedAt": iso(job.updated_at),
            "cursor": str(job.cursor),
        }


async def test_other_tenants_updates_never_arrive(
    api_key: str, tenant: Tenant, other_tenant: Tenant
) -> None:
    foreign = await amake_job(other_tenant)
    own = await amake_job(tenant)
    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1")
        await advance(foreign, JobStatus.RUNNING)
        await advance(own, JobStatus.RUNNING)
        # The own update was sent after the foreign one; receiving it first proves the foreign
        # one was not merely late.
        frame = await receive(comm)
        assert frame["jobId"] == str(own.id)
        assert await comm.receive_nothing(timeout=0.3)


async def test_updates_of_one_job_keep_their_order(api_key: str, tenant: Tenant) -> None:
    job = await amake_job(tenant)
    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1")
        await advance(job, JobStatus.RUNNING, attempts=1)
        await advance(job, JobStatus.PENDING, error="boom")
        await advance(job, JobStatus.RUNNING, attempts=2)
        await advance(job, JobStatus.COMPLETED, result={"ok": True})
        frames = [await receive(comm) for _ in range(4)]
        assert [(f["status"], f["attempts"]) for f in frames] == [
            ("RUNNING", 1),
            ("PENDING", 1),
            ("RUNNING", 2),
            ("COMPLETED", 2),
        ]
        assert frames[1]["error"] == "boom"


async def test_unsubscribe_stops_updates(api_key: str, tenant: Tenant) -> None:
    job = await amake_job(tenant)
    async with open_ws(token=api_key) as leaver, open_ws(token=api_key) as stayer:
        await subscribe(leaver, "tenant-1")
        await subscribe(stayer, "tenant-1")
        await leaver.send_json_to({"type": "UNSUBSCRIBE", "tenantId": "tenant-1"})
        assert await receive(leaver) == {"type": "UNSUBSCRIBED", "tenantId": "tenant-1"}

        await advance(job, JobStatus.RUNNING)
        # Delivered to the group (the stayer has it), not to the socket that left.
        assert (await receive(stayer))["jobId"] == str(job.id)
        assert await leaver.receive_nothing(timeout=0.3)
        await expect_error(
            leaver, {"type": "UNSUBSCRIBE", "tenantId": "tenant-1"}, "not subscribed"
        )


async def test_staff_receives_updates_of_every_subscribed_tenant(
    tenant: Tenant, other_tenant: Tenant, staff_cookie: tuple[bytes, bytes]
) -> None:
    first, second = await amake_job(tenant), await amake_job(other_tenant)
    async with open_ws(headers=[staff_cookie, (b"origin", ALLOWED_ORIGIN)]) as comm:
        await subscribe(comm, "tenant-1")
        await subscribe(comm, "tenant-2")
        await advance(first, JobStatus.RUNNING)
        await advance(second, JobStatus.RUNNING)
        frames = [await receive(comm), await receive(comm)]
        assert {(f["tenantId"], f["jobId"]) for f in frames} == {
            ("tenant-1", str(first.id)),
            ("tenant-2", str(second.id)),
        }


async def test_process_subscribes_once_per_tenant_and_leaves_with_the_last_socket(
    api_key: str, tenant: Tenant, redis_prefix: str
) -> None:
    channel = updates_channel(redis_prefix, "tenant-1")
    client = redis.asyncio.Redis.from_url(django_settings.REDIS_URL)

    async def subscribers() -> int:
        return dict(await client.pubsub_numsub(channel))[channel.encode()]

    try:
        async with open_ws(token=api_key) as first, open_ws(token=api_key) as second:
            await subscribe(first, "tenant-1")
            await subscribe(second, "tenant-1")
            # Two sockets, one Redis subscription: an update is read once by this process.
            assert await subscribers() == 1
            job = await create_and_broadcast(tenant)
            assert (await receive(first))["jobId"] == str(job.id)
            assert (await receive(second))["jobId"] == str(job.id)
            await first.disconnect()
            assert await subscribers() == 1
        # The hub unsubscribes in its own task once the last socket has gone.
        for _ in range(250):
            if await subscribers() == 0:
                break
            await asyncio.sleep(0.02)
        assert await subscribers() == 0
    finally:
        await client.aclose()


# --- since: catch-up from the database ------------------------------------------------------
async def test_since_replays_newer_jobs_oldest_first(
    api_key: str, tenant: Tenant, other_tenant: Tenant
) -> None:
    now = timezone.now()
    await amake_job(tenant, updated_at=now - timedelta(hours=2))  # before `since`
    newest = await amake_job(tenant, updated_at=now - timedelta(minutes=1))
    oldest = await amake_job(tenant, updated_at=now - timedelta(minutes=50))
    middle = await amake_job(tenant, updated_at=now - timedelta(minutes=10), status="FAILED")
    await amake_job(other_tenant, updated_at=now - timedelta(minutes=5))

    async with open_ws(token=api_key) as comm:
        # SUBSCRIBED comes first, then the replay.
        await subscribe(comm, "tenant-1", since=iso(now - timedelta(hours=1)))
        frames = [await receive(comm) for _ in range(3)]
        assert frames == [job_update_message(job) for job in (oldest, middle, newest)]
        assert await comm.receive_nothing(timeout=0.3)


async def test_since_accepts_offsets_and_rejects_garbage(api_key: str, tenant: Tenant) -> None:
    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1", since="2020-01-01T00:00:00+02:00")
        for bad in (
            "yesterday",
            "2020-13-01T00:00:00Z",
            12345,
            "",
            "0001-01-01T00:00:00+14:00",  # year 0 in UTC
            "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        ):
            await expect_error(
                comm, {"type": "SUBSCRIBE", "tenantId": "tenant-1", "since": bad}, "since"
            )


async def test_replay_is_bounded_and_says_where_to_resume(
    settings: Any, api_key: str, tenant: Tenant
) -> None:
    settings.JOBS = {**settings.JOBS, "SINCE_REPLAY_LIMIT": 2}
    now = timezone.now()
    jobs = [await amake_job(tenant, updated_at=now - timedelta(minutes=m)) for m in (3, 2, 1)]
    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1", since=iso(now - timedelta(hours=1)))
        assert [(await receive(comm))["jobId"] for _ in range(2)] == [
            str(jobs[0].id),
            str(jobs[1].id),
        ]
        notice = await receive(comm)
        assert notice["type"] == "ERROR"
        assert notice["message"] == REPLAY_TRUNCATED
        assert notice["tenantId"] == "tenant-1"

        await subscribe(comm, "tenant-1", since=notice["since"])
        # Resuming one microsecond early repeats the last replayed job rather than risk a gap.
        assert [(await receive(comm))["jobId"] for _ in range(2)] == [
            str(jobs[1].id),
            str(jobs[2].id),
        ]


async def test_live_update_older_than_the_replay_is_not_sent(
    api_key: str, tenant: Tenant, replay_gate: ReplayGate
) -> None:
    now = timezone.now()
    job = await amake_job(tenant, updated_at=now, status=JobStatus.COMPLETED)
    other = await amake_job(tenant, updated_at=now - timedelta(hours=3))
    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1", since=iso(now - timedelta(hours=1)))
        await replay_gate.wait_entered()
        # Joined, not yet read: a RUNNING broadcast delayed from before the COMPLETED write.
        stale = Job(**{f.attname: getattr(job, f.attname) for f in Job._meta.concrete_fields})
        stale.status, stale.updated_at = JobStatus.RUNNING, now - timedelta(seconds=1)
        await publish([stale])
        replay_gate.release()

        assert await receive(comm) == job_update_message(job)  # the replay
        await advance(other, JobStatus.RUNNING)
        # The stale RUNNING was queued before this update; getting this one first proves it
        # was dropped, so the job never appears to go back from COMPLETED to RUNNING.
        assert (await receive(comm))["jobId"] == str(other.id)
        assert await comm.receive_nothing(timeout=0.3)


async def test_update_committed_during_the_replay_is_not_lost(
    api_key: str, tenant: Tenant, replay_gate: ReplayGate
) -> None:
    now = timezone.now()
    job = await amake_job(tenant, updated_at=now - timedelta(minutes=5))
    replay_gate.after_read = True
    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1", since=iso(now - timedelta(hours=1)))
        await replay_gate.wait_entered()
        # The replay's snapshot is taken; this change is not in it and must arrive live.
        await advance(job, JobStatus.RUNNING, attempts=1)
        replay_gate.release()
        replayed, live = await receive(comm), await receive(comm)
        assert (replayed["jobId"], replayed["status"]) == (str(job.id), "PENDING")
        assert live == job_update_message(job)


async def test_overflowing_client_is_told_updates_were_dropped(
    monkeypatch: pytest.MonkeyPatch, api_key: str, tenant: Tenant, replay_gate: ReplayGate
) -> None:
    monkeypatch.setattr("realtime.consumers.LIVE_BUFFER_MAX", 5)
    job = await amake_job(tenant)
    async with open_ws(token=api_key) as slow, open_ws(token=api_key) as fast:
        await subscribe(fast, "tenant-1")
        subscribed = await subscribe(slow, "tenant-1", since=iso(timezone.now()))
        await replay_gate.wait_entered()
        # `slow` is stuck in its replay and holds live updates meanwhile, at most 5; `fast`
        # gets every one as it happens.
        for attempt in range(1, 21):
            job.attempts, job.updated_at = attempt, timezone.now()
            await publish([job])
            assert (await receive(fast))["attempts"] == attempt
        replay_gate.release()

        frames = []
        while not await slow.receive_nothing(timeout=0.3):
            frames.append(await receive(slow))
        assert frames[0] == {
            "type": "ERROR",
            "message": UPDATES_DROPPED,
            "code": "RESYNC",
            "tenantId": "tenant-1",
            "cursor": subscribed["cursor"],
        }
        updates = [f["attempts"] for f in frames if f["type"] == "JOB_UPDATE"]
        assert updates == [16, 17, 18, 19, 20]
        await assert_alive(slow)
    assert not [f for f in frames if f.get("message") == UPDATES_DROPPED][1:]


async def test_lost_redis_connection_tells_subscribers_and_they_keep_receiving(
    api_key: str, tenant: Tenant, redis_prefix: str
) -> None:
    async with open_ws(token=api_key) as comm:
        subscribed = await subscribe(comm, "tenant-1")
        client = redis.asyncio.Redis.from_url(django_settings.REDIS_URL)
        try:
            # Kill this process's pub/sub connection, as a Redis restart or a network blip would.
            name = get_hub().client_name
            clients = await client.client_list(_type="pubsub")
            ids = [c["id"] for c in clients if c["name"] == name]
            assert len(ids) == 1, clients
            await client.client_kill_filter(_id=ids[0])
        finally:
            await client.aclose()
        assert await receive(comm) == {
            "type": "ERROR",
            "message": UPDATES_DROPPED,
            "code": "RESYNC",
            "tenantId": "tenant-1",
            "cursor": subscribed["cursor"],
        }
        assert subscribed["cursor"].isdigit()
        await assert_alive(comm)
        # The hub resubscribed: updates flow again on the same socket.
        deadline = asyncio.get_running_loop().time() + RECEIVE_TIMEOUT
        while True:
            job = await create_and_broadcast(tenant)
            if not await comm.receive_nothing(timeout=0.2):
                assert (await receive(comm))["jobId"] == str(job.id)
                break
            assert asyncio.get_running_loop().time() < deadline, "no update after reconnecting"


# --- bad input and abuse --------------------------------------------------------------------
async def test_bad_messages_are_errors_and_the_socket_stays_open(api_key: str) -> None:
    async with open_ws(token=api_key) as comm:
        await expect_error(comm, "{not json", "invalid JSON")
        await expect_error(comm, "[" * 10_000 + "]" * 10_000, "invalid JSON")
        await expect_error(comm, json.dumps([1, 2]), "JSON object")
        await expect_error(comm, json.dumps("PING"), "JSON object")
        await expect_error(comm, {"tenantId": "tenant-1"}, 'missing "type"')
        await expect_error(comm, {"type": 7}, '"type" must be a string')
        await expect_error(comm, {"type": "DANCE"}, "unknown message type")
        await expect_error(comm, {"type": "SUBSCRIBE"}, 'missing "tenantId"')
        await expect_error(comm, {"type": "SUBSCRIBE", "tenantId": 1}, "must be a string")
        await expect_error(comm, {"type": "SUBSCRIBE", "tenantId": "a b"}, "not a valid")
        await expect_error(comm, {"type": "UNSUBSCRIBE"}, 'missing "tenantId"')
        await comm.send_to(bytes_data=b'{"type": "PING"}')
        assert "binary" in (await receive(comm))["message"]
        await assert_alive(comm)


async def test_oversized_message_closes_the_socket(api_key: str) -> None:
    async with open_ws(token=api_key) as comm:
        big = json.dumps({"type": "PING", "pad": "x" * JobUpdatesConsumer.max_message_bytes})
        await comm.send_to(text_data=big)
        assert await comm.receive_output(timeout=5) == {
            "type": "websocket.close",
            "code": 4009,
            "reason": "message too big",
        }


async def test_message_flood_closes_the_socket(api_key: str) -> None:
    async with open_ws(token=api_key) as comm:
        for _ in range(JobUpdatesConsumer.rate_burst + 50):
            await comm.send_json_to({"type": "PING"})
        pongs = 0
        while (output := await comm.receive_output(timeout=5))["type"] == "websocket.send":
            pongs += 1
        assert output == {
            "type": "websocket.close",
            "code": 4008,
            "reason": "too many messages",
        }
        assert JobUpdatesConsumer.rate_burst <= pongs < JobUpdatesConsumer.rate_burst + 50


async def test_subscription_limit(
    monkeypatch: pytest.MonkeyPatch,
    tenant: Tenant,
    other_tenant: Tenant,
    staff_cookie: tuple[bytes, bytes],
) -> None:
    monkeypatch.setattr(JobUpdatesConsumer, "max_subscriptions", 1)
    async with open_ws(headers=[staff_cookie, (b"origin", ALLOWED_ORIGIN)]) as comm:
        await subscribe(comm, "tenant-1")
        await subscribe(comm, "tenant-1")  # the same tenant again does not count twice
        await expect_error(
            comm, {"type": "SUBSCRIBE", "tenantId": "tenant-2"}, "too many subscriptions"
        )


async def test_revoked_key_stops_an_open_socket(
    api_key: str, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.services import api_key_revoke

    async with open_ws(token=api_key) as comm:
        await subscribe(comm, "tenant-1")
        first = await create_and_broadcast(tenant)
        assert (await receive(comm))["jobId"] == str(first.id)
        # The revocation is announced on Redis; the socket is re-checked and closed at once,
        # without waiting for an update.
        await database_sync_to_async(api_key_revoke)(prefix=api_key.split("_")[1])
        closed = await comm.receive_output(timeout=2)
        assert closed["type"] == "websocket.close" and closed["code"] == 4001
