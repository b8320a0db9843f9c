"""Who may open `/ws`: API keys (query string or header) and staff sessions from our own pages."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.test import Client
from django.utils import timezone

from jobs.models import ApiKey, Tenant
from realtime.auth import api_key_from_scope, origin_allowed
from tests.support.users import create_operator
from tests.support.websocket import (
    ALLOWED_ORIGIN,
    FOREIGN_ORIGIN,
    assert_alive,
    communicator,
    open_ws,
    receive,
    session_cookie,
    subscribe,
)

# Async code reads the database from another thread: rows must be committed.
socket_db = pytest.mark.django_db(transaction=True)


async def assert_refused(*, token: str | None = None, headers: Any = ()) -> None:
    comm = communicator(token=token, headers=headers)
    try:
        connected, _ = await comm.connect(timeout=5)
        # A close before accept: the client sees HTTP 403 and no WebSocket.
        assert connected is False
    finally:
        await comm.disconnect()


# --- API keys -------------------------------------------------------------------------------
@socket_db
async def test_connect_with_token_in_query_string(api_key: str) -> None:
    async with open_ws(token=api_key) as comm:
        await assert_alive(comm)


@socket_db
async def test_connect_with_authorization_header(api_key: str) -> None:
    async with open_ws(headers=[(b"authorization", f"Bearer {api_key}".encode())]) as comm:
        await subscribe(comm, "tenant-1")


@socket_db
async def test_token_needs_no_origin_and_ignores_a_foreign_one(api_key: str) -> None:
    async with open_ws(token=api_key, headers=[(b"origin", FOREIGN_ORIGIN)]) as comm:
        await subscribe(comm, "tenant-1")


@socket_db
async def test_no_credentials_refused(tenant: Tenant) -> None:
    await assert_refused()
    await assert_refused(headers=[(b"authorization", b"Bearer ")])


@socket_db
async def test_bad_token_refused(api_key: str) -> None:
    await assert_refused(token=api_key + "x")
    await assert_refused(token="not-a-key")
    await assert_refused(headers=[(b"authorization", f"Bearer {api_key[:-1]}".encode())])


@socket_db
async def test_key_with_a_nul_is_refused_not_an_error(tenant: Tenant) -> None:
    # `/ws?token=jq_%00abc_x` reached the database and answered 500 with a traceback.
    await assert_refused(token="jq_\x00abc_x")
    await assert_refused(token="jq_0123456789ab_" + "\x00" * 30)


@socket_db
async def test_revoked_key_refused(api_key: str) -> None:
    await ApiKey.objects.filter(prefix=api_key.split("_")[1]).aupdate(revoked_at=timezone.now())
    await assert_refused(token=api_key)


@socket_db
async def test_inactive_tenant_refused(tenant: Tenant, api_key: str) -> None:
    await Tenant.objects.filter(pk=tenant.pk).aupdate(is_active=False)
    await assert_refused(token=api_key)


@socket_db
async def test_bad_token_refused_even_with_a_staff_session(
    api_key: str, staff_cookie: tuple[bytes, bytes]
) -> None:
    await assert_refused(token="jq_bad_key", headers=[staff_cookie, (b"origin", ALLOWED_ORIGIN)])


# --- staff sessions -------------------------------------------------------------------------
@socket_db
async def test_staff_session_may_subscribe_to_any_tenant(
    tenant: Tenant, other_tenant: Tenant, staff_cookie: tuple[bytes, bytes]
) -> None:
    async with open_ws(headers=[staff_cookie, (b"origin", ALLOWED_ORIGIN)]) as comm:
        await subscribe(comm, "tenant-1")
        await subscribe(comm, "tenant-2")
        await comm.send_json_to({"type": "SUBSCRIBE", "tenantId": "no-such-tenant"})
        error = await receive(comm)
        assert error["type"] == "ERROR"
        assert "unknown tenant" in error["message"]
        await assert_alive(comm)


@socket_db
async def test_staff_session_from_foreign_origin_refused(
    tenant: Tenant, staff_cookie: tuple[bytes, bytes]
) -> None:
    await assert_refused(headers=[staff_cookie, (b"origin", FOREIGN_ORIGIN)])
    await assert_refused(headers=[staff_cookie, (b"origin", b"http://localhost.evil.example")])


@socket_db
async def test_staff_session_without_origin_refused(
    tenant: Tenant, staff_cookie: tuple[bytes, bytes]
) -> None:
    await assert_refused(headers=[staff_cookie])


@socket_db
async def test_non_staff_session_refused(
    tenant: Tenant, plain_user_cookie: tuple[bytes, bytes]
) -> None:
    await assert_refused(headers=[plain_user_cookie, (b"origin", ALLOWED_ORIGIN)])


@socket_db
async def test_deactivated_staff_refused(
    tenant: Tenant, staff_user: Any, staff_cookie: tuple[bytes, bytes]
) -> None:
    staff_user.is_active = False
    await database_sync_to_async(staff_user.save)()
    await assert_refused(headers=[staff_cookie, (b"origin", ALLOWED_ORIGIN)])


@socket_db
async def test_key_with_foreign_origin_staff_session_gets_only_its_tenant(
    other_tenant: Tenant, api_key: str, staff_cookie: tuple[bytes, bytes]
) -> None:
    # The session is not trusted from a foreign page; the key still is, for its own tenant.
    async with open_ws(token=api_key, headers=[staff_cookie, (b"origin", FOREIGN_ORIGIN)]) as comm:
        await subscribe(comm, "tenant-1")
        await comm.send_json_to({"type": "SUBSCRIBE", "tenantId": "tenant-2"})
        assert (await receive(comm))["type"] == "ERROR"


# --- the helpers, without a connection -----------------------------------------------------
def scope(*headers: tuple[bytes, bytes], query: bytes = b"") -> dict[str, Any]:
    return {"type": "websocket", "headers": list(headers), "query_string": query}


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ((), b"", None),
        ((), b"token=jq_abc_def", "jq_abc_def"),
        ((), b"token=jq_a%2Bb", "jq_a+b"),
        ((), b"token=", None),
        (((b"authorization", b"Bearer jq_hdr"),), b"token=jq_qs", "jq_hdr"),
        (((b"authorization", b"bearer   jq_hdr  "),), b"", "jq_hdr"),
        # A proxy's Basic auth is not an API key and must not hide the query token.
        (((b"authorization", b"Basic dXNlcjpwdw=="),), b"token=jq_qs", "jq_qs"),
        (((b"authorization", b"Basic dXNlcjpwdw=="),), b"", None),
    ],
)
def test_api_key_from_scope(
    headers: tuple[tuple[bytes, bytes], ...], query: bytes, expected: str | None
) -> None:
    assert api_key_from_scope(scope(*headers, query=query)) == expected


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        (None, False),
        (b"", False),
        (b"null", False),
        (b"http://localhost:8000", True),
        (b"http://LOCALHOST:8000", True),
        # The same host is not enough: another port, scheme or service is another origin
        # (a page on http://127.0.0.1:18300 received another tenant's updates in Chromium).
        (b"http://localhost", False),
        (b"http://localhost:18300", False),
        (b"https://localhost:8000", False),
        (b"ftp://localhost:8000", False),
        (b"file://", False),
        (b"https://evil.example", False),
        (b"http://localhost.evil.example", False),
        (b"http://localhost:99999", False),
    ],
)
def test_origin_must_be_the_requests_own(
    settings: Any, origin: bytes | None, expected: bool
) -> None:
    settings.ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
    headers = [(b"host", b"localhost:8000")]
    if origin is not None:
        headers.append((b"origin", origin))
    assert origin_allowed(scope(*headers)) is expected


def test_origin_of_a_host_not_allowed_is_refused(settings: Any) -> None:
    settings.ALLOWED_HOSTS = ["localhost"]
    evil = scope((b"host", b"evil.example"), (b"origin", b"http://evil.example"))
    assert origin_allowed(evil) is False


def test_origin_over_tls(settings: Any) -> None:
    settings.ALLOWED_HOSTS = ["jobs.example.com"]
    direct = {
        **scope((b"host", b"jobs.example.com"), (b"origin", b"https://jobs.example.com")),
        "scheme": "wss",
    }
    assert origin_allowed(direct) is True
    # Behind a TLS proxy Django is told to trust (HTTPS=1), its forwarded protocol counts.
    proxied = scope(
        (b"host", b"jobs.example.com"),
        (b"origin", b"https://jobs.example.com"),
        (b"x-forwarded-proto", b"https"),
    )
    assert origin_allowed(proxied) is False
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert origin_allowed(proxied) is True
    plain = scope((b"host", b"jobs.example.com"), (b"origin", b"http://jobs.example.com"))
    assert origin_allowed({**plain, "scheme": "wss"}) is False


def test_origin_wildcard_host_only_admits_same_origin(settings: Any) -> None:
    settings.ALLOWED_HOSTS = ["*"]
    same = scope((b"host", b"jobs.example.com"), (b"origin", b"http://jobs.example.com"))
    cross = scope((b"host", b"jobs.example.com"), (b"origin", b"https://evil.example"))
    assert origin_allowed(same) is True
    assert origin_allowed(cross) is False


def test_trusted_origins_as_django_csrf_has_them(settings: Any) -> None:
    settings.ALLOWED_HOSTS = ["api.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://ops.example.com", "https://*.corp.example"]
    host = (b"host", b"api.example.com")
    assert origin_allowed(scope(host, (b"origin", b"https://ops.example.com"))) is True
    assert origin_allowed(scope(host, (b"origin", b"https://dash.corp.example"))) is True
    assert origin_allowed(scope(host, (b"origin", b"http://ops.example.com"))) is False
    assert origin_allowed(scope(host, (b"origin", b"https://corp.example.evil"))) is False


@socket_db
async def test_staff_without_the_permission_to_view_jobs_refused(tenant: Tenant) -> None:
    # is_staff opens the admin's door; reading every tenant's jobs needs jobs.view_job.
    intern = await database_sync_to_async(create_operator)("intern", can_view_jobs=False)
    cookie = await database_sync_to_async(session_cookie)(intern)
    await assert_refused(headers=[cookie, (b"origin", ALLOWED_ORIGIN)])


async def assert_closed_for_staff(comm: Any, within_s: float) -> None:
    closed = await comm.receive_output(timeout=within_s)
    assert closed == {
        "type": "websocket.close",
        "code": 4001,
        "reason": "staff session ended or permission withdrawn",
    }


@socket_db
@pytest.mark.parametrize("change", ["is_staff", "is_active", "permission"])
async def test_an_open_staff_socket_is_closed_when_the_user_loses_staff_or_permission(
    change: str, tenant: Tenant, staff_user: Any, staff_cookie: tuple[bytes, bytes]
) -> None:
    def withdraw() -> None:
        if change == "permission":
            staff_user.user_permissions.clear()
        else:
            setattr(staff_user, change, False)
            staff_user.save()

    async with open_ws(headers=[staff_cookie, (b"origin", ALLOWED_ORIGIN)]) as comm:
        await subscribe(comm, "tenant-1")
        await database_sync_to_async(withdraw)()
        # Announced to every API process at once: no wait for the periodic re-check.
        await assert_closed_for_staff(comm, within_s=2)


@socket_db
async def test_an_open_staff_socket_is_closed_after_logout(
    tenant: Tenant, staff_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("realtime.consumers.STAFF_RECHECK_S", 0.3)
    browser = Client()
    await database_sync_to_async(browser.force_login)(staff_user)
    name = settings.SESSION_COOKIE_NAME
    cookie = (b"cookie", f"{name}={browser.cookies[name].value}".encode())
    async with open_ws(headers=[cookie, (b"origin", ALLOWED_ORIGIN)]) as comm:
        await subscribe(comm, "tenant-1")
        response = await database_sync_to_async(browser.post)("/admin/logout/")
        assert response.status_code == 200
        await assert_closed_for_staff(comm, within_s=3)
