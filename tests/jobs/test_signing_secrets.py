"""Webhook signing secrets: made with the tenant, rotated through `POST /signing-secrets/rotate`
(and the service behind it) with an overlap during which the previous secret keeps signing."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.utils import timezone
from standardwebhooks import Webhook

from jobs.models import SigningSecret, Tenant
from jobs.selectors import signing_secrets_live
from jobs.services import api_key_create, signing_secret_rotate, tenant_create
from tests.support.api import assert_error, post

pytestmark = pytest.mark.django_db

SECRET_PATTERN = re.compile(r"whsec_[A-Za-z0-9+/]{43}=")
ROTATE = "/signing-secrets/rotate"


def live(tenant: Tenant) -> list[str]:
    return [secret for secret, _ in signing_secrets_live(tenant_id=tenant.id)]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.fixture
def acme() -> tuple[Tenant, str]:
    """A tenant made as operators make them (with its first secret), and a key of it."""
    tenant = tenant_create(tenant_id="acme")
    return tenant, api_key_create(tenant=tenant)[1]


def test_a_new_tenant_has_one_live_secret_in_the_standard_format(acme: tuple[Tenant, str]) -> None:
    tenant, _ = acme
    (secret,) = live(tenant)
    assert SECRET_PATTERN.fullmatch(secret)
    Webhook(secret)  # the reference library accepts it
    row = SigningSecret.objects.get(tenant=tenant)
    assert row.expires_at is None
    assert secret not in str(row) and secret not in repr(row)


def test_rotate_answers_the_new_secret_and_the_old_one_signs_for_24_hours(
    acme: tuple[Tenant, str],
) -> None:
    tenant, key = acme
    (old,) = live(tenant)

    # Served by Django's full handler (not the API's lean one): no CSRF token is asked for.
    response = post(Client(enforce_csrf_checks=True), ROTATE, None, key)

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {"secret", "createdAt", "previousExpiresAt"}
    assert SECRET_PATTERN.fullmatch(body["secret"]) and body["secret"] != old
    expires = parse_time(body["previousExpiresAt"])
    expected = parse_time(body["createdAt"]) + timedelta(hours=24)
    assert abs(expires - expected) < timedelta(seconds=2)
    assert live(tenant) == [body["secret"], old]  # newest first: both sign now
    assert SigningSecret.objects.get(secret=body["secret"]).expires_at is None
    old_expires_at = SigningSecret.objects.get(secret=old).expires_at
    assert abs(old_expires_at - expires) < timedelta(milliseconds=1)  # the wire has ms
    # Once the overlap is over only the new one signs.
    after = signing_secrets_live(tenant_id=tenant.id, now=old_expires_at)
    assert [secret for secret, _ in after] == [body["secret"]]


def test_rotate_without_a_key_is_401(client: Client, acme: tuple[Tenant, str]) -> None:
    tenant, _ = acme
    before = live(tenant)
    assert_error(post(client, ROTATE, None, None), 401, "Missing or invalid API key")
    assert_error(post(client, ROTATE, None, "jq_000000000000_nope"), 401)
    assert live(tenant) == before


def test_rotate_leaves_other_tenants_secrets_alone(
    client: Client, acme: tuple[Tenant, str]
) -> None:
    _, key = acme
    other = tenant_create(tenant_id="other")
    before = list(SigningSecret.objects.filter(tenant=other).values_list("secret", "expires_at"))

    assert post(client, ROTATE, None, key).status_code == 201

    after = list(SigningSecret.objects.filter(tenant=other).values_list("secret", "expires_at"))
    assert after == before and before[0][1] is None


def test_rotate_spends_the_rate_limit(client: Client, acme: tuple[Tenant, str]) -> None:
    tenant, key = acme
    tenant.rate_limit = 1
    tenant.save()

    assert post(client, ROTATE, None, key).status_code == 201
    refused = post(client, ROTATE, None, key)

    assert_error(refused, 429, "Rate limit exceeded")
    assert int(refused["Retry-After"]) >= 1
    assert SigningSecret.objects.filter(tenant=tenant).count() == 2  # the refused one made none


def test_a_second_rotation_does_not_extend_the_first_overlap(
    acme: tuple[Tenant, str], settings: Any
) -> None:
    tenant, _ = acme
    (first,) = live(tenant)
    settings.JOBS = {**settings.JOBS, "WEBHOOK_SECRET_OVERLAP_S": 60}
    one = signing_secret_rotate(tenant=tenant)
    first_ends = SigningSecret.objects.get(secret=first).expires_at
    settings.JOBS = {**settings.JOBS, "WEBHOOK_SECRET_OVERLAP_S": 3600}

    two = signing_secret_rotate(tenant=tenant)

    assert live(tenant) == [two.secret.secret, one.secret.secret, first]
    assert SigningSecret.objects.get(secret=first).expires_at == first_ends
    assert abs(one.previous_expires_at - timezone.now() - timedelta(seconds=60)) < timedelta(
        seconds=5
    )
    # The last previous secret (the first rotation's) now signs for the new overlap.
    assert two.previous_expires_at == SigningSecret.objects.get(secret=one.secret.secret).expires_at
    assert two.previous_expires_at - first_ends > timedelta(minutes=50)


def test_a_tenant_without_a_live_secret_gets_no_previous_expiry(tenant: Tenant) -> None:
    rotated = signing_secret_rotate(tenant=tenant)
    assert rotated.previous_expires_at is None
    assert live(tenant) == [rotated.secret.secret]


def test_rotate_is_in_the_openapi_schema(client: Client) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/signing-secrets/rotate"]["post"]
    assert operation["tags"] == ["webhooks"]
    assert {"201", "401", "429"} <= set(operation["responses"])
    ref = operation["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
    properties = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert set(properties) == {"secret", "createdAt", "previousExpiresAt"}


@pytest.mark.django_db(transaction=True)
def test_the_migration_gives_every_existing_tenant_a_secret() -> None:
    executor = MigrationExecutor(connection)
    before, after = [("jobs", "0004_job_cursor")], [("jobs", "0005_signing_secret")]
    executor.migrate(before)
    old_state = executor.loader.project_state(before).apps
    old_state.get_model("jobs", "Tenant").objects.create(id="older", name="Older")

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(after)

    try:
        ((secret, expires_at),) = signing_secrets_live(tenant_id="older")
        assert SECRET_PATTERN.fullmatch(secret) and expires_at is None
    finally:
        # Back to the latest schema: the tests after this one need the later migrations.
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
