"""The API's reads and writes of jobs on PostgreSQL, on the event loop (psycopg's async pool).

The hot endpoints (`POST /jobs`, `POST /jobs/batch`, `GET /jobs/{id}`) use these instead of the
ORM so that a request never leaves the event loop: each is one statement over a pooled
connection. The ORM models stay the schema (the column list comes from `Job._meta`) and the way
in for everything else. Rows come back as `Job` instances, so schemas and broadcasts treat them
like ORM objects.

Connections come from the event loop's pool (jobs/pg.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from psycopg.errors import UniqueViolation
from psycopg.types.json import Jsonb

from jobs.models import Job
from jobs.pg import connection as _connection

FIELDS = [field.attname for field in Job._meta.concrete_fields]
COLUMNS = ", ".join(field.column for field in Job._meta.concrete_fields)
JSON_FIELDS = frozenset(
    field.attname for field in Job._meta.concrete_fields if field.get_internal_type() == "JSONField"
)
TABLE = Job._meta.db_table
_VALUES = f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join(['%s'] * len(FIELDS))})"
# The cursor is the database's (a trigger sets it, jobs/cursors.py): every insert reads it back.
_INSERT = f"{_VALUES} RETURNING cursor"
# The primary key of jobs_jobkey, where each tenant's idempotency keys are unique (0010).
KEY_CONSTRAINT = "jobs_jobkey_pkey"
_CURSORS = f"SELECT id, cursor FROM {TABLE} WHERE id = ANY(%s)"
_SELECT_ONE = f"SELECT {COLUMNS} FROM {TABLE} WHERE id = %s AND tenant_id = %s"
_SELECT_IDEMPOTENT = f"SELECT {COLUMNS} FROM {TABLE} WHERE tenant_id = %s AND idempotency_key = %s"
_FREE_IDEMPOTENCY_KEY = (
    f"UPDATE {TABLE} SET idempotency_key = NULL WHERE id = %s AND idempotency_key = %s"
)
_COPY = f"COPY {TABLE} ({COLUMNS}) FROM STDIN"


def enabled() -> bool:
    """Whether the API uses this module (PostgreSQL) or the ORM in a thread (SQLite, tests)."""
    return settings.JOBS["API_STORE"] == "postgres"


def _row(job: Job) -> list[Any]:
    values = []
    for name in FIELDS:
        value = getattr(job, name)
        values.append(Jsonb(value) if name in JSON_FIELDS and value is not None else value)
    return values


def job_from_row(row: Sequence[Any]) -> Job:
    """A Job from a row of COLUMNS."""
    return Job.from_db("default", FIELDS, row)


async def insert_job(job: Job) -> None:
    """INSERT one new job (one statement, committed)."""
    async with _connection() as conn:
        cursor = await conn.execute(_INSERT, _row(job))
        (job.cursor,) = await cursor.fetchone()


async def insert_idempotent(job: Job) -> bool:
    """INSERT a job carrying an idempotency key; False if the tenant already has that key."""
    # The key is unique in the database (the side table jobs_jobkey, migration 0010): a taken
    # key raises a unique violation, and a failed autocommit statement leaves nothing behind.
    try:
        async with _connection() as conn:
            cursor = await conn.execute(_INSERT, _row(job))
            (job.cursor,) = await cursor.fetchone()
    except UniqueViolation as exc:
        if exc.diag.constraint_name != KEY_CONSTRAINT:
            raise
        return False
    return True


async def find_by_idempotency_key(*, tenant_id: str, key: str) -> Job | None:
    async with _connection() as conn:
        cursor = await conn.execute(_SELECT_IDEMPOTENT, (tenant_id, key))
        row = await cursor.fetchone()
    return None if row is None else job_from_row(row)


async def free_idempotency_key(*, job_id: uuid.UUID, key: str) -> None:
    """Detach an expired idempotency key from its old job, so a new job may take it."""
    async with _connection() as conn:
        await conn.execute(_FREE_IDEMPOTENCY_KEY, (job_id, key))


async def insert_jobs(jobs: Sequence[Job]) -> None:
    """Insert many jobs with one COPY (one statement: all rows or none), then read the cursors
    the database gave them, in the same transaction."""
    async with _connection() as conn, conn.transaction():
        cursor = conn.cursor()
        async with cursor.copy(_COPY) as copy:
            for job in jobs:
                await copy.write_row(_row(job))
        await cursor.execute(_CURSORS, ([job.id for job in jobs],))
        cursors = dict(await cursor.fetchall())
    for job in jobs:
        job.cursor = cursors[job.id]


async def get_job(*, tenant_id: str, job_id: uuid.UUID) -> Job | None:
    """One job of the tenant, or None."""
    async with _connection() as conn:
        cursor = await conn.execute(_SELECT_ONE, (job_id, tenant_id))
        row = await cursor.fetchone()
    return None if row is None else job_from_row(row)
