"""API-key authentication for the event loop, answered from memory in the normal case.

A key's tenant is cached per process for at most KEY_CACHE_TTL_S, and only while the process's
realtime hub (realtime/hub.py) is subscribed to the `P:auth` channel: every change to a key or a
tenant (revocation, deactivation, new limits, deletion) is announced there after commit, and each
API process drops that tenant's entries at once. If the subscription is down, or was re-made since
an entry was cached, the entry is not trusted and the database answers. Revocation therefore takes
effect on every API process within a pub/sub round trip, and within KEY_CACHE_TTL_S at worst.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from django.db import transaction

from jobs.models import Tenant
from jobs.orm import orm
from jobs.queue import sync_queue
from jobs.services import API_KEY_RE, api_key_authenticate, hash_api_key
from realtime.hub import Hub, running_hub

logger = logging.getLogger(__name__)

KEY_CACHE_TTL_S = 5.0
# Announced instead of a tenant id when a user changes (staff status, permissions, password) or
# logs out: open staff sockets are re-checked. Not a valid tenant id, so no key is affected.
STAFF_CHANGED = "@staff"
KEY_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class _Entry:
    tenant: Tenant
    cached_at: float
    generation: int


class KeyCache:
    """Key digest -> tenant, for one hub (one process)."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        # Bumped by every invalidation: a lookup that overlapped one does not cache its answer.
        self.epoch = 0

    def get(self, digest: str, hub: Hub) -> Tenant | None:
        entry = self.entries.get(digest)
        if entry is None:
            return None
        if (
            not hub.connected
            or entry.generation != hub.generation
            or time.monotonic() - entry.cached_at > KEY_CACHE_TTL_S
        ):
            del self.entries[digest]
            return None
        return entry.tenant

    def put(self, digest: str, tenant: Tenant, hub: Hub) -> None:
        if len(self.entries) >= KEY_CACHE_MAX:
            # Bounded: a flood of distinct valid keys costs lookups, never memory.
            self.entries.clear()
        self.entries[digest] = _Entry(tenant, time.monotonic(), hub.generation)

    def invalidate(self, tenant_id: str) -> None:
        """Forget a tenant's keys (every key if `tenant_id` is empty)."""
        self.epoch += 1
        if tenant_id == STAFF_CHANGED:
            return
        if not tenant_id:
            self.entries.clear()
            return
        for digest in [d for d, e in self.entries.items() if e.tenant.id == tenant_id]:
            self.entries.pop(digest, None)


def _key_cache(hub: Hub) -> KeyCache:
    """The hub's key cache, emptied of a tenant's keys whenever they change."""
    cache = KeyCache()
    hub.on_auth_change(cache.invalidate)
    return cache


def well_formed(raw_key: str) -> bool:
    return API_KEY_RE.fullmatch(raw_key) is not None


async def aauthenticate(raw_key: str) -> Tenant | None:
    """The active tenant of an API key, or None; from memory when the hub vouches for it."""
    if not well_formed(raw_key):
        return None
    hub = running_hub()
    if hub is None or not hub.connected:
        return await orm(api_key_authenticate)(raw_key=raw_key)
    cache = hub.attached(_key_cache)
    digest = hash_api_key(raw_key)
    tenant = cache.get(digest, hub)
    if tenant is not None:
        return tenant
    generation, epoch = hub.generation, cache.epoch
    tenant = await orm(api_key_authenticate)(raw_key=raw_key)
    # An invalidation may have arrived while the database answered: cache only if none could.
    if tenant is not None and hub.generation == generation and cache.epoch == epoch:
        cache.put(digest, tenant, hub)
    return tenant


def announce_auth_change(tenant_id: str) -> None:
    """Tell every API process, after commit, that a tenant's keys or settings changed."""

    def publish() -> None:
        try:
            sync_queue().announce_auth_change(tenant_id)
        except redis.RedisError as exc:
            # The cache's TTL is the backstop when the announcement cannot be made. Redis down
            # is an expected condition (a command run while `make run` is stopped): one line.
            logger.warning(
                "could not announce an auth change tenant=%s (Redis: %s); API processes notice "
                "within %.0fs",
                tenant_id,
                exc,
                KEY_CACHE_TTL_S,
            )
        except Exception:
            logger.exception("could not announce an auth change tenant=%s", tenant_id)

    transaction.on_commit(publish)
