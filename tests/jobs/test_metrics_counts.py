"""/metrics (security issue, item 6): hidden without a token, and a scrape that reads counts kept by
the database's triggers (jobs/counts.py, migration 0003_job_counts) instead of counting jobs_job."""

from __future__ import annotations

import io
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from jobs import api_store, pg
from jobs.counts import TABLE, exact_job_counts, job_counts, job_counts_drift, job_counts_rebuild
from jobs.lifecycle import Outcome, RetryPolicy, put_back_fields
from jobs.maintenance import jobs_prune
from jobs.metrics import HIDDEN_NOTICE, log_metrics_access, render_metrics
from jobs.models import Job, JobStatus, Tenant
from jobs.services import JobSpec, job_cancel, job_enqueue, job_enqueue_batch, job_retry
from jobs.store import (
    aclaim_jobs,
    awrite_outcomes,
    claim_jobs,
    recover_expired_leases,
    write_fenced,
    write_outcomes,
)
from tests.support.event_loop import run_async

ROOT = Path(__file__).resolve().parents[2]
POLICY = RetryPolicy(base_ms=1000, max_ms=1000)


def planned(items: list[tuple[Job, Outcome]]) -> list[tuple[Job, dict]]:
    """The writes the lifecycle plans for these outcomes."""
    now = timezone.now()
    return [(job, POLICY.after_attempt(job, outcome, now)) for job, outcome in items]


SLEEP = JobSpec(type="sleep", payload={"delayMs": 0})
EMAIL = JobSpec(type="email", payload={"to": "a@example.com", "subject": "s", "body": "b"})


def assert_counts_exact() -> None:
    kept = {key: n for key, n in job_counts().items() if n}
    assert kept == exact_job_counts()
    assert job_counts_drift() == {}


def new_job(tenant: Tenant, job_type: str = "sleep") -> Job:
    now = timezone.now()
    return Job(tenant=tenant, type=job_type, payload={}, run_at=now, created_at=now, updated_at=now)


def scrape_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --- counts kept by the triggers --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_kept_counts_equal_a_real_count_after_every_kind_of_change(tenant: Tenant) -> None:
    """Every path that writes jobs (ORM, the API's psycopg INSERT and COPY, the worker's batched
    claim and outcome statements, cancel, retry, recovery, put-back, prune, admin-style bulk
    edits, a rollback) leaves the kept counts equal to COUNT(*) per status and type."""
    assert_counts_exact()

    orm_jobs = [job_enqueue(tenant=tenant, spec=SLEEP)[0] for _ in range(3)]
    orm_jobs += job_enqueue_batch(tenant=tenant, specs=[SLEEP, EMAIL, EMAIL])
    api_jobs = [new_job(tenant) for _ in range(2)]
    run_async(lambda: api_store.insert_job(api_jobs[0]))
    run_async(lambda: api_store.insert_jobs([api_jobs[1], new_job(tenant, "email")]))
    assert exact_job_counts() == {("PENDING", "sleep"): 6, ("PENDING", "email"): 3}
    assert_counts_exact()

    ids = [str(job.id) for job in orm_jobs + api_jobs]
    claimed = claim_jobs(job_ids=ids[:4], worker="w1")
    claimed += run_async(lambda: aclaim_jobs(job_ids=ids[4:7], worker="w2"))
    assert len(claimed) == 7
    assert_counts_exact()

    write_outcomes(
        planned=planned(
            [
                (claimed[0], Outcome(result={"ok": 1})),
                (claimed[1], Outcome(error="boom", permanent=True)),
                (claimed[2], Outcome(error="again")),  # retried: back to PENDING
            ]
        )
    )
    run_async(lambda: awrite_outcomes(planned=planned([(claimed[3], Outcome(result=None))])))
    assert_counts_exact()

    job_cancel(tenant=tenant, job_id=api_jobs[1].id)  # PENDING -> CANCELLED
    job_retry(tenant=tenant, job_id=claimed[1].id)  # FAILED -> PENDING
    write_fenced(job=claimed[4], fields=put_back_fields(claimed[4], timezone.now()))
    Job.objects.filter(id=claimed[5].id).update(lease_expires_at=timezone.now() - timedelta(1))
    assert len(recover_expired_leases(policy=POLICY, limit=10)) == 1
    assert_counts_exact()

    with pytest.raises(RuntimeError), transaction.atomic():
        job_enqueue(tenant=tenant, spec=EMAIL)
        raise RuntimeError("rolled back")
    assert_counts_exact()

    # Admin-style edits, including a change of type, and prune.
    Job.objects.filter(status=JobStatus.PENDING, type="email").update(type="sleep")
    Job.objects.filter(id=claimed[6].id).update(status=JobStatus.FAILED)
    Job.objects.filter(finished_at__isnull=False).update(finished_at=timezone.now() - timedelta(1))
    assert jobs_prune(older_than=timedelta(hours=1), batch_size=2, dry_run=False) == 3
    assert_counts_exact()
    Job.objects.all().delete()
    assert job_counts_drift() == {}
    assert not any(job_counts().values())


@pytest.mark.django_db(transaction=True)
def test_counts_of_exited_connections_are_folded_and_stay_right(tenant: Tenant) -> None:
    """Each backend adds to rows of its own; once it has exited, a read folds them into the
    totals, so the table stays as small as the set of live connections."""
    for _ in range(3):
        with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO jobs_job (id, tenant_id, type, payload, status, priority, attempts,"
                " max_attempts, run_at, created_at, updated_at)"
                " SELECT gen_random_uuid(), %s, 'sleep', '{}', 'PENDING', 0, 0, 3, now(), now(),"
                " now() FROM generate_series(1, 5)",
                (tenant.id,),
            )
    assert_counts_exact()
    assert job_counts()[("PENDING", "sleep")] == 15
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT DISTINCT backend FROM {TABLE}")
        backends = {row[0] for row in cursor.fetchall()}
    assert backends == {0}


@pytest.mark.django_db(transaction=True)
def test_rebuild_recounts_after_the_triggers_were_bypassed(tenant: Tenant) -> None:
    job_enqueue_batch(tenant=tenant, specs=[SLEEP] * 4)
    with connection.cursor() as cursor:
        # What a data-only restore with triggers disabled does.
        cursor.execute("SET session_replication_role = replica")
        try:
            cursor.execute("UPDATE jobs_job SET status = 'COMPLETED'")
        finally:
            cursor.execute("SET session_replication_role = DEFAULT")
    assert job_counts_drift() == {("PENDING", "sleep"): (4, 0), ("COMPLETED", "sleep"): (0, 4)}
    with pytest.raises(CommandError):
        call_command("rebuild_job_counts", "--check", stdout=io.StringIO())
    assert job_counts_rebuild() == {("COMPLETED", "sleep"): 4}
    assert_counts_exact()
    out = io.StringIO()
    call_command("rebuild_job_counts", stdout=out)
    call_command("rebuild_job_counts", "--check", stdout=out)
    assert out.getvalue().splitlines() == ["Rebuilt job counts: 4 jobs.", "Job counts are exact."]


# --- the scrape -------------------------------------------------------------------------------


def jobs_table_reads() -> tuple[int, int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables"
            " WHERE relname = %s",
            [Job._meta.db_table],
        )
        return cursor.fetchone()


@pytest.mark.django_db
def test_a_scrape_does_not_read_the_jobs_table(tenant: Tenant) -> None:
    """The jobs gauge comes from the kept counts: a scrape neither scans nor index-reads
    jobs_job (PostgreSQL's own per-transaction table statistics say so), however many jobs."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO jobs_job (id, tenant_id, type, payload, status, priority, attempts,"
            " max_attempts, run_at, created_at, updated_at)"
            " SELECT gen_random_uuid(), %s, CASE WHEN mod(i, 4) = 0 THEN 'email' ELSE 'sleep' END,"
            " '{}', CASE WHEN mod(i, 2) = 0 THEN 'COMPLETED' ELSE 'PENDING' END, 0, 0, 3, now(),"
            " now(), now() FROM generate_series(1, 20000) AS i",
            [tenant.id],
        )
    before = jobs_table_reads()
    samples = scrape_samples(render_metrics().decode())
    assert jobs_table_reads() == before
    assert samples[("jobqueue_jobs", (("status", "PENDING"), ("type", "sleep")))] == 10000
    assert samples[("jobqueue_jobs", (("status", "COMPLETED"), ("type", "email")))] == 5000
    assert samples[("jobqueue_jobs", (("status", "COMPLETED"), ("type", "sleep")))] == 5000
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {TABLE}")
        assert cursor.fetchone()[0] <= 4  # what a scrape reads: one row per status and type


# --- who may read it --------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_are_not_served_without_a_token_when_debug_is_off(
    client: Client, settings: Any
) -> None:
    settings.DEBUG = False
    settings.JOBS = {**settings.JOBS, "METRICS_TOKEN": ""}
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.json() == {"error": "Not found"}
    # Whatever is sent: there is no token it could match.
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 404


@pytest.mark.django_db
def test_metrics_need_the_token_when_it_is_set(client: Client, settings: Any) -> None:
    settings.DEBUG = False
    settings.JOBS = {**settings.JOBS, "METRICS_TOKEN": "s3cret"}
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert response.status_code == 200
    assert b"jobqueue_jobs" in response.content


@pytest.mark.django_db
def test_metrics_are_open_in_development(client: Client, settings: Any) -> None:
    settings.DEBUG = True
    settings.JOBS = {**settings.JOBS, "METRICS_TOKEN": ""}
    assert client.get("/metrics").status_code == 200


def test_start_up_says_how_to_enable_hidden_metrics(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.DEBUG = False
    settings.JOBS = {**settings.JOBS, "METRICS_TOKEN": ""}
    with caplog.at_level(logging.WARNING, logger="jobs.metrics"):
        log_metrics_access()
    assert [r.getMessage() for r in caplog.records] == [HIDDEN_NOTICE]
    assert "JOBS_METRICS_TOKEN" in HIDDEN_NOTICE

    caplog.clear()
    settings.JOBS = {**settings.JOBS, "METRICS_TOKEN": "s3cret"}
    with caplog.at_level(logging.WARNING, logger="jobs.metrics"):
        log_metrics_access()
    assert caplog.records == []


def test_docker_compose_passes_the_metrics_token() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api_environment = compose["services"]["api"]["environment"]
    assert api_environment["JOBS_METRICS_TOKEN"].startswith("${JOBS_METRICS_TOKEN")
