"""Admin additions for operators: a job's timeline, and links between jobs, tenants and the
dashboard."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from jobs.models import JobStatus, Tenant
from tests.support.jobs import make_job

pytestmark = pytest.mark.django_db


def timeline_of(admin_client: Client, job_id: object) -> str:
    response = admin_client.get(f"/admin/jobs/job/{job_id}/change/")
    assert response.status_code == 200
    content = response.content.decode()
    start = content.index('<table class="job-timeline">')
    return content[start : content.index("</table>", start)]


def test_a_finished_job_shows_its_timeline_with_worker_attempts_and_error(
    admin_client: Client, tenant: Tenant
) -> None:
    created = timezone.now() - timedelta(minutes=5)
    job = make_job(
        tenant,
        status=JobStatus.FAILED,
        created_at=created,
        run_at=created,
        started_at=created + timedelta(seconds=2),
        finished_at=created + timedelta(seconds=3, milliseconds=500),
        updated_at=created + timedelta(seconds=3, milliseconds=500),
        attempts=3,
        max_attempts=3,
        locked_by="worker-7",
        error="ValueError: <bad> input\nTraceback (most recent call last): ...",
    )

    timeline = timeline_of(admin_client, job.id)

    events = [
        "Created",
        "Started",
        "attempt 3 of 3 on worker worker-7",
        "Last error",
        "attempt 3: ValueError: &lt;bad&gt; input",
        "Finished",
        "FAILED after 1.500 s running",
        "Status now",
    ]
    positions = [timeline.index(text) for text in events]
    assert positions == sorted(positions)
    assert "<bad>" not in timeline
    assert "Traceback" not in timeline  # the first line only; the full error is below


def test_a_pending_job_timeline_shows_when_it_may_run_and_nothing_else(
    admin_client: Client, tenant: Tenant
) -> None:
    job = make_job(tenant, run_at=timezone.now() + timedelta(hours=1))

    timeline = timeline_of(admin_client, job.id)

    assert "Created" in timeline
    assert "Runnable from" in timeline
    assert "Started" not in timeline
    assert "Finished" not in timeline
    assert "PENDING (last update)" in timeline


def test_a_running_job_reports_the_previous_attempts_error(
    admin_client: Client, tenant: Tenant
) -> None:
    job = make_job(
        tenant,
        status=JobStatus.RUNNING,
        attempts=2,
        started_at=timezone.now(),
        locked_by="w1",
        error="timeout",
    )

    timeline = timeline_of(admin_client, job.id)

    assert "attempt 2 of 3 on worker w1" in timeline
    assert "attempt 1: timeout" in timeline


def test_a_job_page_links_to_its_tenant(admin_client: Client) -> None:
    underscored = Tenant.objects.create(id="acme_corp")
    job = make_job(underscored)

    content = admin_client.get(f"/admin/jobs/job/{job.id}/change/").content.decode()

    assert '<a href="/admin/jobs/tenant/acme_5Fcorp/change/">acme_corp</a>' in content


def test_a_tenant_page_links_to_its_jobs_and_its_dashboard(
    admin_client: Client, tenant: Tenant, other_tenant: Tenant
) -> None:
    mine = make_job(tenant, status=JobStatus.FAILED)
    make_job(tenant, status=JobStatus.COMPLETED)
    make_job(other_tenant, status=JobStatus.FAILED)

    page = admin_client.get("/admin/jobs/tenant/tenant-1/change/").content.decode()
    listing = admin_client.get("/admin/jobs/tenant/").content.decode()
    failed = admin_client.get(
        "/admin/jobs/job/", {"tenant__id__exact": "tenant-1", "status__exact": "FAILED"}
    )

    assert '<a href="/admin/jobs/job/?tenant__id__exact=tenant-1">All jobs</a>' in page
    assert (
        '<a href="/admin/jobs/job/?tenant__id__exact=tenant-1&amp;status__exact=FAILED">'
        "Failed</a>" in page
    )
    assert '<a href="/dashboard/?tenant=tenant-1">Live dashboard</a>' in page
    assert '<a href="/admin/jobs/job/?tenant__id__exact=tenant-2">jobs</a>' in listing
    assert [j.id for j in failed.context["cl"].result_list] == [mine.id]


def test_the_add_tenant_form_has_no_job_links(admin_client: Client) -> None:
    response = admin_client.get("/admin/jobs/tenant/add/")

    assert response.status_code == 200
    assert "Live dashboard" not in response.content.decode()
