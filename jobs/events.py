"""Counters and histograms of job events, kept in Redis so that every process (API, workers)
adds to the same numbers and any API process can expose them at /metrics.

Keys (P is JOBS_REDIS_PREFIX), none of which expire (they are counters):
    P:metrics:events          HASH "{event}|{type}|{tenant}" -> count
    P:metrics:duration        HASH "{type}|{bucket}" -> count, "{type}|sum", "{type}|count"
    P:metrics:wait            HASH same layout, for the time from runAt to start
    P:metrics:ws:{host}:{pid} STRING open WebSocket connections of one API process
"""

from __future__ import annotations

import bisect
import os
import socket
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from jobs.models import Job, JobStatus

EVENTS = ("created", "completed", "failed", "retried", "cancelled")
# Upper bounds (seconds) of the histogram buckets; the last bucket is +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WS_KEY_TTL_S = 3600
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"

OUTCOME_EVENTS = {
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.PENDING: "retried",
    JobStatus.CANCELLED: "cancelled",
}


def bucket_index(seconds: float) -> int:
    """Index of the first bucket whose bound is >= seconds (len(BUCKETS) is +Inf)."""
    return bisect.bisect_left(BUCKETS, seconds)


def _observe(pipe: Any, key: str, job_type: str, seconds: float) -> None:
    seconds = max(0.0, seconds)
    pipe.hincrby(key, f"{job_type}|{bucket_index(seconds)}", 1)
    pipe.hincrbyfloat(key, f"{job_type}|sum", seconds)
    pipe.hincrby(key, f"{job_type}|count", 1)


def count_events(pipe: Any, prefix: str, event: str, jobs: Iterable[Job]) -> None:
    """Queue HINCRBYs for `event` of each job on a (sync or async) pipeline."""
    key = f"{prefix}:metrics:events"
    for job in jobs:
        pipe.hincrby(key, f"{event}|{job.type}|{job.tenant_id}", 1)


def record_outcomes(pipe: Any, prefix: str, jobs: Iterable[Job], now: datetime) -> None:
    """Count written outcomes (completed, failed, retried) and time finished attempts."""
    for job in jobs:
        event = OUTCOME_EVENTS.get(JobStatus(job.status))
        if event is None:
            continue
        count_events(pipe, prefix, event, [job])
        if job.started_at is not None:
            _observe(
                pipe, f"{prefix}:metrics:duration", job.type, (now - job.started_at).total_seconds()
            )


def record_starts(pipe: Any, prefix: str, jobs: Iterable[Job]) -> None:
    """Time each claimed job waited from when it was due to when it started."""
    for job in jobs:
        if job.started_at is not None:
            wait = (job.started_at - job.run_at).total_seconds()
            _observe(pipe, f"{prefix}:metrics:wait", job.type, wait)


def websocket_delta(client: Any, prefix: str, delta: int) -> Any:
    """Count an API process's open WebSocket connections (its key expires an hour after its
    last change, so a crashed process stops counting)."""
    pipe = client.pipeline(transaction=False)
    key = f"{prefix}:metrics:ws:{PROCESS_ID}"
    pipe.incrby(key, delta)
    pipe.expire(key, WS_KEY_TTL_S)
    return pipe.execute()
