"""The WebSocket endpoint `/ws` (SPEC §5): a tenant's job updates, live and with catch-up.

Updates reach the socket through the process's realtime hub (realtime/hub.py): one Redis
subscription per tenant per API process, fanned out in memory, each frame encoded once.

Protocol decisions beyond the spec:
- SUBSCRIBE answers SUBSCRIBED first; its `serverTime` is taken once the hub's subscription is
  confirmed and before the database read, then the `since` replay follows, then live updates.
  Live updates that arrive during the replay are held and sent after it, except those older than
  the replayed state of their job, so each job's frames stay in order; an update committed
  during the replay may arrive twice (never zero times).
- If updates may have been lost (the hub's Redis connection dropped, or more than
  LIVE_BUFFER_MAX updates arrived during a replay), the client gets the ERROR "updates dropped,
  resubscribe with since".
- A replay that hits SINCE_REPLAY_LIMIT ends with an ERROR "replay truncated, resubscribe with
  since" that carries the `since` to resume from.
- A client that reads slowly: with our server (config/daphne_server.py), frames go straight to
  the socket, and what its client has not read stays in the server. Past
  JOBS_WS_SEND_BUFFER_BYTES unread, live frames are dropped until it has read down to half, then
  it gets a RESYNC (SLOW_READER) per subscription; replays and the frames held during them are
  sent at the client's pace instead (they wait, live frames are held).
- Limits: a frame above 64 KiB closes the socket with 4009, more than 50 frames/s (burst 100) with
  4008; at most 100 subscriptions per connection. (4000 + the RFC 6455 code: Daphne only lets an
  application send 1000 or 3000-4999; its own 1 MiB cap closes with 1009.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from jobs import cursors
from jobs.auth import STAFF_CHANGED, aauthenticate
from jobs.models import TENANT_ID_PATTERN, Tenant
from jobs.orm import orm
from jobs.schemas import in_time_range
from jobs.selectors import job_updated_since
from jobs.services import hash_api_key
from realtime.auth import staff_session_user
from realtime.broadcast import iso, job_update_message
from realtime.hub import PREPARED_FRAMES, Frame, Hub, get_hub
from realtime.limits import Presence, socket_fields, take_replay_rows
from realtime.replay import CursorAheadError, replay_changes

logger = logging.getLogger(__name__)

# RFC 6455's 1008/1009 are reserved to the server itself under Daphne (autobahn refuses them).
CLOSE_POLICY_VIOLATION = 4008
CLOSE_MESSAGE_TOO_BIG = 4009
CLOSE_CREDENTIALS_REVOKED = 4001
CLOSE_TOO_MANY_CONNECTIONS = 4029
UPDATES_DROPPED = "updates dropped, resubscribe with cursor (or since)"
SLOW_READER = "updates dropped while this socket read too slowly, resubscribe with cursor"
# How often a socket past its send buffer limit looks whether its client has read enough.
DRAIN_POLL_S = 0.05
# The `code` of an ERROR after which the client resubscribes from the `cursor` it carries.
RESYNC = "RESYNC"
REPLAY_TRUNCATED = "replay truncated, resubscribe with since"
CURSOR_REPLAY_TRUNCATED = "replay truncated, resubscribe with cursor"
REPLAY_BUDGET_SPENT = "replay budget of this tenant spent, resubscribe with since later"
# How often an open staff socket's session and permission are checked again (besides at once
# when a user changes or logs out): the same bound as for API keys (jobs/auth.py).
STAFF_RECHECK_S = 5.0
# Live frames a socket may hold while its replay is sent; beyond that they are dropped and the
# client is told to catch up.
LIVE_BUFFER_MAX = 5000
# Held frames are sent in parts of this many, each once the client has read enough.
RELEASE_PART = 100
TENANT_ID_RE = re.compile(TENANT_ID_PATTERN)


class ProtocolError(Exception):
    """A client message the server cannot act on; answered with an ERROR frame, socket kept."""


@dataclass(slots=True)
class TokenBucket:
    """Allows `rate` events per second on average and `burst` at once."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.updated = time.monotonic()

    def take(self) -> bool:
        """Spend one token; False if none is left."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@orm
def _tenant_exists(tenant_id: str) -> bool:
    return Tenant.objects.filter(id=tenant_id).exists()


@orm
def _jobs_updated_since(tenant_id: str, since: datetime, limit: int) -> list[dict[str, Any]]:
    # Frames are built in the thread: nothing lazy crosses back into the event loop.
    jobs = job_updated_since(tenant_id=tenant_id, since=since, limit=limit)
    return [job_update_message(job) for job in jobs]


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = parse_datetime(value)
    except ValueError:
        return None
    if parsed is not None and timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


class CheckedSockets:
    """The open sockets of one process whose credentials are re-checked while they stay open:
    API-key sockets by tenant, re-checked when that tenant's keys change (announced on the hub),
    and staff sockets, re-checked when a user changes or logs out (announced as STAFF_CHANGED)
    and every STAFF_RECHECK_S (a session can also end by expiring or being deleted)."""

    def __init__(self, hub: Hub) -> None:
        self.by_tenant: dict[str, set[JobUpdatesConsumer]] = {}
        self.staff: set[JobUpdatesConsumer] = set()
        self._sweeper: asyncio.Task[None] | None = None
        hub.on_auth_change(self.changed)

    def add(self, consumer: JobUpdatesConsumer) -> None:
        if consumer.scope.get("api_key") and consumer.tenant is not None:
            self.by_tenant.setdefault(consumer.tenant.id, set()).add(consumer)
        if consumer.is_staff:
            self.staff.add(consumer)
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep_staff())

    def discard(self, consumer: JobUpdatesConsumer) -> None:
        self.staff.discard(consumer)
        if consumer.tenant is None:
            return
        sockets = self.by_tenant.get(consumer.tenant.id)
        if sockets is not None:
            sockets.discard(consumer)
            if not sockets:
                del self.by_tenant[consumer.tenant.id]

    def changed(self, tenant_id: str) -> None:
        if tenant_id == STAFF_CHANGED:
            consumers = list(self.staff)
        elif not tenant_id:
            consumers = [c for group in self.by_tenant.values() for c in group] + list(self.staff)
        else:
            consumers = list(self.by_tenant.get(tenant_id, ()))
        for consumer in consumers:
            consumer.schedule_credentials_check()

    async def _sweep_staff(self) -> None:
        while self.staff:
            await asyncio.sleep(STAFF_RECHECK_S)
            self.changed(STAFF_CHANGED)


class JobUpdatesConsumer(AsyncJsonWebsocketConsumer):
    """`/ws`: SUBSCRIBE/UNSUBSCRIBE/PING from the client, JOB_UPDATE frames from the hub.

    The scope comes from `realtime.auth`: `tenant` (API key) and/or a staff `user`.
    """

    max_message_bytes = 64 * 1024
    rate_per_second = 50.0
    rate_burst = 100
    max_subscriptions = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subscriptions: set[str] = set()
        # Live frames held while a tenant's replay is being sent.
        self.held: dict[str, list[Frame]] = {}
        # Per tenant, the cursor this socket is known to hold every change up to: what a
        # RESYNC tells the client to resume from.
        self.resume: dict[str, int | None] = {}
        self.dropped_while_held: set[str] = set()
        # Past JOBS_WS_SEND_BUFFER_BYTES queued for the client, live frames are dropped until it
        # has read down to half of that (then RESYNC).
        self.overflowed = False
        self.drain_watch: asyncio.Task[None] | None = None
        self.bucket = TokenBucket(rate=self.rate_per_second, burst=self.rate_burst)
        self.closing = False
        self.hub: Hub | None = None
        self.credentials_check: asyncio.Task[None] | None = None

    # --- identity ---------------------------------------------------------------------------
    @property
    def tenant(self) -> Tenant | None:
        """The tenant of the API key this socket connected with, if any."""
        return self.scope.get("tenant")

    @property
    def is_staff(self) -> bool:
        """True if a staff session that may view jobs (from an allowed Origin) opened this
        socket (decided by realtime.auth)."""
        return bool(self.scope.get("staff"))

    @property
    def identity(self) -> str:
        """Who is connected, for log lines."""
        if self.is_staff:
            return f"staff={self.scope['user'].pk}"
        return f"tenant={self.tenant.id if self.tenant else None}"

    # --- connection lifecycle ---------------------------------------------------------------
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the consumer; whatever ends it (a close, or the server cancelling its task when
        it did not stop in time), it stops being counted and delivered to."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._forget()

    def _forget(self) -> None:
        """Drop this socket from every registry of its process (synchronous: also runs while
        the task is being cancelled; the Redis side follows in tasks of their own)."""
        self.closing = True
        hub = self.hub
        if hub is None:
            return
        hub.attached(Presence).forget(self)
        hub.attached(CheckedSockets).discard(self)
        for tenant_id in self.subscriptions:
            hub.forget(tenant_id, self)
        self.subscriptions.clear()
        self.held.clear()
        self.resume.clear()

    async def connect(self) -> None:
        """Accept an authenticated socket and greet it with CONNECTED, or, past a connection
        cap, with an ERROR and a close (4029)."""
        if self.tenant is None and not self.is_staff:
            # The auth middleware refuses these; this guards a routing without it.
            await self.close()
            return
        self.hub = get_hub()
        self.hub.start()
        raw_key = self.scope.get("api_key")
        fields = socket_fields(
            tenant_id=self.tenant.id if self.tenant is not None else None,
            key_digest=hash_api_key(raw_key) if raw_key else None,
        )
        refusal = await self.hub.attached(Presence).admit(self, fields)
        await self.accept()
        if refusal is not None:
            await self.send_error(refusal.message, code="TOO_MANY_CONNECTIONS")
            await self.close_with(CLOSE_TOO_MANY_CONNECTIONS, refusal.message)
            return
        self.hub.attached(CheckedSockets).add(self)
        if self.is_staff:
            message = "connected as staff; SUBSCRIBE to any tenant"
        else:
            message = f"connected as tenant {self.tenant.id}; SUBSCRIBE with its tenantId"
        connected: dict[str, Any] = {"type": "CONNECTED", "message": message}
        if self.tenant is not None:
            connected["tenantId"] = self.tenant.id
        await self.send_json(connected)

    async def disconnect(self, code: int) -> None:
        """Stop every subscription of this socket."""
        self._forget()

    async def close_with(self, code: int, reason: str) -> None:
        """Close the socket for abuse; later frames of this connection are ignored."""
        self.closing = True
        logger.warning("websocket closed code=%s reason=%s %s", code, reason, self.identity)
        await self.close(code=code, reason=reason)

    # --- client to server -------------------------------------------------------------------
    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        """Enforce the size and rate limits, then decode; bad JSON is an ERROR, not a crash."""
        if self.closing:
            return
        if self._too_big(text_data, bytes_data):
            await self.close_with(CLOSE_MESSAGE_TOO_BIG, "message too big")
            return
        if not self.bucket.take():
            await self.close_with(CLOSE_POLICY_VIOLATION, "too many messages")
            return
        try:
            if text_data is None:
                raise ProtocolError("binary frames are not supported; send JSON text")
            content = await self.decode_json(text_data)
        except ProtocolError as exc:
            await self.send_error(str(exc))
            return
        await self.receive_json(content, **kwargs)

    def _too_big(self, text_data: str | None, bytes_data: bytes | None) -> bool:
        if bytes_data is not None:
            return len(bytes_data) > self.max_message_bytes
        text = text_data or ""
        # A character is at least one UTF-8 byte: skip encoding a string that is too long anyway.
        if len(text) > self.max_message_bytes:
            return True
        return len(text.encode("utf-8", "surrogatepass")) > self.max_message_bytes

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        """Parse a frame; raises ProtocolError for anything that is not valid JSON."""
        try:
            return json.loads(text_data)
        except (ValueError, RecursionError) as exc:
            # RecursionError: absurd nesting; ValueError also covers numbers with too many digits.
            raise ProtocolError("invalid JSON") from exc

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Dispatch one decoded client message by its `type`."""
        try:
            if not isinstance(content, dict):
                raise ProtocolError("a message must be a JSON object")
            kind = content.get("type")
            if kind is None:
                raise ProtocolError('missing "type"')
            if not isinstance(kind, str):
                raise ProtocolError('"type" must be a string')
            match kind:
                case "SUBSCRIBE":
                    await self.subscribe(content)
                case "UNSUBSCRIBE":
                    await self.unsubscribe(content)
                case "PING":
                    await self.send_json({"type": "PONG"})
                case _:
                    raise ProtocolError(
                        f"unknown message type {kind[:40]!r}; use SUBSCRIBE, UNSUBSCRIBE or PING"
                    )
        except ProtocolError as exc:
            await self.send_error(str(exc))

    async def send_error(self, message: str, **extra: Any) -> None:
        """Send an ERROR frame; the connection stays open."""
        await self.send_json({"type": "ERROR", "message": message, **extra})

    async def subscribe(self, content: dict[str, Any]) -> None:
        """Subscribe to a tenant's updates. With `cursor`: replay every change after it, then
        SUBSCRIBED with the cursor to resume from, then live updates. Otherwise SUBSCRIBED
        first, then (with `since`) the replay of jobs changed after that time."""
        tenant_id = self._tenant_id(content)
        since = self._since(content)
        after = self._cursor(content)
        if since is not None and after is not None:
            raise ProtocolError('give "cursor" or "since", not both')
        # A revoked key must not get a replay from the database on an old socket.
        if not await self._credentials_still_valid():
            return
        await self._authorize(tenant_id)
        if tenant_id not in self.subscriptions and len(self.subscriptions) >= (
            self.max_subscriptions
        ):
            raise ProtocolError(f"too many subscriptions (at most {self.max_subscriptions})")

        # Subscribe before reading the database: an update committed meanwhile then arrives live
        # (perhaps also in the replay) instead of falling into the gap between the two.
        replaying = since is not None or after is not None
        if replaying:
            self.held[tenant_id] = []
        try:
            await self.hub.subscribe(tenant_id, self)
        except (ConnectionError, TimeoutError) as exc:
            self.held.pop(tenant_id, None)
            logger.warning("subscribe failed tenant=%s %s: %s", tenant_id, self.identity, exc)
            raise ProtocolError("live updates are unavailable right now; try again") from exc
        self.subscriptions.add(tenant_id)
        if after is not None:
            await self._replay_changes(tenant_id, after)
            return
        server_time = timezone.now()
        watermark = await orm(cursors.watermark)()
        self.resume[tenant_id] = watermark
        await self.send_json(
            {
                "type": "SUBSCRIBED",
                "tenantId": tenant_id,
                "serverTime": iso(server_time),
                "cursor": cursors.text(watermark),
            }
        )
        if since is not None:
            await self._replay(tenant_id, since)

    async def _replay_changes(self, tenant_id: str, after: int) -> None:
        """The current state of each job changed after the cursor, in cursor order; then
        SUBSCRIBED with the cursor reached (and a RESYNC if the replay was cut at its limit)."""
        try:
            replay = await replay_changes(tenant_id, after)
        except CursorAheadError as exc:
            self.held.pop(tenant_id, None)
            self.subscriptions.discard(tenant_id)
            await self.hub.unsubscribe(tenant_id, self)
            raise ProtocolError(
                '"cursor" is ahead of every change this server has; resubscribe with "cursor": "0"'
            ) from exc
        if replay.budget_spent:
            self.resume[tenant_id] = after
            await self.send_json(
                {"type": "SUBSCRIBED", "tenantId": tenant_id, "cursor": cursors.text(after)}
            )
            await self.send_error(
                REPLAY_BUDGET_SPENT,
                code=RESYNC,
                tenantId=tenant_id,
                cursor=cursors.text(after),
                retryAfterMs=replay.retry_after_ms,
            )
            await self._release_held(tenant_id, {})
            return
        floors: dict[str, int] = {}
        for frame in replay.frames:
            floors[frame["jobId"]] = int(frame["cursor"])
            await self._wait_for_client()
            await self.send_json(frame)
        self.resume[tenant_id] = replay.resume
        resume = cursors.text(replay.resume)
        await self.send_json({"type": "SUBSCRIBED", "tenantId": tenant_id, "cursor": resume})
        if replay.truncated:
            await self.send_error(
                CURSOR_REPLAY_TRUNCATED, code=RESYNC, tenantId=tenant_id, cursor=resume
            )
        await self._release_held(tenant_id, floors)

    async def _replay(self, tenant_id: str, since: datetime) -> None:
        # Rows come out of the tenant's budget, shared by all its sockets on every process: a
        # tenant replaying in a loop slows its own replays, not the server.
        limit, retry_ms = await take_replay_rows(tenant_id, settings.JOBS["SINCE_REPLAY_LIMIT"])
        if limit == 0:
            await self.send_error(
                REPLAY_BUDGET_SPENT, tenantId=tenant_id, since=iso(since), retryAfterMs=retry_ms
            )
            await self._release_held(tenant_id, {})
            return
        frames = await _jobs_updated_since(tenant_id, since, limit)
        if len(frames) < limit:
            await take_replay_rows(tenant_id, len(frames) - limit)
        floors: dict[str, datetime] = {}
        for frame in frames:
            updated_at = _parse_time(frame["updatedAt"])
            if updated_at is not None:
                floors[frame["jobId"]] = updated_at
            await self._wait_for_client()
            await self.send_json(frame)
        if len(frames) >= limit:
            # Resume one microsecond early: jobs sharing the last timestamp are not skipped.
            last = _parse_time(frames[-1]["updatedAt"])
            resume = last - timedelta(microseconds=1) if last else since
            await self.send_error(REPLAY_TRUNCATED, tenantId=tenant_id, since=iso(resume))
        await self._release_held(tenant_id, floors)

    async def _release_held(
        self, tenant_id: str, floors: dict[str, datetime] | dict[str, int]
    ) -> None:
        """Send the live frames held during a replay, minus those the replay already covered
        (floors: the replayed `updatedAt` or cursor of each job)."""
        while True:
            if tenant_id in self.dropped_while_held:
                self.dropped_while_held.discard(tenant_id)
                logger.warning("live updates dropped during a replay %s", self.identity)
                await self._send_resync(tenant_id)
            held = self.held.get(tenant_id)
            if not held:
                self.held.pop(tenant_id, None)
                return
            self.held[tenant_id] = []
            frames = [f for f in held if not self._covered_by_replay(f, floors)]
            # In parts, at the client's pace (what arrives meanwhile is held in turn).
            for start in range(0, len(frames), RELEASE_PART):
                await self._wait_for_client()
                await self._send_frames(frames[start : start + RELEASE_PART])

    @staticmethod
    def _covered_by_replay(frame: Frame, floors: dict[str, datetime] | dict[str, int]) -> bool:
        if not floors:
            return False
        try:
            update = json.loads(frame.text)
        except ValueError:
            return False
        floor = floors.get(update.get("jobId"))
        if floor is None:
            return False
        if isinstance(floor, int):
            cursor = update.get("cursor")
            return isinstance(cursor, str) and cursor.isdigit() and int(cursor) <= floor
        updated_at = _parse_time(update.get("updatedAt"))
        return updated_at is not None and updated_at <= floor

    async def _send_resyncs(self, message: str = UPDATES_DROPPED) -> None:
        for tenant_id in sorted(self.subscriptions):
            await self._send_resync(tenant_id, message)

    async def _send_resync(self, tenant_id: str, message: str = UPDATES_DROPPED) -> None:
        """Tell the client it may have missed updates of the tenant, and where to resume."""
        await self.send_error(
            message,
            code=RESYNC,
            tenantId=tenant_id,
            cursor=cursors.text(self.resume.get(tenant_id)),
        )

    async def unsubscribe(self, content: dict[str, Any]) -> None:
        """Stop a tenant's updates and answer UNSUBSCRIBED."""
        tenant_id = self._tenant_id(content)
        if tenant_id not in self.subscriptions:
            raise ProtocolError(f"not subscribed to tenant {tenant_id!r}")
        self.subscriptions.discard(tenant_id)
        self.held.pop(tenant_id, None)
        self.resume.pop(tenant_id, None)
        self.dropped_while_held.discard(tenant_id)
        await self.hub.unsubscribe(tenant_id, self)
        await self.send_json({"type": "UNSUBSCRIBED", "tenantId": tenant_id})

    def _tenant_id(self, content: dict[str, Any]) -> str:
        tenant_id = content.get("tenantId")
        if tenant_id is None:
            raise ProtocolError('missing "tenantId"')
        if not isinstance(tenant_id, str):
            raise ProtocolError('"tenantId" must be a string')
        if not TENANT_ID_RE.fullmatch(tenant_id):
            raise ProtocolError('"tenantId" is not a valid tenant id')
        return tenant_id

    @staticmethod
    def _cursor(content: dict[str, Any]) -> int | None:
        raw = content.get("cursor")
        if raw is None:
            return None
        try:
            return cursors.parse(raw)
        except ValueError as exc:
            raise ProtocolError('"cursor" must be a cursor the server gave, e.g. "0"') from exc

    def _since(self, content: dict[str, Any]) -> datetime | None:
        raw = content.get("since")
        if raw is None:
            return None
        since = _parse_time(raw)
        if since is None:
            raise ProtocolError('"since" must be an ISO 8601 time, e.g. 2025-01-31T12:00:00Z')
        try:
            return in_time_range(since, name='"since"', latest=timezone.now() + timedelta(days=1))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc

    async def _authorize(self, tenant_id: str) -> None:
        if self.tenant is not None and self.tenant.id == tenant_id:
            return
        if self.is_staff:
            if not await _tenant_exists(tenant_id):
                raise ProtocolError(f"unknown tenant {tenant_id!r}")
            return
        # Same answer whether the tenant exists or not: a key learns nothing about others.
        raise ProtocolError(f"not allowed to subscribe to tenant {tenant_id!r}")

    # --- hub to client ----------------------------------------------------------------------
    async def deliver(self, tenant: str, frames: list[Frame]) -> None:
        """Send a tenant's JOB_UPDATE frames (already JSON) from the hub, or hold them while
        that tenant's replay is under way."""
        if self.closing or tenant not in self.subscriptions:
            return
        held = self.held.get(tenant)
        if held is not None:
            held.extend(frames)
            if len(held) > LIVE_BUFFER_MAX:
                # Keep the newest; the client is told after the replay, before they are sent.
                del held[: len(held) - LIVE_BUFFER_MAX]
                self.dropped_while_held.add(tenant)
            return
        await self._send_frames(frames)

    async def _send_frames(self, frames: list[Frame]) -> None:
        # This runs once per socket for every update: with our server, each frame is framed
        # once per process and written straight to the socket; elsewhere, the plain ASGI send.
        fast = self.scope.get("extensions", {}).get(PREPARED_FRAMES)
        if fast is not None:
            if self.overflowed:
                return  # dropped: the client gets a RESYNC once it has read what is queued
            # What is still queued from earlier event-loop turns is what the client did not
            # read (what this call writes goes out at the next turn, so it is not counted).
            pending = fast.get("pending")
            limit = settings.JOBS["WS_SEND_BUFFER_BYTES"]
            if pending is not None and pending() > limit:
                self._overflow(pending, limit)
                return
            prepare, send_prepared = fast["prepare"], fast["send"]
            for frame in frames:
                send_prepared(frame.prepared(prepare))
            return
        for frame in frames:
            await self.base_send({"type": "websocket.send", "text": frame.text})

    async def _wait_for_client(self) -> None:
        """Before the next part of a replay or of the frames held during it: while the client
        has more than JOBS_WS_SEND_BUFFER_BYTES to read, wait until it has read half (live
        frames are held meanwhile), so that a replay paces itself instead of overflowing."""
        fast = self.scope.get("extensions", {}).get(PREPARED_FRAMES)
        pending = None if fast is None else fast.get("pending")
        limit = settings.JOBS["WS_SEND_BUFFER_BYTES"]
        if pending is None or pending() <= limit:
            return
        # What was written in this turn of the event loop goes out at the next one.
        await asyncio.sleep(0)
        # Polled: a transport's buffer has nothing to wait on (its producer slot is taken).
        while not self.closing and pending() > limit // 2:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)

    def _overflow(self, pending: Callable[[], int], limit: int) -> None:
        """The client reads slower than its updates come: stop writing to its socket (what is
        queued stays queued) until it has read down to half the limit, then tell it to resync."""
        self.overflowed = True
        logger.warning(
            "websocket send buffer over %d bytes: dropping updates until it drains %s",
            limit,
            self.identity,
        )
        self.drain_watch = asyncio.get_running_loop().create_task(
            self._resync_when_drained(pending, limit)
        )

    async def _resync_when_drained(self, pending: Callable[[], int], limit: int) -> None:
        # Polled: a transport's buffer has nothing to wait on (its producer slot is taken).
        while not self.closing and pending() > limit // 2:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        if self.closing:
            return
        # RESYNC first, then live frames again: those dropped meanwhile are in the replay.
        await self._send_resyncs(SLOW_READER)
        self.overflowed = False

    def updates_lost(self) -> None:
        """The hub may have missed updates (its Redis connection dropped): tell the client, and
        re-check the key, whose revocation may have been missed too."""
        if not self.closing and self.subscriptions:
            logger.warning("updates may have been lost %s", self.identity)
            asyncio.get_running_loop().create_task(self._send_resyncs())
        self.schedule_credentials_check()

    def schedule_credentials_check(self) -> None:
        """Re-check this socket's API key or staff session soon (they may have changed)."""
        if self.closing or (self.scope.get("api_key") is None and not self.is_staff):
            return
        if self.credentials_check is None or self.credentials_check.done():
            self.credentials_check = asyncio.get_running_loop().create_task(
                self._credentials_still_valid()
            )

    async def _credentials_still_valid(self) -> bool:
        """Whether the socket's API key still authenticates and its staff session is still
        logged in with the permission to view jobs; closes the socket if not."""
        raw_key = self.scope.get("api_key")
        if raw_key is not None and await aauthenticate(raw_key) is None:
            await self.close_with(CLOSE_CREDENTIALS_REVOKED, "API key revoked or tenant inactive")
            return False
        if self.is_staff and not await self._staff_still_valid():
            await self.close_with(
                CLOSE_CREDENTIALS_REVOKED, "staff session ended or permission withdrawn"
            )
            return False
        return True

    async def _staff_still_valid(self) -> bool:
        session = self.scope.get("session")
        user = self.scope.get("user")
        session_key = getattr(session, "session_key", None)
        return await orm(staff_session_user)(session_key, getattr(user, "pk", None)) is not None
