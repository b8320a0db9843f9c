"""The jobs REST API: parse, call a service or selector, return."""

from __future__ import annotations

import logging
from uuid import UUID

from django.http import HttpRequest
from ninja import Header, Query, Router
from ninja.responses import Status
from ninja.security import HttpBearer

from jobs import selectors, services
from jobs.models import Job, Tenant
from jobs.ratelimit import check_rate_limit
from jobs.schemas import (
    BatchCreatedOut,
    ErrorOut,
    JobBatchIn,
    JobCreatedOut,
    JobFilter,
    JobIn,
    JobListOut,
    JobOut,
    StatsOut,
)
from jobs.validation import check_tenant, job_spec

logger = logging.getLogger(__name__)


class ApiKeyAuth(HttpBearer):
    """`Authorization: Bearer <api key>`; the key decides the tenant (`request.auth`)."""

    def __call__(self, request: HttpRequest) -> Tenant | None:
        # Overridden so that a malformed header is never logged (it may hold a key).
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.authenticate(request, token.strip())

    def authenticate(self, request: HttpRequest, token: str) -> Tenant | None:
        return services.api_key_authenticate(raw_key=token)


router = Router(auth=ApiKeyAuth(), by_alias=True, tags=["jobs"])
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
def create_job(
    request: HttpRequest,
    data: JobIn,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=255),
) -> Status[Job]:
    """Create one job. Repeating an `Idempotency-Key` returns the original job (200)."""
    tenant: Tenant = request.auth
    check_tenant(tenant, data.tenant_id)
    spec = job_spec(data)
    idempotency_key = idempotency_key or None
    if idempotency_key is None or not selectors.idempotent_job_exists(
        tenant=tenant, idempotency_key=idempotency_key
    ):
        # A replay of an earlier request creates nothing, so it spends no token.
        check_rate_limit(tenant=tenant, jobs=1)
    job, created = services.job_enqueue(tenant=tenant, spec=spec, idempotency_key=idempotency_key)
    return Status(201 if created else 200, job)


@router.post("/jobs/batch", response={201: BatchCreatedOut, **ERRORS})
def create_jobs_batch(request: HttpRequest, data: JobBatchIn) -> Status[dict]:
    """Create up to 1,000 jobs atomically: all are valid and created, or none is."""
    tenant: Tenant = request.auth
    check_tenant(tenant, data.tenant_id)
    specs = []
    for index, item in enumerate(data.jobs):
        check_tenant(tenant, item.tenant_id)
        specs.append(job_spec(item, loc=("jobs", index)))
    check_rate_limit(tenant=tenant, jobs=len(specs))
    jobs = services.job_enqueue_batch(tenant=tenant, specs=specs)
    return Status(201, {"job_ids": [job.id for job in jobs]})


@router.get("/jobs", response={200: JobListOut, **ERRORS})
def list_jobs(request: HttpRequest, filters: Query[JobFilter]) -> dict:
    """The tenant's jobs, newest first, with `total` for pagination."""
    tenant: Tenant = request.auth
    check_tenant(tenant, filters.tenant_id)
    qs = selectors.job_list(tenant=tenant, status=filters.status, job_type=filters.type)
    page = list(qs[filters.offset : filters.offset + filters.limit])
    return {
        "jobs": page,
        "total": qs.count(),
        "limit": filters.limit,
        "offset": filters.offset,
    }


@router.get("/stats", response={200: StatsOut, **ERRORS})
def stats(request: HttpRequest) -> dict:
    """The tenant's queue depth (ready, delayed, running) and job counts by status."""
    tenant: Tenant = request.auth
    depth = selectors.tenant_queue_depths(tenant_ids=[tenant.id])[tenant.id]
    return {
        "tenant_id": tenant.id,
        "queue": depth,
        "jobs": selectors.job_counts_by_status(tenant=tenant),
        "max_concurrency": tenant.max_concurrency,
    }


@router.get("/jobs/{job_id}", response={200: JobOut, 404: ErrorOut, **ERRORS})
def get_job(request: HttpRequest, job_id: UUID) -> Job:
    """One job of the tenant (404 for an unknown job or another tenant's)."""
    return selectors.job_get(tenant=request.auth, job_id=job_id)


@router.post(
    "/jobs/{job_id}/cancel", response={200: JobOut, 404: ErrorOut, 409: ErrorOut, **ERRORS}
)
def cancel_job(request: HttpRequest, job_id: UUID) -> Job:
    """PENDING: cancelled at once. RUNNING: cancelled, and its handler is stopped."""
    return services.job_cancel(tenant=request.auth, job_id=job_id)


@router.post("/jobs/{job_id}/retry", response={200: JobOut, 404: ErrorOut, 409: ErrorOut, **ERRORS})
def retry_job(request: HttpRequest, job_id: UUID) -> Job:
    """FAILED or CANCELLED back to PENDING, attempts reset."""
    return services.job_retry(tenant=request.auth, job_id=job_id)
