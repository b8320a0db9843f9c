"""Workflows (SPEC section 13, jobs/dependencies.py): the WAITING status, a job's dependencies
(`depends_on`, `dependencies_left`, `dependents_waiting`) and the edge table read by parent.

The new columns keep a database default on PostgreSQL, so that processes still running the
previous code (which do not name them in their INSERTs and COPYs) keep working during a
deploy. Adding a column with a constant default rewrites nothing on PostgreSQL 11+.
"""

from typing import Any

import django.db.models.deletion
from django.db import migrations, models

DEFAULTS = [
    "ALTER TABLE jobs_job ALTER COLUMN depends_on SET DEFAULT '[]'::jsonb",
    "ALTER TABLE jobs_job ALTER COLUMN dependencies_left SET DEFAULT 0",
    "ALTER TABLE jobs_job ALTER COLUMN dependents_waiting SET DEFAULT false",
]
NO_DEFAULTS = [
    "ALTER TABLE jobs_job ALTER COLUMN depends_on DROP DEFAULT",
    "ALTER TABLE jobs_job ALTER COLUMN dependencies_left DROP DEFAULT",
    "ALTER TABLE jobs_job ALTER COLUMN dependents_waiting DROP DEFAULT",
]


def _run(statements: list[str]) -> Any:
    def run(apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            for statement in statements:
                schema_editor.execute(statement)

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0008_schedules"),
    ]

    operations = [
        migrations.CreateModel(
            name="JobDependency",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("open", models.BooleanField(default=True)),
            ],
        ),
        migrations.AddField(
            model_name="job",
            name="dependencies_left",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="job",
            name="dependents_waiting",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="job",
            name="depends_on",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.AlterField(
            model_name="job",
            name="status",
            field=models.CharField(
                choices=[
                    ("WAITING", "Waiting"),
                    ("PENDING", "Pending"),
                    ("RUNNING", "Running"),
                    ("COMPLETED", "Completed"),
                    ("FAILED", "Failed"),
                    ("CANCELLED", "Cancelled"),
                ],
                default="PENDING",
                max_length=16,
            ),
        ),
        migrations.AddIndex(
            model_name="job",
            index=models.Index(
                condition=models.Q(("dependents_waiting", True)),
                fields=["status"],
                name="job_dependents_waiting",
            ),
        ),
        migrations.AddField(
            model_name="jobdependency",
            name="child",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="dependency_edges",
                to="jobs.job",
            ),
        ),
        migrations.AddField(
            model_name="jobdependency",
            name="parent",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="dependent_edges",
                to="jobs.job",
            ),
        ),
        migrations.AddConstraint(
            model_name="jobdependency",
            constraint=models.UniqueConstraint(
                fields=("parent", "child"), name="job_dependency_unique"
            ),
        ),
        migrations.RunPython(_run(DEFAULTS), _run(NO_DEFAULTS)),
    ]
