"""Jobs per (status, type) kept by PostgreSQL itself, so that /metrics reads a small table instead
of counting jobs_job (jobs/counts.py explains the layout and how it is read and rebuilt).

Statement-level AFTER triggers with transition tables add each statement's net change to rows
of `jobs_jobcount` keyed by the writing backend's pid: a batch of claims or outcomes costs one
grouped upsert, and no two backends ever write the same row, so writers never wait on each other
(no hot row, no deadlock). They run in the writer's transaction: a rollback or a crash undoes
the count with the change. TRUNCATE of jobs_job empties the counts.

Self-contained on purpose (a migration must not follow later edits of the app's code). On SQLite
nothing is created: /metrics counts jobs there (development only; SQLite also drops triggers
whenever Django remakes a table).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

CREATE = [
    # Held to the end of this migration's transaction: writers wait until the triggers and the
    # seed below are committed together, so the counts are exact from the start.
    "LOCK TABLE jobs_job IN SHARE ROW EXCLUSIVE MODE",
    """
    CREATE TABLE jobs_jobcount (
        backend integer NOT NULL,
        status varchar(16) NOT NULL,
        type varchar(64) NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (backend, status, type)
    )
    """,
    """
    CREATE FUNCTION jobs_jobcount_apply() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO jobs_jobcount AS c (backend, status, type, n)
            SELECT pg_backend_pid(), status, type, count(*) FROM jobcount_new
            GROUP BY status, type ORDER BY status, type
            ON CONFLICT (backend, status, type) DO UPDATE SET n = c.n + excluded.n;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO jobs_jobcount AS c (backend, status, type, n)
            SELECT pg_backend_pid(), status, type, -count(*) FROM jobcount_old
            GROUP BY status, type ORDER BY status, type
            ON CONFLICT (backend, status, type) DO UPDATE SET n = c.n + excluded.n;
        ELSE
            INSERT INTO jobs_jobcount AS c (backend, status, type, n)
            SELECT pg_backend_pid(), status, type, sum(delta) FROM (
                SELECT status, type, 1 AS delta FROM jobcount_new
                UNION ALL
                SELECT status, type, -1 AS delta FROM jobcount_old
            ) AS changes
            GROUP BY status, type HAVING sum(delta) <> 0 ORDER BY status, type
            ON CONFLICT (backend, status, type) DO UPDATE SET n = c.n + excluded.n;
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE FUNCTION jobs_jobcount_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM jobs_jobcount;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER jobs_jobcount_insert AFTER INSERT ON jobs_job
    REFERENCING NEW TABLE AS jobcount_new
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_jobcount_apply()
    """,
    """
    CREATE TRIGGER jobs_jobcount_update AFTER UPDATE ON jobs_job
    REFERENCING OLD TABLE AS jobcount_old NEW TABLE AS jobcount_new
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_jobcount_apply()
    """,
    """
    CREATE TRIGGER jobs_jobcount_delete AFTER DELETE ON jobs_job
    REFERENCING OLD TABLE AS jobcount_old
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_jobcount_apply()
    """,
    """
    CREATE TRIGGER jobs_jobcount_truncate AFTER TRUNCATE ON jobs_job
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_jobcount_truncate()
    """,
    """
    INSERT INTO jobs_jobcount (backend, status, type, n)
    SELECT 0, status, type, count(*) FROM jobs_job GROUP BY status, type
    """,
]

DROP = [
    "DROP TRIGGER IF EXISTS jobs_jobcount_truncate ON jobs_job",
    "DROP TRIGGER IF EXISTS jobs_jobcount_delete ON jobs_job",
    "DROP TRIGGER IF EXISTS jobs_jobcount_update ON jobs_job",
    "DROP TRIGGER IF EXISTS jobs_jobcount_insert ON jobs_job",
    "DROP FUNCTION IF EXISTS jobs_jobcount_truncate()",
    "DROP FUNCTION IF EXISTS jobs_jobcount_apply()",
    "DROP TABLE IF EXISTS jobs_jobcount",
]


def _run(statements: list[str]) -> Any:
    def run(apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        for statement in statements:
            schema_editor.execute(statement, params=None)

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0002_job_progress"),
    ]

    operations = [
        migrations.RunPython(_run(CREATE), _run(DROP), elidable=False),
    ]
