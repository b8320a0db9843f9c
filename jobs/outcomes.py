"""The worker's outcome writer: outcomes of jobs that finish close together are written in one
transaction (jobs/lifecycle.py `finish`), with one Redis call for their retries and broadcasts
and one release. A batch takes whatever is waiting (no timer), so nothing waits for it to fill.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from jobs.lifecycle import Outcome, WorkerTransitions
from jobs.models import Job

logger = logging.getLogger("jobs.worker")

MAX_WRITE_BATCH = 500


async def with_db_retries(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Retry a fenced write while the database is unreachable, up to about one lease."""
    deadline = time.monotonic() + settings.JOBS["LEASE_S"]
    delay = 0.1
    while True:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("database write failed (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class OutcomeWriter:
    """Takes every outcome waiting and writes them together: one transaction, one Redis call
    for the retries and broadcasts, one release."""

    def __init__(
        self,
        transitions: WorkerTransitions,
        release: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        self.transitions = transitions
        self.release = release
        self.waiting: asyncio.Queue[tuple[Job, Outcome, asyncio.Future[Job | None]]] = (
            asyncio.Queue()
        )
        self.stopped = False

    def submit(self, job: Job, outcome: Outcome) -> asyncio.Future[Job | None]:
        """The written job (None if the lease was lost), once its batch is written."""
        done: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        if self.stopped:
            done.set_exception(RuntimeError("the outcome writer is not running"))
        else:
            self.waiting.put_nowait((job, outcome, done))
        return done

    async def run_forever(self) -> None:
        try:
            while True:
                batch = [await self.waiting.get()]
                while len(batch) < MAX_WRITE_BATCH and not self.waiting.empty():
                    batch.append(self.waiting.get_nowait())
                await self._write(batch)
        finally:
            # Nobody waits forever on a writer that is gone.
            self.stopped = True
            while not self.waiting.empty():
                *_, done = self.waiting.get_nowait()
                if not done.done():
                    done.set_exception(RuntimeError("the outcome writer stopped"))

    async def _write(self, batch: list[tuple[Job, Outcome, asyncio.Future[Job | None]]]) -> None:
        ids = [str(job.id) for job, _, _ in batch]
        try:
            written = await with_db_retries(
                self.transitions.finish, [(job, outcome) for job, outcome, _ in batch]
            )
        except Exception as exc:
            await self.release(ids)
            for *_, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        await self.release(ids)
        for (*_, done), job in zip(batch, written, strict=True):
            if not done.done():
                done.set_result(job)
