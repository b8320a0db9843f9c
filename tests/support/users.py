"""Users for tests of the staff surfaces (dashboard, staff WebSockets)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission


def create_operator(username: str = "operator", *, can_view_jobs: bool = True) -> AbstractBaseUser:
    """A staff user; with `can_view_jobs`, holding `jobs.view_job` (what watching every tenant
    requires, as listing jobs in the admin does)."""
    user = get_user_model().objects.create_user(username=username, is_staff=True)
    if can_view_jobs:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label="jobs", codename="view_job")
        )
    return user
