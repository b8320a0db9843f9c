"""Shared fixtures. Tests use the machine's real PostgreSQL and Redis; each test gets its own
Redis key prefix (queue keys and pub/sub channels) and removes its keys afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from jobs.models import Tenant
from jobs.services import api_key_create


@pytest.fixture(autouse=True)
def redis_prefix(settings) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A private Redis prefix for this test, for the queue and the update channels."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings.JOBS = {**settings.JOBS, "REDIS_PREFIX": prefix}
    yield prefix
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def tenant(db) -> Tenant:  # type: ignore[no-untyped-def]
    return Tenant.objects.create(id="tenant-1", name="Tenant One")


@pytest.fixture
def other_tenant(db) -> Tenant:  # type: ignore[no-untyped-def]
    return Tenant.objects.create(id="tenant-2", name="Tenant Two")


@pytest.fixture
def api_key(tenant: Tenant) -> str:
    _, raw = api_key_create(tenant=tenant)
    return raw


@pytest.fixture
def other_api_key(other_tenant: Tenant) -> str:
    _, raw = api_key_create(tenant=other_tenant)
    return raw
