"""PostgreSQL on the event loop: one psycopg async connection pool per event loop.

Used where a round trip through a thread would cost more than the statement: the API's hot
endpoints (jobs/api_store.py) and the worker's claim and outcome writes (jobs/store.py). A Daphne
or worker process has one loop and so one pool, sized like Django's own pool
(JOBS_DB_POOL_MIN/MAX). Waiting for a connection is the backpressure under load: a caller waits
up to JOBS_DB_POOL_TIMEOUT_S and gets DatabaseUnavailable only after that.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from django.db import connections
from psycopg_pool import AsyncConnectionPool, PoolTimeout


class DatabaseUnavailable(Exception):
    """No connection could be had within the pool's timeout (database down or saturated)."""


def is_postgresql() -> bool:
    return connections["default"].vendor == "postgresql"


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
            timeout=options.get("timeout", 3),
            kwargs={"autocommit": True},
            open=False,
        )
        _pools[loop] = pool
        await pool.open(wait=False)
    return pool


async def close_pools() -> None:
    """Close the running loop's pool (a worker's shutdown, tests)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()


@asynccontextmanager
async def connection() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled autocommit connection: each statement is its own transaction."""
    pool = await _pool()
    try:
        async with pool.connection() as conn:
            yield conn
    except PoolTimeout as exc:
        raise DatabaseUnavailable(str(exc)) from exc
