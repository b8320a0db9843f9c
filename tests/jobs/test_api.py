"""The REST API on the real database and Redis: contract, errors, tenancy, pagination. What the
services behind it do (idempotency, queueing, cancel and retry, keys) is tested without HTTP in
tests/jobs/test_services.py and tests/jobs/test_selectors.py."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import Client

from jobs.models import Job, JobStatus, Tenant
from jobs.services import api_key_create, api_key_revoke
from tests.support.api import SLEEP, assert_error, get, post

pytestmark = pytest.mark.django_db


def test_health_needs_no_key(client: Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None


def test_ready_reports_database_and_redis(client: Client) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_create_job_returns_camel_case_job(client: Client, api_key: str) -> None:
    response = post(client, "/jobs", {**SLEEP, "priority": 3, "maxAttempts": 5}, api_key)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["jobId"] == body["id"]
    assert body["tenantId"] == "tenant-1"
    assert body["status"] == "PENDING"
    assert body["priority"] == 3
    assert body["maxAttempts"] == 5
    assert body["attempts"] == 0
    assert body["payload"] == {"delayMs": 10}
    for field in ("runAt", "createdAt", "updatedAt"):
        assert body[field].endswith("Z")
    assert body["startedAt"] is None and body["finishedAt"] is None
    job = Job.objects.get(id=body["id"])
    assert job.tenant_id == "tenant-1"


def test_delay_ms_sets_run_at_that_far_ahead(client: Client, api_key: str) -> None:
    before = datetime.now(UTC)
    response = post(client, "/jobs", {**SLEEP, "delayMs": 60_000}, api_key)
    assert response.status_code == 201
    run_at = datetime.fromisoformat(response.json()["runAt"])
    # runAt may be sent at millisecond precision: a second of slack below.
    assert before + timedelta(seconds=59) <= run_at <= datetime.now(UTC) + timedelta(seconds=60)


def test_tenant_id_in_body_must_match_key(
    client: Client, api_key: str, other_tenant: Tenant
) -> None:
    assert post(client, "/jobs", {**SLEEP, "tenantId": "tenant-1"}, api_key).status_code == 201
    body = assert_error(post(client, "/jobs", {**SLEEP, "tenantId": "tenant-2"}, api_key), 403)
    assert "tenantId" in body["error"]
    assert Job.objects.count() == 1


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Bearer nope", "Basic abc", "Bearer jq_000000000000_wrong"],
)
def test_missing_or_bad_key_is_401(client: Client, tenant: Tenant, header: str | None) -> None:
    extra = {"HTTP_AUTHORIZATION": header} if header else {}
    response = client.post("/jobs", json.dumps(SLEEP), content_type="application/json", **extra)
    assert_error(response, 401)
    assert response["WWW-Authenticate"] == "Bearer"
    assert Job.objects.count() == 0


def test_revoked_key_and_inactive_tenant_are_refused(
    client: Client, api_key: str, tenant: Tenant
) -> None:
    assert get(client, "/jobs", api_key).status_code == 200
    tenant.is_active = False
    tenant.save()
    assert_error(get(client, "/jobs", api_key), 401)
    tenant.is_active = True
    tenant.save()
    api_key_revoke(prefix=api_key.split("_")[1])
    assert_error(get(client, "/jobs", api_key), 401)


def test_other_tenants_job_is_404_everywhere(
    client: Client, api_key: str, other_api_key: str
) -> None:
    job_id = post(client, "/jobs", SLEEP, other_api_key).json()["id"]
    assert_error(get(client, f"/jobs/{job_id}", api_key), 404)
    assert_error(post(client, f"/jobs/{job_id}/cancel", {}, api_key), 404)
    assert_error(post(client, f"/jobs/{job_id}/retry", {}, api_key), 404)
    assert get(client, "/jobs", api_key).json()["total"] == 0
    assert get(client, f"/jobs/{job_id}", other_api_key).status_code == 200


def test_unknown_job_and_bad_id(client: Client, api_key: str) -> None:
    assert_error(get(client, f"/jobs/{uuid.uuid4()}", api_key), 404)
    assert get(client, "/jobs/not-a-uuid", api_key).status_code in (400, 404)


def test_list_is_newest_first_stable_and_paginated(client: Client, api_key: str) -> None:
    ids = [post(client, "/jobs", SLEEP, api_key).json()["id"] for _ in range(5)]
    post(client, "/jobs/batch", {"jobs": [SLEEP] * 3}, api_key)
    all_jobs = get(client, "/jobs", api_key, limit=100).json()
    assert all_jobs["total"] == 8
    listed = [job["id"] for job in all_jobs["jobs"]]
    assert listed[3:] == list(reversed(ids))
    created = [job["createdAt"] for job in all_jobs["jobs"]]
    assert created == sorted(created, reverse=True)
    pages = []
    for offset in range(0, 8, 3):
        page = get(client, "/jobs", api_key, limit=3, offset=offset).json()
        assert page["limit"] == 3 and page["offset"] == offset and page["total"] == 8
        pages.extend(job["id"] for job in page["jobs"])
    assert pages == listed


def test_list_filters_by_status_and_type(client: Client, api_key: str, tenant: Tenant) -> None:
    post(client, "/jobs", SLEEP, api_key)
    post(
        client,
        "/jobs",
        {"type": "data_processing", "payload": {"values": [1, 2], "operations": ["sum"]}},
        api_key,
    )
    Job.objects.filter(type="sleep").update(status=JobStatus.FAILED)
    failed = get(client, "/jobs", api_key, status="FAILED").json()
    assert [job["type"] for job in failed["jobs"]] == ["sleep"]
    by_type = get(client, "/jobs", api_key, type="data_processing").json()
    assert by_type["total"] == 1 and by_type["jobs"][0]["status"] == "PENDING"


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": "abc"},
        {"offset": -1},
        {"status": "DONE"},
        {"limit": "9" * 50},
    ],
)
def test_bad_list_query_is_400(client: Client, api_key: str, params: dict) -> None:
    body = assert_error(get(client, "/jobs", api_key, **params), 400, "Validation failed")
    assert body["details"] and all("field" in d and "message" in d for d in body["details"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"payload": {}}, "type"),
        ({"type": "nope", "payload": {}}, "type"),
        ({"type": "sleep"}, "payload"),
        ({"type": "sleep", "payload": []}, "payload"),
        ({"type": "sleep", "payload": {"delayMs": -1}}, "payload.delayMs"),
        ({"type": "sleep", "payload": {"delayMs": "soon"}}, "payload.delayMs"),
        ({"type": "sleep", "payload": {"delayMs": 10**30}}, "payload.delayMs"),
        ({**SLEEP, "priority": 11}, "priority"),
        ({**SLEEP, "priority": 10**40}, "priority"),
        ({**SLEEP, "priority": True}, "priority"),
        ({**SLEEP, "maxAttempts": "3"}, "maxAttempts"),
        ({**SLEEP, "maxAttempts": 0}, "maxAttempts"),
        ({**SLEEP, "maxAttempts": 1000}, "maxAttempts"),
        ({**SLEEP, "delayMs": -5}, "delayMs"),
        ({**SLEEP, "runAt": "tomorrow"}, "runAt"),
        ({**SLEEP, "runAt": "2030-01-01T00:00:00"}, "runAt"),
        # Outside what Python and the database hold once in UTC (year 0 and year 10000): such
        # a row used to be stored, then break every read of it, the worker's included.
        ({**SLEEP, "runAt": "0001-01-01T00:00:00+14:00"}, "runAt"),
        ({**SLEEP, "runAt": "9999-12-31T23:59:59-14:00"}, "runAt"),
        ({**SLEEP, "runAt": "9999-12-31T23:59:59-23:59"}, "runAt"),
        ({**SLEEP, "runAt": "1969-12-31T23:59:59Z"}, "runAt"),
        ({**SLEEP, "runAt": "2300-01-01T00:00:00Z"}, "runAt"),
        ({**SLEEP, "unknownField": 1}, "unknownField"),
        ({**SLEEP, "tenantId": "bad tenant!"}, "tenantId"),
        (
            {"type": "email", "payload": {"to": "not-an-address", "subject": "s", "body": "b"}},
            "payload.to",
        ),
        ({"type": "webhook", "payload": {"url": "ftp://example.com/"}}, "payload.url"),
        (
            {"type": "data_processing", "payload": {"values": [1], "operations": ["mode"]}},
            "payload.operations",
        ),
    ],
)
def test_invalid_job_is_400_with_field_details(
    client: Client, api_key: str, body: dict, field: str
) -> None:
    response = assert_error(post(client, "/jobs", body, api_key), 400, "Validation failed")
    fields = [d["field"] for d in response["details"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), fields
    assert Job.objects.count() == 0


def test_run_at_in_the_past_runs_now_and_is_kept_in_utc(client: Client, api_key: str) -> None:
    response = post(client, "/jobs", {**SLEEP, "runAt": "2020-01-01T02:00:00+02:00"}, api_key)
    assert response.status_code == 201, response.content
    assert response.json()["runAt"] == "2020-01-01T00:00:00Z"


@pytest.mark.parametrize("token", ["jq_\x00abc_x", "jq_0123456789ab_\x00" + "a" * 40, "jq_%00"])
def test_odd_characters_in_a_key_are_401_not_500(client: Client, token: str) -> None:
    response = client.get("/jobs", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert_error(response, 401, "Missing or invalid API key")


def test_run_at_and_delay_together_is_400(client: Client, api_key: str) -> None:
    body = {**SLEEP, "delayMs": 5, "runAt": "2030-01-01T00:00:00Z"}
    assert_error(post(client, "/jobs", body, api_key), 400, "Validation failed")


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b"[1, 2]", b'"string"', b"null", b'{"type": NaN}', b"1e999999"],
)
def test_malformed_json_is_400(client: Client, api_key: str, raw: bytes) -> None:
    assert_error(post(client, "/jobs", raw, api_key), 400)
    assert Job.objects.count() == 0


def test_deep_nesting_is_400(client: Client, api_key: str) -> None:
    deep: Any = {"delayMs": 1}
    for _ in range(100):
        deep = {"x": deep}
    assert_error(post(client, "/jobs", {"type": "sleep", "payload": deep}, api_key), 400)
    very_deep = "[" * 100_000 + "]" * 100_000
    assert_error(post(client, "/jobs", very_deep, api_key), 400)


def test_wrong_content_type_is_415(client: Client, api_key: str) -> None:
    response = client.post(
        "/jobs",
        "type=sleep",
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=f"Bearer {api_key}",
    )
    assert_error(response, 415)


def test_payload_too_large_is_413(client: Client, api_key: str, settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "MAX_PAYLOAD_BYTES": 1000}
    body = {"type": "email", "payload": {"to": "a@example.com", "subject": "s", "body": "x" * 2000}}
    response = assert_error(post(client, "/jobs", body, api_key), 413, "Payload too large")
    assert response["details"]["maxBytes"] == 1000


def test_body_too_large_is_413(client: Client, api_key: str, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    body = {"type": "email", "payload": {"to": "a@example.com", "subject": "s", "body": "x" * 5000}}
    assert_error(post(client, "/jobs", body, api_key), 413, "Request body too large")


def test_unknown_path_is_json_404(client: Client) -> None:
    response = client.get("/nope")
    assert response.status_code == 404


def test_openapi_and_docs_are_served_locally(client: Client) -> None:
    schema = client.get("/openapi.json").json()
    assert "/jobs" in schema["paths"] and "/jobs/{job_id}" in schema["paths"]
    job_in = schema["components"]["schemas"]["JobIn"]["properties"]
    assert "maxAttempts" in job_in and "runAt" in job_in
    docs = client.get("/docs")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "cdn." not in html and "unpkg" not in html


def test_idempotency_key_returns_original_or_409(client: Client, api_key: str) -> None:
    first = post(client, "/jobs", SLEEP, api_key, **{"Idempotency-Key": "abc"})
    assert first.status_code == 201
    again = post(client, "/jobs", SLEEP, api_key, **{"Idempotency-Key": "abc"})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    different = post(
        client, "/jobs", {**SLEEP, "priority": 2}, api_key, **{"Idempotency-Key": "abc"}
    )
    assert_error(different, 409)
    later = post(client, "/jobs", {**SLEEP, "delayMs": 5000}, api_key, **{"Idempotency-Key": "abc"})
    assert_error(later, 409)
    assert Job.objects.count() == 1


def test_batch_creates_all_or_nothing(client: Client, api_key: str) -> None:
    response = post(client, "/jobs/batch", {"jobs": [SLEEP] * 1000}, api_key)
    assert response.status_code == 201
    ids = response.json()["jobIds"]
    assert len(ids) == len(set(ids)) == 1000
    assert Job.objects.count() == 1000
    bad = [SLEEP] * 10
    bad[7] = {"type": "sleep", "payload": {"delayMs": "x"}}
    body = assert_error(post(client, "/jobs/batch", {"jobs": bad}, api_key), 400)
    assert any(d["field"].startswith("jobs.7.payload") for d in body["details"])
    assert Job.objects.count() == 1000
    assert_error(post(client, "/jobs/batch", {"jobs": [SLEEP] * 1001}, api_key), 400)
    assert_error(post(client, "/jobs/batch", {"jobs": []}, api_key), 400)


def test_cancel_and_retry_states(client: Client, api_key: str) -> None:
    job_id = post(client, "/jobs", SLEEP, api_key).json()["id"]
    cancelled = post(client, f"/jobs/{job_id}/cancel", {}, api_key)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
    assert_error(post(client, f"/jobs/{job_id}/cancel", {}, api_key), 409)
    retried = post(client, f"/jobs/{job_id}/retry", {}, api_key)
    assert retried.status_code == 200
    assert retried.json()["status"] == "PENDING" and retried.json()["attempts"] == 0
    assert_error(post(client, f"/jobs/{job_id}/retry", {}, api_key), 409)


def test_other_key_of_same_tenant_sees_jobs(client: Client, api_key: str, tenant: Tenant) -> None:
    job_id = post(client, "/jobs", SLEEP, api_key).json()["id"]
    _, second = api_key_create(tenant=tenant)
    assert get(client, f"/jobs/{job_id}", second).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_metrics_report_jobs_and_queue_depth(client: Client, api_key: str, settings: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    post(client, "/jobs/batch", {"jobs": [SLEEP] * 3}, api_key)
    post(client, "/jobs", {**SLEEP, "delayMs": 60_000}, api_key)
    settings.JOBS = {**settings.JOBS, "METRICS_TOKEN": "s3cret"}
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert response.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.content.decode())
        for s in family.samples
    }
    assert samples[("jobqueue_jobs", (("status", "PENDING"), ("type", "sleep")))] == 4
    assert samples[("jobqueue_queue_depth", (("state", "ready"),))] == 3
    assert samples[("jobqueue_queue_depth", (("state", "delayed"),))] == 1
    assert client.get("/metrics").status_code == 401


@pytest.mark.django_db(transaction=True)
def test_stats_show_the_tenants_queue_depth(
    client: Client, api_key: str, other_api_key: str
) -> None:
    post(client, "/jobs/batch", {"jobs": [SLEEP] * 4}, api_key)
    post(client, "/jobs", {**SLEEP, "delayMs": 60_000}, api_key)
    post(client, "/jobs/batch", {"jobs": [SLEEP] * 7}, other_api_key)
    Job.objects.filter(tenant_id="tenant-1").order_by("created_at").filter(
        id__in=Job.objects.filter(tenant_id="tenant-1", run_at__lte=datetime.now(UTC)).values("id")[
            :1
        ]
    ).update(status=JobStatus.RUNNING)
    body = get(client, "/stats", api_key).json()
    assert body["tenantId"] == "tenant-1"
    assert body["queue"] == {"ready": 4, "delayed": 1, "running": 1}
    assert body["jobs"]["PENDING"] == 4 and body["jobs"]["RUNNING"] == 1
    assert body["jobs"]["COMPLETED"] == 0
    assert get(client, "/stats", other_api_key).json()["queue"]["ready"] == 7


# --- messages a client can act on -----------------------------------------------------------
def test_a_bad_job_id_in_a_path_is_named_as_the_api_spells_it(client: Client, api_key: str) -> None:
    body = assert_error(get(client, "/jobs/not-a-uuid", api_key), 400, "Validation failed")
    assert body["details"] == [{"field": "jobId", "message": "must be a UUID"}]


def test_messages_carry_no_pydantic_prefix(client: Client, api_key: str) -> None:
    job = {"type": "email", "payload": {"to": ["nobody"], "subject": "s", "body": "b"}}
    body = assert_error(post(client, "/jobs", job, api_key), 400, "Validation failed")
    assert body["details"] == [
        {"field": "payload.to.0", "message": "not a valid email address: 'nobody'"}
    ]


def test_a_single_address_is_reported_at_the_field_itself(client: Client, api_key: str) -> None:
    job = {"type": "email", "payload": {"to": "nobody", "subject": "s", "body": "b"}}
    body = assert_error(post(client, "/jobs", job, api_key), 400, "Validation failed")
    assert body["details"] == [
        {"field": "payload.to", "message": "not a valid email address: 'nobody'"}
    ]


def test_a_number_with_too_many_digits_is_told_without_python_advice(
    client: Client, api_key: str
) -> None:
    raw = '{"type": "sleep", "payload": {"delayMs": ' + "9" * 5000 + "}}"
    body = assert_error(post(client, "/jobs", raw, api_key), 400, "Malformed JSON")
    assert body["details"] == "a number has more than 4300 digits"


def test_an_empty_idempotency_key_is_refused(client: Client, api_key: str) -> None:
    response = post(client, "/jobs", SLEEP, api_key, **{"Idempotency-Key": ""})
    body = assert_error(response, 400, "Validation failed")
    assert body["details"][0]["field"] == "Idempotency-Key"
    assert not Job.objects.exists()
