from __future__ import annotations

from django.apps import AppConfig


class JobsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "jobs"
    verbose_name = "Job queue"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from config import login_throttle  # noqa: F401 -- connects its receivers
        from jobs import signals  # noqa: F401 -- connects the receivers
        from jobs.cursors import install_sqlite_triggers

        post_migrate.connect(install_sqlite_triggers, sender=self)
