"""The registry of job types: payload schema, handler function and default timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError


class PermanentError(Exception):
    """Raised by a handler for a failure that retrying cannot fix (the job fails at once)."""


class HeldBack(Exception):
    """Raised by a handler that did not make its attempt because its destination must be
    spared (jobs/destinations.py): the job waits until `until`, PENDING, the attempt not
    spent, with `reason` in its error ("held: <reason>")."""

    def __init__(self, until: datetime, reason: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler may know about the job it runs, besides its payload."""

    job_id: str
    tenant: str
    type: str
    attempt: int
    max_attempts: int
    cancel_event: asyncio.Event | None = field(default=None, compare=False)
    on_progress: Callable[[int, str | None], None] | None = field(default=None, compare=False)
    # The tenant's live webhook signing secrets (jobs/signing.py), newest first; filled by the
    # worker for types registered with `signed=True` only. Never in a repr (logs).
    signing_secrets: tuple[str, ...] = field(default=(), compare=False, repr=False)
    # The results of the jobs this one depends on (`dependsOn`), by job id; read when the
    # attempt starts (jobs/dependencies.py). Empty for a job without dependencies.
    dependency_results: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def report_progress(self, percent: float, message: str | None = None) -> None:
        """Report progress (0-100, and a short message); callable from the handler's thread or
        coroutine. The worker stores and broadcasts it, at most a few times a second."""
        if self.on_progress is not None:
            clamped = max(0, min(100, int(percent)))
            self.on_progress(clamped, message[:200] if message else None)


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    type: str
    schema: type[BaseModel]
    func: Callable[[Any, JobContext], Any]
    timeout_s: float
    is_async: bool
    signed: bool = False
    # A retry schedule of the type's own, in seconds: the wait before retry n is
    # `retry_delays_s[n-1]` (the last repeats), less up to 10% of jitter. None: the global
    # RetryPolicy's exponential backoff (jobs/lifecycle.py).
    retry_delays_s: tuple[float, ...] | None = None


_REGISTRY: dict[str, HandlerSpec] = {}


def register(
    job_type: str,
    *,
    schema: type[BaseModel],
    timeout_s: float,
    signed: bool = False,
    retry_delays_s: tuple[float, ...] | None = None,
) -> Callable[[Callable[[Any, JobContext], Any]], Callable[[Any, JobContext], Any]]:
    """Decorator: `@register("email", schema=EmailPayload, timeout_s=60)`. With `signed`, the
    worker gives the handler the tenant's signing secrets (`ctx.signing_secrets`); with
    `retry_delays_s`, the type's retries follow that schedule instead of the global backoff."""

    def decorator(func: Callable[[Any, JobContext], Any]) -> Callable[[Any, JobContext], Any]:
        if job_type in _REGISTRY:
            raise ValueError(f"job type {job_type!r} is already registered")
        _REGISTRY[job_type] = HandlerSpec(
            type=job_type,
            schema=schema,
            func=func,
            timeout_s=timeout_s,
            is_async=asyncio.iscoroutinefunction(func),
            signed=signed,
            retry_delays_s=retry_delays_s,
        )
        return func

    return decorator


def unregister(job_type: str) -> None:
    """Remove a job type (for tests and plugins that register types of their own)."""
    _REGISTRY.pop(job_type, None)


def get_handler(job_type: str) -> HandlerSpec | None:
    return _REGISTRY.get(job_type)


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


def validate_payload(job_type: str, payload: Any) -> BaseModel:
    """Parse a payload with its type's schema; raises KeyError or pydantic.ValidationError."""
    spec = _REGISTRY.get(job_type)
    if spec is None:
        raise KeyError(job_type)
    return spec.schema.model_validate(payload)


__all__ = [
    "HandlerSpec",
    "HeldBack",
    "JobContext",
    "PermanentError",
    "ValidationError",
    "get_handler",
    "register",
    "registered_types",
    "unregister",
    "validate_payload",
]
