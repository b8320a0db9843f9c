"""`webhook` jobs: one real HTTP request, guarded against reaching the operator's own network.

Every TCP connection (the first request and each redirect hop) goes through `GuardedBackend`,
which resolves the host itself, refuses if any resolved address is blocked by `netguard`, and
connects to the checked IP; TLS and the Host header still use the name from the URL. Because the
check is made on the address actually connected to, DNS rebinding and odd IP spellings do not pass.

Every request (each redirect hop too) carries the Standard Webhooks headers (`jobs/signing.py`):
`webhook-id` is `msg_<job id>` on every attempt, `webhook-signature` holds one signature per
live secret of the tenant, which the worker puts in `ctx.signing_secrets`.

Every request first takes a slot at its destination host (jobs/destinations.py: a concurrency
cap and a circuit breaker per host, over all workers); a host that must be spared holds the job
back (`HeldBack`) without an attempt spent.

`send` is that request path on its own; event deliveries (jobs/handlers/event_delivery.py) use it
with the event's id as `webhook-id`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpcore
import httpx
from django.conf import settings
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)

from jobs import destinations, netguard, signing
from jobs.handlers.registry import JobContext, PermanentError, register

USER_AGENT = "jobqueue-webhook/1"
MAX_REDIRECTS = 5
MAX_RESPONSE_BYTES = 64 * 1024
MAX_HEADERS = 50
MAX_HEADER_BYTES = 16 * 1024
ERROR_SNIPPET_CHARS = 200

# Hop-by-hop and framing headers are the transport's business; a caller setting them could
# smuggle requests or break framing. X-Job-Id and the Standard Webhooks headers are ours.
FORBIDDEN_HEADERS = frozenset(
    {
        *signing.SIGNED_HEADERS,
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "x-job-id",
    }
)
# Credentials the caller meant for the first origin are not sent to another one.
CROSS_ORIGIN_DROPPED_HEADERS = frozenset({"authorization", "cookie"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_4XX = frozenset({408, 429})

# Anchored, and matched by pydantic's Rust engine, where `$` is the end of the text.
_TOKEN_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"  # RFC 9110 token
_HEADER_VALUE_PATTERN = r"^[\t\x20-\x7e]*$"  # visible ASCII, space, tab: no CR/LF

HeaderName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=_TOKEN_PATTERN)]
HeaderValue = Annotated[str, StringConstraints(max_length=8192, pattern=_HEADER_VALUE_PATTERN)]


class WebhookError(Exception):
    """A webhook attempt failed in a way a later attempt may not (5xx, 408/429, network)."""


class WebhookBlocked(PermanentError):
    """The webhook would connect to an address the network policy forbids."""


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def check_url(value: str) -> str:
    """`value` if it is an http(s) URL with a host (and a valid port); else ValueError."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("url must not contain whitespace or control characters")
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid url: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise ValueError("url must be http or https")
    if not url.host:
        raise ValueError("url must have a host")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError("url port must be from 1 to 65535")
    return value


class WebhookPayload(BaseModel):
    """Payload of a `webhook` job."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    method: Annotated[
        Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"], BeforeValidator(_upper)
    ] = "POST"
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict, max_length=MAX_HEADERS)
    body: JsonValue = None
    timeout_ms: int = Field(default=10_000, ge=1, le=30_000, strict=True, alias="timeoutMs")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        seen: set[str] = set()
        for name in value:
            lower = name.lower()
            if lower in FORBIDDEN_HEADERS:
                raise ValueError(f"header {name!r} may not be set")
            if lower in seen:
                raise ValueError(f"header {name!r} is given twice")
            seen.add(lower)
        if sum(len(k) + len(v) + 4 for k, v in value.items()) > MAX_HEADER_BYTES:
            raise ValueError(f"headers exceed {MAX_HEADER_BYTES} bytes")
        return value

    @field_validator("body")
    @classmethod
    def _check_body(cls, value: JsonValue) -> JsonValue:
        try:
            json.dumps(value, allow_nan=False)
        except ValueError as exc:
            raise ValueError("body must be JSON without NaN or Infinity") from exc
        return value

    @model_validator(mode="after")
    def _no_body_without_content(self) -> WebhookPayload:
        if self.body is not None and self.method in ("GET", "HEAD"):
            raise ValueError(f"body is not allowed with {self.method}")
        return self


# --- the guarded connection ---------------------------------------------------------------------


async def resolve(host: str, port: int) -> list[netguard.IPAddress]:
    """All addresses `host` resolves to for a TCP connection, in resolver order, without duplicates.

    Module-level so tests can stand in for DNS.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[netguard.IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _is_literal_of(host: str, address: netguard.IPAddress) -> bool:
    try:
        return ipaddress.ip_address(netguard.normalize_host(host)) == address
    except ValueError:
        return False


def _show(address: netguard.IPAddress) -> str:
    # Python prints ::ffff:127.0.0.1 as ::ffff:7f00:1, which hides what it is.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that only connects to addresses the policy permits."""

    def __init__(
        self, allow: netguard.AllowList, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._allow = allow
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve `host`, refuse if any address is blocked, else connect to a checked address."""
        try:
            async with asyncio.timeout(timeout):
                addresses = await resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"DNS lookup of {host} timed out") from exc
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"DNS lookup of {host} failed: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"DNS lookup of {host} returned no address")
        # One blocked answer refuses them all: a name mixing public and private addresses is
        # how rebinding attacks look, and trying the next address could reach the private one.
        for address in addresses:
            reason = netguard.check_address(host, address, self._allow, port=port)
            if reason is not None:
                via = "" if _is_literal_of(host, address) else f" ({host})"
                raise WebhookBlocked(f"webhook blocked: {_show(address)}{via} is {reason}")
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        raise last_error or httpcore.ConnectError(f"could not connect to {host}")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Unix sockets are local by definition, so never."""
        raise WebhookBlocked("webhook blocked: unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes tens of milliseconds: once per process, not once per call.
    return httpx.create_ssl_context(trust_env=False)


def guarded_transport(allow: netguard.AllowList) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through `GuardedBackend`, never a proxy."""
    transport = httpx.AsyncHTTPTransport(verify=_ssl_context(), trust_env=False)
    # httpx 0.28 has no public parameter for the network backend; the pool it builds is replaced
    # by an equivalent one that uses ours.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=_ssl_context(),
        max_connections=10,
        http1=True,
        http2=False,
        network_backend=GuardedBackend(allow),
    )
    return transport


# --- the exchange -------------------------------------------------------------------------------


async def _read_capped(response: httpx.Response) -> bytes:
    """At most MAX_RESPONSE_BYTES of the raw body; the rest is never read (the connection is
    closed), so a huge or endless response cannot hold the worker."""
    received = bytearray()
    async for chunk in response.aiter_raw():
        received += chunk
        if len(received) >= MAX_RESPONSE_BYTES:
            break
    return bytes(received[:MAX_RESPONSE_BYTES])


def _snippet(body: bytes) -> str:
    text = " ".join(body[: ERROR_SNIPPET_CHARS * 4].decode("utf-8", "replace").split())
    return text[:ERROR_SNIPPET_CHARS]


def status_error(status: int, body: bytes) -> Exception:
    """The error of an answer that is not 2xx: permanent for 4xx but 408 and 429."""
    snippet = _snippet(body)
    message = f"webhook returned HTTP {status}" + (f": {snippet}" if snippet else "")
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return PermanentError(message)
    return WebhookError(message)


async def _exchange(
    client: httpx.AsyncClient, payload: WebhookPayload, ctx: JobContext, msg_id: str
) -> tuple[int, bytes]:
    """Send the request, following up to MAX_REDIRECTS redirects by hand; (status, capped body)."""
    method = payload.method
    url = httpx.URL(payload.url)
    headers = httpx.Headers({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    # The raw body is read, not decoded: a compressed response could expand far past the cap.
    headers.update(payload.headers)
    headers["X-Job-Id"] = ctx.job_id
    content: bytes | None = None
    if payload.body is not None:
        content = json.dumps(payload.body, separators=(",", ":"), allow_nan=False).encode()
        headers.setdefault("Content-Type", "application/json")
    timestamp = int(time.time())
    for hop in range(MAX_REDIRECTS + 1):
        # Every hop is signed for the exact bytes it sends (a 303 drops the body), and the
        # signature headers replace any a job created before they were refused might carry.
        headers.update(
            signing.signed_headers(
                ctx.signing_secrets, msg_id=msg_id, timestamp=timestamp, body=content or b""
            )
        )
        request = client.build_request(method, url, headers=headers, content=content)
        response = await client.send(request, stream=True)
        try:
            location = response.headers.get("Location")
            if response.status_code not in REDIRECT_STATUSES or location is None:
                return response.status_code, await _read_capped(response)
        finally:
            await response.aclose()
        if hop == MAX_REDIRECTS:
            raise PermanentError(f"webhook exceeded {MAX_REDIRECTS} redirects")
        try:
            next_url = url.join(location)
        except httpx.InvalidURL as exc:
            raise PermanentError(f"webhook redirect to an invalid url: {exc}") from exc
        if next_url.scheme not in ("http", "https") or not next_url.host:
            raise PermanentError(f"webhook redirect to a non-http url: {location[:200]}")
        # Browsers and httpx turn these into a GET without body; 307/308 keep method and body.
        if (response.status_code == 303 and method != "HEAD") or (
            response.status_code in (301, 302) and method == "POST"
        ):
            method, content = "GET", None
            headers.pop("Content-Type", None)
        if next_url.scheme != url.scheme or next_url.host != url.host or next_url.port != url.port:
            # Another origin gets none of the tenant's headers: any of them may be a credential
            # (`X-Api-Key`, a signature), not only the standard ones.
            for name in (*CROSS_ORIGIN_DROPPED_HEADERS, *payload.headers):
                headers.pop(name, None)
        url = next_url
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Answer:
    """What the destination answered (any status) and how long the exchange took."""

    status: int
    body: bytes
    duration_ms: int


async def send(payload: WebhookPayload, ctx: JobContext, *, msg_id: str) -> Answer:
    """Make the request through the guarded transport, signed with `ctx.signing_secrets` under
    `msg_id`, after taking a slot at its host (HeldBack if the host must be spared). Network
    errors and timeouts raise WebhookError, blocked addresses and invalid requests
    PermanentError; any HTTP answer is returned, whatever its status."""
    allow = netguard.parse_allow_list(settings.JOBS.get("WEBHOOK_ALLOWED_HOSTS") or [])
    timeout_s = payload.timeout_ms / 1000
    # The URL's host bears the request (redirects included): its concurrency cap and circuit
    # breaker may hold the job back (HeldBack) before anything is sent.
    host = destinations.host_of(httpx.URL(payload.url))
    async with destinations.request_slot(host, timeout_ms=payload.timeout_ms) as slot:
        started = time.perf_counter()
        try:
            # One deadline for the whole exchange, redirects included; httpx's own timeouts
            # only bound each phase.
            async with asyncio.timeout(timeout_s):
                async with httpx.AsyncClient(
                    transport=guarded_transport(allow),
                    follow_redirects=False,
                    trust_env=False,
                    timeout=httpx.Timeout(timeout_s),
                ) as client:
                    status, body = await _exchange(client, payload, ctx, msg_id)
        except (TimeoutError, httpx.TimeoutException) as exc:
            slot.failed()
            raise WebhookError(f"webhook timed out after {payload.timeout_ms} ms") from exc
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            raise PermanentError(f"webhook request invalid: {exc}") from exc
        except httpx.HTTPError as exc:
            slot.failed()
            detail = str(exc) or type(exc).__name__
            raise WebhookError(f"webhook request failed: {detail}") from exc
        slot.answered(status)
    duration_ms = round((time.perf_counter() - started) * 1000)
    return Answer(status=status, body=body, duration_ms=duration_ms)


@register("webhook", schema=WebhookPayload, timeout_s=60, signed=True)
async def call_webhook(payload: WebhookPayload, ctx: JobContext) -> dict[str, int]:
    """Make the request, signed with the tenant's secrets (Standard Webhooks); 2xx gives
    `{statusCode, durationMs}`, anything else fails.

    4xx other than 408/429 and blocked addresses are permanent; the rest is retried.
    """
    answer = await send(payload, ctx, msg_id=signing.message_id(ctx.job_id))
    if not 200 <= answer.status < 300:
        raise status_error(answer.status, answer.body)
    return {"statusCode": answer.status, "durationMs": answer.duration_ms}
