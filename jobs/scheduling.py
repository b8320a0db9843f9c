"""Schedules (SPEC section 12): when a schedule is due, and the workers' pass that fires it.

Time arithmetic. A `cron` schedule's due times come from cronsim, in the schedule's IANA time
zone, with Debian cron's rules for daylight saving time: an expression at a fixed minute and
hour (`30 2 * * *`) whose local time does not exist that day (spring forward) fires at the
first minute after the gap (03:00); one whose local time happens twice (fall back) fires once,
at the first of the two. An expression whose minute or hour field starts with `*` (`*/15 * * *
*`, `0 * * * *`) follows elapsed time: it fires at each matching instant, so twice in the
repeated hour and not at all in the skipped one. An `every: N` schedule is due at the multiples
of N seconds since the Unix epoch (so `every: 60` fires at each whole minute), whatever the
time zone.

Firing. Every worker's upkeep calls `tick` once a second: one indexed query asks whether any
enabled schedule has `next_run_at <= now()` (the database's clock, not the worker's). If so,
`fire_due` takes the due schedules one at a time, each in its own transaction: it locks the row
(`FOR UPDATE SKIP LOCKED`: a schedule another worker holds is left to it), inserts the job with
`(schedule_id, scheduled_for)` unique, and moves `next_run_at` past now, then commits. A due
time therefore fires once however many workers run: the second worker either skips the locked
row or, once the first commits, no longer finds it due; a worker that dies mid-way rolls its
transaction back, and the next pass fires that due time. After downtime only the latest missed
due time fires. The job is published (queued, broadcast) after commit, like any created job.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

from cronsim import CronSim, CronSimError
from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone
from pydantic import ValidationError

from jobs import cursors, lifecycle, store
from jobs.email_budget import check_recipient_budget
from jobs.errors import ApiError
from jobs.handlers import validate_payload
from jobs.models import Job, JobStatus, Schedule, ScheduleOverlap, Tenant
from jobs.ratelimit import check_rate_limit

logger = logging.getLogger("jobs.worker")

INTERVAL_S = 1.0  # how often each worker checks for due schedules
BATCH = 100  # due schedules read per query of a pass
CRON_MAX_LENGTH = 100
# Candidates a cron search may take to get past an instant: wall-clock arithmetic from inside a
# repeated (fall-back) hour could step back into its first instance, at most an hour of minutes.
_MAX_STEPS = 2 * 60 + 1


class ScheduleError(ValueError):
    """A cron expression, time zone or interval that cannot be scheduled."""


@cache
def time_zones() -> frozenset[str]:
    """The IANA time zone names this machine knows (read once)."""
    return frozenset(available_timezones())


def check_time_zone(name: str) -> ZoneInfo:
    """The zone called `name`; ScheduleError if it is not an IANA name (only names from the
    list are looked up: no path reaches the file system)."""
    if name not in time_zones():
        raise ScheduleError("unknown time zone; use an IANA name such as Europe/Berlin")
    return ZoneInfo(name)


def check_cron(expression: str, zone: str = "UTC") -> str:
    """`expression` if it is a 5-field cron expression that matches some time in the next 50
    years (cronsim's bound); ScheduleError otherwise (`0 0 30 2 *` never matches)."""
    if len(expression) > CRON_MAX_LENGTH:
        raise ScheduleError(f"cron has at most {CRON_MAX_LENGTH} characters")
    if len(expression.split()) != 5:
        raise ScheduleError("cron must have 5 fields: minute hour day-of-month month day-of-week")
    try:
        next_cron_time(expression, check_time_zone(zone), timezone.now())
    except CronSimError as exc:
        raise ScheduleError(f"invalid cron expression: {exc}") from exc
    except StopIteration as exc:
        raise ScheduleError("cron expression never matches") from exc
    return expression


def next_cron_time(expression: str, zone: ZoneInfo, after: datetime) -> datetime:
    """The first time strictly after `after` that the expression matches in `zone`, in UTC.
    Raises CronSimError (bad expression) or StopIteration (no match within 50 years)."""
    after_utc = after.astimezone(UTC)
    times = CronSim(expression, after_utc.astimezone(zone))
    for _ in range(_MAX_STEPS):
        # Wall-clock arithmetic from the second of a repeated hour can land before `after`.
        candidate = next(times).astimezone(UTC)
        if candidate > after_utc:
            return candidate
    raise StopIteration


def last_cron_time(expression: str, zone: ZoneInfo, at: datetime) -> datetime | None:
    """The latest time at or before `at` that the expression matches in `zone`, in UTC (None
    if none within 50 years)."""
    at_utc = at.astimezone(UTC)
    start = (at_utc + timedelta(seconds=1)).replace(microsecond=0)
    try:
        candidate = next(CronSim(expression, start.astimezone(zone), reverse=True))
    except StopIteration:
        return None
    candidate = candidate.astimezone(UTC)
    return candidate if candidate <= at_utc else None


def next_every_time(every_s: int, after: datetime) -> datetime:
    """The first multiple of `every_s` seconds since the epoch strictly after `after`."""
    epoch_s = after.timestamp()
    return datetime.fromtimestamp((math.floor(epoch_s / every_s) + 1) * every_s, tz=UTC)


def last_every_time(every_s: int, at: datetime) -> datetime:
    """The latest multiple of `every_s` seconds since the epoch at or before `at`."""
    return datetime.fromtimestamp(math.floor(at.timestamp() / every_s) * every_s, tz=UTC)


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule is due: `cron` in `zone`, or `every` seconds."""

    cron: str | None
    every: int | None
    zone: ZoneInfo

    @classmethod
    def of(cls, schedule: Schedule) -> Timing:
        return cls(schedule.cron, schedule.every, check_time_zone(schedule.timezone))

    def next_after(self, after: datetime) -> datetime:
        """The first due time strictly after `after`."""
        if self.every is not None:
            return next_every_time(self.every, after)
        if self.cron is None:
            raise ScheduleError("a schedule needs cron or every")
        return next_cron_time(self.cron, self.zone, after)

    def latest_due(self, *, due: datetime, now: datetime) -> datetime:
        """The due time to fire now: `due` (the stored next run) unless later due times have
        passed too (downtime), then the latest of them."""
        if self.next_after(due) > now:
            return due
        if self.every is not None:
            latest: datetime | None = last_every_time(self.every, now)
        else:
            latest = last_cron_time(self.cron or "", self.zone, now)
        return due if latest is None else max(due, latest)


# --- the workers' pass ------------------------------------------------------------------------
def any_due() -> bool:
    """Whether an enabled schedule is due by the database's clock: the one query an idle
    worker makes per second for scheduling (the partial index `schedule_due`)."""
    return Schedule.objects.filter(enabled=True, next_run_at__lte=Now()).exists()


def tick() -> list[Job]:
    """One worker's check: nothing more than `any_due` unless a schedule is due."""
    return fire_due() if any_due() else []


def fire_due(*, limit: int = BATCH) -> list[Job]:
    """Fire every schedule due now, each in its own transaction; the jobs made (published
    after their commits). A schedule that fails is logged and does not stop the others."""
    created: list[Job] = []
    seen: set[uuid.UUID] = set()
    while True:
        due_ids = [
            schedule_id
            for schedule_id in Schedule.objects.filter(enabled=True, next_run_at__lte=Now())
            .exclude(id__in=seen)
            .order_by("next_run_at")
            .values_list("id", flat=True)[:limit]
        ]
        if not due_ids:
            return created
        for schedule_id in due_ids:
            seen.add(schedule_id)
            try:
                job = fire_one(schedule_id=schedule_id)
            except Exception:
                logger.exception("schedule %s could not fire", schedule_id)
                continue
            if job is not None:
                created.append(job)


def _database_now() -> datetime:
    """The database's clock (the time of this transaction's statement), which decides what is
    due, whatever the workers' clocks say. SQLite (development) has one process: its own."""
    if connection.vendor != "postgresql":
        return timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]


def fire_one(*, schedule_id: uuid.UUID) -> Job | None:
    """Fire one due schedule if this worker gets its lock: at most one job for its due time,
    and `next_run_at` moved past now, in one transaction. A schedule that can no longer be
    fired (its job or timing is invalid now) is disabled, with the reason logged."""
    with transaction.atomic():
        schedule = (
            Schedule.objects.select_for_update(skip_locked=True)
            .select_related("tenant")
            .filter(id=schedule_id, enabled=True, next_run_at__lte=Now())
            .first()
        )
        if schedule is None:
            return None  # another worker holds it, or has fired it already
        now = _database_now()
        try:
            timing = Timing.of(schedule)
            due = timing.latest_due(due=schedule.next_run_at, now=now)
            next_run_at = timing.next_after(now)
            spec = _job_of(schedule)
        except (ScheduleError, CronSimError, StopIteration, ValidationError, KeyError) as exc:
            _disable(schedule, reason=str(exc) or type(exc).__name__)
            return None
        schedule.next_run_at = next_run_at
        schedule.updated_at = now
        job = None
        reason = _why_not(schedule, spec)
        if reason is None:
            job = _insert_job(schedule, spec, due=due)
        else:
            logger.info(
                "schedule %s passed over %s: %s",
                schedule.id,
                due.isoformat(),
                reason,
                extra={"tenant": schedule.tenant_id},
            )
        if job is not None:
            schedule.last_run_at = due
            schedule.last_job_id = job.id
        schedule.save(update_fields=["next_run_at", "last_run_at", "last_job_id", "updated_at"])
    return job


def _why_not(schedule: Schedule, spec: dict[str, Any]) -> str | None:
    """Why this due time makes no job (None: it does)."""
    tenant: Tenant = schedule.tenant
    if not tenant.is_active:
        return "tenant is inactive"
    if schedule.overlap == ScheduleOverlap.SKIP and schedule.last_job_id is not None:
        unfinished = Job.objects.filter(
            id=schedule.last_job_id, status__in=(JobStatus.PENDING, JobStatus.RUNNING)
        )
        if unfinished.exists():
            return "overlap skip: the last job has not finished"
    try:
        # Counted like a job the API creates; a tenant over its limit loses this due time only.
        check_rate_limit(tenant=tenant, jobs=1)
        check_recipient_budget(tenant=tenant, jobs=[_Typed(spec["type"], spec["payload"])])
    except ApiError as exc:
        return f"tenant limit: {exc.message}"
    return None


@dataclass(frozen=True, slots=True)
class _Typed:
    type: str
    payload: dict[str, Any]


def _job_of(schedule: Schedule) -> dict[str, Any]:
    """The schedule's job, checked again against its type's payload schema (the type or the
    schema may have changed since the schedule was saved)."""
    job = schedule.job
    try:
        validate_payload(job["type"], job["payload"])
    except KeyError as exc:
        raise ScheduleError(f"its job has no type, or an unknown one: {exc}") from exc
    return {
        "type": job["type"],
        "payload": job["payload"],
        "priority": int(job.get("priority", 0)),
        "max_attempts": int(job.get("maxAttempts", 3)),
    }


def _insert_job(schedule: Schedule, spec: dict[str, Any], *, due: datetime) -> Job | None:
    """The job for one due time, unless one exists (unique schedule and due time)."""
    at = timezone.now()
    job = Job(
        id=uuid.uuid4(),
        tenant_id=schedule.tenant_id,
        type=spec["type"],
        payload=spec["payload"],
        status=JobStatus.PENDING,
        priority=spec["priority"],
        attempts=0,
        max_attempts=spec["max_attempts"],
        run_at=at,
        created_at=at,
        updated_at=at,
        schedule_id=schedule.id,
        scheduled_for=due,
    )
    if not store.insert_unless_taken([job]):
        logger.warning("schedule %s: a job for %s exists already", schedule.id, due.isoformat())
        return None
    cursors.fill([job])
    lifecycle.publish_on_commit([job], event=lifecycle.CREATED)
    return job


def _disable(schedule: Schedule, *, reason: str) -> None:
    logger.error(
        "schedule %s disabled: %s",
        schedule.id,
        reason,
        extra={"tenant": schedule.tenant_id},
    )
    Schedule.objects.filter(id=schedule.id).update(
        enabled=False, next_run_at=None, updated_at=timezone.now()
    )


def run_now(*, schedule: Schedule) -> Job:
    """Fire the schedule's job at once (the admin's "run now"), marked with the schedule and
    now as its due time; the schedule's next run is unchanged."""
    with transaction.atomic():
        locked = Schedule.objects.select_for_update().select_related("tenant").get(id=schedule.id)
        now = timezone.now()
        job = _insert_job(locked, _job_of(locked), due=now)
        if job is None:
            raise ApiError(409, "a job for this instant exists already; try again")
        locked.last_run_at = now
        locked.last_job_id = job.id
        locked.updated_at = now
        locked.save(update_fields=["last_run_at", "last_job_id", "updated_at"])
    return job
