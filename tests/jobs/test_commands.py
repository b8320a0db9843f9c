"""Operator commands: tenants and keys for scripts, and pruning of finished jobs."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.maintenance import parse_duration_arg
from jobs.models import ApiKey, Job, JobStatus, SigningSecret, Tenant
from jobs.selectors import signing_secrets_live
from jobs.services import api_key_authenticate, api_key_create
from tests.support.jobs import make_job

pytestmark = pytest.mark.django_db


def run(*args: str, **options: Any) -> list[str]:
    """Run a command; its stdout lines."""
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO(), **options)
    return out.getvalue().splitlines()


# --- tenants and keys ---------------------------------------------------------------------------
def test_create_tenant_prints_a_working_key_as_the_last_line() -> None:
    lines = run("create_tenant", "acme", "--name", "Acme Inc")

    assert len(lines) == 4
    assert "acme" in lines[0]
    tenant = Tenant.objects.get(id="acme")
    assert tenant.name == "Acme Inc"
    assert tenant.is_active
    assert api_key_authenticate(raw_key=lines[-1]) == tenant
    assert ApiKey.objects.filter(tenant=tenant).count() == 1


def test_create_tenant_prints_its_signing_secret_once_before_the_key() -> None:
    lines = run("create_tenant", "acme")

    tenant = Tenant.objects.get(id="acme")
    ((secret, expires_at),) = signing_secrets_live(tenant_id="acme")
    assert expires_at is None
    assert lines[0].endswith("webhook signing secret (shown once):")
    assert lines[1] == secret and secret.startswith("whsec_")
    assert lines[2].startswith("API key ")
    assert api_key_authenticate(raw_key=lines[-1]) == tenant
    # A new key for an existing tenant neither makes nor shows a secret.
    again = run("create_tenant", "acme", "--if-missing")
    assert len(again) == 2 and not any("whsec_" in line for line in again)
    assert SigningSecret.objects.filter(tenant=tenant).count() == 1


def test_create_tenant_refuses_an_existing_tenant(tenant: Tenant) -> None:
    with pytest.raises(CommandError, match=r"'tenant-1' already exists.*--if-missing") as excinfo:
        run("create_tenant", "tenant-1")

    assert excinfo.value.returncode == 1
    assert not ApiKey.objects.exists()


def test_create_tenant_rejects_an_invalid_id() -> None:
    with pytest.raises(CommandError, match="invalid tenant"):
        run("create_tenant", "bad id!")

    assert not Tenant.objects.exists()


def test_create_tenant_if_missing_creates_or_adds_a_key() -> None:
    first = run("create_tenant", "demo", "--if-missing")
    second = run("create_tenant", "demo", "--if-missing")

    tenant = Tenant.objects.get(id="demo")
    assert first[-1] != second[-1]
    assert "exists" in second[0]
    assert api_key_authenticate(raw_key=first[-1]) == tenant
    assert api_key_authenticate(raw_key=second[-1]) == tenant
    assert ApiKey.objects.filter(tenant=tenant).count() == 2


def test_create_api_key_prints_a_working_key(tenant: Tenant) -> None:
    lines = run("create_api_key", "tenant-1", "--name", "ci")

    assert api_key_authenticate(raw_key=lines[-1]) == tenant
    assert ApiKey.objects.get(tenant=tenant).name == "ci"


def test_create_api_key_for_an_unknown_tenant_fails(db: None) -> None:
    with pytest.raises(CommandError, match="no tenant 'nobody'"):
        run("create_api_key", "nobody")


@pytest.mark.parametrize("form", ["prefix", "jq_prefix", "full key"])
def test_revoke_api_key_makes_the_key_stop_working(tenant: Tenant, form: str) -> None:
    key, raw_key = api_key_create(tenant=tenant)
    _, other_raw = api_key_create(tenant=tenant)
    argument = {"prefix": key.prefix, "jq_prefix": f"jq_{key.prefix}", "full key": raw_key}[form]

    lines = run("revoke_api_key", argument)

    assert key.prefix in lines[-1]
    assert api_key_authenticate(raw_key=raw_key) is None
    assert api_key_authenticate(raw_key=other_raw) == tenant


def test_revoke_an_unknown_key_fails(db: None) -> None:
    with pytest.raises(CommandError, match="no API key"):
        run("revoke_api_key", "0123456789ab")


# --- prune_jobs ---------------------------------------------------------------------------------
@pytest.fixture
def aged_jobs(tenant: Tenant) -> dict[str, list[Job]]:
    """Five prunable jobs, and jobs that must survive: recent, unfinished or still active."""
    old = timezone.now() - timedelta(days=40)
    prunable = [
        make_job(tenant, status=status, finished_at=old)
        for status in (
            JobStatus.COMPLETED,
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
        )
    ]
    kept = [
        make_job(
            tenant, status=JobStatus.COMPLETED, finished_at=timezone.now() - timedelta(days=1)
        ),
        make_job(tenant, status=JobStatus.PENDING),
        make_job(tenant, status=JobStatus.RUNNING),
        # Active jobs are kept whatever their timestamps say.
        make_job(tenant, status=JobStatus.PENDING, finished_at=old),
        make_job(tenant, status=JobStatus.RUNNING, finished_at=old),
    ]
    return {"prunable": prunable, "kept": kept}


def test_prune_jobs_deletes_only_old_finished_jobs_in_batches(
    aged_jobs: dict[str, list[Job]],
) -> None:
    with CaptureQueriesContext(connection) as queries:
        lines = run("prune_jobs", "--older-than", "30d", "--batch-size", "2")

    assert lines == ["Deleted 5 finished jobs older than 30d."]
    assert set(Job.objects.values_list("id", flat=True)) == {j.id for j in aged_jobs["kept"]}
    deletes = [
        q["sql"] for q in queries.captured_queries if q["sql"].startswith('DELETE FROM "jobs_job"')
    ]
    assert len(deletes) == 3  # 2 + 2 + 1, never one statement for everything


def test_prune_jobs_dry_run_deletes_nothing(aged_jobs: dict[str, list[Job]]) -> None:
    lines = run("prune_jobs", "--older-than", "30d", "--dry-run")

    assert lines == ["Would delete 5 finished jobs older than 30d (dry run)."]
    assert Job.objects.count() == 10


def test_prune_jobs_default_retention_is_30_days(aged_jobs: dict[str, list[Job]]) -> None:
    assert run("prune_jobs") == ["Deleted 5 finished jobs older than 30d."]
    assert run("prune_jobs", "--older-than", "12h") == ["Deleted 1 finished job older than 12h."]
    assert Job.objects.count() == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("3600", timedelta(hours=1)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_parse_duration_arg(value: str, expected: timedelta) -> None:
    assert parse_duration_arg(value) == expected


@pytest.mark.parametrize("value", ["", "d", "30x", "-5m", "1.5h", "30 days"])
def test_parse_duration_arg_rejects_garbage(value: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration_arg(value)


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--older-than", "soon"), "invalid duration"), (("--batch-size", "0"), "at least 1")],
)
def test_prune_jobs_rejects_bad_options(db: None, args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("prune_jobs", *args)
