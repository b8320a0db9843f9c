"""The worker: claims jobs from Redis round robin, runs their handlers, writes their outcome.

One class of small coroutines. A semaphore-like slot count bounds concurrency, an event signals
stop, and the final status write is shielded from cancellation. The worker only talks to the
queue (Redis), the store (PostgreSQL) and the broadcaster (Redis pub/sub).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings
from django.utils import timezone
from pydantic import ValidationError

from jobs import counters, pg
from jobs.handlers import JobContext, PermanentError, get_handler
from jobs.models import Job, JobStatus
from jobs.queue import Queue, entry_for, parse_claim
from jobs.store import JobStore, Outcome
from realtime.broadcast import abroadcast

logger = logging.getLogger("jobs.worker")

RECONCILE_BATCH = 1000
# Outcomes of jobs that finish close together are written in one transaction; a batch takes
# whatever is waiting (no timer), so nothing waits for a batch to fill.
MAX_WRITE_BATCH = 500
PROGRESS_INTERVAL_S = 0.5
RECONCILE_LOCK = "reconcile"
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


def error_text(exc: BaseException) -> str:
    """A job's `error`: handlers' own errors speak for themselves; others carry their type."""
    message = str(exc)
    if type(exc).__module__.startswith("jobs.handlers") and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class ProgressReporter:
    """Stores and broadcasts a running job's progress, at most once per PROGRESS_INTERVAL_S;
    reports in between are coalesced (the latest wins). Safe to call from handler threads."""

    def __init__(self, worker: Worker, job: Job) -> None:
        self.worker = worker
        self.job = job
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
                written = await self.worker.store.set_progress(
                    job=self.job, percent=percent, message=message
                )
                if written is not None:
                    await abroadcast(self.worker.redis, [written])
            except Exception as exc:
                self.worker._log(
                    "progress not stored (%s)", exc, job=self.job, level=logging.WARNING
                )

    async def close(self) -> None:
        """Stop before the outcome is written, so no progress frame follows the final one."""
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@dataclass
class RunningJob:
    job: Job
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    shutdown: bool = False
    persisting: bool = False
    progress: ProgressReporter | None = None


@dataclass
class PendingWrite:
    """An attempt's outcome waiting for the next batched write."""

    job: Job
    outcome: Outcome
    done: asyncio.Future[Job | None]


@dataclass
class WorkerOptions:
    name: str = field(default_factory=default_worker_name)
    concurrency: int = 10
    burst: bool = False
    max_jobs: int | None = None
    max_memory_mb: int | None = None
    grace_s: float = 30.0


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
        self.redis = redis_client or aioredis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=None, socket_connect_timeout=5
        )
        self.queue = queue_class(self.redis)
        self.store = JobStore(threads=min(8, max(2, options.concurrency // 4 + 2)))
        self.lease_s: int = settings.JOBS["LEASE_S"]
        self.reconcile_interval_s: int = settings.JOBS["RECONCILE_INTERVAL_S"]
        self._running: dict[str, RunningJob] = {}
        self._slot_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._cold = asyncio.Event()
        self._processed = 0
        self._background: list[asyncio.Task[None]] = []
        self._persisting: set[asyncio.Task[None]] = set()
        self._writes: asyncio.Queue[PendingWrite] = asyncio.Queue()

    # --- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until stopped; returns the process exit code (0 for a clean stop)."""
        self._log("started concurrency=%s burst=%s", self.options.concurrency, self.options.burst)
        await self._start_up()
        self._background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
            asyncio.create_task(self._cancel_listener(), name="cancel-listener"),
            asyncio.create_task(self._write_outcomes_loop(), name="outcome-writer"),
        ]
        try:
            await self._fetch_and_process_jobs()
            await self._drain()
        finally:
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self._unregister()
            self.store.close()
            await pg.close_pools()
            await self.redis.aclose()
        self._log("stopped after %s jobs", self._processed)
        return 0

    async def _start_up(self) -> None:
        """Register, copy tenant limits and, in burst mode, recover and reconcile first (a burst
        run must see what Redis lost before it decides nothing is left). Waits out outages."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                # Claims left under this name by an earlier process that died go back first.
                await self.queue.requeue(worker=self.name)
                await self._beat_redis()
                await self.queue.replace_tenant_limits(await self.store.tenant_limits())
                if self.options.burst:
                    await self.recover()
                    await self.reconcile()
                return
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

    # --- the main loop ------------------------------------------------------------------------
    async def _fetch_and_process_jobs(self) -> None:
        """Claim one job per free slot (never more), start them, block when nothing is ready."""
        backoff = 0.1
        while not self._stop.is_set():
            free = self.options.concurrency - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                handed_out, next_due_ms = await self._claim_and_start(free)
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
                if not self._running and not due_soon:
                    self._log("burst: no runnable job left")
                    self._stop.set()
                    break
                if self._running and not due_soon:
                    self._slot_freed.clear()
                    await self._wait_first(self._slot_freed.wait())
                    continue
            await self._wait_for_work(next_due_ms)

    async def _claim_and_start(self, free: int) -> tuple[int, int | None]:
        """Claim up to `free` jobs and start them; returns how many ids Redis handed out (some
        may have been stale) and when the next delayed job is due."""
        claimed = parse_claim(await self.queue.claim(worker=self.name, count=free))
        if not claimed.job_ids:
            return 0, claimed.next_due_ms
        try:
            jobs = await self.store.claim(job_ids=claimed.job_ids, worker=self.name)
        except Exception:
            # The ids must not stay claimed by us in Redis while the database is away.
            await self.queue.requeue(worker=self.name, job_ids=claimed.job_ids)
            raise
        missed = set(claimed.job_ids) - {str(job.id) for job in jobs}
        if missed:
            await self._handle_missed(missed)
        for job in jobs:
            self._running[str(job.id)] = RunningJob(job=job)
        await abroadcast(self.redis, jobs)
        if jobs:
            await self._record_metrics(counters.record_starts, jobs)
        for job in jobs:
            running = self._running[str(job.id)]
            running.task = asyncio.create_task(self._process_job(running), name=f"job-{job.id}")
        return len(claimed.job_ids), claimed.next_due_ms

    async def _handle_missed(self, missed: set[str]) -> None:
        """Ids Redis handed out that the database did not let us claim: already taken,
        finished or cancelled (dropped), or not due yet (back to the delayed set)."""
        await self.queue.release(worker=self.name, job_ids=missed)
        not_due = [
            job
            for job in await self.store.pending_among(job_ids=missed)
            if job.run_at > timezone.now()
        ]
        if not_due:
            await self.queue.enqueue(entry_for(job) for job in not_due)

    async def _wait_for_work(self, next_due_ms: int | None) -> None:
        timeout = MAX_BLOCK_S
        if next_due_ms is not None:
            timeout = min(timeout, max(0.005, next_due_ms / 1000 - time.time()))
        await self._wait_first(self._block_on_wake(timeout))

    async def _block_on_wake(self, seconds: float) -> None:
        # BLPOP's timeout has a resolution of 1 ms in Redis >= 6.
        await self.redis.blpop([self.queue.wake_key], timeout=max(seconds, 0.001))

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
        job = running.job
        start = time.monotonic()
        outcome: Outcome | None = None
        running.progress = ProgressReporter(self, job)
        try:
            outcome = await self._execute(job, running.progress)
        except asyncio.CancelledError:
            if not (running.cancel_requested or running.shutdown):
                raise
        finally:
            # The outcome must be written even if this task is being cancelled: the write runs
            # as a task of its own, which stopping waits for.
            persist = asyncio.create_task(self._persist_job_status(running, outcome, start))
            self._persisting.add(persist)
            persist.add_done_callback(self._persisting.discard)
            await asyncio.shield(persist)

    async def _execute(self, job: Job, progress: ProgressReporter) -> Outcome:
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
        ctx = JobContext(
            job_id=str(job.id),
            tenant=job.tenant_id,
            type=job.type,
            attempt=job.attempts,
            max_attempts=job.max_attempts,
            on_progress=progress.report,
        )
        try:
            async with asyncio.timeout(timeout):
                if spec.is_async:
                    result = await spec.func(payload, ctx)
                else:
                    # Blocking handlers run in a thread so heartbeats keep flowing.
                    result = await asyncio.to_thread(spec.func, payload, ctx)
            json.dumps(result)
        except TimeoutError:
            return Outcome(error=f"timed out after {timeout:g}s")
        except PermanentError as exc:
            return Outcome(error=str(exc) or type(exc).__name__, permanent=True)
        except Exception as exc:
            self._log("handler raised", job=job, level=logging.WARNING, exc_info=True)
            return Outcome(error=error_text(exc))
        return Outcome(result=result)

    async def _persist_job_status(
        self, running: RunningJob, outcome: Outcome | None, start: float
    ) -> None:
        job = running.job
        job_id = str(job.id)
        running.persisting = True
        try:
            if running.progress is not None:
                await running.progress.close()
            written: Job | None = None
            if outcome is not None:
                # Batched with the outcomes of other jobs that finished meanwhile.
                done: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
                self._writes.put_nowait(PendingWrite(job=job, outcome=outcome, done=done))
                written = await done
            else:
                if running.shutdown:
                    written = await self._with_db_retries(self.store.put_back, job=job)
                    if written is not None:
                        await self._after_write([written], count=False)
                # else: cancelled through the API, which already wrote CANCELLED.
                await self._release([job_id])
            if written is not None:
                self._log(
                    "%s in %.0f ms%s",
                    written.status,
                    (time.monotonic() - start) * 1000,
                    f" error={written.error}" if written.error else "",
                    job=written,
                )
            elif outcome is not None:
                self._log("lease lost: outcome dropped", job=job, level=logging.WARNING)
        except Exception:
            self._log("could not persist outcome", job=job, level=logging.ERROR, exc_info=True)
        finally:
            self._running.pop(job_id, None)
            self._processed += 1
            self._slot_freed.set()
            self._check_recycle()

    async def _write_outcomes_loop(self) -> None:
        """Take every outcome waiting and write them together: one transaction, one Redis call
        for the retries, one broadcast per tenant, one release."""
        while True:
            batch = [await self._writes.get()]
            while len(batch) < MAX_WRITE_BATCH and not self._writes.empty():
                batch.append(self._writes.get_nowait())
            await self._write_outcomes(batch)

    async def _write_outcomes(self, batch: list[PendingWrite]) -> None:
        ids = [str(item.job.id) for item in batch]
        try:
            written = await self._with_db_retries(
                self.store.finish_many, items=[(item.job, item.outcome) for item in batch]
            )
        except Exception as exc:
            await self._release(ids)
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        await self._after_write([job for job in written if job is not None])
        await self._release(ids)
        for item, job in zip(batch, written, strict=True):
            if not item.done.done():
                item.done.set_result(job)

    async def _after_write(self, jobs: list[Job], *, count: bool = True) -> None:
        """After the database write: queue the retries, broadcast every change, count them
        (a job put back on shutdown is queued and broadcast, not counted as a retry)."""
        retries = [job for job in jobs if job.status == JobStatus.PENDING]
        if retries:
            try:
                await self.queue.enqueue(entry_for(job) for job in retries)
            except Exception as exc:
                # Written PENDING in the database: reconciliation will queue them.
                self._log("retries not queued (%s)", exc, level=logging.WARNING)
        await abroadcast(self.redis, jobs)
        if count:
            await self._record_metrics(counters.record_outcomes, jobs, timezone.now())

    async def _record_metrics(self, record: Any, *args: Any) -> None:
        """Add to the Redis-kept counters (one pipelined round trip); never fails a job."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            record(pipe, self.queue.prefix, *args)
            await pipe.execute()
        except Exception as exc:
            self._log("metrics not recorded (%s)", exc, level=logging.WARNING)

    async def _release(self, job_ids: list[str]) -> None:
        try:
            await self.queue.release(worker=self.name, job_ids=job_ids)
        except Exception as exc:
            self._log("release in Redis failed (%s)", exc, level=logging.WARNING)

    async def _with_db_retries(self, fn, **kwargs):  # type: ignore[no-untyped-def]
        """Retry a fenced write while the database is unreachable, up to about one lease."""
        deadline = time.monotonic() + self.lease_s
        delay = 0.1
        while True:
            try:
                return await fn(**kwargs)
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise
                self._log("database write failed (%s); retrying", exc, level=logging.WARNING)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _check_recycle(self) -> None:
        if self._stop.is_set():
            return
        if self.options.max_jobs and self._processed >= self.options.max_jobs:
            self._log("recycling: processed %s jobs", self._processed)
            self.stop()
        elif self.options.max_memory_mb and rss_mb() > self.options.max_memory_mb:
            self._log("recycling: RSS %.0f MiB over %s", rss_mb(), self.options.max_memory_mb)
            self.stop()

    # --- stopping -----------------------------------------------------------------------------
    async def _drain(self) -> None:
        """Let running jobs finish within the grace period; put the rest back."""
        if self._running:
            self._log("waiting for %s running jobs", len(self._running))
            grace_end = time.monotonic() + self.options.grace_s
            while self._running and not self._cold.is_set():
                remaining = grace_end - time.monotonic()
                if remaining <= 0:
                    break
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wait_first(self._slot_freed.wait())
                        if self._cold.is_set():
                            break
        leftovers = list(self._running.values())
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
        for running in list(self._running.values()):
            if not running.persisting:
                await self._persist_job_status(running, None, time.monotonic())

    async def _unregister(self) -> None:
        try:
            await self.queue.requeue(worker=self.name)
        except Exception:
            self._log("could not unregister from Redis", level=logging.WARNING, exc_info=True)

    # --- background coroutines ----------------------------------------------------------------
    async def _beat_redis(self) -> None:
        # The concurrency goes with the heartbeat: fair shares are fractions of the live slots.
        await self.queue.beat(worker=self.name, slots=self.options.concurrency)

    async def _update_heartbeat(self) -> None:
        await self._beat_redis()
        if self._running:
            await self.store.heartbeat(worker=self.name, job_ids=list(self._running))

    async def _heartbeat_loop(self) -> None:
        interval = max(0.5, self.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._update_heartbeat()
            except Exception as exc:
                self._log("heartbeat failed: %s", exc, level=logging.WARNING)

    async def _maintenance_loop(self) -> None:
        """Recover dead workers' jobs, copy tenant limits and reconcile Redis with the database,
        periodically. Each task runs and fails on its own: one that keeps failing (a row it
        cannot read, say) must not stop the others for every tenant."""
        recovery_every = max(0.5, self.lease_s / 3)
        last_reconcile = 0.0
        while True:
            await self._maintain("recovery", self.recover)
            await self._maintain("limit sync", self._sync_limits)
            if time.monotonic() - last_reconcile >= self.reconcile_interval_s:
                last_reconcile = time.monotonic()
                await self._maintain("reconciliation", self.reconcile)
            await asyncio.sleep(recovery_every)

    async def _maintain(self, task: str, run: Any) -> None:
        try:
            await run()
        except Exception as exc:
            self._log("maintenance failed: %s: %s", task, exc, level=logging.WARNING)

    async def _sync_limits(self) -> None:
        await self.queue.replace_tenant_limits(await self.store.tenant_limits())

    async def _lock(self, name: str, ttl_s: float) -> bool:
        return bool(
            await self.redis.set(
                self.queue.key("lock", name), self.name, nx=True, px=int(ttl_s * 1000)
            )
        )

    async def recover(self) -> int:
        """Put back what dead workers held: their Redis claims and their expired leases."""
        cutoff = int((time.time() - self.lease_s) * 1000)
        dead = await self.redis.zrangebyscore(self.queue.workers_key, "-inf", cutoff)
        for raw in dead:
            name = raw.decode()
            if name != self.name:
                count = await self.queue.requeue(worker=name)
                self._log("worker %s is gone: requeued %s claimed ids", name, count)
        recovered = await self.store.recover_expired()
        if recovered:
            pending = [job for job in recovered if job.status == JobStatus.PENDING]
            if pending:
                await self.queue.enqueue(entry_for(job) for job in pending)
            await abroadcast(self.redis, recovered)
            await self._record_metrics(counters.record_outcomes, recovered, timezone.now())
            for job in recovered:
                self._log("recovered from a dead worker -> %s", job.status, job=job)
        return len(recovered)

    async def reconcile(self) -> int:
        """Push PENDING jobs due soon that Redis may have lost (flushed, restarted, push lost).
        Pushing an id that is already there is a no-op; one worker at a time does it."""
        if not await self._lock(RECONCILE_LOCK, ttl_s=max(5.0, self.reconcile_interval_s / 2)):
            return 0
        horizon = timezone.now() + timedelta(seconds=self.reconcile_interval_s)
        after = None
        pushed = 0
        while True:
            batch = await self.store.pending(after=after, horizon=horizon, limit=RECONCILE_BATCH)
            if not batch:
                break
            await self.queue.enqueue(entry_for(job) for job in batch)
            pushed += len(batch)
            after = batch[-1].created_at
            if len(batch) < RECONCILE_BATCH:
                break
        return pushed

    async def _cancel_listener(self) -> None:
        """Stop the handler of a RUNNING job when the API cancels it (Redis pub/sub)."""
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.queue.cancel_channel)
                delay = 0.1
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    running = self._running.get(message["data"].decode())
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
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # --- logging ------------------------------------------------------------------------------
    def _log(
        self,
        msg: str,
        *args: object,
        job: Job | None = None,
        level: int = logging.INFO,
        exc_info: bool = False,
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
