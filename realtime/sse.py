"""`GET /events` (SPEC §10): a tenant's job updates as Server-Sent Events, for clients that
cannot hold a WebSocket (curl, serverless functions, proxies). The protocol is in docs/api.md.

Framing: every change is `event: job_update`, `id: <the job's cursor>`, `data: <the JOB_UPDATE
frame of /ws>`. Once caught up, the stream sends `event: subscribed` whose `id:` is the cursor it
has sent every change up to; a replay cut short by its budget ends the stream with `event: resync`
whose `id:` is where to resume. A browser's EventSource reconnects by itself, with the last `id:`
it got as `Last-Event-ID`, whenever a stream ends; curl users pass it back.

So every `id:` must be a point to resume from: every change of the tenant with a smaller cursor
was sent before it. Live frames from the hub cannot promise that: they arrive in commit order,
not cursor order (a transaction holding cursor 11 may commit after one holding 12), so a client
cut off between 12 and 11 would resume from 12 and never see 11. Hence a stream takes nothing
from the hub but a wake-up: its tenant's (or job's) messages tell it to read the database, from
the cursor it reached, up to a watermark (realtime/replay.py), and it sends what it read in
cursor order. The same read serves a resume, a lost Redis connection (the stream subscribes again
and reads what it missed; while Redis is down it reads every SUBSCRIBE_TIMEOUT_S) and a slow
client (past JOBS_WS_SEND_BUFFER_BYTES unsent, the stream reads nothing until the client has
read half of it): nothing is ever dropped, so those never need a resync. The price: one
watermark and one indexed read per stream per burst of updates (reads do not overlap; updates
arriving during one cause one more), where a WebSocket costs none.

Streams count as connections under the per-key and per-tenant caps of WebSockets
(realtime/limits.py), end when their key is revoked or their tenant deactivated, and are ended by
the server when it stops (config/daphne_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from django.conf import settings
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)

from jobs import cursors
from jobs.auth import aauthenticate
from jobs.errors import NotFound
from jobs.models import TERMINAL_STATUSES, Job, Tenant
from jobs.orm import orm
from jobs.selectors import ajob_get
from jobs.services import hash_api_key
from jobs.validation import VALIDATION_FAILED
from realtime.auth import api_key_from_scope
from realtime.broadcast import frame_text, job_update_message
from realtime.hub import SEND_BUFFER, Frame, Hub, get_hub
from realtime.limits import Presence, socket_fields
from realtime.replay import CursorAheadError, Replay, changes_after, replay_changes

logger = logging.getLogger(__name__)

# A comment line after this long without anything sent, so that proxies keep the stream open.
KEEPALIVE_S = 15.0
# The reconnection delay a stream asks EventSource for (its `retry:` field), in milliseconds.
RETRY_MS = 1000
# How often a stream whose client reads slowly looks whether it has read enough.
DRAIN_POLL_S = 0.05
# How long a stream waits to read again when running transactions kept it from a watermark.
UNPROVEN_RETRY_S = 0.2
# Watermarks tried (each waits up to cursors.WAIT_S) before a stream is refused with 503.
WATERMARK_ATTEMPTS = 3
REPLAY_TRUNCATED = "replay truncated, reconnect with Last-Event-ID set to this cursor"
REPLAY_BUDGET_SPENT = (
    "replay budget of this tenant spent, reconnect with Last-Event-ID set to this cursor later"
)
CREDENTIALS_REVOKED = "API key revoked or tenant inactive"
UNAVAILABLE = "live updates are unavailable right now; try again"
BUSY = "the database is busy; try again"
INVALID_CURSOR = 'must be a cursor the server gave, e.g. "0"'
CURSOR_AHEAD = 'is ahead of every change this server has; resume from "0"'

PendingBytes = Callable[[], int]


# --- framing ----------------------------------------------------------------------------------
def sse_event(event: str, data: str, *, event_id: str | None = None) -> str:
    """One event. `data` is one line (JSON text never holds a raw newline)."""
    head = f"event: {event}\n"
    if event_id is not None:
        head += f"id: {event_id}\n"
    return f"{head}data: {data}\n\n"


def _json(value: dict[str, Any]) -> str:
    return orjson.dumps(value).decode()


def job_update_event(frame: dict[str, Any]) -> str:
    """A JOB_UPDATE frame as a `job_update` event whose id is the change's cursor."""
    return sse_event("job_update", frame_text(frame), event_id=frame["cursor"])


def resync_event(message: str, cursor: int, **extra: Any) -> str:
    text = cursors.text(cursor)
    data = {"code": "RESYNC", "message": message, "cursor": text, **extra}
    return sse_event("resync", _json(data), event_id=text)


# --- errors -------------------------------------------------------------------------------------
def _error(
    status: int, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> HttpResponse:
    """The API's error body (config/api.py): `{"error": ..., "details": ...}`."""
    body: dict[str, Any] = {"error": message}
    if details is not None:
        body["details"] = details
    response = JsonResponse(body, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _invalid(field: str, message: str) -> HttpResponse:
    return _error(400, VALIDATION_FAILED, [{"field": field, "message": message}])


class _BadRequest(Exception):
    def __init__(self, response: HttpResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


def _resume_cursor(request: HttpRequest) -> tuple[str, int | None]:
    """`Last-Event-ID` (what EventSource sends when it reconnects), else `?cursor=`; with the
    name of the one used, for errors."""
    header = request.headers.get("Last-Event-ID")
    if header is not None:
        field, raw = "Last-Event-ID", header
    else:
        field, raw = "cursor", request.GET.get("cursor")
    if raw is None:
        return field, None
    try:
        return field, cursors.parse(raw.strip())
    except ValueError:
        raise _BadRequest(_invalid(field, INVALID_CURSOR)) from None


def _job_id(request: HttpRequest) -> uuid.UUID | None:
    raw = request.GET.get("jobId")
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _BadRequest(_invalid("jobId", "must be a UUID")) from None


async def _job_or_none(tenant: Tenant, job_id: uuid.UUID) -> Job | None:
    try:
        return await ajob_get(tenant=tenant, job_id=job_id)
    except NotFound:
        return None


# --- key re-checks ------------------------------------------------------------------------------
class OpenStreams:
    """The open streams of one process (per hub), by tenant: re-checked when their tenant's keys
    change (announced on the hub), as key sockets are (realtime/consumers.py)."""

    def __init__(self, hub: Hub) -> None:
        self.by_tenant: dict[str, set[EventStream]] = {}
        hub.on_auth_change(self.changed)

    def add(self, stream: EventStream) -> None:
        self.by_tenant.setdefault(stream.tenant.id, set()).add(stream)

    def discard(self, stream: EventStream) -> None:
        streams = self.by_tenant.get(stream.tenant.id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self.by_tenant[stream.tenant.id]

    def changed(self, tenant_id: str) -> None:
        # "": the hub reconnected and may have missed announcements; staff changes do not
        # concern key streams (another non-empty name matches no tenant).
        if tenant_id:
            streams = list(self.by_tenant.get(tenant_id, ()))
        else:
            streams = [stream for group in self.by_tenant.values() for stream in group]
        for stream in streams:
            stream.schedule_credentials_check()


# --- the stream ---------------------------------------------------------------------------------
class EventStream:
    """One open `/events` response: a hub listener whose messages only wake it, and the async
    iterable of the text it sends. `position`: every change of the tenant (or of the job) with a
    cursor up to it has been sent."""

    def __init__(
        self,
        *,
        tenant: Tenant,
        raw_key: str,
        hub: Hub,
        job_id: uuid.UUID | None,
        pending: PendingBytes | None,
        send_buffer_bytes: int,
    ) -> None:
        self.tenant = tenant
        self.raw_key = raw_key
        self.hub = hub
        self.job_id = job_id
        self._job_text = None if job_id is None else str(job_id)
        self.pending = pending
        self.send_buffer_bytes = send_buffer_bytes
        # Where the resume cursor came from (`Last-Event-ID` or `cursor`), for errors.
        self.cursor_field = "cursor"
        self.position = 0
        self.opening: list[str] = [f"retry: {RETRY_MS}\n\n"]
        self.ends_after_opening = False
        self.wake = asyncio.Event()
        self.lost = False
        self.revoked = False
        self._check: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._subscribed = False
        self._released = False

    # --- hub listener -------------------------------------------------------------------------
    async def deliver(self, tenant: str, frames: list[Frame]) -> None:
        """A change of the tenant was published: read the database (for a job stream, only if
        one of the frames may be of its job)."""
        if self._job_text is None or any(self._job_text in frame.text for frame in frames):
            self.wake.set()

    def updates_lost(self) -> None:
        """The hub's Redis connection dropped: subscribe again, then read what was missed."""
        self.lost = True
        self.wake.set()

    def schedule_credentials_check(self) -> None:
        if self._check is None or self._check.done():
            self._check = self._loop.create_task(self._check_credentials())

    async def _check_credentials(self) -> None:
        try:
            tenant = await aauthenticate(self.raw_key)
        except Exception:
            # Checked again at the next change or reconnection; the stream goes on meanwhile.
            logger.exception("event stream: key check failed tenant=%s", self.tenant.id)
            return
        if tenant is None:
            self.revoked = True
            self.wake.set()

    # --- opening ------------------------------------------------------------------------------
    async def admit(self) -> HttpResponse | None:
        """Count the stream under its key's and tenant's caps and subscribe to the tenant's
        updates; the error response if either fails."""
        fields = socket_fields(tenant_id=self.tenant.id, key_digest=hash_api_key(self.raw_key))
        refusal = await self.hub.attached(Presence).admit(self, fields)
        if refusal is not None:
            return _error(429, refusal.message, {"code": "TOO_MANY_CONNECTIONS"})
        self._subscribed = True
        self.hub.attached(OpenStreams).add(self)
        try:
            await self.hub.subscribe(self.tenant.id, self)
        except (ConnectionError, TimeoutError) as exc:
            logger.warning("event stream: subscribe failed tenant=%s: %s", self.tenant.id, exc)
            return _error(503, UNAVAILABLE, headers={"Retry-After": "1"})
        return None

    async def open_tenant(self, after: int | None) -> HttpResponse | None:
        """What the stream starts with: without a cursor, `subscribed` at the watermark (live
        updates only); with one, the replay of every change after it, as the tenant's replay
        budget allows. An error response for a cursor from the future."""
        if after is None:
            upto = await _watermark()
            if upto is None:
                return _error(503, BUSY, headers={"Retry-After": "1"})
            self._opened(upto)
            return None
        for _ in range(WATERMARK_ATTEMPTS):
            try:
                replay = await replay_changes(self.tenant.id, after, proven_only=True)
            except CursorAheadError:
                return _invalid(self.cursor_field, CURSOR_AHEAD)
            if replay.proven:
                break
        else:
            return _error(503, BUSY, headers={"Retry-After": "1"})
        if replay.budget_spent:
            # EventSource waits `retry:` before it reconnects.
            self.opening.append(f"retry: {max(replay.retry_after_ms, RETRY_MS)}\n\n")
            self.opening.append(
                resync_event(REPLAY_BUDGET_SPENT, after, retryAfterMs=replay.retry_after_ms)
            )
            self.ends_after_opening = True
            return None
        self.opening.extend(job_update_event(frame) for frame in replay.frames)
        if replay.truncated:
            self.opening.append(resync_event(REPLAY_TRUNCATED, replay.resume))
            self.ends_after_opening = True
            return None
        self._opened(replay.resume)
        return None

    async def open_job(self, job: Job, after: int | None) -> HttpResponse | None:
        """A job stream starts with the job's current state (unless `after` shows the client has
        it); it ends there if the job is finished. A client reconnecting after the end (an
        EventSource does) is answered 204, which tells EventSource to stop."""
        cursor = job.cursor or 0
        if after is not None and cursor <= after:
            if job.status in TERMINAL_STATUSES:
                return HttpResponse(status=204)
            self._opened(after)
            return None
        self.opening.append(job_update_event(job_update_message(job)))
        if job.status in TERMINAL_STATUSES:
            self.ends_after_opening = True
            return None
        self._opened(cursor)
        return None

    def _opened(self, position: int) -> None:
        self.position = position
        data: dict[str, Any] = {"tenantId": self.tenant.id, "cursor": cursors.text(position)}
        if self.job_id is not None:
            data["jobId"] = str(self.job_id)
        self.opening.append(sse_event("subscribed", _json(data), event_id=cursors.text(position)))

    # --- streaming ----------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[str]:
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        try:
            yield "".join(self.opening)
            if self.ends_after_opening:
                return
            last_sent = time.monotonic()
            while True:
                idle_s = KEEPALIVE_S - (time.monotonic() - last_sent)
                if not self.wake.is_set() and idle_s > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), idle_s)
                if self.revoked:
                    closed = {"code": "CREDENTIALS_REVOKED", "message": CREDENTIALS_REVOKED}
                    yield sse_event("closed", _json(closed))
                    return
                await self._wait_until_drained()
                if time.monotonic() - last_sent >= KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    last_sent = time.monotonic()
                if not self.wake.is_set():
                    continue
                self.wake.clear()
                if self.lost:
                    await self._subscribe_again()
                ended = False
                async for chunk in self._read_new():
                    if chunk is None:
                        ended = True
                        continue
                    yield chunk
                    last_sent = time.monotonic()
                if ended:
                    return
        finally:
            self.release()

    async def _wait_until_drained(self) -> None:
        """While more than the limit waits for the client, wait until it has read half of it:
        unread text stays bounded, and nothing is dropped (the position did not move)."""
        if self.pending is None or self.pending() <= self.send_buffer_bytes:
            return
        # What was written in this turn of the event loop goes out at the next one.
        await asyncio.sleep(0)
        if self.pending() <= self.send_buffer_bytes:
            return
        logger.info(
            "event stream: client reading slowly, %d bytes unsent tenant=%s",
            self.pending(),
            self.tenant.id,
        )
        # Polled: a transport's buffer has nothing to wait on.
        while self.pending() > self.send_buffer_bytes // 2:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)

    async def _subscribe_again(self) -> None:
        """After a lost Redis connection: wait until the hub has this tenant's channel again
        (changes from then on wake the stream); the read that follows finds what was missed.
        While Redis stays down, the stream reads anyway and tries again at once."""
        try:
            await self.hub.subscribe(self.tenant.id, self)
        except (ConnectionError, TimeoutError) as exc:
            logger.warning(
                "event stream: Redis still unavailable tenant=%s: %s", self.tenant.id, exc
            )
            self.wake.set()
            return
        self.lost = False

    async def _read_new(self) -> AsyncIterator[str | None]:
        """Events for every change after `position`, in cursor order (None: the stream ends)."""
        if self.job_id is not None:
            job = await _job_or_none(self.tenant, self.job_id)
            if job is None:  # deleted (pruned) meanwhile
                yield None
                return
            if (job.cursor or 0) > self.position:
                self.position = job.cursor or 0
                yield job_update_event(job_update_message(job))
            if job.status in TERMINAL_STATUSES:
                yield None
            return
        while True:
            replay: Replay = await changes_after(
                self.tenant.id,
                self.position,
                settings.JOBS["SINCE_REPLAY_LIMIT"],
                proven_only=True,
            )
            if not replay.proven:
                await asyncio.sleep(UNPROVEN_RETRY_S)
                continue
            for frame in replay.frames:
                await self._wait_until_drained()
                yield job_update_event(frame)
            self.position = replay.resume
            if not replay.truncated:
                return

    def release(self) -> None:
        """Stop counting and delivering to this stream (idempotent; from any thread: Django
        calls it as the response's closer)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.release)
            return
        if self._released:
            return
        self._released = True
        if self._check is not None:
            self._check.cancel()
        self.hub.attached(Presence).forget(self)
        if self._subscribed:
            self.hub.attached(OpenStreams).discard(self)
            self.hub.forget(self.tenant.id, self)

    # Django runs this when the response is closed (however the stream ended).
    close = release


async def _watermark() -> int | None:
    """A watermark (jobs/cursors.py), trying a few times while transactions keep running."""
    for _ in range(WATERMARK_ATTEMPTS):
        upto = await orm(cursors.watermark)()
        if upto is not None:
            return upto
    return None


# --- the view -----------------------------------------------------------------------------------
async def events(request: HttpRequest) -> HttpResponseBase:
    """`GET /events`: the key's tenant's job updates as an event stream (`?jobId=`: one job's,
    until it finishes), resumed after `Last-Event-ID` or `?cursor=`."""
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    raw_key = api_key_from_scope(request.scope)
    tenant = await aauthenticate(raw_key) if raw_key else None
    if tenant is None or raw_key is None:
        return _error(401, "Missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    try:
        cursor_field, after = _resume_cursor(request)
        job_id = _job_id(request)
    except _BadRequest as bad:
        return bad.response
    job = None
    if job_id is not None:
        job = await _job_or_none(tenant, job_id)
        if job is None:
            return _error(404, "Job not found")

    hub = get_hub()
    hub.start()
    extension = request.scope.get("extensions", {}).get(SEND_BUFFER)
    stream = EventStream(
        tenant=tenant,
        raw_key=raw_key,
        hub=hub,
        job_id=job_id,
        pending=None if extension is None else extension["pending"],
        send_buffer_bytes=settings.JOBS["WS_SEND_BUFFER_BYTES"],
    )
    stream.cursor_field = cursor_field
    try:
        refusal = await stream.admit()
        if refusal is None:
            if job is not None:
                # Read again now that the stream is subscribed: a change from then on wakes it.
                job = await _job_or_none(tenant, job.id)
                if job is None:
                    refusal = _error(404, "Job not found")
                else:
                    refusal = await stream.open_job(job, after)
            else:
                refusal = await stream.open_tenant(after)
    except BaseException:
        stream.release()
        raise
    if refusal is not None:
        stream.release()
        return refusal
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    # Not cached, not buffered by proxies (nginx honours X-Accel-Buffering).
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
