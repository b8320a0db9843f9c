"""Prometheus metrics, computed at scrape time from the database and Redis (the sources of
truth), so every API process reports the same numbers whichever worker did the work."""

from __future__ import annotations

import time
from collections.abc import Iterator

import redis
from django.conf import settings
from django.db.models import Count
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from jobs.models import Job
from jobs.queue import sync_queue


class JobQueueCollector(Collector):
    """Job counts by status and type, queue depth by state, workers alive."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "jobqueue_jobs", "Jobs in the database by status and type", labels=["status", "type"]
        )
        for row in Job.objects.values("status", "type").annotate(n=Count("id")).order_by():
            jobs.add_metric([row["status"], row["type"]], row["n"])
        yield jobs

        queue = sync_queue()
        client = queue.client
        try:
            tenants = [t.decode() for t in client.smembers(queue.key("active"))]
            pipe = client.pipeline(transaction=False)
            for tenant in tenants:
                pipe.zcard(queue.key("ready", tenant))
            pipe.zcard(queue.key("delayed"))
            pipe.hvals(queue.key("running"))
            cutoff = int((time.time() - settings.JOBS["LEASE_S"]) * 1000)
            pipe.zcount(queue.workers_key, cutoff, "+inf")
            *ready, delayed, running, workers = pipe.execute()
        except redis.RedisError:
            # The database figures above still go out; the queue's are unknown while Redis is.
            yield GaugeMetricFamily("jobqueue_redis_up", "Redis answered this scrape", value=0)
            return
        yield GaugeMetricFamily("jobqueue_redis_up", "Redis answered this scrape", value=1)

        depth = GaugeMetricFamily(
            "jobqueue_queue_depth", "Jobs in the Redis queue by state", labels=["state"]
        )
        depth.add_metric(["ready"], sum(ready))
        depth.add_metric(["delayed"], delayed)
        depth.add_metric(["running"], sum(int(v) for v in running))
        yield depth
        yield GaugeMetricFamily(
            "jobqueue_workers_alive", "Workers that heartbeated within the lease", value=workers
        )
        yield GaugeMetricFamily(
            "jobqueue_tenants_ready", "Tenants with runnable jobs", value=len(tenants)
        )


def render_metrics() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobQueueCollector())
    return generate_latest(registry)
