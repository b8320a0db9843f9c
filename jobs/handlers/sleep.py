"""`sleep` jobs: wait `delayMs` milliseconds, cancellably (useful for tests and demos)."""

from __future__ import annotations

import asyncio

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs.handlers.registry import JobContext, register

DEFAULT_SLEEP_MAX_MS = 600_000
TIMEOUT_MARGIN_S = 30
PROGRESS_FROM_MS = 2000


def _sleep_max_ms() -> int:
    try:
        return int(settings.JOBS.get("SLEEP_MAX_MS", DEFAULT_SLEEP_MAX_MS))
    except ImproperlyConfigured:  # imported outside a configured Django (docs, tooling)
        return DEFAULT_SLEEP_MAX_MS


class SleepPayload(BaseModel):
    """Payload of a `sleep` job: `delayMs` from 0 to `JOBS_SLEEP_MAX_MS`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    delay_ms: int = Field(ge=0, strict=True, alias="delayMs")

    @field_validator("delay_ms")
    @classmethod
    def _within_configured_max(cls, value: int) -> int:
        # Read at validation time so the setting applies without re-importing handlers.
        maximum = _sleep_max_ms()
        if value > maximum:
            raise ValueError(f"delayMs must be at most {maximum}")
        return value


# The worker's timeout must never cut a sleep short; the maximum is read when the module loads,
# so a later change of JOBS_SLEEP_MAX_MS needs a worker restart anyway.
_TIMEOUT_S = max(_sleep_max_ms(), DEFAULT_SLEEP_MAX_MS) / 1000 + TIMEOUT_MARGIN_S


@register("sleep", schema=SleepPayload, timeout_s=_TIMEOUT_S)
async def sleep_for(payload: SleepPayload, ctx: JobContext) -> dict[str, int]:
    """Wait `delayMs`; cancelling the task ends the wait at once. `{sleptMs}`.

    Long sleeps (from PROGRESS_FROM_MS) report their progress in tenths."""
    if payload.delay_ms < PROGRESS_FROM_MS:
        await asyncio.sleep(payload.delay_ms / 1000)
        return {"sleptMs": payload.delay_ms}
    step = payload.delay_ms / 10 / 1000
    for tenth in range(1, 11):
        await asyncio.sleep(step)
        ctx.report_progress(
            tenth * 10, f"slept {round(step * tenth * 1000)} of {payload.delay_ms} ms"
        )
    return {"sleptMs": payload.delay_ms}
