"""Run the store's event-loop code (psycopg's async pool) from a synchronous test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from jobs import pg

T = TypeVar("T")


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a loop of its own, closing that loop's pool after it."""

    async def main() -> T:
        try:
            return await make()
        finally:
            await pg.close_pools()

    return asyncio.run(main())
