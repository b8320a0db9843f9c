"""What `Client` and `AsyncClient` share: the requests each method sends, when a failed attempt
is tried again (and after how long), how answers become results, and how `list` pages.

Neither client does I/O here; each sends the `Call`s built below with its own httpx client."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from jobqueue_client._version import __version__
from jobqueue_client.errors import (
    JobQueueError,
    ServiceUnavailable,
    error_from_response,
    retry_after_seconds,
)
from jobqueue_client.models import Job

USER_AGENT = f"jobqueue-client/{__version__}"
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_RETRIES = 4
MAX_PAGE_SIZE = 100  # the API's largest `limit`

# Python names of `create`'s options and their names on the wire.
OPTION_NAMES = {
    "priority": "priority",
    "max_attempts": "maxAttempts",
    "run_at": "runAt",
    "delay_ms": "delayMs",
    "timeout_ms": "timeoutMs",
    "depends_on": "dependsOn",
}

# The request certainly did not reach the server: sending it again is always safe.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have reached the server and its answer was lost.
_ANSWER_LOST = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Statuses worth another attempt of a request that is safe to repeat.
_UNAVAILABLE = frozenset({502, 503, 504})


@dataclass(frozen=True)
class Call:
    """One API request. `repeatable`: sending it twice has the effect of sending it once (a GET,
    or a create with its `Idempotency-Key`), so a lost answer or a 503 may be retried."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    repeatable: bool = False


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: about `base`, `2 * base`, ... up to `cap` seconds."""

    base: float = 0.25
    cap: float = 8.0

    def delay(self, attempt: int) -> float:
        """The pause before try number `attempt + 1` (`attempt` counts from 1)."""
        return min(self.cap, self.base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class Retrying:
    """The retry decision for one `Call`: after each failed attempt, how long to wait before the
    next one, or the exception to raise. A 429 is always retried (the API creates nothing and
    counts nothing for it); a lost answer and a 503 only when the call is `repeatable`."""

    MAX_RETRY_AFTER = 60.0  # a longer Retry-After is the caller's decision: raise RateLimited

    def __init__(self, call: Call, *, max_retries: int, backoff: Backoff) -> None:
        self.call = call
        self.max_retries = max_retries
        self.backoff = backoff
        self.attempt = 0

    def after_transport_error(self, exc: httpx.TransportError, url: str) -> float:
        """The pause before trying again after no answer came, or raises ServiceUnavailable."""
        self.attempt += 1
        retryable = isinstance(exc, _NOT_SENT) or (
            self.call.repeatable and isinstance(exc, _ANSWER_LOST)
        )
        if not retryable or self.attempt > self.max_retries:
            raise ServiceUnavailable(f"no answer from {url}: {describe(exc)}") from exc
        return self.backoff.delay(self.attempt)

    def after_response(self, response: httpx.Response) -> float | None:
        """None if `response` is final (success or an error to raise), else the pause before
        trying again."""
        status = response.status_code
        if status != 429 and not (self.call.repeatable and status in _UNAVAILABLE):
            return None
        self.attempt += 1
        if self.attempt > self.max_retries:
            return None
        asked = retry_after_seconds(response)
        if asked is not None and asked > self.MAX_RETRY_AFTER:
            return None
        return max(asked or 0.0, self.backoff.delay(self.attempt))


def describe(exc: BaseException) -> str:
    """A one-line description of a network error (httpx's messages are sometimes empty)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def result_of(response: httpx.Response) -> Any:
    """The JSON of a successful answer, or raises the matching `JobQueueError`."""
    if response.status_code >= 400:
        raise error_from_response(response)
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise JobQueueError(
            f"the API answered {response.status_code} with a body that is not JSON",
            status=response.status_code,
        ) from exc


# --- the requests -------------------------------------------------------------------------------


def job_path(job_id: Any, action: str = "") -> str:
    """`/jobs/<id>[/<action>]`, the id quoted so it cannot name another path."""
    path = f"/jobs/{quote(str(job_id), safe='')}"
    return f"{path}/{action}" if action else path


def job_body(job_type: str, payload: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of one job for `POST /jobs` or an item of `POST /jobs/batch`, from Python names
    (`max_attempts`) or the API's own (`maxAttempts`); options left None are not sent."""
    body: dict[str, Any] = {"type": job_type, "payload": {} if payload is None else payload}
    for name, value in options.items():
        if value is None:
            continue
        wire = OPTION_NAMES.get(name, name)
        if wire == "runAt" and isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError("run_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
            value = value.isoformat()
        body[wire] = value
    return body


def create_call(
    job_type: str, payload: Any, options: Mapping[str, Any], idempotency_key: str | None
) -> Call:
    """`POST /jobs` with an `Idempotency-Key` (the caller's, or a new one), so that every retry
    of this call is answered with the one job the first attempt created."""
    key = idempotency_key if idempotency_key is not None else str(uuid.uuid4())
    return Call(
        "POST",
        "/jobs",
        json=job_body(job_type, payload, options),
        headers={"Idempotency-Key": key},
        repeatable=True,
    )


def batch_call(jobs: Iterable[Mapping[str, Any]], idempotency_key: str | None = None) -> Call:
    """`POST /jobs/batch` with an `Idempotency-Key` (the caller's, or a new one), so that every
    retry of this call is answered with the jobs the first attempt created. An item's
    `depends_on` may name earlier items as `"$<index>"`."""
    items = []
    for job in jobs:
        options = {k: v for k, v in job.items() if k not in ("type", "payload")}
        items.append(job_body(job["type"], job.get("payload"), options))
    key = idempotency_key if idempotency_key is not None else str(uuid.uuid4())
    return Call(
        "POST",
        "/jobs/batch",
        json={"jobs": items},
        headers={"Idempotency-Key": key},
        repeatable=True,
    )


def get_call(job_id: Any) -> Call:
    return Call("GET", job_path(job_id), repeatable=True)


def action_call(job_id: Any, action: str) -> Call:
    """`POST /jobs/{id}/cancel` or `/retry`: a second one after a lost answer would be a 409,
    so these are retried only when they certainly were not received."""
    return Call("POST", job_path(job_id, action))


class Pages:
    """Walks `GET /jobs` page by page (newest first). Jobs created while it walks push older
    ones to later offsets; those are seen twice and yielded once."""

    def __init__(self, *, status: str | None, job_type: str | None, page_size: int) -> None:
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}")
        self.filters = {k: v for k, v in (("status", status), ("type", job_type)) if v is not None}
        self.page_size = page_size
        self.offset = 0
        self.done = False
        self.seen: set[str] = set()

    def next_call(self) -> Call | None:
        """The request for the next page, or None after the last."""
        if self.done:
            return None
        params = {**self.filters, "limit": self.page_size, "offset": self.offset}
        return Call("GET", "/jobs", params=params, repeatable=True)

    def take(self, page: dict[str, Any]) -> list[Job]:
        """The jobs of an answer not yielded before; marks the walk done after the last page."""
        rows = page.get("jobs") or []
        self.offset += len(rows)
        if len(rows) < self.page_size or self.offset >= int(page.get("total", 0)):
            self.done = True
        fresh = []
        for row in rows:
            if row["id"] not in self.seen:
                self.seen.add(row["id"])
                fresh.append(Job.from_api(row))
        return fresh


# --- the service's addresses --------------------------------------------------------------------


def normalize_base_url(base_url: str) -> str:
    """`base_url` without a trailing slash; it must be http(s)."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http:// or https:// URL, not {base_url!r}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def websocket_url(base_url: str, api_key: str) -> str:
    """`ws(s)://host/ws?token=<key>` for the API at `base_url`."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, f"{parts.path}/ws", f"token={quote(api_key)}", ""))


def default_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}
