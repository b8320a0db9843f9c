"""Event subscriptions (SPEC section 14): the endpoints, the dispatcher that turns job changes
into `event_delivery` jobs, and the deliveries themselves, received by a real local HTTP server
and verified with `standardwebhooks` as a receiver would."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from standardwebhooks import Webhook

from jobs import events
from jobs.events_dispatch import dispatch, prune_changes, trim_logs
from jobs.handlers.event_delivery import MAX_ATTEMPTS, RETRY_DELAYS_S
from jobs.lifecycle import RetryPolicy
from jobs.models import EventDelivery, EventSubscription, Job, JobChange, JobStatus, Tenant
from jobs.schemas import job_json
from jobs.selectors import signing_secrets_live
from jobs.services import (
    MAX_EVENT_SUBSCRIPTIONS,
    JobSpec,
    api_key_create,
    event_subscription_create,
    event_subscription_delete,
    job_cancel,
    job_enqueue,
    job_retry,
    tenant_create,
)
from jobs.worker import Worker, WorkerOptions
from tests.support.api import assert_error, get, post
from tests.support.handlers import allow_webhook_hosts
from tests.support.stack import wait_until
from tests.support.webhook_server import Recorded, WebhookServer
from tests.support.worker import run_burst

# The worker's secret cache lives per process; tests reuse tenant ids with new secrets.
pytestmark = pytest.mark.usefixtures("fresh_secret_cache")


def delete(client: Client, path: str, key: str | None) -> Any:
    extra = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    return client.delete(path, **extra)


def subscribe(tenant: Tenant, url: str, *names: str) -> EventSubscription:
    return event_subscription_create(tenant=tenant, url=url, events=list(names))


def sleep_job(tenant: Tenant, delay_ms: int = 10) -> Job:
    job, _ = job_enqueue(tenant=tenant, spec=JobSpec(type="sleep", payload={"delayMs": delay_ms}))
    return job


def finish(job: Job) -> None:
    """Claim and complete `job` in two writes, as a worker makes them (no worker runs: its upkeep
    would dispatch in between)."""
    now = timezone.now()
    rows = Job.objects.filter(id=job.id)
    rows.update(status=JobStatus.RUNNING, attempts=1, started_at=now, updated_at=now)
    rows.update(status=JobStatus.COMPLETED, result={"sleptMs": 10}, finished_at=now)


def deliveries(tenant: Tenant) -> list[Job]:
    return list(Job.objects.filter(tenant=tenant, type=events.EVENT_DELIVERY).order_by("cursor"))


def verified(secret: str, request: Recorded) -> dict[str, Any]:
    """The body a receiver holding `secret` accepts (raises if the signature does not verify)."""
    return Webhook(secret).verify(request.body, request.headers)


@contextmanager
def worker_running() -> Iterator[Worker]:
    """A worker (not burst: its upkeep dispatches events every 0.5 s) in a thread of its own,
    stopped warm at the end of the block."""
    worker = Worker(WorkerOptions(name=f"test-{uuid.uuid4().hex[:6]}", concurrency=4, grace_s=5))
    started = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []
    codes: list[int] = []

    async def main() -> int:
        loops.append(asyncio.get_running_loop())
        started.set()
        return await worker.run()

    def target() -> None:
        try:
            codes.append(asyncio.run(main()))
        finally:
            connection.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield worker
    finally:
        loops[0].call_soon_threadsafe(worker.stop)
        thread.join(30)
    assert codes == [0]


# --- the endpoints -------------------------------------------------------------------------------


@pytest.fixture
def hooks(settings: Any) -> None:
    allow_webhook_hosts(settings, "127.0.0.1")


@pytest.mark.usefixtures("hooks")
def test_create_list_and_delete_a_subscription(
    client: Client, api_key: str, other_api_key: str
) -> None:
    body = {"url": "http://127.0.0.1:9/hook", "events": ["job.completed", "job.failed"]}
    assert_error(post(client, "/event-subscriptions", body, None), 401)

    created = post(client, "/event-subscriptions", {**body, "description": "billing"}, api_key)
    assert created.status_code == 201, created.content
    sub = created.json()
    assert set(sub) == {"id", "url", "events", "description", "createdAt"}
    assert (sub["url"], sub["events"], sub["description"]) == (
        body["url"],
        body["events"],
        "billing",
    )

    listed = get(client, "/event-subscriptions", api_key).json()["subscriptions"]
    assert [s["id"] for s in listed] == [sub["id"]]
    assert get(client, "/event-subscriptions", other_api_key).json() == {"subscriptions": []}

    path = f"/event-subscriptions/{sub['id']}"
    assert_error(delete(client, path, other_api_key), 404)
    assert_error(get(client, f"{path}/deliveries", other_api_key), 404)
    assert get(client, f"{path}/deliveries", api_key).json() == {"deliveries": []}
    assert delete(client, path, api_key).status_code == 204
    assert_error(delete(client, path, api_key), 404)
    assert get(client, "/event-subscriptions", api_key).json() == {"subscriptions": []}


@pytest.mark.usefixtures("hooks")
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "http://127.0.0.1:9/hook", "events": ["job.finished"]}, "events.0"),
        ({"url": "http://127.0.0.1:9/hook", "events": []}, "events"),
        ({"url": "ftp://127.0.0.1/hook", "events": ["job.*"]}, "url"),
        ({"url": "http://10.1.2.3/hook", "events": ["job.*"]}, "url"),  # the network policy
        ({"url": "http://127.0.0.1:9/hook", "events": ["job.*"], "secret": "x"}, "secret"),
    ],
)
def test_invalid_subscriptions_are_400(
    client: Client, api_key: str, body: dict[str, Any], field: str
) -> None:
    error = assert_error(post(client, "/event-subscriptions", body, api_key), 400)
    assert field in [d["field"] for d in error["details"]], error


@pytest.mark.usefixtures("hooks")
def test_a_tenant_has_at_most_the_cap_of_subscriptions(client: Client, api_key: str) -> None:
    body = {"url": "http://127.0.0.1:9/hook", "events": ["job.*"]}
    for _ in range(MAX_EVENT_SUBSCRIPTIONS):
        assert post(client, "/event-subscriptions", body, api_key).status_code == 201
    assert_error(post(client, "/event-subscriptions", body, api_key), 409)


def test_tenants_cannot_create_event_delivery_jobs(client: Client, api_key: str) -> None:
    payload = {
        "subscriptionId": str(uuid.uuid4()),
        "eventId": "evt_x_1",
        "type": "job.completed",
        "timestamp": "2026-12-01T00:00:00Z",
        "data": {},
    }
    response = post(client, "/jobs", {"type": "event_delivery", "payload": payload}, api_key)
    error = assert_error(response, 400, "Validation failed")
    (detail,) = error["details"]
    assert detail["field"] == "type" and "event_delivery" not in detail["message"]
    assert not Job.objects.exists()


# --- dispatch and delivery, through the real worker ---------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_completed_subscription_gets_one_signed_post_per_completed_job(
    client: Client, allowed_receiver: WebhookServer
) -> None:
    tenant = tenant_create(tenant_id="acme")
    ((secret, _),) = signing_secrets_live(tenant_id=tenant.id)
    _, key = api_key_create(tenant=tenant)
    sub = subscribe(tenant, allowed_receiver.url("/events"), "job.completed")
    jobs = [sleep_job(tenant), sleep_job(tenant)]

    run_burst()
    dispatch()
    run_burst()
    dispatch()  # nothing new: a second pass sends nothing again
    run_burst()

    calls = allowed_receiver.calls("/events")
    assert len(calls) == 2
    by_job = {}
    for request in calls:
        body = verified(secret, request)
        assert set(body) == {"type", "timestamp", "data"} and body["type"] == "job.completed"
        by_job[body["data"]["id"]] = (request, body)
    assert set(by_job) == {str(job.id) for job in jobs}
    for job in jobs:
        job.refresh_from_db()
        request, body = by_job[str(job.id)]
        assert body["data"] == json.loads(job_json(job))  # as GET /jobs/{id} renders it
        assert body["data"]["status"] == "COMPLETED"
        assert body["timestamp"] == body["data"]["updatedAt"]
        assert request.headers["webhook-id"] == f"evt_{job.id}_{job.cursor}"

    log = get(client, f"/event-subscriptions/{sub.id}/deliveries", key).json()["deliveries"]
    assert len(log) == 2
    assert {(d["event"], d["statusCode"], d["attempt"], d["error"]) for d in log} == {
        ("job.completed", 200, 1, None)
    }
    assert {d["eventId"] for d in log} == {r.headers["webhook-id"] for r in calls}
    assert all(d["durationMs"] >= 0 for d in log)


@pytest.mark.django_db(transaction=True)
def test_job_star_gets_created_started_completed_in_order(allowed_receiver: WebhookServer) -> None:
    tenant = tenant_create(tenant_id="acme")
    ((secret, _),) = signing_secrets_live(tenant_id=tenant.id)
    subscribe(tenant, allowed_receiver.url("/events"), "job.*")
    job = sleep_job(tenant, delay_ms=1000)
    dispatch()  # the job is PENDING as created now; a worker would claim it within the pass

    with worker_running():
        wait_until(
            lambda: len(allowed_receiver.calls("/events")) >= 3, timeout=20, message="3 events"
        )
        wait_until(
            lambda: all(d.status == JobStatus.COMPLETED for d in deliveries(tenant)),
            timeout=10,
            message="deliveries completed",
        )

    bodies = [verified(secret, request) for request in allowed_receiver.calls("/events")]
    assert [b["type"] for b in bodies] == ["job.created", "job.started", "job.completed"]
    assert {b["data"]["id"] for b in bodies} == {str(job.id)}
    assert [b["data"]["status"] for b in bodies] == ["PENDING", "RUNNING", "COMPLETED"]


@pytest.mark.django_db(transaction=True)
def test_a_failing_receiver_gets_each_event_once_in_order_after_retries(
    client: Client, allowed_receiver: WebhookServer
) -> None:
    tenant = tenant_create(tenant_id="acme")
    ((secret, _),) = signing_secrets_live(tenant_id=tenant.id)
    _, key = api_key_create(tenant=tenant)
    allowed_receiver.statuses["/events"] = [500, 200]
    sub = subscribe(tenant, allowed_receiver.url("/events"), "job.*")
    sleep_job(tenant, delay_ms=1000)
    dispatch()

    with worker_running():
        # The first retry waits 4.5-5 s; the later events wait for it (held, not attempted).
        wait_until(
            lambda: len(allowed_receiver.calls("/events")) >= 4, timeout=25, message="4 requests"
        )
        wait_until(
            lambda: all(d.status == JobStatus.COMPLETED for d in deliveries(tenant)),
            timeout=10,
            message="deliveries completed",
        )

    failed, *succeeded = allowed_receiver.calls("/events")
    ids = [request.headers["webhook-id"] for request in succeeded]
    assert len(ids) == len(set(ids)) == 3
    assert failed.headers["webhook-id"] == ids[0]
    types = [verified(secret, request)["type"] for request in succeeded]
    assert types == ["job.created", "job.started", "job.completed"]
    cursors_sent = [int(i.rsplit("_", 1)[1]) for i in ids]
    assert cursors_sent == sorted(cursors_sent)

    log = get(client, f"/event-subscriptions/{sub.id}/deliveries", key).json()["deliveries"]
    assert [(d["event"], d["attempt"], d["statusCode"]) for d in reversed(log)] == [
        ("job.created", 1, 500),
        ("job.created", 2, 200),
        ("job.started", 1, 200),
        ("job.completed", 1, 200),
    ]
    assert log[-1]["error"].startswith("webhook returned HTTP 500")
    held = [d for d in deliveries(tenant) if d.payload["type"] != "job.created"]
    assert all(d.attempts == 1 for d in held)  # waiting for the earlier event spent nothing


@pytest.mark.django_db(transaction=True)
def test_every_change_between_two_passes_is_an_event_of_its_own(
    allowed_receiver: WebhookServer,
) -> None:
    tenant = tenant_create(tenant_id="acme")
    subscribe(tenant, allowed_receiver.url("/events"), "job.*")
    ran = sleep_job(tenant)
    finish(ran)  # claimed and completed before any pass
    cancelled = sleep_job(tenant)
    job_cancel(tenant=tenant, job_id=cancelled.id)
    job_retry(tenant=tenant, job_id=cancelled.id)

    made = dispatch()

    assert [(d.payload["data"]["id"], d.payload["type"]) for d in made] == [
        (str(ran.id), "job.created"),
        (str(ran.id), "job.started"),
        (str(ran.id), "job.completed"),
        (str(cancelled.id), "job.created"),
        (str(cancelled.id), "job.cancelled"),
        (str(cancelled.id), "job.retrying"),
    ]
    # Each event carries the job as it stood at that change, not as it stands now.
    assert [d.payload["data"]["status"] for d in made] == [
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "PENDING",
        "CANCELLED",
        "PENDING",
    ]
    assert made[1].payload["data"]["result"] is None
    assert made[2].payload["data"]["result"] == {"sleptMs": 10}
    sent = [int(d.payload["data"]["cursor"]) for d in made[:3]]
    assert sent == sorted(sent) and len(set(sent)) == 3


@pytest.mark.django_db(transaction=True)
def test_the_change_log_holds_only_what_a_subscription_has_still_to_read(
    allowed_receiver: WebhookServer,
) -> None:
    watched = tenant_create(tenant_id="acme")
    other = tenant_create(tenant_id="globex")
    sub = subscribe(watched, allowed_receiver.url("/events"), "job.completed")
    for tenant in (other, watched):
        finish(sleep_job(tenant))

    logged = JobChange.objects.values_list("tenant_id", flat=True)
    assert set(logged) == {"acme"}  # no subscription, no log; deliveries are not logged either
    assert len(logged) == 3
    assert len(dispatch()) == 1
    assert not JobChange.objects.exists()  # read past by the only subscription of its tenant

    sleep_job(watched)
    assert JobChange.objects.count() == 1
    event_subscription_delete(tenant=watched, subscription_id=sub.id)
    assert prune_changes() == 1
    sleep_job(watched)
    assert not JobChange.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_job_finished_before_the_subscription_sends_nothing(
    allowed_receiver: WebhookServer,
) -> None:
    tenant = tenant_create(tenant_id="acme")
    job = sleep_job(tenant)
    run_burst()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED

    sub = subscribe(tenant, allowed_receiver.url("/events"), "job.*")
    assert sub.cursor >= job.cursor
    assert dispatch() == []
    run_burst()
    assert deliveries(tenant) == [] and allowed_receiver.calls() == []


@pytest.mark.django_db(transaction=True)
def test_dispatching_the_same_changes_twice_creates_no_duplicate(
    allowed_receiver: WebhookServer,
) -> None:
    tenant = tenant_create(tenant_id="acme")
    sub = subscribe(tenant, allowed_receiver.url("/events"), "job.*")
    start = sub.cursor
    sleep_job(tenant)
    sleep_job(tenant)

    first = dispatch()
    assert [d.payload["type"] for d in first] == ["job.created", "job.created"]
    # As if the pass had died after its commit and before anyone saw its new position.
    EventSubscription.objects.filter(id=sub.id).update(cursor=start)
    assert dispatch() == []
    assert len(deliveries(tenant)) == 2
    sub.refresh_from_db()
    assert sub.cursor > start


@pytest.mark.django_db(transaction=True)
def test_a_deleted_subscriptions_deliveries_complete_without_a_request(
    allowed_receiver: WebhookServer,
) -> None:
    tenant = tenant_create(tenant_id="acme")
    sub = subscribe(tenant, allowed_receiver.url("/events"), "job.created")
    sleep_job(tenant)
    dispatch()
    sub.delete()

    run_burst()

    (delivery,) = deliveries(tenant)
    assert delivery.status == JobStatus.COMPLETED
    assert delivery.result == {"skipped": "the event subscription was deleted"}
    assert allowed_receiver.calls() == []


@pytest.mark.usefixtures("hooks")
def test_the_delivery_log_keeps_the_newest_rows_per_subscription(tenant: Tenant) -> None:
    subs = [subscribe(tenant, "http://127.0.0.1:9/hook", "job.*") for _ in range(2)]
    now = timezone.now()
    for sub in subs:
        for n in range(5):
            EventDelivery.objects.create(
                subscription=sub,
                job_id=uuid.uuid4(),
                event_type="job.created",
                event_id=f"evt_{n}",
                attempt=1,
                created_at=now + timedelta(seconds=n),
            )

    assert trim_logs(keep=3) == 4
    for sub in subs:
        kept = sub.deliveries.order_by("created_at").values_list("event_id", flat=True)
        assert list(kept) == ["evt_2", "evt_3", "evt_4"]


# --- states, events and the retry schedule ------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "event"),
    [
        ({}, "job.created"),
        ({"status": "RUNNING", "attempts": 1}, "job.started"),
        ({"status": "RUNNING", "attempts": 1, "progress": 40}, None),
        ({"attempts": 1, "error": "boom"}, "job.retrying"),
        ({"attempts": 1, "error": "held: circuit open for host h:443"}, None),
        ({"later": True}, "job.retrying"),  # POST /jobs/{id}/retry: attempts reset
        ({"status": "COMPLETED", "attempts": 1}, "job.completed"),
        ({"status": "FAILED", "attempts": 3, "error": "boom"}, "job.failed"),
        ({"status": "CANCELLED", "error": "cancelled"}, "job.cancelled"),
    ],
)
def test_each_state_maps_to_its_event(fields: dict[str, Any], event: str | None) -> None:
    now = timezone.now()
    fields = dict(fields)
    later = fields.pop("later", False)
    values: dict[str, Any] = {
        "status": "PENDING",
        "attempts": 0,
        "error": None,
        "progress": None,
        "started_at": None,
        "created_at": now,
        "updated_at": now + timedelta(seconds=1) if later else now,
    }
    assert events.event_of(Job(**{**values, **fields})) == event


def test_event_deliveries_retry_for_about_a_day() -> None:
    policy = RetryPolicy(base_ms=1000, max_ms=300_000)
    waits = [policy.backoff(n, events.EVENT_DELIVERY) for n in range(1, MAX_ATTEMPTS)]
    for wait, planned in zip(waits, RETRY_DELAYS_S, strict=True):
        assert timedelta(seconds=0.9 * planned) <= wait <= timedelta(seconds=planned)
    assert timedelta(hours=21) < sum(waits, timedelta()) <= timedelta(hours=24)
    assert MAX_ATTEMPTS == 11
    # Other types keep the global exponential backoff.
    assert policy.backoff(10, "webhook") <= timedelta(minutes=5)


@pytest.mark.usefixtures("hooks")
def test_the_admin_lists_subscriptions_and_shows_their_latest_deliveries(
    admin_client: Client, tenant: Tenant
) -> None:
    sub = subscribe(tenant, "http://127.0.0.1:9/hook", "job.completed")
    EventDelivery.objects.create(
        subscription=sub,
        job_id=uuid.uuid4(),
        event_type="job.completed",
        event_id="evt_shown_7",
        attempt=2,
        status_code=503,
        duration_ms=12,
        error="webhook returned HTTP 503",
        created_at=timezone.now(),
    )

    listing = admin_client.get("/admin/jobs/eventsubscription/")
    assert listing.status_code == 200 and str(sub.id) in listing.content.decode()
    detail = admin_client.get(f"/admin/jobs/eventsubscription/{sub.id}/change/").content.decode()
    assert "evt_shown_7" in detail and "webhook returned HTTP 503" in detail and "12 ms" in detail
