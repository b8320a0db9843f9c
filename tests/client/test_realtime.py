"""`wait` and `watch` against the real API and worker: terminal states pushed over the WebSocket,
and exact resumption (nothing lost, nothing twice) when the API restarts under them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import pytest
from django.db import connection
from jobqueue_client import AsyncClient, Job, JobUpdate, WaitTimeout

from tests.client.conftest import LATER_MS, Service, logged
from tests.support.stack import free_port, wait_until

T = TypeVar("T")

pytestmark = pytest.mark.e2e


def failing_webhook() -> dict[str, str]:
    """A webhook to a port nobody listens on: with one attempt, it ends FAILED."""
    return {"url": f"http://127.0.0.1:{free_port()}/hook"}


def test_wait_returns_the_terminal_job(service: Service) -> None:
    with service.client() as client:
        done = client.create("sleep", {"delayMs": 200})
        finished = client.wait(done.id, timeout=30)
        assert (finished.id, finished.status, finished.result) == (
            done.id,
            "COMPLETED",
            {"sleptMs": 200},
        )
        assert finished.finished_at is not None
        # Already terminal: answered from the read that follows the subscription.
        assert client.wait(done.id, timeout=5) == client.get(done.id)

        pending = client.create("sleep", {"delayMs": 0}, delay_ms=LATER_MS)
        with pytest.raises(WaitTimeout):
            client.wait(pending.id, timeout=0.5)

    async def wait_for_failure() -> Job:
        async with AsyncClient(service.url, service.key) as client:
            job = await client.create("webhook", failing_webhook(), max_attempts=1)
            return await client.wait(job.id, timeout=30)

    failed = asyncio.run(wait_for_failure())
    assert failed.status == "FAILED" and failed.attempts == 1 and failed.error


def test_wait_resumes_across_an_api_restart(
    service: Service, sdk_log: pytest.LogCaptureFixture
) -> None:
    with service.client() as client:
        job = client.create("sleep", {"delayMs": 1500})
        outcome: list[Job | BaseException] = []

        def wait() -> None:
            try:
                outcome.append(client.wait(job.id, timeout=60))
            except BaseException as exc:  # handed to the test's thread
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_until(
            lambda: logged(sdk_log, "subscribed to tenant"), timeout=10, message="subscribed"
        )
        wait_until(
            lambda: service.statuses()[job.id] == "RUNNING", timeout=10, message="job running"
        )
        service.stop_api()
        # The job finishes while no API is up: its COMPLETED can only come from the replay.
        wait_until(
            lambda: service.statuses()[job.id] == "COMPLETED", timeout=10, message="completed"
        )
        service.start_api()
        waiter.join(timeout=60)

    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Job), outcome
    assert outcome[0].status == "COMPLETED" and outcome[0].result == {"sleptMs": 1500}
    assert logged(sdk_log, "websocket lost")
    # It resumed from a cursor the server gave, not by reading the job again.
    resumed = logged(sdk_log, "reconnecting from cursor")
    assert resumed and all(line.split("cursor ")[-1].isdigit() for line in resumed), resumed


async def with_database(function: Callable[[], T]) -> T:
    """`function()` in a worker thread (the ORM is not for coroutines), closing the thread's
    database connection after."""

    def run() -> T:
        try:
            return function()
        finally:
            connection.close()

    return await asyncio.to_thread(run)


def done_statuses(service: Service) -> dict[str, str] | None:
    statuses = service.statuses()
    return statuses if all(s in ("COMPLETED", "FAILED") for s in statuses.values()) else None


def test_watch_resumes_exactly_across_an_api_restart(
    service: Service, sdk_log: pytest.LogCaptureFixture
) -> None:
    seen: list[JobUpdate] = []

    def watched(final: dict[str, str]) -> bool:
        last = {update.job_id: update.status for update in seen}
        return all(last.get(job_id) == status for job_id, status in final.items())

    async def scenario() -> None:
        async with AsyncClient(service.url, service.key) as client:

            async def consume() -> None:
                async for update in client.watch():
                    seen.append(update)

            watcher = asyncio.create_task(consume())
            await asyncio.to_thread(
                wait_until, lambda: logged(sdk_log, "subscribed"), timeout=10, message="subscribed"
            )
            # Jobs finished and watched before the restart: the replay after it sends them again
            # (it starts from the cursor of the first SUBSCRIBED); they must not come out twice.
            numbers = {"values": [1, 2], "operations": ["sum"]}
            quick = await client.create_batch([{"type": "data_processing", "payload": numbers}] * 3)
            await asyncio.to_thread(
                wait_until,
                lambda: watched(dict.fromkeys(quick, "COMPLETED")),
                timeout=20,
                message="quick jobs watched",
            )
            sleeps = [{"type": "sleep", "payload": {"delayMs": 1000}}] * 8
            await client.create_batch(sleeps)
            await client.create_batch(
                [{"type": "webhook", "payload": failing_webhook(), "max_attempts": 1}] * 2
            )
            # Restart the API while the jobs run: they finish while it is down.
            await asyncio.to_thread(service.stop_api)
            all_done = partial(wait_until, partial(done_statuses, service), timeout=20)
            await with_database(partial(all_done, message="jobs done while the API is down"))
            await asyncio.to_thread(service.start_api)
            await client.create_batch([{"type": "sleep", "payload": {"delayMs": 100}}] * 8)
            final = await with_database(partial(all_done, message="every job done"))
            await asyncio.to_thread(
                wait_until, lambda: watched(final), timeout=20, message="final states watched"
            )
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    asyncio.run(scenario())
    final = service.statuses()
    assert len(final) == 21 and list(final.values()).count("FAILED") == 2
    assert logged(sdk_log, "websocket lost")
    resumed = logged(sdk_log, "reconnecting from cursor")
    assert resumed and all(line.split("cursor ")[-1].isdigit() for line in resumed), resumed

    by_job: dict[str, list[int]] = defaultdict(list)
    for update in seen:
        assert update.tenant_id == service.tenant.id
        assert update.cursor is not None and update.cursor.isdigit(), update
        by_job[update.job_id].append(int(update.cursor))
    assert set(by_job) == set(final)
    for job_id, cursors in by_job.items():
        assert cursors == sorted(set(cursors)), (job_id, cursors)  # rising: nothing twice
    assert {update.job_id: update.status for update in seen} == final
