"""Redis Sentinel for real: the API and two workers on `REDIS_URL=redis+sentinel://...` (a
primary, a replica and three sentinels on loopback ports, tests/support/redis_server.py), jobs
created all along and a WebSocket client watching, while the primary is replaced: by
`SENTINEL FAILOVER` (the primary demoted, still running) and by kill -9 (the primary gone).

What a user would notice, asserted: every job created (each POST answered 201) reaches COMPLETED,
none is left PENDING or RUNNING; the WebSocket client ends with exactly the database's state,
having received every update or a RESYNC (the `Mirror` of test_resync.py); the processes survive.
Replication is asynchronous, so ids pushed to the old primary just before the switch may be gone
from the new one: the database is the truth and the workers' reconciliation pushes them again.
Printed: when the sentinels switched, when the first job created after the fault completed, when
everything created had completed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from django.utils import timezone

from jobs.models import Job, JobStatus
from tests.e2e.test_resync import Mirror, database_state, tenant_key, worker_running
from tests.support.redis_server import SentinelSet, sentinel_set
from tests.support.stack import Stack, producing

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Reconciliation every 2 s (its lock makes it at most every 5 s): what Redis lost comes back soon.
RECONCILE_S = "2"
SWITCH_TIMEOUT_S = 30


def failover_while_jobs_flow(
    stack: Stack, tmp_path: Path, inject: Callable[[SentinelSet], None]
) -> dict[str, float]:
    key = tenant_key()
    with sentinel_set(tmp_path / "redis") as servers:
        stack.use_redis(servers.url)
        stack.env["JOBS_RECONCILE_INTERVAL_S"] = RECONCILE_S
        workers = [stack.start_worker("--concurrency", "4", name=f"w{n}") for n in (1, 2)]
        api = stack.start_api()
        worker_running(stack, key)
        figures: dict[str, float] = {}
        injected_at: datetime = timezone.now()

        async def scenario() -> tuple[Mirror, list[str], list[str]]:
            nonlocal injected_at
            mirror = Mirror(stack.ws_url, key)
            await mirror.connect()
            with producing(stack, [key]) as (created, failures):
                await mirror.read(1.0)
                old_master = servers.master_port()
                injected_at = timezone.now()
                injected = time.monotonic()
                await asyncio.to_thread(inject, servers)
                while servers.master_port() == old_master:
                    assert time.monotonic() - injected < SWITCH_TIMEOUT_S, "no failover"
                    await mirror.read(0.1)
                figures["switched_s"] = time.monotonic() - injected
                # Jobs keep coming until the old primary is gone or demoted (which drops what
                # was written there after the switch), and a little after.
                while not servers.old_primary_gone():
                    assert time.monotonic() - injected < SWITCH_TIMEOUT_S, "never demoted"
                    await mirror.read(0.2)
                figures["demoted_s"] = time.monotonic() - injected
                await mirror.read(2.0)
            figures["created"] = len(created)
            await mirror.catch_up(database_state)
            figures["all_completed_s"] = time.monotonic() - injected
            await mirror.close()
            return mirror, created, failures

        mirror, created, failures = asyncio.run(scenario())
        assert servers.server(servers.master_port()) is servers.replica

    lost = Job.objects.filter(id__in=created).exclude(status=JobStatus.COMPLETED).count()
    assert lost == 0
    assert not Job.objects.filter(status__in=[JobStatus.PENDING, JobStatus.RUNNING]).exists()
    assert failures == [], failures[:5]
    assert [proc.poll() for proc in [*workers, api]] == [None, None, None], "processes survive"
    mirror.check()
    figures.update(stall(created, injected_at))
    figures["resyncs"] = len(mirror.resyncs)
    figures["reconnections"] = mirror.reconnections
    figures["retried"] = Job.objects.filter(id__in=created, attempts__gt=1).count()
    return figures


def stall(ids: list[str], injected_at: datetime) -> dict[str, float]:
    """How long the fault held jobs up: the longest time without a job completing after it, and
    the longest a job created around it waited from creation to completion."""
    rows = list(Job.objects.filter(id__in=ids).values_list("created_at", "finished_at"))
    finished = sorted(done for _, done in rows if done >= injected_at)
    gaps = [
        (b - a).total_seconds() for a, b in zip([injected_at, *finished], finished, strict=False)
    ]
    waits = [(done - created).total_seconds() for created, done in rows]
    return {
        "longest_gap_s": max(gaps, default=0.0),
        "longest_wait_s": max(waits, default=0.0),
        "waited_over_1s": sum(wait > 1 for wait in waits),
    }


def report(label: str, figures: dict[str, float]) -> str:
    return (
        f"\n{label}: {figures['created']:.0f} jobs created, 0 lost; sentinels switched after"
        f" {figures['switched_s']:.1f}s, the old primary gone or demoted after"
        f" {figures['demoted_s']:.1f}s; no job completed for {figures['longest_gap_s']:.1f}s at"
        f" most, the longest a job waited was {figures['longest_wait_s']:.1f}s"
        f" ({figures['waited_over_1s']:.0f} waited more than 1s); all completed"
        f" {figures['all_completed_s']:.1f}s after the fault; {figures['resyncs']:.0f} RESYNC,"
        f" {figures['reconnections']:.0f} socket reconnections,"
        f" {figures['retried']:.0f} jobs run more than once"
    )


def test_sentinel_failover_while_jobs_flow(stack: Stack, tmp_path: Path) -> None:
    figures = failover_while_jobs_flow(stack, tmp_path, SentinelSet.failover)
    print(report("SENTINEL FAILOVER", figures))
    assert figures["all_completed_s"] < 30


def test_primary_killed_while_jobs_flow(stack: Stack, tmp_path: Path) -> None:
    figures = failover_while_jobs_flow(stack, tmp_path, lambda servers: servers.primary.kill())
    print(report("primary kill -9", figures))
    assert figures["all_completed_s"] < 40
