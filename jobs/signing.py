"""Standard Webhooks signatures (https://www.standardwebhooks.com): the secret format, the three
headers every outgoing webhook request carries, and the worker's cache of each tenant's live
secrets.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}` over the exact body bytes sent,
HMAC-SHA256 keyed with the secret's base64-decoded bytes; `webhook-signature` holds one
`v1,<base64>` per live secret, space-separated, so a receiver holding either the old or the new
secret verifies during a rotation's overlap.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from jobs import selectors
from jobs.orm import orm

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks allows 24 to 64
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SIGNED_HEADERS = frozenset({ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER})
# How long a worker signs with the secrets it read: a rotation's new secret signs within this
# many seconds on every worker. Expiry is checked on every request, so it needs no refresh.
CACHE_TTL_S = 5.0
CACHE_MAX_TENANTS = 10_000


def new_secret() -> str:
    """A fresh secret: `whsec_` + standard base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a secret (admin, logs): 12 hex of its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def message_id(job_id: str) -> str:
    """The `webhook-id` of a job's request: the same on every attempt of the job."""
    return f"msg_{job_id}"


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64 HMAC-SHA256>` signature of `{msg_id}.{timestamp}.{body}`."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secrets_: Sequence[str], *, msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The Standard Webhooks headers of one request; without a secret, no `webhook-signature`."""
    headers = {ID_HEADER: msg_id, TIMESTAMP_HEADER: str(timestamp)}
    if secrets_:
        headers[SIGNATURE_HEADER] = " ".join(
            sign(secret, msg_id=msg_id, timestamp=timestamp, body=body) for secret in secrets_
        )
    return headers


@dataclass(frozen=True, slots=True)
class _Entry:
    loaded_at: float  # time.monotonic()
    secrets: tuple[tuple[str, datetime | None], ...]  # (secret, expires_at), newest first


class SecretCache:
    """Each tenant's live signing secrets, read from the database at most once per `ttl_s` per
    tenant and process. Concurrent misses for one tenant share one read."""

    def __init__(self, ttl_s: float = CACHE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Future[_Entry]] = {}

    async def live(self, tenant_id: str) -> tuple[str, ...]:
        """The tenant's secrets that sign now (expiry checked on every call), newest first."""
        entry = self._entries.get(tenant_id)
        if entry is None or time.monotonic() - entry.loaded_at >= self.ttl_s:
            entry = await self._load(tenant_id)
        now = timezone.now()
        return tuple(
            secret for secret, expires in entry.secrets if expires is None or expires > now
        )

    def clear(self) -> None:
        """Forget every tenant's secrets (the next request reads them again)."""
        self._entries.clear()

    async def _load(self, tenant_id: str) -> _Entry:
        future = self._loading.get(tenant_id)
        if future is None or future.get_loop() is not asyncio.get_running_loop():
            future = asyncio.ensure_future(self._read(tenant_id))
            self._loading[tenant_id] = future
            future.add_done_callback(lambda done: self._forget_loading(tenant_id, done))
        # Shielded: a cancelled job must not cancel the read other jobs wait for.
        return await asyncio.shield(future)

    def _forget_loading(self, tenant_id: str, future: asyncio.Future[_Entry]) -> None:
        if self._loading.get(tenant_id) is future:
            del self._loading[tenant_id]

    async def _read(self, tenant_id: str) -> _Entry:
        rows = await orm(selectors.signing_secrets_live)(tenant_id=tenant_id)
        if not rows:
            logger.warning(
                "no live signing secret, webhooks go out unsigned tenant=%s",
                tenant_id,
                extra={"tenant": tenant_id},
            )
        entry = _Entry(loaded_at=time.monotonic(), secrets=tuple(rows))
        if len(self._entries) >= CACHE_MAX_TENANTS:
            self._entries.clear()
        self._entries[tenant_id] = entry
        return entry


secret_cache = SecretCache()
