"""Webhook signing secrets (Standard Webhooks, `whsec_` + base64 of 32 random bytes), one per
tenant to begin with: every existing tenant gets its first secret here, so every webhook is
signed from the first deploy on. Tenants read theirs by rotating (`POST /signing-secrets/rotate`
or the admin's action), since a secret is only ever shown when it is made. Self-contained on
purpose (a migration must not follow later edits of the app's code).
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

import django.db.models.deletion
from django.db import migrations, models


def create_first_secrets(apps: Any, schema_editor: Any) -> None:
    Tenant = apps.get_model("jobs", "Tenant")
    SigningSecret = apps.get_model("jobs", "SigningSecret")
    SigningSecret.objects.bulk_create(
        [
            SigningSecret(
                tenant_id=tenant_id,
                secret="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            )
            for tenant_id in Tenant.objects.values_list("id", flat=True).iterator()
        ],
        batch_size=1000,
    )


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0004_job_cursor"),
    ]

    operations = [
        migrations.CreateModel(
            name="SigningSecret",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("secret", models.CharField(max_length=100)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("expires_at", models.DateTimeField(blank=True, null=True)),
                (
                    "tenant",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="signing_secrets",
                        to="jobs.tenant",
                    ),
                ),
            ],
            options={
                "ordering": ["-created_at", "-id"],
                "indexes": [
                    models.Index(fields=["tenant", "expires_at"], name="signing_secret_tenant_exp")
                ],
            },
        ),
        migrations.RunPython(create_first_secrets, migrations.RunPython.noop, elidable=True),
    ]
