"""The four job handlers: payload schemas, results and failures, against real local servers
(an HTTP server for webhooks, an SMTP server for email) where the handler talks to the network."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from jobs.handlers import JobContext, PermanentError, get_handler, registered_types
from jobs.handlers import webhook as webhook_module
from jobs.handlers.email import EmailSendError
from jobs.handlers.webhook import MAX_RESPONSE_BYTES, WebhookError
from tests.support.smtp_server import SMTPServer, smtp_server_for

# --- helpers ------------------------------------------------------------------------------------


def make_ctx(job_type: str) -> JobContext:
    return JobContext(
        job_id=str(uuid.uuid4()), tenant="tenant-1", type=job_type, attempt=1, max_attempts=3
    )


def validate(job_type: str, payload: Any) -> Any:
    spec = get_handler(job_type)
    assert spec is not None
    return spec.schema.model_validate(payload)


def run_sync(job_type: str, payload: dict[str, Any], ctx: JobContext | None = None) -> Any:
    spec = get_handler(job_type)
    assert spec is not None and not spec.is_async
    return spec.func(spec.schema.model_validate(payload), ctx or make_ctx(job_type))


async def run_async(job_type: str, payload: dict[str, Any], ctx: JobContext | None = None) -> Any:
    spec = get_handler(job_type)
    assert spec is not None and spec.is_async
    return await spec.func(spec.schema.model_validate(payload), ctx or make_ctx(job_type))


def error_messages(exc: ValidationError) -> str:
    return " | ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_allowed_hosts(settings: Any, hosts: list[str]) -> None:
    settings.JOBS = {**settings.JOBS, "WEBHOOK_ALLOWED_HOSTS": hosts}


# --- registry -----------------------------------------------------------------------------------


def test_all_four_types_are_registered_with_their_kind_and_timeout() -> None:
    assert registered_types() == ["data_processing", "email", "sleep", "webhook"]
    kinds = {name: get_handler(name).is_async for name in registered_types()}  # type: ignore[union-attr]
    assert kinds == {"data_processing": False, "email": False, "sleep": True, "webhook": True}
    assert get_handler("sleep").timeout_s >= 600 + 30  # type: ignore[union-attr]
    assert get_handler("webhook").timeout_s >= 30  # type: ignore[union-attr]


# --- sleep --------------------------------------------------------------------------------------


async def test_sleep_waits_and_reports() -> None:
    started = time.monotonic()
    assert await run_async("sleep", {"delayMs": 50}) == {"sleptMs": 50}
    assert time.monotonic() - started >= 0.05
    assert await run_async("sleep", {"delayMs": 0}) == {"sleptMs": 0}


async def test_sleep_is_cancellable() -> None:
    task = asyncio.create_task(run_async("sleep", {"delayMs": 60_000}))
    await asyncio.sleep(0)  # let it start waiting
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=2)
    assert time.monotonic() - started < 1


def test_sleep_maximum_comes_from_settings_at_validation_time(settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "SLEEP_MAX_MS": 1000}
    assert validate("sleep", {"delayMs": 1000}).delay_ms == 1000
    with pytest.raises(ValidationError, match="delayMs must be at most 1000"):
        validate("sleep", {"delayMs": 1001})
    settings.JOBS = {**settings.JOBS, "SLEEP_MAX_MS": 5000}
    assert validate("sleep", {"delayMs": 1001}).delay_ms == 1001


def test_sleep_accepts_python_field_name() -> None:
    assert validate("sleep", {"delay_ms": 5}).delay_ms == 5


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"delayMs": -1},
        {"delayMs": True},
        {"delayMs": 1.5},
        {"delayMs": 10.0},
        {"delayMs": "10"},
        {"delayMs": None},
        {"delayMs": 10, "extra": 1},
        {"delayMs": 10**30},
    ],
)
def test_sleep_rejects_bad_payloads(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        validate("sleep", payload)


# --- data_processing ----------------------------------------------------------------------------

ALL_OPERATIONS = ["count", "sum", "mean", "min", "max", "median", "stddev"]


def test_data_processing_computes_every_operation() -> None:
    result = run_sync("data_processing", {"values": [4, 1, 3, 2], "operations": ALL_OPERATIONS})
    assert result == {
        "count": 4,
        "sum": 10.0,
        "mean": 2.5,
        "min": 1.0,
        "max": 4.0,
        "median": 2.5,
        "stddev": pytest.approx(math.sqrt(1.25)),
    }
    assert list(result) == ALL_OPERATIONS
    json.dumps(result)


def test_data_processing_returns_only_requested_operations_in_order() -> None:
    result = run_sync("data_processing", {"values": [1.5, -2, 7], "operations": ["max", "count"]})
    assert list(result.items()) == [("max", 7.0), ("count", 3)]


def test_data_processing_stddev_is_the_population_one() -> None:
    values = [2, 4, 4, 4, 5, 5, 7, 9]
    result = run_sync("data_processing", {"values": values, "operations": ["stddev"]})
    assert result["stddev"] == 2.0  # the sample stddev would be about 2.138
    assert statistics.stdev(values) != 2.0


def test_data_processing_single_value() -> None:
    result = run_sync("data_processing", {"values": [3], "operations": ALL_OPERATIONS})
    assert result == {
        "count": 1,
        "sum": 3.0,
        "mean": 3.0,
        "min": 3.0,
        "max": 3.0,
        "median": 3.0,
        "stddev": 0.0,
    }


def test_data_processing_sum_and_mean_are_exactly_rounded() -> None:
    result = run_sync("data_processing", {"values": [0.1] * 10, "operations": ["sum", "mean"]})
    assert result == {"sum": 1.0, "mean": 0.1}  # the naive sum gives 0.9999999999999999
    result = run_sync("data_processing", {"values": [1e100, 1.0, -1e100], "operations": ["sum"]})
    assert result == {"sum": 1.0}


def test_data_processing_mean_and_median_of_huge_values_stay_finite() -> None:
    payload = {"values": [1e308, 1e308], "operations": ["mean", "median", "max"]}
    assert run_sync("data_processing", payload) == {"mean": 1e308, "median": 1e308, "max": 1e308}


def test_data_processing_overflowing_sum_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError, match="sum is too large"):
        run_sync("data_processing", {"values": [1e308, 1e308], "operations": ["sum"]})


def test_data_processing_handles_a_million_values() -> None:
    values = [float(i % 1000) for i in range(1_000_000)]
    started = time.monotonic()
    result = run_sync("data_processing", {"values": values, "operations": ALL_OPERATIONS})
    assert result["count"] == 1_000_000
    assert result["sum"] == 499_500_000.0
    assert result["median"] == 499.5
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"values": [], "operations": ["sum"]}, "at least 1 item"),
        ({"values": [1], "operations": []}, "at least 1 item"),
        ({"values": [1, True], "operations": ["sum"]}, "valid number"),
        ({"values": [1, "2"], "operations": ["sum"]}, "valid number"),
        ({"values": [1, None], "operations": ["sum"]}, "valid number"),
        ({"values": [float("nan")], "operations": ["sum"]}, "finite number"),
        ({"values": [float("inf")], "operations": ["sum"]}, "finite number"),
        ({"values": [10**400], "operations": ["sum"]}, "valid number"),
        ({"values": 5, "operations": ["sum"]}, "valid list"),
        ({"values": [1], "operations": ["sum", "sum"]}, "must not repeat"),
        ({"values": [1], "operations": ["mode"]}, "'count', 'sum'"),
        ({"values": [1], "operations": "sum"}, "valid list"),
        ({"values": [1], "operations": ["sum"], "extra": True}, "Extra inputs"),
        ({"operations": ["sum"]}, "Field required"),
    ],
)
def test_data_processing_rejects_bad_payloads(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate("data_processing", payload)
    assert message in error_messages(info.value)


def test_data_processing_rejects_more_than_a_million_values() -> None:
    with pytest.raises(ValidationError, match="at most 1000000 items"):
        validate("data_processing", {"values": [0] * 1_000_001, "operations": ["count"]})


# --- email --------------------------------------------------------------------------------------


def test_email_sends_one_message_with_html_alternative(
    mailoutbox: list[Any], settings: Any
) -> None:
    settings.DEFAULT_FROM_EMAIL = "jobs@example.com"
    payload = {
        "to": "alice@example.com",
        "subject": "Your report",
        "body": "Plain text body",
        "html": "<p>HTML body</p>",
    }
    assert run_sync("email", payload) == {"sent": 1}
    assert len(mailoutbox) == 1
    message = mailoutbox[0]
    assert message.to == ["alice@example.com"]
    assert message.subject == "Your report"
    assert message.body == "Plain text body"
    assert message.from_email == "jobs@example.com"
    assert message.alternatives == [("<p>HTML body</p>", "text/html")]


def test_email_to_a_list_with_from(mailoutbox: list[Any], settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "EMAIL_ALLOWED_SENDERS": ["example.com"]}
    payload = {
        "to": ["a@example.com", "Bob Builder <bob@example.org>"],
        "subject": "",
        "body": "hi",
        "from": "Reports <reports@example.com>",
    }
    assert run_sync("email", payload) == {"sent": 1}
    (message,) = mailoutbox
    assert message.to == ["a@example.com", "Bob Builder <bob@example.org>"]
    assert message.from_email == "Reports <reports@example.com>"
    assert message.alternatives == []
    assert "Bob Builder <bob@example.org>" in message.message()["To"]


def test_email_schema_accepts_python_field_name_for_from() -> None:
    payload = validate("email", {"to": "a@example.com", "subject": "s", "body": "b"})
    assert payload.to == ["a@example.com"] and payload.from_address is None
    payload = validate(
        "email", {"to": "a@example.com", "subject": "s", "body": "b", "from_address": "x@y.io"}
    )
    assert payload.from_address == "x@y.io"


GOOD_EMAIL = {"to": "a@example.com", "subject": "s", "body": "b"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"to": "not-an-address"}, "not a valid email address"),
        ({"to": ["a@example.com", "nope@"]}, "not a valid email address"),
        ({"to": []}, "at least 1 item"),
        ({"to": [f"u{i}@example.com" for i in range(51)]}, "at most 50 items"),
        ({"to": 5}, "valid list"),
        ({"to": "a@example.com\r\nBcc: victim@example.com"}, "line breaks"),
        ({"to": '"Evil, Inc" <a@example.com>'}, "not a valid email address"),
        ({"to": "x" * 321 + "@example.com"}, "at most 320 characters"),
        ({"subject": "hello\nBcc: victim@example.com"}, "line breaks"),
        ({"subject": "s" * 999}, "at most 998 characters"),
        ({"subject": None}, "valid string"),
        ({"body": "é" * 600_000}, "at most 1048576 bytes"),
        ({"body": "b" * (1024 * 1024 + 1)}, "at most 1048576 characters"),
        ({"html": "é" * 600_000}, "at most 1048576 bytes"),
        ({"from": "bad address"}, "not a valid email address"),
        ({"cc": "a@example.com"}, "Extra inputs"),
    ],
)
def test_email_rejects_bad_payloads(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate("email", {**GOOD_EMAIL, **changes})
    assert message in error_messages(info.value)


def test_email_requires_to_subject_and_body() -> None:
    with pytest.raises(ValidationError) as info:
        validate("email", {})
    assert {e["loc"][0] for e in info.value.errors()} == {"to", "subject", "body"}


@pytest.fixture
def smtp_server(settings: Any) -> Iterator[SMTPServer]:
    with smtp_server_for(settings) as server:
        yield server


def test_email_over_smtp_reaches_the_server(smtp_server: SMTPServer) -> None:
    payload = {**GOOD_EMAIL, "to": ["a@example.com", "b@example.com"], "subject": "Hello SMTP"}
    assert run_sync("email", payload) == {"sent": 1}
    assert len(smtp_server.messages) == 1
    assert "Subject: Hello SMTP" in smtp_server.messages[0]
    assert [r.split(":", 1)[1].strip() for r in smtp_server.recipients] == [
        "<a@example.com>",
        "<b@example.com>",
    ]


def test_email_refused_recipient_is_permanent(smtp_server: SMTPServer) -> None:
    smtp_server.rcpt_reply = "550 5.1.1 no such user"
    with pytest.raises(PermanentError, match=r"email recipients refused: a@example\.com"):
        run_sync("email", GOOD_EMAIL)
    assert smtp_server.messages == []


def test_email_temporarily_refused_recipient_is_retryable(smtp_server: SMTPServer) -> None:
    smtp_server.rcpt_reply = "450 4.2.1 mailbox busy"
    with pytest.raises(EmailSendError, match="email recipients refused") as info:
        run_sync("email", GOOD_EMAIL)
    assert not isinstance(info.value, PermanentError)


def test_email_connection_refused_is_retryable(smtp_server: SMTPServer, settings: Any) -> None:
    settings.EMAIL_PORT = closed_port()
    with pytest.raises(EmailSendError, match=r"email send failed: .*refused") as info:
        run_sync("email", GOOD_EMAIL)
    assert not isinstance(info.value, PermanentError)


# --- webhook: a real local HTTP server ----------------------------------------------------------


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _HTTPHandler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        owner.received.append(Received(self.command, self.path, headers, body))
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        if url.path.startswith("/status/"):
            status = int(url.path.rsplit("/", 1)[1])
            text = b"x" * 100_000 if "big" in query else f"status {status} from test".encode()
            self._reply(status, text)
        elif url.path == "/redirect":
            self._reply(int(query.get("code", "302")), b"", {"Location": query["to"]})
        elif url.path == "/loop":
            self._reply(302, b"", {"Location": "/loop"})
        elif url.path == "/slow":
            owner.release.wait(10)
            self._reply(200, b"late")
        elif url.path == "/stream":
            self._stream_forever()
        else:
            self._reply(200, b'{"ok": true}', {"Content-Type": "application/json"})

    def _stream_forever(self) -> None:
        """An endless body; records when the client hangs up."""
        owner = self.server.owner
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(4096):  # 256 MiB: far past the cap, bounded for safety
                if owner.release.is_set():
                    return
                self.wfile.write(chunk)
        except OSError:
            owner.client_hung_up.set()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: WebhookServer

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Called for every accepted TCP connection, before any byte is read.
        self.owner.connections += 1
        return True


class WebhookServer:
    """A real HTTP server on a loopback address that records every request it gets."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.received: list[Received] = []
        self.connections = 0
        self.release = threading.Event()
        self.client_hung_up = threading.Event()
        server_class = type(
            "_Server",
            (_HTTPServer,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        self._server = server_class((host, 0), _HTTPHandler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/hook", host: str | None = None) -> str:
        if host is None:
            host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[WebhookServer]:
    srv = WebhookServer("127.0.0.1")
    yield srv
    srv.close()


@pytest.fixture
def server_2() -> Iterator[WebhookServer]:
    """A second server, on 127.0.0.2 (also loopback, but not allow-listed by "127.0.0.1")."""
    try:
        srv = WebhookServer("127.0.0.2")
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.0.2: {exc}")
    yield srv
    srv.close()


@pytest.fixture
def server_v6() -> Iterator[WebhookServer]:
    try:
        srv = WebhookServer("::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    yield srv
    srv.close()


@pytest.fixture
def allow_127_0_0_1(settings: Any) -> None:
    set_allowed_hosts(settings, ["127.0.0.1"])


@pytest.fixture
def allow_nothing(settings: Any) -> None:
    set_allowed_hosts(settings, [])


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
    assert len(server.received) == 1 and server.connections == 1
    request = server.received[0]
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
    (request,) = server.received
    assert request.method == method and request.body == b"[1,2]"


@pytest.mark.usefixtures("allow_127_0_0_1")
@pytest.mark.parametrize("method", ["GET", "HEAD", "get"])
async def test_webhook_get_and_head_send_no_body(server: WebhookServer, method: str) -> None:
    result = await run_async("webhook", {"url": server.url(), "method": method})
    assert result["statusCode"] == 200
    (request,) = server.received
    assert request.method == method.upper()
    assert request.body == b"" and "content-type" not in request.headers


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_caller_may_set_content_type_and_user_agent(server: WebhookServer) -> None:
    headers = {"content-type": "application/vnd.test+json", "user-agent": "custom/2"}
    await run_async("webhook", {"url": server.url(), "body": "text", "headers": headers})
    (request,) = server.received
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
    with pytest.raises(Exception) as info:
        await run_async("webhook", {"url": server.url(f"/status/{status}")})
    assert str(info.value) == f"webhook returned HTTP {status}: status {status} from test"
    assert isinstance(info.value, PermanentError) is permanent
    if not permanent:
        assert isinstance(info.value, WebhookError)
    assert len(server.received) == 1  # retries are the worker's business, not the handler's


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_error_keeps_only_a_short_snippet_of_the_body(server: WebhookServer) -> None:
    with pytest.raises(WebhookError) as info:
        await run_async("webhook", {"url": server.url("/status/502?big=1")})
    assert str(info.value).startswith("webhook returned HTTP 502: xxxx")
    assert len(str(info.value)) < 250


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_timeout_is_retryable(server: WebhookServer) -> None:
    started = time.monotonic()
    with pytest.raises(WebhookError, match="webhook timed out after 300 ms"):
        await run_async("webhook", {"url": server.url("/slow"), "timeoutMs": 300})
    assert time.monotonic() - started < 3
    assert len(server.received) == 1


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_reads_at_most_the_cap_of_an_endless_response(server: WebhookServer) -> None:
    result = await run_async("webhook", {"url": server.url("/stream"), "timeoutMs": 10_000})
    assert result["statusCode"] == 200
    assert result["durationMs"] < 5_000
    # The handler hung up instead of reading on: the server's writes start failing.
    assert server.client_hung_up.wait(timeout=10)
    assert MAX_RESPONSE_BYTES == 64 * 1024


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_connection_refused_is_retryable() -> None:
    with pytest.raises(WebhookError, match="webhook request failed") as info:
        await run_async("webhook", {"url": f"http://127.0.0.1:{closed_port()}/"})
    assert not isinstance(info.value, PermanentError)


# --- webhook: the SSRF guard --------------------------------------------------------------------


@pytest.mark.usefixtures("allow_nothing")
async def test_webhook_to_loopback_is_blocked_before_connecting(server: WebhookServer) -> None:
    with pytest.raises(
        PermanentError, match=r"^webhook blocked: 127\.0\.0\.1 is a loopback address$"
    ):
        await run_async("webhook", {"url": server.url()})
    assert server.connections == 0 and server.received == []


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
    set_allowed_hosts(settings, ["127.0.0.2", "10.0.0.0/8", "example.com"])
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
    assert server.connections == 0 and server.received == []


@pytest.mark.parametrize(("host", "message"), ODD_SPELLINGS)
async def test_webhook_odd_spellings_do_reach_the_server_when_allowed(
    server: WebhookServer, settings: Any, host: str, message: str
) -> None:
    """The control for the test above: these URLs really lead to the server."""
    set_allowed_hosts(settings, ["127.0.0.0/8", "::1"])
    result = await run_async("webhook", {"url": server.url(host=host)})
    assert result["statusCode"] == 200
    assert len(server.received) == 1


async def test_webhook_allow_listed_host_name(server: WebhookServer, settings: Any) -> None:
    set_allowed_hosts(settings, ["LOCALHOST"])
    result = await run_async("webhook", {"url": server.url(host="localhost")})
    assert result["statusCode"] == 200
    assert server.received[0].headers["host"] == f"localhost:{server.port}"


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
    set_allowed_hosts(settings, ["hooks.internal.test"])
    fake_dns["hooks.internal.test"] = ["127.0.0.1"]
    result = await run_async("webhook", {"url": server.url(host="hooks.internal.test")})
    assert result["statusCode"] == 200
    assert server.received[0].headers["host"] == f"hooks.internal.test:{server.port}"


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


# --- webhook: redirects -------------------------------------------------------------------------


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_redirect_to_a_blocked_address_fails(
    server: WebhookServer, server_2: WebhookServer
) -> None:
    target = server_2.url("/internal")
    with pytest.raises(PermanentError, match=r"webhook blocked: 127\.0\.0\.2 is a loopback"):
        await run_async("webhook", {"url": server.url(f"/redirect?to={target}")})
    assert len(server.received) == 1
    assert server_2.connections == 0 and server_2.received == []


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_redirect_to_a_metadata_address_fails(
    server: WebhookServer, fake_dns: dict[str, list[str]]
) -> None:
    fake_dns["metadata.example.test"] = ["169.254.169.254"]
    target = "http://metadata.example.test/latest/meta-data/"
    with pytest.raises(PermanentError, match="is a cloud metadata address"):
        await run_async("webhook", {"url": server.url(f"/redirect?to={target}")})
    assert len(server.received) == 1


@pytest.mark.usefixtures("allow_127_0_0_1")
@pytest.mark.parametrize(
    ("code", "method", "body"), [(302, "GET", b""), (303, "GET", b""), (307, "POST", b'{"a":1}')]
)
async def test_webhook_follows_allowed_redirects(
    server: WebhookServer, code: int, method: str, body: bytes
) -> None:
    url = server.url(f"/redirect?code={code}&to=/final")
    result = await run_async("webhook", {"url": url, "body": {"a": 1}})
    assert result["statusCode"] == 200
    assert [(r.method, r.path) for r in server.received] == [
        ("POST", f"/redirect?code={code}&to=/final"),
        (method, "/final"),
    ]
    assert server.received[1].body == body


async def test_webhook_redirect_to_another_origin_drops_credentials(
    server: WebhookServer, server_2: WebhookServer, settings: Any
) -> None:
    set_allowed_hosts(settings, ["127.0.0.0/8"])
    url = server.url(f"/redirect?code=307&to={server_2.url('/next')}")
    headers = {"Authorization": "Bearer secret", "X-Api-Key": "also-secret", "X-Custom": "x"}
    result = await run_async("webhook", {"url": url, "headers": headers})
    assert result["statusCode"] == 200
    assert server.received[0].headers["authorization"] == "Bearer secret"
    assert server.received[0].headers["x-api-key"] == "also-secret"
    (forwarded,) = server_2.received
    # None of the tenant's headers reach another origin (X-Api-Key used to).
    assert not {"authorization", "x-api-key", "x-custom"} & set(forwarded.headers)
    assert forwarded.headers["x-job-id"]


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_redirect_within_the_origin_keeps_the_tenants_headers(
    server: WebhookServer,
) -> None:
    url = server.url("/redirect?code=307&to=/next")
    headers = {"X-Api-Key": "secret", "X-Custom": "x"}
    result = await run_async("webhook", {"url": url, "headers": headers})
    assert result["statusCode"] == 200
    assert server.received[1].headers["x-api-key"] == "secret"
    assert server.received[1].headers["x-custom"] == "x"


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_stops_after_five_redirects(server: WebhookServer) -> None:
    with pytest.raises(PermanentError, match="webhook exceeded 5 redirects"):
        await run_async("webhook", {"url": server.url("/loop")})
    assert len(server.received) == 6


@pytest.mark.usefixtures("allow_127_0_0_1")
async def test_webhook_redirect_to_a_non_http_scheme_fails(server: WebhookServer) -> None:
    with pytest.raises(PermanentError, match="redirect to a non-http url: file:///etc/passwd"):
        await run_async("webhook", {"url": server.url("/redirect?to=file:///etc/passwd")})


# --- webhook: schema ----------------------------------------------------------------------------


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
