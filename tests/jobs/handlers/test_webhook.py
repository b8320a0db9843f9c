"""The webhook handler against real local HTTP servers (tests/support/webhook_server.py): the
request it sends, how answers become results or failures, the SSRF guard (checked on the resolved
address, on every redirect), redirects, and the payloads its schema refuses. The address policy
itself is tested in tests/jobs/test_netguard.py."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from jobs.handlers import PermanentError
from jobs.handlers import webhook as webhook_module
from jobs.handlers.webhook import MAX_RESPONSE_BYTES, WebhookError
from tests.support.handlers import (
    allow_webhook_hosts,
    error_messages,
    make_ctx,
    run_async,
    validate,
)
from tests.support.stack import free_port
from tests.support.webhook_server import Reply, WebhookServer, webhook_server


@pytest.fixture
def server() -> Iterator[WebhookServer]:
    with webhook_server("127.0.0.1") as srv:
        yield srv


@pytest.fixture
def server_2() -> Iterator[WebhookServer]:
    """A second server, on 127.0.0.2 (also loopback, but not allow-listed by "127.0.0.1")."""
    try:
        with webhook_server("127.0.0.2") as srv:
            yield srv
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.0.2: {exc}")


@pytest.fixture
def server_v6() -> Iterator[WebhookServer]:
    try:
        with webhook_server("::1") as srv:
            yield srv
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")


@pytest.fixture
def allow_127_0_0_1(settings: Any) -> None:
    allow_webhook_hosts(settings, "127.0.0.1")


@pytest.fixture
def allow_nothing(settings: Any) -> None:
    allow_webhook_hosts(settings)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the test makes resolve to chosen addresses; other names resolve for real."""
    table: dict[str, list[str]] = {}
    real_resolve = webhook_module.resolve

    async def resolve(host: str, port: int) -> list[Any]:
        if host in table:
            return [ipaddress.ip_address(address) for address in table[host]]
        return await real_resolve(host, port)

    monkeypatch.setattr(webhook_module, "resolve", resolve)
    return table


def redirect(server: WebhookServer, *, to: str, code: int = 302, path: str = "/redirect") -> str:
    """Make `server` answer `path` with a `code` redirect to `to`; the URL of `path`."""
    server.statuses[path] = [Reply(code, body=b"", headers={"Location": to})]
    return server.url(path)


# --- the request and its answer -----------------------------------------------------------------


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_posts_json_with_headers(server: WebhookServer) -> None:
    ctx = make_ctx("webhook")
    payload = {
        "url": server.url("/hook?x=1"),
        "body": {"event": "job.done", "n": 1, "tags": ["a", "b"]},
        "headers": {"X-Signature": "abc123", "Authorization": "Bearer t0ken"},
    }
    result = await run_async("webhook", payload, ctx)

    assert result["statusCode"] == 200
    assert isinstance(result["durationMs"], int) and 0 <= result["durationMs"] < 10_000
    assert len(server.calls()) == 1 and server.connections == 1
    request = server.calls()[0]
    assert (request.method, request.path) == ("POST", "/hook?x=1")
    assert json.loads(request.body) == {"event": "job.done", "n": 1, "tags": ["a", "b"]}
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "jobqueue-webhook/1"
    assert request.headers["x-job-id"] == ctx.job_id
    assert request.headers["x-signature"] == "abc123"
    assert request.headers["authorization"] == "Bearer t0ken"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"


@pytest.mark.usefixtures("allow_127_0_0_1")
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_webhook_other_methods_carry_the_body(server: WebhookServer, method: str) -> None:
    result = await run_async("webhook", {"url": server.url(), "method": method, "body": [1, 2]})
    assert result["statusCode"] == 200
    (request,) = server.calls()
    assert request.method == method and request.body == b"[1,2]"


@pytest.mark.usefixtures("allow_127_0_0_1")
@pytest.mark.parametrize("method", ["GET", "HEAD", "get"])
async def test_webhook_get_and_head_send_no_body(server: WebhookServer, method: str) -> None:
    result = await run_async("webhook", {"url": server.url(), "method": method})
    assert result["statusCode"] == 200
    (request,) = server.calls()
    assert request.method == method.upper()
    assert request.body == b"" and "content-type" not in request.headers


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_caller_may_set_content_type_and_user_agent(server: WebhookServer) -> None:
    headers = {"content-type": "application/vnd.test+json", "user-agent": "custom/2"}
    await run_async("webhook", {"url": server.url(), "body": "text", "headers": headers})
    (request,) = server.calls()
    assert request.headers["content-type"] == "application/vnd.test+json"
    assert request.headers["user-agent"] == "custom/2"
    assert request.body == b'"text"'


@pytest.mark.usefixtures("allow_127_0_0_1")
@pytest.mark.parametrize(
    ("status", "permanent"),
    [(500, False), (503, False), (429, False), (408, False), (404, True), (400, True), (410, True)],
)
async def test_webhook_non_2xx_fails_once_with_the_status(
    server: WebhookServer, status: int, permanent: bool
) -> None:
    path = f"/status/{status}"
    server.statuses[path] = [Reply(status, body=f"status {status} from test".encode())]
    with pytest.raises(Exception) as info:
        await run_async("webhook", {"url": server.url(path)})
    assert str(info.value) == f"webhook returned HTTP {status}: status {status} from test"
    assert isinstance(info.value, PermanentError) is permanent
    if not permanent:
        assert isinstance(info.value, WebhookError)
    assert len(server.calls()) == 1  # retries are the worker's business, not the handler's


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_error_keeps_only_a_short_snippet_of_the_body(server: WebhookServer) -> None:
    server.statuses["/big"] = [Reply(502, body=b"x" * 100_000)]
    with pytest.raises(WebhookError) as info:
        await run_async("webhook", {"url": server.url("/big")})
    assert str(info.value).startswith("webhook returned HTTP 502: xxxx")
    assert len(str(info.value)) < 250


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_timeout_is_retryable(server: WebhookServer) -> None:
    server.statuses["/slow"] = [Reply(body=b"late", delay_s=10)]
    started = time.monotonic()
    with pytest.raises(WebhookError, match="webhook timed out after 300 ms"):
        await run_async("webhook", {"url": server.url("/slow"), "timeoutMs": 300})
    assert time.monotonic() - started < 3
    assert len(server.calls()) == 1


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_reads_at_most_the_cap_of_an_endless_response(server: WebhookServer) -> None:
    server.statuses["/stream"] = [Reply(endless=True)]
    result = await run_async("webhook", {"url": server.url("/stream"), "timeoutMs": 10_000})
    assert result["statusCode"] == 200
    assert result["durationMs"] < 5_000
    # The handler hung up instead of reading on: the server's writes start failing.
    assert server.client_hung_up.wait(timeout=10)
    assert MAX_RESPONSE_BYTES == 64 * 1024


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_connection_refused_is_retryable() -> None:
    with pytest.raises(WebhookError, match="webhook request failed") as info:
        await run_async("webhook", {"url": f"http://127.0.0.1:{free_port()}/"})
    assert not isinstance(info.value, PermanentError)


# --- the SSRF guard -------------------------------------------------------------------------------


@pytest.mark.usefixtures("allow_nothing")
async def test_webhook_to_loopback_is_blocked_before_connecting(server: WebhookServer) -> None:
    with pytest.raises(
        PermanentError, match=r"^webhook blocked: 127\.0\.0\.1 is a loopback address$"
    ):
        await run_async("webhook", {"url": server.url()})
    assert server.connections == 0 and server.calls() == []


@pytest.mark.usefixtures("allow_nothing")
async def test_webhook_to_another_loopback_address_is_blocked(server_2: WebhookServer) -> None:
    with pytest.raises(PermanentError, match=r"webhook blocked: 127\.0\.0\.2 is a loopback"):
        await run_async("webhook", {"url": server_2.url()})
    assert server_2.connections == 0


@pytest.mark.usefixtures("allow_nothing")
async def test_webhook_to_ipv6_loopback_is_blocked(server_v6: WebhookServer) -> None:
    with pytest.raises(PermanentError, match=r"webhook blocked: ::1 is a loopback address"):
        await run_async("webhook", {"url": server_v6.url()})
    assert server_v6.connections == 0


async def test_allow_list_entries_are_exact(server: WebhookServer, settings: Any) -> None:
    allow_webhook_hosts(settings, "127.0.0.2", "10.0.0.0/8", "example.com")
    with pytest.raises(PermanentError, match="webhook blocked"):
        await run_async("webhook", {"url": server.url()})
    assert server.connections == 0


ODD_SPELLINGS = [
    ("2130706433", r"127\.0\.0\.1 \(2130706433\) is a loopback address"),
    ("0x7f.1", r"127\.0\.0\.1 \(0x7f\.1\) is a loopback address"),
    ("127.1", r"127\.0\.0\.1 \(127\.1\) is a loopback address"),
    (
        "[::ffff:127.0.0.1]",
        r"::ffff:127\.0\.0\.1 is a loopback address \(IPv4-mapped 127\.0\.0\.1\)",
    ),
    ("localhost", r"(127\.0\.0\.1|::1) \(localhost\) is a loopback address"),
    ("LocalHost", r"(127\.0\.0\.1|::1) \(localhost\) is a loopback address"),
]


@pytest.mark.usefixtures("allow_nothing")
@pytest.mark.parametrize(("host", "message"), ODD_SPELLINGS)
async def test_webhook_odd_spellings_of_loopback_are_blocked(
    server: WebhookServer, host: str, message: str
) -> None:
    with pytest.raises(PermanentError, match=f"^webhook blocked: {message}$"):
        await run_async("webhook", {"url": server.url(host=host)})
    assert server.connections == 0 and server.calls() == []


@pytest.mark.parametrize(("host", "message"), ODD_SPELLINGS)
async def test_webhook_odd_spellings_do_reach_the_server_when_allowed(
    server: WebhookServer, settings: Any, host: str, message: str
) -> None:
    """The control for the test above: these URLs really lead to the server."""
    allow_webhook_hosts(settings, "127.0.0.0/8", "::1")
    result = await run_async("webhook", {"url": server.url(host=host)})
    assert result["statusCode"] == 200
    assert len(server.calls()) == 1


async def test_webhook_allow_listed_host_name(server: WebhookServer, settings: Any) -> None:
    allow_webhook_hosts(settings, "LOCALHOST")
    result = await run_async("webhook", {"url": server.url(host="localhost")})
    assert result["statusCode"] == 200
    assert server.calls()[0].headers["host"] == f"localhost:{server.port}"


@pytest.mark.usefixtures("allow_nothing")
async def test_webhook_checks_the_resolved_address_not_the_name(
    server: WebhookServer, fake_dns: dict[str, list[str]]
) -> None:
    fake_dns["hooks.example.test"] = ["127.0.0.1"]
    with pytest.raises(
        PermanentError,
        match=r"^webhook blocked: 127\.0\.0\.1 \(hooks\.example\.test\) is a loopback address$",
    ):
        await run_async("webhook", {"url": server.url(host="hooks.example.test")})
    assert server.connections == 0


@pytest.mark.usefixtures("allow_nothing")
async def test_webhook_name_with_any_private_address_is_blocked_entirely(
    server: WebhookServer, fake_dns: dict[str, list[str]]
) -> None:
    fake_dns["mixed.example.test"] = ["93.184.215.14", "169.254.169.254", "127.0.0.1"]
    with pytest.raises(PermanentError, match=r"169\.254\.169\.254 .* is a cloud metadata address"):
        await run_async("webhook", {"url": server.url(host="mixed.example.test")})
    assert server.connections == 0


async def test_webhook_allow_listed_name_connects_to_its_address_keeping_the_name(
    server: WebhookServer, fake_dns: dict[str, list[str]], settings: Any
) -> None:
    allow_webhook_hosts(settings, "hooks.internal.test")
    fake_dns["hooks.internal.test"] = ["127.0.0.1"]
    result = await run_async("webhook", {"url": server.url(host="hooks.internal.test")})
    assert result["statusCode"] == 200
    assert server.calls()[0].headers["host"] == f"hooks.internal.test:{server.port}"


@pytest.mark.usefixtures("allow_nothing")
async def test_webhook_dns_failure_is_retryable(
    fake_dns: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_resolve(host: str, port: int) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(webhook_module, "resolve", failing_resolve)
    with pytest.raises(WebhookError, match=r"DNS lookup of nowhere\.example\.test failed") as info:
        await run_async("webhook", {"url": "http://nowhere.example.test/"})
    assert not isinstance(info.value, PermanentError)


# --- redirects ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_redirect_to_a_blocked_address_fails(
    server: WebhookServer, server_2: WebhookServer
) -> None:
    url = redirect(server, to=server_2.url("/internal"))
    with pytest.raises(PermanentError, match=r"webhook blocked: 127\.0\.0\.2 is a loopback"):
        await run_async("webhook", {"url": url})
    assert len(server.calls()) == 1
    assert server_2.connections == 0 and server_2.calls() == []


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_redirect_to_a_metadata_address_fails(
    server: WebhookServer, fake_dns: dict[str, list[str]]
) -> None:
    fake_dns["metadata.example.test"] = ["169.254.169.254"]
    url = redirect(server, to="http://metadata.example.test/latest/meta-data/")
    with pytest.raises(PermanentError, match="is a cloud metadata address"):
        await run_async("webhook", {"url": url})
    assert len(server.calls()) == 1


@pytest.mark.usefixtures("allow_127_0_0_1")
@pytest.mark.parametrize(
    ("code", "method", "body"), [(302, "GET", b""), (303, "GET", b""), (307, "POST", b'{"a":1}')]
)
async def test_webhook_follows_allowed_redirects(
    server: WebhookServer, code: int, method: str, body: bytes
) -> None:
    url = redirect(server, to="/final", code=code)
    result = await run_async("webhook", {"url": url, "body": {"a": 1}})
    assert result["statusCode"] == 200
    assert [(r.method, r.path) for r in server.calls()] == [
        ("POST", "/redirect"),
        (method, "/final"),
    ]
    assert server.calls()[1].body == body


async def test_webhook_redirect_to_another_origin_drops_credentials(
    server: WebhookServer, server_2: WebhookServer, settings: Any
) -> None:
    allow_webhook_hosts(settings, "127.0.0.0/8")
    url = redirect(server, to=server_2.url("/next"), code=307)
    headers = {"Authorization": "Bearer secret", "X-Api-Key": "also-secret", "X-Custom": "x"}
    result = await run_async("webhook", {"url": url, "headers": headers})
    assert result["statusCode"] == 200
    assert server.calls()[0].headers["authorization"] == "Bearer secret"
    assert server.calls()[0].headers["x-api-key"] == "also-secret"
    (forwarded,) = server_2.calls()
    # None of the tenant's headers reach another origin (X-Api-Key used to).
    assert not {"authorization", "x-api-key", "x-custom"} & set(forwarded.headers)
    assert forwarded.headers["x-job-id"]


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_redirect_within_the_origin_keeps_the_tenants_headers(
    server: WebhookServer,
) -> None:
    url = redirect(server, to="/next", code=307)
    headers = {"X-Api-Key": "secret", "X-Custom": "x"}
    result = await run_async("webhook", {"url": url, "headers": headers})
    assert result["statusCode"] == 200
    assert server.calls()[1].headers["x-api-key"] == "secret"
    assert server.calls()[1].headers["x-custom"] == "x"


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_stops_after_five_redirects(server: WebhookServer) -> None:
    url = redirect(server, to="/loop", path="/loop")
    with pytest.raises(PermanentError, match="webhook exceeded 5 redirects"):
        await run_async("webhook", {"url": url})
    assert len(server.calls()) == 6


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_redirect_to_a_non_http_scheme_fails(server: WebhookServer) -> None:
    with pytest.raises(PermanentError, match="redirect to a non-http url: file:///etc/passwd"):
        await run_async("webhook", {"url": redirect(server, to="file:///etc/passwd")})


# --- schema ---------------------------------------------------------------------------------------


def test_webhook_schema_defaults_and_aliases() -> None:
    payload = validate("webhook", {"url": "https://example.com/hook"})
    assert (payload.method, payload.timeout_ms, payload.headers, payload.body) == (
        "POST",
        10_000,
        {},
        None,
    )
    assert validate("webhook", {"url": "http://x.io", "timeoutMs": 1}).timeout_ms == 1
    assert validate("webhook", {"url": "http://x.io", "timeout_ms": 30_000}).timeout_ms == 30_000


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"url": "ftp://example.com/"}, "url must be http or https"),
        ({"url": "file:///etc/passwd"}, "url must be http or https"),
        ({"url": "javascript:alert(1)"}, "url must be http or https"),
        ({"url": "example.com/hook"}, "url must be http or https"),
        ({"url": "http:///nohost"}, "url must have a host"),
        ({"url": "http://exa mple.com/"}, "whitespace or control"),
        ({"url": "http://example.com/\r\nX: y"}, "whitespace or control"),
        ({"url": "http://example.com:99999/"}, "port must be from 1 to 65535"),
        ({"url": "http://example.com:0/"}, "port must be from 1 to 65535"),
        ({"url": "http://[::1/"}, "invalid url"),
        ({"url": "http://example.com/" + "a" * 2048}, "at most 2048 characters"),
        ({"url": ""}, "at least 1 character"),
        ({"url": 5}, "valid string"),
        ({"method": "TRACE"}, "'GET', 'POST'"),
        ({"method": "CONNECT"}, "'GET', 'POST'"),
        ({"method": 1}, "'GET', 'POST'"),
        ({"headers": {"Host": "evil"}}, "header 'Host' may not be set"),
        ({"headers": {"content-length": "1"}}, "may not be set"),
        ({"headers": {"Transfer-Encoding": "chunked"}}, "may not be set"),
        ({"headers": {"Connection": "close"}}, "may not be set"),
        ({"headers": {"X-Job-Id": "forged"}}, "may not be set"),
        ({"headers": {"X-A": "1", "x-a": "2"}}, "is given twice"),
        ({"headers": {"X-A": "v\r\nInjected: 1"}}, "should match pattern"),
        ({"headers": {"Bad Name": "v"}}, "should match pattern"),
        ({"headers": {"X-A": "é"}}, "should match pattern"),
        ({"headers": {"X-A": 1}}, "valid string"),
        ({"headers": {f"X-{i}": "v" for i in range(51)}}, "at most 50 items"),
        ({"headers": {f"X-{i}": "v" * 8000 for i in range(3)}}, "headers exceed 16384 bytes"),
        ({"headers": ["X-A: 1"]}, "valid dictionary"),
        ({"timeoutMs": 0}, "greater than or equal to 1"),
        ({"timeoutMs": 30_001}, "less than or equal to 30000"),
        ({"timeoutMs": True}, "valid integer"),
        ({"timeoutMs": 100.0}, "valid integer"),
        ({"timeoutMs": "100"}, "valid integer"),
        ({"method": "GET", "body": {"a": 1}}, "body is not allowed with GET"),
        ({"method": "HEAD", "body": "x"}, "body is not allowed with HEAD"),
        ({"body": {"a": float("nan")}}, "without NaN or Infinity"),
        ({"extra": 1}, "Extra inputs"),
    ],
)
def test_webhook_rejects_bad_payloads(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate("webhook", {"url": "https://example.com/hook", **changes})
    assert message in error_messages(info.value)


def test_webhook_body_may_be_any_json() -> None:
    for body in ({"a": [1, 2.5, None, True, "s"]}, [1, 2], "text", 42, 1.5, False):
        assert validate("webhook", {"url": "http://x.io", "body": body}).body == body
