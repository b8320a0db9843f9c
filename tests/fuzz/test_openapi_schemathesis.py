"""Schemathesis against the service's own /openapi.json: generated requests (valid and
invalid) must never get a 5xx, and every response must match the documented schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config.wsgi import application
from jobs.models import Tenant
from jobs.services import api_key_create

schema = schemathesis.openapi.from_wsgi("/openapi.json", application)

EXAMPLES = 40


@pytest.fixture
def fuzz_key(transactional_db: None) -> str:  # type: ignore[no-untyped-def]
    tenant, _ = Tenant.objects.get_or_create(id="fuzz")
    return api_key_create(tenant=tenant)[1]


@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_never_errors_and_matches_its_schema(case: schemathesis.Case, fuzz_key: str) -> None:
    if case.path != "/metrics":
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {fuzz_key}"}
    case.call_and_validate(
        checks=[
            not_a_server_error,
            response_schema_conformance,
            status_code_conformance,
            content_type_conformance,
        ]
    )
