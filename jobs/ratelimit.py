"""Per-tenant rate limit of job creation, shared by every API process through Redis (GCRA)."""

from __future__ import annotations

import logging
import math

from django.conf import settings

from jobs.errors import ApiError
from jobs.models import Tenant
from jobs.queue import RateDecision, async_queue, parse_rate_limit, sync_queue

logger = logging.getLogger(__name__)


def tenant_rate(tenant: Tenant) -> int:
    """Jobs per second the tenant may create: its own limit, else the default; 0 is unlimited."""
    if tenant.rate_limit is not None:
        return tenant.rate_limit
    return settings.JOBS["TENANT_RATE_LIMIT"]


def _limits(tenant: Tenant, jobs: int) -> tuple[int, int] | None:
    """(rate, burst) to check `jobs` creations against, or None when unlimited; raises 413 for a
    batch larger than the burst (it could never pass: waiting does not help, so not a 429)."""
    rate = tenant_rate(tenant)
    if rate <= 0:
        return None
    burst = max(1, rate)
    if jobs > burst:
        raise ApiError(
            413,
            "Batch larger than the tenant's rate limit allows at once",
            {"jobs": jobs, "burst": burst, "ratePerSecond": rate},
        )
    return rate, burst


def _enforce(decision: RateDecision, rate: int) -> None:
    if not decision.allowed:
        retry_s = max(1, math.ceil(decision.retry_ms / 1000))
        raise ApiError(
            429,
            "Rate limit exceeded",
            {"ratePerSecond": rate, "retryAfterMs": decision.retry_ms},
            headers={"Retry-After": str(retry_s)},
        )


def check_rate_limit(*, tenant: Tenant, jobs: int) -> None:
    """Take `jobs` tokens from the tenant's bucket or raise 429 with Retry-After.

    The bucket holds one second's worth of jobs (at least one). If Redis cannot be reached the
    request is let through (logged): job creation must not depend on Redis being up.
    """
    limits = _limits(tenant, jobs)
    if limits is None:
        return
    rate, burst = limits
    try:
        decision = parse_rate_limit(
            sync_queue().rate_limit(tenant=tenant.id, rate=rate, burst=burst, cost=jobs)
        )
    except Exception as exc:
        logger.warning("rate limit not checked, Redis unavailable tenant=%s: %s", tenant.id, exc)
        return
    _enforce(decision, rate)


async def acheck_rate_limit(*, tenant: Tenant, jobs: int) -> None:
    """`check_rate_limit` on the event loop (no Redis call when the tenant is unlimited)."""
    limits = _limits(tenant, jobs)
    if limits is None:
        return
    rate, burst = limits
    try:
        decision = parse_rate_limit(
            await async_queue().rate_limit(tenant=tenant.id, rate=rate, burst=burst, cost=jobs)
        )
    except Exception as exc:
        logger.warning("rate limit not checked, Redis unavailable tenant=%s: %s", tenant.id, exc)
        return
    _enforce(decision, rate)
