"""What every worker does besides running jobs, so that the cluster heals itself: put back the
claims and leases of workers that died, settle the dependents of jobs that ended without it
(jobs/dependencies.py: a crash right after a final write, a recovered lease), copy tenants'
concurrency limits into Redis, and push PENDING jobs that Redis lost (flushed, restarted, a push
that failed); on a loop of its own, dispatch the events of tenants' jobs to their subscriptions
(jobs/events_dispatch.py); and on another, fire the schedules that are due (jobs/scheduling.py).
Once an hour it also creates the partitions of jobs_job ahead of time (jobs/partitions.py).
Each task runs and fails on its own: one that keeps failing (a row it cannot read, say) must
not stop the others."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from django.utils import timezone

from jobs import events_dispatch, partitions, scheduling
from jobs.lifecycle import WorkerTransitions
from jobs.orm import orm
from jobs.queue import Queue, entry_for
from jobs.store import JobStore

logger = logging.getLogger("jobs.worker")

RECONCILE_BATCH = 1000
RECONCILE_LOCK = "reconcile"
PARTITIONS_LOCK = "partitions"
PARTITIONS_EVERY_S = 3600


class Upkeep:
    """The maintenance tasks of the worker called `name`."""

    def __init__(
        self,
        *,
        name: str,
        queue: Queue,
        jobs: JobStore,
        transitions: WorkerTransitions,
        lease_s: int,
        reconcile_interval_s: int,
    ) -> None:
        self.name = name
        self.queue = queue
        self.jobs = jobs
        self.transitions = transitions
        self.lease_s = lease_s
        self.reconcile_interval_s = reconcile_interval_s
        # How many times this worker has checked for due schedules (one query each when none is).
        self.schedule_checks = 0

    async def run_forever(self) -> None:
        """The maintenance loop, the event dispatch loop and the schedule loop, side by side."""
        await asyncio.gather(
            self._maintain_forever(),
            self._dispatch_events_forever(),
            self.fire_schedules_forever(),
        )

    async def _maintain_forever(self) -> None:
        """Recovery and limit sync every third of a lease, reconciliation every interval."""
        every = max(0.5, self.lease_s / 3)
        last_reconcile = last_partitions = -float("inf")
        while True:
            if time.monotonic() - last_partitions >= PARTITIONS_EVERY_S:
                last_partitions = time.monotonic()
                await self._each("partitions", self.ensure_partitions)
            await self._each("recovery", self.recover)
            await self._each("dependency settling", self.settle_dependencies)
            await self._each("limit sync", self.sync_limits)
            if time.monotonic() - last_reconcile >= self.reconcile_interval_s:
                last_reconcile = time.monotonic()
                await self._each("reconciliation", self.reconcile)
            await asyncio.sleep(every)

    async def _dispatch_events_forever(self) -> None:
        """Event dispatch every `events_dispatch.INTERVAL_S`, its log trimming now and then."""
        while True:
            await self._each("event dispatch", self.dispatch_events)
            await self._each("delivery log trim", self.trim_delivery_logs)
            await asyncio.sleep(events_dispatch.INTERVAL_S)

    async def fire_schedules_forever(self) -> None:
        """Check for due schedules once per `scheduling.INTERVAL_S`, just after each whole
        second of this machine's clock (due times fall on whole seconds, so a pass that comes
        late does not slide past one)."""
        interval = scheduling.INTERVAL_S
        while True:
            await asyncio.sleep(interval - time.time() % interval + 0.005)
            await self._each("schedules", self.fire_schedules)

    async def fire_schedules(self) -> int:
        """One check: fire every schedule due now; how many jobs it made. Every worker checks;
        the database's row locks make each due time fire once."""
        self.schedule_checks += 1
        created = await orm(scheduling.tick, thread_sensitive=False)()
        for job in created:
            logger.info(
                "schedule fired",
                extra={"worker": self.name, "job_id": str(job.id), "tenant": job.tenant_id},
            )
        return len(created)

    async def dispatch_events(self) -> int:
        """One dispatch pass if no other worker is making one (a Redis lock that expires just
        before the next pass); how many deliveries it created."""
        ttl_s = events_dispatch.INTERVAL_S * 0.9
        if not await self.queue.try_lock(events_dispatch.LOCK, owner=self.name, ttl_s=ttl_s):
            return 0
        # Off the process's sync thread: waiting for the watermark must not delay other ORM work.
        created = await orm(events_dispatch.dispatch, thread_sensitive=False)()
        return len(created)

    async def trim_delivery_logs(self) -> int:
        """Trim the subscriptions' delivery logs and the change log (rows of tenants without a
        subscription left), once per `TRIM_EVERY_S` over all workers."""
        lock, every_s = events_dispatch.TRIM_LOCK, events_dispatch.TRIM_EVERY_S
        if not await self.queue.try_lock(lock, owner=self.name, ttl_s=every_s):
            return 0
        trimmed = await orm(events_dispatch.trim_logs, thread_sensitive=False)()
        return trimmed + await orm(events_dispatch.prune_changes, thread_sensitive=False)()

    async def ensure_partitions(self) -> list[str]:
        """Create the partitions of jobs_job for this period and the next where missing (one
        worker at a time); the names created."""
        if not await self.queue.try_lock(PARTITIONS_LOCK, owner=self.name, ttl_s=60):
            return []
        return await orm(partitions.partitions_ensure, thread_sensitive=False)()

    async def _each(self, task: str, run: Callable[[], Awaitable[object]]) -> None:
        try:
            await run()
        except Exception as exc:
            logger.warning("maintenance failed: %s: %s", task, exc, extra={"worker": self.name})

    async def recover(self) -> int:
        """Put back what dead workers held: their Redis claims and their expired leases."""
        silent_since_ms = int((time.time() - self.lease_s) * 1000)
        for name in await self.queue.dead_workers(silent_since_ms=silent_since_ms):
            if name != self.name:
                count = await self.queue.requeue(worker=name)
                logger.info(
                    "worker %s is gone: requeued %s claimed ids",
                    name,
                    count,
                    extra={"worker": self.name},
                )
        recovered = await self.transitions.recover()
        for job in recovered:
            logger.info(
                "recovered from a dead worker -> %s",
                job.status,
                extra={"worker": self.name, "job_id": str(job.id), "tenant": job.tenant_id},
            )
        return len(recovered)

    async def settle_dependencies(self) -> int:
        """Release or cancel the dependents of ended jobs nobody settled (a crash between a
        job's final write and its settling, a lease recovered as FAILED): the durable
        follow-up. Cheap when there is nothing: one read of a partial index."""
        settled = await self.transitions.settle_unsettled()
        if settled:
            logger.info(
                "settled dependents: %d released, %d cancelled",
                len(settled.released),
                len(settled.cancelled),
                extra={"worker": self.name},
            )
        return len(settled.released) + len(settled.cancelled)

    async def sync_limits(self) -> None:
        await self.queue.replace_tenant_limits(await self.jobs.tenant_limits())

    async def reconcile(self) -> int:
        """Push PENDING jobs due soon that Redis may have lost. Pushing an id that is already
        there is a no-op; one worker at a time does it (a short Redis lock)."""
        ttl_s = max(5.0, self.reconcile_interval_s / 2)
        if not await self.queue.try_lock(RECONCILE_LOCK, owner=self.name, ttl_s=ttl_s):
            return 0
        horizon = timezone.now() + timedelta(seconds=self.reconcile_interval_s)
        after = None
        pushed = 0
        while True:
            batch = await self.jobs.pending(after=after, horizon=horizon, limit=RECONCILE_BATCH)
            if not batch:
                break
            await self.queue.enqueue(entry_for(job) for job in batch)
            pushed += len(batch)
            after = batch[-1].created_at
            if len(batch) < RECONCILE_BATCH:
                break
        return pushed
