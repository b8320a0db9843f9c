"""The queue on a Redis Cluster for real: three masters and a replica of each on loopback ports
(tests/support/redis_cluster.py), the API and workers on `REDIS_CLUSTER_URL`, pub/sub on the
suite's plain Redis (`REDIS_URL`), the queue split into 16 shards (the default on a cluster).

Asserted, as a user would notice it: jobs of tenants whose shards live on different masters all
complete; a tenant flooding one shard does not hold up another tenant's few jobs in another
shard; a master killed (kill -9) while jobs flow loses no job (PostgreSQL is the truth, the
workers' reconciliation re-indexes PENDING rows Redis lost). Printed: the figures of
docs/scaling.md. And REDIS_URL pointed at a cluster node is refused at once (it must be a plain
server or a Sentinel set)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Max, Min
from django.utils import timezone

from jobs.models import Job, JobStatus, Tenant
from jobs.queue import Keys
from jobs.services import api_key_create
from tests.e2e.test_metrics import METRICS_TOKEN, scrape
from tests.support.redis_cluster import RedisCluster, redis_cluster
from tests.support.stack import Stack, producing, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SHARDS = 16
SLEEP_5 = {"type": "sleep", "payload": {"delayMs": 5}}
SLEEP_20 = {"type": "sleep", "payload": {"delayMs": 20}}


def tenants_on_masters(cluster: RedisCluster, count: int) -> list[str]:
    """Tenant ids whose queue shards are served by `count` different masters."""
    keys = Keys("any", SHARDS)
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        tenant = f"tenant-{n}"
        port = cluster.master_of(keys.shard(keys.shard_of(tenant))).port
        found.setdefault(port, tenant)
        n += 1
    return list(found.values())


def make_tenants(ids: list[str]) -> dict[str, str]:
    return {tid: api_key_create(tenant=Tenant.objects.create(id=tid))[1] for tid in ids}


def use_cluster(stack: Stack, cluster: RedisCluster) -> None:
    stack.env["REDIS_CLUSTER_URL"] = cluster.cluster_url
    stack.env["JOBS_QUEUE_SHARDS"] = str(SHARDS)


def all_completed(ids: list[str]) -> bool:
    return Job.objects.filter(id__in=ids, status=JobStatus.COMPLETED).count() == len(ids)


def test_redis_url_on_a_cluster_node_is_refused(stack: Stack, tmp_path: Path) -> None:
    with redis_cluster(tmp_path / "cluster") as cluster:
        stack.use_redis(cluster.url)
        use_cluster(stack, cluster)
        worker = stack.start_worker()
        code = worker.wait(timeout=30)
    assert code == 2
    log = stack.log("e2e-worker")
    assert "REDIS_URL names a Redis Cluster node" in log
    assert "REDIS_CLUSTER_URL" in log
    assert "start-up failed" not in log  # no retrying


def test_tenants_on_different_masters_all_complete_and_fairly(stack: Stack, tmp_path: Path) -> None:
    with redis_cluster(tmp_path / "cluster") as cluster:
        use_cluster(stack, cluster)
        tenants = tenants_on_masters(cluster, 3)
        keys = make_tenants([*tenants, "small"])
        stack.env["JOBS_METRICS_TOKEN"] = METRICS_TOKEN
        stack.start_api()
        started = time.monotonic()
        ids = {tid: stack.create_batch(keys[tid], [SLEEP_5] * 100) for tid in tenants}
        everything = [i for batch in ids.values() for i in batch]
        # /metrics reads the queue over every shard (no worker yet: all ready).
        before = scrape(stack)
        assert before[("jobqueue_queue_depth", (("state", "ready"),))] == 300
        assert before[("jobqueue_tenants_ready", ())] == 3
        for n in (1, 2):
            stack.start_worker("--concurrency", "4", name=f"w{n}")
        wait_until(lambda: all_completed(everything), timeout=60, message="jobs not completed")
        took = time.monotonic() - started
        after = scrape(stack)
        for tid in tenants:
            labels = (("tenant", tid), ("type", "sleep"))
            assert after[("jobqueue_jobs_completed_total", labels)] == 100
        assert after[("jobqueue_queue_depth", (("state", "ready"),))] == 0
        assert after[("jobqueue_workers_alive", ())] == 2
        # A flood in one shard; a small tenant in another shard sends 5 jobs once it drains.
        flood = tenants[0]
        small_shard = Keys("any", SHARDS).shard_of("small")
        assert small_shard != Keys("any", SHARDS).shard_of(flood)
        backlog = stack.create_batch(keys[flood], [SLEEP_20] * 1500)
        wait_until(
            lambda: Job.objects.filter(id__in=backlog, status=JobStatus.COMPLETED).count() >= 40,
            timeout=30,
            message="backlog not draining",
        )
        small = stack.create_batch(keys["small"], [SLEEP_20] * 5)
        wait_until(lambda: all_completed(small), timeout=30, message="small tenant starved")
        waits = [
            (job.started_at - job.created_at).total_seconds()
            for job in Job.objects.filter(id__in=small)
        ]
        backlog_left = Job.objects.filter(id__in=backlog).exclude(status=JobStatus.COMPLETED)
        left = backlog_left.count()
    per_master = {tid: len(batch) for tid, batch in ids.items()}
    print(
        f"\ncluster: {len(everything)} jobs of {len(tenants)} tenants on 3 masters "
        f"({per_master}) completed {took:.1f}s after the first request (the workers started "
        "after the first scrape); the small tenant's 5 jobs waited "
        f"{min(waits):.2f}-{max(waits):.2f}s to start while {left} of the flood's 1500 "
        "were still waiting"
    )
    assert left > 100, "the flood should still be queued when the small tenant's jobs ran"
    assert max(waits) < 2.0


def stall(ids: list[str], tenant: str, injected_at: datetime) -> dict[str, Any]:
    rows = list(
        Job.objects.filter(id__in=ids).values_list("tenant_id", "created_at", "finished_at")
    )
    finished = sorted(done for _, _, done in rows if done >= injected_at)
    gaps = [
        (b - a).total_seconds() for a, b in zip([injected_at, *finished], finished, strict=False)
    ]
    hit = [(created, done) for tid, created, done in rows if tid == tenant]
    return {
        "longest_gap_s": max(gaps, default=0.0),
        "longest_wait_s": max((d - c).total_seconds() for _, c, d in rows),
        "killed_shard_longest_wait_s": max((d - c).total_seconds() for c, d in hit),
        "killed_shard_first_done_after_s": min(
            ((d - injected_at).total_seconds() for c, d in hit if c >= injected_at),
            default=-1.0,
        ),
    }


def test_a_master_killed_while_jobs_flow_loses_no_job(stack: Stack, tmp_path: Path) -> None:
    with redis_cluster(tmp_path / "cluster") as cluster:
        use_cluster(stack, cluster)
        stack.env["JOBS_RECONCILE_INTERVAL_S"] = "2"
        tenants = tenants_on_masters(cluster, 3)
        keys = make_tenants(tenants)
        victim_tenant = tenants[0]
        shard_key = Keys("any", SHARDS).shard(Keys("any", SHARDS).shard_of(victim_tenant))
        victim = cluster.master_of(shard_key)
        stack.start_api()
        workers = [stack.start_worker("--concurrency", "4", name=f"w{n}") for n in (1, 2)]
        figures: dict[str, Any] = {}
        with producing(stack, list(keys.values())) as (created, failures):
            # Jobs flowing through both workers for a while first.
            wait_until(
                lambda: all("COMPLETED" in stack.log(name) for name in ("w1", "w2")),
                timeout=30,
                message="workers not running jobs",
            )
            time.sleep(1)
            injected_at = timezone.now()
            injected = time.monotonic()
            victim.kill()  # kill -9
            figures["cluster_ok_s"] = cluster.wait_moved(shard_key, victim, timeout=30)
            time.sleep(3)
        figures["created"] = len(created)
        wait_until(lambda: all_completed(created), timeout=40, message="jobs lost")
        figures["all_completed_s"] = time.monotonic() - injected
        assert [proc.poll() for proc in workers] == [None, None], "workers survive"
    lost = Job.objects.filter(id__in=created).exclude(status=JobStatus.COMPLETED).count()
    assert lost == 0
    assert not Job.objects.filter(status__in=[JobStatus.PENDING, JobStatus.RUNNING]).exists()
    figures.update(stall(created, victim_tenant, injected_at))
    figures["retried"] = Job.objects.filter(id__in=created, attempts__gt=1).count()
    figures["failures"] = len(failures)
    span = Job.objects.filter(id__in=created).aggregate(
        first=Min("created_at"), last=Max("created_at")
    )
    print(
        f"\nmaster killed: {figures['created']} jobs created over "
        f"{(span['last'] - span['first']).total_seconds():.1f}s, 0 lost; cluster ok again after "
        f"{figures['cluster_ok_s']:.1f}s; no job completed for {figures['longest_gap_s']:.1f}s "
        f"at most; the killed master's tenant: first job created after the kill done after "
        f"{figures['killed_shard_first_done_after_s']:.1f}s, longest wait "
        f"{figures['killed_shard_longest_wait_s']:.1f}s; longest wait overall "
        f"{figures['longest_wait_s']:.1f}s; all completed {figures['all_completed_s']:.1f}s "
        f"after the kill; {figures['retried']} jobs run more than once; "
        f"{figures['failures']} failed requests"
    )
    assert figures["all_completed_s"] < 40
