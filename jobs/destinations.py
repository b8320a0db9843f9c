"""Destination protection: webhook requests never hammer a host (SPEC section 14).

Per destination host (the URL's host name, lower-cased, and its port, explicit or the scheme's
default: `example.com:443`, `[2001:db8::1]:8080`), over every worker, in Redis:

- a concurrency cap: at most `JOBS_WEBHOOK_HOST_CONCURRENCY` requests in flight, each holding a
  slot leased for its timeout plus `LEASE_MARGIN_MS` (a worker that dies mid-request frees its
  slot when the lease runs out);
- a circuit breaker: `JOBS_WEBHOOK_BREAKER_FAILURES` consecutive failures (network errors,
  timeouts, 5xx; any answer below 500 is a success) open the circuit for
  `JOBS_WEBHOOK_BREAKER_COOLDOWN_S`; then one probe request goes (half-open): its success closes
  the circuit, its failure opens it again.

A request that may not go now raises `HeldBack`: the attempt ends at once and the job waits,
PENDING, its attempt not spent (jobs/lifecycle.py `held_fields`). The scripts are
jobs/lua/host_acquire.lua and host_release.lua; the commands are the `Queue`'s. If Redis cannot
be reached the request goes unguarded (logged), as the rate limit lets requests through.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import redis
from django.conf import settings
from django.utils import timezone

from jobs.handlers.registry import HeldBack
from jobs.queue import async_queue, parse_host_pass

logger = logging.getLogger("jobs.worker")

# A slot outlives its request's timeout by this much before another request may take it.
LEASE_MARGIN_MS = 5_000
# A request refused for the cap waits this long (uniform, ms) before its job is claimed again.
BUSY_WAIT_MS = (100, 500)
# Jobs held by an open circuit are spread over this much (ms) after its cool-down ends.
OPEN_JITTER_MS = 250
# A breaker's state is forgotten a day after its last change (plus the cool-down).
BREAKER_KEEP_MS = 86_400_000

OK, FAILED, NONE = "ok", "failed", "none"


def host_of(url: httpx.URL) -> str:
    """The destination a request counts against: lower-cased host name and port."""
    host = url.host.lower()
    if ":" in host:
        host = f"[{host}]"
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Protection:
    """The limits, from settings."""

    concurrency: int
    failures_to_open: int
    cooldown_ms: int

    @classmethod
    def from_settings(cls) -> Protection:
        return cls(
            concurrency=settings.JOBS["WEBHOOK_HOST_CONCURRENCY"],
            failures_to_open=settings.JOBS["WEBHOOK_BREAKER_FAILURES"],
            cooldown_ms=int(float(settings.JOBS["WEBHOOK_BREAKER_COOLDOWN_S"]) * 1000),
        )


class RequestSlot:
    """One request's slot at a host; the caller gives the verdict (`answered`, `failed`) that
    the breaker counts when the slot is given back. No verdict: the request did not happen."""

    def __init__(self, host: str, *, probe: bool) -> None:
        self.host = host
        self.probe = probe
        self.verdict = NONE

    def answered(self, status: int) -> None:
        """The host answered with `status`: below 500 it is up."""
        self.verdict = FAILED if status >= 500 else OK

    def failed(self) -> None:
        """No answer: a network error or a timeout."""
        self.verdict = FAILED


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _held(host: str, reason: str, retry_at_ms: int) -> HeldBack:
    if reason == "busy":
        until = timezone.now() + timedelta(milliseconds=random.uniform(*BUSY_WAIT_MS))
        return HeldBack(until, f"host {host} has its maximum of requests in flight")
    until = _at(retry_at_ms) + timedelta(milliseconds=random.uniform(0, OPEN_JITTER_MS))
    if reason == "probing":
        return HeldBack(until, f"circuit half-open for host {host}, a probe request is out")
    return HeldBack(until, f"circuit open for host {host} until {_at(retry_at_ms).isoformat()}")


@asynccontextmanager
async def request_slot(host: str, *, timeout_ms: int) -> AsyncIterator[RequestSlot]:
    """Hold a slot at `host` for one request of at most `timeout_ms`, or raise `HeldBack`."""
    limits = Protection.from_settings()
    queue = async_queue()
    holder = uuid.uuid4().hex
    try:
        granted = parse_host_pass(
            await queue.acquire_host(
                host=host,
                holder=holder,
                limit=limits.concurrency,
                lease_ms=timeout_ms + LEASE_MARGIN_MS,
                cooldown_ms=limits.cooldown_ms,
            )
        )
    except redis.RedisError as exc:
        logger.warning("destination protection unavailable, unguarded host=%s: %s", host, exc)
        yield RequestSlot(host, probe=False)
        return
    if not granted.granted:
        raise _held(host, granted.reason, granted.retry_at_ms)
    slot = RequestSlot(host, probe=granted.probe)
    try:
        yield slot
    finally:
        try:
            state = await queue.release_host(
                host=host,
                holder=holder,
                verdict=slot.verdict,
                failures_to_open=limits.failures_to_open,
                cooldown_ms=limits.cooldown_ms,
                keep_ms=BREAKER_KEEP_MS + limits.cooldown_ms,
            )
        except redis.RedisError as exc:
            # The slot's lease frees it; the verdict is lost.
            logger.warning("destination slot not released host=%s: %s", host, exc)
        else:
            if state in (b"open", "open") and slot.verdict == FAILED:
                logger.warning("circuit open for host=%s", host)
