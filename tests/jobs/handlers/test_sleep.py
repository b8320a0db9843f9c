"""The sleep handler: it waits as long as asked, can be cancelled at once, and its maximum comes
from the settings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import ValidationError

from tests.support.handlers import run_async, validate


async def test_sleep_waits_and_reports() -> None:
    started = time.monotonic()
    assert await run_async("sleep", {"delayMs": 50}) == {"sleptMs": 50}
    assert time.monotonic() - started >= 0.05
    assert await run_async("sleep", {"delayMs": 0}) == {"sleptMs": 0}


async def test_sleep_is_cancellable() -> None:
    task = asyncio.create_task(run_async("sleep", {"delayMs": 60_000}))
    await asyncio.sleep(0)  # let it start waiting
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=2)
    assert time.monotonic() - started < 1


def test_sleep_maximum_comes_from_settings_at_validation_time(settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "SLEEP_MAX_MS": 1000}
    assert validate("sleep", {"delayMs": 1000}).delay_ms == 1000
    with pytest.raises(ValidationError, match="delayMs must be at most 1000"):
        validate("sleep", {"delayMs": 1001})
    settings.JOBS = {**settings.JOBS, "SLEEP_MAX_MS": 5000}
    assert validate("sleep", {"delayMs": 1001}).delay_ms == 1001


def test_sleep_accepts_python_field_name() -> None:
    assert validate("sleep", {"delay_ms": 5}).delay_ms == 5


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"delayMs": -1},
        {"delayMs": True},
        {"delayMs": 1.5},
        {"delayMs": 10.0},
        {"delayMs": "10"},
        {"delayMs": None},
        {"delayMs": 10, "extra": 1},
        {"delayMs": 10**30},
    ],
)
def test_sleep_rejects_bad_payloads(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        validate("sleep", payload)
