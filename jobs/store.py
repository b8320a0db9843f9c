"""Job rows as the transitions of jobs/lifecycle.py write them: claims and fenced writes, on
PostgreSQL in one statement from the event loop (psycopg's pool), elsewhere through the ORM in a
small thread pool. What to write is decided by the lifecycle; this module only writes it.

Every write of an attempt is fenced by the claim's lease token: a worker whose lease was taken
over (presumed dead, job recovered, or job cancelled) matches no row and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from jobs import cursors, dependencies, pg
from jobs.api_store import COLUMNS, job_from_row
from jobs.models import TERMINAL_STATUSES, Job, JobStatus, Tenant

if TYPE_CHECKING:
    from jobs.lifecycle import RetryPolicy

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Time a claimed job may be early against this process's clock (Redis decides due times).
CLOCK_TOLERANCE = timedelta(milliseconds=500)
READABLE_SINCE = datetime(1, 1, 2, tzinfo=UTC)


# Planned writes: a job and the columns its transition sets.
Planned = list[tuple[Job, dict[str, Any]]]


def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    except Exception:
        # A broken connection (database restarted, backend terminated) must not be reused.
        connection.close()
        raise


class JobStore:
    """Database operations of the worker, each in its own transaction, on a small thread pool."""

    def __init__(self, *, threads: int = 4) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jobs-db")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(_run, fn, *args, **kwargs))

    def close(self) -> None:
        """Close every pool thread's database connection, then the pool."""
        threads = self._executor._max_workers
        barrier = threading.Barrier(threads)

        def close_connection() -> None:
            connection.close()
            # Holding each task until all have started puts exactly one in every thread.
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=5)

        for future in [self._executor.submit(close_connection) for _ in range(threads)]:
            with contextlib.suppress(Exception):
                future.result(timeout=10)
        self._executor.shutdown(wait=True, cancel_futures=True)

    # --- the calls the worker makes ---------------------------------------------------------
    async def claim(self, *, job_ids: list[str], worker: str) -> list[Job]:
        """Compare-and-set PENDING -> RUNNING for the due ones among `job_ids`. On PostgreSQL
        one statement on the event loop's pool: no thread hop on the path of every job."""
        if pg.is_postgresql():
            return await aclaim_jobs(job_ids=job_ids, worker=worker)
        return await self.call(claim_jobs, job_ids=job_ids, worker=worker)

    async def write_outcomes(self, *, planned: Planned) -> list[Job | None]:
        """Write several attempts' outcomes in one transaction (one commit); None where the
        lease was lost. On PostgreSQL one statement on the event loop's pool."""
        if pg.is_postgresql():
            return await awrite_outcomes(planned=planned)
        return await self.call(write_outcomes, planned=planned)

    async def write_outcomes_and_settle(
        self, *, planned: Planned
    ) -> tuple[list[Job | None], dependencies.Settled]:
        """`write_outcomes` and the settling of the ended jobs' dependents in the same
        transaction (for a batch holding jobs that other jobs wait for)."""
        return await self.call(write_outcomes_and_settle, planned=planned)

    async def set_progress(self, *, job: Job, percent: int, message: str | None) -> Job | None:
        """Store the attempt's progress (fenced by its lease); None if the lease was lost."""
        return await self.call(set_job_progress, job=job, percent=percent, message=message)

    async def write_fenced(self, *, job: Job, fields: dict[str, Any]) -> Job | None:
        """Write `fields` on the job if this worker still holds its lease; None if not."""
        return await self.call(write_fenced, job=job, fields=fields)

    async def heartbeat(self, *, worker: str, job_ids: list[str]) -> int:
        return await self.call(renew_leases, worker=worker, job_ids=job_ids)

    async def recover_expired(self, *, policy: RetryPolicy, limit: int = 500) -> list[Job]:
        return await self.call(recover_expired_leases, policy=policy, limit=limit)

    async def pending(self, *, after: datetime | None, horizon: datetime, limit: int) -> list[Job]:
        return await self.call(pending_jobs, after=after, horizon=horizon, limit=limit)

    async def tenant_limits(self) -> dict[str, int]:
        return await self.call(tenant_limits)

    async def pending_among(self, *, job_ids: Iterable[str]) -> list[Job]:
        return await self.call(pending_among, job_ids=list(job_ids))


# --- the statements (sync, each its own transaction) ---------------------------------------------
def insert_unless_taken(jobs: list[Job]) -> list[Job]:
    """Insert jobs whose unique keys (idempotency key, schedule and due time) another insert
    may have taken; returns those inserted, skipping the others as `ON CONFLICT DO NOTHING`
    did before jobs_job was partitioned (the keys are unique in side tables written by
    triggers, migration 0010, which raise instead). In the caller's transaction: one savepoint
    for all, one per job only when some key was taken."""
    if not jobs:
        return []
    try:
        with transaction.atomic():
            Job.objects.bulk_create(jobs)
        return list(jobs)
    except IntegrityError:
        pass
    inserted = []
    for job in jobs:
        try:
            with transaction.atomic():
                Job.objects.bulk_create([job])
        except IntegrityError:
            continue
        inserted.append(job)
    return inserted


def _lease() -> timedelta:
    return timedelta(seconds=settings.JOBS["LEASE_S"])


def claim_fields(*, worker: str, token: uuid.UUID, now: datetime) -> dict[str, Any]:
    """The columns a claim sets, besides one more attempt: the one list both paths write."""
    return {
        "status": JobStatus.RUNNING,
        "locked_by": worker,
        "lease_token": token,
        "lease_expires_at": now + _lease(),
        "started_at": now,
        "updated_at": now,
        "progress": None,
        "progress_message": None,
    }


def claim_jobs(*, job_ids: list[str], worker: str) -> list[Job]:
    if not job_ids:
        return []
    token, now = uuid.uuid4(), timezone.now()
    if connection.vendor == "postgresql":
        sql, params = _claim_statement(job_ids=job_ids, worker=worker, token=token, now=now)
        return list(Job.objects.raw(sql, params))
    return claim_with_orm(job_ids=job_ids, worker=worker, token=token, now=now)


def claim_with_orm(
    *, job_ids: list[str], worker: str, token: uuid.UUID, now: datetime
) -> list[Job]:
    """The claim on a database without the statement (SQLite): the same columns, two queries."""
    with transaction.atomic():
        updated = Job.objects.filter(
            id__in=job_ids, status=JobStatus.PENDING, run_at__lte=now + CLOCK_TOLERANCE
        ).update(attempts=F("attempts") + 1, **claim_fields(worker=worker, token=token, now=now))
        if not updated:
            return []
        return list(Job.objects.filter(id__in=job_ids, lease_token=token))


def _column(name: str) -> str:
    return Job._meta.get_field(name).column


def _claim_statement(
    *, job_ids: list[str], worker: str, token: uuid.UUID, now: datetime
) -> tuple[str, list[Any]]:
    fields = claim_fields(worker=worker, token=token, now=now)
    assignments = ", ".join(f"{_column(name)} = %s" for name in fields)
    sql = f"""
        UPDATE {Job._meta.db_table} SET attempts = attempts + 1, {assignments}
        WHERE id = ANY(%s::uuid[]) AND status = 'PENDING' AND run_at <= %s
        RETURNING {COLUMNS}
    """
    return sql, [*fields.values(), job_ids, now + CLOCK_TOLERANCE]


async def aclaim_jobs(*, job_ids: list[str], worker: str) -> list[Job]:
    """`claim_jobs` on PostgreSQL from the event loop: one statement in one transaction.

    A row this process cannot read back (a time outside Python's range, written before the API
    bounded them or by hand) must not take the batch with it: the transaction is rolled back
    (nothing was claimed), the ids are claimed one by one, and an unreadable one is failed on
    its own (`fail_unreadable`)."""
    if not job_ids:
        return []
    try:
        return await _claim_in_transaction(job_ids=job_ids, worker=worker)
    except psycopg.DataError:
        if len(job_ids) == 1:
            await fail_unreadable(job_id=job_ids[0])
            return []
    claimed: list[Job] = []
    for job_id in job_ids:
        claimed.extend(await aclaim_jobs(job_ids=[job_id], worker=worker))
    return claimed


async def _claim_in_transaction(*, job_ids: list[str], worker: str) -> list[Job]:
    sql, params = _claim_statement(
        job_ids=job_ids, worker=worker, token=uuid.uuid4(), now=timezone.now()
    )
    async with pg.connection() as conn, conn.transaction():
        cursor = await conn.execute(sql, params)
        return [job_from_row(row) for row in await cursor.fetchall()]


async def fail_unreadable(*, job_id: str) -> None:
    """FAIL a PENDING job whose row cannot be read (without reading it), so that it stops
    coming back; logged, as nothing can be broadcast for it."""
    sql = f"""
        UPDATE {Job._meta.db_table} SET status = 'FAILED', finished_at = now(),
            updated_at = now(), error = 'unreadable row: a time outside the supported range'
        WHERE id = %s::uuid AND status = 'PENDING'
    """
    async with pg.connection() as conn:
        await conn.execute(sql, (job_id,))
    logger.error("job %s failed: its row cannot be read (a time out of range)", job_id)


def _fenced(job: Job) -> Any:
    return Job.objects.filter(id=job.id, lease_token=job.lease_token, status=JobStatus.RUNNING)


def write_row(job: Job, fields: dict[str, Any]) -> Job:
    """Write `fields` on a row the caller holds locked (`select_for_update`), in its
    transaction: the API's transitions."""
    for name, value in fields.items():
        setattr(job, name, value)
    job.save(update_fields=list(fields))
    cursors.fill([job])
    return job


# What a finished row says of its last progress (the worker's copy of the job may not have seen
# the last report, written by the progress reporter, and the final frame must show it), the
# cursor the write got, and whether jobs wait for it (a child created while it ran: its end
# must settle them, jobs/dependencies.py).
Progress = tuple[int | None, str | None, int | None, bool]


def _written(planned: Planned, written: dict[uuid.UUID, Progress]) -> list[Job | None]:
    """The planned jobs with their new fields and the row's progress, None where the fenced
    write matched no row."""
    results: list[Job | None] = []
    for job, fields in planned:
        if job.id not in written:
            results.append(None)
            continue
        for name, value in fields.items():
            setattr(job, name, value)
        job.progress, job.progress_message, job.cursor, job.dependents_waiting = written[job.id]
        results.append(job)
    return results


def write_outcomes(*, planned: Planned) -> list[Job | None]:
    """Write many outcomes in one transaction, each fenced by its lease token. On PostgreSQL it
    is one UPDATE ... FROM (VALUES ...) RETURNING statement."""
    if connection.vendor != "postgresql":
        return write_outcomes_with_orm(planned=planned)
    sql, params = _finish_statement(planned)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        written = {row[0]: row[1:] for row in cursor.fetchall()}
    return _written(planned, written)


def write_outcomes_and_settle(*, planned: Planned) -> tuple[list[Job | None], Any]:
    """`write_outcomes`, then the settling of the dependents of the jobs it ended
    (jobs/dependencies.py), in one transaction: a crash in between loses both or neither."""
    with transaction.atomic():
        written = write_outcomes(planned=planned)
        ended = [
            job.id
            for job in written
            if job is not None and job.dependents_waiting and job.status in TERMINAL_STATUSES
        ]
        return written, dependencies.settle(ended)


def write_outcomes_with_orm(*, planned: Planned) -> list[Job | None]:
    """The outcome writes on a database without the statement (SQLite): one fenced UPDATE per
    job, the same columns, in one transaction."""
    with transaction.atomic():
        ids = [job.id for job, fields in planned if _fenced(job).update(**fields)]
        rows = Job.objects.filter(id__in=ids).values_list(
            "id", "progress", "progress_message", "cursor", "dependents_waiting"
        )
        return _written(planned, {row[0]: row[1:] for row in rows})


async def awrite_outcomes(*, planned: Planned) -> list[Job | None]:
    """`write_outcomes` on PostgreSQL from the event loop (one statement, one commit)."""
    sql, params = _finish_statement(planned)
    async with pg.connection() as conn:
        cursor = await conn.execute(sql, params)
        written = {row[0]: row[1:] for row in await cursor.fetchall()}
    return _written(planned, written)


# The SQL type of each kind of column, to type the VALUES list of a batched write.
_SQL_TYPES = {
    "CharField": "text",
    "DateTimeField": "timestamptz",
    "JSONField": "jsonb",
    "PositiveSmallIntegerField": "integer",
    "SmallIntegerField": "integer",
    "PositiveIntegerField": "integer",
    "TextField": "text",
    "UUIDField": "uuid",
}


def _sql_value(name: str, value: Any) -> Any:
    if value is not None and Job._meta.get_field(name).get_internal_type() == "JSONField":
        return json.dumps(value)
    return value


def _finish_statement(planned: Planned) -> tuple[str, list[Any]]:
    """One UPDATE ... FROM (VALUES ...) for the planned writes, whose columns are the planned
    fields themselves (every outcome plans the same set)."""
    names = list(planned[0][1])
    columns = [_column(name) for name in names]
    types = [_SQL_TYPES[Job._meta.get_field(name).get_internal_type()] for name in names]
    row = ", ".join(["%s::uuid", "%s::uuid", *(f"%s::{sql_type}" for sql_type in types)])
    params: list[Any] = []
    for job, fields in planned:
        if list(fields) != names:
            raise ValueError("the planned writes of one batch set different columns")
        params.extend((job.id, job.lease_token, *(_sql_value(n, fields[n]) for n in names)))
    sql = f"""
        UPDATE {Job._meta.db_table} AS j SET {", ".join(f"{c} = v.{c}" for c in columns)}
        FROM (VALUES {", ".join([f"({row})"] * len(planned))})
            AS v(fenced_id, fenced_token, {", ".join(columns)})
        WHERE j.id = v.fenced_id AND j.lease_token = v.fenced_token AND j.status = 'RUNNING'
        RETURNING j.id, j.progress, j.progress_message, j.cursor, j.dependents_waiting
    """
    return sql, params


def set_job_progress(*, job: Job, percent: int, message: str | None) -> Job | None:
    now = timezone.now()
    fields = {"progress": percent, "progress_message": message, "updated_at": now}
    # A copy: the worker's own object belongs to the event loop and the outcome write.
    reported = copy.copy(job)
    with transaction.atomic():
        if not _fenced(job).update(**fields):
            return None
        cursors.fill([reported])
    for name, value in fields.items():
        setattr(reported, name, value)
    return reported


def write_fenced(*, job: Job, fields: dict[str, Any]) -> Job | None:
    """Write `fields` on a job whose lease this worker still holds; None if it does not."""
    with transaction.atomic():
        if not _fenced(job).update(**fields):
            return None
        cursors.fill([job])
    for name, value in fields.items():
        setattr(job, name, value)
    return job


def renew_leases(*, worker: str, job_ids: list[str]) -> int:
    """Extend the leases of the jobs this worker is running now (and only those: a job whose
    final write failed must expire and be recovered)."""
    now = timezone.now()
    with transaction.atomic():
        # Rows locked by an outcome being written right now are skipped (they are finishing):
        # waiting for them could deadlock against that batched write.
        ids = list(
            Job.objects.select_for_update(skip_locked=True)
            .filter(
                id__in=job_ids,
                locked_by=worker,
                status=JobStatus.RUNNING,
                lease_token__isnull=False,
            )
            .values_list("id", flat=True)
        )
        return Job.objects.filter(id__in=ids).update(lease_expires_at=now + _lease())


def recover_expired_leases(*, policy: RetryPolicy, limit: int) -> list[Job]:
    """Jobs whose worker stopped heartbeating, changed as `policy` says (PENDING again with the
    attempt counted, or FAILED when attempts are spent)."""
    now = timezone.now()
    expired = Job.objects.filter(status=JobStatus.RUNNING, lease_expires_at__lt=now)
    recovered = []
    for job in expired.order_by("lease_expires_at")[:limit]:
        # None: it finished or was taken over meanwhile.
        written = write_fenced(job=job, fields=policy.after_lost_lease(job, now))
        if written is not None:
            recovered.append(written)
    return recovered


def pending_jobs(*, after: datetime | None, horizon: datetime, limit: int) -> list[Job]:
    """PENDING jobs due before `horizon`, by creation time (keyset pagination on created_at)."""
    # A run_at before year 1 once in UTC cannot be read: such a row (stored before the API
    # bounded times) is skipped here rather than stopping reconciliation for everyone.
    qs = Job.objects.filter(
        status=JobStatus.PENDING, run_at__lte=horizon, run_at__gte=READABLE_SINCE
    )
    if after is not None:
        qs = qs.filter(created_at__gt=after)
    return list(
        qs.order_by("created_at").only("id", "tenant_id", "priority", "created_at", "run_at")[
            :limit
        ]
    )


def pending_among(*, job_ids: list[str]) -> list[Job]:
    return list(
        Job.objects.filter(id__in=job_ids, status=JobStatus.PENDING).only(
            "id", "tenant_id", "priority", "created_at", "run_at"
        )
    )


def tenant_limits() -> dict[str, int]:
    return dict(
        Tenant.objects.filter(max_concurrency__isnull=False).values_list("id", "max_concurrency")
    )
