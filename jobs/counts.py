"""Jobs per (status, type) without counting jobs_job: the `jobs_jobcount` table that PostgreSQL
triggers keep (migration 0003_job_counts), read by /metrics.

Layout: one row per (backend, status, type) holding a signed delta. Each writing backend adds
its statements' net changes to rows keyed by its own pid (`pg_backend_pid()`), in the same
transaction as the change; backend 0 holds the folded totals. The true count of a (status, type)
is the sum over backends. Reading costs O(live backends x statuses x types), whatever the number
of jobs, and is exact at every commit (a rollback or a crash undoes the delta with the change).

Rows of backends that have exited are folded into backend 0 at each read (and by `prune_jobs`),
so the table stays as small as the set of connections. The fold skips rows it cannot lock at
once, and no writer ever waits for another writer's row: nothing here can block the queue.

On SQLite (development) there are no triggers: the counts are a grouped COUNT of jobs_job.
"""

from __future__ import annotations

import logging

from django.db import connection, transaction
from django.db.backends.utils import CursorWrapper
from django.db.models import Count

from jobs import pg
from jobs.models import Job

logger = logging.getLogger(__name__)

TABLE = "jobs_jobcount"
JOBS_TABLE = Job._meta.db_table

_FOLD_EXITED_BACKENDS = f"""
    WITH exited AS (
        SELECT backend, status, type FROM {TABLE} AS c
        WHERE backend <> 0
          AND NOT EXISTS (SELECT FROM pg_stat_activity AS a WHERE a.pid = c.backend)
        FOR UPDATE OF c SKIP LOCKED
    ), folded AS (
        DELETE FROM {TABLE} AS c USING exited AS e
        WHERE c.backend = e.backend AND c.status = e.status AND c.type = e.type
        RETURNING c.status, c.type, c.n
    )
    INSERT INTO {TABLE} AS c (backend, status, type, n)
    SELECT 0, status, type, sum(n) FROM folded
    GROUP BY status, type ORDER BY status, type
    ON CONFLICT (backend, status, type) DO UPDATE SET n = c.n + excluded.n
"""


def job_counts() -> dict[tuple[str, str], int]:
    """Jobs per (status, type), every pair that has or had jobs (zero included)."""
    if not pg.is_postgresql():
        return exact_job_counts()
    with connection.cursor() as cursor:
        cursor.execute(_FOLD_EXITED_BACKENDS)
        return _kept_counts(cursor)


def job_counts_fold() -> None:
    """Fold the rows of exited backends into the totals (each read does too; this is for when
    nothing scrapes /metrics)."""
    if pg.is_postgresql():
        with connection.cursor() as cursor:
            cursor.execute(_FOLD_EXITED_BACKENDS)


def exact_job_counts() -> dict[tuple[str, str], int]:
    """Jobs per (status, type) counted in jobs_job itself: O(table), for checks and rebuilds."""
    rows = Job.objects.values_list("status", "type").annotate(n=Count("id")).order_by()
    return {(status, job_type): n for status, job_type, n in rows}


def job_counts_rebuild() -> dict[tuple[str, str], int]:
    """Recount jobs_job into the counts table (after the triggers were bypassed, e.g. a restore
    with triggers disabled). Writers of jobs wait for the count; returns the new counts."""
    if not pg.is_postgresql():
        return exact_job_counts()
    with transaction.atomic(), connection.cursor() as cursor:
        # Writers lock jobs_job, then (in their trigger) the counts table: the same order here.
        cursor.execute(f"LOCK TABLE {JOBS_TABLE} IN SHARE MODE")
        cursor.execute(f"LOCK TABLE {TABLE} IN EXCLUSIVE MODE")
        cursor.execute(f"DELETE FROM {TABLE}")
        cursor.execute(
            f"INSERT INTO {TABLE} (backend, status, type, n) "
            f"SELECT 0, status, type, count(*) FROM {JOBS_TABLE} GROUP BY status, type"
        )
        counts = _kept_counts(cursor)
    logger.info("job counts rebuilt: %d jobs", sum(counts.values()))
    return counts


def job_counts_drift() -> dict[tuple[str, str], tuple[int, int]]:
    """(kept, exact) for every (status, type) whose kept count is wrong; empty when all are
    right. Both are read in one snapshot, so jobs changing meanwhile cause no false alarm."""
    if not pg.is_postgresql():
        return {}
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        kept = {key: n for key, n in _kept_counts(cursor).items() if n}
        exact = exact_job_counts()
    return {
        key: (kept.get(key, 0), exact.get(key, 0))
        for key in kept.keys() | exact.keys()
        if kept.get(key, 0) != exact.get(key, 0)
    }


def _kept_counts(cursor: CursorWrapper) -> dict[tuple[str, str], int]:
    cursor.execute(f"SELECT status, type, sum(n) FROM {TABLE} GROUP BY status, type")
    return {(status, job_type): int(n) for status, job_type, n in cursor.fetchall()}
