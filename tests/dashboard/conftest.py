"""Dashboard fixtures: staff and non-staff sessions; the end-to-end `stack` (Daphne as a
subprocess) is shared with tests/e2e."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client
from django.utils import timezone

from jobs.models import TERMINAL_STATUSES, Job, JobStatus, Tenant
from tests.e2e.conftest import stack  # noqa: F401 -- re-exported fixture
from tests.support.users import create_operator


def make_job(
    tenant: Tenant | str,
    *,
    status: str = JobStatus.PENDING,
    finished_at: datetime | None = None,
    **fields: Any,
) -> Job:
    """A job row in any state, written directly."""
    now = timezone.now()
    if status in TERMINAL_STATUSES and finished_at is None:
        finished_at = now
    values: dict[str, Any] = {
        "type": "sleep",
        "payload": {"delayMs": 0},
        "run_at": now,
        "created_at": now,
        "updated_at": now,
        **fields,
    }
    tenant_id = tenant if isinstance(tenant, str) else tenant.id
    return Job.objects.create(tenant_id=tenant_id, status=status, finished_at=finished_at, **values)


@pytest.fixture
def staff_user(db: None) -> AbstractBaseUser:
    # Staff who may view jobs: the dashboard and staff sockets need that permission.
    return create_operator()


@pytest.fixture
def staff_client(staff_user: AbstractBaseUser) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


@pytest.fixture
def customer_client(db: None) -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_user(username="customer"))
    return client
