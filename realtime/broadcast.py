"""Broadcast job state changes to the tenant's subscribers, after the database write.

Each change is PUBLISHed on its tenant's Redis channel (`P:updates:{tenant}`, realtime/hub.py);
every API process with a socket watching that tenant receives it once and fans it out in memory.
Several changes of one tenant travel as one message, in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings

from realtime.hub import encode_frames, updates_channel

if TYPE_CHECKING:
    from jobs.models import Job


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
        "cursor": None if job.cursor is None else str(job.cursor),
    }


def frame_text(frame: dict[str, Any]) -> str:
    """A frame as the JSON text sent on the socket (encoded once, whatever the audience).

    orjson: a batch of 1,000 jobs publishes 1,000 frames, and every update of every job is
    encoded here once. It refuses what the json module accepts (integers beyond 64 bits in a
    result, say): those take the json module."""
    try:
        return orjson.dumps(frame).decode()
    except TypeError:
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def update_messages(jobs: Iterable[Job], prefix: str | None = None) -> list[tuple[str, str]]:
    """(channel, message) per tenant: the jobs' JOB_UPDATE frames in the given order."""
    prefix = prefix or settings.JOBS["REDIS_PREFIX"]
    by_tenant: dict[str, list[str]] = {}
    for job in jobs:
        by_tenant.setdefault(job.tenant_id, []).append(frame_text(job_update_message(job)))
    return [
        (updates_channel(prefix, tenant), encode_frames(texts))
        for tenant, texts in by_tenant.items()
    ]
