"""Per-tenant rate limit of job creation, shared by every API process through Redis (GCRA)."""

from __future__ import annotations

import logging
import math

from django.conf import settings

from jobs.errors import ApiError
from jobs.models import Tenant
from jobs.queue import sync_queue

logger = logging.getLogger(__name__)


def tenant_rate(tenant: Tenant) -> int:
    """Jobs per second the tenant may create: its own limit, else the default; 0 is unlimited."""
    if tenant.rate_limit is not None:
        return tenant.rate_limit
    return settings.JOBS["TENANT_RATE_LIMIT"]


def check_rate_limit(*, tenant: Tenant, jobs: int) -> None:
    """Take `jobs` tokens from the tenant's bucket or raise 429 with Retry-After.

    The bucket holds one second's worth of jobs (at least one). If Redis cannot be reached the
    request is let through (logged): job creation must not depend on Redis being up.
    """
    rate = tenant_rate(tenant)
    if rate <= 0:
        return
    burst = max(1, rate)
    if jobs > burst:
        # It could never pass: waiting does not help, so this is not a 429.
        raise ApiError(
            413,
            "Batch larger than the tenant's rate limit allows at once",
            {"jobs": jobs, "burst": burst, "ratePerSecond": rate},
        )
    queue = sync_queue()
    try:
        allowed, retry_ms = queue.rate_limit(tenant=tenant.id, rate=rate, burst=burst, cost=jobs)
    except Exception as exc:
        logger.warning("rate limit not checked, Redis unavailable tenant=%s: %s", tenant.id, exc)
        return
    if not allowed:
        retry_s = max(1, math.ceil(int(retry_ms) / 1000))
        raise ApiError(
            429,
            "Rate limit exceeded",
            {"ratePerSecond": rate, "retryAfterMs": int(retry_ms)},
            headers={"Retry-After": str(retry_s)},
        )
