"""The WebSocket endpoint `/ws` (SPEC §5): a tenant's job updates, live and with catch-up.

Protocol decisions beyond the spec:
- SUBSCRIBE answers SUBSCRIBED first; its `serverTime` is taken after joining the group and before
  the database read, then the `since` replay follows, then live updates. A live update queued
  before the replay and older than the replayed state of its job is dropped, so each job's frames
  stay in order; an update committed during the replay may arrive twice (never zero times).
- A replay that hits SINCE_REPLAY_LIMIT ends with an ERROR "replay truncated, resubscribe with
  since" that carries the `since` to resume from.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from jobs import events
from jobs.models import TENANT_ID_PATTERN, Tenant
from jobs.queue import sync_client
from jobs.selectors import job_updated_since
from jobs.services import api_key_authenticate, hash_api_key
from realtime.auth import is_staff_user
from realtime.broadcast import iso, job_update_message, tenant_group

logger = logging.getLogger(__name__)

# RFC 6455's 1008/1009 are reserved to the server itself under Daphne (autobahn refuses them).
CLOSE_POLICY_VIOLATION = 4008
CLOSE_MESSAGE_TOO_BIG = 4009
CLOSE_CREDENTIALS_REVOKED = 4001
UPDATES_DROPPED = "updates dropped, resubscribe with since"
REPLAY_TRUNCATED = "replay truncated, resubscribe with since"
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


@dataclass(slots=True)
class ReplayFloors:
    """The `updatedAt` of each job sent by a replay, to drop older live updates queued meanwhile."""

    created: float
    floors: dict[str, datetime]


@database_sync_to_async
def _tenant_exists(tenant_id: str) -> bool:
    return Tenant.objects.filter(id=tenant_id).exists()


@database_sync_to_async
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


# One answer per key and process, shared by all its sockets: 1,000 subscribers of one tenant
# re-check their key with one query, not 1,000.
_key_checks: dict[str, tuple[float, bool]] = {}
_key_checks_running: dict[str, asyncio.Task[bool]] = {}


async def key_still_valid(raw_key: str, *, max_age: float) -> bool:
    """Whether an API key still authenticates, from a check at most `max_age` seconds old."""
    digest = hash_api_key(raw_key)
    cached = _key_checks.get(digest)
    if cached is not None and time.monotonic() - cached[0] < max_age:
        return cached[1]
    task = _key_checks_running.get(digest)
    if task is None or task.get_loop() is not asyncio.get_running_loop():

        async def check() -> bool:
            try:
                tenant = await database_sync_to_async(api_key_authenticate)(raw_key=raw_key)
                _key_checks[digest] = (time.monotonic(), tenant is not None)
                return tenant is not None
            finally:
                _key_checks_running.pop(digest, None)

        task = asyncio.ensure_future(check())
        _key_checks_running[digest] = task
    return await asyncio.shield(task)


async def _count_connection(delta: int) -> bool:
    """Keep the open-connections gauge of /metrics (jobs/events.py); never fails a socket."""
    try:
        await sync_to_async(events.websocket_delta, thread_sensitive=False)(
            sync_client(), settings.JOBS["REDIS_PREFIX"], delta
        )
    except Exception as exc:
        logger.warning("websocket connection not counted: %s", exc)
        return False
    return True


class JobUpdatesConsumer(AsyncJsonWebsocketConsumer):
    """`/ws`: SUBSCRIBE/UNSUBSCRIBE/PING from the client, JOB_UPDATE frames from the channel layer.

    The scope comes from `realtime.auth`: `tenant` (API key) and/or a staff `user`.
    """

    max_message_bytes = 64 * 1024
    rate_per_second = 50.0
    rate_burst = 100
    max_subscriptions = 100
    # An open socket re-checks its API key this often, so a revoked key or a deactivated tenant
    # stops receiving updates within that time.
    recheck_credentials_s = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subscriptions: set[str] = set()
        self.replays: dict[str, ReplayFloors] = {}
        self.bucket = TokenBucket(rate=self.rate_per_second, burst=self.rate_burst)
        self.closing = False
        self.drop_reported = False
        self.credentials_checked_at = time.monotonic()

    # --- identity ---------------------------------------------------------------------------
    @property
    def tenant(self) -> Tenant | None:
        """The tenant of the API key this socket connected with, if any."""
        return self.scope.get("tenant")

    @property
    def is_staff(self) -> bool:
        """True if a staff session (from an allowed Origin) opened this socket."""
        return is_staff_user(self.scope.get("user"))

    @property
    def identity(self) -> str:
        """Who is connected, for log lines."""
        if self.is_staff:
            return f"staff={self.scope['user'].pk}"
        return f"tenant={self.tenant.id if self.tenant else None}"

    # --- connection lifecycle ---------------------------------------------------------------
    async def connect(self) -> None:
        """Accept an authenticated socket and greet it with CONNECTED."""
        if self.tenant is None and not self.is_staff:
            # The auth middleware refuses these; this guards a routing without it.
            await self.close()
            return
        await self.accept()
        self.counted = await _count_connection(+1)
        if self.is_staff:
            message = "connected as staff; SUBSCRIBE to any tenant"
        else:
            message = f"connected as tenant {self.tenant.id}; SUBSCRIBE with its tenantId"
        await self.send_json({"type": "CONNECTED", "message": message})

    async def disconnect(self, code: int) -> None:
        """Leave every group this socket joined."""
        if getattr(self, "counted", False):
            self.counted = False
            await _count_connection(-1)
        for tenant_id in list(self.subscriptions):
            try:
                await self.channel_layer.group_discard(tenant_group(tenant_id), self.channel_name)
            except Exception:
                # The membership expires with the layer's group_expiry; nothing else to undo.
                logger.exception("group_discard failed tenant=%s %s", tenant_id, self.identity)
        self.subscriptions.clear()
        self.replays.clear()

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
        """Join a tenant's group, answer SUBSCRIBED, then replay the changes after `since`."""
        tenant_id = self._tenant_id(content)
        since = self._since(content)
        # A revoked key must not get a replay from the database on an old socket.
        if not await self._credentials_still_valid(force=True):
            return
        await self._authorize(tenant_id)
        if tenant_id not in self.subscriptions and len(self.subscriptions) >= (
            self.max_subscriptions
        ):
            raise ProtocolError(f"too many subscriptions (at most {self.max_subscriptions})")

        # Join before reading the database: an update committed meanwhile then arrives live
        # (perhaps also in the replay) instead of falling into the gap between the two.
        await self.channel_layer.group_add(tenant_group(tenant_id), self.channel_name)
        self.subscriptions.add(tenant_id)
        self.replays.pop(tenant_id, None)
        server_time = timezone.now()
        await self.send_json(
            {"type": "SUBSCRIBED", "tenantId": tenant_id, "serverTime": iso(server_time)}
        )
        if since is not None:
            # The client asked to catch up, so earlier overflow is covered: report new ones.
            self.drop_reported = False
            await self._replay(tenant_id, since)

    async def _replay(self, tenant_id: str, since: datetime) -> None:
        limit = settings.JOBS["SINCE_REPLAY_LIMIT"]
        frames = await _jobs_updated_since(tenant_id, since, limit)
        floors: dict[str, datetime] = {}
        for frame in frames:
            updated_at = _parse_time(frame["updatedAt"])
            if updated_at is not None:
                floors[frame["jobId"]] = updated_at
            await self.send_json(frame)
        self.replays[tenant_id] = ReplayFloors(created=time.monotonic(), floors=floors)
        if len(frames) >= limit:
            # Resume one microsecond early: jobs sharing the last timestamp are not skipped.
            last = _parse_time(frames[-1]["updatedAt"])
            resume = last - timedelta(microseconds=1) if last else since
            await self.send_error(REPLAY_TRUNCATED, tenantId=tenant_id, since=iso(resume))

    async def unsubscribe(self, content: dict[str, Any]) -> None:
        """Leave a tenant's group and answer UNSUBSCRIBED."""
        tenant_id = self._tenant_id(content)
        if tenant_id not in self.subscriptions:
            raise ProtocolError(f"not subscribed to tenant {tenant_id!r}")
        # Forget it first: updates already queued for this socket are filtered in job_update.
        self.subscriptions.discard(tenant_id)
        self.replays.pop(tenant_id, None)
        await self.channel_layer.group_discard(tenant_group(tenant_id), self.channel_name)
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

    def _since(self, content: dict[str, Any]) -> datetime | None:
        raw = content.get("since")
        if raw is None:
            return None
        since = _parse_time(raw)
        if since is None:
            raise ProtocolError('"since" must be an ISO 8601 time, e.g. 2025-01-31T12:00:00Z')
        return since

    async def _authorize(self, tenant_id: str) -> None:
        if self.tenant is not None and self.tenant.id == tenant_id:
            return
        if self.is_staff:
            if not await _tenant_exists(tenant_id):
                raise ProtocolError(f"unknown tenant {tenant_id!r}")
            return
        # Same answer whether the tenant exists or not: a key learns nothing about others.
        raise ProtocolError(f"not allowed to subscribe to tenant {tenant_id!r}")

    # --- channel layer to client ------------------------------------------------------------
    async def job_update(self, event: dict[str, Any]) -> None:
        """Forward a `job.update` event's JOB_UPDATE frames (`updates`, in order, or a single
        `update`) to a client subscribed to their tenant."""
        updates = event.get("updates")
        if updates is None:
            updates = [event.get("update")]
        if not isinstance(updates, list):
            logger.warning("malformed job.update event ignored %s", self.identity)
            return
        for update in updates:
            if self.closing:
                return
            await self._forward_update(update)

    async def _forward_update(self, update: Any) -> None:
        if not isinstance(update, dict):
            logger.warning("malformed job.update event ignored %s", self.identity)
            return
        tenant_id = update.get("tenantId")
        if tenant_id not in self.subscriptions:
            # Queued before UNSUBSCRIBE, or a stray message: never leak another tenant's update.
            return
        if not await self._credentials_still_valid():
            return
        await self._report_dropped_updates()
        if self._older_than_replay(tenant_id, update):
            return
        await self.send_json(update)

    async def _credentials_still_valid(self, *, force: bool = False) -> bool:
        """Re-check an API key at most every `recheck_credentials_s`; close if it was revoked."""
        raw_key = self.scope.get("api_key")
        now = time.monotonic()
        if raw_key is None or (
            not force and now - self.credentials_checked_at < self.recheck_credentials_s
        ):
            return True
        self.credentials_checked_at = now
        max_age = 0.0 if force else self.recheck_credentials_s
        if await key_still_valid(raw_key, max_age=max_age):
            return True
        await self.close_with(CLOSE_CREDENTIALS_REVOKED, "API key revoked or tenant inactive")
        return False

    def _older_than_replay(self, tenant_id: str, update: dict[str, Any]) -> bool:
        replay = self.replays.get(tenant_id)
        if replay is None:
            return False
        # Updates queued before the replay are delivered within the layer's message expiry;
        # after that the floors are dead weight.
        if time.monotonic() - replay.created > getattr(self.channel_layer, "expiry", 60):
            del self.replays[tenant_id]
            return False
        job_id = update.get("jobId")
        floor = replay.floors.get(job_id) if isinstance(job_id, str) else None
        if floor is None:
            return False
        updated_at = _parse_time(update.get("updatedAt"))
        if updated_at is not None and updated_at <= floor:
            return True
        # Newer than the replayed state: every later update of this job is newer still.
        del replay.floors[job_id]
        return False

    async def _report_dropped_updates(self) -> None:
        """Tell the client once when its channel-layer buffer overflowed and may have dropped
        updates (channels_redis drops the oldest message of a full buffer without a trace)."""
        # Best effort: the buffer is a channels_redis implementation detail (absent elsewhere).
        buffers = getattr(self.channel_layer, "receive_buffer", None)
        queue = buffers.get(self.channel_name) if isinstance(buffers, dict) else None
        if queue is None or queue.maxsize <= 1:
            self.drop_reported = False
            return
        size = queue.qsize()
        if size >= queue.maxsize - 1:
            # Full as of the last message taken: the next one in may already have evicted one.
            if not self.drop_reported:
                self.drop_reported = True
                logger.warning(
                    "websocket receive buffer full (%s), updates may be dropped %s",
                    size,
                    self.identity,
                )
                await self.send_error(UPDATES_DROPPED)
        elif size < queue.maxsize // 2:
            self.drop_reported = False
