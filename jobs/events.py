"""Events of a tenant's jobs, as event subscriptions receive them (SPEC section 14): which
change of a job is which event, and the ids that make a delivery unique.

An event is read from a job's state right after one change (its cursor), not recorded by the
transition that made it: the dispatcher (jobs/events_dispatch.py) reads the change log after its
position and maps each change to at most one event with `event_of`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from jobs.lifecycle import HELD_PREFIX
from jobs.models import Job, JobStatus

EVENT_DELIVERY = "event_delivery"  # the job type that delivers one event to one subscription
CREATED = "job.created"
STARTED = "job.started"
COMPLETED = "job.completed"
FAILED = "job.failed"
CANCELLED = "job.cancelled"
RETRYING = "job.retrying"
ALL = "job.*"
EVENT_TYPES = (CREATED, STARTED, COMPLETED, FAILED, CANCELLED, RETRYING)
SUBSCRIBABLE = (*EVENT_TYPES, ALL)

_FINISHED = {
    JobStatus.COMPLETED: COMPLETED,
    JobStatus.FAILED: FAILED,
    JobStatus.CANCELLED: CANCELLED,
}


def event_of(job: Job) -> str | None:
    """The event a job's current state is, or None (a progress report, a held attempt, a job
    given back by a stopping worker).

    PENDING as created (no attempt, no error, never started, not updated since) is
    `job.created`, and so is WAITING as created (a job with dependencies); PENDING after an
    attempt that failed (or after `POST /jobs/{id}/retry`) is `job.retrying`; RUNNING without
    progress is `job.started`. A job with dependencies released to PENDING (never run) is no
    event: its `job.created` was sent when it was created WAITING."""
    if job.status in _FINISHED:
        return _FINISHED[JobStatus(job.status)]
    if job.status == JobStatus.RUNNING:
        return STARTED if job.progress is None else None
    if job.status == JobStatus.WAITING:
        return CREATED if job.updated_at == job.created_at else None
    if job.status != JobStatus.PENDING:
        return None
    if job.error is not None and job.error.startswith(HELD_PREFIX):
        return None
    if job.attempts == 0 and job.error is None and job.started_at is None:
        if job.updated_at == job.created_at:
            return CREATED
        return None if job.depends_on else RETRYING
    if job.attempts > 0 and job.error is not None:
        return RETRYING
    return None


def matches(subscribed: Iterable[str], event: str) -> bool:
    """Whether a subscription to `subscribed` receives `event`."""
    wanted = set(subscribed)
    return ALL in wanted or event in wanted


def event_id(job_id: uuid.UUID | str, cursor: int) -> str:
    """The event's id, `webhook-id` of its requests: one change of one job, the same for every
    subscription and on every retry."""
    return f"evt_{job_id}_{cursor}"


def delivery_key_prefix(subscription_id: uuid.UUID | str, job_id: uuid.UUID | str) -> str:
    return f"evt:{subscription_id}:{job_id}:"


def delivery_key(subscription_id: uuid.UUID | str, job_id: uuid.UUID | str, cursor: int) -> str:
    """The idempotency key of the `event_delivery` job of one event to one subscription: unique
    per tenant (a second dispatch of the same change creates nothing), and ordered by cursor
    within (subscription, job), so earlier deliveries of a job are a range of an index."""
    return f"{delivery_key_prefix(subscription_id, job_id)}{cursor:020d}"
