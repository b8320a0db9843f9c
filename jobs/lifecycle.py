"""Every transition of a job's status, in one place.

    create ─► PENDING ─claim─► RUNNING ─finish─► COMPLETED | FAILED | PENDING (a retry, later)
      │          │                │ finish, held (its destination is protected) ─► PENDING at
      │          │                │     the time given, attempt not spent
      │          │                │ put_back (its worker is stopping) ─► PENDING, attempt not spent
      │          │                │ recover (its lease expired) ─► PENDING | FAILED
      │          └─── cancel ─────┴─► CANCELLED
      └─► WAITING (dependencies unfinished) ─settle─► PENDING (the last one COMPLETED)
                 │                                   CANCELLED (one FAILED or CANCELLED)
                 └─ cancel ─► CANCELLED
    FAILED | CANCELLED ─retry─► PENDING (attempts reset)

A job's end settles the jobs that wait for it (`settle`, jobs/dependencies.py): released to
PENDING, or cancelled down the graph; the changed jobs are published like any transition.

Each transition takes its decision from the `RetryPolicy` where attempts matter, writes through
`jobs.store` (a worker's writes are fenced by its lease token), and ends in `publish`: jobs that
are runnable go (back) into the Redis index, every change is broadcast to its tenant's
subscribers, and the event is counted, in one Redis call. The API's services and the worker call
these functions; nothing else writes a job's status.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs import cursors, dependencies, store
from jobs.models import TERMINAL_STATUSES as TERMINAL
from jobs.models import Job, JobStatus
from jobs.queue import Queue, async_queue, entry_for, sync_queue
from realtime.broadcast import update_messages

logger = logging.getLogger(__name__)

# The events of SPEC's metrics a transition counts when it publishes.
CREATED, CANCELLED = "created", "cancelled"
HELD_PREFIX = "held: "


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt, as the worker hands it over. `held_until`: the attempt was
    not made (its destination is protected: jobs/destinations.py) and the job waits until then,
    the attempt not spent; `error` says why."""

    result: Any = None
    error: str | None = None
    permanent: bool = False
    held_until: datetime | None = None

    @classmethod
    def held(cls, until: datetime, reason: str) -> Outcome:
        return cls(error=HELD_PREFIX + reason, held_until=until)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a job that did not succeed runs again: exponential backoff with full jitter, until
    its attempts are spent. The one rule for "attempts used up, so FAILED"."""

    base_ms: int
    max_ms: int

    @classmethod
    def from_settings(cls) -> RetryPolicy:
        return cls(base_ms=settings.JOBS["RETRY_BASE_MS"], max_ms=settings.JOBS["RETRY_MAX_MS"])

    def backoff(self, attempt: int, job_type: str | None = None) -> timedelta:
        """Uniform in [0, min(max, base * 2**(attempt-1))]; for a type registered with a
        schedule of its own (`retry_delays_s`), 90 to 100% of its entry for `attempt`."""
        # Imported here: the handlers' modules import the services, which import this one.
        from jobs.handlers.registry import get_handler

        spec = get_handler(job_type) if job_type else None
        if spec is not None and spec.retry_delays_s:
            delays = spec.retry_delays_s
            wait_s = delays[min(max(attempt, 1), len(delays)) - 1]
            return timedelta(seconds=wait_s * random.uniform(0.9, 1.0))
        ceiling = min(self.max_ms, self.base_ms * (2 ** max(0, min(attempt - 1, 40))))
        return timedelta(milliseconds=random.uniform(0, ceiling))

    @staticmethod
    def spent(job: Job) -> bool:
        """The job has used every attempt it may make."""
        return job.attempts >= job.max_attempts

    def after_attempt(self, job: Job, outcome: Outcome, now: datetime) -> dict[str, Any]:
        """The columns an attempt's outcome writes: COMPLETED, FAILED, or PENDING again (held:
        at `held_until`, the attempt given back)."""
        fields: dict[str, Any] = {
            "updated_at": now,
            "lease_token": None,
            "lease_expires_at": None,
            "finished_at": None,
            "run_at": job.run_at,
            # Every outcome of a batch writes the same columns (store.write_outcomes).
            "attempts": job.attempts,
        }
        if outcome.held_until is not None:
            fields.update(held_fields(job, outcome))
        elif outcome.ok:
            fields.update(
                status=JobStatus.COMPLETED, result=outcome.result, error=None, finished_at=now
            )
        elif outcome.permanent or self.spent(job):
            fields.update(
                status=JobStatus.FAILED, result=None, error=outcome.error, finished_at=now
            )
        else:
            fields.update(
                status=JobStatus.PENDING,
                result=None,
                error=outcome.error,
                run_at=now + self.backoff(job.attempts, job.type),
            )
        return fields

    def after_lost_lease(self, job: Job, now: datetime) -> dict[str, Any]:
        """The columns of a RUNNING job whose worker stopped heartbeating: the attempt counts."""
        fields: dict[str, Any] = {
            "updated_at": now,
            "lease_token": None,
            "lease_expires_at": None,
            "locked_by": None,
            "error": f"worker {job.locked_by} stopped heartbeating (lease expired)",
        }
        if self.spent(job):
            fields.update(status=JobStatus.FAILED, finished_at=now)
        else:
            fields.update(status=JobStatus.PENDING, run_at=now)
        return fields


def held_fields(job: Job, outcome: Outcome) -> dict[str, Any]:
    """The columns of an attempt held back before its request (`Outcome.held`): PENDING until
    `held_until`, the attempt not spent, the reason in `error`."""
    return {
        "status": JobStatus.PENDING,
        "attempts": max(0, job.attempts - 1),
        "result": None,
        "error": outcome.error,
        "run_at": outcome.held_until,
    }


def put_back_fields(job: Job, now: datetime) -> dict[str, Any]:
    """The columns of a job its worker gives back unfinished (shutdown): runnable now, the
    attempt not spent."""
    return {
        "status": JobStatus.PENDING,
        "attempts": max(0, job.attempts - 1),
        "run_at": now,
        "updated_at": now,
        "lease_token": None,
        "lease_expires_at": None,
        "locked_by": None,
    }


# --- publish: the one step every transition ends in -----------------------------------------
def announcement(queue: Queue, jobs: Sequence[Job], *, event: str | None) -> dict[str, Any]:
    """The arguments of `Queue.enqueue` for a change: runnable (PENDING) jobs are indexed (an id
    already there is left as it is), every job is broadcast, `event` is counted per job."""
    return {
        "entries": [entry_for(job) for job in jobs if job.status == JobStatus.PENDING],
        "publish": update_messages(jobs, queue.prefix),
        "counters": queue.event_increments(event, jobs) if event else [],
    }


def _not_published(jobs: Sequence[Job]) -> None:
    # The rows are durable: reconciliation indexes PENDING jobs again, subscribers catch up
    # with `since`. A change is never undone because Redis was away.
    logger.exception(
        "publishing job changes to Redis failed; reconciliation will requeue job_ids=%s",
        ",".join(str(job.id) for job in jobs[:10]),
    )


def publish(jobs: Sequence[Job], *, event: str | None = None) -> None:
    """Index, broadcast and count committed changes, in one round trip; never raises."""
    if not jobs:
        return
    queue = sync_queue()
    try:
        queue.enqueue(**announcement(queue, jobs, event=event))
    except Exception:
        _not_published(jobs)


async def apublish(
    jobs: Sequence[Job], *, event: str | None = None, queue: Queue | None = None
) -> None:
    """`publish` on an asyncio client (the event loop's, or the worker's own `queue`)."""
    if not jobs:
        return
    queue = queue or async_queue()
    try:
        await queue.enqueue(**announcement(queue, jobs, event=event))
    except Exception:
        _not_published(jobs)


def publish_on_commit(jobs: Sequence[Job], *, event: str | None = None) -> None:
    """`publish` once the current transaction commits (at once outside one). Cursors the write
    did not return (SQLite's are set after RETURNING) are read now, inside the transaction."""
    cursors.fill(job for job in jobs if job.cursor is None)
    transaction.on_commit(lambda: publish(jobs, event=event))


# --- the API's transitions (inside the caller's transaction, on a locked row) ----------------
def publish_settled(settled: dependencies.Settled) -> None:
    """Publish what settling dependents changed: released jobs are indexed, cancelled ones
    counted as cancelled."""
    publish(settled.released)
    publish(settled.cancelled, event=CANCELLED)


async def apublish_settled(settled: dependencies.Settled, *, queue: Queue | None = None) -> None:
    await apublish(settled.released, queue=queue)
    await apublish(settled.cancelled, event=CANCELLED, queue=queue)


def cancel(job: Job) -> Job:
    """WAITING, PENDING or RUNNING -> CANCELLED, and the jobs waiting for it cancelled down
    the graph, in the same transaction. A RUNNING job's lease is cleared, which fences out its
    worker (its final write matches no row); after commit the worker is told to stop the
    handler, or the id leaves the Redis index."""
    was_running = job.status == JobStatus.RUNNING
    was_waiting = job.status == JobStatus.WAITING
    now = timezone.now()
    fields = {
        "status": JobStatus.CANCELLED,
        "finished_at": now,
        "updated_at": now,
        "error": "cancelled",
        "lease_token": None,
        "lease_expires_at": None,
    }
    store.write_row(job, fields)
    settled = dependencies.settle([job.id]) if job.dependents_waiting else dependencies.Settled()

    def after() -> None:
        try:
            queue = sync_queue()
            if was_running:
                queue.publish_cancel(str(job.id))
            elif not was_waiting:
                queue.remove([entry_for(job)])
        except Exception:
            # A PENDING id left in Redis is harmless: the claim's compare-and-set skips it.
            logger.exception("cancel signal to Redis failed job_id=%s", job.id)
        publish([job], event=CANCELLED)
        publish_settled(settled)

    transaction.on_commit(after)
    return job


def retry(job: Job) -> Job:
    """FAILED or CANCELLED -> PENDING, runnable now, with its attempts reset."""
    now = timezone.now()
    fields = {
        "status": JobStatus.PENDING,
        "attempts": 0,
        "error": None,
        "result": None,
        "run_at": now,
        "started_at": None,
        "finished_at": None,
        "updated_at": now,
        "locked_by": None,
    }
    store.write_row(job, fields)
    publish_on_commit([job])
    return job


# --- the worker's transitions -----------------------------------------------------------------
class WorkerTransitions:
    """A worker's transitions: its database calls (`store.JobStore`), its Redis `queue`."""

    def __init__(self, *, jobs: store.JobStore, queue: Queue, policy: RetryPolicy) -> None:
        self.jobs = jobs
        self.queue = queue
        self.policy = policy

    async def claim(self, *, job_ids: list[str], worker: str) -> list[Job]:
        """PENDING -> RUNNING for the due ones among `job_ids` (compare-and-set: an id another
        worker took, or a cancelled one, is not claimed)."""
        jobs = await self.jobs.claim(job_ids=job_ids, worker=worker)
        await apublish(jobs, queue=self.queue)
        await self._count(self.queue.record_starts, jobs)
        return jobs

    async def finish(self, items: list[tuple[Job, Outcome]]) -> list[Job | None]:
        """Write attempts' outcomes together (one transaction); None where the lease was lost."""
        now = timezone.now()
        planned = [(job, self.policy.after_attempt(job, outcome, now)) for job, outcome in items]
        if any(job.dependents_waiting for job, _ in items):
            # Jobs wait for some of these: their release or cancellation commits with the
            # outcomes (jobs/dependencies.py).
            written, settled = await self.jobs.write_outcomes_and_settle(planned=planned)
            changed = [job for job in written if job is not None]
        else:
            written = await self.jobs.write_outcomes(planned=planned)
            changed = [job for job in written if job is not None]
            # A dependent created while the job ran: settled right after (or by the sweep).
            settled = await self._settle(changed)
        await apublish([*changed, *settled.released], queue=self.queue)
        await apublish(settled.cancelled, event=CANCELLED, queue=self.queue)
        # A held job made no attempt: counted as `held`, never as a retry or a failure.
        held = [
            job
            for job, (_, outcome) in zip(written, items, strict=True)
            if job is not None and outcome.held_until is not None
        ]
        held_ids = {job.id for job in held}
        attempted = [job for job in changed if job.id not in held_ids]
        await self._count(self.queue.record_outcomes, attempted, now)
        await self._count(self.queue.record_holds, held)
        return written

    async def put_back(self, job: Job) -> Job | None:
        """RUNNING -> PENDING for a job this worker gives back unfinished."""
        written = await self.jobs.write_fenced(job=job, fields=put_back_fields(job, timezone.now()))
        if written is not None:
            await apublish([written], queue=self.queue)
        return written

    async def report_progress(self, job: Job, percent: int, message: str | None) -> None:
        """Store and broadcast a RUNNING job's progress (fenced: nothing if the lease is lost)."""
        written = await self.jobs.set_progress(job=job, percent=percent, message=message)
        if written is not None:
            await apublish([written], queue=self.queue)

    async def _settle(self, jobs: Sequence[Job]) -> dependencies.Settled:
        """Settle the dependents of jobs that ended without settling them (a dependent created
        while the job ran, which its claim did not show; a lease recovered as FAILED): right
        after the write, in a transaction of its own. If this fails or the process dies first,
        the upkeep's sweep settles them (`settle_unsettled`)."""
        ended = [job.id for job in jobs if job.dependents_waiting and job.status in TERMINAL]
        if not ended:
            return dependencies.Settled()
        try:
            return await self.jobs.call(dependencies.settle, ended)
        except Exception as exc:
            logger.warning("dependents not settled yet, the sweep will (%s)", exc)
            return dependencies.Settled()

    async def settle_unsettled(self) -> dependencies.Settled:
        """The sweep: settle the dependents of every ended job not settled yet (a crash after
        the final write, a lease recovery, a job ended by another path)."""
        settled = await self.jobs.call(dependencies.sweep)
        await apublish_settled(settled, queue=self.queue)
        return settled

    async def recover(self, *, limit: int = 500) -> list[Job]:
        """RUNNING jobs whose lease expired (their worker died) -> PENDING or FAILED; the jobs
        waiting for one that FAILED are cancelled right after (or by the sweep)."""
        recovered = await self.jobs.recover_expired(policy=self.policy, limit=limit)
        settled = await self._settle(recovered)
        await apublish(recovered, queue=self.queue)
        await apublish_settled(settled, queue=self.queue)
        await self._count(self.queue.record_outcomes, recovered, timezone.now())
        return recovered

    @staticmethod
    async def _count(
        record: Callable[..., Awaitable[None]], jobs: Sequence[Job], *args: Any
    ) -> None:
        """Add to the Redis-kept counters and histograms; never fails a job."""
        if not jobs:
            return
        try:
            await record(jobs, *args)
        except Exception as exc:
            logger.warning("metrics not recorded (%s)", exc)
