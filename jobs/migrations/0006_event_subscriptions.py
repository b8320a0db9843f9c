"""Event subscriptions and their delivery log (SPEC section 14, jobs/events_dispatch.py)."""

import uuid

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0005_signing_secret"),
    ]

    operations = [
        migrations.CreateModel(
            name="EventSubscription",
            fields=[
                (
                    "id",
                    models.UUIDField(
                        default=uuid.uuid4, editable=False, primary_key=True, serialize=False
                    ),
                ),
                ("url", models.CharField(max_length=2048)),
                ("events", models.JSONField(default=list)),
                ("description", models.CharField(blank=True, default="", max_length=500)),
                ("created_at", models.DateTimeField()),
                ("cursor", models.BigIntegerField(default=0)),
                (
                    "tenant",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="event_subscriptions",
                        to="jobs.tenant",
                    ),
                ),
            ],
            options={
                "ordering": ["-created_at", "-id"],
            },
        ),
        migrations.CreateModel(
            name="EventDelivery",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("job_id", models.UUIDField()),
                ("event_type", models.CharField(max_length=32)),
                ("event_id", models.CharField(max_length=100)),
                ("attempt", models.PositiveIntegerField()),
                ("status_code", models.PositiveSmallIntegerField(blank=True, null=True)),
                ("duration_ms", models.PositiveIntegerField(blank=True, null=True)),
                ("error", models.TextField(blank=True, null=True)),
                ("created_at", models.DateTimeField()),
                (
                    "subscription",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="deliveries",
                        to="jobs.eventsubscription",
                    ),
                ),
            ],
            options={
                "verbose_name_plural": "event deliveries",
                "ordering": ["-created_at", "-id"],
            },
        ),
        migrations.AddIndex(
            model_name="eventsubscription",
            index=models.Index(fields=["tenant", "created_at"], name="event_sub_tenant_created"),
        ),
        migrations.AddIndex(
            model_name="eventdelivery",
            index=models.Index(
                fields=["subscription", "-created_at", "-id"], name="event_delivery_sub_newest"
            ),
        ),
    ]
