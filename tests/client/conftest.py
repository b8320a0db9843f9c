"""The service the SDK tests talk to: the real API and a worker as subprocesses
(`tests/support/stack.py`), started once for this directory, and a tenant of its own with an
API key for each test.

One API for all tests keeps the directory fast (starting one takes seconds). Each test has its
own tenant, so it sees only its own jobs; jobs meant to stay PENDING are delayed by an hour, so
the shared worker never runs them. A test may stop and start the API; the next test gets it
running again."""

from __future__ import annotations

import logging
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from django.conf import settings
from jobqueue_client import Client

from jobs.models import Tenant
from jobs.services import api_key_create
from tests.support.stack import Stack, running_stack

LATER_MS = 3_600_000  # `delay_ms` of a job that must stay PENDING for the whole run


@dataclass
class Processes:
    """The directory's stack and its current API process (a test may replace it)."""

    stack: Stack
    api: subprocess.Popen


@dataclass
class Service:
    processes: Processes
    tenant: Tenant
    key: str

    @property
    def url(self) -> str:
        return self.processes.stack.base_url

    @property
    def port(self) -> int:
        return self.processes.stack.port

    def client(self, **options: float) -> Client:
        return Client(self.url, self.key, **options)

    def stop_api(self) -> None:
        """SIGTERM the API (its sockets are closed with 1001) and wait until it has exited."""
        self.processes.api.send_signal(signal.SIGTERM)
        self.processes.api.wait(timeout=20)

    def start_api(self) -> None:
        """The API again, on the port it had: clients keep their URL."""
        stack = self.processes.stack
        self.processes.api = stack.spawn_api("api", stack.port)

    def job_count(self) -> int:
        return self.tenant.jobs.count()

    def statuses(self) -> dict[str, str]:
        return {
            str(job_id): status for job_id, status in self.tenant.jobs.values_list("id", "status")
        }


@pytest.fixture(scope="package")
def processes(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Processes]:
    prefix = f"test-sdk-{uuid.uuid4().hex[:8]}"
    tmp: Path = tmp_path_factory.mktemp("sdk-stack")
    try:
        with running_stack(redis_prefix=prefix, tmp=tmp) as stack:
            api = stack.start_api()
            stack.start_worker("--concurrency", "4")
            yield Processes(stack=stack, api=api)
    finally:
        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture
def service(processes: Processes, transactional_db: None) -> Service:
    """A fresh tenant and key on the running API (started again if a test left it stopped)."""
    if processes.api.poll() is not None:
        processes.api = processes.stack.spawn_api("api", processes.stack.port)
    tenant = Tenant.objects.create(id=f"sdk-{uuid.uuid4().hex[:10]}", name="SDK tests")
    _, key = api_key_create(tenant=tenant)
    return Service(processes=processes, tenant=tenant, key=key)


@pytest.fixture
def sdk_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The SDK's own log lines (subscribed, lost, reconnecting), from every thread."""
    caplog.set_level(logging.INFO, logger="jobqueue_client")
    yield caplog


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if text in r.getMessage()]
