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
from jobs.queue import Queue, sync_queue

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
        try:
            alive_since_ms = int((time.time() - settings.JOBS["LEASE_S"]) * 1000)
            depths = queue.queue_depths(alive_since_ms=alive_since_ms)
        except redis.RedisError:
            # The database figures above still go out; the queue's are unknown while Redis is.
            yield GaugeMetricFamily("jobqueue_redis_up", "Redis answered this scrape", value=0)
            return
        yield GaugeMetricFamily("jobqueue_redis_up", "Redis answered this scrape", value=1)

        depth = GaugeMetricFamily(
            "jobqueue_queue_depth", "Jobs in the Redis queue by state", labels=["state"]
        )
        depth.add_metric(["ready"], depths.ready)
        depth.add_metric(["delayed"], depths.delayed)
        depth.add_metric(["running"], depths.running)
        yield depth
        yield GaugeMetricFamily(
            "jobqueue_workers_alive",
            "Workers that heartbeated within the lease",
            value=depths.workers_alive,
        )
        yield GaugeMetricFamily(
            "jobqueue_tenants_ready", "Tenants with runnable jobs", value=depths.tenants_ready
        )
        yield from self._events(queue)
        circuits = GaugeMetricFamily(
            "jobqueue_webhook_circuits_open",
            "Webhook destination hosts whose circuit breaker is open or half-open (1 each)",
            labels=["host", "state"],
        )
        for circuit in queue.open_circuits():
            circuits.add_metric([circuit.host, circuit.state], 1)
        yield circuits

    def _events(self, queue: Queue) -> Iterator[Metric]:
        """The counters and histograms every process adds to in Redis (jobs/counters.py)."""
        metrics = queue.job_event_metrics()
        families = {
            event: CounterMetricFamily(
                f"jobqueue_jobs_{event}",
                f"Jobs {event}, by type and tenant",
                labels=["type", "tenant"],
            )
            for event in counters.EVENTS
        }
        for count in metrics.events:
            if count.event in families:
                families[count.event].add_metric([count.job_type, count.tenant], count.count)
        yield from families.values()
        yield _histogram(
            "jobqueue_job_duration_seconds",
            "Time from start to outcome, by type",
            metrics.durations,
        )
        yield _histogram(
            "jobqueue_job_queue_wait_seconds", "Time from due to start, by type", metrics.waits
        )
        # Counted by each API process and summed over the live ones (realtime/limits.py).
        yield GaugeMetricFamily(
            "jobqueue_websocket_connections",
            "Open WebSocket connections (all API processes)",
            queue.open_sockets(),
        )


def _histogram(
    name: str, documentation: str, histograms: list[counters.Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["type"])
    bounds = [*(str(b) for b in counters.BUCKETS), "+Inf"]
    for histogram in histograms:
        cumulative = 0.0
        buckets = []
        for bound, observed in zip(bounds, histogram.buckets, strict=True):
            cumulative += observed
            buckets.append((bound, cumulative))
        family.add_metric([histogram.job_type], buckets, sum_value=histogram.sum)
    return family


def render_metrics() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobQueueCollector())
    return generate_latest(registry)
