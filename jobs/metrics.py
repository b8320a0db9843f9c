"""Prometheus metrics, read at scrape time from counts kept as jobs change (jobs/counts.py in the
database, jobs/counters.py in Redis), so every API process reports the same numbers whichever
worker did the work, and a scrape costs the same with ten jobs or ten million.

Who may read them: with JOBS_METRICS_TOKEN set, whoever sends it as a Bearer token; without it,
nobody unless DEBUG is on (the series name tenants and their volumes): /metrics answers 404 as
for any unknown path, and `manage.py serve` says at start-up how to turn it on."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterator

import redis
from django.conf import settings
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from jobs import counters
from jobs.counts import job_counts
from jobs.queue import sync_queue

logger = logging.getLogger(__name__)

HIDDEN_NOTICE = (
    "/metrics answers 404: set JOBS_METRICS_TOKEN and scrape with "
    "'Authorization: Bearer <token>' to enable it"
)


def metrics_exposed() -> bool:
    """Whether /metrics is served at all: with a token, or open in development (DEBUG)."""
    return bool(settings.JOBS["METRICS_TOKEN"]) or settings.DEBUG


def metrics_authorized(authorization: str) -> bool:
    """Whether an `Authorization` header value may read /metrics (call when it is exposed)."""
    token: str = settings.JOBS["METRICS_TOKEN"]
    if not token:
        return True
    given = authorization.removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), token.encode())


def log_metrics_access() -> None:
    """Say once, at API start-up, when /metrics is hidden and how to enable it."""
    if not metrics_exposed():
        logger.warning(HIDDEN_NOTICE)


class JobQueueCollector(Collector):
    """Job counts by status and type, queue depth by state, workers alive."""

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "jobqueue_jobs", "Jobs in the database by status and type", labels=["status", "type"]
        )
        for (status, job_type), n in sorted(job_counts().items()):
            jobs.add_metric([status, job_type], n)
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
        yield from self._events(client, queue.prefix)

    def _events(self, client: redis.Redis, prefix: str) -> Iterator[Metric]:
        """The counters and histograms every process adds to in Redis (jobs/counters.py)."""
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(f"{prefix}:metrics:events")
        pipe.hgetall(f"{prefix}:metrics:duration")
        pipe.hgetall(f"{prefix}:metrics:wait")
        counts, durations, waits = pipe.execute()
        families = {
            event: CounterMetricFamily(
                f"jobqueue_jobs_{event}",
                f"Jobs {event}, by type and tenant",
                labels=["type", "tenant"],
            )
            for event in counters.EVENTS
        }
        for field, value in sorted(counts.items()):
            event, job_type, tenant = field.decode().split("|", 2)
            if event in families:
                families[event].add_metric([job_type, tenant], int(value))
        yield from families.values()
        yield _histogram(
            "jobqueue_job_duration_seconds", "Time from start to outcome, by type", durations
        )
        yield _histogram(
            "jobqueue_job_queue_wait_seconds", "Time from due to start, by type", waits
        )
        # Counted by each API process and summed over the live ones (realtime/limits.py).
        from realtime.limits import open_connections_sync

        ws = open_connections_sync(client, prefix)
        yield GaugeMetricFamily(
            "jobqueue_websocket_connections", "Open WebSocket connections (all API processes)", ws
        )


def _histogram(name: str, documentation: str, raw: dict[bytes, bytes]) -> HistogramMetricFamily:
    by_type: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        job_type, part = field.decode().rsplit("|", 1)
        by_type.setdefault(job_type, {})[part] = float(value)
    family = HistogramMetricFamily(name, documentation, labels=["type"])
    bounds = [*(str(b) for b in counters.BUCKETS), "+Inf"]
    for job_type, parts in sorted(by_type.items()):
        cumulative = 0.0
        buckets = []
        for index, bound in enumerate(bounds):
            cumulative += parts.get(str(index), 0.0)
            buckets.append((bound, cumulative))
        family.add_metric([job_type], buckets, sum_value=parts.get("sum", 0.0))
    return family


def render_metrics() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobQueueCollector())
    return generate_latest(registry)
