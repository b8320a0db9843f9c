"""The staff dashboard's page and JSON stats, on the real PostgreSQL and Redis."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from dashboard.selectors import THROUGHPUT_BUCKETS, job_throughput
from jobs.models import Job, JobStatus, Tenant
from jobs.queue import entry_for, sync_queue
from jobs.services import schedule_create
from tests.support.jobs import make_job
from tests.support.users import create_operator

pytestmark = pytest.mark.django_db

DASHBOARD_URL = "/dashboard/"
STATS_URL = "/dashboard/api/stats"
LOGIN_REDIRECT = "/admin/login/?next=/dashboard/"


def stats_of(client: Client, **params: str) -> dict[str, Any]:
    response = client.get(STATS_URL, params)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    assert "no-cache" in response["Cache-Control"]
    return response.json()


def tenant_row(stats: dict[str, Any], tenant_id: str) -> dict[str, Any]:
    return next(row for row in stats["tenants"] if row["id"] == tenant_id)


# --- access -------------------------------------------------------------------------------------
def test_staff_sees_the_dashboard_with_its_data_and_scripts(
    staff_client: Client, tenant: Tenant
) -> None:
    make_job(tenant, status=JobStatus.FAILED)

    response = staff_client.get(DASHBOARD_URL)

    assert response.status_code == 200
    content = response.content.decode()
    assert "<title>Live dashboard" in content
    assert 'id="dashboard-config"' in content
    assert 'id="dashboard-initial-stats"' in content
    assert "/static/dashboard/dashboard.js" in content
    assert "/static/dashboard/dashboard.css" in content
    config = response.context["page_config"]
    assert config["statsUrl"] == STATS_URL
    assert config["wsPath"] == "/ws"
    assert config["tenant"] is None
    assert config["jobUrl"].replace(config["jobIdPlaceholder"], "x") == "/admin/jobs/job/x/change/"
    initial = response.context["initial_stats"]
    assert initial["totals"]["FAILED"] == 1
    assert [row["id"] for row in initial["tenants"]] == ["tenant-1"]


def test_the_static_files_are_served_from_the_repository(staff_client: Client) -> None:
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "css")):
        response = staff_client.get(f"/static/dashboard/{name}")
        assert response.status_code == 200
        assert kind in response["Content-Type"]


def test_anonymous_and_non_staff_users_are_sent_to_the_admin_login(
    client: Client, customer_client: Client
) -> None:
    for refused in (client, customer_client):
        response = refused.get(DASHBOARD_URL)
        assert response.status_code == 302
        assert response["Location"] == LOGIN_REDIRECT

    login_page = customer_client.get(DASHBOARD_URL, follow=True)
    assert "You are authenticated as customer" in login_page.content.decode()


def test_the_stats_api_refuses_anonymous_and_non_staff_users_with_403(
    client: Client, customer_client: Client, tenant: Tenant
) -> None:
    for refused in (client, customer_client):
        response = refused.get(STATS_URL)
        assert response.status_code == 403
        assert response.json() == {
            "error": "Staff session with the jobs.view_job permission required"
        }


def test_staff_without_the_permission_to_view_jobs_sees_neither_page_nor_stats(
    tenant: Tenant,
) -> None:
    # Every tenant's figures are on these pages: is_staff alone (the admin's door) is not enough.
    client = Client()
    client.force_login(create_operator("intern", can_view_jobs=False))
    assert client.get(DASHBOARD_URL).status_code == 403
    assert client.get(STATS_URL).status_code == 403


def test_an_unknown_tenant_filter_is_a_404(staff_client: Client, tenant: Tenant) -> None:
    page = staff_client.get(DASHBOARD_URL, {"tenant": "nope"})
    api = staff_client.get(STATS_URL, {"tenant": "nope"})

    assert page.status_code == 404
    assert "Unknown tenant" in page.content.decode()
    assert api.status_code == 404
    assert api.json() == {"error": "Unknown tenant nope"}


# --- numbers ------------------------------------------------------------------------------------
def test_stats_count_jobs_by_status_and_tenant_with_queue_depth(
    staff_client: Client, tenant: Tenant, other_tenant: Tenant
) -> None:
    underscored = Tenant.objects.create(id="acme_corp", name="Acme", is_active=False)
    ready = [make_job(tenant), make_job(tenant)]
    sync_queue().enqueue(entry_for(job) for job in ready)
    make_job(tenant, run_at=timezone.now() + timedelta(hours=1))  # delayed
    make_job(tenant, status=JobStatus.RUNNING, locked_by="w1")
    make_job(tenant, status=JobStatus.COMPLETED)
    make_job(other_tenant, status=JobStatus.FAILED)
    make_job(other_tenant, status=JobStatus.CANCELLED)

    stats = stats_of(staff_client)

    assert stats["tenant"] is None
    assert stats["statuses"] == [
        "WAITING",
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
    ]
    assert stats["totals"] == {
        "WAITING": 0,
        "PENDING": 3,
        "RUNNING": 1,
        "COMPLETED": 1,
        "FAILED": 1,
        "CANCELLED": 1,
    }
    assert [row["id"] for row in stats["tenants"]] == ["acme_corp", "tenant-1", "tenant-2"]
    assert stats["tenantsTotal"] == 3
    first = tenant_row(stats, "tenant-1")
    assert first["counts"] == {
        "WAITING": 0,
        "PENDING": 3,
        "RUNNING": 1,
        "COMPLETED": 1,
        "FAILED": 0,
        "CANCELLED": 0,
    }
    assert first["total"] == 5
    assert first["queue"] == {"ready": 2, "delayed": 1, "running": 1}
    assert tenant_row(stats, "tenant-2")["queue"] == {"ready": 0, "delayed": 0, "running": 0}
    empty = tenant_row(stats, "acme_corp")
    assert empty["total"] == 0
    assert empty["isActive"] is False
    assert stats["redisOk"] is True
    # Links to the admin, with the admin's escaping of "_" in primary keys.
    assert empty["adminUrl"] == "/admin/jobs/tenant/acme_5Fcorp/change/"
    assert empty["jobsUrl"] == "/admin/jobs/job/?tenant__id__exact=acme_corp"
    assert empty["dashboardUrl"] == "/dashboard/?tenant=acme_corp"
    assert underscored.id == empty["id"]


def test_the_tenant_filter_narrows_counts_queue_and_throughput(
    staff_client: Client, tenant: Tenant, other_tenant: Tenant
) -> None:
    make_job(tenant, status=JobStatus.COMPLETED)
    make_job(other_tenant, status=JobStatus.COMPLETED)
    make_job(other_tenant, status=JobStatus.FAILED)
    make_job(other_tenant, status=JobStatus.RUNNING, locked_by="w1")

    stats = stats_of(staff_client, tenant="tenant-2")
    page = staff_client.get(DASHBOARD_URL, {"tenant": "tenant-2"})

    assert stats["tenant"] == "tenant-2"
    assert stats["totals"] == {
        "WAITING": 0,
        "PENDING": 0,
        "RUNNING": 1,
        "COMPLETED": 1,
        "FAILED": 1,
        "CANCELLED": 0,
    }
    assert [row["id"] for row in stats["tenants"]] == ["tenant-2"]
    assert stats["tenants"][0]["queue"]["running"] == 1
    buckets = stats["throughput"]["buckets"]
    assert sum(b["completed"] for b in buckets) == 1
    assert sum(b["failed"] for b in buckets) == 1
    assert page.status_code == 200
    assert page.context["page_config"]["tenant"] == "tenant-2"
    assert '<option value="tenant-2" selected>' in page.content.decode()


def test_throughput_counts_finished_jobs_per_10_second_bucket(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    now = datetime(2025, 1, 1, 12, 0, 5, 250000, tzinfo=UTC)

    def at(*hms: int) -> datetime:
        return datetime(2025, 1, 1, *hms, tzinfo=UTC)

    make_job(tenant, status=JobStatus.COMPLETED, finished_at=now - timedelta(seconds=1))
    make_job(tenant, status=JobStatus.COMPLETED, finished_at=at(12, 0, 0))  # bucket start
    make_job(tenant, status=JobStatus.FAILED, finished_at=at(11, 59, 59, 999999))
    make_job(tenant, status=JobStatus.COMPLETED, finished_at=at(11, 50, 10))  # oldest bucket
    make_job(tenant, status=JobStatus.COMPLETED, finished_at=at(11, 50, 9, 999999))  # too old
    make_job(tenant, status=JobStatus.CANCELLED, finished_at=at(12, 0, 1))  # not throughput
    make_job(other_tenant, status=JobStatus.FAILED, finished_at=at(12, 0, 2))

    everyone = job_throughput(now=now)
    only_first = job_throughput(tenant_id="tenant-1", now=now)

    assert len(everyone) == THROUGHPUT_BUCKETS == 60
    assert everyone[0].start == at(11, 50, 10)
    assert everyone[-1].start == at(12, 0, 0)
    assert all(b.start - a.start == timedelta(seconds=10) for a, b in pairwise(everyone))
    counted = {b.start: (b.completed, b.failed) for b in everyone if b.completed or b.failed}
    assert counted == {
        at(11, 50, 10): (1, 0),
        at(11, 59, 50): (0, 1),
        at(12, 0, 0): (2, 1),
    }
    assert (only_first[-1].completed, only_first[-1].failed) == (2, 0)


def test_stats_throughput_covers_the_last_ten_minutes(staff_client: Client, tenant: Tenant) -> None:
    now = timezone.now()
    for seconds in (1, 30, 300):
        make_job(tenant, status=JobStatus.COMPLETED, finished_at=now - timedelta(seconds=seconds))
    make_job(tenant, status=JobStatus.FAILED, finished_at=now - timedelta(seconds=100))
    make_job(tenant, status=JobStatus.COMPLETED, finished_at=now - timedelta(minutes=15))

    throughput = stats_of(staff_client)["throughput"]

    assert throughput["bucketSeconds"] == 10
    assert len(throughput["buckets"]) == 60
    assert sum(b["completed"] for b in throughput["buckets"]) == 3
    assert sum(b["failed"] for b in throughput["buckets"]) == 1
    starts = [datetime.fromisoformat(b["start"]) for b in throughput["buckets"]]
    assert starts == sorted(starts)
    assert starts[-1] <= now < starts[-1] + timedelta(seconds=10)


def test_workers_come_from_redis_heartbeats_with_their_running_jobs(
    staff_client: Client, tenant: Tenant, redis_client: Any
) -> None:
    now_ms = int(time.time() * 1000)
    redis_client.zadd(
        sync_queue().workers_key, {"w-alive": now_ms - 1500, "w-stale": now_ms - 120_000}
    )
    make_job(tenant, status=JobStatus.RUNNING, locked_by="w-alive")
    make_job(tenant, status=JobStatus.RUNNING, locked_by="w-alive")
    make_job(tenant, status=JobStatus.RUNNING, locked_by="w-gone")  # died, lease not expired
    make_job(tenant, status=JobStatus.COMPLETED, locked_by="w-stale")  # done: not running

    workers = stats_of(staff_client)["workers"]

    assert [(w["name"], w["alive"], w["running"]) for w in workers] == [
        ("w-alive", True, 2),
        ("w-gone", False, 1),
        ("w-stale", False, 0),
    ]
    ages = {w["name"]: w["heartbeatAgeS"] for w in workers}
    assert 1.0 <= ages["w-alive"] < 10
    assert 119 <= ages["w-stale"] < 130
    assert ages["w-gone"] is None


def test_stats_show_open_webhook_circuits(staff_client: Client, tenant: Tenant) -> None:
    queue = sync_queue()
    assert stats_of(staff_client)["openCircuits"] == []
    for n in range(2):
        queue.acquire_host(
            host="down.example:443", holder=f"h{n}", limit=8, lease_ms=5000, cooldown_ms=60_000
        )
        queue.release_host(
            host="down.example:443",
            holder=f"h{n}",
            verdict="failed",
            failures_to_open=2,
            cooldown_ms=60_000,
            keep_ms=600_000,
        )

    [circuit] = stats_of(staff_client)["openCircuits"]

    assert circuit["host"] == "down.example:443"
    assert (circuit["state"], circuit["failures"]) == ("open", 2)
    until = datetime.fromisoformat(circuit["until"].replace("Z", "+00:00"))
    assert timedelta(seconds=50) < until - timezone.now() <= timedelta(seconds=61)
    page = staff_client.get("/dashboard/")
    assert b'id="circuits-table"' in page.content


def test_schedules_panel_lists_next_runs(
    staff_client: Client, tenant: Tenant, other_tenant: Tenant
) -> None:
    job = {"type": "sleep", "payload": {"delayMs": 1}}
    schedule_create(tenant=tenant, values={"name": "hourly", "cron": "0 * * * *", "job": job})
    schedule_create(
        tenant=other_tenant,
        values={"name": "paused", "every": 30, "job": job, "enabled": False},
    )
    rows = stats_of(staff_client)["schedules"]
    assert [(r["name"], r["tenant"], r["enabled"]) for r in rows] == [
        ("hourly", tenant.id, True),
        ("paused", other_tenant.id, False),
    ]
    next_run = datetime.fromisoformat(rows[0]["nextRunAt"].replace("Z", "+00:00"))
    assert next_run.minute == 0 and next_run > timezone.now()
    assert rows[0]["timing"] == "0 * * * *" and rows[1]["nextRunAt"] is None
    assert rows[0]["adminUrl"] == f"/admin/jobs/schedule/{rows[0]['id']}/change/"
    assert [r["name"] for r in stats_of(staff_client, tenant=other_tenant.id)["schedules"]] == [
        "paused"
    ]
    assert b'id="schedules-table"' in staff_client.get("/dashboard/").content


# --- cost ---------------------------------------------------------------------------------------
def test_stats_take_the_same_number_of_queries_for_many_tenants_and_jobs(
    staff_client: Client, tenant: Tenant
) -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            stats_of(staff_client)
        return len(captured.captured_queries)

    make_job(tenant, status=JobStatus.COMPLETED)
    few = queries()
    for i in range(30):
        extra = Tenant.objects.create(id=f"bulk-{i:02d}")
        for status in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.FAILED):
            make_job(extra, status=status, locked_by=f"w{i}")

    assert queries() == few


def test_stats_stay_fast_with_100k_jobs(staff_client: Client, capsys: Any) -> None:
    """100,000 jobs over 20 tenants, most finished in the last 20 minutes."""
    tenants = Tenant.objects.bulk_create([Tenant(id=f"load-{i:02d}") for i in range(20)])
    now = timezone.now()
    # 70% completed, 10% failed, 10% pending, 5% running, 5% cancelled.
    cycle = [JobStatus.COMPLETED] * 14 + [JobStatus.FAILED] * 2 + [JobStatus.PENDING] * 2
    cycle += [JobStatus.RUNNING, JobStatus.CANCELLED]
    jobs = []
    for i in range(100_000):
        status = cycle[i % len(cycle)]
        created = now - timedelta(milliseconds=12 * i + 500)
        finished = status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
        jobs.append(
            Job(
                tenant_id=tenants[i % 20].id,
                type="sleep",
                payload={"delayMs": 0},
                status=status,
                run_at=created,
                created_at=created,
                updated_at=created,
                started_at=created if status != JobStatus.PENDING else None,
                finished_at=created + timedelta(milliseconds=200) if finished else None,
                locked_by=f"worker-{i % 8}" if status == JobStatus.RUNNING else None,
            )
        )
    Job.objects.bulk_create(jobs, batch_size=5000)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE jobs_job")

    timings = []
    for params in ({}, {}, {}, {"tenant": "load-03"}, {"tenant": "load-03"}):
        started = time.perf_counter()
        stats = stats_of(staff_client, **params)
        timings.append(time.perf_counter() - started)
        if not params:
            assert sum(stats["totals"].values()) == 100_000

    all_ms = statistics.median(timings[:3]) * 1000
    one_ms = statistics.median(timings[3:]) * 1000
    with capsys.disabled():
        print(f"\n/dashboard/api/stats with 100k jobs: {all_ms:.0f} ms all, {one_ms:.0f} ms one")
    assert all_ms < 1000
    assert one_ms < 1000
