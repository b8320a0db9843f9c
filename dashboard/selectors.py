"""Reads behind the staff dashboard: grouped counts over every tenant (or one), throughput
buckets and workers. An operator view, so it spans tenants like the admin does."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db.models import BigIntegerField, Count, F, Func
from django.utils import timezone

from jobs import cursors
from jobs.models import Job, JobStatus, Schedule, Tenant
from jobs.queue import Circuit, sync_queue
from jobs.selectors import QueueDepth, tenant_queue_depths
from realtime.consumers import JobUpdatesConsumer

logger = logging.getLogger(__name__)

SCHEDULES_SHOWN = 50
THROUGHPUT_BUCKET_S = 10
THROUGHPUT_BUCKETS = 60  # ten minutes
# The page subscribes to every tenant it shows over one socket, so it shows at most this many.
MAX_TENANTS = JobUpdatesConsumer.max_subscriptions


class EpochBucket(Func):
    """Start of the `seconds`-wide time bucket holding a datetime, in Unix seconds."""

    output_field = BigIntegerField()

    def __init__(self, expression: Any, *, seconds: int) -> None:
        super().__init__(expression)
        self.seconds = int(seconds)

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # date_part is double precision: much cheaper to aggregate than EXTRACT's numeric.
        template = f"(FLOOR(DATE_PART('epoch', %(expressions)s) / {self.seconds})::bigint"
        return self.as_sql(compiler, connection, template=f"{template} * {self.seconds})", **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Django stores "YYYY-MM-DD HH:MM:SS.ffffff" in UTC; the fraction is cut, not rounded.
        # '%%%%s' survives the template's % formatting and the backend's placeholder rewrite.
        epoch = "CAST(strftime('%%%%s', substr(%(expressions)s, 1, 19)) AS INTEGER)"
        template = f"({epoch} / {self.seconds}"
        return self.as_sql(compiler, connection, template=f"{template} * {self.seconds})", **extra)


@dataclass(frozen=True, slots=True)
class TenantRow:
    """One tenant's jobs per status and its queue depth."""

    tenant: Tenant
    counts: dict[str, int]
    queue: QueueDepth


@dataclass(frozen=True, slots=True)
class ThroughputBucket:
    """Jobs that finished COMPLETED or FAILED within [start, start + bucket)."""

    start: datetime
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A worker seen in the heartbeat set or holding RUNNING jobs (`heartbeat_age_s` None:
    no heartbeat in Redis, e.g. it died and its leases have not expired yet)."""

    name: str
    heartbeat_age_s: float | None
    alive: bool
    running: int


@dataclass(frozen=True, slots=True)
class DashboardStats:
    """Everything the dashboard shows, for all tenants or for `tenant_id` only."""

    server_time: datetime
    # Every change up to this cursor is in the counts: the live feed resumes after it.
    cursor: int | None
    tenant_id: str | None
    totals: dict[str, int]
    tenants: list[TenantRow]
    tenants_total: int
    throughput: list[ThroughputBucket]
    workers: list[WorkerRow]
    redis_ok: bool
    # Webhook destination hosts whose circuit breaker is open or half-open (all tenants).
    circuits: list[Circuit]
    # The schedules due soonest (enabled first), at most SCHEDULES_SHOWN.
    schedules: list[Schedule]


def job_counts_by_tenant(*, tenant_id: str | None = None) -> dict[str, dict[str, int]]:
    """Jobs per tenant and status (every status present) in one grouped query."""
    qs = Job.objects.all() if tenant_id is None else Job.objects.filter(tenant_id=tenant_id)
    counts: dict[str, dict[str, int]] = {}
    for row_tenant, status, n in (
        qs.values_list("tenant_id", "status").annotate(n=Count("id")).order_by()
    ):
        counts.setdefault(row_tenant, dict.fromkeys(JobStatus.values, 0))[status] = n
    return counts


def job_throughput(*, tenant_id: str | None = None, now: datetime) -> list[ThroughputBucket]:
    """Jobs finished per 10-second bucket over the last ten minutes, oldest bucket first; one
    grouped query over the (status, finished_at) index."""
    last = int(now.timestamp()) // THROUGHPUT_BUCKET_S * THROUGHPUT_BUCKET_S
    first = last - (THROUGHPUT_BUCKETS - 1) * THROUGHPUT_BUCKET_S
    qs = Job.objects.filter(
        status__in=[JobStatus.COMPLETED, JobStatus.FAILED],
        finished_at__gte=datetime.fromtimestamp(first, UTC),
    )
    if tenant_id is not None:
        qs = qs.filter(tenant_id=tenant_id)
    rows = (
        qs.annotate(bucket=EpochBucket("finished_at", seconds=THROUGHPUT_BUCKET_S))
        .values_list("bucket", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    found: dict[tuple[int, str], int] = {(int(b), status): n for b, status, n in rows}
    return [
        ThroughputBucket(
            start=datetime.fromtimestamp(start, UTC),
            completed=found.get((start, JobStatus.COMPLETED), 0),
            failed=found.get((start, JobStatus.FAILED), 0),
        )
        for start in range(first, last + 1, THROUGHPUT_BUCKET_S)
    ]


def workers_seen(*, now: datetime) -> tuple[list[WorkerRow], bool]:
    """Workers from the Redis heartbeat set, with their RUNNING jobs from the database; the
    flag is False when Redis could not be read (then only the database's view is shown)."""
    running: dict[str, int] = dict(
        Job.objects.filter(status=JobStatus.RUNNING, locked_by__isnull=False)
        .values_list("locked_by")
        .annotate(n=Count("id"))
        .order_by()
    )
    heartbeats: dict[str, datetime] = {}
    redis_ok = True
    try:
        heartbeats = {beat.name: beat.last_seen for beat in sync_queue().worker_beats()}
    except Exception as exc:
        redis_ok = False
        logger.warning("dashboard: Redis unavailable for worker heartbeats (%s)", exc)
    lease_s = settings.JOBS["LEASE_S"]
    rows = []
    for name in heartbeats.keys() | running.keys():
        seen = heartbeats.get(name)
        age = None if seen is None else max(0.0, (now - seen).total_seconds())
        rows.append(
            WorkerRow(
                name=name,
                heartbeat_age_s=age,
                alive=age is not None and age <= lease_s,
                running=running.get(name, 0),
            )
        )
    rows.sort(key=lambda row: (not row.alive, row.name))
    return rows, redis_ok


def open_circuits() -> list[Circuit]:
    """Hosts whose webhook circuit is open or half-open (jobs/destinations.py); none shown
    when Redis cannot be read (the Redis warning says so)."""
    try:
        return sync_queue().open_circuits()
    except Exception as exc:
        logger.warning("dashboard: Redis unavailable for open circuits (%s)", exc)
        return []


def next_schedules(*, tenant_id: str | None = None) -> list[Schedule]:
    """The enabled schedules due soonest, then the disabled ones, in one query."""
    qs = (
        Schedule.objects.all()
        if tenant_id is None
        else Schedule.objects.filter(tenant_id=tenant_id)
    )
    order = ("-enabled", F("next_run_at").asc(nulls_last=True), "tenant_id", "name")
    return list(qs.order_by(*order)[:SCHEDULES_SHOWN])


def dashboard_stats(*, tenant: Tenant | None = None, now: datetime | None = None) -> DashboardStats:
    """The dashboard's data in a fixed number of queries, whatever the number of jobs."""
    now = now or timezone.now()
    cursor = cursors.watermark(wait_s=0.5)
    tenant_id = tenant.id if tenant is not None else None
    counts = job_counts_by_tenant(tenant_id=tenant_id)
    if tenant is not None:
        shown, tenants_total = [tenant], 1
    else:
        shown = list(Tenant.objects.order_by("id")[:MAX_TENANTS])
        tenants_total = len(shown) if len(shown) < MAX_TENANTS else Tenant.objects.count()
    depths = tenant_queue_depths(tenant_ids=[t.id for t in shown])
    totals = dict.fromkeys(JobStatus.values, 0)
    for per_status in counts.values():
        for status, n in per_status.items():
            totals[status] += n
    workers, redis_ok = workers_seen(now=now)
    return DashboardStats(
        server_time=now,
        cursor=cursor,
        tenant_id=tenant_id,
        totals=totals,
        tenants=[
            TenantRow(
                tenant=t,
                counts=counts.get(t.id, dict.fromkeys(JobStatus.values, 0)),
                queue=depths[t.id],
            )
            for t in shown
        ],
        tenants_total=tenants_total,
        throughput=job_throughput(tenant_id=tenant_id, now=now),
        workers=workers,
        # tenant_queue_depths reports an unreachable Redis as ready=None.
        redis_ok=redis_ok and all(depth.ready is not None for depth in depths.values()),
        circuits=open_circuits(),
        schedules=next_schedules(tenant_id=tenant_id),
    )
