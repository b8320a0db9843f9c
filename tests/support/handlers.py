"""Call a job handler as the worker does: its payload parsed by its type's schema, a JobContext
of its own; and the settings a handler test changes."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ValidationError

from jobs.handlers import JobContext, get_handler


def make_ctx(job_type: str, *, tenant: str = "tenant-1") -> JobContext:
    """The context of a first attempt (of three) of a fresh job."""
    return JobContext(
        job_id=str(uuid.uuid4()), tenant=tenant, type=job_type, attempt=1, max_attempts=3
    )


def validate(job_type: str, payload: Any) -> BaseModel:
    """The payload parsed by its type's schema (raises pydantic.ValidationError)."""
    spec = get_handler(job_type)
    assert spec is not None, f"no handler for {job_type!r}"
    return spec.schema.model_validate(payload)


def run_sync(job_type: str, payload: dict[str, Any], ctx: JobContext | None = None) -> Any:
    """Run a sync handler (email, data_processing) in this thread; its result."""
    spec = get_handler(job_type)
    assert spec is not None and not spec.is_async
    return spec.func(spec.schema.model_validate(payload), ctx or make_ctx(job_type))


async def run_async(job_type: str, payload: dict[str, Any], ctx: JobContext | None = None) -> Any:
    """Run an async handler (sleep, webhook) in this event loop; its result."""
    spec = get_handler(job_type)
    assert spec is not None and spec.is_async
    return await spec.func(spec.schema.model_validate(payload), ctx or make_ctx(job_type))


def error_messages(exc: ValidationError) -> str:
    """Every error of a validation as `field.path: message`, joined by ` | `."""
    return " | ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def allow_webhook_hosts(settings: Any, *entries: str) -> None:
    """Set JOBS_WEBHOOK_ALLOWED_HOSTS (pytest-django's `settings`) to exactly `entries`."""
    settings.JOBS = {**settings.JOBS, "WEBHOOK_ALLOWED_HOSTS": list(entries)}
