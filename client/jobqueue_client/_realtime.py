"""`wait` and `watch` over the WebSocket, written once for both clients.

Each is a generator (a "program") that yields the I/O it needs as small operations (`Connect`,
`Send`, `Receive`, `Fetch`, `Sleep`, `Emit`) and is sent their results; `Client` and
`AsyncClient` each run programs with their own socket and HTTP client (a "driver"). A driver
throws `Disconnected` into the program when the socket cannot be opened or drops, and
`ReceiveTimeout` when a `Receive` timed out.

The protocol (docs/websocket.md, SPEC section 10): after `CONNECTED` the program sends
`SUBSCRIBE` for the key's tenant, with the cursor to resume from once it has one; the server
replays the jobs changed after that cursor, then sends live updates. An `ERROR` with code
`RESYNC` (the server cannot vouch for every update) is answered by subscribing again from the
cursor it carries. Replays may repeat changes already seen: a frame whose cursor is not greater
than the last one seen for its job is dropped."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Union

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from jobqueue_client._calls import Backoff, describe
from jobqueue_client.errors import (
    AuthenticationError,
    JobQueueError,
    ServiceUnavailable,
    WaitTimeout,
)
from jobqueue_client.models import Job, JobUpdate, cursor_value

logger = logging.getLogger("jobqueue_client")

OPEN_TIMEOUT = 10.0  # seconds to open a socket and get its CONNECTED
CLOSE_TIMEOUT = 2.0  # seconds to wait for the server to answer a close


@dataclass(frozen=True)
class Connect:
    """Open a new socket (closing any previous one)."""

    timeout: float


@dataclass(frozen=True)
class Send:
    frame: dict[str, Any]


@dataclass(frozen=True)
class Receive:
    """The next JSON object frame; `timeout` None waits for ever."""

    timeout: float | None


@dataclass(frozen=True)
class Fetch:
    """`GET /jobs/{id}`; answered with a `Job`."""

    job_id: str


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit:
    """Hand an update to the caller of `watch`."""

    update: JobUpdate


Operation = Union[Connect, Send, Receive, Fetch, Sleep, Emit]
Program = Generator[Operation, Any, Any]


class Disconnected(Exception):
    """Thrown into a program: the socket could not be opened, or it dropped."""


class ReceiveTimeout(Exception):
    """Thrown into a program: a `Receive` got no frame within its timeout."""


RECONNECT_BACKOFF = Backoff(base=0.25, cap=5.0)


@dataclass(frozen=True)
class Reconnecting:
    """How a program reconnects: after `max_failures` failed attempts in a row it gives up."""

    max_failures: int = 10
    backoff: Backoff = RECONNECT_BACKOFF


class Feed:
    """What one subscription has seen: the cursor to resume from, and per job the last cursor
    delivered, so that nothing is handed on twice."""

    def __init__(self, cursor: str | None) -> None:
        self.cursor = cursor
        self.latest: dict[str, int] = {}
        self.awaiting_answer = False  # a SUBSCRIBE was sent and not yet answered

    def subscribe(self, tenant_id: str) -> Send:
        """The SUBSCRIBE to send: from the resume cursor if there is one, else live only."""
        frame: dict[str, Any] = {"type": "SUBSCRIBE", "tenantId": tenant_id}
        if self.cursor is not None:
            frame["cursor"] = self.cursor
        self.awaiting_answer = True
        return Send(frame)

    def subscribed(self, frame: dict[str, Any]) -> None:
        """SUBSCRIBED carries the cursor to resume from if the socket drops right after it."""
        self.awaiting_answer = False
        if frame.get("cursor") is not None:
            self.cursor = str(frame["cursor"])
        logger.info("subscribed to tenant %s; resume cursor %s", frame.get("tenantId"), self.cursor)

    def resync(self, frame: dict[str, Any]) -> None:
        """RESYNC carries the last cursor the server vouches for: resume from there."""
        if frame.get("cursor") is not None:
            self.cursor = str(frame["cursor"])

    def note(self, job: Job) -> None:
        """`job` was seen through the REST API: its change at `job.cursor` is not new."""
        value = cursor_value(job.cursor)
        if value is not None and value > self.latest.get(job.id, -1):
            self.latest[job.id] = value

    def accept(self, frame: dict[str, Any]) -> JobUpdate | None:
        """The update of a JOB_UPDATE frame, or None if it was seen before. A frame without a
        cursor (a server without cursors) is always new.

        A frame's cursor does not move the resume point: changes are not always committed in
        cursor order, so a later cursor may arrive before an earlier one. Only the cursors the
        server vouches for (SUBSCRIBED, RESYNC) do."""
        update = JobUpdate.from_frame(frame)
        value = cursor_value(update.cursor)
        if value is None:
            return update
        if value <= self.latest.get(update.job_id, -1):
            return None
        self.latest[update.job_id] = value
        return update


def tenant_of(greeting: dict[str, Any]) -> str:
    """The key's tenant, from the CONNECTED frame (`tenantId`, or its message
    `connected as tenant <id>; ...`). Anything else (an ERROR such as TOO_MANY_CONNECTIONS,
    followed by a close) counts as a failed connection."""
    if greeting.get("type") != "CONNECTED":
        logger.warning("websocket refused: %s", greeting.get("message", greeting))
        raise Disconnected(str(greeting.get("message", greeting)))
    if isinstance(greeting.get("tenantId"), str):
        return greeting["tenantId"]
    match = re.search(r"connected as tenant (\S+?);", str(greeting.get("message", "")))
    if match is None:
        raise JobQueueError(f"the server did not say which tenant this key is for: {greeting}")
    return match.group(1)


def resubscribe_after(feed: Feed, frame: dict[str, Any]) -> float | None:
    """How to answer an ERROR frame: the pause (seconds) before subscribing again, or None to
    carry on. Raises when it refuses the SUBSCRIBE just sent for good."""
    message = str(frame.get("message", ""))
    if frame.get("code") == "RESYNC":
        feed.resync(frame)
        # The tenant's replay budget may be spent: it says when to ask again.
        pause = max(0.0, float(frame.get("retryAfterMs") or 0) / 1000)
    elif "try again" in message:  # the API cannot reach Redis right now; nothing subscribed
        pause = 1.0
    elif message.startswith("updates dropped"):  # a server without cursors
        pause = 0.0
    elif feed.awaiting_answer:
        raise JobQueueError(f"SUBSCRIBE refused: {message}")
    else:
        logger.warning("websocket error frame: %s", message)
        return None
    logger.info("subscribing again from cursor %s after: %s", feed.cursor, message)
    return pause


def watch_program(cursor: str | None, reconnecting: Reconnecting) -> Program:
    """Every update of the key's tenant from `cursor` on (None: from now), across reconnects."""
    feed = Feed(cursor)
    failures = 0
    while True:
        try:
            yield Connect(OPEN_TIMEOUT)
            tenant_id = tenant_of((yield Receive(OPEN_TIMEOUT)))
            yield feed.subscribe(tenant_id)
            while True:
                frame = yield Receive(None)
                kind = frame.get("type")
                if kind == "SUBSCRIBED":
                    feed.subscribed(frame)
                    failures = 0
                elif kind == "JOB_UPDATE":
                    update = feed.accept(frame)
                    if update is not None:
                        yield Emit(update)
                elif kind == "ERROR":
                    pause = resubscribe_after(feed, frame)
                    if pause is not None:
                        if pause:
                            yield Sleep(pause)
                        yield feed.subscribe(tenant_id)
        except (Disconnected, ReceiveTimeout) as exc:
            failures += 1
            if failures > reconnecting.max_failures:
                raise ServiceUnavailable(f"the WebSocket keeps failing: {exc}") from None
            logger.info("websocket lost (%s); reconnecting from cursor %s", exc, feed.cursor)
            yield Sleep(reconnecting.backoff.delay(failures))


def wait_program(job_id: str, timeout: float | None, reconnecting: Reconnecting) -> Program:
    """The job once it is COMPLETED, FAILED or CANCELLED. Subscribes first, then reads the job
    once (a change before the subscription is in that read, one after it arrives as a frame),
    then waits for frames; after a reconnect it resumes from its cursor."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def remaining(cap: float | None = None) -> float | None:
        """Seconds left before the deadline (at most `cap`); raises WaitTimeout past it."""
        if deadline is None:
            return cap
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"job {job_id} did not finish within {timeout:g} s")
        return left if cap is None else min(cap, left)

    feed = Feed(None)
    failures = 0
    while True:
        try:
            yield Connect(remaining(OPEN_TIMEOUT) or OPEN_TIMEOUT)
            tenant_id = tenant_of((yield Receive(remaining(OPEN_TIMEOUT))))
            # Resuming from a cursor replays whatever changed since; without one (the first
            # time, or a server without cursors) one read after SUBSCRIBED closes the race.
            read_after_subscribing = feed.cursor is None
            yield feed.subscribe(tenant_id)
            while True:
                frame = yield Receive(remaining())
                kind = frame.get("type")
                if kind == "SUBSCRIBED":
                    feed.subscribed(frame)
                    failures = 0
                    if read_after_subscribing:
                        read_after_subscribing = False
                        job = yield Fetch(job_id)
                        if job.is_terminal:
                            return job
                        feed.note(job)
                elif kind == "JOB_UPDATE" and frame.get("jobId") == job_id:
                    update = feed.accept(frame)
                    if update is not None and update.is_terminal:
                        job = yield Fetch(job_id)
                        if job.is_terminal:  # else retried meanwhile: keep waiting
                            return job
                elif kind == "ERROR":
                    pause = resubscribe_after(feed, frame)
                    if pause is not None:
                        if pause:
                            yield Sleep(remaining(pause) or 0.0)
                        read_after_subscribing = feed.cursor is None
                        yield feed.subscribe(tenant_id)
        except (Disconnected, ReceiveTimeout) as exc:
            remaining()  # past the deadline: WaitTimeout
            failures += 1
            if failures > reconnecting.max_failures:
                raise ServiceUnavailable(f"the WebSocket keeps failing: {exc}") from None
            logger.info("websocket lost (%s); reconnecting from cursor %s", exc, feed.cursor)
            yield Sleep(remaining(reconnecting.backoff.delay(failures)) or 0.0)


# --- what both drivers make of the websockets library's exceptions -----------------------------

OPEN_FAILURES = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed)


def handshake_refused(exc: InvalidStatus) -> Exception:
    """A handshake answered with an HTTP status: 401/403 is the key, anything else (a proxy's
    502 while the API restarts) is worth reconnecting."""
    status = exc.response.status_code
    if status in (401, 403):
        return AuthenticationError("WebSocket handshake refused: invalid API key", status=status)
    return Disconnected(f"WebSocket handshake answered {status}")


def socket_closed(exc: ConnectionClosed) -> Exception:
    """A socket the server closed: code 4001 (key revoked, tenant deactivated) is final."""
    received = exc.rcvd
    if received is not None and received.code == 4001:
        return AuthenticationError(f"WebSocket closed: {received.reason or 'API key revoked'}")
    return Disconnected(describe(exc))


def decode_frame(raw: str | bytes) -> dict[str, Any] | None:
    """A text frame's JSON object, or None for anything else (skipped)."""
    if not isinstance(raw, str):
        return None
    try:
        frame = json.loads(raw)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None
