"""Shared fixtures. Tests use the machine's real PostgreSQL and Redis; each test gets its own
Redis key prefix (queue keys and pub/sub channels) and removes its keys afterwards.

A test that starts real processes (it lives in tests/e2e/ or uses `stack`) is marked `e2e`:
`pytest -m "not e2e"` leaves those out (see tests/README.md)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.backends.signals import connection_created
from django.dispatch import receiver

from jobs.models import Tenant
from jobs.services import api_key_create
from tests.support.stack import Stack, running_stack
from tests.support.users import create_operator

E2E_DIR = Path(__file__).resolve().parent / "e2e"


@receiver(connection_created)
def lose_no_deadlock_to_the_stack(sender: object, connection: Any, **_: object) -> None:
    """The test process's connections wait 5 s, not PostgreSQL's 1 s, before checking for a
    deadlock, so the service's processes check first and are the ones aborted. A stack that
    lives across tests (tests/client/) keeps writing while a test's teardown empties every
    table; the job triggers make its writes take table locks in another order than the
    flush's TRUNCATE, and the flush must not be the statement PostgreSQL gives up on (the
    service retries what failed)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET deadlock_timeout = '5s'")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents or "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


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


@pytest.fixture
def staff_user(db: None) -> AbstractBaseUser:
    # Staff who may view jobs: the dashboard and staff sockets need that permission.
    return create_operator()


@pytest.fixture
def stack(transactional_db: None, redis_prefix: str, tmp_path: Path) -> Iterator[Stack]:
    """The API and workers as subprocesses (started by the test), stopped at the end."""
    with running_stack(redis_prefix=redis_prefix, tmp=tmp_path) as running:
        yield running
