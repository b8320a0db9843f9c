"""Workflows survive a worker killed with SIGKILL: between a dependency's committed end and the
release of its dependents, and while the dependency runs. No dependent is left WAITING."""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
import psycopg
import pytest

from jobs import pg
from jobs.models import Job, JobStatus, Tenant
from jobs.services import api_key_create
from tests.support.stack import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def create_graph(stack: Stack, key: str, parent: dict[str, Any], children: int) -> list[str]:
    """A parent and `children` jobs after it, in one batch; the ids, parent first."""
    child = {"type": "sleep", "payload": {"delayMs": 0}, "dependsOn": ["$0"]}
    response = httpx.post(
        f"{stack.base_url}/jobs/batch",
        json={"jobs": [parent, *[child] * children]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()["jobIds"]


def statuses(ids: list[str]) -> list[str]:
    by_id = {str(i): s for i, s in Job.objects.filter(id__in=ids).values_list("id", "status")}
    return [by_id[job_id] for job_id in ids]


def blocked_in_settling() -> bool:
    """A backend waits for a row lock in the statement that counts dependents down."""
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%dependencies_left - v.n%%'"
        ).fetchone()
    return bool(row and row[0])


def test_worker_killed_inside_the_release_loses_neither_the_end_nor_the_release(
    stack: Stack,
) -> None:
    tenant = Tenant.objects.create(id="acme")
    _, key = api_key_create(tenant=tenant)
    stack.start_api()
    parent, *children = create_graph(
        stack, key, {"type": "sleep", "payload": {"delayMs": 300}}, children=3
    )
    assert statuses(children) == ["WAITING"] * 3

    # Hold the children's rows so that the worker, having written the parent's COMPLETED,
    # stops inside the release (same transaction, not committed), then kill it there.
    with psycopg.connect(pg.conninfo()) as holder:
        holder.execute("SELECT id FROM jobs_job WHERE id = ANY(%s::uuid[]) FOR UPDATE", [children])
        victim = stack.start_worker("--concurrency", "2", name="victim")
        wait_until(blocked_in_settling, timeout=20, message="release did not start")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        holder.rollback()

    # The dead worker's transaction never commits: the parent's end went with the release.
    wait_until(lambda: not blocked_in_settling(), timeout=10, message="dead backend lingers")
    after_kill = statuses([parent, *children])
    assert after_kill == ["RUNNING", "WAITING", "WAITING", "WAITING"]

    killed_at = time.monotonic()
    stack.start_worker("--concurrency", "2", name="rescuer")
    wait_until(
        lambda: statuses(children) == ["COMPLETED"] * 3,
        timeout=20,
        message=f"children {statuses(children)}\n{stack.log('rescuer')[-2000:]}",
    )
    row = Job.objects.get(id=parent)
    print(
        f"\nkilled inside the release: parent and children {after_kill} after the kill; the "
        f"parent recovered and run again (attempts={row.attempts}), children all COMPLETED "
        f"{time.monotonic() - killed_at:.1f}s after a new worker started"
    )
    assert row.status == JobStatus.COMPLETED and row.attempts == 2
    assert not row.dependents_waiting


def test_worker_killed_while_the_parent_runs(stack: Stack) -> None:
    tenant = Tenant.objects.create(id="acme")
    _, key = api_key_create(tenant=tenant)
    stack.start_api()
    parent, *children = create_graph(
        stack, key, {"type": "sleep", "payload": {"delayMs": 5000}, "maxAttempts": 1}, children=2
    )
    victim = stack.start_worker("--concurrency", "1", name="victim")
    wait_until(lambda: statuses([parent]) == ["RUNNING"], timeout=20, message="parent not run")
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    stack.start_worker("--concurrency", "1", name="rescuer")
    # The lease expires, the recovery fails the parent (its one attempt is spent), the sweep
    # cancels its dependents.
    wait_until(
        lambda: statuses(children) == ["CANCELLED"] * 2,
        timeout=20,
        message=f"children {statuses(children)}\n{stack.log('rescuer')[-2000:]}",
    )
    assert statuses([parent]) == ["FAILED"]
    errors = set(Job.objects.filter(id__in=children).values_list("error", flat=True))
    assert errors == {f"dependency {parent} failed"}
