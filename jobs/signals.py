"""Announce changes to tenants and API keys to every API process (jobs/auth.py caches keys).

Model signals, so that every way a key or tenant changes is covered: services, the admin's forms
and deletes, cascades when a tenant is deleted.
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from jobs.auth import announce_auth_change
from jobs.models import ApiKey, Tenant


@receiver([post_save, post_delete], sender=Tenant)
def tenant_changed(sender: type[Tenant], instance: Tenant, **kwargs: Any) -> None:
    announce_auth_change(instance.id)


@receiver([post_save, post_delete], sender=ApiKey)
def api_key_changed(sender: type[ApiKey], instance: ApiKey, **kwargs: Any) -> None:
    announce_auth_change(instance.tenant_id)
