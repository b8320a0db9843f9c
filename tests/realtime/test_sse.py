"""`GET /events` (SPEC §10) in process: config.asgi's application, the realtime hub on the real
Redis, PostgreSQL. The real server's side (curl, SIGTERM) is in tests/e2e/test_sse.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio
from channels.db import database_sync_to_async
from django.conf import settings as django_settings
from django.utils import timezone

from config.asgi import application
from jobs import cursors
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import async_queue
from jobs.services import api_key_create, api_key_revoke
from realtime.broadcast import job_update_message, update_messages
from realtime.hub import SEND_BUFFER, get_hub
from realtime.limits import Presence
from tests.support.jobs import amake_job
from tests.support.sse import Event, InProcessStream

pytestmark = pytest.mark.django_db(transaction=True)


async def write(job: Job, status: str, **changes: Any) -> Job:
    """Write a state change to the database (the database gives it its cursor)."""
    job.status = status
    job.updated_at = timezone.now()
    for name, value in changes.items():
        setattr(job, name, value)
    await job.asave()
    await database_sync_to_async(cursors.fill)([job])
    return job


async def publish(jobs: list[Job]) -> None:
    """Publish the jobs' updates as the API and the workers do (without indexing them)."""
    await async_queue().enqueue([], publish=update_messages(jobs))


async def advance(job: Job, status: str, **changes: Any) -> Job:
    """A state change written, then broadcast (as the worker does)."""
    await publish([await write(job, status, **changes)])
    return job


async def created(tenant: Tenant, **fields: Any) -> Job:
    job = await amake_job(tenant, **fields)
    await publish([job])
    return job


@asynccontextmanager
async def opened(
    key: str | None,
    *,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    status: int = 200,
) -> AsyncIterator[InProcessStream]:
    stream = InProcessStream(application, key=key, query=query, headers=headers)
    try:
        assert await stream.open() == status, (await stream.read_body())[:500]
        yield stream
    finally:
        await stream.close()


async def subscribed(stream: InProcessStream) -> Event:
    """The stream's `retry:` block, then its `subscribed` event (after any replay)."""
    events = [await stream.next_event()]
    assert events[0].retry == 1000
    while events[-1].event != "subscribed":
        events.append(await stream.next_event())
    return events[-1]


async def error_of(key: str | None, **kwargs: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    stream = InProcessStream(application, key=key, **kwargs)
    try:
        status = await stream.open()
        body = json.loads(await stream.read_body())
    finally:
        await stream.close()
    return status, body, stream.headers


async def db_frames(tenant: Tenant) -> dict[str, dict[str, Any]]:
    jobs = await database_sync_to_async(list)(Job.objects.filter(tenant=tenant))
    return {str(job.id): job_update_message(job) for job in jobs}


# --- the stream ---------------------------------------------------------------------------------
async def test_live_updates_arrive_as_job_update_events_with_their_cursor_as_id(
    api_key: str, tenant: Tenant
) -> None:
    async with opened(api_key) as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        assert stream.headers["cache-control"] == "no-cache"
        hello = await subscribed(stream)
        assert hello.json() == {"tenantId": tenant.id, "cursor": hello.id}
        job = await created(tenant)
        pending = await stream.next_event()
        assert pending.event == "job_update"
        assert pending.json() == job_update_message(job)
        await advance(job, JobStatus.RUNNING, attempts=1)
        running = await stream.next_event()
        assert running.json() == job_update_message(job)
        assert running.json()["status"] == "RUNNING"
        assert running.id == running.json()["cursor"] == str(job.cursor)
        assert int(hello.id) < int(pending.id) < int(running.id)


async def test_changes_faster_than_a_read_arrive_as_the_latest_state(
    api_key: str, tenant: Tenant
) -> None:
    # An event is a job's state after a change, read from the database: changes of one job that
    # come faster than the stream reads may arrive as the latest of them, never out of order.
    async with opened(api_key) as stream:
        await subscribed(stream)
        job = await amake_job(tenant)
        await write(job, JobStatus.RUNNING, attempts=1)
        await advance(job, JobStatus.COMPLETED, result={"sleptMs": 0})
        final = await stream.next_event()
        assert final.json() == job_update_message(job)
        await stream.assert_nothing()


async def test_other_tenants_updates_never_arrive(
    api_key: str, tenant: Tenant, other_tenant: Tenant
) -> None:
    async with opened(api_key) as stream:
        await subscribed(stream)
        await created(other_tenant)
        own = await created(tenant)
        assert (await stream.next_event()).json()["jobId"] == str(own.id)
        await stream.assert_nothing()


async def test_resume_with_last_event_id_sends_exactly_the_missed_changes(
    api_key: str, tenant: Tenant
) -> None:
    async with opened(api_key) as stream:
        await subscribed(stream)
        seen = await created(tenant)
        last = await stream.next_event()
        assert last.json()["jobId"] == str(seen.id)
    # Disconnected: one job changes twice, another is created, the one seen changes once.
    missed = await amake_job(tenant)
    await write(missed, JobStatus.RUNNING, attempts=1)
    other = await amake_job(tenant)
    await write(missed, JobStatus.COMPLETED, result={"ok": True})
    await write(seen, JobStatus.CANCELLED)

    async with opened(api_key, headers={"Last-Event-ID": last.id}) as stream:
        events = [await stream.next_event() for _ in range(5)]
        assert events[0].retry == 1000
        replayed = events[1:4]
        assert [e.event for e in replayed] == ["job_update"] * 3
        # The current state of each job changed since, once, in cursor order.
        assert [e.json() for e in replayed] == [
            job_update_message(job) for job in sorted([missed, other, seen], key=by_cursor)
        ]
        assert [e.id for e in replayed] == [e.json()["cursor"] for e in replayed]
        assert events[4].event == "subscribed" and int(events[4].id) >= int(replayed[-1].id)
        await stream.assert_nothing()


def by_cursor(job: Job) -> int:
    return job.cursor or 0


async def test_cursor_query_resumes_and_the_header_wins(api_key: str, tenant: Tenant) -> None:
    first = await amake_job(tenant)
    second = await amake_job(tenant)
    query = {"cursor": str(first.cursor)}
    async with opened(api_key, query=query) as stream:
        await stream.next_event()  # retry
        assert (await stream.next_event()).json()["jobId"] == str(second.id)
        assert (await stream.next_event()).event == "subscribed"
    # Last-Event-ID (what a reconnecting EventSource sends) wins over ?cursor=, even a bad one.
    headers = {"Last-Event-ID": str(second.cursor)}
    async with opened(api_key, query={"cursor": "garbage"}, headers=headers) as stream:
        hello = await subscribed(stream)
        assert int(hello.id) >= (second.cursor or 0)
        await stream.assert_nothing()


async def test_truncated_replay_ends_with_resync_and_following_it_catches_up(
    api_key: str, tenant: Tenant, settings: Any
) -> None:
    settings.JOBS = {**settings.JOBS, "SINCE_REPLAY_LIMIT": 2}
    start = await database_sync_to_async(cursors.watermark)()
    jobs = [await amake_job(tenant) for _ in range(5)]
    state: dict[str, dict[str, Any]] = {}
    resume, streams = str(start), 0
    while True:
        streams += 1
        async with opened(api_key, headers={"Last-Event-ID": resume}) as stream:
            events = await stream_events_until(stream, {"resync", "subscribed"})
        for event in events:
            if event.event == "job_update":
                frame = event.json()
                assert frame["jobId"] not in state, "a change arrived twice"
                state[frame["jobId"]] = frame
        last = events[-1]
        if last.event == "subscribed":
            break
        assert last.json() == {
            "code": "RESYNC",
            "message": "replay truncated, reconnect with Last-Event-ID set to this cursor",
            "cursor": last.id,
        }
        assert stream.ended, "a resync ends the stream"
        resume = last.id
    assert streams == 3
    assert state == {str(job.id): job_update_message(job) for job in jobs}


async def stream_events_until(stream: InProcessStream, kinds: set[str]) -> list[Event]:
    events = [await stream.next_event()]
    while events[-1].event not in kinds:
        events.append(await stream.next_event())
    if events[-1].event == "resync":
        events.extend(await stream.events_until_end())
    return events


async def test_keep_alive_comment_when_nothing_happens(
    api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("realtime.sse.KEEPALIVE_S", 0.2)
    async with opened(api_key) as stream:
        await subscribed(stream)
        for _ in range(2):
            comment = await stream.next_event(within_s=2)
            assert comment.comments == ["keep-alive"] and comment.event is None


# --- one job ----------------------------------------------------------------------------------
async def test_job_stream_sends_that_job_only_and_ends_after_its_final_state(
    api_key: str, tenant: Tenant
) -> None:
    job = await created(tenant)
    other = await created(tenant)
    async with opened(api_key, query={"jobId": str(job.id)}) as stream:
        await stream.next_event()  # retry
        current = await stream.next_event()
        assert current.json() == job_update_message(job)
        hello = await stream.next_event()
        assert hello.event == "subscribed" and hello.json()["jobId"] == str(job.id)
        await advance(other, JobStatus.RUNNING)
        await advance(job, JobStatus.RUNNING, attempts=1)
        await advance(job, JobStatus.COMPLETED, result={"sleptMs": 0})
        events = await stream.events_until_end()
        assert events, "the stream ended without the final state"
        assert {e.json()["jobId"] for e in events} == {str(job.id)}
        assert events[-1].json() == job_update_message(job)
        assert events[-1].json()["status"] == "COMPLETED"
        final_id = events[-1].id
    # An EventSource reconnects after the end, with the last id: 204 tells it to stop.
    stream = InProcessStream(
        application, key=api_key, query={"jobId": str(job.id)}, headers={"Last-Event-ID": final_id}
    )
    try:
        assert await stream.open() == 204
    finally:
        await stream.close()


async def test_job_stream_of_a_finished_job_sends_its_state_and_ends(
    api_key: str, tenant: Tenant
) -> None:
    job = await amake_job(tenant, status=JobStatus.FAILED, attempts=3, error="boom")
    async with opened(api_key, query={"jobId": str(job.id)}) as stream:
        events = await stream.events_until_end()
    assert [e.event for e in events] == [None, "job_update"]
    assert events[1].json() == job_update_message(job)


# --- errors -------------------------------------------------------------------------------------
async def test_no_key_or_a_wrong_key_is_401(api_key: str) -> None:
    for key in (None, "jq_000000000000_" + "x" * 43):
        status, body, headers = await error_of(key)
        assert status == 401
        assert body == {"error": "Missing or invalid API key"}
        assert headers["www-authenticate"] == "Bearer"


async def test_bad_cursor_is_400_json(api_key: str) -> None:
    cases = [
        ({"query": {"cursor": "abc"}}, "cursor"),
        ({"headers": {"Last-Event-ID": "-1"}}, "Last-Event-ID"),
        ({"query": {"cursor": "9" * 30}}, "cursor"),
        # A cursor this server never gave (another deployment's).
        ({"query": {"cursor": str(2**62)}}, "cursor"),
    ]
    for kwargs, field in cases:
        status, body, headers = await error_of(api_key, **kwargs)
        assert status == 400, (kwargs, body)
        assert headers["content-type"] == "application/json"
        assert body["error"] == "Validation failed"
        assert [d["field"] for d in body["details"]] == [field]


async def test_job_id_not_of_the_tenant_is_404_and_garbage_400(
    api_key: str, other_tenant: Tenant
) -> None:
    foreign = await amake_job(other_tenant)
    status, body, _ = await error_of(api_key, query={"jobId": str(foreign.id)})
    assert (status, body) == (404, {"error": "Job not found"})
    status, body, _ = await error_of(api_key, query={"jobId": "nope"})
    assert status == 400 and body["details"] == [{"field": "jobId", "message": "must be a UUID"}]


async def test_only_get(api_key: str) -> None:
    stream = InProcessStream(application, key=api_key)
    stream.comm.scope["method"] = "POST"
    try:
        assert await stream.open() == 405
        assert json.loads(await stream.read_body())["error"] == "Method not allowed"
    finally:
        await stream.close()


# --- limits and losses ------------------------------------------------------------------------
async def test_streams_count_under_the_connection_caps(
    api_key: str, tenant: Tenant, settings: Any
) -> None:
    settings.JOBS = {**settings.JOBS, "WS_MAX_PER_KEY": 1}
    async with opened(api_key) as stream:
        await subscribed(stream)
        status, body, _ = await error_of(api_key)
        assert status == 429
        assert body == {
            "error": "too many open connections for this API key (at most 1)",
            "details": {"code": "TOO_MANY_CONNECTIONS"},
        }
    # Closed: counted no more, and the hub let the tenant's channel go.
    assert await wait_for(lambda: get_hub().attached(Presence).open == 0)
    assert get_hub().listener_count(tenant.id) == 0
    async with opened(api_key) as stream:
        await subscribed(stream)


async def wait_for(predicate: Callable[[], bool], within_s: float = 5) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_change_missed_while_the_hub_was_disconnected_still_arrives(
    api_key: str, tenant: Tenant
) -> None:
    async with opened(api_key) as stream:
        await subscribed(stream)
        hub = get_hub()
        # A change whose publication never reached this process (it was written while the
        # hub's connection was down): only the database has it.
        job = await write(await amake_job(tenant), JobStatus.RUNNING)
        client = redis.asyncio.Redis.from_url(django_settings.REDIS_URL)
        try:
            generation = hub.generation
            for entry in await client.client_list():
                if entry["name"] == hub.client_name:
                    await client.client_kill_filter(_id=entry["id"])
        finally:
            await client.aclose()
        event = await stream.next_event()
        assert event.json() == job_update_message(job)
        assert hub.generation > generation
        # Live again after the reconnection.
        await advance(job, JobStatus.COMPLETED)
        assert (await stream.next_event()).json()["status"] == "COMPLETED"


async def test_revoked_key_ends_the_stream(api_key: str, tenant: Tenant) -> None:
    key_model, key = await database_sync_to_async(api_key_create)(tenant=tenant)
    async with opened(key) as stream:
        await subscribed(stream)
        await database_sync_to_async(api_key_revoke)(prefix=key_model.prefix)
        events = await stream.events_until_end()
    assert [e.event for e in events] == ["closed"]
    assert events[0].json()["code"] == "CREDENTIALS_REVOKED"


async def test_stream_of_a_client_that_reads_slowly_waits_and_loses_nothing(
    api_key: str, tenant: Tenant, settings: Any
) -> None:
    settings.JOBS = {**settings.JOBS, "WS_SEND_BUFFER_BYTES": 4096}
    # What our server tells the application about the connection (config/daphne_server.py):
    # here, a client that has 1 MB it has not read.
    unread = {"bytes": 1024 * 1024}
    stream = InProcessStream(application, key=api_key)
    stream.comm.scope["extensions"] = {SEND_BUFFER: {"pending": lambda: unread["bytes"]}}
    try:
        assert await stream.open() == 200
        await subscribed(stream)
        jobs = [await created(tenant) for _ in range(3)]
        await advance(jobs[0], JobStatus.RUNNING, attempts=1)
        await stream.assert_nothing(within_s=0.5)  # nothing more is written meanwhile

        unread["bytes"] = 1000  # the client read (below half the limit)
        events = [await stream.next_event() for _ in range(3)]
        assert [e.json() for e in events] == [
            job_update_message(job) for job in sorted(jobs, key=by_cursor)
        ]
        await stream.assert_nothing()
    finally:
        await stream.close()
