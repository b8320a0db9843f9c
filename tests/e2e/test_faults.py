"""Faults done for real against real processes: kill -9, Redis flushed, Redis killed and
restarted, database connections terminated, Redis or the database unreachable."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connection

from jobs.models import Job, JobStatus, Tenant
from jobs.services import api_key_create
from tests.support.redis_server import private_redis
from tests.support.stack import Stack, free_port, wait_until
from tests.support.updates import listen_to_tenant
from tests.support.webhook_server import webhook_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SLEEP_0 = {"type": "sleep", "payload": {"delayMs": 0}}


def tenant_and_key(tenant_id: str = "acme") -> tuple[Tenant, str]:
    tenant = Tenant.objects.create(id=tenant_id)
    _, key = api_key_create(tenant=tenant)
    return tenant, key


def post_job(stack: Stack, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/jobs", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )


def statuses(ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in Job.objects.filter(id__in=ids).values_list("status", flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


def all_completed(ids: list[str]) -> bool:
    return Job.objects.filter(id__in=ids, status=JobStatus.COMPLETED).count() == len(ids)


def test_kill_9_mid_job_is_recovered_by_another_worker(stack: Stack) -> None:
    tenant, key = tenant_and_key()
    stack.start_api()
    victim = stack.start_worker("--concurrency", "1", name="victim")
    with listen_to_tenant(tenant.id) as listener:
        job_id = post_job(stack, key, {"type": "sleep", "payload": {"delayMs": 4000}}).json()["id"]
        wait_until(
            lambda: Job.objects.filter(id=job_id, status=JobStatus.RUNNING).exists(),
            timeout=15,
            message="job did not start",
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        stack.start_worker("--concurrency", "1", name="rescuer")
        wait_until(lambda: all_completed([job_id]), timeout=20, message="job not recovered")
        recovery_s = time.monotonic() - killed_at
        time.sleep(0.5)  # let any duplicate broadcast arrive before counting
        job = Job.objects.get(id=job_id)
        assert job.attempts == 2
        assert job.locked_by == "rescuer"
        assert listener.statuses(job_id).count("COMPLETED") == 1
    lease_s = int(stack.env["JOBS_LEASE_S"])
    print(
        f"\nkill -9: recovered and completed {recovery_s:.1f}s after the kill (lease {lease_s}s,"
        f" job 4s), attempts={job.attempts}, COMPLETED broadcasts=1"
    )
    # Lease expiry, a recovery tick (lease/3), then the 4 s job itself.
    assert recovery_s < lease_s + 4 + 3, recovery_s
    assert "recovered from a dead worker" in stack.log("rescuer")


def test_redis_flushed_loses_no_job(stack: Stack, tmp_path: Path, settings: Any) -> None:
    _, key = tenant_and_key()
    with private_redis(tmp_path) as redis_server:
        stack.env["REDIS_URL"] = redis_server.url
        stack.env["JOBS_RECONCILE_INTERVAL_S"] = "1"
        stack.start_api()
        ready = [post_job(stack, key, SLEEP_0).json()["id"] for _ in range(20)]
        delayed = [
            post_job(stack, key, {**SLEEP_0, "delayMs": 1500}).json()["id"] for _ in range(5)
        ]
        assert redis_server.client().dbsize() > 0
        redis_server.client().flushall()  # a private server: nothing else lives there
        stack.start_worker("--concurrency", "5")
        wait_until(lambda: all_completed(ready + delayed), timeout=30, message="jobs lost")
        for job in Job.objects.filter(id__in=delayed):
            assert job.started_at >= job.run_at


def test_redis_killed_and_restarted_while_jobs_flow(stack: Stack, tmp_path: Path) -> None:
    _, key = tenant_and_key()
    with private_redis(tmp_path) as redis_server:
        stack.env["REDIS_URL"] = redis_server.url
        stack.env["JOBS_RECONCILE_INTERVAL_S"] = "1"
        stack.start_api()
        worker = stack.start_worker("--concurrency", "5")
        created: list[str] = []
        codes: list[int] = []
        stop = threading.Event()

        def produce() -> None:
            while not stop.is_set():
                response = post_job(stack, key, {"type": "sleep", "payload": {"delayMs": 20}})
                codes.append(response.status_code)
                if response.status_code == 201:
                    created.append(response.json()["id"])
                time.sleep(0.02)

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            time.sleep(1.0)
            redis_server.kill()
            before_restart = len(created)
            time.sleep(2.0)
            during_outage = len(created) - before_restart
            redis_server.start()
            time.sleep(1.0)
        finally:
            stop.set()
            producer.join()
        print(
            f"\nredis restart: {len(created)} jobs created, {during_outage} while Redis was down,"
            f" all 201"
        )
        assert set(codes) == {201}, "POST /jobs must stay 201 while Redis is down"
        assert during_outage > 0
        wait_until(
            lambda: all_completed(created),
            timeout=40,
            message=f"{statuses(created)} {stack.log('e2e-worker')[-3000:]}",
        )
        assert worker.poll() is None, "the worker must survive the Redis outage"
        assert Job.objects.filter(status=JobStatus.RUNNING).count() == 0


def test_database_connections_terminated_mid_run(stack: Stack) -> None:
    _, key = tenant_and_key()
    stack.env["DATABASE_URL"] += "?application_name=e2e-worker-db"
    api_env = dict(stack.env)
    stack.start_api()
    stack.env = api_env
    stack.start_worker("--concurrency", "8")
    ids = [
        post_job(stack, key, {"type": "sleep", "payload": {"delayMs": 200}}).json()["id"]
        for _ in range(60)
    ]
    terminated = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'e2e-worker-db' AND pid <> pg_backend_pid()"
            )
            terminated += len(cursor.fetchall())
        time.sleep(0.3)
    assert terminated > 0
    wait_until(lambda: all_completed(ids), timeout=60, message=f"{statuses(ids)}")
    print(f"\npg_terminate_backend: {terminated} worker connections terminated, 60/60 completed")
    assert Job.objects.filter(status=JobStatus.RUNNING).count() == 0


def test_redis_down_at_enqueue_still_201_and_runs_later(stack: Stack, tmp_path: Path) -> None:
    _, key = tenant_and_key()
    with private_redis(tmp_path) as redis_server:
        stack.env["REDIS_URL"] = redis_server.url
        stack.env["JOBS_RECONCILE_INTERVAL_S"] = "1"
        stack.start_api()
        redis_server.kill()
        response = post_job(stack, key, SLEEP_0)
        assert response.status_code == 201
        job_id = response.json()["id"]
        ready = httpx.get(f"{stack.base_url}/ready", timeout=10)
        assert ready.status_code == 503 and "redis" in ready.json()["error"]
        redis_server.start()
        stack.start_worker("--concurrency", "2")
        wait_until(lambda: all_completed([job_id]), timeout=20, message="job never ran")


def test_database_down_is_503_and_queues_nothing(stack: Stack, redis_client: Any) -> None:
    _, key = tenant_and_key()
    stack.env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{free_port()}/nowhere"
    stack.start_api()
    response = post_job(stack, key, SLEEP_0)
    assert response.status_code == 503
    assert response.json() == {"error": "Database unavailable"}
    assert response.headers["Retry-After"]
    prefix = stack.env["JOBS_REDIS_PREFIX"]
    assert list(redis_client.scan_iter(match=f"{prefix}:*:ready:*")) == []
    ready = httpx.get(f"{stack.base_url}/ready", timeout=10)
    assert ready.status_code == 503 and "database" in ready.json()["error"]


def test_three_workers_run_each_of_2000_webhooks_exactly_once(stack: Stack) -> None:
    _, key = tenant_and_key()
    stack.start_api()
    with webhook_server() as server:
        jobs = [
            {"type": "webhook", "payload": {"url": server.url(f"/hook/{i}")}} for i in range(2000)
        ]
        ids = stack.create_batch(key, jobs)
        for n in range(3):
            stack.start_worker("--concurrency", "16", name=f"w{n}")
        wait_until(lambda: all_completed(ids), timeout=120, message=f"{statuses(ids)}")
        paths = [call.path for call in server.calls()]
        assert len(paths) == 2000 and len(set(paths)) == 2000
    assert set(Job.objects.filter(id__in=ids).values_list("attempts", flat=True)) == {1}
    workers = set(Job.objects.filter(id__in=ids).values_list("locked_by", flat=True))
    assert workers <= {"w0", "w1", "w2"} and len(workers) >= 2
