"""Reads of jobs, always scoped by tenant."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db.models import QuerySet

from jobs.errors import NotFound
from jobs.models import Job, Tenant


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


def job_updated_since(*, tenant_id: str, since: datetime, limit: int) -> list[Job]:
    """The tenant's jobs changed after `since`, oldest change first (WebSocket catch-up)."""
    return list(
        Job.objects.filter(tenant_id=tenant_id, updated_at__gt=since).order_by("updated_at", "id")[
            :limit
        ]
    )
