"""jobs/store.py: the rows a claim and an outcome write leave, on each of the store's paths (one
PostgreSQL statement from a thread, the same from the event loop's pool, and the ORM path that
SQLite takes), and the lease that fences every write of an attempt."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.forms.models import model_to_dict
from django.utils import timezone

from jobs import store
from jobs.lifecycle import Outcome, RetryPolicy
from jobs.models import Job, JobStatus, Tenant
from tests.support.event_loop import run_async
from tests.support.jobs import make_job

POLICY = RetryPolicy(base_ms=1000, max_ms=1000)
# Columns that differ between two jobs written the same way.
OWN = {"id", "lease_token", "locked_by"}
SHARED_TIME = timezone.now() - timedelta(seconds=1)


def row(job: Job) -> dict[str, Any]:
    """The job's row as stored, without the columns that are its own."""
    fields = model_to_dict(Job.objects.get(id=job.id))
    return {name: value for name, value in fields.items() if name not in OWN}


def pending(tenant: Tenant, **fields: Any) -> Job:
    """A due PENDING job; jobs made by one test share their times."""
    at = fields.pop("at", SHARED_TIME)
    times = {"created_at": at, "run_at": at, "updated_at": at}
    return make_job(tenant, status=JobStatus.PENDING, **{**times, **fields})


def claim_on_each_path(jobs: list[Job]) -> list[Job]:
    """Claim one job on each path, all with the same clock."""
    now = timezone.now()
    first, second, third = (str(job.id) for job in jobs)
    claimed = store.claim_jobs(job_ids=[first], worker="w")
    claimed += run_async(lambda: store.aclaim_jobs(job_ids=[second], worker="w"))
    claimed += store.claim_with_orm(job_ids=[third], worker="w", token=uuid.uuid4(), now=now)
    return claimed


@pytest.mark.django_db(transaction=True)
def test_a_claim_takes_only_due_pending_rows(tenant: Tenant) -> None:
    due = pending(tenant)
    later = pending(tenant, run_at=timezone.now() + timedelta(hours=1))
    running = make_job(tenant, status=JobStatus.RUNNING)
    cancelled = make_job(tenant, status=JobStatus.CANCELLED)
    ids = [str(job.id) for job in (due, later, running, cancelled)]

    [claimed] = store.claim_jobs(job_ids=ids, worker="w1")

    assert claimed.id == due.id
    assert (claimed.status, claimed.attempts, claimed.locked_by) == (JobStatus.RUNNING, 1, "w1")
    lease = claimed.lease_expires_at - claimed.started_at
    assert lease == timedelta(seconds=settings.JOBS["LEASE_S"])
    assert {j.id: j.status for j in Job.objects.filter(id__in=ids)} == {
        due.id: JobStatus.RUNNING,
        later.id: JobStatus.PENDING,
        running.id: JobStatus.RUNNING,
        cancelled.id: JobStatus.CANCELLED,
    }
    # Taken: a second claim of the same ids gets nothing.
    assert run_async(lambda: store.aclaim_jobs(job_ids=ids, worker="w2")) == []


@pytest.mark.django_db(transaction=True)
def test_every_claim_path_writes_the_same_columns(tenant: Tenant) -> None:
    jobs = [pending(tenant, progress=40, progress_message="old", attempts=1) for _ in range(3)]

    claimed = claim_on_each_path(jobs)

    assert [job.id for job in claimed] == [job.id for job in jobs]
    rows = [row(job) for job in jobs]
    for stored in rows:
        assert (stored["status"], stored["attempts"]) == (JobStatus.RUNNING, 2)
        assert (stored["progress"], stored["progress_message"]) == (None, None)
    # The same columns set on every path (the times differ by the ms between the calls).
    times = ("started_at", "updated_at", "lease_expires_at")
    strip = [{k: v for k, v in stored.items() if k not in times} for stored in rows]
    assert strip[0] == strip[1] == strip[2]
    for stored in rows:
        assert all(abs(stored[t] - rows[0][t]) < timedelta(seconds=5) for t in times)
    # What each path returns is what it stored.
    for job in claimed:
        assert model_to_dict(job) == model_to_dict(Job.objects.get(id=job.id))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(result={"n": [1, "two", None], "ok": True}),
        Outcome(result="just text"),
        Outcome(result=None),
        Outcome(error="boom"),
        Outcome(error="bad input", permanent=True),
    ],
    ids=["result", "string-result", "no-result", "retried", "failed"],
)
def test_every_outcome_path_writes_the_same_row(tenant: Tenant, outcome: Outcome) -> None:
    jobs = [pending(tenant, max_attempts=3) for _ in range(3)]
    claimed = claim_on_each_path(jobs)
    Job.objects.filter(id__in=[job.id for job in jobs]).update(progress=70, progress_message="m")
    now = timezone.now()
    plans = [[(job, POLICY.after_attempt(job, outcome, now))] for job in claimed]

    written = store.write_outcomes(planned=plans[0])
    written += run_async(lambda: store.awrite_outcomes(planned=plans[1]))
    written += store.write_outcomes_with_orm(planned=plans[2])

    assert all(job is not None for job in written)
    # started_at is each claim's own time; run_at of a retry is jittered per job.
    rows = [{k: v for k, v in row(job).items() if k != "started_at"} for job in jobs]
    if outcome.error and not outcome.permanent:
        assert all(stored["run_at"] > now for stored in rows)
        for stored in rows:
            del stored["run_at"]
    assert rows[0] == rows[1] == rows[2]
    stored = rows[0]
    if outcome.ok:
        assert (stored["status"], stored["result"]) == (JobStatus.COMPLETED, outcome.result)
        assert stored["finished_at"] == now
    elif outcome.permanent:
        assert (stored["status"], stored["error"]) == (JobStatus.FAILED, "bad input")
    else:
        assert (stored["status"], stored["error"]) == (JobStatus.PENDING, "boom")
    # The row's last progress comes back with the write (the final frame shows it).
    assert [(job.progress, job.progress_message) for job in written] == [(70, "m")] * 3


@pytest.mark.django_db(transaction=True)
def test_a_write_without_the_lease_changes_nothing_on_any_path(tenant: Tenant) -> None:
    jobs = [pending(tenant) for _ in range(3)]
    claimed = claim_on_each_path(jobs)
    before = [row(job) for job in jobs]
    for job in claimed:
        job.lease_token = uuid.uuid4()  # another claim's token: this worker lost the lease
    now = timezone.now()
    plans = [[(job, POLICY.after_attempt(job, Outcome(result=1), now))] for job in claimed]

    assert store.write_outcomes(planned=plans[0]) == [None]
    assert run_async(lambda: store.awrite_outcomes(planned=plans[1])) == [None]
    assert store.write_outcomes_with_orm(planned=plans[2]) == [None]
    assert store.write_fenced(job=claimed[0], fields={"status": JobStatus.PENDING}) is None
    assert store.set_job_progress(job=claimed[1], percent=50, message=None) is None
    assert [row(job) for job in jobs] == before


@pytest.mark.django_db(transaction=True)
def test_one_batch_writes_several_outcomes_and_skips_a_lost_lease(tenant: Tenant) -> None:
    jobs = [pending(tenant, max_attempts=1) for _ in range(3)]
    done, failed, lost = store.claim_jobs(job_ids=[str(job.id) for job in jobs], worker="w")
    lost.lease_token = uuid.uuid4()
    now = timezone.now()
    planned = [
        (done, POLICY.after_attempt(done, Outcome(result={"x": 1}), now)),
        (failed, POLICY.after_attempt(failed, Outcome(error="boom"), now)),
        (lost, POLICY.after_attempt(lost, Outcome(result=None), now)),
    ]

    written = run_async(lambda: store.awrite_outcomes(planned=planned))

    assert [job is None for job in written] == [False, False, True]
    statuses = dict(Job.objects.filter(tenant=tenant).values_list("id", "status"))
    assert statuses == {
        done.id: JobStatus.COMPLETED,
        failed.id: JobStatus.FAILED,  # one attempt allowed, spent
        lost.id: JobStatus.RUNNING,
    }


@pytest.mark.django_db(transaction=True)
def test_expired_leases_are_recovered_as_the_policy_says(tenant: Tenant) -> None:
    again = pending(tenant, max_attempts=3)
    spent = pending(tenant, max_attempts=1)
    alive = pending(tenant, max_attempts=3)
    store.claim_jobs(job_ids=[str(again.id), str(spent.id)], worker="dead")
    store.claim_jobs(job_ids=[str(alive.id)], worker="alive")
    Job.objects.filter(locked_by="dead").update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    recovered = store.recover_expired_leases(policy=POLICY, limit=10)

    assert {job.id: job.status for job in recovered} == {
        again.id: JobStatus.PENDING,
        spent.id: JobStatus.FAILED,
    }
    for job in recovered:
        stored = Job.objects.get(id=job.id)
        assert stored.lease_token is None and stored.locked_by is None
        assert stored.error == "worker dead stopped heartbeating (lease expired)"
    assert Job.objects.get(id=alive.id).status == JobStatus.RUNNING
