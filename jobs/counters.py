"""Counters and histograms of job events, kept in Redis so that every process (API, workers)
adds to the same numbers and any API process can expose them at /metrics.

Keys (P is JOBS_REDIS_PREFIX), none of which expire (they are counters):
    P:metrics:events          HASH "{event}|{type}|{tenant}" -> count
    P:metrics:duration        HASH "{type}|{bucket}" -> count, "{type}|sum", "{type}|count"
    P:metrics:wait            HASH same layout, for the time from runAt to start
"""

from __future__ import annotations

import bisect
import os
import socket
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from jobs.models import Job, JobStatus

EVENTS = ("created", "completed", "failed", "retried", "cancelled")
# Upper bounds (seconds) of the histogram buckets; the last bucket is +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
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


class _Increments:
    """Adds up a batch's increments in Python, so a batch of jobs costs one Redis command per
    distinct field rather than several per job."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.sums: Counter[tuple[str, str]] = Counter()

    def observe(self, key: str, job_type: str, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[(key, f"{job_type}|{bucket_index(seconds)}")] += 1
        self.counts[(key, f"{job_type}|count")] += 1
        self.sums[(key, f"{job_type}|sum")] += seconds

    def flush(self, pipe: Any) -> None:
        for (key, field), amount in self.counts.items():
            pipe.hincrby(key, field, amount)
        for (key, field), amount in self.sums.items():
            pipe.hincrbyfloat(key, field, amount)


def event_increments(prefix: str, event: str, jobs: Iterable[Job]) -> list[tuple[str, str, int]]:
    """The (key, field, amount) HINCRBYs that count `event` for the jobs."""
    counts: Counter[str] = Counter(f"{event}|{job.type}|{job.tenant_id}" for job in jobs)
    return [(f"{prefix}:metrics:events", name, amount) for name, amount in counts.items()]


def record_outcomes(pipe: Any, prefix: str, jobs: Iterable[Job], now: datetime) -> None:
    """Count written outcomes (completed, failed, retried) and time finished attempts."""
    increments = _Increments()
    for job in jobs:
        event = OUTCOME_EVENTS.get(JobStatus(job.status))
        if event is None:
            continue
        increments.counts[(f"{prefix}:metrics:events", f"{event}|{job.type}|{job.tenant_id}")] += 1
        if job.started_at is not None:
            seconds = (now - job.started_at).total_seconds()
            increments.observe(f"{prefix}:metrics:duration", job.type, seconds)
    increments.flush(pipe)


def record_starts(pipe: Any, prefix: str, jobs: Iterable[Job]) -> None:
    """Time each claimed job waited from when it was due to when it started."""
    increments = _Increments()
    for job in jobs:
        if job.started_at is not None:
            wait = (job.started_at - job.run_at).total_seconds()
            increments.observe(f"{prefix}:metrics:wait", job.type, wait)
    increments.flush(pipe)
