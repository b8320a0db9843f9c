"""The worker: claims jobs from Redis round robin, runs their handlers, writes their outcome.

    run()                        supervisor: the claim loop plus four side tasks; if one of
     ├─ claim loop               them dies the worker stops (running jobs put back), exit 1
     │    └─ one task per job    runner.run_attempt, then its outcome to the writer
     ├─ outcome writer           outcomes that finish together: one write (lifecycle.finish)
     ├─ heartbeat                the worker's Redis heartbeat, its jobs' leases
     ├─ upkeep                   recovery, dependents settling, limit sync, reconciliation,
     │                           event dispatch, due schedules (jobs/upkeep.py)
     └─ cancel listener          stops the handler of a job the API cancelled

Every state change goes through jobs/lifecycle.py; the worker decides only when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings
from django.utils import timezone

from jobs import pg
from jobs.lifecycle import Outcome, RetryPolicy, WorkerTransitions
from jobs.models import Job
from jobs.outcomes import OutcomeWriter, with_db_retries
from jobs.queue import Queue, close_async_queue, entry_for, parse_claim, parse_cluster_enabled
from jobs.redis_clients import async_cluster, async_redis
from jobs.runner import ProgressReporter, run_attempt
from jobs.store import JobStore
from jobs.upkeep import Upkeep

logger = logging.getLogger("jobs.worker")

MAX_BLOCK_S = 1.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class RunningJob:
    job: Job
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    shutdown: bool = False
    persisting: bool = False
    progress: ProgressReporter | None = None


@dataclass
class WorkerOptions:
    name: str = field(default_factory=default_worker_name)
    concurrency: int = 10
    burst: bool = False
    max_jobs: int | None = None
    max_memory_mb: int | None = None
    grace_s: float = 30.0


class UnsupportedRedis(Exception):
    """The Redis `REDIS_URL` names cannot hold the queue: waiting would not help."""


class Worker:
    """Runs jobs until stopped (SIGTERM/SIGINT), or until idle with `burst`."""

    def __init__(
        self,
        options: WorkerOptions,
        *,
        redis_client: aioredis.Redis | None = None,
        queue_class: type[Queue] = Queue,
    ):
        self.options = options
        self.name = options.name
        self.redis = redis_client or async_redis(
            settings.REDIS_URL, socket_timeout=None, socket_connect_timeout=5
        )
        # The queue's own client: a Redis Cluster's with REDIS_CLUSTER_URL, else the same one.
        self.queue_redis: aioredis.Redis | aioredis.RedisCluster = self.redis
        if settings.REDIS_CLUSTER_URL and redis_client is None:
            self.queue_redis = async_cluster(
                settings.REDIS_CLUSTER_URL, socket_timeout=None, socket_connect_timeout=5
            )
        self.queue = queue_class(self.queue_redis, plain=self.redis)
        self.jobs = JobStore(threads=min(8, max(2, options.concurrency // 4 + 2)))
        self.lease_s: int = settings.JOBS["LEASE_S"]
        self.transitions = WorkerTransitions(
            jobs=self.jobs, queue=self.queue, policy=RetryPolicy.from_settings()
        )
        self.upkeep = Upkeep(
            name=self.name,
            queue=self.queue,
            jobs=self.jobs,
            transitions=self.transitions,
            lease_s=self.lease_s,
            reconcile_interval_s=settings.JOBS["RECONCILE_INTERVAL_S"],
        )
        self.outcomes = OutcomeWriter(self.transitions, self._release)
        self.running: dict[str, RunningJob] = {}
        self.processed = 0
        self.failed_task: str | None = None
        self._slot_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._cold = asyncio.Event()
        self._persisting: set[asyncio.Task[None]] = set()

    # --- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until stopped; returns the process exit code (0 for a clean stop, 1 if a side
        task died)."""
        self._log("started concurrency=%s burst=%s", self.options.concurrency, self.options.burst)
        try:
            await self._start_up()
        except UnsupportedRedis as exc:
            self._log("%s", exc, level=logging.ERROR)
            self.jobs.close()
            await pg.close_pools()
            await self._close_clients()
            return 2
        side_tasks = {
            "heartbeat": self._heartbeat_forever(),
            "upkeep": self.upkeep.run_forever(),
            "cancel listener": self._listen_for_cancels(),
            "outcome writer": self.outcomes.run_forever(),
        }
        try:
            await self._supervise(self._work(), side_tasks)
        finally:
            await self.close()
        self._log("stopped after %s jobs", self.processed)
        return 1 if self.failed_task else 0

    async def _work(self) -> None:
        # The side tasks (the outcome writer above all) keep running until the drain is over.
        await self._fetch_and_process_jobs()
        await self.drain()

    async def _supervise(
        self, main: Coroutine[Any, Any, None], side: dict[str, Coroutine[Any, Any, None]]
    ) -> None:
        """Run the claim loop with the side tasks; a side task that ends (none should) stops
        the worker at once, its running jobs put back, instead of leaving it half alive."""
        main_task = asyncio.create_task(main, name="claim loop")
        tasks = {asyncio.create_task(coro, name=name): name for name, coro in side.items()}
        try:
            pending = set(tasks)
            while not main_task.done():
                done, pending = await asyncio.wait(
                    {main_task, *pending}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done - {main_task}:
                    self._side_task_died(tasks[task], task)
            main_task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _side_task_died(self, name: str, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        self._log(
            "%s stopped (%s): stopping the worker, running jobs go back to the queue",
            name,
            f"{type(error).__name__}: {error}" if error else "returned",
            level=logging.ERROR,
            exc_info=error,
        )
        self.failed_task = self.failed_task or name
        self._stop.set()
        self._cold.set()
        self._slot_freed.set()

    async def _start_up(self) -> None:
        """Register, copy tenant limits and, in burst mode, recover and reconcile first (a burst
        run must see what Redis lost before it decides nothing is left). Waits out outages."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                if parse_cluster_enabled(await self.queue.cluster_info()):
                    raise UnsupportedRedis(
                        "REDIS_URL names a Redis Cluster node: it must be one server or a"
                        " Sentinel set (pub/sub); give the cluster as REDIS_CLUSTER_URL"
                        " (docs/scaling.md)"
                    )
                # Claims left under this name by an earlier process that died go back first.
                await self.queue.requeue(worker=self.name)
                await self._beat()
                await self.upkeep.sync_limits()
                if self.options.burst:
                    await self.upkeep.recover()
                    await self.upkeep.settle_dependencies()
                    await self.upkeep.reconcile()
                return
            except UnsupportedRedis:
                raise
            except Exception as exc:
                self._log(
                    "start-up failed (%s); retrying in %.1fs", exc, delay, level=logging.WARNING
                )
                await self._sleep_unless_stopped(delay)
                delay = min(delay * 2, 5.0)

    def stop(self) -> None:
        """First call: warm stop (finish running jobs). Second call: cold (put them back now)."""
        if self._stop.is_set():
            self._log("second stop signal: putting running jobs back now")
            self._cold.set()
        else:
            self._log("stop signal: finishing running jobs (grace %ss)", self.options.grace_s)
        self._stop.set()
        self._slot_freed.set()

    @contextlib.contextmanager
    def signal_handlers(self) -> Iterator[None]:
        """Route SIGTERM and SIGINT to `stop` while running; restore the old handlers after."""
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGTERM, signal.SIGINT)
        for sig in sigs:
            loop.add_signal_handler(sig, self.stop)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    async def close(self) -> None:
        """Give back this worker's Redis claims and close its connections."""
        try:
            await self.queue.requeue(worker=self.name)
        except Exception:
            self._log("could not unregister from Redis", level=logging.WARNING, exc_info=True)
        self.jobs.close()
        await pg.close_pools()
        await self._close_clients()
        # The loop's shared client, if a handler used it (webhooks' destination protection).
        await close_async_queue()

    async def _close_clients(self) -> None:
        await self.redis.aclose()
        if self.queue_redis is not self.redis:
            await self.queue_redis.aclose()

    # --- the claim loop -----------------------------------------------------------------------
    async def _fetch_and_process_jobs(self) -> None:
        """Claim one job per free slot (never more), start them, block when nothing is ready."""
        backoff = 0.1
        while not self._stop.is_set():
            free = self.options.concurrency - len(self.running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                handed_out, next_due_ms = await self.claim_and_start(free)
                backoff = 0.1
            except Exception as exc:
                self._log(
                    "claim failed (%s); retrying in %.1fs", exc, backoff, level=logging.WARNING
                )
                await self._sleep_unless_stopped(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if handed_out:
                # Even if none of the ids could be claimed (stale duplicates), more may wait.
                continue
            if self.options.burst:
                due_soon = next_due_ms is not None and next_due_ms - time.time() * 1000 < 1000
                if not self.running and not due_soon:
                    self._log("burst: no runnable job left")
                    self._stop.set()
                    break
                if self.running and not due_soon:
                    self._slot_freed.clear()
                    await self._wait_first(self._slot_freed.wait())
                    continue
            await self._wait_for_work(next_due_ms)

    async def claim_and_start(self, free: int) -> tuple[int, int | None]:
        """One turn of the loop: claim up to `free` jobs and start them; returns how many ids
        Redis handed out (some may have been stale) and when the next delayed job is due."""
        claimed = parse_claim(await self.queue.claim(worker=self.name, count=free))
        if not claimed.job_ids:
            return 0, claimed.next_due_ms
        try:
            jobs = await self.transitions.claim(job_ids=claimed.job_ids, worker=self.name)
        except Exception:
            # The ids must not stay claimed by us in Redis while the database is away.
            await self.queue.requeue(worker=self.name, job_ids=claimed.job_ids)
            raise
        missed = set(claimed.job_ids) - {str(job.id) for job in jobs}
        if missed:
            await self._handle_missed(missed)
        for job in jobs:
            running = self.running[str(job.id)] = RunningJob(job=job)
            running.task = asyncio.create_task(self._process_job(running), name=f"job-{job.id}")
        return len(claimed.job_ids), claimed.next_due_ms

    async def _handle_missed(self, missed: set[str]) -> None:
        """Ids Redis handed out that the database did not let us claim: already taken,
        finished or cancelled (dropped), or not due yet (back to the delayed set)."""
        await self.queue.release(worker=self.name, job_ids=missed)
        not_due = [
            job
            for job in await self.jobs.pending_among(job_ids=missed)
            if job.run_at > timezone.now()
        ]
        if not_due:
            await self.queue.enqueue(entry_for(job) for job in not_due)

    async def _wait_for_work(self, next_due_ms: int | None) -> None:
        timeout = MAX_BLOCK_S
        if next_due_ms is not None:
            timeout = min(timeout, max(0.005, next_due_ms / 1000 - time.time()))
        await self._wait_first(self.queue.wait_for_wake(timeout))

    async def _wait_first(self, coro: object) -> None:
        """Wait for `coro` or for the stop signal, whichever comes first."""
        work = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (work, stop):
                if not fut.done():
                    fut.cancel()
            await asyncio.gather(work, stop, return_exceptions=True)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # --- one job ------------------------------------------------------------------------------
    async def _process_job(self, running: RunningJob) -> None:
        start = time.monotonic()
        outcome: Outcome | None = None
        running.progress = ProgressReporter(running.job, self.transitions.report_progress)
        try:
            outcome = await run_attempt(running.job, running.progress)
        except asyncio.CancelledError:
            if not (running.cancel_requested or running.shutdown):
                raise
        finally:
            # The outcome must be written even if this task is being cancelled: the write runs
            # as a task of its own, which stopping waits for.
            persist = asyncio.create_task(self._persist(running, outcome, start))
            self._persisting.add(persist)
            persist.add_done_callback(self._persisting.discard)
            await asyncio.shield(persist)

    async def _persist(self, running: RunningJob, outcome: Outcome | None, start: float) -> None:
        job = running.job
        running.persisting = True
        try:
            if running.progress is not None:
                await running.progress.close()
            written: Job | None = None
            if outcome is not None:
                # Batched with the outcomes of other jobs that finished meanwhile.
                written = await self.outcomes.submit(job, outcome)
            else:
                if running.shutdown:
                    written = await with_db_retries(self.transitions.put_back, job)
                # else: cancelled through the API, which already wrote CANCELLED.
                await self._release([str(job.id)])
            if written is not None:
                elapsed_ms = (time.monotonic() - start) * 1000
                error = f" error={written.error}" if written.error else ""
                self._log("%s in %.0f ms%s", written.status, elapsed_ms, error, job=written)
            elif outcome is not None:
                self._log("lease lost: outcome dropped", job=job, level=logging.WARNING)
        except Exception:
            self._log("could not persist outcome", job=job, level=logging.ERROR, exc_info=True)
            await self._release([str(job.id)])
        finally:
            self.running.pop(str(job.id), None)
            self.processed += 1
            self._slot_freed.set()
            self._check_recycle()

    async def _release(self, job_ids: list[str]) -> None:
        try:
            await self.queue.release(worker=self.name, job_ids=job_ids)
        except Exception as exc:
            self._log("release in Redis failed (%s)", exc, level=logging.WARNING)

    def _check_recycle(self) -> None:
        if self._stop.is_set():
            return
        if self.options.max_jobs and self.processed >= self.options.max_jobs:
            self._log("recycling: processed %s jobs", self.processed)
            self.stop()
        elif self.options.max_memory_mb and rss_mb() > self.options.max_memory_mb:
            self._log("recycling: RSS %.0f MiB over %s", rss_mb(), self.options.max_memory_mb)
            self.stop()

    # --- stopping -----------------------------------------------------------------------------
    async def drain(self) -> None:
        """Let running jobs finish within the grace period; put the rest back."""
        if self.running:
            self._log("waiting for %s running jobs", len(self.running))
            grace_end = time.monotonic() + self.options.grace_s
            while self.running and not self._cold.is_set():
                remaining = grace_end - time.monotonic()
                if remaining <= 0:
                    break
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wait_first(self._slot_freed.wait())
                        if self._cold.is_set():
                            break
        leftovers = list(self.running.values())
        for running in leftovers:
            running.shutdown = True
            if running.task is not None:
                running.task.cancel()
        tasks = [r.task for r in leftovers if r.task is not None]
        if tasks:
            self._log("put back %s unfinished jobs", len(tasks))
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._persisting, return_exceptions=True)
        # A task cancelled before its first step never ran its body: put its job back here.
        for running in list(self.running.values()):
            if not running.persisting:
                await self._persist(running, None, time.monotonic())

    # --- side tasks ---------------------------------------------------------------------------
    async def _beat(self) -> None:
        # The concurrency goes with the heartbeat: fair shares are fractions of the live slots.
        await self.queue.beat(worker=self.name, slots=self.options.concurrency)

    async def _heartbeat_forever(self) -> None:
        interval = max(0.5, self.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._beat()
                if self.running:
                    await self.jobs.heartbeat(worker=self.name, job_ids=list(self.running))
            except Exception as exc:
                self._log("heartbeat failed: %s", exc, level=logging.WARNING)

    async def _listen_for_cancels(self) -> None:
        """Stop the handler of a RUNNING job when the API cancels it (Redis pub/sub)."""
        delay = 0.1
        while True:
            try:
                async for job_id in self.queue.cancel_requests():
                    delay = 0.1
                    running = self.running.get(job_id)
                    if running is not None and running.task is not None:
                        running.cancel_requested = True
                        running.task.cancel()
                        self._log("cancelled by request", job=running.job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log(
                    "cancel listener lost Redis (%s); reconnecting", exc, level=logging.WARNING
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # --- logging ------------------------------------------------------------------------------
    def _log(
        self,
        msg: str,
        *args: object,
        job: Job | None = None,
        level: int = logging.INFO,
        exc_info: Any = False,
    ) -> None:
        """Log with the worker's context, and the job's when there is one (`extra` fields:
        top-level keys in JSON logs, a trailing `[key=value ...]` in plain ones)."""
        context: dict[str, object] = {}
        if job is not None:
            context = {
                "job_id": str(job.id),
                "tenant": job.tenant_id,
                "job_type": job.type,
                "attempt": job.attempts,
            }
        context["worker"] = self.name
        logger.log(level, msg, *args, exc_info=exc_info, extra=context)
