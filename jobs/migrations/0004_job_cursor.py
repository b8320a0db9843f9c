"""Cursors: every change of a job a subscriber sees gets the next value of one sequence, set by a
trigger in the statement that makes the change (jobs/cursors.py explains how they are read).

On PostgreSQL, BEFORE triggers take `nextval` for each inserted row and for each update of a
column that the job's wire form shows (a lease renewal does not count as a change); the
transaction takes its id first, which the watermark relies on. Existing rows are numbered in
the order of their last update. Self-contained on purpose (a migration must not follow later
edits of the app's code). SQLite gets its triggers after every migrate instead
(jobs/cursors.py), since it drops them whenever Django remakes the table.
"""

from __future__ import annotations

from typing import Any

import django.db.models
from django.db import migrations

import jobs.models

CREATE = [
    "LOCK TABLE jobs_job IN SHARE ROW EXCLUSIVE MODE",
    "CREATE SEQUENCE jobs_job_cursor_seq AS bigint",
    """
    UPDATE jobs_job AS j SET cursor = numbered.cursor
    FROM (
        SELECT id, nextval('jobs_job_cursor_seq') AS cursor
        FROM (SELECT id FROM jobs_job ORDER BY updated_at, id) AS ordered
    ) AS numbered
    WHERE j.id = numbered.id
    """,
    """
    CREATE FUNCTION jobs_job_next_cursor() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_current_xact_id();
        NEW.cursor := nextval('jobs_job_cursor_seq');
        RETURN NEW;
    END
    $$
    """,
    """
    CREATE TRIGGER jobs_job_cursor_insert BEFORE INSERT ON jobs_job
    FOR EACH ROW EXECUTE FUNCTION jobs_job_next_cursor()
    """,
    """
    CREATE TRIGGER jobs_job_cursor_update
    BEFORE UPDATE OF status, attempts, error, result, progress, progress_message, updated_at
    ON jobs_job FOR EACH ROW EXECUTE FUNCTION jobs_job_next_cursor()
    """,
]
DROP = [
    "DROP TRIGGER IF EXISTS jobs_job_cursor_update ON jobs_job",
    "DROP TRIGGER IF EXISTS jobs_job_cursor_insert ON jobs_job",
    "DROP FUNCTION IF EXISTS jobs_job_next_cursor()",
    "DROP SEQUENCE IF EXISTS jobs_job_cursor_seq",
]


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        for statement in CREATE:
            schema_editor.execute(statement)


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        for statement in DROP:
            schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("jobs", "0003_job_counts")]

    operations = [
        migrations.AddField(
            model_name="job",
            name="cursor",
            field=jobs.models.CursorField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(create, drop),
        migrations.AddIndex(
            model_name="job",
            index=django.db.models.Index(fields=["tenant", "cursor"], name="job_tenant_cursor"),
        ),
    ]
