"""Email jobs cannot spoof a sender, fan out without limit or inject a header: the sender policy,
each tenant's hourly recipient budget and the header-field checks, through the API, the handler
and the worker, on the real PostgreSQL and Redis and a local SMTP server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from django.test import Client

from jobs.handlers import PermanentError
from jobs.handlers.email import EmailPayload, send_email
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import Keys
from jobs.services import JobSpec, job_enqueue
from tests.support.api import SLEEP, asgi_api, assert_error, post
from tests.support.handlers import make_ctx, run_sync
from tests.support.smtp_server import SMTPServer
from tests.support.worker import run_burst

pytestmark = pytest.mark.django_db

DEFAULT_FROM = "Jobs <jobs@service.example>"
# Every character some part of the mail path ends a line at: str.splitlines() (which Python's
# email package folds headers with) breaks on all of them, not only on CR and LF. NUL too.
LINE_BREAKS = ["\r", "\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
BREAKS_AND_NUL = [*LINE_BREAKS, "\x00"]


def char_id(ch: str) -> str:
    return f"U+{ord(ch):04X}"


@pytest.fixture(autouse=True)
def email_settings(settings: Any) -> None:
    settings.DEFAULT_FROM_EMAIL = DEFAULT_FROM
    settings.JOBS = {
        **settings.JOBS,
        "EMAIL_ALLOWED_SENDERS": [],
        "EMAIL_RECIPIENTS_PER_HOUR": 1000,
    }


def set_jobs(settings: Any, **values: Any) -> None:
    settings.JOBS = {**settings.JOBS, **values}


def email_job(**payload: Any) -> dict[str, Any]:
    return {
        "type": "email",
        "payload": {"to": "a@example.com", "subject": "s", "body": "b", **payload},
    }


def addresses(count: int) -> list[str]:
    return [f"user{i}@example.com" for i in range(count)]


# --- sender policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "sender"),
    [
        ([], "ceo@bank.example"),
        ([], "Your Bank <ceo@bank.example>"),
        ([], "someone-else@service.example"),  # only DEFAULT_FROM_EMAIL itself, by default
        (["@tenant.example"], "x@sub.tenant.example"),
        (["tenant.example"], "x@eviltenant.example"),
        (["news@tenant.example"], "sales@tenant.example"),
    ],
)
def test_a_sender_that_is_not_allowed_is_refused_at_the_api(
    client: Client, api_key: str, settings: Any, allowed: list[str], sender: str
) -> None:
    set_jobs(settings, EMAIL_ALLOWED_SENDERS=allowed)
    response = post(client, "/jobs", email_job(**{"from": sender}), api_key)
    body = assert_error(response, 400, "Validation failed")
    (detail,) = body["details"]
    assert detail["field"] == "payload.from"
    assert "JOBS_EMAIL_ALLOWED_SENDERS" in detail["message"]
    assert "replyTo" in detail["message"]
    assert Job.objects.count() == 0


def test_one_spoofed_sender_refuses_the_whole_batch(client: Client, api_key: str) -> None:
    jobs = [email_job(), email_job(**{"from": "ceo@bank.example"})]
    body = assert_error(post(client, "/jobs/batch", {"jobs": jobs}, api_key), 400)
    assert [d["field"] for d in body["details"]] == ["jobs.1.payload.from"]
    assert Job.objects.count() == 0


@pytest.mark.parametrize(
    ("allowed", "sender"),
    [
        ([], "jobs@service.example"),
        ([], "Reports <JOBS@Service.Example>"),
        (["@tenant.example"], "Reports <reports@tenant.example>"),
        (["tenant.example"], "news@TENANT.example"),
        (["news@tenant.example", "other.example"], "news@tenant.example"),
    ],
)
def test_allowed_senders_are_accepted(
    client: Client, api_key: str, settings: Any, allowed: list[str], sender: str
) -> None:
    set_jobs(settings, EMAIL_ALLOWED_SENDERS=allowed)
    response = post(client, "/jobs", email_job(**{"from": sender}), api_key)
    assert response.status_code == 201, response.content
    assert response.json()["payload"]["from"] == sender


@pytest.mark.django_db(transaction=True)
def test_reply_to_from_the_api_reaches_the_smtp_server(
    client: Client, api_key: str, settings: Any, smtp_server: SMTPServer
) -> None:
    set_jobs(settings, EMAIL_ALLOWED_SENDERS=["@tenant.example"])
    payload = {"from": "Reports <reports@tenant.example>", "replyTo": "Help <help@tenant.example>"}
    response = post(client, "/jobs", email_job(**payload), api_key)
    assert response.status_code == 201, response.content
    run_burst()
    job = Job.objects.get(id=response.json()["id"])
    assert job.status == JobStatus.COMPLETED, job.error
    assert smtp_server.senders == ["reports@tenant.example"]
    headers = smtp_server.headers()
    assert "From: Reports <reports@tenant.example>" in headers
    assert "Reply-To: Help <help@tenant.example>" in headers


def test_a_sender_not_allowed_when_the_job_runs_goes_out_as_reply_to(
    smtp_server: SMTPServer,
) -> None:
    # Enqueued before the policy (or before the setting changed): the handler never sends
    # from it. The default sender sends; the requested address is where replies go.
    assert run_sync("email", {**email_job()["payload"], "from": "Bank <ceo@bank.example>"}) == {
        "sent": 1
    }
    assert smtp_server.senders == ["jobs@service.example"]
    headers = smtp_server.headers()
    assert "From: Jobs <jobs@service.example>" in headers
    assert "Reply-To: Bank <ceo@bank.example>" in headers


def test_an_explicit_reply_to_wins_over_the_refused_sender(smtp_server: SMTPServer) -> None:
    payload = {**email_job()["payload"], "from": "ceo@bank.example", "replyTo": "a@tenant.example"}
    assert run_sync("email", payload) == {"sent": 1}
    assert smtp_server.senders == ["jobs@service.example"]
    headers = smtp_server.headers()
    assert "Reply-To: a@tenant.example" in headers
    assert not any("ceo@bank.example" in line for line in headers)


# --- recipient budget ---------------------------------------------------------------------------


def test_a_batch_over_the_recipient_budget_is_refused_whole(
    client: Client,
    api_key: str,
    other_api_key: str,
    settings: Any,
    redis_client: Any,
    redis_prefix: str,
) -> None:
    set_jobs(settings, EMAIL_RECIPIENTS_PER_HOUR=120)
    first = {"jobs": [email_job(to=addresses(50)), email_job(to=addresses(50)), SLEEP]}
    assert post(client, "/jobs/batch", first, api_key).status_code == 201

    over = {"jobs": [email_job(to=addresses(10)), email_job(to=addresses(11))]}
    refused = post(client, "/jobs/batch", over, api_key)
    body = assert_error(refused, 429, "Email recipient budget exceeded")
    details = body["details"]
    assert details["recipientsPerHour"] == 120
    assert details["recipients"] == 21 and details["remaining"] == 20
    # The first batch's recipients leave the window an hour after it was accepted.
    assert 3_500_000 < details["retryAfterMs"] <= 3_600_000
    assert 3500 < int(refused["Retry-After"]) <= 3600
    assert Job.objects.filter(tenant_id="tenant-1").count() == 3

    # What is left still fits, exactly.
    rest = {"jobs": [email_job(to=addresses(20))]}
    assert post(client, "/jobs/batch", rest, api_key).status_code == 201
    assert Job.objects.filter(tenant_id="tenant-1").count() == 4
    # Counted in Redis, under the deployment's prefix, and expiring.
    key = Keys(redis_prefix).email_recipients("tenant-1")
    assert int(redis_client.get(f"{key}:total")) == 120
    assert 0 < redis_client.pttl(key) <= 3_600_000

    # Another tenant has a budget of its own.
    theirs = {"jobs": [email_job(to=addresses(50)), email_job(to=addresses(50))]}
    assert post(client, "/jobs/batch", theirs, other_api_key).status_code == 201
    assert int(redis_client.get(Keys(redis_prefix).email_recipients_total("tenant-2"))) == 100


@pytest.fixture
async def event_loop_api(api_key: str, settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The production path (psycopg's async pool, redis-py's asyncio client), as in
    tests/jobs/test_api_event_loop.py."""
    set_jobs(settings, API_STORE="postgres")
    async with asgi_api(api_key) as client:
        yield client


@pytest.mark.django_db(transaction=True)
async def test_the_event_loop_path_spends_the_same_budget(
    event_loop_api: httpx.AsyncClient, settings: Any
) -> None:
    set_jobs(settings, EMAIL_RECIPIENTS_PER_HOUR=10)
    api = event_loop_api
    batch = {"jobs": [email_job(to=addresses(4)), SLEEP, email_job(to=addresses(3))]}
    assert (await api.post("/jobs/batch", json=batch)).status_code == 201
    keyed = {"Idempotency-Key": "k1"}
    response = await api.post("/jobs", json=email_job(to=addresses(2)), headers=keyed)
    assert response.status_code == 201
    replay = await api.post("/jobs", json=email_job(to=addresses(2)), headers=keyed)
    assert replay.status_code == 200
    refused = await api.post("/jobs", json=email_job(to=addresses(2)))
    assert refused.status_code == 429
    assert refused.json()["details"]["remaining"] == 1
    refused = await api.post("/jobs/batch", json={"jobs": [email_job(), email_job()]})
    assert refused.status_code == 429
    assert (await api.post("/jobs", json=email_job())).status_code == 201
    assert await Job.objects.filter(type="email").acount() == 4


def test_single_email_jobs_spend_the_budget_and_other_types_do_not(
    client: Client, api_key: str, settings: Any
) -> None:
    set_jobs(settings, EMAIL_RECIPIENTS_PER_HOUR=3)
    assert post(client, "/jobs", email_job(to=addresses(2)), api_key).status_code == 201
    assert {post(client, "/jobs", SLEEP, api_key).status_code for _ in range(5)} == {201}
    assert_error(post(client, "/jobs", email_job(to=addresses(2)), api_key), 429)
    assert post(client, "/jobs", email_job(to=addresses(1)), api_key).status_code == 201
    assert_error(post(client, "/jobs", email_job(), api_key), 429)
    assert Job.objects.filter(type="email").count() == 2


def test_an_idempotent_replay_spends_nothing(client: Client, api_key: str, settings: Any) -> None:
    set_jobs(settings, EMAIL_RECIPIENTS_PER_HOUR=2)
    job = email_job(to=addresses(2))
    first = post(client, "/jobs", job, api_key, **{"Idempotency-Key": "k1"})
    assert first.status_code == 201
    replay = post(client, "/jobs", job, api_key, **{"Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    assert_error(post(client, "/jobs", job, api_key, **{"Idempotency-Key": "k2"}), 429)


def test_a_request_larger_than_the_whole_budget_is_413(
    client: Client, api_key: str, settings: Any
) -> None:
    # Waiting would never let it through: not a 429.
    set_jobs(settings, EMAIL_RECIPIENTS_PER_HOUR=50)
    batch = {"jobs": [email_job(to=addresses(50)), email_job(to=addresses(1))]}
    body = assert_error(post(client, "/jobs/batch", batch, api_key), 413)
    assert body["details"] == {"recipients": 51, "recipientsPerHour": 50}
    assert Job.objects.count() == 0


def test_zero_is_unlimited(client: Client, api_key: str, settings: Any) -> None:
    set_jobs(settings, EMAIL_RECIPIENTS_PER_HOUR=0)
    batch = {"jobs": [email_job(to=addresses(50))] * 40}
    assert post(client, "/jobs/batch", batch, api_key).status_code == 201


def test_recipients_older_than_an_hour_no_longer_count(
    client: Client, api_key: str, settings: Any, redis_client: Any, redis_prefix: str
) -> None:
    set_jobs(settings, EMAIL_RECIPIENTS_PER_HOUR=10)
    assert post(client, "/jobs", email_job(to=addresses(10)), api_key).status_code == 201
    assert_error(post(client, "/jobs", email_job(), api_key), 429)
    # An hour (and a millisecond) passes for that request: its entry in the window ages.
    key = Keys(redis_prefix).email_recipients("tenant-1")
    (member,) = redis_client.zrange(key, 0, -1)
    redis_client.zadd(key, {member: time.time() * 1000 - 3_600_001})
    assert post(client, "/jobs", email_job(to=addresses(10)), api_key).status_code == 201


def test_retrying_an_email_job_spends_the_budget_again(
    client: Client, api_key: str, settings: Any
) -> None:
    # A retry sends the message again, to every recipient.
    set_jobs(settings, EMAIL_RECIPIENTS_PER_HOUR=3)
    job_id = post(client, "/jobs", email_job(to=addresses(3)), api_key).json()["id"]
    Job.objects.filter(id=job_id).update(status=JobStatus.FAILED, error="boom")
    body = assert_error(post(client, f"/jobs/{job_id}/retry", {}, api_key), 429)
    assert body["details"]["recipients"] == 3
    assert Job.objects.get(id=job_id).status == JobStatus.FAILED


# --- header fields ------------------------------------------------------------------------------


HEADER_FIELDS = {
    # field as the error names it: the payload change that puts `ch` into that header
    "subject": lambda ch: {"subject": f"Hello{ch}X-Injected: yes"},
    "to": lambda ch: {"to": f"Alice{ch}X-Injected: yes <alice@example.com>"},
    "to.1": lambda ch: {"to": ["bob@example.com", f"Alice{ch}X-Injected: yes <a@example.com>"]},
    "from": lambda ch: {"from": f"Jobs{ch}X-Injected: yes <jobs@service.example>"},
    "replyTo": lambda ch: {"replyTo": f"Help{ch}X-Injected: yes <help@example.com>"},
}


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
@pytest.mark.parametrize("ch", BREAKS_AND_NUL, ids=char_id)
def test_line_separators_are_refused_in_every_header_field(
    client: Client, api_key: str, field: str, ch: str
) -> None:
    response = post(client, "/jobs", email_job(**HEADER_FIELDS[field](ch)), api_key)
    body = assert_error(response, 400, "Validation failed")
    (detail,) = body["details"]
    assert detail["field"] == f"payload.{field}"
    assert "line breaks" in detail["message"]
    assert Job.objects.count() == 0


@pytest.mark.parametrize("ch", ["\x0b", "\x1e", "\x85", "\u2028"], ids=char_id)
@pytest.mark.parametrize("field", ["subject", "to", "from_address"])
def test_the_handler_refuses_a_header_field_that_skipped_validation(
    smtp_server: SMTPServer, field: str, ch: str
) -> None:
    values: dict[str, Any] = {
        "to": ["a@example.com"],
        "subject": "Hello",
        "body": "b",
        "from_address": "jobs@service.example",
    }
    injected = {
        "subject": f"Hello{ch}Reply-To : evil@attacker.example",
        "to": [f"Alice{ch}Reply-To : evil@attacker.example <a@example.com>"],
        "from_address": f"Jobs{ch}Reply-To : evil@attacker.example <jobs@service.example>",
    }
    payload = EmailPayload.model_construct(**{**values, field: injected[field]})
    with pytest.raises(PermanentError, match="line break"):
        send_email(payload, make_ctx("email"))
    assert smtp_server.messages == [] and smtp_server.senders == []


@pytest.mark.django_db(transaction=True)
def test_a_stored_job_with_an_injected_header_fails_and_nothing_reaches_the_server(
    tenant: Tenant, smtp_server: SMTPServer
) -> None:
    # Stored before these checks (services take payloads the API has already validated).
    injected = {"to": "a@example.com", "subject": "Hi\x0bReply-To : evil@attacker.example"}
    bad, _ = job_enqueue(
        tenant=tenant, spec=JobSpec(type="email", payload={**injected, "body": "b"})
    )
    good, _ = job_enqueue(tenant=tenant, spec=JobSpec(type="email", payload=email_job()["payload"]))
    run_burst()
    bad.refresh_from_db()
    good.refresh_from_db()
    assert bad.status == JobStatus.FAILED
    assert "line breaks" in (bad.error or "")
    assert good.status == JobStatus.COMPLETED
    assert len(smtp_server.messages) == 1
    assert not any(line.lower().startswith("reply-to") for line in smtp_server.headers())
    assert not any("attacker" in message for message in smtp_server.messages)
