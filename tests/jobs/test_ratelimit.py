"""Per-tenant rate limit of job creation, in the real Redis, through the API."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from jobs.models import Job, Tenant
from tests.support.api import SLEEP, assert_error, post

pytestmark = pytest.mark.django_db(transaction=True)


def test_default_limit_gives_429_with_retry_after(
    client: Client, api_key: str, settings: Any
) -> None:
    settings.JOBS = {**settings.JOBS, "TENANT_RATE_LIMIT": 5}
    codes = [post(client, "/jobs", SLEEP, api_key).status_code for _ in range(8)]
    assert codes[:5] == [201] * 5
    assert 429 in codes[5:]
    refused = post(client, "/jobs", SLEEP, api_key)
    body = assert_error(refused, 429, "Rate limit exceeded")
    assert int(refused["Retry-After"]) >= 1
    assert body["details"]["ratePerSecond"] == 5
    assert Job.objects.count() == codes.count(201)
    time.sleep(0.5)  # half a second refills about 2 of the 5 tokens
    assert post(client, "/jobs", SLEEP, api_key).status_code == 201


def test_tenant_override_and_unlimited(
    client: Client, api_key: str, other_api_key: str, tenant: Tenant, settings: Any
) -> None:
    settings.JOBS = {**settings.JOBS, "TENANT_RATE_LIMIT": 2}
    tenant.rate_limit = 0  # this tenant is unlimited; the other keeps the default
    tenant.save()
    assert {post(client, "/jobs", SLEEP, api_key).status_code for _ in range(10)} == {201}
    codes = [post(client, "/jobs", SLEEP, other_api_key).status_code for _ in range(4)]
    assert codes[:2] == [201, 201] and codes[2:] == [429, 429]


def test_batch_counts_its_jobs(client: Client, api_key: str, tenant: Tenant) -> None:
    tenant.rate_limit = 10
    tenant.save()
    assert post(client, "/jobs/batch", {"jobs": [SLEEP] * 8}, api_key).status_code == 201
    assert_error(post(client, "/jobs/batch", {"jobs": [SLEEP] * 5}, api_key), 429)
    too_big = assert_error(post(client, "/jobs/batch", {"jobs": [SLEEP] * 11}, api_key), 413)
    assert too_big["details"]["burst"] == 10
    assert Job.objects.count() == 8


def test_limit_holds_across_concurrent_clients(api_key: str, tenant: Tenant) -> None:
    # Separate clients and threads stand for separate API processes: the bucket lives in Redis.
    tenant.rate_limit = 20
    tenant.save()
    codes: list[int] = []

    def burst() -> None:
        try:
            client = Client()
            codes.extend(post(client, "/jobs", SLEEP, api_key).status_code for _ in range(15))
        finally:
            connection.close()

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    created = codes.count(201)
    # 20 at once, plus what refills (20/s) during the few hundred ms the 60 requests take.
    assert 20 <= created < 40, created
    assert codes.count(429) == 60 - created


def test_cancel_and_retry_spend_the_limit_too(client: Client, api_key: str, tenant: Tenant) -> None:
    # Retrying one job over and over re-ran its webhook without limit.
    tenant.rate_limit = 3
    tenant.save()
    job_id = post(client, "/jobs", SLEEP, api_key).json()["id"]
    assert post(client, f"/jobs/{job_id}/cancel", {}, api_key).status_code == 200
    assert post(client, f"/jobs/{job_id}/retry", {}, api_key).status_code == 200
    refused = post(client, f"/jobs/{job_id}/cancel", {}, api_key)
    assert_error(refused, 429, "Rate limit exceeded")
    assert int(refused["Retry-After"]) >= 1
    assert Job.objects.get(id=job_id).status == "PENDING"
