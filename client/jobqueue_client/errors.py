"""One exception class per family of failure; all are `JobQueueError`s.

The API answers errors as `{"error": "<short message>", "details": ...}`; `error_from_response`
turns such an answer into the matching class."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx


class JobQueueError(Exception):
    """Anything the SDK raises on purpose: an error answer of the API, or the API unreachable.

    `status` is the HTTP status (None when no answer came), `message` the API's `error` text,
    `details` its `details` (a list of bad fields for a 400, a dict for most others)."""

    def __init__(self, message: str, *, status: int | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.details = details

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.status} {self.message}"


class APIError(JobQueueError):
    """An error answer that no narrower class below describes (413, 415, 500, ...)."""


class ValidationError(JobQueueError):
    """400: a field is invalid, missing or unknown; `details` lists them
    (`[{"field": "payload.delayMs", "message": "..."}]`)."""


class AuthenticationError(JobQueueError):
    """401 (missing, unknown or revoked key) or 403 (another tenant's `tenantId`); also a
    WebSocket handshake refused or closed for those reasons."""


class NotFound(JobQueueError):
    """404: no such job for this key's tenant."""


class Conflict(JobQueueError):
    """409: the action is not allowed in the job's state, or an `Idempotency-Key` was reused
    with a different request."""


class RateLimited(JobQueueError):
    """429 after the retries: the tenant's rate limit is used up. `retry_after` is the wait the
    API asked for, in seconds (None if it named none)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 429,
        details: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, details=details)
        self.retry_after = retry_after


class ServiceUnavailable(JobQueueError):
    """503 (the service's database is down), or no answer at all (connection refused, reset or
    timed out) after the retries."""


class WaitTimeout(JobQueueError, TimeoutError):
    """`wait` gave up: the job did not reach a terminal state within its `timeout`."""


_BY_STATUS: dict[int, type[JobQueueError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: ServiceUnavailable,
}


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The `Retry-After` of an answer in seconds (a number or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_response(response: httpx.Response) -> JobQueueError:
    """The exception for an error answer (status 400 or more)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message, details = body["error"], body.get("details")
    else:
        message, details = response.reason_phrase or "error", None
        text = response.text.strip()
        if text:
            message = f"{message}: {text[:200]}"
    cls = _BY_STATUS.get(response.status_code, APIError)
    if cls is RateLimited:
        return RateLimited(
            message,
            status=response.status_code,
            details=details,
            retry_after=retry_after_seconds(response),
        )
    return cls(message, status=response.status_code, details=details)
