"""Signed webhooks (Standard Webhooks), checked the way a receiver checks them: with the
`standardwebhooks` package, on requests a real local HTTP server received. The handler alone,
then the worker (which gives the handler the tenant's live secrets) through retries and a
rotation, and the worker's secret cache."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from django.db import connection
from django.utils import timezone
from pydantic import ValidationError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from jobs.handlers import JobContext
from jobs.models import Job, JobStatus, SigningSecret, Tenant
from jobs.selectors import signing_secrets_live
from jobs.services import JobSpec, job_enqueue, signing_secret_rotate, tenant_create
from jobs.signing import SecretCache, new_secret, secret_cache
from tests.support.handlers import (
    error_messages,
    make_ctx,
    run_async,
    validate,
)
from tests.support.webhook_server import Recorded, Reply, WebhookServer
from tests.support.worker import run_burst

# The worker's secret cache lives per process; tests reuse tenant ids with new secrets.
pytestmark = pytest.mark.usefixtures("fresh_secret_cache")

T = TypeVar("T")


@pytest.fixture
def fast_retries(settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "RETRY_BASE_MS": 20, "RETRY_MAX_MS": 100}


def signed_ctx(*secrets: str) -> JobContext:
    """A first attempt's context with `secrets` as the tenant's live ones (the worker's part)."""
    return dataclasses.replace(make_ctx("webhook"), signing_secrets=secrets)


def verify(secret: str, request: Recorded) -> Any:
    """What a receiver holding `secret` accepts of `request` (raises WebhookVerificationError)."""
    return Webhook(secret).verify(request.body, request.headers, json_parse=False)


def signatures(request: Recorded) -> list[str]:
    return request.headers["webhook-signature"].split(" ")


async def in_thread(fn: Callable[..., T], **kwargs: Any) -> T:
    """`fn` in a thread of its own, whose database connection is closed afterwards."""

    def call() -> T:
        try:
            return fn(**kwargs)
        finally:
            connection.close()

    return await asyncio.to_thread(call)


def live_secret(tenant: Tenant) -> str:
    ((secret, _expires),) = signing_secrets_live(tenant_id=tenant.id)
    return secret


# --- the handler ----------------------------------------------------------------------------------


async def test_request_is_signed_over_the_exact_body_and_verifies(
    allowed_receiver: WebhookServer,
) -> None:
    secret = new_secret()
    ctx = signed_ctx(secret)
    before = int(time.time())

    await run_async(
        "webhook", {"url": allowed_receiver.url(), "body": {"event": "done", "n": 1}}, ctx
    )

    (request,) = allowed_receiver.calls()
    assert request.body == b'{"event":"done","n":1}'
    assert Webhook(secret).verify(request.body, request.headers) == {"event": "done", "n": 1}
    assert request.headers["webhook-id"] == f"msg_{ctx.job_id}"
    assert before <= int(request.headers["webhook-timestamp"]) <= int(time.time())
    assert len(signatures(request)) == 1 and signatures(request)[0].startswith("v1,")


async def test_a_wrong_secret_or_a_changed_body_fails_verification(
    allowed_receiver: WebhookServer,
) -> None:
    secret = new_secret()
    await run_async(
        "webhook", {"url": allowed_receiver.url(), "body": {"amount": 10}}, signed_ctx(secret)
    )
    (request,) = allowed_receiver.calls()

    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verify(new_secret(), request)
    tampered = Recorded(request.method, request.path, request.headers, b'{"amount":1000}')
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verify(secret, tampered)
    verify(secret, request)  # the control: the untouched request passes


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_a_request_without_body_signs_the_empty_string(
    allowed_receiver: WebhookServer, method: str
) -> None:
    secret = new_secret()
    await run_async(
        "webhook", {"url": allowed_receiver.url(), "method": method}, signed_ctx(secret)
    )
    (request,) = allowed_receiver.calls()
    assert request.body == b""
    verify(secret, request)


async def test_every_live_secret_signs(allowed_receiver: WebhookServer) -> None:
    new, old = new_secret(), new_secret()
    await run_async("webhook", {"url": allowed_receiver.url(), "body": [1]}, signed_ctx(new, old))
    (request,) = allowed_receiver.calls()
    assert len(signatures(request)) == 2
    verify(new, request)
    verify(old, request)


async def test_each_redirect_hop_is_signed_for_the_bytes_it_sends(
    allowed_receiver: WebhookServer,
) -> None:
    secret = new_secret()
    allowed_receiver.statuses["/redirect"] = [Reply(303, body=b"", headers={"Location": "/final"})]
    ctx = signed_ctx(secret)
    await run_async("webhook", {"url": allowed_receiver.url("/redirect"), "body": {"a": 1}}, ctx)

    first, second = allowed_receiver.calls()
    assert (first.method, first.body, second.method, second.body) == (
        "POST",
        b'{"a":1}',
        "GET",
        b"",
    )
    for request in (first, second):
        verify(secret, request)
        assert request.headers["webhook-id"] == f"msg_{ctx.job_id}"


@pytest.mark.parametrize("name", ["webhook-id", "Webhook-Timestamp", "WEBHOOK-SIGNATURE"])
def test_a_tenant_cannot_set_the_signature_headers(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate("webhook", {"url": "https://example.com/hook", "headers": {name: "forged"}})
    assert f"header {name!r} may not be set" in error_messages(info.value)


# --- the worker ---------------------------------------------------------------------------------


def enqueue_webhook(tenant: Tenant, url: str, **kwargs: Any) -> Job:
    spec = JobSpec(type="webhook", payload={"url": url, "body": {"n": 1}}, **kwargs)
    job, _ = job_enqueue(tenant=tenant, spec=spec)
    return job


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("fast_retries")
def test_retries_of_one_job_carry_the_same_webhook_id(allowed_receiver: WebhookServer) -> None:
    tenant = tenant_create(tenant_id="acme")
    secret = live_secret(tenant)
    allowed_receiver.statuses["/flaky"] = [500, 200]
    job = enqueue_webhook(tenant, allowed_receiver.url("/flaky"), max_attempts=3)

    run_burst()

    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED and job.attempts == 2
    first, second = allowed_receiver.calls("/flaky")
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == f"msg_{job.id}"
    for request in (first, second):
        assert verify(secret, request) is None


@pytest.mark.django_db(transaction=True)
def test_after_a_rotation_both_secrets_verify_until_the_old_one_expires(
    allowed_receiver: WebhookServer,
) -> None:
    tenant = tenant_create(tenant_id="acme")
    old = live_secret(tenant)
    new = signing_secret_rotate(tenant=tenant).secret.secret

    enqueue_webhook(tenant, allowed_receiver.url("/during"))
    run_burst()
    (during,) = allowed_receiver.calls("/during")
    assert len(signatures(during)) == 2
    verify(new, during)
    verify(old, during)

    # The overlap ends (as if 24 hours had passed); a fresh worker process reads the secrets.
    SigningSecret.objects.filter(secret=old).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    secret_cache.clear()
    enqueue_webhook(tenant, allowed_receiver.url("/after"))
    run_burst()
    (after,) = allowed_receiver.calls("/after")
    assert len(signatures(after)) == 1
    verify(new, after)
    with pytest.raises(WebhookVerificationError):
        verify(old, after)


@pytest.mark.django_db(transaction=True)
def test_a_tenant_without_a_secret_gets_unsigned_requests_and_a_warning(
    allowed_receiver: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    tenant = Tenant.objects.create(id="legacy")  # not through tenant_create: no secret
    job = enqueue_webhook(tenant, allowed_receiver.url())

    with caplog.at_level(logging.WARNING, logger="jobs.signing"):
        run_burst()

    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    (request,) = allowed_receiver.calls()
    assert request.headers["webhook-id"] == f"msg_{job.id}"
    assert "webhook-signature" not in request.headers
    assert any("no live signing secret" in r.getMessage() for r in caplog.records)


# --- the worker's secret cache ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_rotation_reaches_a_cache_within_its_ttl() -> None:
    tenant = await in_thread(tenant_create, tenant_id="acme")
    cache = SecretCache(ttl_s=0.5)
    (old,) = await cache.live("acme")

    rotated = await in_thread(signing_secret_rotate, tenant=tenant)
    rotated_at = time.monotonic()
    assert await cache.live("acme") == (old,)  # still the cached read
    while (live := await cache.live("acme")) == (old,):
        assert time.monotonic() - rotated_at < 3, "the rotation never reached the cache"
        await asyncio.sleep(0.05)
    assert live == (rotated.secret.secret, old)


@pytest.mark.django_db(transaction=True)
async def test_a_cached_secret_stops_signing_at_its_expiry_without_a_reload(
    settings: Any,
) -> None:
    settings.JOBS = {**settings.JOBS, "WEBHOOK_SECRET_OVERLAP_S": 2}
    tenant = await in_thread(tenant_create, tenant_id="acme")
    rotated = await in_thread(signing_secret_rotate, tenant=tenant)
    cache = SecretCache(ttl_s=3600)
    new, old = await cache.live("acme")
    assert new == rotated.secret.secret and old != new

    assert rotated.previous_expires_at is not None
    wait_s = (rotated.previous_expires_at - timezone.now()).total_seconds() + 0.05
    await asyncio.sleep(max(0.0, wait_s))  # the clock itself is what is waited for
    assert await cache.live("acme") == (new,)


def test_new_secrets_are_standard_webhooks_secrets_of_32_bytes() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    Webhook(secret)  # the reference library accepts it
    assert new_secret() != secret
