"""The event dispatcher: turns the changes of tenants' jobs into `event_delivery` jobs, one per
matching event and subscription (SPEC section 14), off the hot path.

Every change of a job has a cursor (jobs/cursors.py), and every change of a job of a tenant that
has a subscription is copied, as the job stood right after it, into the change log (`JobChange`)
by a trigger in the statement that made it (migration 0007). Each subscription keeps its
position; a pass reads, per subscription, the tenant's changes after it and up to the watermark
(every change up to there is committed), in cursor order, at most `BATCH` of them, and maps each
to at most one event (jobs/events.py): a job created and claimed within the same pass gives
`job.created` and then `job.started`. The delivery jobs and the new position are written in one
transaction, so a change is dispatched exactly once: a pass that dies writes nothing, and the
deliveries' idempotency keys make a second pass over the same changes create nothing. The jobs
are published (indexed, broadcast) after commit. Log rows every subscription of their tenant
has read past are deleted after each pass.

It runs in the workers' upkeep every `INTERVAL_S`, one worker at a time (a short Redis lock).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import JSONField, Min
from django.utils import timezone

from jobs import cursors, events, lifecycle, store
from jobs.handlers.event_delivery import MAX_ATTEMPTS
from jobs.models import EventDelivery, EventSubscription, Job, JobChange, JobStatus
from jobs.schemas import job_json

logger = logging.getLogger("jobs.worker")

INTERVAL_S = 0.5
BATCH = 500
LOCK = "event-dispatch"
# Rows of the delivery log kept per subscription (older ones are trimmed by the dispatcher).
LOG_KEEP = 1000
TRIM_EVERY_S = 30.0
TRIM_LOCK = "event-log-trim"


def dispatch(*, limit: int = BATCH) -> list[Job]:
    """One pass over every subscription that is behind the watermark; the delivery jobs made
    (already published)."""
    if not EventSubscription.objects.exists():
        return []  # no subscription: no watermark to wait for
    upto = cursors.watermark()
    if upto is None:
        logger.warning("event dispatch skipped: running transactions did not end in time")
        return []
    created: list[Job] = []
    behind = EventSubscription.objects.filter(cursor__lt=upto).order_by("created_at", "id")
    tenants = set()
    for subscription_id, tenant_id in behind.values_list("id", "tenant_id"):
        created += dispatch_subscription(subscription_id=subscription_id, upto=upto, limit=limit)
        tenants.add(tenant_id)
    prune_changes(tenant_ids=tenants)
    return created


def prune_changes(*, tenant_ids: Iterable[str] | None = None) -> int:
    """Delete the change log rows that every subscription of their tenant has read past (all of
    a tenant's rows once it has no subscription left): of `tenant_ids`, or of every tenant;
    how many."""
    positions = EventSubscription.objects.values("tenant_id").annotate(low=Min("cursor"))
    if tenant_ids is not None:
        positions = positions.filter(tenant_id__in=list(tenant_ids))
    deleted = 0
    for row in positions:
        deleted += JobChange.objects.filter(
            tenant_id=row["tenant_id"], cursor__lte=row["low"]
        ).delete()[0]
    if tenant_ids is None:
        orphans = JobChange.objects.exclude(
            tenant_id__in=EventSubscription.objects.values("tenant_id")
        )
        deleted += orphans.delete()[0]
    return deleted


def job_from_snapshot(snapshot: dict[str, Any]) -> Job:
    """A job as the change log holds it (its row as JSON, keyed by column), unsaved."""
    values: dict[str, Any] = {}
    for field in Job._meta.concrete_fields:
        if field.column not in snapshot:
            continue
        value = snapshot[field.column]
        if value is not None and not isinstance(field, JSONField):
            value = field.to_python(value)
            if isinstance(value, datetime) and timezone.is_naive(value):
                value = timezone.make_aware(value, UTC)  # SQLite keeps UTC without an offset
        values[field.attname] = value
    return Job(**values)


def dispatch_subscription(*, subscription_id: uuid.UUID, upto: int, limit: int) -> list[Job]:
    """The events of one subscription with a cursor in (its position, `upto`], at most `limit`
    changes: their delivery jobs and the new position in one transaction."""
    with transaction.atomic():
        subscription = (
            EventSubscription.objects.select_for_update().filter(id=subscription_id).first()
        )
        if subscription is None or subscription.cursor >= upto:
            return []
        changes = list(
            JobChange.objects.filter(
                tenant_id=subscription.tenant_id,
                cursor__gt=subscription.cursor,
                cursor__lte=upto,
            ).order_by("cursor")[:limit]
        )
        now = timezone.now()
        deliveries = []
        for change in changes:
            job = job_from_snapshot(change.snapshot)
            job.cursor = change.cursor
            event = events.event_of(job)
            if event is None or not events.matches(subscription.events, event):
                continue
            deliveries.append(_delivery(subscription, job, event, now, len(deliveries)))
        keys = [job.idempotency_key for job in deliveries]
        existing = set(
            Job.objects.filter(
                tenant_id=subscription.tenant_id, idempotency_key__in=keys
            ).values_list("idempotency_key", flat=True)
        )
        new = [job for job in deliveries if job.idempotency_key not in existing]
        new = store.insert_unless_taken(new)
        subscription.cursor = changes[-1].cursor if len(changes) == limit else upto
        subscription.save(update_fields=["cursor"])
        # A row a concurrent pass inserted first was skipped: it is that pass's to publish.
        cursors.fill(new)
        lifecycle.publish_on_commit(new, event=lifecycle.CREATED)
    return new


def _delivery(
    subscription: EventSubscription, change: Job, event: str, now: datetime, index: int
) -> Job:
    """The delivery job of `event`, which is `change` (a job as it stood after one change)."""
    data = json.loads(job_json(change))
    event_id = events.event_id(change.id, change.cursor)
    at = now + timedelta(microseconds=index)  # the batch keeps its order in the queue
    return Job(
        id=uuid.uuid4(),
        tenant_id=subscription.tenant_id,
        type=events.EVENT_DELIVERY,
        payload={
            "subscriptionId": str(subscription.id),
            "eventId": event_id,
            "type": event,
            "timestamp": data["updatedAt"],
            "data": data,
        },
        status=JobStatus.PENDING,
        priority=0,
        attempts=0,
        max_attempts=MAX_ATTEMPTS,
        run_at=at,
        created_at=at,
        updated_at=at,
        idempotency_key=events.delivery_key(subscription.id, change.id, change.cursor),
    )


def trim_logs(*, keep: int = LOG_KEEP) -> int:
    """Delete every subscription's delivery log rows beyond its newest `keep`; how many."""
    deleted = 0
    for subscription_id in EventSubscription.objects.values_list("id", flat=True):
        newest = EventDelivery.objects.filter(subscription_id=subscription_id).order_by(
            "-created_at", "-id"
        )
        boundary = list(newest.values_list("created_at", "id")[keep : keep + 1])
        if not boundary:
            continue
        ((created_at, row_id),) = boundary
        older = EventDelivery.objects.filter(subscription_id=subscription_id).filter(
            created_at__lt=created_at
        ) | EventDelivery.objects.filter(
            subscription_id=subscription_id, created_at=created_at, id__lte=row_id
        )
        deleted += older.delete()[0]
    return deleted
