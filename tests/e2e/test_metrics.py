"""/metrics against real processes: counters added by a separate worker process reach the
API's exposition, parsed with prometheus-client's own parser; without JOBS_METRICS_TOKEN (and
DEBUG off) the API does not serve it and says so at start-up."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from jobs.metrics import HIDDEN_NOTICE
from jobs.models import Job, JobStatus, Tenant
from jobs.services import api_key_create
from tests.support.stack import Stack, wait_until
from tests.support.webhook_server import webhook_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

METRICS_TOKEN = "e2e-metrics-token"


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(
        f"{stack.base_url}/metrics",
        headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    text = response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counters_from_a_worker_process_reach_metrics(stack: Stack) -> None:
    _, key = api_key_create(tenant=Tenant.objects.create(id="acme"))
    headers = {"Authorization": f"Bearer {key}"}
    stack.env["JOBS_METRICS_TOKEN"] = METRICS_TOKEN
    stack.start_api()
    with webhook_server() as server:
        server.statuses["/flaky"] = [500, 200]
        server.statuses["/gone"] = [404]
        jobs: list[dict[str, Any]] = [{"type": "sleep", "payload": {"delayMs": 10}}] * 3
        jobs += [
            {"type": "webhook", "payload": {"url": server.url("/flaky")}},
            {"type": "webhook", "payload": {"url": server.url("/gone")}},
        ]
        ids = httpx.post(
            f"{stack.base_url}/jobs/batch", json={"jobs": jobs}, headers=headers, timeout=10
        ).json()["jobIds"]
        later = httpx.post(
            f"{stack.base_url}/jobs",
            json={"type": "sleep", "payload": {"delayMs": 0}, "delayMs": 60_000},
            headers=headers,
        ).json()["id"]
        assert (
            httpx.post(f"{stack.base_url}/jobs/{later}/cancel", headers=headers).status_code == 200
        )
        stack.start_worker("--concurrency", "4")
        wait_until(
            lambda: (
                Job.objects.filter(
                    id__in=ids, status__in=[JobStatus.COMPLETED, JobStatus.FAILED]
                ).count()
                == 5
            ),
            timeout=30,
            message="jobs did not finish",
        )

        async def scrape_with_a_socket_open() -> dict:
            async with websockets.connect(f"{stack.ws_url}?token={key}") as ws:
                await ws.recv()  # CONNECTED
                return await asyncio.to_thread(scrape, stack)

        samples = asyncio.run(scrape_with_a_socket_open())

    def counter(event: str, job_type: str) -> float:
        return samples.get(
            (f"jobqueue_jobs_{event}_total", (("tenant", "acme"), ("type", job_type))), 0
        )

    assert counter("created", "sleep") == 4
    assert counter("created", "webhook") == 2
    assert counter("completed", "sleep") == 3
    assert counter("completed", "webhook") == 1
    assert counter("failed", "webhook") == 1
    assert counter("retried", "webhook") == 1
    assert counter("cancelled", "sleep") == 1
    assert samples[("jobqueue_job_duration_seconds_count", (("type", "sleep"),))] == 3
    assert (
        samples[("jobqueue_job_duration_seconds_bucket", (("le", "+Inf"), ("type", "sleep")))] == 3
    )
    assert samples[("jobqueue_job_queue_wait_seconds_count", (("type", "webhook"),))] == 3
    assert samples[("jobqueue_websocket_connections", ())] == 1
    assert samples[("jobqueue_workers_alive", ())] == 1
    assert samples[("jobqueue_redis_up", ())] == 1
    # The jobs gauge (counts kept by the database) agrees with what happened.
    assert samples[("jobqueue_jobs", (("status", "COMPLETED"), ("type", "sleep")))] == 3
    assert samples[("jobqueue_jobs", (("status", "COMPLETED"), ("type", "webhook")))] == 1
    assert samples[("jobqueue_jobs", (("status", "FAILED"), ("type", "webhook")))] == 1
    assert samples[("jobqueue_jobs", (("status", "CANCELLED"), ("type", "sleep")))] == 1
    assert httpx.get(f"{stack.base_url}/metrics").status_code == 401
    assert HIDDEN_NOTICE not in stack.log("api")


def test_metrics_are_hidden_without_a_token_and_start_up_says_how_to_enable_them(
    stack: Stack,
) -> None:
    stack.env.pop("JOBS_METRICS_TOKEN", None)
    stack.start_api(processes=2)  # one notice, not one per process
    response = httpx.get(f"{stack.base_url}/metrics", timeout=10)
    assert response.status_code == 404
    assert response.json() == {"error": "Not found"}
    assert stack.log("api").count(HIDDEN_NOTICE) == 1
