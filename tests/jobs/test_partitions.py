"""jobs_job partitioned by creation time on PostgreSQL (migration 0010, jobs/partitions.py): the
conversion of a populated table, partitions made ahead, pruning by dropping whole partitions,
and the idempotency and schedule keys held unique without a unique index on the table."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from jobs import partitions
from jobs.counts import exact_job_counts, job_counts
from jobs.maintenance import jobs_prune
from jobs.models import Job, JobDependency, JobStatus, Tenant
from jobs.queue import async_queue, close_async_queue
from jobs.store import insert_unless_taken
from jobs.upkeep import Upkeep
from tests.support.jobs import make_job

pytestmark = pytest.mark.django_db


def rows(sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def partition_of(job_id: uuid.UUID) -> str:
    ((name,),) = rows("SELECT tableoid::regclass::text FROM jobs_job WHERE id = %s", [job_id])
    return str(name)


def live_counts() -> dict[tuple[str, str], int]:
    return {key: n for key, n in job_counts().items() if n}


def test_jobs_land_in_the_partition_of_their_month_and_strays_in_the_default_one(
    tenant: Tenant,
) -> None:
    now = timezone.now()
    job = make_job(tenant)
    stray = make_job(tenant, updated_at=now - timedelta(days=3650))

    assert partitions.enabled()
    assert partition_of(job.id) == f"jobs_job_p{now:%Y%m}"
    assert partition_of(stray.id) == partitions.DEFAULT_PARTITION
    # Read by id like any job, though the table's key is (id, created_at).
    assert Job.objects.get(id=stray.id).created_at == stray.created_at


def test_partitions_are_made_for_this_period_and_the_next_once(settings: Any) -> None:
    at = datetime(2031, 11, 15, tzinfo=UTC)
    assert partitions.partitions_ensure(now=at) == ["jobs_job_p203111", "jobs_job_p203112"]
    assert partitions.partitions_ensure(now=at) == []

    settings.JOBS = {**settings.JOBS, "PARTITION_MONTHS": 3}
    # 2032-01..03 is free: one partition of three months; 2031-10..12 overlaps, left alone.
    assert partitions.partitions_ensure(now=at) == ["jobs_job_p203201"]
    (made,) = [part for part in partitions.partitions() if part.name == "jobs_job_p203201"]
    assert (made.start, made.end) == (
        datetime(2032, 1, 1, tzinfo=UTC),
        datetime(2032, 4, 1, tzinfo=UTC),
    )


@pytest.mark.django_db(transaction=True)
def test_the_workers_upkeep_makes_a_missing_partition_once(redis_prefix: str) -> None:
    # The month turned with no worker running: next month's partition is missing.
    start = partitions.add_months(partitions.period_start(timezone.now(), 1), 1)
    name = f"jobs_job_p{start:%Y%m}"
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE {name}")

    async def two_workers() -> list[list[str]]:
        try:
            return [
                await Upkeep(
                    name=worker,
                    queue=async_queue(),
                    jobs=None,  # type: ignore[arg-type]
                    transitions=None,  # type: ignore[arg-type]
                    lease_s=30,
                    reconcile_interval_s=30,
                ).ensure_partitions()
                for worker in ("w1", "w2")
            ]
        finally:
            await close_async_queue()

    assert asyncio.run(two_workers()) == [[name], []]
    assert start in {part.start for part in partitions.partitions()}


def test_an_idempotency_key_stays_unique_across_partitions(tenant: Tenant) -> None:
    now = timezone.now()
    make_job(tenant, idempotency_key="k", updated_at=now - timedelta(days=3650))
    with pytest.raises(IntegrityError), transaction.atomic():
        make_job(tenant, idempotency_key="k")
    # Another tenant's key, and the key once freed, are not conflicts.
    make_job(Tenant.objects.create(id="other"), idempotency_key="k")
    Job.objects.filter(tenant=tenant, idempotency_key="k").update(idempotency_key=None)
    make_job(tenant, idempotency_key="k")
    assert Job.objects.filter(idempotency_key="k").count() == 2


def test_insert_unless_taken_skips_a_taken_schedule_due_time(tenant: Tenant) -> None:
    schedule_id, due = uuid.uuid4(), timezone.now().replace(microsecond=0)

    def job() -> Job:
        now = timezone.now()
        return Job(
            tenant=tenant,
            type="sleep",
            run_at=now,
            created_at=now,
            updated_at=now,
            schedule_id=schedule_id,
            scheduled_for=due,
        )

    first, second, third = job(), job(), job()
    third.scheduled_for = due + timedelta(seconds=1)
    assert insert_unless_taken([first]) == [first]
    assert insert_unless_taken([second, third]) == [third]
    assert Job.objects.filter(schedule_id=schedule_id).count() == 2


def settle_deferred_checks() -> None:
    """Run the deferred foreign key checks of the test's transaction now: a table with pending
    trigger events cannot be dropped (in production the rows were committed long before)."""
    connection.check_constraints()


def old_partition(months_ago: int) -> partitions.Partition:
    """A partition of a month long past, made for the test."""
    at = partitions.add_months(partitions.period_start(timezone.now(), 1), -months_ago)
    partitions.partitions_ensure(now=at, ahead=0)
    (part,) = [part for part in partitions.partitions() if part.start == at]
    return part


def test_prune_drops_a_partition_of_finished_jobs_and_keeps_one_with_a_pending_job(
    tenant: Tenant,
) -> None:
    gone, kept = old_partition(4), old_partition(3)
    at_gone, at_kept = gone.start + timedelta(days=1), kept.start + timedelta(days=1)
    done = [
        make_job(tenant, status=JobStatus.COMPLETED, updated_at=at_gone, finished_at=at_gone)
        for _ in range(3)
    ]
    keyed = make_job(
        tenant,
        status=JobStatus.FAILED,
        updated_at=at_gone,
        finished_at=at_gone,
        idempotency_key="old-key",
    )
    pending = make_job(tenant, updated_at=at_kept)
    finished_beside = make_job(
        tenant, status=JobStatus.CANCELLED, updated_at=at_kept, finished_at=at_kept
    )
    recent = make_job(tenant, status=JobStatus.COMPLETED)
    JobDependency.objects.create(parent=done[0], child=recent, open=False)

    settle_deferred_checks()
    assert jobs_prune(older_than=timedelta(days=30), batch_size=100, dry_run=True) == 5
    assert jobs_prune(older_than=timedelta(days=30), batch_size=100, dry_run=False) == 5

    names = {part.name for part in partitions.partitions()}
    assert gone.name not in names and kept.name in names
    assert set(Job.objects.values_list("id", flat=True)) == {pending.id, recent.id}
    assert not JobDependency.objects.exists()
    assert finished_beside.id not in set(Job.objects.values_list("id", flat=True))
    # The counts lost the dropped rows, and the dropped job's key is free again.
    assert live_counts() == exact_job_counts()
    assert rows("SELECT count(*) FROM jobs_jobkey") == [(0,)]
    make_job(tenant, idempotency_key=keyed.idempotency_key)


def test_a_drop_left_half_done_is_finished_and_a_job_retried_meanwhile_goes_back(
    tenant: Tenant,
) -> None:
    part = old_partition(4)
    at = part.start + timedelta(days=1)
    done = make_job(tenant, status=JobStatus.COMPLETED, updated_at=at, finished_at=at)
    retried = make_job(tenant, updated_at=at, idempotency_key="retried")
    settle_deferred_checks()
    # A prune detached the partition (its check saw only finished jobs: the retry came after)
    # and stopped there.
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE jobs_job DETACH PARTITION {part.name}")
        cursor.execute(f"COMMENT ON TABLE {part.name} IS %s", [partitions.DETACHED])

    assert jobs_prune(older_than=timedelta(days=30), batch_size=100, dry_run=False) == 1

    assert rows("SELECT to_regclass(%s)", [part.name]) == [(None,)]
    assert not Job.objects.filter(id=done.id).exists()
    back = Job.objects.get(id=retried.id)
    assert (back.status, back.created_at, back.idempotency_key) == (
        JobStatus.PENDING,
        retried.created_at,
        "retried",
    )
    assert partition_of(retried.id) == partitions.DEFAULT_PARTITION
    assert live_counts() == exact_job_counts()
    with pytest.raises(IntegrityError), transaction.atomic():
        make_job(tenant, idempotency_key="retried")


def test_the_list_of_a_tenant_bounded_by_time_reads_only_its_partitions(tenant: Tenant) -> None:
    old = old_partition(2)
    now = timezone.now()
    this_month = partitions.period_start(now, 1)
    plan = "\n".join(
        line
        for (line,) in rows(
            "EXPLAIN SELECT id FROM jobs_job WHERE tenant_id = %s AND created_at >= %s "
            "AND created_at < %s ORDER BY created_at DESC, id DESC LIMIT 50",
            [tenant.id, this_month, partitions.add_months(this_month, 1)],
        )
    )
    assert f"jobs_job_p{now:%Y%m}" in plan
    assert old.name not in plan and partitions.DEFAULT_PARTITION not in plan


# --- the migration of an existing table --------------------------------------------------------
BEFORE, AFTER = [("jobs", "0009_dependencies")], [("jobs", "0010_partition_jobs")]
SNAPSHOT = "SELECT id, to_jsonb(j) FROM jobs_job AS j ORDER BY id"


@pytest.mark.django_db(transaction=True)
def test_the_migration_partitions_a_populated_table_and_keeps_every_row() -> None:
    executor = MigrationExecutor(connection)
    try:
        executor.migrate(BEFORE)
        assert rows("SELECT relkind FROM pg_class WHERE relname = 'jobs_job'") == [("r",)]
        apps = executor.loader.project_state(BEFORE).apps
        OldTenant = apps.get_model("jobs", "Tenant")
        OldJob = apps.get_model("jobs", "Job")
        OldEdge = apps.get_model("jobs", "JobDependency")
        OldTenant.objects.create(id="older")
        now = timezone.now()
        month_starts = [
            partitions.add_months(partitions.period_start(now, 1), -back) for back in (3, 2, 1, 0)
        ]
        jobs = []
        for m, start in enumerate(month_starts):
            for i in range(5):
                at = min(start + timedelta(days=2, hours=i), now)
                status = [JobStatus.PENDING, JobStatus.COMPLETED, JobStatus.FAILED][i % 3]
                jobs.append(
                    OldJob.objects.create(
                        tenant_id="older",
                        type="sleep" if i % 2 else "webhook",
                        status=status,
                        run_at=at,
                        created_at=at,
                        updated_at=at,
                        finished_at=at if status != JobStatus.PENDING else None,
                        idempotency_key=f"key-{m}-{i}" if i < 2 else None,
                        schedule_id=uuid.UUID(int=m + 1) if i == 4 else None,
                        scheduled_for=at if i == 4 else None,
                    )
                )
        OldEdge.objects.create(parent_id=jobs[0].id, child_id=jobs[19].id, open=True)
        OldEdge.objects.create(parent_id=jobs[6].id, child_id=jobs[19].id, open=False)
        before_rows, before_counts = rows(SNAPSHOT), live_counts()

        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(AFTER)

        assert rows("SELECT relkind FROM pg_class WHERE relname = 'jobs_job'") == [("p",)]
        assert rows(SNAPSHOT) == before_rows  # every value, cursors included
        assert live_counts() == before_counts == exact_job_counts()
        for job in jobs:
            assert partition_of(job.id) == f"jobs_job_p{job.created_at:%Y%m}"
        assert rows("SELECT count(*) FROM jobs_jobkey") == [(8,)]
        assert rows("SELECT count(*) FROM jobs_jobscheduledue") == [(4,)]
        assert set(
            rows("SELECT parent_id, child_id, open FROM jobs_jobdependency ORDER BY open")
        ) == {(jobs[6].id, jobs[19].id, False), (jobs[0].id, jobs[19].id, True)}
        next_month = partitions.add_months(month_starts[-1], 1)
        assert {part.start for part in partitions.partitions()} >= {*month_starts, next_month}

        # New rows: the right partition, a fresh cursor, the same keys refused.
        new = make_job("older", idempotency_key="new")
        assert partition_of(new.id) == f"jobs_job_p{now:%Y%m}"
        assert new.cursor is not None
        assert new.cursor > max(json.loads(row[1])["cursor"] for row in before_rows)
        with pytest.raises(IntegrityError), transaction.atomic():
            make_job("older", idempotency_key="key-0-0")
        with pytest.raises(IntegrityError), transaction.atomic():
            make_job("older", schedule_id=uuid.UUID(int=1), scheduled_for=jobs[4].scheduled_for)
        assert live_counts() == exact_job_counts()
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
