"""Reads of jobs and signing secrets, always scoped by tenant."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from jobs import api_store, events
from jobs.errors import NotFound
from jobs.models import (
    EventDelivery,
    EventSubscription,
    Job,
    JobStatus,
    Schedule,
    SigningSecret,
    Tenant,
)
from jobs.orm import orm
from jobs.queue import sync_queue

logger = logging.getLogger(__name__)

IDEMPOTENCY_WINDOW = timedelta(hours=24)


def job_list(
    *, tenant: Tenant, status: str | None = None, job_type: str | None = None
) -> QuerySet[Job]:
    """The tenant's jobs, newest first, in a stable order (ties broken by id)."""
    qs = Job.objects.filter(tenant=tenant)
    if status:
        qs = qs.filter(status=status)
    if job_type:
        qs = qs.filter(type=job_type)
    return qs.order_by("-created_at", "-id")


def job_get(*, tenant: Tenant, job_id: uuid.UUID) -> Job:
    """One job of the tenant; another tenant's job is indistinguishable from a missing one."""
    job = Job.objects.filter(tenant=tenant, id=job_id).first()
    if job is None:
        raise NotFound()
    return job


async def ajob_get(*, tenant: Tenant, job_id: uuid.UUID) -> Job:
    """`job_get` on the event loop."""
    if not api_store.enabled():
        return await orm(job_get)(tenant=tenant, job_id=job_id)
    job = await api_store.get_job(tenant_id=tenant.id, job_id=job_id)
    if job is None:
        raise NotFound()
    return job


def job_updated_since(*, tenant_id: str, since: datetime, limit: int) -> list[Job]:
    """The tenant's jobs changed after `since`, oldest change first (WebSocket catch-up)."""
    return list(
        Job.objects.filter(tenant_id=tenant_id, updated_at__gt=since).order_by("updated_at", "id")[
            :limit
        ]
    )


def job_changes_after(*, tenant_id: str, after: int, upto: int | None, limit: int) -> list[Job]:
    """The tenant's jobs whose last change has a cursor in (after, upto], in cursor order
    (WebSocket and SSE catch-up; `upto` None: no upper bound)."""
    qs = Job.objects.filter(tenant_id=tenant_id, cursor__gt=after)
    if upto is not None:
        qs = qs.filter(cursor__lte=upto)
    return list(qs.order_by("cursor")[:limit])


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """A tenant's jobs waiting and running: `ready` in its Redis ready set (None if Redis is
    unreachable), `delayed` PENDING with a future runAt, `running` RUNNING in the database."""

    ready: int | None
    delayed: int
    running: int


def tenant_queue_depths(*, tenant_ids: Sequence[str]) -> dict[str, QueueDepth]:
    """Queue depth of each tenant: one Redis round trip and one grouped query for all."""
    if not tenant_ids:
        return {}
    now = timezone.now()
    delayed: dict[str, int] = dict(
        Job.objects.filter(tenant_id__in=tenant_ids, status=JobStatus.PENDING, run_at__gt=now)
        .values_list("tenant_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    running: dict[str, int] = dict(
        Job.objects.filter(tenant_id__in=tenant_ids, status=JobStatus.RUNNING)
        .values_list("tenant_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    ready: dict[str, int] | None = None
    try:
        ready = sync_queue().ready_counts(tenant_ids)
    except Exception as exc:
        logger.warning("queue depth: Redis unavailable (%s)", exc)
    return {
        tenant_id: QueueDepth(
            ready=None if ready is None else ready[tenant_id],
            delayed=delayed.get(tenant_id, 0),
            running=running.get(tenant_id, 0),
        )
        for tenant_id in tenant_ids
    }


def job_counts_by_status(*, tenant: Tenant) -> dict[str, int]:
    """The tenant's jobs per status (every status present, zero included)."""
    counts = dict.fromkeys(JobStatus.values, 0)
    rows = Job.objects.filter(tenant=tenant).values_list("status").annotate(n=Count("id"))
    for status, n in rows.order_by():
        counts[status] = n
    return counts


def signing_secrets_live(
    *, tenant_id: str, now: datetime | None = None
) -> list[tuple[str, datetime | None]]:
    """The tenant's signing secrets that sign at `now` (expiry empty or later), newest first,
    as (secret, expires_at)."""
    now = now or timezone.now()
    rows = SigningSecret.objects.filter(tenant_id=tenant_id).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=now)
    )
    return list(rows.order_by("-created_at", "-id").values_list("secret", "expires_at"))


# --- event subscriptions ------------------------------------------------------------------------
def event_subscription_list(*, tenant: Tenant) -> list[EventSubscription]:
    """The tenant's event subscriptions, newest first."""
    return list(EventSubscription.objects.filter(tenant=tenant).order_by("-created_at", "-id"))


def event_subscription_get(*, tenant: Tenant, subscription_id: uuid.UUID) -> EventSubscription:
    """One event subscription of the tenant; another tenant's is indistinguishable from a
    missing one (404)."""
    subscription = EventSubscription.objects.filter(tenant=tenant, id=subscription_id).first()
    if subscription is None:
        raise NotFound()
    return subscription


def event_subscription_find(*, subscription_id: uuid.UUID) -> EventSubscription | None:
    """A subscription by id, for its own deliveries (the worker's; None once deleted)."""
    return EventSubscription.objects.filter(id=subscription_id).first()


def event_delivery_list(
    *, tenant: Tenant, subscription_id: uuid.UUID, limit: int
) -> list[EventDelivery]:
    """The latest delivery attempts of one of the tenant's subscriptions, newest first."""
    subscription = event_subscription_get(tenant=tenant, subscription_id=subscription_id)
    return list(subscription.deliveries.order_by("-created_at", "-id")[:limit])


def event_delivery_earlier_run_at(
    *, tenant_id: str, subscription_id: uuid.UUID, job_id: str, cursor: int
) -> datetime | None:
    """When the earliest unfinished delivery of an earlier event of the same job to the same
    subscription may run, or None if there is none: a range of the idempotency key index."""
    prefix = events.delivery_key_prefix(subscription_id, job_id)
    mine = events.delivery_key(subscription_id, job_id, cursor)
    return (
        Job.objects.filter(
            tenant_id=tenant_id,
            idempotency_key__gte=prefix,
            idempotency_key__lt=mine,
            status__in=(JobStatus.PENDING, JobStatus.RUNNING),
        )
        .filter(idempotency_key__startswith=prefix)
        .order_by("idempotency_key")
        .values_list("run_at", flat=True)
        .first()
    )


def schedule_list(*, tenant: Tenant) -> list[Schedule]:
    """The tenant's schedules by name."""
    return list(Schedule.objects.filter(tenant=tenant).order_by("name", "id"))


def schedule_get(*, tenant: Tenant, schedule_id: uuid.UUID) -> Schedule:
    """One schedule of the tenant; another tenant's is indistinguishable from a missing one."""
    schedule = Schedule.objects.filter(tenant=tenant, id=schedule_id).first()
    if schedule is None:
        raise NotFound("Schedule not found")
    return schedule


def schedule_recent_jobs(*, schedule: Schedule, limit: int = 20) -> list[Job]:
    """The schedule's newest jobs (the admin's schedule page), by due time."""
    return list(
        Job.objects.filter(tenant_id=schedule.tenant_id, schedule_id=schedule.id).order_by(
            "-scheduled_for"
        )[:limit]
    )
