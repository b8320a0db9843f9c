"""Cost of fair scheduling: drain throughput of no-op jobs spread over 1, 100 and 10,000
tenants (per-tenant ready sets served round robin) against one shared FIFO list, measured in
the same run with the same worker, database writes and broadcasts. Also the Redis-only cost of
the claim script itself.

    uv run python bench/fairness.py [--jobs 10000] [--runs 3] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import timedelta
from typing import Any

from common import Timer, clean_redis, median, setup_django, write_results

# A FIFO baseline: one list for everyone, claimed from the head. It keeps the processing hash
# and the running counts so release and requeue work unchanged.
FIFO_ENQUEUE = """
local list_key = prefix .. ':fifo'
local members_key = prefix .. ':fifo:members'
local n = 0
for i = 3, #ARGV, 4 do
  -- Deduplicated like the ready sets, so reconciliation's re-pushes cost it nothing either.
  if redis.call('SADD', members_key, ARGV[i + 1]) == 1 then
    redis.call('RPUSH', list_key, ARGV[i] .. '|' .. ARGV[i + 2] .. '|' .. ARGV[i + 1])
    n = n + 1
  end
end
wake(n, tonumber(ARGV[2]))
return n
"""
FIFO_CLAIM = """
local worker, count = ARGV[2], tonumber(ARGV[3])
local processing_key = prefix .. ':processing:' .. worker
local claimed = {}
local popped = redis.call('LPOP', prefix .. ':fifo', count)
if popped then
  for _, member in ipairs(popped) do
    local tenant, score, id = string.match(member, '^([^|]+)|([^|]+)|(.+)$')
    redis.call('SREM', prefix .. ':fifo:members', id)
    redis.call('HSET', processing_key, id, tenant .. '|' .. score)
    redis.call('HINCRBY', running_key, tenant, 1)
    claimed[#claimed + 1] = id
  end
end
return {claimed, -1}
"""


def fifo_queue_class() -> type:
    from jobs.queue import LUA_DIR, Queue

    common = (LUA_DIR / "_common.lua").read_text()

    class FifoQueue(Queue):
        def __init__(self, client: Any, prefix: str | None = None) -> None:
            super().__init__(client, prefix)
            self._enqueue = client.register_script(common + FIFO_ENQUEUE)
            self._claim = client.register_script(common + FIFO_CLAIM)

    return FifoQueue


def seed_jobs(n_jobs: int, n_tenants: int, queue: Any) -> None:
    """n_jobs no-op jobs spread round robin over n_tenants, committed then indexed."""
    from django.utils import timezone

    from jobs.models import Job, Tenant
    from jobs.queue import entry_for

    Job.objects.all().delete()
    Tenant.objects.bulk_create(
        [Tenant(id=f"t{i}") for i in range(n_tenants)], ignore_conflicts=True, batch_size=2000
    )
    now = timezone.now()
    jobs = [
        Job(
            id=uuid.uuid4(),
            tenant_id=f"t{i % n_tenants}",
            type="sleep",
            payload={"delayMs": 0},
            run_at=now,
            created_at=now + timedelta(microseconds=i),
            updated_at=now,
        )
        for i in range(n_jobs)
    ]
    Job.objects.bulk_create(jobs, batch_size=2000)
    for start in range(0, n_jobs, 1000):
        queue.enqueue(entry_for(job) for job in jobs[start : start + 1000])


def drain(queue_class: type, concurrency: int) -> float:
    from jobs.worker import Worker, WorkerOptions

    worker = Worker(
        WorkerOptions(name=f"bench-{uuid.uuid4().hex[:6]}", concurrency=concurrency, burst=True),
        queue_class=queue_class,
    )
    with Timer() as timer:
        asyncio.run(worker.run())
    return timer.elapsed


TENANT_COUNTS = (1, 100, 10_000)


def scenarios(fifo: type, fair: type) -> list[tuple[str, int, type]]:
    """FIFO and fair, each with the jobs spread over 1, 100 and 10,000 tenants: comparing the
    two at the same spread isolates the cost of the scheduling from the rest of the pipeline
    (with many tenants, for instance, a batch's broadcast becomes one message per tenant)."""
    return [
        (f"{kind}-{tenants}", tenants, queue_class)
        for tenants in TENANT_COUNTS
        for kind, queue_class in (("fifo", fifo), ("fair", fair))
    ]


def drain_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import redis as redis_lib
    from django.conf import settings

    from jobs.models import Job, JobStatus
    from jobs.queue import Queue

    sync = redis_lib.Redis.from_url(settings.REDIS_URL)
    plan = scenarios(fifo_queue_class(), Queue)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    for run in range(args.runs):
        # Interleaved, so drift of the shared machine hits every scenario alike; each pair
        # swaps its order every run, so neither design always runs second.
        ordered = [
            step
            for pair in zip(plan[0::2], plan[1::2], strict=True)
            for step in (pair if run % 2 == 0 else pair[::-1])
        ]
        for name, tenants, queue_class in ordered:
            clean_redis()
            seed_jobs(args.jobs, tenants, queue_class(sync))
            elapsed = drain(queue_class, args.concurrency)
            done = Job.objects.filter(status=JobStatus.COMPLETED).count()
            assert done == args.jobs, f"{name}: only {done} of {args.jobs} completed"
            rates[name].append(args.jobs / elapsed)
            print(f"run {run + 1} {name:>11}: {args.jobs / elapsed:8.0f} jobs/s", flush=True)
    sync.close()
    return {"median": {name: median(values) for name, values in rates.items()}, "samples": rates}


def claim_benchmark(args: argparse.Namespace) -> dict[str, float]:
    """Redis only: ids claimed (and released) per second by the claim script, 16 at a time."""
    import redis as redis_lib
    from django.conf import settings
    from django.utils import timezone

    from jobs.queue import Queue, QueueEntry, ready_score

    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    now_ms = int(time.time() * 1000)
    score = ready_score(priority=0, created_at=timezone.now())
    out: dict[str, list[float]] = {}
    for name, tenants, queue_class in scenarios(fifo_queue_class(), Queue):
        for _ in range(args.runs):
            clean_redis()
            queue = queue_class(client)
            n = 50_000
            for start in range(0, n, 2000):
                queue.enqueue(
                    QueueEntry(f"t{i % tenants}", f"job-{i}", score + i, now_ms)
                    for i in range(start, min(n, start + 2000))
                )
            claimed = 0
            with Timer() as timer:
                while True:
                    ids = queue.claim(worker="bench", count=16)[0]
                    if not ids:
                        break
                    claimed += len(ids)
                    queue.release(worker="bench", job_ids=[i.decode() for i in ids])
            assert claimed == n
            out.setdefault(name, []).append(n / timer.elapsed)
        print(f"claim+release {name:>11}: {median(out[name]):8.0f} ids/s", flush=True)
    client.close()
    return {name: median(values) for name, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--skip-drain", action="store_true")
    args = parser.parse_args()
    setup_django()
    try:
        claims = claim_benchmark(args)
        drains = {} if args.skip_drain else drain_benchmark(args)
    finally:
        clean_redis()
    medians = drains.get("median", {})
    print()
    print(
        f"{'tenants':>8} {'drain fifo':>11} {'drain fair':>11} {'fair/fifo':>10} "
        f"{'claim fifo':>11} {'claim fair':>11} {'fair/fifo':>10}"
    )
    for tenants in TENANT_COUNTS:
        fifo, fair = f"fifo-{tenants}", f"fair-{tenants}"
        drain_text = " " * 34
        if fifo in medians:
            drain_text = (
                f"{medians[fifo]:11.0f} {medians[fair]:11.0f} {medians[fair] / medians[fifo]:10.2f}"
            )
        print(
            f"{tenants:>8} {drain_text} {claims[fifo]:11.0f} {claims[fair]:11.0f} "
            f"{claims[fair] / claims[fifo]:10.2f}"
        )
    path = write_results(
        "fairness",
        {"args": vars(args), "drain_jobs_per_s": drains, "claim_ids_per_s": claims},
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
