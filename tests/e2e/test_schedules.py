"""Schedules fired by real worker processes (SPEC section 12): three workers and an `every: 1`
schedule give one job per due time, none twice and none missing, even with a worker killed
(SIGKILL) mid-run; `overlap: skip` makes no job while the last one runs."""

from __future__ import annotations

import itertools
import signal
import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from jobs.models import Job, JobStatus, Schedule, Tenant
from jobs.services import schedule_create
from tests.support.stack import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

RUN_S = 10


def every_second(tenant: Tenant, job: dict[str, Any], **fields: Any) -> Schedule:
    values = {"name": "tick", "every": 1, "job": job, **fields}
    return schedule_create(tenant=tenant, values=values)


def due_times(schedule: Schedule) -> list[datetime]:
    return list(
        Job.objects.filter(schedule_id=schedule.id)
        .order_by("scheduled_for")
        .values_list("scheduled_for", flat=True)
    )


def test_three_workers_fire_each_due_time_once_even_with_one_killed(stack: Stack) -> None:
    tenant = Tenant.objects.create(id="acme")
    job = {"type": "sleep", "payload": {"delayMs": 10}, "priority": 0, "maxAttempts": 3}
    schedule = every_second(tenant, job)
    workers = [stack.start_worker(name=f"w{i}") for i in range(3)]
    wait_until(lambda: due_times(schedule), timeout=30, message="no worker fired the schedule")
    time.sleep(RUN_S / 2)
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    time.sleep(RUN_S / 2)
    Schedule.objects.filter(id=schedule.id).update(enabled=False)
    time.sleep(1.2)  # a pass that locked the row before the update commits its job

    fired = due_times(schedule)
    first, last = fired[0], fired[-1]
    # Every whole second from the first due time to the last, ends excluded (the workers came
    # up, and the schedule was disabled, part-way through a second).
    expected = {first + timedelta(seconds=s) for s in range(1, int((last - first).seconds))}
    duplicates = len(fired) - len(set(fired))
    missing = sorted(expected - set(fired))
    by_worker = dict.fromkeys((f"w{i}" for i in range(3)), 0)
    for name in Job.objects.filter(schedule_id=schedule.id).values_list("locked_by", flat=True):
        if name in by_worker:
            by_worker[name] += 1
    print(
        f"\nschedules, 3 workers (one killed half-way), every 1 s for {(last - first).seconds}"
        f" s: {len(fired)} jobs, {len(set(fired))} due times, duplicates={duplicates},"
        f" missing={len(missing)}; run by {by_worker}"
    )
    assert duplicates == 0
    assert missing == []
    assert len(fired) >= RUN_S - 2
    assert all(at.microsecond == 0 for at in fired)
    # Ordinary jobs: run by the workers (the killed worker's by another after its lease).
    wait_until(
        lambda: (
            not Job.objects.filter(schedule_id=schedule.id)
            .exclude(status=JobStatus.COMPLETED)
            .exists()
        ),
        timeout=15,
        message="scheduled jobs did not complete",
    )


def test_overlap_skip_makes_no_job_while_the_last_one_runs(stack: Stack) -> None:
    tenant = Tenant.objects.create(id="acme")
    job = {"type": "sleep", "payload": {"delayMs": 3000}, "priority": 0, "maxAttempts": 1}
    schedule = every_second(tenant, job, overlap="skip")
    stack.start_worker(name="w0")
    stack.start_worker(name="w1")
    wait_until(
        lambda: (
            Job.objects.filter(schedule_id=schedule.id, status=JobStatus.COMPLETED).count() >= 2
        ),
        timeout=30,
        message="the schedule did not run two jobs",
    )
    Schedule.objects.filter(id=schedule.id).update(enabled=False)
    time.sleep(1.2)
    jobs = list(Job.objects.filter(schedule_id=schedule.id).order_by("scheduled_for"))
    for earlier, later in itertools.pairwise(jobs):
        # The next job was made only after the previous one finished.
        assert earlier.finished_at is not None
        assert later.created_at >= earlier.finished_at
        assert (later.scheduled_for - earlier.scheduled_for).total_seconds() >= 3
    print(
        f"\noverlap skip, every 1 s, 3 s jobs: {len(jobs)} jobs at "
        f"{[j.scheduled_for.strftime('%S') for j in jobs]} (seconds), none overlapping"
    )
