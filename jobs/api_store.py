"""The API's reads and writes of jobs on PostgreSQL, on the event loop (psycopg's async pool).

The hot endpoints (`POST /jobs`, `POST /jobs/batch`, `GET /jobs/{id}`) use these instead of the
ORM so that a request never leaves the event loop: each is one statement over a pooled
connection. The ORM models stay the schema (the column list comes from `Job._meta`) and the way
in for everything else. Rows come back as `Job` instances, so schemas and broadcasts treat them
like ORM objects.

A pool belongs to one event loop: a Daphne process has one loop and so one pool. Waiting for a
connection is the backpressure under load: a request waits up to JOBS_DB_POOL_TIMEOUT_S for one
and gets 503 only after that (or at once when the database refuses connections).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from django.conf import settings
from django.db import connections
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from jobs.models import Job

logger = logging.getLogger(__name__)

FIELDS = [field.attname for field in Job._meta.concrete_fields]
COLUMNS = ", ".join(field.column for field in Job._meta.concrete_fields)
JSON_FIELDS = frozenset({"payload", "result"})
TABLE = Job._meta.db_table
_INSERT = f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join(['%s'] * len(FIELDS))})"
_INSERT_IDEMPOTENT = (
    f"{_INSERT} ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL "
    "DO NOTHING RETURNING id"
)
_SELECT_ONE = f"SELECT {COLUMNS} FROM {TABLE} WHERE id = %s AND tenant_id = %s"
_SELECT_IDEMPOTENT = f"SELECT {COLUMNS} FROM {TABLE} WHERE tenant_id = %s AND idempotency_key = %s"
_FREE_IDEMPOTENCY_KEY = (
    f"UPDATE {TABLE} SET idempotency_key = NULL WHERE id = %s AND idempotency_key = %s"
)
_COPY = f"COPY {TABLE} ({COLUMNS}) FROM STDIN"


class DatabaseUnavailable(Exception):
    """No connection could be had within the pool's timeout (database down or saturated)."""


def enabled() -> bool:
    """Whether the API uses this module (PostgreSQL) or the ORM in a thread (SQLite, tests)."""
    return settings.JOBS["API_STORE"] == "postgres"


def conninfo() -> str:
    # The connection's own settings: under tests they name the test database.
    db = connections["default"].settings_dict
    return psycopg.conninfo.make_conninfo(
        dbname=db["NAME"],
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
        # Times come back in UTC, as Django's own connections have them.
        options="-c TimeZone=UTC",
        application_name="jobqueue-api",
    )


_pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool] = {}


async def _pool() -> AsyncConnectionPool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        for old in [key for key in _pools if key.is_closed()]:
            del _pools[old]
        options = connections["default"].settings_dict.get("OPTIONS", {}).get("pool", {})
        pool = AsyncConnectionPool(
            conninfo(),
            min_size=options.get("min_size", 2),
            max_size=options.get("max_size", 10),
            timeout=options.get("timeout", 10),
            kwargs={"autocommit": True},
            open=False,
            name="api",
        )
        _pools[loop] = pool
        await pool.open(wait=False)
    return pool


async def close_pools() -> None:
    """Close the running loop's pool (tests, shutdown)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()


@asynccontextmanager
async def _connection() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    pool = await _pool()
    try:
        async with pool.connection() as conn:
            yield conn
    except PoolTimeout as exc:
        raise DatabaseUnavailable(str(exc)) from exc


def _row(job: Job) -> list[Any]:
    values = []
    for name in FIELDS:
        value = getattr(job, name)
        values.append(Jsonb(value) if name in JSON_FIELDS and value is not None else value)
    return values


def _job(row: Sequence[Any]) -> Job:
    return Job.from_db("default", FIELDS, row)


async def insert_job(job: Job) -> None:
    """INSERT one new job (one statement, committed)."""
    async with _connection() as conn:
        await conn.execute(_INSERT, _row(job))


async def insert_idempotent(job: Job) -> bool:
    """INSERT a job carrying an idempotency key; False if the tenant already has that key."""
    async with _connection() as conn:
        cursor = await conn.execute(_INSERT_IDEMPOTENT, _row(job))
        return await cursor.fetchone() is not None


async def find_by_idempotency_key(*, tenant_id: str, key: str) -> Job | None:
    async with _connection() as conn:
        cursor = await conn.execute(_SELECT_IDEMPOTENT, (tenant_id, key))
        row = await cursor.fetchone()
    return None if row is None else _job(row)


async def free_idempotency_key(*, job_id: uuid.UUID, key: str) -> None:
    """Detach an expired idempotency key from its old job, so a new job may take it."""
    async with _connection() as conn:
        await conn.execute(_FREE_IDEMPOTENCY_KEY, (job_id, key))


async def insert_jobs(jobs: Sequence[Job]) -> None:
    """Insert many jobs with one COPY (one statement: all rows or none)."""
    async with _connection() as conn:
        cursor = conn.cursor()
        async with cursor.copy(_COPY) as copy:
            for job in jobs:
                await copy.write_row(_row(job))


async def get_job(*, tenant_id: str, job_id: uuid.UUID) -> Job | None:
    """One job of the tenant, or None."""
    async with _connection() as conn:
        cursor = await conn.execute(_SELECT_ONE, (job_id, tenant_id))
        row = await cursor.fetchone()
    return None if row is None else _job(row)
