"""Counters and histograms of job events, kept in Redis so that every process (API, workers)
adds to the same numbers and any API process can expose them at /metrics.

This module computes what to add and reads back what was added; the hashes they live in and the
commands are the queue's (`Queue.event_increments`, `Queue.record_starts`,
`Queue.record_outcomes`, `Queue.job_event_metrics`). Fields of each hash:
    events    "{event}|{type}|{tenant}" -> count
    duration  "{type}|{bucket}" -> count, "{type}|sum", "{type}|count": start to outcome
    wait      the same layout, for the time from runAt to start
"""

from __future__ import annotations

import bisect
import os
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from jobs.models import Job, JobStatus

# `held`: an attempt a webhook's destination protection ended before its request
# (jobs/destinations.py): the job waits, PENDING, its attempt not spent; neither a retry nor a
# failure.
EVENTS = ("created", "completed", "failed", "retried", "cancelled", "held")
HELD = "held"
# Upper bounds (seconds) of the histogram buckets; the last bucket is +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"

# The metric hashes (`Keys.metrics(name)` in jobs/queue.py).
MetricHash = Literal["events", "duration", "wait"]

OUTCOME_EVENTS = {
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.PENDING: "retried",
    JobStatus.CANCELLED: "cancelled",
}


def bucket_index(seconds: float) -> int:
    """Index of the first bucket whose bound is >= seconds (len(BUCKETS) is +Inf)."""
    return bisect.bisect_left(BUCKETS, seconds)


# --- what to add ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Increments:
    """A batch's additions, summed in Python so that a batch costs one Redis command per
    distinct field rather than several per job: (hash, field) -> amount."""

    counts: Counter[tuple[MetricHash, str]] = field(default_factory=Counter)
    sums: Counter[tuple[MetricHash, str]] = field(default_factory=Counter)

    def observe(self, metric: MetricHash, job_type: str, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[(metric, f"{job_type}|{bucket_index(seconds)}")] += 1
        self.counts[(metric, f"{job_type}|count")] += 1
        self.sums[(metric, f"{job_type}|sum")] += seconds

    def __bool__(self) -> bool:
        return bool(self.counts or self.sums)


def event_field(event: str, job: Job) -> str:
    return f"{event}|{job.type}|{job.tenant_id}"


def event_fields(event: str, jobs: Iterable[Job]) -> Counter[str]:
    """The `events` fields that count `event` for the jobs, with their amounts."""
    return Counter(event_field(event, job) for job in jobs)


def outcome_increments(jobs: Iterable[Job], now: datetime) -> Increments:
    """Count written outcomes (completed, failed, retried) and time finished attempts."""
    increments = Increments()
    for job in jobs:
        event = OUTCOME_EVENTS.get(JobStatus(job.status))
        if event is None:
            continue
        increments.counts[("events", event_field(event, job))] += 1
        if job.started_at is not None:
            increments.observe("duration", job.type, (now - job.started_at).total_seconds())
    return increments


def hold_increments(jobs: Iterable[Job]) -> Increments:
    """Count attempts held back before their request (no duration: nothing ran)."""
    increments = Increments()
    for job in jobs:
        increments.counts[("events", event_field(HELD, job))] += 1
    return increments


def start_increments(jobs: Iterable[Job]) -> Increments:
    """Time each claimed job waited from when it was due to when it started."""
    increments = Increments()
    for job in jobs:
        if job.started_at is not None:
            increments.observe("wait", job.type, (job.started_at - job.run_at).total_seconds())
    return increments


# --- what was added ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EventCount:
    """How many jobs of a type and tenant went through an event."""

    event: str
    job_type: str
    tenant: str
    count: int


@dataclass(frozen=True, slots=True)
class Histogram:
    """Observations of one job type: per bucket of BUCKETS (then +Inf), not cumulative."""

    job_type: str
    buckets: tuple[float, ...]
    sum: float


@dataclass(frozen=True, slots=True)
class EventMetrics:
    """Everything the processes counted: events, attempt durations, queue waits."""

    events: list[EventCount]
    durations: list[Histogram]
    waits: list[Histogram]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_events(raw: Mapping[Any, Any]) -> list[EventCount]:
    """The `events` hash as counts, in field order."""
    found = []
    for name, value in sorted((_text(k), v) for k, v in raw.items()):
        event, job_type, tenant = name.split("|", 2)
        found.append(EventCount(event=event, job_type=job_type, tenant=tenant, count=int(value)))
    return found


def parse_histograms(raw: Mapping[Any, Any]) -> list[Histogram]:
    """A `duration` or `wait` hash as one histogram per job type, by type."""
    by_type: dict[str, dict[str, float]] = {}
    for name, value in raw.items():
        job_type, part = _text(name).rsplit("|", 1)
        by_type.setdefault(job_type, {})[part] = float(value)
    return [
        Histogram(
            job_type=job_type,
            buckets=tuple(parts.get(str(i), 0.0) for i in range(len(BUCKETS) + 1)),
            sum=parts.get("sum", 0.0),
        )
        for job_type, parts in sorted(by_type.items())
    ]
