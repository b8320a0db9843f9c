"""Job rows in any state, written straight to the database (no service, no Redis): for tests of
what reads jobs (the admin, the dashboard, WebSocket replays, pruning)."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from django.utils import timezone

from jobs.models import TERMINAL_STATUSES, Job, JobStatus, Tenant


def make_job(tenant: Tenant | str, *, status: str = JobStatus.PENDING, **fields: Any) -> Job:
    """A sleep job of `tenant` in `status`, due now. `fields` override any column; a job is
    created when it was last updated unless told otherwise, and a finished one finished now."""
    now = timezone.now()
    updated_at = fields.get("updated_at", now)
    values: dict[str, Any] = {
        "type": "sleep",
        "payload": {"delayMs": 0},
        "run_at": now,
        "created_at": updated_at,
        "updated_at": updated_at,
        **fields,
    }
    if status in TERMINAL_STATUSES:
        values.setdefault("finished_at", now)
    tenant_id = tenant if isinstance(tenant, str) else tenant.id
    return Job.objects.create(tenant_id=tenant_id, status=status, **values)


async def amake_job(tenant: Tenant | str, *, status: str = JobStatus.PENDING, **fields: Any) -> Job:
    """`make_job` from async code (the row is written in the ORM's thread)."""
    return await database_sync_to_async(make_job)(tenant, status=status, **fields)
