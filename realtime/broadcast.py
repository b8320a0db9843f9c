"""Broadcast job state changes to each tenant's channel-layer group, after the database write."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

if TYPE_CHECKING:
    from jobs.models import Job

logger = logging.getLogger(__name__)

# channel-layer message type; the consumer's handler for it is `job_update`.
JOB_UPDATE_EVENT = "job.update"


def tenant_group(tenant: str) -> str:
    """The channel-layer group of one tenant's subscribers (under this deployment's prefix)."""
    return f"{settings.JOBS['REDIS_PREFIX']}.tenant.{tenant}"


def iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


def job_update_message(job: Job) -> dict[str, Any]:
    """The JOB_UPDATE frame of SPEC §5 for the job's current state."""
    return {
        "type": "JOB_UPDATE",
        "tenantId": job.tenant_id,
        "jobId": str(job.id),
        "jobType": job.type,
        "status": job.status,
        "attempts": job.attempts,
        "error": job.error,
        "result": job.result,
        "progress": job.progress,
        "progressMessage": job.progress_message,
        "updatedAt": iso(job.updated_at),
    }


async def abroadcast(jobs: Iterable[Job]) -> None:
    """Send the jobs' JOB_UPDATE frames to their tenants' groups: one channel-layer message
    per tenant carrying its updates in the given order (the consumer sends one frame each)."""
    layer = get_channel_layer()
    if layer is None:
        return
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        by_tenant.setdefault(job.tenant_id, []).append(job_update_message(job))

    async def send(tenant: str, updates: list[dict[str, Any]]) -> None:
        try:
            await layer.group_send(
                tenant_group(tenant), {"type": JOB_UPDATE_EVENT, "updates": updates}
            )
        except Exception:
            # The database holds the state; a subscriber can catch up with SUBSCRIBE since.
            logger.exception(
                "broadcast failed tenant=%s job_ids=%s",
                tenant,
                ",".join(u["jobId"] for u in updates[:10]),
            )

    # Tenants are independent (order only matters within one), so their sends overlap.
    await asyncio.gather(*(send(tenant, updates) for tenant, updates in by_tenant.items()))


def broadcast(jobs: Iterable[Job]) -> None:
    """Sync wrapper for the API process (called after commit)."""
    jobs = list(jobs)
    if jobs:
        async_to_sync(abroadcast)(jobs)
