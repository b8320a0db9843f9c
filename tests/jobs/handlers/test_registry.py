"""The registry of job types: the four built-in types, and what registering a type means."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from jobs.handlers import JobContext, get_handler, register, registered_types, validate_payload
from jobs.handlers.registry import unregister
from tests.support.handlers import make_ctx

EXTRA_TYPE = "test_registry_extra"


class ExtraPayload(BaseModel):
    n: int


@pytest.fixture
def extra_type() -> Iterator[str]:
    """A job type registered by the test, gone again afterwards."""
    yield EXTRA_TYPE
    unregister(EXTRA_TYPE)


def test_all_five_types_are_registered_with_their_kind_and_timeout() -> None:
    types = ["data_processing", "email", "event_delivery", "sleep", "webhook"]
    assert registered_types() == types
    kinds = {name: get_handler(name).is_async for name in registered_types()}  # type: ignore[union-attr]
    assert kinds == {
        "data_processing": False,
        "email": False,
        "event_delivery": True,
        "sleep": True,
        "webhook": True,
    }
    assert get_handler("sleep").timeout_s >= 600 + 30  # type: ignore[union-attr]
    assert get_handler("webhook").timeout_s >= 30  # type: ignore[union-attr]


def test_a_registered_type_is_found_with_its_schema_kind_and_timeout(extra_type: str) -> None:
    @register(extra_type, schema=ExtraPayload, timeout_s=7)
    async def handler(payload: ExtraPayload, ctx: JobContext) -> dict[str, Any]:
        return {"n": payload.n}

    spec = get_handler(extra_type)
    assert spec is not None
    assert (spec.schema, spec.func, spec.timeout_s, spec.is_async) == (
        ExtraPayload,
        handler,
        7,
        True,
    )
    assert extra_type in registered_types()
    assert validate_payload(extra_type, {"n": 3}) == ExtraPayload(n=3)
    with pytest.raises(ValidationError):
        validate_payload(extra_type, {"n": "three"})


def test_a_type_cannot_be_registered_twice(extra_type: str) -> None:
    def handler(payload: ExtraPayload, ctx: JobContext) -> None:
        return None

    register(extra_type, schema=ExtraPayload, timeout_s=1)(handler)
    with pytest.raises(ValueError, match="already registered"):
        register(extra_type, schema=ExtraPayload, timeout_s=1)(handler)
    assert get_handler(extra_type).is_async is False  # type: ignore[union-attr]


def test_an_unknown_type_has_no_handler_and_no_schema() -> None:
    assert get_handler("no_such_type") is None
    with pytest.raises(KeyError):
        validate_payload("no_such_type", {})


def test_progress_is_clamped_to_0_100_and_its_message_to_200_characters() -> None:
    reports: list[tuple[int, str | None]] = []
    ctx = make_ctx("sleep")
    ctx.report_progress(50)  # no listener: nothing happens, nothing fails
    ctx = JobContext(
        job_id=ctx.job_id,
        tenant=ctx.tenant,
        type=ctx.type,
        attempt=1,
        max_attempts=3,
        on_progress=lambda percent, message: reports.append((percent, message)),
    )
    ctx.report_progress(-5)
    ctx.report_progress(42.9, "")
    ctx.report_progress(250, "m" * 300)
    assert reports == [(0, None), (42, None), (100, "m" * 200)]
