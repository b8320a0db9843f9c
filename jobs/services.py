"""Writes: tenants, API keys, signing secrets and the job state changes made on behalf of the API
and the admin.

Every state change commits first; the Redis push and the broadcast happen after commit.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from jobs import api_store, cursors, dependencies, lifecycle, netguard, scheduling, signing
from jobs.email_budget import acheck_recipient_budget, check_recipient_budget
from jobs.errors import ApiError, Conflict, NotFound
from jobs.models import (
    ApiKey,
    EventDelivery,
    EventSubscription,
    Job,
    JobDependency,
    JobStatus,
    Schedule,
    SigningSecret,
    Tenant,
)
from jobs.orm import orm
from jobs.queue import sync_queue
from jobs.ratelimit import acheck_rate_limit, check_rate_limit
from jobs.selectors import IDEMPOTENCY_WINDOW

logger = logging.getLogger(__name__)

API_KEY_PREFIX_BYTES = 6  # 12 hex characters identify a key without revealing it
LAST_USED_RESOLUTION = timedelta(minutes=1)
# `jq_<12 hex>_<token_urlsafe(32)>`; a little slack on the secret part's length.
API_KEY_RE = re.compile(r"jq_[0-9a-f]{12}_[A-Za-z0-9_\-]{20,100}")


# --- tenants and API keys -----------------------------------------------------------------------
def tenant_create(*, tenant_id: str, name: str = "") -> Tenant:
    """Create a tenant (validated slug) with its first signing secret; raises ApiError 409 if it
    exists."""
    tenant = Tenant(id=tenant_id, name=name or tenant_id)
    tenant.full_clean(validate_unique=False)
    try:
        with transaction.atomic():
            tenant.save(force_insert=True)
            signing_secret_create(tenant=tenant)
    except IntegrityError as exc:
        raise Conflict(f"tenant {tenant_id!r} already exists") from exc
    return tenant


def tenant_save(*, tenant: Tenant) -> Tenant:
    """Save a tenant's settings; its concurrency limit reaches Redis after commit (the workers
    also copy every limit from the database periodically, so a lost update heals itself)."""
    tenant.full_clean(validate_unique=False)
    with transaction.atomic():
        tenant.save()

        def sync_limit() -> None:
            try:
                sync_queue().set_tenant_limit(tenant.id, tenant.max_concurrency)
            except Exception:
                logger.exception("could not sync concurrency limit tenant=%s", tenant.id)

        transaction.on_commit(sync_limit)
    return tenant


def hash_api_key(raw_key: str) -> str:
    # Keys carry 256 bits of entropy, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_create(*, tenant: Tenant, name: str = "") -> tuple[ApiKey, str]:
    """Create a key for the tenant; returns the row and the full key, which is never stored."""
    prefix = secrets.token_hex(API_KEY_PREFIX_BYTES)
    raw_key = f"jq_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        tenant=tenant, name=name, prefix=prefix, key_hash=hash_api_key(raw_key)
    )
    return key, raw_key


def api_key_revoke(*, prefix: str) -> ApiKey:
    """Revoke a key by its prefix (with or without the `jq_` in front)."""
    prefix = prefix.removeprefix("jq_").split("_", 1)[0]
    key = ApiKey.objects.filter(prefix=prefix).first()
    if key is None:
        raise NotFound(f"no API key with prefix {prefix!r}")
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


def api_key_authenticate(*, raw_key: str) -> Tenant | None:
    """The active tenant a key belongs to, or None. Compares hashes in constant time."""
    if not API_KEY_RE.fullmatch(raw_key):
        # Not one of our keys (a NUL or any other odd character never reaches the database).
        return None
    prefix = raw_key[3:].split("_", 1)[0]
    key = (
        ApiKey.objects.select_related("tenant")
        .filter(prefix=prefix, revoked_at__isnull=True, tenant__is_active=True)
        .first()
    )
    if key is None or not hmac.compare_digest(key.key_hash, hash_api_key(raw_key)):
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        # At most one write a minute per key, not one per request.
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    return key.tenant


# --- signing secrets ----------------------------------------------------------------------------
def signing_secret_create(*, tenant: Tenant) -> SigningSecret:
    """Add a secret to the tenant's live ones (it signs until rotated away); the row holds the
    secret, to be shown once by the caller."""
    return SigningSecret.objects.create(tenant=tenant, secret=signing.new_secret())


@dataclass(frozen=True, slots=True)
class RotatedSecret:
    """A rotation's outcome: the new secret, and when the last previous one stops signing."""

    secret: SigningSecret
    previous_expires_at: datetime | None


def signing_secret_rotate(*, tenant: Tenant, rate_limited: bool = False) -> RotatedSecret:
    """Create a new signing secret; every previous live one keeps signing alongside it for
    JOBS_WEBHOOK_SECRET_OVERLAP_S (one that already expires sooner keeps its time). With
    `rate_limited`, it takes a token of the tenant's rate limit first (429)."""
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=1)
    with transaction.atomic():
        # Serialises concurrent rotations of one tenant: each sees the other's new secret.
        Tenant.objects.select_for_update().filter(pk=tenant.pk).first()
        now = timezone.now()
        overlap_end = now + timedelta(seconds=settings.JOBS["WEBHOOK_SECRET_OVERLAP_S"])
        live = SigningSecret.objects.filter(tenant=tenant).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        )
        ends = [
            overlap_end if expires is None else min(expires, overlap_end)
            for expires in live.values_list("expires_at", flat=True)
        ]
        live.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=overlap_end)).update(
            expires_at=overlap_end
        )
        secret = signing_secret_create(tenant=tenant)
    return RotatedSecret(secret=secret, previous_expires_at=max(ends, default=None))


# --- jobs ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated request to create one job."""

    type: str
    payload: dict[str, Any]
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 3
    timeout_ms: int | None = None
    # As the client asked: a relative delay is part of the request, its run_at is not.
    delay_ms: int | None = None
    # `dependencies.parse_ref` values: job ids, or `$<n>` for an earlier item of a batch.
    depends_on: tuple[str, ...] = ()

    def request_hash(self) -> str:
        body: dict[str, Any] = {
            "type": self.type,
            "payload": self.payload,
            "priority": self.priority,
            "maxAttempts": self.max_attempts,
            "timeoutMs": self.timeout_ms,
            "delayMs": self.delay_ms,
            "runAt": None
            if self.run_at is None or self.delay_ms is not None
            else self.run_at.isoformat(),
        }
        if self.depends_on:
            # Only when given: the hashes of jobs without dependencies stay what they were.
            body["dependsOn"] = list(self.depends_on)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _new_job(*, tenant: Tenant, spec: JobSpec, now: datetime, idempotency_key: str | None) -> Job:
    values = {
        "id": uuid.uuid4(),
        "tenant_id": tenant.id,
        "type": spec.type,
        "payload": spec.payload,
        "status": JobStatus.PENDING,
        "priority": spec.priority,
        "attempts": 0,
        "max_attempts": spec.max_attempts,
        "timeout_ms": spec.timeout_ms,
        "run_at": spec.run_at or now,
        "created_at": now,
        "updated_at": now,
        "idempotency_key": idempotency_key,
        "request_hash": spec.request_hash() if idempotency_key else None,
        "depends_on": [],
        "dependencies_left": 0,
        "dependents_waiting": False,
    }
    # Positional: Django's fast path (a batch builds 1,000 of these per request).
    job = Job(*[values.get(name) for name in api_store.FIELDS])
    job._state.adding = True
    return job


def _replay(existing: Job | None, job: Job, now: datetime) -> Job | None:
    """The original job if `job` repeats it within the idempotency window; raises 409 for the
    same key with another request; None if there is no live original (create `job`)."""
    if existing is None or now - existing.created_at > IDEMPOTENCY_WINDOW:
        return None
    if existing.request_hash != job.request_hash:
        raise Conflict("Idempotency-Key was already used with a different request")
    return existing


CONCURRENT_KEY = "Idempotency-Key is being used by a concurrent request"


def job_enqueue(
    *,
    tenant: Tenant,
    spec: JobSpec,
    idempotency_key: str | None = None,
    rate_limited: bool = False,
) -> tuple[Job, bool]:
    """Create a job; returns (job, created). A repeated idempotency key returns the original
    job (created=False) if the request is the same, else raises 409. With `rate_limited`, a
    creation (not a replay) takes a token of the tenant's rate limit and its email recipients
    from the tenant's hourly budget first (429)."""
    now = timezone.now()
    job = _new_job(tenant=tenant, spec=spec, now=now, idempotency_key=idempotency_key)
    if idempotency_key is None:
        if rate_limited:
            check_rate_limit(tenant=tenant, jobs=1)
            check_recipient_budget(tenant=tenant, jobs=[spec])
        with transaction.atomic():
            _insert(tenant=tenant, jobs=[job], specs=[spec], now=now)
        return job, True

    for attempt in range(3):
        existing = Job.objects.filter(tenant=tenant, idempotency_key=idempotency_key).first()
        original = _replay(existing, job, now)
        if original is not None:
            return original, False
        if existing is not None:
            # The key's window is over: free it for the new job.
            Job.objects.filter(pk=existing.pk, idempotency_key=idempotency_key).update(
                idempotency_key=None
            )
        if rate_limited and attempt == 0:
            check_rate_limit(tenant=tenant, jobs=1)
            check_recipient_budget(tenant=tenant, jobs=[spec])
        try:
            with transaction.atomic():
                _insert(tenant=tenant, jobs=[job], specs=[spec], now=now)
            return job, True
        except IntegrityError:
            # A concurrent request with the same key won the insert: read its job.
            continue
    raise ApiError(409, CONCURRENT_KEY)


def _insert(*, tenant: Tenant, jobs: list[Job], specs: Sequence[JobSpec], now: datetime) -> None:
    """Inside the caller's transaction: link the jobs to their dependencies (which decides
    their status), insert them and their edges, and publish them after commit."""
    edges: list[JobDependency] = []
    if any(spec.depends_on for spec in specs):
        if not dependencies.supported():
            raise ApiError(400, "dependsOn needs PostgreSQL")
        for job in jobs:
            # A retried insert (a concurrent idempotency key) decides again.
            job.status, job.error, job.finished_at = JobStatus.PENDING, None, None
            job.dependencies_left, job.dependents_waiting = 0, False
        locs = [("jobs", i) for i in range(len(jobs))] if len(jobs) > 1 else [()]
        edges = dependencies.link(
            tenant_id=tenant.id,
            jobs=jobs,
            depends_on=[spec.depends_on for spec in specs],
            locs=locs,
            now=now,
        )
    if len(jobs) == 1:
        jobs[0].save(force_insert=True)
    else:
        Job.objects.bulk_create(jobs, batch_size=500)
    if edges:
        JobDependency.objects.bulk_create(edges, batch_size=1000)
    lifecycle.publish_on_commit(jobs, event=lifecycle.CREATED)


async def ajob_enqueue(
    *, tenant: Tenant, spec: JobSpec, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """`job_enqueue` for the event loop, rate limit included: one INSERT and one Redis call.
    A job with dependencies takes the ORM path (its parents are locked in one transaction)."""
    if not api_store.enabled() or spec.depends_on:
        return await orm(job_enqueue)(
            tenant=tenant, spec=spec, idempotency_key=idempotency_key, rate_limited=True
        )
    now = timezone.now()
    job = _new_job(tenant=tenant, spec=spec, now=now, idempotency_key=idempotency_key)
    if idempotency_key is None:
        await acheck_rate_limit(tenant=tenant, jobs=1)
        await acheck_recipient_budget(tenant=tenant, jobs=[spec])
        await api_store.insert_job(job)
        await lifecycle.apublish([job], event=lifecycle.CREATED)
        return job, True

    for attempt in range(3):
        existing = await api_store.find_by_idempotency_key(tenant_id=tenant.id, key=idempotency_key)
        original = _replay(existing, job, now)
        if original is not None:
            return original, False
        if existing is not None:
            await api_store.free_idempotency_key(job_id=existing.id, key=idempotency_key)
        if attempt == 0:
            # A replay spends no token; a creation does.
            await acheck_rate_limit(tenant=tenant, jobs=1)
            await acheck_recipient_budget(tenant=tenant, jobs=[spec])
        if await api_store.insert_idempotent(job):
            await lifecycle.apublish([job], event=lifecycle.CREATED)
            return job, True
    raise ApiError(409, CONCURRENT_KEY)


def _new_batch(*, tenant: Tenant, specs: Sequence[JobSpec]) -> list[Job]:
    now = timezone.now()
    # One microsecond apart, so the batch keeps its order in the queue and in listings.
    return [
        _new_job(
            tenant=tenant, spec=spec, now=now + timedelta(microseconds=i), idempotency_key=None
        )
        for i, spec in enumerate(specs)
    ]


def job_enqueue_batch(
    *, tenant: Tenant, specs: Sequence[JobSpec], rate_limited: bool = False
) -> list[Job]:
    """Create many jobs in one transaction and push them in one Redis round trip. Items may
    depend on existing jobs and on earlier items (`$<n>`): a whole graph at once."""
    dependencies.check_batch_size([spec.depends_on for spec in specs])
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=len(specs))
        check_recipient_budget(tenant=tenant, jobs=specs)
    jobs = _new_batch(tenant=tenant, specs=specs)
    with transaction.atomic():
        _insert(tenant=tenant, jobs=jobs, specs=specs, now=jobs[0].created_at)
    return jobs


def _batch_hash(specs: Sequence[JobSpec]) -> str:
    body = json.dumps(["batch", *(spec.request_hash() for spec in specs)])
    return hashlib.sha256(body.encode()).hexdigest()


def _batch_ids(first: uuid.UUID, count: int) -> list[uuid.UUID]:
    """The ids of a keyed batch: the first one's (random) and ids derived from it, so that a
    replay can name every job of the batch from the one row that holds the key."""
    return [first, *(uuid.uuid5(first, str(i)) for i in range(1, count))]


def job_enqueue_batch_keyed(
    *,
    tenant: Tenant,
    specs: Sequence[JobSpec],
    idempotency_key: str,
    rate_limited: bool = False,
) -> tuple[list[uuid.UUID], bool]:
    """`job_enqueue_batch` with an `Idempotency-Key`: (job ids, created). The key is held by
    the batch's first job, with the hash of the whole request; repeating the request within
    the window returns the same ids and creates nothing, another request with the key is 409."""
    dependencies.check_batch_size([spec.depends_on for spec in specs])
    for attempt in range(3):
        jobs = _new_batch(tenant=tenant, specs=specs)
        for job, job_id in zip(jobs, _batch_ids(jobs[0].id, len(jobs)), strict=True):
            job.id = job_id
        jobs[0].idempotency_key, jobs[0].request_hash = idempotency_key, _batch_hash(specs)
        existing = Job.objects.filter(tenant=tenant, idempotency_key=idempotency_key).first()
        original = _replay(existing, jobs[0], jobs[0].created_at)
        if original is not None:
            return _batch_ids(original.id, len(specs)), False
        if existing is not None:
            Job.objects.filter(pk=existing.pk, idempotency_key=idempotency_key).update(
                idempotency_key=None
            )
        if rate_limited and attempt == 0:
            check_rate_limit(tenant=tenant, jobs=len(specs))
            check_recipient_budget(tenant=tenant, jobs=specs)
        try:
            with transaction.atomic():
                _insert(tenant=tenant, jobs=jobs, specs=specs, now=jobs[0].created_at)
            return [job.id for job in jobs], True
        except IntegrityError:
            continue
    raise ApiError(409, CONCURRENT_KEY)


async def ajob_enqueue_batch(*, tenant: Tenant, specs: Sequence[JobSpec]) -> list[Job]:
    """`job_enqueue_batch` for the event loop, rate limit included: one COPY, one Redis call.
    A batch with dependencies takes the ORM path (parents locked, edges written, one
    transaction)."""
    if not api_store.enabled() or any(spec.depends_on for spec in specs):
        return await orm(job_enqueue_batch)(tenant=tenant, specs=specs, rate_limited=True)
    await acheck_rate_limit(tenant=tenant, jobs=len(specs))
    await acheck_recipient_budget(tenant=tenant, jobs=specs)
    jobs = _new_batch(tenant=tenant, specs=specs)
    await api_store.insert_jobs(jobs)
    await lifecycle.apublish(jobs, event=lifecycle.CREATED)
    return jobs


def _locked_job(*, tenant: Tenant, job_id: uuid.UUID) -> Job:
    job = Job.objects.select_for_update().filter(tenant=tenant, id=job_id).first()
    if job is None:
        raise NotFound()
    return job


def job_cancel(*, tenant: Tenant, job_id: uuid.UUID, rate_limited: bool = False) -> Job:
    """Cancel a WAITING or PENDING job (it never runs) or a RUNNING one (its worker stops the
    handler); the jobs that wait for it are cancelled too, down the graph. With
    `rate_limited`, it takes a token of the tenant's rate limit first (429)."""
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=1)
    with transaction.atomic():
        job = _locked_job(tenant=tenant, job_id=job_id)
        if job.status not in (JobStatus.WAITING, JobStatus.PENDING, JobStatus.RUNNING):
            raise Conflict(f"a {job.status} job cannot be cancelled", {"status": job.status})
        return lifecycle.cancel(job)


def job_retry(*, tenant: Tenant, job_id: uuid.UUID, rate_limited: bool = False) -> Job:
    """Put a FAILED or CANCELLED job back to PENDING with its attempts reset. With
    `rate_limited`, it takes a token of the tenant's rate limit first (429): a retry runs the
    job again (a webhook call, an email), so unlimited retries would bypass the limit; an
    email's recipients come out of the tenant's hourly budget again too."""
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=1)
    with transaction.atomic():
        job = _locked_job(tenant=tenant, job_id=job_id)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise Conflict(f"a {job.status} job cannot be retried", {"status": job.status})
        if job.depends_on:
            unfinished = (
                Job.objects.filter(tenant=tenant, id__in=job.depends_on)
                .exclude(status=JobStatus.COMPLETED)
                .values_list("id", flat=True)
                .first()
            )
            if unfinished is not None:
                raise Conflict(
                    f"dependency {unfinished} is not completed", {"dependency": str(unfinished)}
                )
        if rate_limited:
            check_recipient_budget(tenant=tenant, jobs=[job])
        return lifecycle.retry(job)


# --- event subscriptions ------------------------------------------------------------------------
MAX_EVENT_SUBSCRIPTIONS = 20


def blocked_url_reason(url: str) -> str | None:
    """Why the network policy refuses `url` already by its host, when that is an IP address
    (a name is checked on every request, where it resolves); None if it may be tried."""
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        address = ipaddress.ip_address(netguard.normalize_host(parsed.host))
    except ValueError:
        return None
    allow = netguard.parse_allow_list(settings.JOBS.get("WEBHOOK_ALLOWED_HOSTS") or [])
    return netguard.check_address(parsed.host, address, allow, port=port)


def event_subscription_create(
    *,
    tenant: Tenant,
    url: str,
    events: Sequence[str],
    description: str = "",
    rate_limited: bool = False,
) -> EventSubscription:
    """Subscribe the tenant to its jobs' events from now on (its position is the watermark,
    so no earlier change is sent). At most MAX_EVENT_SUBSCRIPTIONS per tenant (409); a URL
    whose address the network policy refuses is 400."""
    reason = blocked_url_reason(url)
    if reason is not None:
        raise ApiError(
            400,
            "Validation failed",
            [{"field": "url", "message": f"url is blocked: {reason}"}],
        )
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=1)
    position = cursors.watermark()
    if position is None:
        raise ApiError(503, "the database is busy; try again")
    with transaction.atomic():
        # Serialises concurrent creations of one tenant, so the cap holds.
        Tenant.objects.select_for_update().filter(pk=tenant.pk).first()
        if EventSubscription.objects.filter(tenant=tenant).count() >= MAX_EVENT_SUBSCRIPTIONS:
            raise Conflict(
                f"a tenant has at most {MAX_EVENT_SUBSCRIPTIONS} event subscriptions",
                {"max": MAX_EVENT_SUBSCRIPTIONS},
            )
        return EventSubscription.objects.create(
            tenant=tenant,
            url=url,
            events=list(dict.fromkeys(events)),
            description=description,
            created_at=timezone.now(),
            cursor=position,
        )


def event_subscription_delete(
    *, tenant: Tenant, subscription_id: uuid.UUID, rate_limited: bool = False
) -> None:
    """Delete one of the tenant's subscriptions and its log (404 for another's); its pending
    deliveries then complete without a request."""
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=1)
    deleted, _ = EventSubscription.objects.filter(tenant=tenant, id=subscription_id).delete()
    if not deleted:
        raise NotFound()


def event_delivery_log(
    *,
    subscription: EventSubscription,
    job_id: str,
    event_type: str,
    event_id: str,
    attempt: int,
    status_code: int | None,
    duration_ms: int | None,
    error: str | None,
) -> None:
    """Write one delivery attempt to the subscription's log (the worker's; nothing if the
    subscription was deleted meanwhile)."""
    try:
        EventDelivery.objects.create(
            subscription=subscription,
            job_id=job_id,
            event_type=event_type,
            event_id=event_id,
            attempt=attempt,
            status_code=status_code,
            duration_ms=duration_ms,
            error=error[:2000] if error else error,
            created_at=timezone.now(),
        )
    except IntegrityError:
        logger.info("delivery not logged: subscription %s is gone", subscription.id)


# --- schedules ----------------------------------------------------------------------------------
SCHEDULE_FIELDS = ("name", "cron", "every", "timezone", "job", "enabled", "overlap")


def _schedule_invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "Validation failed", [{"field": field, "message": message}])


def _check_timing(schedule: Schedule) -> None:
    """Exactly one of cron and every; every at least JOBS_SCHEDULE_MIN_EVERY_S; a cron
    expression that matches in the schedule's time zone."""
    if (schedule.cron is None) == (schedule.every is None):
        raise _schedule_invalid("cron", "give exactly one of cron and every")
    minimum = settings.JOBS["SCHEDULE_MIN_EVERY_S"]
    if schedule.every is not None and schedule.every < minimum:
        raise _schedule_invalid("every", f"every must be at least {minimum} seconds")
    if schedule.cron is not None:
        try:
            scheduling.check_cron(schedule.cron, schedule.timezone)
        except scheduling.ScheduleError as exc:
            raise _schedule_invalid("cron", str(exc)) from exc


def _plan_next_run(schedule: Schedule, *, now: datetime) -> None:
    schedule.next_run_at = (
        scheduling.Timing.of(schedule).next_after(now) if schedule.enabled else None
    )


def _name_taken(tenant: Tenant, name: str) -> Conflict:
    return Conflict(f"a schedule named {name!r} exists already", {"field": "name"})


def schedule_create(
    *, tenant: Tenant, values: dict[str, Any], rate_limited: bool = False
) -> Schedule:
    """Create a schedule from validated `values` (the wire's fields, snake_case, its job as
    `validation.schedule_job` returns it). 400 for a bad timing, 409 for a name the tenant
    uses already or past JOBS_MAX_SCHEDULES_PER_TENANT."""
    now = timezone.now()
    schedule = Schedule(tenant=tenant, created_at=now, updated_at=now, **values)
    _check_timing(schedule)
    _plan_next_run(schedule, now=now)
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=1)
    cap = settings.JOBS["MAX_SCHEDULES_PER_TENANT"]
    try:
        with transaction.atomic():
            # Serialises concurrent creations of one tenant, so the cap holds.
            Tenant.objects.select_for_update().filter(pk=tenant.pk).first()
            if Schedule.objects.filter(tenant=tenant).count() >= cap:
                raise Conflict(f"a tenant has at most {cap} schedules", {"max": cap})
            schedule.save(force_insert=True)
    except IntegrityError as exc:
        raise _name_taken(tenant, schedule.name) from exc
    return schedule


def schedule_update(
    *,
    tenant: Tenant,
    schedule_id: uuid.UUID,
    changes: dict[str, Any],
    rate_limited: bool = False,
) -> Schedule:
    """Change some fields of one of the tenant's schedules (404 for another's). A change of
    its timing, or enabling it, plans its next run from now; disabling clears it."""
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=1)
    try:
        with transaction.atomic():
            schedule = (
                Schedule.objects.select_for_update().filter(tenant=tenant, id=schedule_id).first()
            )
            if schedule is None:
                raise NotFound("Schedule not found")
            replan = any(
                name in changes and changes[name] != getattr(schedule, name)
                for name in ("cron", "every", "timezone", "enabled")
            )
            for name, value in changes.items():
                setattr(schedule, name, value)
            _check_timing(schedule)
            now = timezone.now()
            if replan or (schedule.enabled and schedule.next_run_at is None):
                _plan_next_run(schedule, now=now)
            schedule.updated_at = now
            schedule.save()
    except IntegrityError as exc:
        raise _name_taken(tenant, changes.get("name", "")) from exc
    return schedule


def schedule_delete(*, tenant: Tenant, schedule_id: uuid.UUID, rate_limited: bool = False) -> None:
    """Delete one of the tenant's schedules (404 for another's); its jobs stay as they are."""
    if rate_limited:
        check_rate_limit(tenant=tenant, jobs=1)
    deleted, _ = Schedule.objects.filter(tenant=tenant, id=schedule_id).delete()
    if not deleted:
        raise NotFound("Schedule not found")


def schedule_set_enabled(*, schedule: Schedule, enabled: bool) -> Schedule:
    """Enable (next run planned from now) or disable a schedule: the admin's actions."""
    return schedule_update(
        tenant=schedule.tenant, schedule_id=schedule.id, changes={"enabled": enabled}
    )
