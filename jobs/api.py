"""The jobs REST API: parse, call a service or selector, return."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from django.http import HttpRequest, HttpResponse
from ninja import Header, Query, Router
from ninja.responses import Status
from ninja.security import HttpBearer

from jobs import selectors, services
from jobs.auth import aauthenticate
from jobs.errors import ApiError
from jobs.models import Tenant
from jobs.orm import orm
from jobs.schemas import (
    BatchCreatedOut,
    ErrorOut,
    EventDeliveryListOut,
    EventSubscriptionIn,
    EventSubscriptionListOut,
    EventSubscriptionOut,
    JobBatchIn,
    JobCreatedOut,
    JobFilter,
    JobIn,
    JobListOut,
    JobOut,
    ScheduleIn,
    ScheduleListOut,
    ScheduleOut,
    SchedulePatch,
    SigningSecretRotatedOut,
    StatsOut,
    job_data,
    job_json,
)
from jobs.validation import VALIDATION_FAILED, check_tenant, job_spec, schedule_job

logger = logging.getLogger(__name__)


class ApiKeyAuth(HttpBearer):
    """`Authorization: Bearer <api key>`; the key decides the tenant (`request.auth`).

    Answered from the process's key cache in the normal case (jobs/auth.py), so a request
    makes no database query to authenticate."""

    def __call__(self, request: HttpRequest) -> Any:
        # Overridden so that a malformed header is never logged (it may hold a key).
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.authenticate(request, token.strip())

    async def authenticate(self, request: HttpRequest, token: str) -> Tenant | None:
        return await aauthenticate(token)


router = Router(auth=ApiKeyAuth(), by_alias=True, tags=["jobs"])


def json_response(body: str, *, status: int = 200) -> HttpResponse:
    """A JSON body rendered by the view itself (ninja passes an HttpResponse through)."""
    # An explicit charset: otherwise Django parses it back out of the content type (through the
    # email package) for every response.
    return HttpResponse(
        body, status=status, content_type="application/json; charset=utf-8", charset="utf-8"
    )


ERRORS = {
    400: ErrorOut,
    401: ErrorOut,
    403: ErrorOut,
    413: ErrorOut,
    415: ErrorOut,
    429: ErrorOut,
    503: ErrorOut,
}


@router.post("/jobs", response={200: JobCreatedOut, 201: JobCreatedOut, 409: ErrorOut, **ERRORS})
async def create_job(
    request: HttpRequest,
    data: JobIn,
    idempotency_key: str | None = Header(
        None, alias="Idempotency-Key", min_length=1, max_length=255
    ),
) -> HttpResponse:
    """Create one job. Repeating an `Idempotency-Key` returns the original job (200)."""
    tenant: Tenant = request.auth
    check_tenant(tenant, data.tenant_id)
    job, created = await services.ajob_enqueue(
        tenant=tenant, spec=job_spec(data), idempotency_key=idempotency_key or None
    )
    return json_response(job_json(job, with_job_id=True), status=201 if created else 200)


@router.post(
    "/jobs/batch", response={200: BatchCreatedOut, 201: BatchCreatedOut, 409: ErrorOut, **ERRORS}
)
async def create_jobs_batch(
    request: HttpRequest,
    data: JobBatchIn,
    idempotency_key: str | None = Header(
        None, alias="Idempotency-Key", min_length=1, max_length=255
    ),
) -> Status[dict]:
    """Create up to 1,000 jobs atomically: all are valid and created, or none is. Items may
    depend on earlier ones (`"$<index>"` in `dependsOn`): a whole graph in one request.
    Repeating an `Idempotency-Key` returns the original ids (200)."""
    tenant: Tenant = request.auth
    check_tenant(tenant, data.tenant_id)
    specs = []
    for index, item in enumerate(data.jobs):
        check_tenant(tenant, item.tenant_id)
        specs.append(job_spec(item, loc=("jobs", index), batch_index=index))
    if idempotency_key:
        keyed = orm(services.job_enqueue_batch_keyed)
        ids, created = await keyed(
            tenant=tenant, specs=specs, idempotency_key=idempotency_key, rate_limited=True
        )
        return Status(201 if created else 200, {"job_ids": ids})
    jobs = await services.ajob_enqueue_batch(tenant=tenant, specs=specs)
    return Status(201, {"job_ids": [job.id for job in jobs]})


def _job_page(*, tenant: Tenant, filters: JobFilter) -> dict:
    qs = selectors.job_list(tenant=tenant, status=filters.status, job_type=filters.type)
    return {
        "jobs": [job_data(job) for job in qs[filters.offset : filters.offset + filters.limit]],
        "total": qs.count(),
        "limit": filters.limit,
        "offset": filters.offset,
    }


@router.get("/jobs", response={200: JobListOut, **ERRORS})
async def list_jobs(request: HttpRequest, filters: Query[JobFilter]) -> dict:
    """The tenant's jobs, newest first, with `total` for pagination."""
    tenant: Tenant = request.auth
    check_tenant(tenant, filters.tenant_id)
    return await orm(_job_page)(tenant=tenant, filters=filters)


def _stats(*, tenant: Tenant) -> dict:
    depth = selectors.tenant_queue_depths(tenant_ids=[tenant.id])[tenant.id]
    return {
        "tenant_id": tenant.id,
        "queue": depth,
        "jobs": selectors.job_counts_by_status(tenant=tenant),
        "max_concurrency": tenant.max_concurrency,
    }


@router.get("/stats", response={200: StatsOut, **ERRORS})
async def stats(request: HttpRequest) -> dict:
    """The tenant's queue depth (ready, delayed, running) and job counts by status."""
    return await orm(_stats)(tenant=request.auth)


@router.get("/jobs/{job_id}", response={200: JobOut, 404: ErrorOut, **ERRORS})
async def get_job(request: HttpRequest, job_id: UUID) -> HttpResponse:
    """One job of the tenant (404 for an unknown job or another tenant's)."""
    return json_response(job_json(await selectors.ajob_get(tenant=request.auth, job_id=job_id)))


@router.post(
    "/jobs/{job_id}/cancel", response={200: JobOut, 404: ErrorOut, 409: ErrorOut, **ERRORS}
)
async def cancel_job(request: HttpRequest, job_id: UUID) -> dict:
    """WAITING or PENDING: cancelled at once. RUNNING: cancelled, and its handler is stopped.
    The jobs waiting for it are cancelled too, down the graph."""
    cancel = orm(services.job_cancel)
    return job_data(await cancel(tenant=request.auth, job_id=job_id, rate_limited=True))


@router.post("/jobs/{job_id}/retry", response={200: JobOut, 404: ErrorOut, 409: ErrorOut, **ERRORS})
async def retry_job(request: HttpRequest, job_id: UUID) -> dict:
    """FAILED or CANCELLED back to PENDING, attempts reset."""
    retry = orm(services.job_retry)
    return job_data(await retry(tenant=request.auth, job_id=job_id, rate_limited=True))


def _rotate(*, tenant: Tenant) -> dict:
    rotated = services.signing_secret_rotate(tenant=tenant, rate_limited=True)
    return {
        "secret": rotated.secret.secret,
        "created_at": rotated.secret.created_at,
        "previous_expires_at": rotated.previous_expires_at,
    }


@router.post(
    "/signing-secrets/rotate", response={201: SigningSecretRotatedOut, **ERRORS}, tags=["webhooks"]
)
async def rotate_signing_secret(request: HttpRequest) -> Status[dict]:
    """A new webhook signing secret, shown once; the previous ones keep signing alongside it
    for JOBS_WEBHOOK_SECRET_OVERLAP_S (24 hours by default)."""
    return Status(201, await orm(_rotate)(tenant=request.auth))


# --- event subscriptions ------------------------------------------------------------------------
DELIVERIES_SHOWN = 100


def _subscription_data(subscription: Any) -> dict:
    return {
        "id": subscription.id,
        "url": subscription.url,
        "events": subscription.events,
        "description": subscription.description,
        "created_at": subscription.created_at,
    }


def _create_subscription(*, tenant: Tenant, data: EventSubscriptionIn) -> dict:
    subscription = services.event_subscription_create(
        tenant=tenant,
        url=data.url,
        events=data.events,
        description=data.description,
        rate_limited=True,
    )
    return _subscription_data(subscription)


@router.post(
    "/event-subscriptions",
    response={201: EventSubscriptionOut, 409: ErrorOut, **ERRORS},
    tags=["webhooks"],
)
async def create_event_subscription(request: HttpRequest, data: EventSubscriptionIn) -> Status:
    """Subscribe to the tenant's job events from now on: each matching change is POSTed to
    `url`, signed, retried for up to 24 hours, in order per job (at most 20 subscriptions)."""
    return Status(201, await orm(_create_subscription)(tenant=request.auth, data=data))


def _list_subscriptions(*, tenant: Tenant) -> dict:
    subscriptions = selectors.event_subscription_list(tenant=tenant)
    return {"subscriptions": [_subscription_data(s) for s in subscriptions]}


@router.get(
    "/event-subscriptions", response={200: EventSubscriptionListOut, **ERRORS}, tags=["webhooks"]
)
async def list_event_subscriptions(request: HttpRequest) -> dict:
    """The tenant's event subscriptions, newest first."""
    return await orm(_list_subscriptions)(tenant=request.auth)


@router.delete(
    "/event-subscriptions/{subscription_id}",
    response={204: None, 404: ErrorOut, **ERRORS},
    tags=["webhooks"],
)
async def delete_event_subscription(request: HttpRequest, subscription_id: UUID) -> Status:
    """Delete a subscription and its delivery log; its pending deliveries are not sent."""
    delete = orm(services.event_subscription_delete)
    await delete(tenant=request.auth, subscription_id=subscription_id, rate_limited=True)
    return Status(204, None)


def _deliveries(*, tenant: Tenant, subscription_id: UUID) -> dict:
    rows = selectors.event_delivery_list(
        tenant=tenant, subscription_id=subscription_id, limit=DELIVERIES_SHOWN
    )
    return {
        "deliveries": [
            {
                "event": row.event_type,
                "event_id": row.event_id,
                "job_id": row.job_id,
                "attempt": row.attempt,
                "status_code": row.status_code,
                "duration_ms": row.duration_ms,
                "error": row.error,
                "created_at": row.created_at,
            }
            for row in rows
        ]
    }


@router.get(
    "/event-subscriptions/{subscription_id}/deliveries",
    response={200: EventDeliveryListOut, 404: ErrorOut, **ERRORS},
    tags=["webhooks"],
)
async def list_event_deliveries(request: HttpRequest, subscription_id: UUID) -> dict:
    """The subscription's latest 100 delivery attempts, newest first."""
    return await orm(_deliveries)(tenant=request.auth, subscription_id=subscription_id)


# --- schedules ----------------------------------------------------------------------------------
def schedule_data(schedule: Any) -> dict:
    """A schedule's ScheduleOut fields."""
    job = schedule.job
    return {
        "id": schedule.id,
        "tenant_id": schedule.tenant_id,
        "name": schedule.name,
        "cron": schedule.cron,
        "every": schedule.every,
        "timezone": schedule.timezone,
        "job": {
            "type": job["type"],
            "payload": job["payload"],
            "priority": job.get("priority", 0),
            "max_attempts": job.get("maxAttempts", 3),
        },
        "enabled": schedule.enabled,
        "overlap": schedule.overlap,
        "next_run_at": schedule.next_run_at,
        "last_run_at": schedule.last_run_at,
        "created_at": schedule.created_at,
        "updated_at": schedule.updated_at,
    }


def _create_schedule(*, tenant: Tenant, data: ScheduleIn) -> dict:
    values = data.model_dump(exclude={"job"})
    values["job"] = schedule_job(data.job)
    if values["cron"] is not None:
        values["cron"] = values["cron"].strip()
    schedule = services.schedule_create(tenant=tenant, values=values, rate_limited=True)
    return schedule_data(schedule)


@router.post("/schedules", response={201: ScheduleOut, 409: ErrorOut, **ERRORS}, tags=["schedules"])
async def create_schedule(request: HttpRequest, data: ScheduleIn) -> Status:
    """Create a schedule: its job is created at each due time of `cron` (in `timezone`) or
    every `every` seconds, once per due time however many workers run."""
    return Status(201, await orm(_create_schedule)(tenant=request.auth, data=data))


def _list_schedules(*, tenant: Tenant) -> dict:
    return {"schedules": [schedule_data(s) for s in selectors.schedule_list(tenant=tenant)]}


@router.get("/schedules", response={200: ScheduleListOut, **ERRORS}, tags=["schedules"])
async def list_schedules(request: HttpRequest) -> dict:
    """The tenant's schedules, by name."""
    return await orm(_list_schedules)(tenant=request.auth)


def _get_schedule(*, tenant: Tenant, schedule_id: UUID) -> dict:
    return schedule_data(selectors.schedule_get(tenant=tenant, schedule_id=schedule_id))


@router.get(
    "/schedules/{schedule_id}",
    response={200: ScheduleOut, 404: ErrorOut, **ERRORS},
    tags=["schedules"],
)
async def get_schedule(request: HttpRequest, schedule_id: UUID) -> dict:
    """One schedule of the tenant (404 for an unknown one or another tenant's)."""
    return await orm(_get_schedule)(tenant=request.auth, schedule_id=schedule_id)


def _update_schedule(*, tenant: Tenant, schedule_id: UUID, data: SchedulePatch) -> dict:
    changes = data.model_dump(include=data.model_fields_set, exclude={"job"})
    for name in ("name", "timezone", "job", "enabled", "overlap"):
        if name in data.model_fields_set and getattr(data, name) is None:
            raise ApiError(
                400,
                VALIDATION_FAILED,
                [{"field": name, "message": f"{name} cannot be null"}],
            )
    if data.job is not None:
        changes["job"] = schedule_job(data.job)
    if changes.get("cron") is not None:
        changes["cron"] = changes["cron"].strip()
    schedule = services.schedule_update(
        tenant=tenant, schedule_id=schedule_id, changes=changes, rate_limited=True
    )
    return schedule_data(schedule)


@router.patch(
    "/schedules/{schedule_id}",
    response={200: ScheduleOut, 404: ErrorOut, 409: ErrorOut, **ERRORS},
    tags=["schedules"],
)
async def update_schedule(request: HttpRequest, schedule_id: UUID, data: SchedulePatch) -> dict:
    """Change a schedule; fields left out keep their value. A new timing, or enabling it,
    plans the next run from now."""
    update = orm(_update_schedule)
    return await update(tenant=request.auth, schedule_id=schedule_id, data=data)


@router.delete(
    "/schedules/{schedule_id}",
    response={204: None, 404: ErrorOut, **ERRORS},
    tags=["schedules"],
)
async def delete_schedule(request: HttpRequest, schedule_id: UUID) -> Status:
    """Delete a schedule; the jobs it made stay."""
    delete = orm(services.schedule_delete)
    await delete(tenant=request.auth, schedule_id=schedule_id, rate_limited=True)
    return Status(204, None)
