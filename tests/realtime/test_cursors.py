"""Cursors (SPEC §10): every change gets one, in the order changes are committed; SUBSCRIBE with a
cursor replays exactly what changed after it; a commit that comes late is waited for, never
skipped. In process, on the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.utils import timezone

from jobs import cursors
from jobs.lifecycle import Outcome, RetryPolicy
from jobs.models import Job, JobStatus, Tenant
from jobs.services import JobSpec, job_cancel, job_enqueue
from jobs.store import claim_jobs, write_outcomes
from realtime.consumers import RESYNC
from tests.support.websocket import open_ws, receive

pytestmark = pytest.mark.django_db(transaction=True)
SLEEP = JobSpec(type="sleep", payload={"delayMs": 0})


def enqueue(tenant: Tenant) -> Job:
    return job_enqueue(tenant=tenant, spec=SLEEP)[0]


def complete(job: Job) -> Job:
    [claimed] = claim_jobs(job_ids=[str(job.id)], worker="w")
    policy = RetryPolicy(base_ms=1, max_ms=1)
    [done] = write_outcomes(
        planned=[(claimed, policy.after_attempt(claimed, Outcome(result=1), timezone.now()))]
    )
    assert done is not None
    return done


def stored_cursor(job: Job) -> int:
    return Job.objects.get(id=job.id).cursor


async def subscribe_from(comm: Any, cursor: str | int) -> tuple[list[dict], dict]:
    """SUBSCRIBE with a cursor: the replayed frames, then the SUBSCRIBED answer."""
    await comm.send_json_to({"type": "SUBSCRIBE", "tenantId": "tenant-1", "cursor": str(cursor)})
    frames = []
    while True:
        frame = await receive(comm)
        if frame["type"] == "SUBSCRIBED":
            return frames, frame
        assert frame["type"] == "JOB_UPDATE", frame
        frames.append(frame)


def test_every_change_gets_a_greater_cursor_and_the_write_returns_it(tenant: Tenant) -> None:
    job = enqueue(tenant)
    created = job.cursor
    assert created == stored_cursor(job)
    [claimed] = claim_jobs(job_ids=[str(job.id)], worker="w")
    assert claimed.cursor == stored_cursor(job) > created
    done = complete(enqueue(tenant))
    assert done.cursor == stored_cursor(done) > claimed.cursor
    # A lease renewal is not a change a subscriber sees: no new cursor.
    before = stored_cursor(job)
    Job.objects.filter(id=job.id).update(lease_expires_at=timezone.now())
    assert stored_cursor(job) == before
    cancelled = job_cancel(tenant=tenant, job_id=job.id)
    assert cancelled.cursor == stored_cursor(job) > before


def test_the_rest_api_shows_the_cursor(client: Any, api_key: str, tenant: Tenant) -> None:
    job = enqueue(tenant)
    body = client.get(f"/jobs/{job.id}", HTTP_AUTHORIZATION=f"Bearer {api_key}").json()
    assert body["cursor"] == str(stored_cursor(job))


async def test_subscribe_with_a_cursor_replays_exactly_the_later_changes(
    api_key: str, tenant: Tenant
) -> None:
    first = await database_sync_to_async(enqueue)(tenant)
    second = await database_sync_to_async(enqueue)(tenant)
    mark = await database_sync_to_async(stored_cursor)(second)
    await database_sync_to_async(complete)(first)
    third = await database_sync_to_async(enqueue)(tenant)

    async with open_ws(token=api_key) as comm:
        frames, subscribed = await subscribe_from(comm, mark)
        # first changed after the mark (completed), third was created after it; second did not.
        assert [(f["jobId"], f["status"]) for f in frames] == [
            (str(first.id), "COMPLETED"),
            (str(third.id), "PENDING"),
        ]
        cursors_seen = [int(f["cursor"]) for f in frames]
        assert cursors_seen == sorted(cursors_seen) and cursors_seen[0] > mark
        assert int(subscribed["cursor"]) >= cursors_seen[-1]

        # Live updates follow, with cursors past the one SUBSCRIBED gave.
        fourth = await database_sync_to_async(enqueue)(tenant)
        live = await receive(comm)
        assert live["jobId"] == str(fourth.id)
        assert int(live["cursor"]) > int(subscribed["cursor"])

    async with open_ws(token=api_key) as comm:
        frames, _ = await subscribe_from(comm, subscribed["cursor"])
        assert [f["jobId"] for f in frames] == [str(fourth.id)]


async def test_from_zero_the_replay_is_the_database(api_key: str, tenant: Tenant) -> None:
    jobs = [await database_sync_to_async(enqueue)(tenant) for _ in range(3)]
    await database_sync_to_async(complete)(jobs[1])
    async with open_ws(token=api_key) as comm:
        frames, _ = await subscribe_from(comm, "0")
    state = {f["jobId"]: (f["status"], f["cursor"]) for f in frames}
    stored = await database_sync_to_async(
        lambda: {str(j.id): (j.status, str(j.cursor)) for j in Job.objects.filter(tenant=tenant)}
    )()
    assert state == stored


async def test_a_truncated_replay_ends_with_resync_and_following_it_gets_the_rest(
    api_key: str, tenant: Tenant, settings: Any
) -> None:
    settings.JOBS = {**settings.JOBS, "SINCE_REPLAY_LIMIT": 3}
    jobs = [await database_sync_to_async(enqueue)(tenant) for _ in range(7)]
    seen: dict[str, str] = {}
    cursor = "0"
    async with open_ws(token=api_key) as comm:
        for _ in range(5):
            frames, subscribed = await subscribe_from(comm, cursor)
            for frame in frames:
                assert frame["jobId"] not in seen, "a change arrived twice"
                seen[frame["jobId"]] = frame["cursor"]
            if len(frames) < 3:
                break
            resync = await receive(comm)
            assert resync["type"] == "ERROR" and resync["code"] == RESYNC
            assert resync["cursor"] == subscribed["cursor"] == frames[-1]["cursor"]
            cursor = resync["cursor"]
    assert set(seen) == {str(job.id) for job in jobs}


async def test_bad_cursors_are_errors_and_the_socket_stays(api_key: str, tenant: Tenant) -> None:
    async with open_ws(token=api_key) as comm:
        for bad in ("-1", "abc", "1e3", 1.5, True, "9" * 20, ""):
            await comm.send_json_to({"type": "SUBSCRIBE", "tenantId": "tenant-1", "cursor": bad})
            error = await receive(comm)
            assert error["type"] == "ERROR" and '"cursor"' in error["message"], (bad, error)
        both = {"type": "SUBSCRIBE", "tenantId": "tenant-1", "cursor": "0", "since": "2025-01-01"}
        await comm.send_json_to(both)
        assert "not both" in (await receive(comm))["message"]
        ahead = await database_sync_to_async(cursors.watermark)() + 1000
        await comm.send_json_to({"type": "SUBSCRIBE", "tenantId": "tenant-1", "cursor": ahead})
        assert "ahead" in (await receive(comm))["message"]
        await comm.send_json_to({"type": "PING"})
        assert (await receive(comm))["type"] == "PONG"


def _hold_a_cursor_uncommitted(
    job_id: str, holding: threading.Event, release: threading.Event
) -> None:
    """In a transaction of its own: change a job (taking a cursor), wait, then commit."""
    url = connection.settings_dict
    dsn = f"host={url['HOST']} port={url['PORT']} user={url['USER']} dbname={url['NAME']}"
    with psycopg.connect(dsn) as conn:
        conn.execute(
            f"UPDATE {Job._meta.db_table} SET status = 'CANCELLED', updated_at = now() "
            "WHERE id = %s",
            (job_id,),
        )
        holding.set()
        release.wait(timeout=30)
        conn.commit()


@contextlib.asynccontextmanager
async def uncommitted_change(job: Job) -> AsyncIterator[threading.Event]:
    """A change of `job` (a cursor taken) in a transaction left open until the yielded event is
    set, or the block ends."""
    holding, release = threading.Event(), threading.Event()
    holder = threading.Thread(
        target=_hold_a_cursor_uncommitted, args=(str(job.id), holding, release)
    )
    holder.start()
    try:
        assert await asyncio.to_thread(holding.wait, 10)
        yield release
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 10)


async def test_a_change_committed_late_is_waited_for_not_skipped(
    api_key: str, tenant: Tenant
) -> None:
    """Cursors are taken in statement order but committed in any order: the replay's end is
    only given once every transaction that could still commit a smaller cursor has ended."""
    slow = await database_sync_to_async(enqueue)(tenant)
    mark = await database_sync_to_async(stored_cursor)(slow)
    async with uncommitted_change(slow) as release:
        # A later change commits first, with a greater cursor.
        fast = await database_sync_to_async(enqueue)(tenant)
        asyncio.get_running_loop().call_later(0.5, release.set)
        started = asyncio.get_running_loop().time()
        async with open_ws(token=api_key) as comm:
            frames, subscribed = await subscribe_from(comm, mark)
        waited = asyncio.get_running_loop().time() - started
    assert waited >= 0.4, "the replay did not wait for the running transaction"
    assert {(f["jobId"], f["status"]) for f in frames} == {
        (str(slow.id), JobStatus.CANCELLED),
        (str(fast.id), JobStatus.PENDING),
    }
    assert int(subscribed["cursor"]) >= max(int(f["cursor"]) for f in frames)


async def test_when_a_transaction_outlives_the_wait_the_resume_cursor_does_not_advance(
    api_key: str, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cursors, "WAIT_S", 0.2)
    slow = await database_sync_to_async(enqueue)(tenant)
    mark = await database_sync_to_async(stored_cursor)(slow)
    async with uncommitted_change(slow):
        await database_sync_to_async(enqueue)(tenant)
        async with open_ws(token=api_key) as comm:
            _, subscribed = await subscribe_from(comm, mark)
    # Resuming from what it was given must still deliver the late commit.
    assert int(subscribed["cursor"]) == mark
    async with open_ws(token=api_key) as comm:
        frames, _ = await subscribe_from(comm, subscribed["cursor"])
    assert (str(slow.id), JobStatus.CANCELLED) in {(f["jobId"], f["status"]) for f in frames}
