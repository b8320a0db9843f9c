"""Announce changes to tenants, API keys and staff users to every API process (jobs/auth.py
caches keys; open WebSockets of a changed key or staff user are re-checked).

Model signals, so that every way a key, tenant or user changes is covered: services, the admin's
forms and deletes, cascades when a tenant is deleted.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.signals import user_logged_out
from django.db.models import Model
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from jobs.auth import STAFF_CHANGED, announce_auth_change
from jobs.models import ApiKey, Tenant

User = get_user_model()


@receiver([post_save, post_delete], sender=Tenant)
def tenant_changed(sender: type[Tenant], instance: Tenant, **kwargs: Any) -> None:
    announce_auth_change(instance.id)


@receiver([post_save, post_delete], sender=ApiKey)
def api_key_changed(sender: type[ApiKey], instance: ApiKey, **kwargs: Any) -> None:
    announce_auth_change(instance.tenant_id)


@receiver([post_save, post_delete], sender=settings.AUTH_USER_MODEL)
def user_changed(sender: type[Model], instance: Model, **kwargs: Any) -> None:
    # Staff status, activity, password (which ends its sessions) or the user itself.
    announce_auth_change(STAFF_CHANGED)


@receiver(m2m_changed, sender=Group.permissions.through)
@receiver(m2m_changed, sender=User.groups.through)
@receiver(m2m_changed, sender=User.user_permissions.through)
def permissions_changed(sender: type[Model], action: str, **kwargs: Any) -> None:
    if action in ("post_add", "post_remove", "post_clear"):
        announce_auth_change(STAFF_CHANGED)


@receiver(user_logged_out)
def logged_out(sender: type[Model], **kwargs: Any) -> None:
    # Sent before the session is deleted: a socket re-checked at once may still see it, and is
    # closed by the next periodic re-check (realtime/consumers.py, STAFF_RECHECK_S).
    announce_auth_change(STAFF_CHANGED)
