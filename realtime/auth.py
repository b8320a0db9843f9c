"""WebSocket authentication: an API key (`?token=` or `Authorization: Bearer`) or a staff session.

The middleware fills `scope["tenant"]` (the key's Tenant, or None), `scope["staff"]` and
`scope["user"]` (a staff user who may view jobs, or AnonymousUser) and refuses the handshake when
neither identity is valid. A staff socket needs the `jobs.view_job` permission (what the admin
asks to list jobs), not just `is_staff`, and is re-checked while it stays open
(`staff_session_user`): logging out, losing the permission or staff status closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs, urlparse

from channels.auth import AuthMiddlewareStack
from channels.middleware import BaseMiddleware
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, load_backend
from django.contrib.auth.models import AnonymousUser
from django.http.request import split_domain_port, validate_host
from django.utils.crypto import constant_time_compare

from jobs.orm import orm
from jobs.services import api_key_authenticate

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WATCH_PERMISSION = "jobs.view_job"
# Django's own fallback when DEBUG is on and ALLOWED_HOSTS is empty.
DEBUG_ALLOWED_HOSTS = [".localhost", "127.0.0.1", "[::1]"]


def header(scope: Scope, name: bytes) -> str | None:
    """The value of the first request header called `name` (lowercase bytes), or None."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin1")
    return None


def api_key_from_scope(scope: Scope) -> str | None:
    """The API key the client presented, or None if it presented none.

    `Authorization: Bearer <key>` wins over `?token=<key>` (browsers can only use the latter).
    Other Authorization schemes are ignored: a proxy's Basic auth must not break a staff session.
    """
    authorization = header(scope, b"authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    tokens = query.get("token")
    return tokens[-1] if tokens else None


def is_staff_user(user: Any) -> bool:
    """True for an authenticated, active staff user."""
    return bool(
        user is not None
        and getattr(user, "is_authenticated", False)
        and getattr(user, "is_active", False)
        and getattr(user, "is_staff", False)
    )


def can_watch_jobs(user: Any) -> bool:
    """True for an active staff user who may view jobs (`jobs.view_job`, as in the admin): the
    identity of the dashboard and of a staff socket, which see every tenant. Reads the database
    (permissions) the first time it is asked for a user object."""
    return is_staff_user(user) and user.has_perm(WATCH_PERMISSION)


def staff_session_user(session_key: str | None, user_pk: Any) -> Any | None:
    """The user of session `session_key` if it is still logged in as `user_pk` (not logged out,
    expired, or invalidated by a password change) and may still watch jobs; else None."""
    if not session_key:
        return None
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    try:
        user_id = session[SESSION_KEY]
        backend_path = session[BACKEND_SESSION_KEY]
        session_hash = session[HASH_SESSION_KEY]
    except KeyError:
        return None
    if str(user_id) != str(user_pk) or backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    user = load_backend(backend_path).get_user(user_id)
    if user is None or not hasattr(user, "get_session_auth_hash"):
        return None
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    if not any(constant_time_compare(session_hash, h) for h in hashes):
        return None
    return user if can_watch_jobs(user) else None


def _request_scheme(scope: Scope) -> str:
    """`https` if the browser reached us over TLS: `wss` to Daphne, or, behind a TLS proxy that
    Django is told to trust (`HTTPS=1`), its forwarded-protocol header."""
    if scope.get("scheme") == "wss":
        return "https"
    proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy_header:
        name = proxy_header[0].removeprefix("HTTP_").replace("_", "-").lower().encode()
        forwarded = header(scope, name)
        if forwarded is not None and forwarded.split(",")[0].strip() == proxy_header[1]:
            return "https"
    return "http"


def _trusted(origin: str) -> bool:
    """`origin` is one of CSRF_TRUSTED_ORIGINS (`https://*.example.com` covers subdomains)."""
    parsed = urlparse(origin)
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        trusted = trusted.lower()
        if origin == trusted:
            return True
        wanted = urlparse(trusted)
        if (
            wanted.scheme == parsed.scheme
            and wanted.netloc.startswith("*.")
            and parsed.netloc.endswith(wanted.netloc[1:])
        ):
            return True
    return False


def origin_allowed(scope: Scope) -> bool:
    """True if the handshake's Origin is the service's own: the same scheme, host and port as
    the request (its Host being one of ALLOWED_HOSTS), or one of CSRF_TRUSTED_ORIGINS, as
    Django's CSRF check decides.

    A session cookie is sent by the browser whatever page opens the socket, so a cookie-based
    connection must come from one of our own pages (cross-site WebSocket hijacking). The host
    alone is not enough: a page on another port or scheme of the same host is another origin
    (another service on that machine, or plain HTTP where the service is HTTPS).
    """
    origin = (header(scope, b"origin") or "").strip().lower()
    if not origin or origin == "null":
        return False
    if _trusted(origin):
        return True
    host = (header(scope, b"host") or "").strip().lower()
    if not host or origin != f"{_request_scheme(scope)}://{host}":
        return False
    domain, _port = split_domain_port(host)
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = DEBUG_ALLOWED_HOSTS
    return bool(domain) and validate_host(domain, allowed)


async def deny_connection(scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse the handshake: a close before accept reaches the client as HTTP 403."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


class TenantOrStaffAuthMiddleware(BaseMiddleware):
    """Admit a WebSocket with a valid API key, or a staff session opened from an allowed Origin.

    Must sit inside Channels' AuthMiddlewareStack, which resolves `scope["user"]` first.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return await self.inner(scope, receive, send)
        scope = dict(scope)
        client = scope.get("client")

        tenant = None
        raw_key = api_key_from_scope(scope)
        if raw_key is not None:
            tenant = await orm(api_key_authenticate)(raw_key=raw_key)
            if tenant is None:
                # A presented key that is wrong is an error, not a reason to try the session.
                logger.info("websocket refused: invalid API key client=%s", client)
                return await deny_connection(scope, receive, send)

        user = scope.get("user")
        staff = is_staff_user(user)
        if staff and not await orm(can_watch_jobs)(user):
            logger.warning(
                "websocket: staff session ignored, no %s permission user=%s client=%s",
                WATCH_PERMISSION,
                getattr(user, "pk", None),
                client,
            )
            staff = False
        if staff and not origin_allowed(scope):
            logger.warning(
                "websocket: staff session ignored, Origin %r not allowed user=%s client=%s",
                header(scope, b"origin"),
                getattr(user, "pk", None),
                client,
            )
            staff = False
        if not staff:
            # Only a staff session from an allowed Origin may act as a user downstream.
            scope["user"] = AnonymousUser()

        if tenant is None and not staff:
            logger.info("websocket refused: no valid credentials client=%s", client)
            return await deny_connection(scope, receive, send)
        scope["tenant"] = tenant
        scope["staff"] = staff
        # Kept so the consumer can re-check it while the socket stays open (revocation).
        scope["api_key"] = raw_key if tenant is not None else None
        return await self.inner(scope, receive, send)


def JobsAuthMiddlewareStack(inner: ASGIApp) -> ASGIApp:
    """Cookies, session and user (Channels), then the API-key/staff check of this project."""
    return AuthMiddlewareStack(TenantOrStaffAuthMiddleware(inner))
