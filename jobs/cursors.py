"""Cursors: the position of every change of a job in one order, for exact, resumable updates.

The database sets `Job.cursor` in the statement that changes the row: on PostgreSQL a BEFORE
trigger takes the next value of `jobs_job_cursor_seq` (migration 0004), on SQLite an AFTER
trigger takes max + 1 (installed after every migrate, below). A change a subscriber sees (an
insert, or an update of a column of the job's wire form) gets a new cursor; a lease renewal does
not.

Sequence values are handed out in statement order, not commit order: a transaction holding
cursor 10 may commit after one holding 11. So "every change up to C" is only known once no
transaction that could still commit a cursor <= C is running. `watermark()` finds such a C: it
reads the sequence's last value L, then waits for the transactions that were running at that
moment to end (the trigger makes a transaction take its id before its cursor, so each of them
holds the lock on its id by then). After that, every row with a cursor <= L is committed or gone
for good.
SQLite has one writer at a time, so its largest cursor is already such a point.

The change log (`JobChange`, jobs/events_dispatch.py) is written by triggers too: statement-level
ones on PostgreSQL (migration 0007), a row-level one on SQLite (below).

On the wire a cursor is a string of decimal digits; "0" is before every change.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from django.db import connection, connections
from django.db.models import JSONField

from jobs.models import EventSubscription, Job, JobChange

MAX = 2**63 - 1
# How long `watermark` waits for running transactions before giving up (it then returns None).
WAIT_S = 2.0
_POLL_S = 0.002
# The transactions of this database only: the server's other databases (other services, test
# databases) take no cursor, and waiting for them would stall every watermark.
_XID_LOCKS = (
    "SELECT array_agg(l.transactionid::text) FROM pg_locks AS l "
    "JOIN pg_stat_activity AS a ON a.pid = l.pid "
    "WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted "
    "AND a.datname = current_database()"
)
_RUNNING_XIDS = f"{_XID_LOCKS} AND l.pid <> pg_backend_pid()"
_STILL_RUNNING = f"{_XID_LOCKS} AND l.transactionid::text = ANY(%s)"


def _sqlite_row_json(row: str) -> str:
    """The arguments of SQLite's `json_object` that give a job's row as JSON, keyed by column
    (JSON columns embedded as JSON, as PostgreSQL's `to_jsonb` gives them)."""
    pairs = []
    for field in Job._meta.concrete_fields:
        value = f"{row}.{field.column}"
        if isinstance(field, JSONField):
            value = f"json({value})"
        pairs.append(f"'{field.column}', {value}")
    return ", ".join(pairs)


_SQLITE_TRIGGERS = [
    f"""
    CREATE TRIGGER IF NOT EXISTS jobs_job_cursor_insert AFTER INSERT ON {Job._meta.db_table}
    FOR EACH ROW WHEN NEW.cursor IS NULL BEGIN
        UPDATE {Job._meta.db_table}
        SET cursor = (SELECT coalesce(max(cursor), 0) + 1 FROM {Job._meta.db_table})
        WHERE id = NEW.id;
    END
    """,
    f"""
    CREATE TRIGGER IF NOT EXISTS jobs_job_cursor_update
    AFTER UPDATE OF status, attempts, error, result, progress, progress_message, updated_at
    ON {Job._meta.db_table} FOR EACH ROW BEGIN
        UPDATE {Job._meta.db_table}
        SET cursor = (SELECT coalesce(max(cursor), 0) + 1 FROM {Job._meta.db_table})
        WHERE id = NEW.id;
    END
    """,
    # The change log of tenants with event subscriptions (migration 0007 on PostgreSQL): the
    # row as it stands once its new cursor is set, both on insert and on update.
    f"""
    CREATE TRIGGER IF NOT EXISTS jobs_jobchange_log
    AFTER UPDATE OF cursor ON {Job._meta.db_table} FOR EACH ROW
    WHEN NEW.cursor IS NOT NULL AND NEW.type <> 'event_delivery'
    AND NEW.tenant_id IN (SELECT tenant_id FROM {EventSubscription._meta.db_table}) BEGIN
        INSERT OR IGNORE INTO {JobChange._meta.db_table} (cursor, tenant_id, job_id, snapshot)
        VALUES (NEW.cursor, NEW.tenant_id, NEW.id, json_object({_sqlite_row_json("NEW")}));
    END
    """,
]


def parse(value: Any) -> int:
    """A cursor from the wire (a string of digits, or an integer); ValueError if it is none."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("a cursor is a string of digits")
    text = str(value)
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > MAX:
        raise ValueError("a cursor is a string of digits")
    return int(text)


def text(cursor: int | None) -> str | None:
    return None if cursor is None else str(cursor)


def watermark(*, wait_s: float | None = None) -> int | None:
    """A cursor C such that every change with a cursor <= C is committed (or rolled back) and
    visible to the next statement; None if running transactions did not end within `wait_s`."""
    with connection.cursor() as cursor:
        if connection.vendor != "postgresql":
            cursor.execute(f"SELECT coalesce(max(cursor), 0) FROM {Job._meta.db_table}")
            return int(cursor.fetchone()[0])
        cursor.execute("SELECT last_value, is_called FROM jobs_job_cursor_seq")
        last_value, is_called = cursor.fetchone()
        upto = int(last_value) if is_called else 0
        # Every transaction with an id holds an exclusive lock on it until it has ended (after
        # it left the running set, so a new snapshot sees its rows). A snapshot's running set
        # would miss the ones whose id is past every finished transaction's (they are beyond
        # its xmax, not listed in it).
        cursor.execute(_RUNNING_XIDS)
        running = cursor.fetchone()[0] or []
        deadline = time.monotonic() + (WAIT_S if wait_s is None else wait_s)
        while running:
            cursor.execute(_STILL_RUNNING, [running])
            running = cursor.fetchone()[0] or []
            if running and time.monotonic() > deadline:
                return None
            if running:
                time.sleep(_POLL_S)
    return upto


def fill(jobs: Iterable[Job]) -> None:
    """Read the cursors the database gave these jobs' last writes, in the caller's transaction
    (an UPDATE through the ORM does not return them; SQLite's trigger runs after RETURNING)."""
    by_id = {job.id: job for job in jobs}
    if not by_id:
        return
    for job_id, cursor in Job.objects.filter(id__in=list(by_id)).values_list("id", "cursor"):
        by_id[job_id].cursor = cursor


def install_sqlite_triggers(*, using: str = "default", **_: Any) -> None:
    """post_migrate: SQLite's cursor triggers (created again if a migration remade the table),
    and cursors for rows that have none, in the order of their last update."""
    conn = connections[using]
    if conn.vendor != "sqlite":
        return
    table = Job._meta.db_table
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM sqlite_master WHERE type='table' AND name='{table}'")
        if not cursor.fetchone()[0]:
            return
        for statement in _SQLITE_TRIGGERS:
            cursor.execute(statement)
        cursor.execute(f"SELECT coalesce(max(cursor), 0) FROM {table}")
        base = int(cursor.fetchone()[0])
        cursor.execute(f"SELECT id FROM {table} WHERE cursor IS NULL ORDER BY updated_at, id")
        missing = [row[0] for row in cursor.fetchall()]
        cursor.executemany(
            f"UPDATE {table} SET cursor = %s WHERE id = %s",
            [(base + n, job_id) for n, job_id in enumerate(missing, start=1)],
        )
