"""Checks of a parsed request that need the job-type registry or settings."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from pydantic import ValidationError

from jobs import dependencies
from jobs.errors import ApiError
from jobs.events import EVENT_DELIVERY
from jobs.handlers import registered_types, validate_payload
from jobs.handlers.email import EmailPayload, allowed_sender
from jobs.models import Tenant
from jobs.schemas import JobIn, ScheduleJobIn
from jobs.services import JobSpec

VALIDATION_FAILED = "Validation failed"
SENDER_NOT_ALLOWED = (
    "sender not allowed: use DEFAULT_FROM_EMAIL or an address JOBS_EMAIL_ALLOWED_SENDERS "
    "allows, and put your own address in replyTo"
)


# Pydantic's wording where it speaks of its internals rather than of the request.
_MESSAGES_BY_TYPE = {
    "uuid_parsing": "must be a UUID",
    "uuid_type": "must be a UUID",
}
_MESSAGE_PREFIXES = ("Value error, ", "Assertion failed, ")


def error_message(err: dict[str, Any]) -> str:
    """The message of one pydantic error, as a client should read it."""
    message = _MESSAGES_BY_TYPE.get(err.get("type", ""), err.get("msg", "invalid"))
    for prefix in _MESSAGE_PREFIXES:
        message = message.removeprefix(prefix)
    return message


def error_details(errors: list[dict[str, Any]], *, prefix: tuple[Any, ...] = ()) -> list[dict]:
    """Pydantic/ninja errors as `[{field, message}]` with dotted camelCase field paths."""
    details = []
    for err in errors:
        loc = [*prefix, *err.get("loc", ())]
        details.append(
            {"field": ".".join(str(part) for part in loc), "message": error_message(err)}
        )
    return details


# Types the service creates itself, which tenants may not create.
INTERNAL_TYPES = frozenset({EVENT_DELIVERY})


def creatable_types() -> list[str]:
    """The job types a tenant may create, sorted."""
    return [name for name in registered_types() if name not in INTERNAL_TYPES]


def check_tenant(tenant: Tenant, tenant_id: str | None) -> None:
    """A tenantId in a request is optional, but must be the key's tenant."""
    if tenant_id is not None and tenant_id != tenant.id:
        raise ApiError(403, "tenantId does not match the API key's tenant")


def check_email_sender(payload: EmailPayload, *, loc: tuple[Any, ...] = ()) -> None:
    """An email's `from` must be an allowed sender (a setting, so not the schema's to check:
    the worker validates stored payloads with the schema, and sends those from the default)."""
    if payload.from_address is not None and not allowed_sender(payload.from_address):
        field = ".".join(str(p) for p in (*loc, "payload", "from"))
        raise ApiError(400, VALIDATION_FAILED, [{"field": field, "message": SENDER_NOT_ALLOWED}])


NUL_REFUSED = "text may not contain the NUL character (\\u0000)"


def check_no_nul(value: Any, *, loc: tuple[Any, ...]) -> None:
    """400 naming the first string or key holding a NUL character: PostgreSQL stores none in
    text or jsonb, so the write would fail (a 500) instead."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, loc)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    raise ApiError(
                        400, VALIDATION_FAILED, [{"field": _dotted(at), "message": NUL_REFUSED}]
                    )
                stack.append((child, (*at, key)))
        elif isinstance(item, list):
            stack.extend((child, (*at, index)) for index, child in enumerate(item))
        elif isinstance(item, str) and "\x00" in item:
            raise ApiError(400, VALIDATION_FAILED, [{"field": _dotted(at), "message": NUL_REFUSED}])


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def dependency_refs(
    job: JobIn, *, loc: tuple[Any, ...] = (), batch_index: int | None = None
) -> tuple[str, ...]:
    """The job's `dependsOn`, checked and normalised (repeats dropped): job ids, and `$<n>`
    naming an earlier item when the job is item `batch_index` of a batch."""
    refs: list[str] = []
    for position, value in enumerate(job.depends_on):
        try:
            refs.append(dependencies.parse_ref(value, index=batch_index))
        except ValueError as exc:
            field = ".".join(str(p) for p in (*loc, "dependsOn", position))
            raise ApiError(400, VALIDATION_FAILED, [{"field": field, "message": str(exc)}]) from exc
    return tuple(dict.fromkeys(refs))


def job_spec(job: JobIn, *, loc: tuple[Any, ...] = (), batch_index: int | None = None) -> JobSpec:
    """Validate the type and payload of one job and turn it into a service-level spec."""
    if job.type not in creatable_types():
        raise ApiError(
            400,
            VALIDATION_FAILED,
            [
                {
                    "field": ".".join(str(p) for p in (*loc, "type")),
                    "message": f"unknown job type; one of {', '.join(creatable_types())}",
                }
            ],
        )
    encoded = json.dumps(job.payload, separators=(",", ":"))
    size = len(encoded.encode())
    if size > settings.JOBS["MAX_PAYLOAD_BYTES"]:
        raise ApiError(
            413,
            "Payload too large",
            {"maxBytes": settings.JOBS["MAX_PAYLOAD_BYTES"], "bytes": size, "at": list(loc)},
        )
    try:
        payload = validate_payload(job.type, job.payload)
    except ValidationError as exc:
        raise ApiError(
            400,
            VALIDATION_FAILED,
            error_details(exc.errors(), prefix=(*loc, "payload")),
        ) from exc
    if isinstance(payload, EmailPayload):
        check_email_sender(payload, loc=loc)
    if "\\u0000" in encoded:  # a NUL, or a backslash followed by "u0000": look closer
        check_no_nul(job.payload, loc=(*loc, "payload"))
    run_at = job.run_at
    if job.delay_ms is not None:
        run_at = timezone.now() + timedelta(milliseconds=job.delay_ms)
    return JobSpec(
        type=job.type,
        payload=job.payload,
        priority=job.priority,
        run_at=run_at,
        max_attempts=job.max_attempts,
        timeout_ms=job.timeout_ms,
        delay_ms=job.delay_ms,
        depends_on=dependency_refs(job, loc=loc, batch_index=batch_index),
    )


def schedule_job(job: ScheduleJobIn) -> dict[str, Any]:
    """A schedule's job, validated exactly as `POST /jobs` validates a job (type creatable by
    tenants, payload size and schema, email sender), in the form the schedule stores."""
    spec = job_spec(
        JobIn(
            type=job.type,
            payload=job.payload,
            priority=job.priority,
            max_attempts=job.max_attempts,
        ),
        loc=("job",),
    )
    return {
        "type": spec.type,
        "payload": spec.payload,
        "priority": spec.priority,
        "maxAttempts": spec.max_attempts,
    }
