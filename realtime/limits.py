"""What one tenant may take from the realtime path: open WebSockets (per API key and per tenant,
across every API process) and rows replayed from the database (per tenant, per second).

Open sockets are counted by each API process in memory, which is the truth: a socket counts
from its admission until its consumer ends, however it ends (closed by either side, or its task
killed by the server). Each process mirrors its counts to Redis, where the caps are checked
atomically against the sum over live processes, and rewrites the mirror from memory every
SYNC_INTERVAL_S with a PROCESS_TTL_S lifetime, so a count can neither drift nor outlive a
crashed process for long. The open-connections gauge of /metrics reads the same sum.

The Redis side (keys `P:ws:procs`, `P:ws:proc:{process}`, `P:replay:{tenant}` and their
scripts) is the queue's: `Queue.admit_socket`, `release_socket`, `sync_sockets`, `open_sockets`
and `take_replay_rows` in jobs/queue.py.

If Redis cannot be reached, sockets are admitted and replays allowed (logged): the caps protect
other tenants from one, they must not turn a Redis blip into an outage.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

import redis
from django.conf import settings

from jobs.counters import PROCESS_ID
from jobs.queue import Queue, async_queue
from realtime.hub import Hub

logger = logging.getLogger(__name__)

SYNC_INTERVAL_S = 5.0
PROCESS_TTL_S = 20.0
# A key is counted under a prefix of its digest: enough to tell keys apart, short in Redis.
KEY_FIELD_CHARS = 16


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a socket was not admitted: the cap reached and the sockets already open under it."""

    scope: str  # "tenant" or "key"
    cap: int
    open: int

    @property
    def message(self) -> str:
        owner = "this tenant" if self.scope == "tenant" else "this API key"
        return f"too many open connections for {owner} (at most {self.cap})"


def socket_fields(*, tenant_id: str | None, key_digest: str | None) -> tuple[str, ...]:
    """The per-tenant and per-key counters a socket is counted under (none for staff)."""
    if tenant_id is None or key_digest is None:
        return ()
    return (f"t:{tenant_id}", f"k:{key_digest[:KEY_FIELD_CHARS]}")


class Presence:
    """One API process's open sockets (per hub, i.e. per event loop), mirrored to Redis."""

    def __init__(self, hub: Hub) -> None:
        self.prefix = hub.prefix
        # Unique per hub: tests run several event loops, and so several hubs, in one process.
        self.process = f"{PROCESS_ID}:{secrets.token_hex(4)}"
        self.sockets: dict[Hashable, tuple[str, ...]] = {}
        self.counts: Counter[str] = Counter()
        self._sync_task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        hub.on_close(self.close)

    # --- admission ------------------------------------------------------------------------------
    async def admit(self, socket: Hashable, fields: tuple[str, ...]) -> Refusal | None:
        """Count `socket` under `fields`, unless a cap is reached: then return why not."""
        # Counted in memory first, so a concurrent sync cannot erase the Redis increment.
        self._count(socket, fields)
        caps = settings.JOBS
        try:
            reached = await self._queue().admit_socket(
                process=self.process,
                ttl_ms=int(PROCESS_TTL_S * 1000),
                tenant_cap=caps["WS_MAX_PER_TENANT"],
                key_cap=caps["WS_MAX_PER_KEY"],
                fields=fields,
            )
        except redis.RedisError as exc:
            logger.warning("websocket caps not checked, Redis unavailable: %s", exc)
            self._start_sync()
            return None
        if reached is not None:
            self._uncount(socket)
            scope = "tenant" if reached.field.startswith("t:") else "key"
            cap = caps["WS_MAX_PER_TENANT"] if scope == "tenant" else caps["WS_MAX_PER_KEY"]
            return Refusal(scope=scope, cap=cap, open=reached.open)
        self._start_sync()
        return None

    def forget(self, socket: Hashable) -> None:
        """Stop counting `socket` (idempotent). Synchronous, so it also runs when the socket's
        task is being cancelled; the Redis side follows in a task of its own."""
        fields = self._uncount(socket)
        if fields is None:
            return
        task = asyncio.get_running_loop().create_task(self._release(fields))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    @property
    def open(self) -> int:
        """Sockets this process has open."""
        return len(self.sockets)

    def _queue(self) -> Queue:
        """The loop's Redis client, under this hub's prefix."""
        shared = async_queue()
        return Queue(shared.client, prefix=self.prefix, plain=shared.plain)

    def _count(self, socket: Hashable, fields: tuple[str, ...]) -> None:
        self.sockets[socket] = fields
        self.counts.update(("total", *fields))

    def _uncount(self, socket: Hashable) -> tuple[str, ...] | None:
        fields = self.sockets.pop(socket, None)
        if fields is None:
            return None
        self.counts.subtract(("total", *fields))
        for field in ("total", *fields):
            if self.counts[field] <= 0:
                del self.counts[field]
        return fields

    async def _release(self, fields: tuple[str, ...]) -> None:
        try:
            await self._queue().release_socket(process=self.process, fields=("total", *fields))
        except redis.RedisError as exc:
            # The next sync rewrites the counts from memory.
            logger.warning("websocket close not counted yet, Redis unavailable: %s", exc)

    # --- the mirror -----------------------------------------------------------------------------
    def _start_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(
                self._sync_while_open(), name="realtime-presence"
            )

    async def _sync_while_open(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            await self.sync()
            if not self.sockets:
                return

    async def sync(self) -> None:
        """Rewrite this process's counts in Redis from memory (none: remove the process)."""
        try:
            await self._queue().sync_sockets(
                process=self.process, ttl_ms=int(PROCESS_TTL_S * 1000), counts=self.counts
            )
        except redis.RedisError as exc:
            logger.warning("websocket counts not synced, Redis unavailable: %s", exc)

    async def close(self) -> None:
        """Remove this process's counts (the hub is closing: shutdown, or a test's end)."""
        if self._sync_task is not None:
            self._sync_task.cancel()
        self.sockets.clear()
        self.counts.clear()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self.sync()


async def take_replay_rows(tenant_id: str, wanted: int) -> tuple[int, int]:
    """Take up to `wanted` rows from the tenant's replay budget: (rows granted, ms until one is
    available again if none was). A negative `wanted` gives unused rows back."""
    rate = settings.JOBS["WS_REPLAY_ROWS_PER_S"]
    if rate <= 0:
        return max(wanted, 0), 0
    burst = max(rate, settings.JOBS["SINCE_REPLAY_LIMIT"])
    try:
        grant = await async_queue().take_replay_rows(
            tenant=tenant_id, rate=rate, burst=burst, wanted=wanted
        )
    except redis.RedisError as exc:
        logger.warning("replay budget not checked, Redis unavailable tenant=%s: %s", tenant_id, exc)
        return max(wanted, 0), 0
    return grant.granted, grant.retry_ms
