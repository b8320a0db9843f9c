"""One Redis pub/sub connection per API process, shared by every socket it serves.

Each job state change is PUBLISHed once, on its tenant's channel (`P:updates:{tenant}`), by
whoever wrote it (the API after commit, a worker after its write). The hub SUBSCRIBEs to a
tenant's channel while at least one local socket watches that tenant and hands each message to
those sockets in memory, so an update costs one publish and one read per API process however many
sockets watch the tenant. The hub also listens on `P:auth`, where changes to keys and tenants are
announced, so that API-key lookups can be cached (jobs/auth.py) and open sockets re-checked.

If the connection drops, every listener is told (`updates_lost`) at once: messages published
until the hub is subscribed again are gone, so subscribers are asked to catch up from the
database (SUBSCRIBE with `since`, which waits for the hub to be back before it reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from jobs.redis_clients import async_redis, on_master

logger = logging.getLogger(__name__)
T = TypeVar("T")

RECONNECT_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0)
# The ASGI extension our server (config/daphne_server.py) offers WebSocket applications:
# `prepare(text)` frames a message once, `send(prepared)` writes it to one socket. One update goes
# to many sockets; framing it once per process instead of once per socket, and skipping the
# per-message ASGI hops, is most of what a fan-out costs. Consumers use it when it is offered.
# It also offers `pending()`: the bytes written to that socket that the kernel has not taken yet.
PREPARED_FRAMES = "jobqueue.prepared_frames"
# Its counterpart for HTTP responses (a `GET /events` stream): `{"pending": callable}`.
SEND_BUFFER = "jobqueue.send_buffer"
SUBSCRIBE_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 5.0
READ_BATCH = 100
# How often a hub on a Sentinel set checks that its connection is still on the master.
MASTER_CHECK_S = 1.0


def updates_channel(prefix: str, tenant: str) -> str:
    """The pub/sub channel of one tenant's job updates."""
    return f"{prefix}:updates:{tenant}"


def auth_channel(prefix: str) -> str:
    """The pub/sub channel announcing changes to API keys and tenants (payload: tenant id)."""
    return f"{prefix}:auth"


def encode_frames(texts: list[str]) -> str:
    """One pub/sub message for several JOB_UPDATE frames (JSON texts never hold a raw newline)."""
    return "\n".join(texts)


class Frame:
    """One JOB_UPDATE frame as JSON text, with what a server made of it for sending, made once
    per process however many sockets it goes to (see config/daphne_server.py)."""

    __slots__ = ("_prepared", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._prepared: Any = None

    def prepared(self, prepare: Callable[[str], Any]) -> Any:
        if self._prepared is None:
            self._prepared = prepare(self.text)
        return self._prepared


class Listener(Protocol):
    """A local socket subscribed to tenants' updates."""

    async def deliver(self, tenant: str, frames: list[Frame]) -> None: ...

    def updates_lost(self) -> None: ...


@dataclass(eq=False)
class _Channel:
    listeners: set[Listener] = field(default_factory=set)


class MasterMoved(ConnectionError):
    """The Sentinel set's master is no longer where the hub's connection is."""


class Hub:
    """The process's subscriber. Lives in the event loop that first used it."""

    def __init__(self, *, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        # Bumped on every (re)connection: a cache entry taken under an older generation may have
        # missed an invalidation.
        self.generation = 0
        self.connected = False
        self._channels: dict[str, _Channel] = {}
        # One future per SUBSCRIBE sent, resolved by its confirmation (Redis answers in order).
        self._acks: dict[str, deque[asyncio.Future[None]]] = {}
        self._auth_callbacks: list[Callable[[str], None]] = []
        self._close_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._attached: dict[Callable[[Hub], Any], Any] = {}
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        # Shown by CLIENT LIST, so operators (and tests) can tell this connection apart.
        self.client_name = f"{prefix}:hub:{os.getpid()}"

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the reader task in the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="realtime-hub")

    async def close(self) -> None:
        """Stop reading and close the connection (tests, shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        self.connected = False
        for callback in self._close_callbacks:
            try:
                await callback()
            except Exception:
                logger.exception("a hub close callback failed")

    async def wait_connected(self, within_s: float) -> bool:
        """Wait until the subscription is live; False if it is not within `within_s`."""
        self.start()
        try:
            await asyncio.wait_for(self._up.wait(), within_s)
        except TimeoutError:
            return False
        return self.connected

    def on_auth_change(self, callback: Callable[[str], None]) -> None:
        """Call `callback(tenant_id)` whenever a key or tenant changes (from any process)."""
        self._auth_callbacks.append(callback)

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await `callback()` when the hub closes (what is attached to it cleans up)."""
        self._close_callbacks.append(callback)

    def attached(self, factory: Callable[[Hub], T]) -> T:
        """The one object `factory` makes for this hub (the key cache, the registry of key
        sockets), made on first use; it lives and dies with the hub."""
        if factory not in self._attached:
            self._attached[factory] = factory(self)
        return self._attached[factory]

    # --- subscriptions --------------------------------------------------------------------------
    async def subscribe(self, tenant: str, listener: Listener) -> None:
        """Deliver `tenant`'s updates to `listener` from now on. Returns once Redis confirmed the
        subscription, so a change published after this returns is delivered; raises
        ConnectionError if Redis cannot be reached."""
        self.start()
        name = updates_channel(self.prefix, tenant)
        channel = self._channels.get(name)
        if channel is None:
            self._channels[name] = _Channel({listener})
            if self.connected:
                await self._send_subscribe([name])
                return
        else:
            channel.listeners.add(listener)
        # Not connected yet: the reader subscribes to every channel on (re)connection.
        if not self.connected and not await self.wait_connected(SUBSCRIBE_TIMEOUT_S):
            raise ConnectionError("realtime updates are unavailable (Redis unreachable)")
        pending = self._acks.get(name)
        if pending:
            await asyncio.wait_for(asyncio.shield(pending[-1]), SUBSCRIBE_TIMEOUT_S)

    def listener_count(self, tenant: str) -> int:
        """How many local sockets watch `tenant`'s updates (0: the hub has let the channel go)."""
        channel = self._channels.get(updates_channel(self.prefix, tenant))
        return len(channel.listeners) if channel is not None else 0

    async def unsubscribe(self, tenant: str, listener: Listener) -> None:
        """Stop delivering `tenant`'s updates to `listener`."""
        name = self._drop_listener(tenant, listener)
        if name is not None:
            await self._send_unsubscribe(name)

    def forget(self, tenant: str, listener: Listener) -> None:
        """`unsubscribe` without waiting, for a listener whose task may be being cancelled: the
        listener is gone at once, the Redis UNSUBSCRIBE (if nobody else listens) follows."""
        name = self._drop_listener(tenant, listener)
        if name is not None:
            task = asyncio.get_running_loop().create_task(self._send_unsubscribe(name))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _drop_listener(self, tenant: str, listener: Listener) -> str | None:
        """Remove `listener`; the channel's name if nobody listens to it any more."""
        name = updates_channel(self.prefix, tenant)
        channel = self._channels.get(name)
        if channel is None:
            return None
        channel.listeners.discard(listener)
        if channel.listeners:
            return None
        del self._channels[name]
        return name

    async def _send_unsubscribe(self, name: str) -> None:
        # Someone may have subscribed again meanwhile (forget's task runs later).
        if not self.connected or name in self._channels:
            return
        try:
            await self._pubsub.unsubscribe(name)
        except Exception as exc:
            # A channel nobody listens to only costs ignored messages until reconnection.
            logger.warning("unsubscribe failed channel=%s: %s", name, exc)

    async def _send_subscribe(self, names: list[str]) -> None:
        futures = self._expect_acks(names)
        await self._pubsub.subscribe(*names)
        await asyncio.wait_for(asyncio.gather(*futures), SUBSCRIBE_TIMEOUT_S)

    def _expect_acks(self, names: list[str]) -> list[asyncio.Future[None]]:
        """A future per channel about to be subscribed, resolved by its confirmation."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        for name in names:
            future: asyncio.Future[None] = loop.create_future()
            self._acks.setdefault(name, deque()).append(future)
            futures.append(future)
        return futures

    # --- reading --------------------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while True:
            # No silent retries: a reconnection must be seen here, because messages published
            # while the connection was down are lost and listeners have to be told.
            client = async_redis(
                self.url,
                socket_connect_timeout=2,
                socket_keepalive=True,
                health_check_interval=10,
                retry=Retry(NoBackoff(), 0),
                client_name=self.client_name,
            )
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(auth_channel(self.prefix))
                self._pubsub = pubsub
                names = list(self._channels)
                # Not awaited: this task is the reader that will resolve them.
                self._expect_acks(names)
                if names:
                    await pubsub.subscribe(*names)
                self.connected = True
                self.generation += 1
                self._up.set()
                if self.generation > 1:
                    logger.warning("realtime hub reconnected")
                attempt = 0
                await self._read(client, pubsub)
            except asyncio.CancelledError:
                raise
            except MasterMoved as exc:
                logger.warning("realtime hub: %s; reconnecting", exc)
                # Other processes may publish on the old master until their own clients notice
                # (jobs/redis_clients.py, within about MASTER_CHECK_S): listeners are told
                # again once they all have, so what was published there is read back too.
                asyncio.get_running_loop().call_later(3 * MASTER_CHECK_S, self._notify_lost)
            except Exception as exc:
                logger.warning("realtime hub connection lost (%s); reconnecting", exc)
            finally:
                was_connected = self.connected
                self.connected = False
                self._up.clear()
                self._fail_acks()
                self._pubsub = None
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except Exception:
                    logger.debug("closing the hub's connection failed", exc_info=True)
                if was_connected:
                    self._notify_lost()
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1

    async def _read(self, client: Any, pubsub: Any) -> None:
        auth = auth_channel(self.prefix).encode()
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked >= MASTER_CHECK_S:
                # After a Sentinel failover nothing closes this connection to the old master
                # at once (after SENTINEL FAILOVER it stays a master for some seconds, then
                # becomes a replica), and what is published on the new one does not reach it
                # reliably: move, and have listeners told.
                checked = time.monotonic()
                if not await on_master(client, pubsub.connection):
                    raise MasterMoved("the Redis master moved")
            # A bounded wait, so the idle connection's health check runs between reads.
            message = await pubsub.get_message(timeout=READ_TIMEOUT_S)
            if message is None:
                continue
            # Take what else has already arrived: a job's PENDING, RUNNING and COMPLETED often
            # come within a few milliseconds, and a socket then gets them in one write.
            batch = [message]
            while len(batch) < READ_BATCH:
                more = await pubsub.get_message(timeout=0)
                if more is None:
                    break
                batch.append(more)
            updates: dict[str, list[Frame]] = {}
            for item in batch:
                kind, name = item["type"], item["channel"]
                if kind == "message":
                    if name == auth:
                        self._auth_changed(item["data"])
                    else:
                        # Grouped per tenant, in arrival order; tenants are independent.
                        updates.setdefault(name.decode(), []).extend(
                            Frame(text) for text in item["data"].decode().split("\n")
                        )
                elif kind == "subscribe":
                    self._confirmed(name.decode())
            for name, frames in updates.items():
                await self._dispatch(name, frames)

    def _confirmed(self, name: str) -> None:
        pending = self._acks.get(name)
        if pending:
            future = pending.popleft()
            if not future.done():
                future.set_result(None)
            if not pending:
                self._acks.pop(name, None)

    async def _dispatch(self, name: str, frames: list[Frame]) -> None:
        channel = self._channels.get(name)
        if channel is None:
            return
        tenant = name.rsplit(":", 1)[1]
        for listener in list(channel.listeners):
            try:
                await listener.deliver(tenant, frames)
            except Exception:
                # One broken socket must not keep the update from the others.
                logger.exception("delivering an update failed tenant=%s", tenant)

    def _auth_changed(self, data: bytes) -> None:
        tenant = data.decode(errors="replace")
        for callback in list(self._auth_callbacks):
            try:
                callback(tenant)
            except Exception:
                logger.exception("auth change callback failed tenant=%s", tenant)

    def _notify_lost(self) -> None:
        for channel in list(self._channels.values()):
            for listener in list(channel.listeners):
                listener.updates_lost()
        for callback in list(self._auth_callbacks):
            callback("")

    def _fail_acks(self) -> None:
        for pending in self._acks.values():
            for future in pending:
                if not future.done():
                    future.set_exception(ConnectionError("Redis connection lost"))
                    # Nobody may be awaiting it: retrieve the exception so it is not logged.
                    future.exception()
        self._acks.clear()


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}


def get_hub() -> Hub:
    """The hub of the running event loop (one per API process in production)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    prefix = settings.JOBS["REDIS_PREFIX"]
    if hub is None or hub.prefix != prefix:
        # Drop hubs of loops that are gone (tests run one loop per test).
        for old in [key for key in _hubs if key.is_closed()]:
            del _hubs[old]
        hub = _hubs[loop] = Hub(url=settings.REDIS_URL, prefix=prefix)
    return hub


async def close_hub() -> None:
    """Close the running loop's hub, if any (tests, which run one loop per test)."""
    hub = _hubs.pop(asyncio.get_running_loop(), None)
    if hub is not None:
        await hub.close()


def running_hub() -> Hub | None:
    """The running loop's hub if one was started, else None (never starts one)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return _hubs.get(loop)
