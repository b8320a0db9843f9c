"""The worker's view of PostgreSQL: claims and fenced state writes, run off the event loop.

Every write of an attempt is fenced by the claim's lease token: a worker whose lease was taken
over (presumed dead, job recovered, or job cancelled) matches no row and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import random
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import psycopg
from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from jobs import pg
from jobs.api_store import COLUMNS, job_from_row
from jobs.models import Job, JobStatus, Tenant

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Time a claimed job may be early against this process's clock (Redis decides due times).
CLOCK_TOLERANCE = timedelta(milliseconds=500)
READABLE_SINCE = datetime(1, 1, 2, tzinfo=UTC)


def retry_delay(*, attempt: int, base_ms: int, max_ms: int) -> timedelta:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2**(attempt-1))]."""
    ceiling = min(max_ms, base_ms * (2 ** max(0, min(attempt - 1, 40))))
    return timedelta(milliseconds=random.uniform(0, ceiling))


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt, as the worker hands it to the store."""

    result: Any = None
    error: str | None = None
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


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

    async def finish_many(self, *, items: list[tuple[Job, Outcome]]) -> list[Job | None]:
        """Write several attempts' outcomes in one transaction (one commit); None where the
        lease was lost. On PostgreSQL one statement on the event loop's pool."""
        if pg.is_postgresql():
            return await afinish_jobs(items=items)
        return await self.call(finish_jobs, items=items)

    async def set_progress(self, *, job: Job, percent: int, message: str | None) -> Job | None:
        """Store the attempt's progress (fenced by its lease); None if the lease was lost."""
        return await self.call(set_job_progress, job=job, percent=percent, message=message)

    async def put_back(self, *, job: Job) -> Job | None:
        """Return a job the worker did not finish (shutdown) to PENDING, attempt not counted."""
        return await self.call(put_back_job, job=job)

    async def heartbeat(self, *, worker: str, job_ids: list[str]) -> int:
        return await self.call(renew_leases, worker=worker, job_ids=job_ids)

    async def recover_expired(self, *, limit: int = 500) -> list[Job]:
        return await self.call(recover_expired_leases, limit=limit)

    async def pending(self, *, after: datetime | None, horizon: datetime, limit: int) -> list[Job]:
        return await self.call(pending_jobs, after=after, horizon=horizon, limit=limit)

    async def tenant_limits(self) -> dict[str, int]:
        return await self.call(tenant_limits)

    async def pending_among(self, *, job_ids: Iterable[str]) -> list[Job]:
        return await self.call(pending_among, job_ids=list(job_ids))


# --- the statements (sync, each its own transaction) ---------------------------------------------
def _lease() -> timedelta:
    return timedelta(seconds=settings.JOBS["LEASE_S"])


def claim_jobs(*, job_ids: list[str], worker: str) -> list[Job]:
    if not job_ids:
        return []
    token = uuid.uuid4()
    now = timezone.now()
    if connection.vendor == "postgresql":
        return _claim_in_one_statement(job_ids=job_ids, worker=worker, token=token, now=now)
    with transaction.atomic():
        updated = Job.objects.filter(
            id__in=job_ids, status=JobStatus.PENDING, run_at__lte=now + CLOCK_TOLERANCE
        ).update(
            status=JobStatus.RUNNING,
            attempts=F("attempts") + 1,
            locked_by=worker,
            lease_token=token,
            lease_expires_at=now + _lease(),
            started_at=now,
            updated_at=now,
            progress=None,
            progress_message=None,
        )
        if not updated:
            return []
        return list(Job.objects.filter(id__in=job_ids, lease_token=token))


def _claim_statement(
    *, job_ids: list[str], worker: str, token: uuid.UUID, now: datetime
) -> tuple[str, list[Any]]:
    sql = f"""
        UPDATE {Job._meta.db_table} SET
            status = 'RUNNING', attempts = attempts + 1, locked_by = %s, lease_token = %s,
            lease_expires_at = %s, started_at = %s, updated_at = %s, progress = NULL,
            progress_message = NULL
        WHERE id = ANY(%s::uuid[]) AND status = 'PENDING' AND run_at <= %s
        RETURNING {COLUMNS}
    """
    return sql, [worker, token, now + _lease(), now, now, job_ids, now + CLOCK_TOLERANCE]


def _claim_in_one_statement(
    *, job_ids: list[str], worker: str, token: uuid.UUID, now: datetime
) -> list[Job]:
    sql, params = _claim_statement(job_ids=job_ids, worker=worker, token=token, now=now)
    return list(Job.objects.raw(sql, params))


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


def outcome_fields(*, job: Job, outcome: Outcome, now: datetime) -> dict[str, Any]:
    """The columns an attempt's outcome writes: COMPLETED, FAILED, or PENDING for a retry."""
    fields: dict[str, Any] = {
        "updated_at": now,
        "lease_token": None,
        "lease_expires_at": None,
        "finished_at": None,
        "run_at": job.run_at,
    }
    if outcome.ok:
        fields.update(
            status=JobStatus.COMPLETED, result=outcome.result, error=None, finished_at=now
        )
    elif outcome.permanent or job.attempts >= job.max_attempts:
        fields.update(status=JobStatus.FAILED, result=None, error=outcome.error, finished_at=now)
    else:
        delay = retry_delay(
            attempt=job.attempts,
            base_ms=settings.JOBS["RETRY_BASE_MS"],
            max_ms=settings.JOBS["RETRY_MAX_MS"],
        )
        fields.update(
            status=JobStatus.PENDING, result=None, error=outcome.error, run_at=now + delay
        )
    return fields


def finish_job(*, job: Job, outcome: Outcome) -> Job | None:
    """Write one attempt's outcome, fenced by its lease token; None if the lease was lost."""
    return finish_jobs(items=[(job, outcome)])[0]


def _plan(items: list[tuple[Job, Outcome]]) -> list[tuple[Job, dict[str, Any]]]:
    now = timezone.now()
    return [(job, outcome_fields(job=job, outcome=outcome, now=now)) for job, outcome in items]


# What a finished row says of its last progress: the worker's copy of the job may not have seen
# the last report (written by the progress reporter), and the final frame must show it.
Progress = tuple[int | None, str | None]


def _written(
    planned: list[tuple[Job, dict[str, Any]]], written: dict[uuid.UUID, Progress]
) -> list[Job | None]:
    """The planned jobs with their new fields and the row's progress, None where the fenced
    write matched no row."""
    results: list[Job | None] = []
    for job, fields in planned:
        if job.id not in written:
            results.append(None)
            continue
        for name, value in fields.items():
            setattr(job, name, value)
        job.progress, job.progress_message = written[job.id]
        results.append(job)
    return results


def finish_jobs(*, items: list[tuple[Job, Outcome]]) -> list[Job | None]:
    """Write many outcomes in one transaction, each fenced by its lease token. On PostgreSQL it
    is one UPDATE ... FROM (VALUES ...) RETURNING statement."""
    planned = _plan(items)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            sql, params = _finish_statement(planned)
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                written = {row[0]: (row[1], row[2]) for row in cursor.fetchall()}
        else:
            ids = [job.id for job, fields in planned if _fenced(job).update(**fields)]
            rows = Job.objects.filter(id__in=ids).values_list("id", "progress", "progress_message")
            written = {row[0]: (row[1], row[2]) for row in rows}
    return _written(planned, written)


async def afinish_jobs(*, items: list[tuple[Job, Outcome]]) -> list[Job | None]:
    """`finish_jobs` on PostgreSQL from the event loop (one statement, one commit)."""
    planned = _plan(items)
    sql, params = _finish_statement(planned)
    async with pg.connection() as conn:
        cursor = await conn.execute(sql, params)
        written = {row[0]: (row[1], row[2]) for row in await cursor.fetchall()}
    return _written(planned, written)


def _finish_statement(planned: list[tuple[Job, dict[str, Any]]]) -> tuple[str, list[Any]]:
    rows = ", ".join(
        [
            "(%s::uuid, %s::uuid, %s, %s::jsonb, %s, %s::timestamptz, %s::timestamptz, "
            "%s::timestamptz)"
        ]
        * len(planned)
    )
    params: list[Any] = []
    for job, fields in planned:
        params.extend(
            (
                job.id,
                job.lease_token,
                fields["status"],
                None if fields["result"] is None else json.dumps(fields["result"]),
                fields["error"],
                fields["finished_at"],
                fields["run_at"],
                fields["updated_at"],
            )
        )
    sql = f"""
        UPDATE {Job._meta.db_table} AS j SET
            status = v.status, result = v.result, error = v.error,
            finished_at = v.finished_at, run_at = v.run_at, updated_at = v.updated_at,
            lease_token = NULL, lease_expires_at = NULL
        FROM (VALUES {rows}) AS v(id, token, status, result, error, finished_at, run_at,
                                  updated_at)
        WHERE j.id = v.id AND j.lease_token = v.token AND j.status = 'RUNNING'
        RETURNING j.id, j.progress, j.progress_message
    """
    return sql, params


def set_job_progress(*, job: Job, percent: int, message: str | None) -> Job | None:
    now = timezone.now()
    fields = {"progress": percent, "progress_message": message, "updated_at": now}
    if not _fenced(job).update(**fields):
        return None
    # A copy: the worker's own object belongs to the event loop and the outcome write.
    reported = copy.copy(job)
    for name, value in fields.items():
        setattr(reported, name, value)
    return reported


def put_back_job(*, job: Job) -> Job | None:
    now = timezone.now()
    fields = {
        "status": JobStatus.PENDING,
        "attempts": max(0, job.attempts - 1),
        "run_at": now,
        "updated_at": now,
        "lease_token": None,
        "lease_expires_at": None,
        "locked_by": None,
    }
    with transaction.atomic():
        if not _fenced(job).update(**fields):
            return None
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


def recover_expired_leases(*, limit: int) -> list[Job]:
    """Jobs whose worker stopped heartbeating: back to PENDING (attempt counted) or FAILED."""
    now = timezone.now()
    recovered = []
    expired = list(
        Job.objects.filter(status=JobStatus.RUNNING, lease_expires_at__lt=now).order_by(
            "lease_expires_at"
        )[:limit]
    )
    for job in expired:
        lost = f"worker {job.locked_by} stopped heartbeating (lease expired)"
        fields: dict[str, Any] = {
            "updated_at": now,
            "lease_token": None,
            "lease_expires_at": None,
            "locked_by": None,
            "error": lost,
        }
        if job.attempts >= job.max_attempts:
            fields.update(status=JobStatus.FAILED, finished_at=now)
        else:
            fields.update(status=JobStatus.PENDING, run_at=now)
        with transaction.atomic():
            if not _fenced(job).update(**fields):
                continue  # it finished or was taken over meanwhile
        for name, value in fields.items():
            setattr(job, name, value)
        recovered.append(job)
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
