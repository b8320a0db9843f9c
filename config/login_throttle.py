"""Throttle password logins (the admin, and so the dashboard) with counters in Redis.

After JOBS_LOGIN_ATTEMPTS failed logins within JOBS_LOGIN_WINDOW_S, from one client address or
for one user name, every further attempt for either is refused, the right password included,
until the window has passed since the last failure. A successful login clears the user name's
count. The counters live in Redis so that every API process shares them; if Redis cannot be
reached, logins are not throttled (and that is logged), as the API's rate limit does.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from django.http import HttpRequest

from jobs.queue import sync_queue

logger = logging.getLogger(__name__)


def _username(username: str | None) -> str:
    """The user name as counted: one count whatever its case or surrounding spaces."""
    return (username or "").strip().lower()[:150]


def _address(request: HttpRequest | None) -> str | None:
    return request.META.get("REMOTE_ADDR") if request is not None else None


def is_locked(request: HttpRequest | None, username: str | None) -> bool:
    limit = settings.JOBS["LOGIN_ATTEMPTS"]
    if limit <= 0:
        return False
    try:
        failures = sync_queue().login_failures(
            username=_username(username), address=_address(request)
        )
    except Exception as exc:
        logger.warning("login throttle not checked, Redis unavailable: %s", exc)
        return False
    return failures >= limit


class ThrottledModelBackend(ModelBackend):
    """Django's backend, refusing outright while the client or the user name is locked."""

    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, **kwargs: Any
    ) -> Any:
        if is_locked(request, username):
            logger.warning("login refused: too many failed attempts username=%r", username)
            # Stops every backend: not even the right password gets in.
            raise PermissionDenied("too many failed login attempts")
        return super().authenticate(request, username=username, **kwargs)


@receiver(user_login_failed)
def count_failure(sender: Any, credentials: dict[str, Any], request: Any = None, **kw: Any) -> None:
    if settings.JOBS["LOGIN_ATTEMPTS"] <= 0:
        return
    try:
        sync_queue().count_login_failure(
            username=_username(credentials.get("username")),
            address=_address(request),
            window_s=settings.JOBS["LOGIN_WINDOW_S"],
        )
    except Exception as exc:
        logger.warning("failed login not counted, Redis unavailable: %s", exc)


@receiver(user_logged_in)
def clear_failures(sender: Any, request: Any, user: Any, **kw: Any) -> None:
    try:
        sync_queue().clear_login_failures(username=_username(user.get_username()))
    except Exception as exc:
        logger.warning("login count not cleared, Redis unavailable: %s", exc)
