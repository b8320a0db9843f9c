"""The change log of tenants with event subscriptions (jobs_jobchange, jobs/events_dispatch.py).

On PostgreSQL, statement-level AFTER triggers with transition tables copy each inserted row, and
each updated row whose cursor changed (a change a subscriber sees, migration 0004), into
jobs_jobchange, with the row as JSON, in the writer's transaction: a rollback undoes the log
entry with the change. Only tenants that have a subscription are logged, and a statement of a
database without any subscription costs one probe of a small table. Deliveries of events are not
themselves logged. Self-contained on purpose (a migration must not follow later edits of the
app's code). SQLite gets its trigger after every migrate instead (jobs/cursors.py).
"""

from __future__ import annotations

from typing import Any

import django.db.models.deletion
from django.db import migrations, models

CREATE = [
    """
    CREATE FUNCTION jobs_jobchange_log() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM jobs_eventsubscription) THEN
            RETURN NULL;
        END IF;
        IF TG_OP = 'INSERT' THEN
            INSERT INTO jobs_jobchange (cursor, tenant_id, job_id, snapshot)
            SELECT n.cursor, n.tenant_id, n.id, to_jsonb(n) FROM jobchange_new AS n
            WHERE n.cursor IS NOT NULL AND n.type <> 'event_delivery'
            AND n.tenant_id IN (SELECT s.tenant_id FROM jobs_eventsubscription AS s);
        ELSE
            INSERT INTO jobs_jobchange (cursor, tenant_id, job_id, snapshot)
            SELECT n.cursor, n.tenant_id, n.id, to_jsonb(n)
            FROM jobchange_new AS n JOIN jobchange_old AS o ON o.id = n.id
            WHERE n.cursor IS DISTINCT FROM o.cursor AND n.cursor IS NOT NULL
            AND n.type <> 'event_delivery'
            AND n.tenant_id IN (SELECT s.tenant_id FROM jobs_eventsubscription AS s);
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER jobs_jobchange_insert AFTER INSERT ON jobs_job
    REFERENCING NEW TABLE AS jobchange_new
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_jobchange_log()
    """,
    """
    CREATE TRIGGER jobs_jobchange_update AFTER UPDATE ON jobs_job
    REFERENCING OLD TABLE AS jobchange_old NEW TABLE AS jobchange_new
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_jobchange_log()
    """,
]
DROP = [
    "DROP TRIGGER IF EXISTS jobs_jobchange_update ON jobs_job",
    "DROP TRIGGER IF EXISTS jobs_jobchange_insert ON jobs_job",
    "DROP FUNCTION IF EXISTS jobs_jobchange_log()",
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
        ("jobs", "0006_event_subscriptions"),
    ]

    operations = [
        migrations.CreateModel(
            name="JobChange",
            fields=[
                ("cursor", models.BigIntegerField(primary_key=True, serialize=False)),
                ("job_id", models.UUIDField()),
                ("snapshot", models.JSONField()),
                (
                    "tenant",
                    models.ForeignKey(
                        db_constraint=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="jobs.tenant",
                    ),
                ),
            ],
            options={
                "ordering": ["cursor"],
                "indexes": [
                    models.Index(fields=["tenant", "cursor"], name="job_change_tenant_cursor")
                ],
            },
        ),
        migrations.RunPython(_run(CREATE), _run(DROP), elidable=False),
    ]
