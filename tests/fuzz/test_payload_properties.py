"""Property tests: whatever JSON arrives, validation answers with a 4xx, never an exception;
valid payloads are accepted; data_processing's results keep their invariants."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from datetime import datetime
from typing import Any

import pytest
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobs.handlers import get_handler, registered_types, validate_payload
from jobs.handlers.registry import JobContext
from jobs.models import Job, Tenant
from jobs.services import api_key_create

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)
FIELDS = st.sampled_from(
    ["to", "subject", "body", "url", "method", "delayMs", "values", "operations", "headers", "x"]
)
PAYLOADS = st.dictionaries(FIELDS, JSON, max_size=6) | JSON
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(job_type=st.sampled_from(["email", "webhook", "sleep", "data_processing"]), payload=PAYLOADS)
def test_validation_only_ever_raises_validation_error(job_type: str, payload: Any) -> None:
    with contextlib.suppress(ValidationError):
        validate_payload(job_type, payload)


@pytest.fixture
def key(db: None) -> str:  # type: ignore[no-untyped-def]
    return api_key_create(tenant=Tenant.objects.create(id="prop"))[1]


@pytest.mark.django_db
@SETTINGS
@given(
    body=st.dictionaries(
        st.sampled_from(["type", "payload", "priority", "runAt", "delayMs", "maxAttempts", "x"]),
        JSON,
        max_size=5,
    )
    | JSON
)
def test_any_json_body_gets_201_or_a_4xx_json_error(key: str, body: Any) -> None:
    before = Job.objects.count()
    response = Client().post(
        "/jobs",
        json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )
    assert response.status_code in (201, 400, 413), response.content
    if response.status_code != 201:
        assert isinstance(response.json()["error"], str)
        assert Job.objects.count() == before


@pytest.mark.django_db
@SETTINGS
@given(delay=st.integers(min_value=0, max_value=600_000), priority=st.integers(-10, 10))
def test_valid_sleep_jobs_are_accepted(key: str, delay: int, priority: int) -> None:
    response = Client().post(
        "/jobs",
        json.dumps({"type": "sleep", "payload": {"delayMs": delay}, "priority": priority}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )
    assert response.status_code == 201
    assert response.json()["payload"] == {"delayMs": delay}


FINITE = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(values=st.lists(FINITE | st.integers(-(10**9), 10**9), min_size=1, max_size=200))
def test_data_processing_invariants(values: list[float]) -> None:
    spec = get_handler("data_processing")
    assert spec is not None
    ops = ["count", "sum", "mean", "min", "max", "median", "stddev"]
    payload = spec.schema.model_validate({"values": values, "operations": ops})
    ctx = JobContext(job_id="j", tenant="t", type="data_processing", attempt=1, max_attempts=1)
    result = spec.func(payload, ctx)
    assert result["count"] == len(values)
    assert result["min"] == min(values) and result["max"] == max(values)
    tolerance = 1e-9 * max(1.0, max(abs(v) for v in values))
    assert result["min"] - tolerance <= result["mean"] <= result["max"] + tolerance
    assert result["min"] <= result["median"] <= result["max"]
    assert result["stddev"] >= 0
    assert math.isclose(result["median"], statistics.median(values), rel_tol=1e-9, abs_tol=1e-9)


def test_every_registered_type_is_covered() -> None:
    assert {"email", "webhook", "sleep", "data_processing"} <= set(registered_types())


# --- attacks of the hardening review, as properties -------------------------------------------
HEADER_BREAKS = st.sampled_from(
    ["\r", "\n", "\x00", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)


@SETTINGS
@given(
    field=st.sampled_from(["subject", "to", "from", "replyTo"]),
    before=st.text(max_size=20),
    brk=HEADER_BREAKS,
    after=st.text(max_size=20),
)
def test_no_line_separator_ever_reaches_an_email_header(
    field: str, before: str, brk: str, after: str
) -> None:
    payload: dict[str, Any] = {"to": "a@example.com", "subject": "s", "body": "b"}
    payload[field] = f"{before}{brk}{after}@example.com" if field != "subject" else before + brk
    with pytest.raises(ValidationError):
        validate_payload("email", payload)


@pytest.mark.django_db
@SETTINGS
@given(
    when=st.datetimes(
        min_value=datetime(1, 1, 1),
        max_value=datetime(9999, 12, 31, 23, 59),
        timezones=st.timezones(),
    )
    | st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59)),
    offset=st.sampled_from(["", "Z", "+14:00", "-14:00", "-23:59", "+23:59"]),
)
def test_any_run_at_is_accepted_and_readable_or_refused(
    key: str, when: datetime, offset: str
) -> None:
    text = when.isoformat() if when.tzinfo else when.isoformat() + offset
    client = Client()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    response = client.post(
        "/jobs",
        json.dumps({"type": "sleep", "payload": {"delayMs": 0}, "runAt": text}),
        content_type="application/json",
        **auth,
    )
    assert response.status_code in (201, 400), response.content
    if response.status_code == 201:
        # Whatever was accepted reads back: the job, the tenant's list.
        assert client.get(f"/jobs/{response.json()['id']}", **auth).status_code == 200
        assert client.get("/jobs", **auth).status_code == 200


@pytest.mark.django_db
@SETTINGS
@given(credential=st.text(max_size=60))
def test_any_authorization_header_is_a_401_not_an_error(credential: str) -> None:
    try:
        header = f"Bearer {credential}".encode("latin-1").decode("latin-1")
    except UnicodeEncodeError:
        return  # not sendable as an HTTP header
    response = Client().get("/jobs", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401, response.content
    assert response.json()["error"] == "Missing or invalid API key"
