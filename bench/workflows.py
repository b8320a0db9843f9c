"""Cost of settling a dependency's dependents (jobs/dependencies.py): one parent with N WAITING
children (1,000 by default) released when it completes, or cancelled when it fails, and a chain
of N jobs cancelled from its head. Reports the time of the settling transaction (median of the
runs), its statements, and the time of the Redis push and broadcast that follow it.

    uv run python bench/workflows.py [--children 1000] [--runs 5]

Uses a database of its own (`jobqueue_bench_workflows`, or `BENCH_DATABASE`), created and
migrated if missing, and a Redis prefix of its own, both emptied at the end.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from common import clean_redis, median, setup_django, write_results

TENANT = "bench-workflows"


def make_fan_out(children: int) -> Any:
    """A PENDING parent and `children` WAITING jobs after it (one batch)."""
    from jobs.models import Job, JobStatus
    from jobs.services import JobSpec, job_enqueue, job_enqueue_batch

    tenant = _tenant()
    parent, _ = job_enqueue(tenant=tenant, spec=JobSpec(type="sleep", payload={"delayMs": 0}))
    spec = JobSpec(type="sleep", payload={"delayMs": 0}, depends_on=(str(parent.id),))
    job_enqueue_batch(tenant=tenant, specs=[spec] * children)
    assert Job.objects.filter(tenant=tenant, status=JobStatus.WAITING).count() == children
    return parent


def make_chain(length: int) -> Any:
    """`length` jobs, each after the one before (one batch of `$<n>` references)."""
    from jobs.services import JobSpec, job_enqueue_batch

    specs = [JobSpec(type="sleep", payload={"delayMs": 0})]
    specs += [
        JobSpec(type="sleep", payload={"delayMs": 0}, depends_on=(f"${i}",))
        for i in range(length - 1)
    ]
    return job_enqueue_batch(tenant=_tenant(), specs=specs)[0]


def _tenant() -> Any:
    from jobs.models import Tenant

    return Tenant.objects.get_or_create(id=TENANT)[0]


def settle_once(parent: Any, status: str, expect: int) -> dict[str, float]:
    """End `parent` with `status`, then settle and publish its dependents, timed."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs import dependencies, lifecycle
    from jobs.models import Job

    Job.objects.filter(id=parent.id).update(status=status)
    started = time.perf_counter()
    with CaptureQueriesContext(connection) as queries:
        settled = dependencies.settle([parent.id])
    settle_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    lifecycle.publish_settled(settled)
    publish_ms = (time.perf_counter() - started) * 1000
    changed = len(settled.released) + len(settled.cancelled)
    assert changed == expect, (changed, expect)
    sql = [q["sql"].strip() for q in queries.captured_queries]
    assert sql[0] == "BEGIN" and sql[-1] == "COMMIT", sql
    return {"settle_ms": settle_ms, "publish_ms": publish_ms, "statements": len(sql) - 2}


def reset() -> None:
    from jobs.models import Job

    Job.objects.filter(tenant_id=TENANT).delete()
    clean_redis()


def run(children: int, runs: int) -> dict[str, Any]:
    cases = {
        "release": lambda: settle_once(make_fan_out(children), "COMPLETED", children),
        "cancel_fan_out": lambda: settle_once(make_fan_out(children), "FAILED", children),
        "cancel_chain": lambda: settle_once(make_chain(children), "FAILED", children - 1),
    }
    results: dict[str, Any] = {}
    for name, case in cases.items():
        samples = []
        for _ in range(runs):
            reset()
            samples.append(case())
        results[name] = {
            "settle_ms_median": round(median([s["settle_ms"] for s in samples]), 1),
            "settle_ms_all": [round(s["settle_ms"], 1) for s in samples],
            "publish_ms_median": round(median([s["publish_ms"] for s in samples]), 1),
            "statements": samples[0]["statements"],
        }
        print(
            f"{name:15} {children} jobs: settle {results[name]['settle_ms_median']} ms "
            f"(median of {runs}) in {results[name]['statements']} statements, one transaction; "
            f"publish {results[name]['publish_ms_median']} ms"
        )
    reset()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    setup_django(os.environ.get("BENCH_DATABASE", "jobqueue_bench_workflows"))
    results = run(args.children, args.runs)
    path = write_results("workflows", {"children": args.children, "runs": args.runs, **results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
