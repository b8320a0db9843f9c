"""The job table partitioned by creation time (PostgreSQL only; docs/operations.md, "Partitions").

`jobs_job` becomes `PARTITION BY RANGE (created_at)`: one partition per `JOBS_PARTITION_MONTHS`
months (`jobs_job_pYYYYMM`, named by its first month) plus `jobs_job_default`, so an insert never
fails. A unique index on a partitioned table must include the partition key, hence:

- the primary key is (id, created_at); Django keeps `id` as the model's primary key, and ids
  stay unique because the service makes them (random UUIDs, or derived from one for a batch);
- the per-tenant idempotency key and the (schedule, due time) pair are unique in two small
  non-partitioned tables, `jobs_jobkey` and `jobs_jobscheduledue`, that BEFORE row triggers
  write in the statement that inserts (or re-keys) the job, and statement triggers empty on
  DELETE and TRUNCATE. A second job with a taken key fails with a unique violation, as the old
  unique indexes did (the callers catch IntegrityError); concurrent inserts of one key wait for
  each other on the side table's primary key exactly as they did on the unique index;
- the edges of workflows (jobs_jobdependency) keep their columns without foreign keys.

An existing table is converted in this migration's transaction: the table is locked (ACCESS
EXCLUSIVE: nothing reads or writes jobs meanwhile), renamed, a partitioned copy is made with a
partition for every period that has rows (up to the next period) and for the current and next
periods, the rows are copied unchanged
(cursors included: the triggers are created after the copy), and the indexes, the foreign key to
the tenant and the triggers are created again on the new table from the old one's definitions.
The reverse makes an ordinary table again, the same way. Self-contained on purpose (a migration
must not follow later edits of the app's code). SQLite keeps an ordinary table.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import migrations, models

TABLE = "jobs_job"
OLD = "jobs_job_unpartitioned"
DEFAULT_PARTITION = "jobs_job_default"
# The old unique indexes that the side tables replace, and the objects this migration adds.
UNIQUE_INDEXES = ("job_unique_idempotency_key", "job_unique_schedule_due")
OWN_INDEXES = ("job_tenant_idempotency_key", "job_schedule_due")
OWN_TRIGGERS = (
    "jobs_jobkey_insert",
    "jobs_jobkey_update",
    "jobs_jobkey_delete",
    "jobs_jobkey_truncate",
)

KEYS = [
    """
    CREATE TABLE jobs_jobkey (
        tenant_id varchar(64) NOT NULL,
        idempotency_key varchar(255) NOT NULL,
        job_id uuid NOT NULL,
        CONSTRAINT jobs_jobkey_pkey PRIMARY KEY (tenant_id, idempotency_key)
    )
    """,
    """
    CREATE TABLE jobs_jobscheduledue (
        schedule_id uuid NOT NULL,
        scheduled_for timestamptz NOT NULL,
        job_id uuid NOT NULL,
        CONSTRAINT jobs_jobscheduledue_pkey PRIMARY KEY (schedule_id, scheduled_for)
    )
    """,
    # A key taken by another job raises unique_violation; the job's own row is no conflict (an
    # UPDATE of created_at moves the row to another partition: a delete and an insert).
    # Concurrent takers of one key wait on the primary key for each other, as on a unique index.
    """
    CREATE FUNCTION jobs_jobkey_take(tenant varchar, key varchar, job uuid) RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO jobs_jobkey AS k VALUES (tenant, key, job)
        ON CONFLICT (tenant_id, idempotency_key) DO UPDATE SET job_id = excluded.job_id
        WHERE k.job_id = excluded.job_id;
        IF NOT FOUND THEN
            RAISE unique_violation USING CONSTRAINT = 'jobs_jobkey_pkey', TABLE = 'jobs_jobkey',
            MESSAGE = 'duplicate key value violates unique constraint "jobs_jobkey_pkey"',
            DETAIL = format('Key (tenant_id, idempotency_key)=(%s, %s) already exists.',
                            tenant, key);
        END IF;
    END
    $$
    """,
    """
    CREATE FUNCTION jobs_jobscheduledue_take(schedule uuid, due timestamptz, job uuid)
    RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO jobs_jobscheduledue AS d VALUES (schedule, due, job)
        ON CONFLICT (schedule_id, scheduled_for) DO UPDATE SET job_id = excluded.job_id
        WHERE d.job_id = excluded.job_id;
        IF NOT FOUND THEN
            RAISE unique_violation USING CONSTRAINT = 'jobs_jobscheduledue_pkey',
            TABLE = 'jobs_jobscheduledue',
            MESSAGE = 'duplicate key value violates unique constraint "jobs_jobscheduledue_pkey"',
            DETAIL = format('Key (schedule_id, scheduled_for)=(%s, %s) already exists.',
                            schedule, due);
        END IF;
    END
    $$
    """,
    """
    CREATE FUNCTION jobs_jobkey_claim() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' THEN
            IF OLD.idempotency_key IS NOT NULL AND (OLD.idempotency_key IS DISTINCT FROM
                    NEW.idempotency_key OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id) THEN
                DELETE FROM jobs_jobkey WHERE tenant_id = OLD.tenant_id
                AND idempotency_key = OLD.idempotency_key AND job_id = OLD.id;
            END IF;
            IF OLD.schedule_id IS NOT NULL AND OLD.scheduled_for IS NOT NULL AND (
                    OLD.schedule_id IS DISTINCT FROM NEW.schedule_id
                    OR OLD.scheduled_for IS DISTINCT FROM NEW.scheduled_for) THEN
                DELETE FROM jobs_jobscheduledue WHERE schedule_id = OLD.schedule_id
                AND scheduled_for = OLD.scheduled_for AND job_id = OLD.id;
            END IF;
            IF NEW.idempotency_key IS NOT NULL AND (OLD.idempotency_key IS DISTINCT FROM
                    NEW.idempotency_key OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id) THEN
                PERFORM jobs_jobkey_take(NEW.tenant_id, NEW.idempotency_key, NEW.id);
            END IF;
            IF NEW.schedule_id IS NOT NULL AND NEW.scheduled_for IS NOT NULL AND (
                    OLD.schedule_id IS DISTINCT FROM NEW.schedule_id
                    OR OLD.scheduled_for IS DISTINCT FROM NEW.scheduled_for) THEN
                PERFORM jobs_jobscheduledue_take(NEW.schedule_id, NEW.scheduled_for, NEW.id);
            END IF;
            RETURN NEW;
        END IF;
        IF NEW.idempotency_key IS NOT NULL THEN
            PERFORM jobs_jobkey_take(NEW.tenant_id, NEW.idempotency_key, NEW.id);
        END IF;
        IF NEW.schedule_id IS NOT NULL AND NEW.scheduled_for IS NOT NULL THEN
            PERFORM jobs_jobscheduledue_take(NEW.schedule_id, NEW.scheduled_for, NEW.id);
        END IF;
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE FUNCTION jobs_jobkey_release() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            DELETE FROM jobs_jobkey;
            DELETE FROM jobs_jobscheduledue;
            RETURN NULL;
        END IF;
        DELETE FROM jobs_jobkey AS k USING jobkey_old AS o
        WHERE k.tenant_id = o.tenant_id AND k.idempotency_key = o.idempotency_key
        AND k.job_id = o.id;
        DELETE FROM jobs_jobscheduledue AS d USING jobkey_old AS o
        WHERE d.schedule_id = o.schedule_id AND d.scheduled_for = o.scheduled_for
        AND d.job_id = o.id;
        RETURN NULL;
    END
    $$
    """,
]
KEY_TRIGGERS = [
    """
    CREATE TRIGGER jobs_jobkey_insert BEFORE INSERT ON jobs_job
    FOR EACH ROW EXECUTE FUNCTION jobs_jobkey_claim()
    """,
    """
    CREATE TRIGGER jobs_jobkey_update
    BEFORE UPDATE OF tenant_id, idempotency_key, schedule_id, scheduled_for ON jobs_job
    FOR EACH ROW EXECUTE FUNCTION jobs_jobkey_claim()
    """,
    """
    CREATE TRIGGER jobs_jobkey_delete AFTER DELETE ON jobs_job
    REFERENCING OLD TABLE AS jobkey_old
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_jobkey_release()
    """,
    """
    CREATE TRIGGER jobs_jobkey_truncate AFTER TRUNCATE ON jobs_job
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_jobkey_release()
    """,
    # Lookups by key (a replay) and by schedule read these; uniqueness is the side tables'.
    """
    CREATE INDEX job_tenant_idempotency_key ON jobs_job (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL
    """,
    """
    CREATE INDEX job_schedule_due ON jobs_job (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL
    """,
]
KEYS_FILL = [
    """
    INSERT INTO jobs_jobkey SELECT tenant_id, idempotency_key, id FROM jobs_job
    WHERE idempotency_key IS NOT NULL
    """,
    """
    INSERT INTO jobs_jobscheduledue SELECT schedule_id, scheduled_for, id FROM jobs_job
    WHERE schedule_id IS NOT NULL AND scheduled_for IS NOT NULL
    """,
]
NO_KEYS = [
    "DROP TABLE IF EXISTS jobs_jobscheduledue",
    "DROP TABLE IF EXISTS jobs_jobkey",
    "DROP FUNCTION IF EXISTS jobs_jobkey_claim()",
    "DROP FUNCTION IF EXISTS jobs_jobkey_release()",
    "DROP FUNCTION IF EXISTS jobs_jobkey_take(varchar, varchar, uuid)",
    "DROP FUNCTION IF EXISTS jobs_jobscheduledue_take(uuid, timestamptz, uuid)",
]
# The old unique indexes, for the reverse (as migrations 0001 and 0008 made them).
UNIQUE = [
    """
    CREATE UNIQUE INDEX job_unique_idempotency_key ON jobs_job (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL
    """,
    """
    CREATE UNIQUE INDEX job_unique_schedule_due ON jobs_job (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL
    """,
]


def _months() -> int:
    return int(getattr(settings, "JOBS", {}).get("PARTITION_MONTHS", 1))


def _period_start(at: datetime, months: int) -> datetime:
    index = at.year * 12 + at.month - 1
    index -= index % months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _add_months(at: datetime, months: int) -> datetime:
    index = at.year * 12 + at.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _fetch(schema_editor: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def _definitions(schema_editor: Any) -> tuple[list[str], list[str], list[str]]:
    """The indexes (but the primary key), foreign keys and triggers of jobs_job, as SQL."""
    indexes = [
        definition.replace(" ON ONLY ", " ON ")
        for name, definition in _fetch(
            schema_editor,
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename = %s",
            [TABLE],
        )
        if name not in (f"{TABLE}_pkey", *UNIQUE_INDEXES, *OWN_INDEXES)
    ]
    foreign_keys = [
        f"ALTER TABLE {TABLE} ADD CONSTRAINT {name} {definition}"
        for name, definition in _fetch(
            schema_editor,
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = %s::regclass AND contype = 'f'",
            [TABLE],
        )
    ]
    triggers = [
        definition
        for name, definition in _fetch(
            schema_editor,
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgrelid = %s::regclass AND NOT tgisinternal ORDER BY tgname",
            [TABLE],
        )
        if name not in OWN_TRIGGERS
    ]
    return indexes, foreign_keys, triggers


def _rebuild(schema_editor: Any, *, partitioned: bool) -> None:
    def run(statement: str) -> None:
        schema_editor.execute(statement, params=None)

    run(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")
    indexes, foreign_keys, triggers = _definitions(schema_editor)
    run(f"ALTER TABLE {TABLE} RENAME TO {OLD}")
    like = f"(LIKE {OLD} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    if partitioned:
        run(f"CREATE TABLE {TABLE} {like} PARTITION BY RANGE (created_at)")
        months = _months()
        now = datetime.now(UTC)
        # A partition for each period that has rows, up to the next one, and for the current
        # and the next period; rows of later periods (a clock far off) go to the DEFAULT one.
        current = _period_start(now, months)
        last = _add_months(current, months)
        starts = {current, last}
        for (month,) in _fetch(
            schema_editor,
            f"SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC') FROM {OLD}",
        ):
            start = _period_start(month.replace(tzinfo=UTC), months)
            if start <= last:
                starts.add(start)
        for start in sorted(starts):
            end = _add_months(start, months)
            run(
                f"CREATE TABLE {TABLE}_p{start:%Y%m} PARTITION OF {TABLE} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
        run(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {TABLE} DEFAULT")
    else:
        run(f"CREATE TABLE {TABLE} {like}")
    # Every column by name, in the table's order: the copy keeps cursors and all values.
    run(f"INSERT INTO {TABLE} SELECT * FROM {OLD}")
    run(f"DROP TABLE {OLD}")
    if partitioned:
        run(f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey PRIMARY KEY (id, created_at)")
        for statement in KEYS + KEYS_FILL:
            run(statement)
    else:
        run(f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey PRIMARY KEY (id)")
        for statement in UNIQUE + NO_KEYS:
            run(statement)
    for statement in indexes + foreign_keys + triggers:
        run(statement)
    if partitioned:
        for statement in KEY_TRIGGERS:
            run(statement)
    run(f"ANALYZE {TABLE}")


def partition(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        _rebuild(schema_editor, partitioned=True)


def unpartition(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        _rebuild(schema_editor, partitioned=False)


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0009_dependencies"),
    ]

    operations = [
        # A foreign key must reference a unique key, and (id) alone no longer is one on
        # PostgreSQL: the edges keep plain columns (Django still cascades deletes of jobs).
        migrations.AlterField(
            model_name="jobdependency",
            name="child",
            field=models.ForeignKey(
                db_constraint=False,
                on_delete=models.deletion.CASCADE,
                related_name="dependency_edges",
                to="jobs.job",
            ),
        ),
        migrations.AlterField(
            model_name="jobdependency",
            name="parent",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=models.deletion.CASCADE,
                related_name="dependent_edges",
                to="jobs.job",
            ),
        ),
        migrations.RunPython(partition, unpartition, elidable=False),
    ]
