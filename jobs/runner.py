"""One attempt of a job: its handler run with a timeout, its progress reported on the way, and
what came of it as an `Outcome` (never an exception)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from jobs import dependencies
from jobs.handlers import HeldBack, JobContext, PermanentError, get_handler
from jobs.lifecycle import Outcome
from jobs.models import Job
from jobs.orm import orm
from jobs.signing import secret_cache

logger = logging.getLogger("jobs.worker")

# At most one progress write per job per this many seconds; reports in between are coalesced.
PROGRESS_INTERVAL_S = 0.5


def error_text(exc: BaseException) -> str:
    """A job's `error`: handlers' own errors speak for themselves; others carry their type."""
    message = str(exc)
    if type(exc).__module__.startswith("jobs.handlers") and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class ProgressReporter:
    """Hands a running job's progress to `write`, at most once per PROGRESS_INTERVAL_S; reports
    in between are coalesced (the latest wins). Safe to call from handler threads."""

    def __init__(self, job: Job, write: Callable[[Job, int, str | None], Awaitable[None]]) -> None:
        self.job = job
        self.write = write
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.latest: tuple[int, str | None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_write = 0.0
        self.closed = False

    def report(self, percent: int, message: str | None) -> None:
        if threading.get_ident() == self.loop_thread:
            self._set(percent, message)
        else:
            self.loop.call_soon_threadsafe(self._set, percent, message)

    def _set(self, percent: int, message: str | None) -> None:
        if self.closed:
            return
        self.latest = (percent, message)
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._write_latest())

    async def _write_latest(self) -> None:
        while self.latest is not None and not self.closed:
            wait = self.last_write + PROGRESS_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            percent, message = self.latest
            self.latest = None
            self.last_write = time.monotonic()
            try:
                await self.write(self.job, percent, message)
            except Exception as exc:
                logger.warning("progress not stored (%s)", exc, extra={"job_id": str(self.job.id)})

    async def close(self) -> None:
        """Stop before the outcome is written, so no progress frame follows the final one."""
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def _dependency_results(job: Job) -> dict[str, Any]:
    """The results of the job's dependencies (one read, off the loop); none without any."""
    if not job.depends_on:
        return {}
    return await orm(dependencies.results, thread_sensitive=False)(job)


async def run_attempt(job: Job, progress: ProgressReporter) -> Outcome:
    """Run the job's handler once: the payload validated, within its timeout, blocking handlers
    in a thread (so heartbeats keep flowing). Cancellation (by the API, or a cold stop) is the
    only thing that escapes."""
    spec = get_handler(job.type)
    if spec is None:
        return Outcome(error=f"no handler registered for type {job.type!r}", permanent=True)
    try:
        payload = spec.schema.model_validate(job.payload)
    except ValidationError as exc:
        return Outcome(error=f"invalid payload: {exc.errors()[0]['msg']}", permanent=True)
    timeout = spec.timeout_s
    if job.timeout_ms:
        timeout = min(timeout, job.timeout_ms / 1000)
    try:
        async with asyncio.timeout(timeout):
            ctx = JobContext(
                job_id=str(job.id),
                tenant=job.tenant_id,
                type=job.type,
                attempt=job.attempts,
                max_attempts=job.max_attempts,
                on_progress=progress.report,
                # Cached per tenant for a few seconds (jobs/signing.py); within the timeout, so
                # a slow database cannot hold the attempt past it.
                signing_secrets=await secret_cache.live(job.tenant_id) if spec.signed else (),
                dependency_results=await _dependency_results(job),
            )
            if spec.is_async:
                result = await spec.func(payload, ctx)
            else:
                result = await asyncio.to_thread(spec.func, payload, ctx)
        json.dumps(result)
    except TimeoutError:
        return Outcome(error=f"timed out after {timeout:g}s")
    except HeldBack as exc:
        return Outcome.held(exc.until, exc.reason)
    except PermanentError as exc:
        return Outcome(error=str(exc) or type(exc).__name__, permanent=True)
    except Exception as exc:
        logger.warning(
            "handler raised",
            exc_info=True,
            extra={"job_id": str(job.id), "tenant": job.tenant_id, "job_type": job.type},
        )
        return Outcome(error=error_text(exc))
    return Outcome(result=result)
