"""Each tenant's hourly budget of email recipients, shared by every API process through Redis.

`P:email-recipients:{tenant}` (ZSET, one member per accepted request) and
`P:email-recipients:{tenant}:total` (STRING) hold a sliding window of the last hour
(`jobs/lua/email_recipients.lua`); both expire an hour after the tenant's latest request.
Creating `email` jobs, or retrying one, adds their recipients. A request that would take the
tenant past `JOBS_EMAIL_RECIPIENTS_PER_HOUR` is refused whole (429), and one larger than the
whole budget with 413 (waiting would never let it through).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, Protocol

import redis
from django.conf import settings

from jobs.errors import ApiError
from jobs.models import Tenant
from jobs.queue import RecipientBudget, async_queue, parse_email_budget, sync_queue

logger = logging.getLogger(__name__)

WINDOW_MS = 3_600_000


class TypedPayload(Protocol):
    """A job spec or a job row: what the budget reads of it."""

    @property
    def type(self) -> str: ...

    @property
    def payload(self) -> Any: ...


def email_recipients(jobs: Iterable[TypedPayload]) -> int:
    """Recipients the `email` jobs among `jobs` address: `to`, one address or a list."""
    total = 0
    for job in jobs:
        if job.type != "email" or not isinstance(job.payload, dict):
            continue
        to = job.payload.get("to")
        if isinstance(to, str):
            total += 1
        elif isinstance(to, list):
            total += len(to)
    return total


def _budget(recipients: int) -> int | None:
    """The hourly budget to check `recipients` against, or None when there is nothing to check;
    raises 413 for more recipients than the whole budget."""
    budget = settings.JOBS["EMAIL_RECIPIENTS_PER_HOUR"]
    if recipients <= 0 or budget <= 0:
        return None
    if recipients > budget:
        raise ApiError(
            413,
            "Email recipients exceed the tenant's hourly budget",
            {"recipients": recipients, "recipientsPerHour": budget},
        )
    return budget


def _enforce(answer: RecipientBudget, *, budget: int, recipients: int) -> None:
    if not answer.allowed:
        raise ApiError(
            429,
            "Email recipient budget exceeded",
            {
                "recipientsPerHour": budget,
                "recipients": recipients,
                "remaining": max(0, budget - answer.total),
                "retryAfterMs": answer.retry_ms,
            },
            headers={"Retry-After": str(max(1, math.ceil(answer.retry_ms / 1000)))},
        )


def _unchecked(tenant: Tenant, exc: Exception) -> None:
    logger.warning(
        "email recipient budget not checked, Redis unavailable tenant=%s: %s", tenant.id, exc
    )


def check_recipient_budget(*, tenant: Tenant, jobs: Iterable[TypedPayload]) -> None:
    """Take the recipients of `jobs` from the tenant's hourly budget or raise 429 (413).

    As with the rate limit, a request is let through (logged) if Redis cannot be reached."""
    recipients = email_recipients(jobs)
    budget = _budget(recipients)
    if budget is None:
        return
    try:
        answer = parse_email_budget(
            sync_queue().spend_email_recipients(
                tenant=tenant.id, limit=budget, cost=recipients, window_ms=WINDOW_MS
            )
        )
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        _unchecked(tenant, exc)
        return
    _enforce(answer, budget=budget, recipients=recipients)


async def acheck_recipient_budget(*, tenant: Tenant, jobs: Iterable[TypedPayload]) -> None:
    """`check_recipient_budget` on the event loop (no Redis call without email recipients)."""
    recipients = email_recipients(jobs)
    budget = _budget(recipients)
    if budget is None:
        return
    try:
        answer = parse_email_budget(
            await async_queue().spend_email_recipients(
                tenant=tenant.id, limit=budget, cost=recipients, window_ms=WINDOW_MS
            )
        )
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        _unchecked(tenant, exc)
        return
    _enforce(answer, budget=budget, recipients=recipients)
