"""Event subscriptions on the real service: a subscription made over HTTP on `manage.py serve`,
jobs run by two `runworker_jobs` processes (both dispatch in turn), every change delivered to a
real local receiver once, signed, and in order per job."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from jobs.selectors import signing_secrets_live
from jobs.services import api_key_create, tenant_create
from tests.support.stack import Stack, wait_until
from tests.support.webhook_server import webhook_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

JOBS = 12


def test_every_change_reaches_the_subscriber_once_signed_and_in_order(stack: Stack) -> None:
    tenant = tenant_create(tenant_id="acme")
    _, key = api_key_create(tenant=tenant)
    ((secret, _),) = signing_secrets_live(tenant_id=tenant.id)
    headers = {"Authorization": f"Bearer {key}"}
    stack.start_api()
    stack.start_worker("--concurrency", "4", name="worker-a")
    stack.start_worker("--concurrency", "4", name="worker-b")

    with webhook_server() as receiver:
        receiver.statuses["/fail"] = [500] * 5
        made = httpx.post(
            f"{stack.base_url}/event-subscriptions",
            json={"url": receiver.url("/events"), "events": ["job.*"]},
            headers=headers,
            timeout=10,
        )
        assert made.status_code == 201, made.text
        jobs = [{"type": "sleep", "payload": {"delayMs": 100}} for _ in range(JOBS)]
        fail = {
            "type": "webhook",
            "payload": {"url": receiver.url("/fail"), "method": "POST"},
            "maxAttempts": 2,
        }
        ids = stack.create_batch(key, [*jobs, fail])
        # Per job: created and started, then completed (sleep); the failing webhook also
        # retries, starts again and fails.
        expected = 3 * JOBS + 5

        def events() -> list[dict[str, Any]]:
            return [Webhook(secret).verify(r.body, r.headers) for r in receiver.calls("/events")]

        wait_until(lambda: len(events()) >= expected, timeout=60, message="every event")
        wait_until(lambda: len(receiver.calls("/fail")) == 2, timeout=10, message="2 attempts")
        calls = receiver.calls("/events")

    ids_sent = [call.headers["webhook-id"] for call in calls]
    assert len(ids_sent) == len(set(ids_sent)) == expected  # no event twice, none missing
    by_job: dict[str, list[str]] = defaultdict(list)
    for event in events():
        by_job[event["data"]["id"]].append(event["type"])
    assert set(by_job) == set(ids)
    for job_id in ids[:JOBS]:
        assert by_job[job_id] == ["job.created", "job.started", "job.completed"], job_id
    assert by_job[ids[JOBS]] == [
        "job.created",
        "job.started",
        "job.retrying",
        "job.started",
        "job.failed",
    ]
    page = httpx.get(
        f"{stack.base_url}/event-subscriptions/{made.json()['id']}/deliveries",
        headers=headers,
        timeout=10,
    )
    assert page.status_code == 200
    assert all(d["statusCode"] == 200 for d in page.json()["deliveries"])
