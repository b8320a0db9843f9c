"""The partitions of jobs_job on PostgreSQL (migration 0010, docs/operations.md "Partitions").

jobs_job is partitioned by range of `created_at`: one partition per `JOBS_PARTITION_MONTHS`
months, named `jobs_job_pYYYYMM` after its first month (periods start at months divisible by
the setting, counted from year 0), and a DEFAULT partition that takes whatever no partition
covers, so an insert never fails. The workers' upkeep and `prune_jobs` create the current and
the next period ahead of time (`partitions_ensure`); `prune_jobs` drops a whole partition once
it lies before the retention cutoff and holds only jobs it would delete anyway
(`partition_drop`). On SQLite jobs_job is an ordinary table and all of this does nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.backends.utils import CursorWrapper
from django.utils import timezone

from jobs import pg
from jobs.api_store import COLUMNS
from jobs.models import TERMINAL_STATUSES, Job

logger = logging.getLogger(__name__)

TABLE = Job._meta.db_table
DEFAULT_PARTITION = f"{TABLE}_default"
# How long DDL on jobs_job may wait for a lock before it gives up (and tries again later):
# waiting longer would queue every job statement behind it.
LOCK_TIMEOUT = "2s"
_BOUND = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")


@dataclass(frozen=True)
class Partition:
    name: str
    start: datetime
    end: datetime


def enabled() -> bool:
    """Whether jobs_job is a partitioned table (PostgreSQL after migration 0010)."""
    if not pg.is_postgresql():
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", [TABLE])
        row = cursor.fetchone()
    return row is not None and row[0] == "p"


def period_start(at: datetime, months: int) -> datetime:
    """The first instant (UTC) of the period of `months` months that holds `at`."""
    at = at.astimezone(UTC)
    index = at.year * 12 + at.month - 1
    index -= index % months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def add_months(at: datetime, months: int) -> datetime:
    index = at.year * 12 + at.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _timestamp(text: str) -> datetime:
    # PostgreSQL writes `2026-12-01 00:00:00+00`, in the session's time zone (UTC).
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def partitions() -> list[Partition]:
    """The range partitions of jobs_job, oldest first (not the DEFAULT one)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits AS i "
            "JOIN pg_class AS c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
            [TABLE],
        )
        rows = cursor.fetchall()
    found = []
    for name, bound in rows:
        match = _BOUND.search(bound or "")
        if match is not None:
            found.append(Partition(name, _timestamp(match[1]), _timestamp(match[2])))
    return sorted(found, key=lambda part: part.start)


def partitions_ensure(*, now: datetime | None = None, ahead: int = 1) -> list[str]:
    """Create the partitions of the current period and of `ahead` periods after it where none
    covers them yet; returns the names created. A period that overlaps an existing partition
    (JOBS_PARTITION_MONTHS was changed) is left to the DEFAULT partition, and so is one whose
    rows already sit in the DEFAULT partition (PostgreSQL refuses to create it then)."""
    if not enabled():
        return []
    months = settings.JOBS["PARTITION_MONTHS"]
    existing = partitions()
    start = period_start(now or timezone.now(), months)
    created = []
    for _ in range(ahead + 1):
        end = add_months(start, months)
        if not any(part.start < end and start < part.end for part in existing):
            name = f"{TABLE}_p{start:%Y%m}"
            try:
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                    cursor.execute(
                        f"CREATE TABLE {name} PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)",
                        [start, end],
                    )
                created.append(name)
                logger.info("created partition %s [%s, %s)", name, start, end)
            except DatabaseError as exc:
                # Another process made it first, a lock was not had in time, or the DEFAULT
                # partition holds rows of the period: the next run tries again.
                logger.warning("partition %s not created: %s", name, exc)
        start = end
    return created


# Rows that keep a partition from being dropped: a job that is not finished, one finished after
# the cutoff, and one whose dependents are not settled yet. Each is an index probe per partition.
_KEEPS = (
    "SELECT EXISTS (SELECT FROM {table} WHERE status NOT IN ({terminal})) "
    "OR EXISTS (SELECT FROM {table} WHERE status IN ({terminal}) "
    "AND (finished_at IS NULL OR finished_at >= %s)) "
    "OR EXISTS (SELECT FROM {table} WHERE dependents_waiting)"
)
_TERMINAL = ", ".join(f"'{status}'" for status in sorted(TERMINAL_STATUSES))


def _keeps(cursor: CursorWrapper, table: str, cutoff: datetime) -> bool:
    cursor.execute(_KEEPS.format(table=table, terminal=_TERMINAL), [cutoff])
    return bool(cursor.fetchone()[0])


def partition_drop(part: Partition, *, cutoff: datetime) -> int | None:
    """Drop a partition that lies wholly before `cutoff` and holds only jobs that finished
    before it; returns how many jobs it held, or None if it was kept.

    First a check without locks (most partitions that are kept are kept here). Then DETACH in a
    transaction of its own: it takes an ACCESS EXCLUSIVE lock on jobs_job for a moment (waiting
    at most LOCK_TIMEOUT), after which no statement reaches the rows; the table is marked as
    detached by this module (a comment), so that if this process stops before the end, the
    next prune finishes the drop (`partitions_drop_detached`). Then `_drop_detached`."""
    if part.end > cutoff:
        return None
    with connection.cursor() as cursor:
        if _keeps(cursor, part.name, cutoff):
            return None
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            cursor.execute(f"ALTER TABLE {TABLE} DETACH PARTITION {part.name}")
            cursor.execute(f"COMMENT ON TABLE {part.name} IS '{DETACHED}'")
    except DatabaseError as exc:
        logger.warning("partition %s not detached: %s", part.name, exc)
        return None
    return _drop_detached(part.name, cutoff=cutoff)


DETACHED = "jobs_job partition detached by prune_jobs, to be dropped"


def partitions_drop_detached(*, cutoff: datetime) -> int:
    """Finish the drops a stopped prune left half done (tables detached, not dropped); how
    many jobs went."""
    if not enabled():
        return 0
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_class AS c WHERE c.relkind = 'r' "
            "AND c.relnamespace = to_regnamespace(current_schema()) "
            "AND obj_description(c.oid, 'pg_class') = %s",
            [DETACHED],
        )
        names = [name for (name,) in cursor.fetchall()]
    return sum(_drop_detached(name, cutoff=cutoff) for name in names)


def _drop_detached(name: str, *, cutoff: datetime) -> int:
    """Drop a detached partition: its rows' job counts, idempotency keys, schedule due times
    and workflow edges go with it, in one transaction. A job that must stay (retried between
    the check and the DETACH) is copied back into jobs_job first (it lands in the DEFAULT
    partition), so no unfinished job is ever lost. Returns how many jobs were dropped."""
    kept = (
        f"status NOT IN ({_TERMINAL}) OR finished_at IS NULL OR finished_at >= %s "
        "OR dependents_waiting"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        # Counts first, for every row (moved rows are counted again by the insert's trigger).
        cursor.execute(
            "INSERT INTO jobs_jobcount AS c (backend, status, type, n) "
            f"SELECT pg_backend_pid(), status, type, -count(*) FROM {name} "
            "GROUP BY status, type ORDER BY status, type "
            "ON CONFLICT (backend, status, type) DO UPDATE SET n = c.n + excluded.n"
        )
        cursor.execute(
            f"DELETE FROM jobs_jobkey AS k USING {name} AS j "
            "WHERE k.tenant_id = j.tenant_id AND k.idempotency_key = j.idempotency_key "
            "AND k.job_id = j.id"
        )
        cursor.execute(
            f"DELETE FROM jobs_jobscheduledue AS d USING {name} AS j "
            "WHERE d.schedule_id = j.schedule_id AND d.scheduled_for = j.scheduled_for "
            "AND d.job_id = j.id"
        )
        cursor.execute(
            f"INSERT INTO {TABLE} ({COLUMNS}) SELECT {COLUMNS} FROM {name} WHERE {kept}", [cutoff]
        )
        if cursor.rowcount:
            logger.warning(
                "partition %s: %d jobs changed after the check, moved back", name, cursor.rowcount
            )
            cursor.execute(f"DELETE FROM {name} WHERE {kept}", [cutoff])
        cursor.execute(
            f"DELETE FROM jobs_jobdependency WHERE parent_id IN (SELECT id FROM {name}) "
            f"OR child_id IN (SELECT id FROM {name})"
        )
        cursor.execute(f"SELECT count(*) FROM {name}")
        (dropped,) = cursor.fetchone()
        cursor.execute(f"DROP TABLE {name}")
    logger.info("dropped partition %s: %d finished jobs before %s", name, dropped, cutoff)
    return int(dropped)
