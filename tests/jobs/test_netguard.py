"""The webhook address policy: which addresses are blocked, and how the allow-list lifts it (on
every port, or on one port), down to real requests reaching or not reaching a local receiver."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from jobs.handlers import PermanentError
from jobs.netguard import (
    AllowList,
    check_address,
    is_blocked,
    normalize_host,
    parse_allow_list,
)
from tests.support.handlers import allow_webhook_hosts, run_async
from tests.support.webhook_server import WebhookServer, webhook_server


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.255.254", "a loopback address"),
        ("0.0.0.0", "an unspecified address"),
        ("0.1.2.3", "an unspecified address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("100.127.255.255", "a shared (CGNAT) address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("192.0.0.9", "a reserved address"),
        ("192.0.2.10", "a documentation address"),
        ("198.18.0.1", "a benchmarking address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("255.255.255.255", "a broadcast address"),
        ("::1", "a loopback address"),
        ("::", "an unspecified address"),
        ("::127.0.0.1", "a reserved address"),  # IPv4-compatible, deprecated
        ("fc00::1", "a unique-local address"),
        ("fd00:ec2::254", "a unique-local address"),  # AWS IPv6 metadata endpoint
        ("fe80::1", "a link-local address"),
        ("fe80::1%eth0", "a link-local address"),
        ("fec0::1", "a site-local address"),
        ("ff02::1", "a multicast address"),
        ("2001:db8::1", "a documentation address"),
        ("2001:0:4136:e378::1", "a Teredo tunnel address"),
        ("100::1", "a discard-only address"),
        ("64:ff9b:1::1", "a reserved address"),  # local-use NAT64
    ],
)
def test_blocked_addresses_name_their_kind(address: str, reason: str) -> None:
    assert is_blocked(address) == reason
    assert is_blocked(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
        ("::ffff:10.0.0.1", "a private address (IPv4-mapped 10.0.0.1)"),
        ("::ffff:169.254.169.254", "a cloud metadata address (IPv4-mapped 169.254.169.254)"),
        ("64:ff9b::7f00:1", "a loopback address (NAT64 127.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", "a cloud metadata address (NAT64 169.254.169.254)"),
        ("2002:7f00:1::1", "a loopback address (6to4 127.0.0.1)"),
        ("2002:c0a8:101::1", "a private address (6to4 192.168.1.1)"),
    ],
)
def test_ipv6_forms_embedding_a_blocked_ipv4_address_are_blocked(address: str, reason: str) -> None:
    assert is_blocked(address) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "100.63.255.255",  # just below CGNAT
        "100.128.0.0",  # just above CGNAT
        "172.15.255.255",
        "172.32.0.0",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses_are_not_blocked(address: str) -> None:
    assert is_blocked(address) is None


def test_is_blocked_rejects_what_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        is_blocked("localhost")


def networks(allow: AllowList) -> list[tuple[str, int | None]]:
    return [(str(network), port) for network, port in allow.networks]


def test_parse_allow_list_splits_hosts_ips_and_networks() -> None:
    allow = parse_allow_list(
        [" Hooks.Example.COM. ", "127.0.0.1", "10.0.0.0/8", "[::1]", "fd00::/8", "", "  "]
    )
    assert allow.hosts == frozenset({("hooks.example.com", None)})
    assert networks(allow) == [
        ("127.0.0.1/32", None),
        ("10.0.0.0/8", None),
        ("::1/128", None),
        ("fd00::/8", None),
    ]


def test_parse_allow_list_reads_ports() -> None:
    allow = parse_allow_list(
        [
            "Hooks.Example.COM.:8443",
            "127.0.0.1:9000",
            "[::1]:9000",
            "[FD00::1]:443",
            "10.0.0.0/8:443",
            "localhost:65535",
            # A bare IPv6 address: its last group is not a port.
            "fd00::1:80",
        ]
    )
    assert allow.hosts == frozenset({("hooks.example.com", 8443), ("localhost", 65535)})
    assert networks(allow) == [
        ("127.0.0.1/32", 9000),
        ("::1/128", 9000),
        ("fd00::1/128", 443),
        ("10.0.0.0/8", 443),
        ("fd00::1:80/128", None),
    ]


def test_parse_allow_list_accepts_non_strict_cidrs() -> None:
    allow = parse_allow_list(["192.168.1.7/24"])
    assert networks(allow) == [("192.168.1.0/24", None)]


@pytest.mark.parametrize(
    "entry",
    [
        "http://example.com",
        "http://example.com:8080",
        "exa mple.com",
        "-bad.example",
        "a..b",
        "*",
        "example.com:",
        "example.com:http",
        "example.com:0",
        "example.com:65536",
        "example.com:8080:80",
        ":8080",
        "[::1]:",
        "[::1]x:80",
    ],
)
def test_parse_allow_list_refuses_malformed_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid webhook allow-list entry"):
        parse_allow_list([entry])


def test_normalize_host() -> None:
    assert normalize_host("[::1]") == "::1"
    assert normalize_host("LocalHost.") == "localhost"


def check(host: str, address: str, allow: AllowList, port: int = 443) -> str | None:
    return check_address(host, ipaddress.ip_address(address), allow, port=port)


def test_empty_allow_list_allows_nothing_private() -> None:
    allow = AllowList()
    assert check("localhost", "127.0.0.1", allow) == "a loopback address"
    assert check("example.com", "93.184.215.14", allow) is None


def test_allow_listed_host_name_permits_any_address_it_resolves_to() -> None:
    allow = parse_allow_list(["hooks.internal"])
    assert check("HOOKS.internal.", "10.1.2.3", allow) is None
    # Only that exact name: neither a subdomain nor another name resolving to the same address.
    assert check("a.hooks.internal", "10.1.2.3", allow) is not None
    assert check("other.internal", "10.1.2.3", allow) is not None


def test_allow_listed_network_permits_its_addresses_only() -> None:
    allow = parse_allow_list(["10.0.0.0/8", "127.0.0.1"])
    assert check("svc", "10.200.0.1", allow) is None
    assert check("svc", "192.168.0.1", allow) == "a private address"
    assert check("svc", "127.0.0.2", allow) == "a loopback address"
    # The IPv4-mapped spelling of an allowed address is the same destination.
    assert check("svc", "::ffff:10.0.0.5", allow) is None


def test_allow_listed_ip_literal_host_matches_in_any_spelling_of_the_url() -> None:
    allow = parse_allow_list(["::1"])
    assert allow.allows_host("[::1]", port=80)
    assert allow.allows_host("0:0:0:0:0:0:0:1", port=80)
    assert not allow.allows_host("127.0.0.1", port=80)


def test_an_entry_without_a_port_allows_every_port() -> None:
    allow = parse_allow_list(["127.0.0.1", "hooks.internal"])
    for port in (1, 80, 6379, 9000, 65535):
        assert check("127.0.0.1", "127.0.0.1", allow, port) is None
        assert check("hooks.internal", "10.1.2.3", allow, port) is None


@pytest.mark.parametrize(
    ("entry", "host", "address"),
    [
        ("127.0.0.1:9000", "127.0.0.1", "127.0.0.1"),
        ("127.0.0.1:9000", "localhost", "127.0.0.1"),  # the address, whatever name led to it
        ("127.0.0.1:9000", "svc", "::ffff:127.0.0.1"),
        ("[::1]:9000", "[::1]", "::1"),
        ("localhost:9000", "LocalHost.", "127.0.0.1"),
        ("hooks.internal:9000", "hooks.internal", "10.1.2.3"),
        ("10.0.0.0/8:9000", "svc", "10.200.0.1"),
    ],
)
def test_an_entry_with_a_port_allows_that_port_only(entry: str, host: str, address: str) -> None:
    allow = parse_allow_list([entry])
    assert check(host, address, allow, 9000) is None
    for port in (80, 443, 6379, 8999, 9001):
        assert check(host, address, allow, port) == is_blocked(ipaddress.ip_address(address))
        assert check(host, address, allow, port) is not None


def test_entries_for_one_host_on_several_ports_add_up() -> None:
    allow = parse_allow_list(["127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.2"])
    assert check("127.0.0.1", "127.0.0.1", allow, 9000) is None
    assert check("127.0.0.1", "127.0.0.1", allow, 9001) is None
    assert check("127.0.0.1", "127.0.0.1", allow, 9002) == "a loopback address"
    assert check("127.0.0.2", "127.0.0.2", allow, 9002) is None


# --- the allow-list on real requests: a local receiver on an allowed port and one on another ---


async def call_webhook(url: str) -> dict[str, Any]:
    return await run_async("webhook", {"url": url, "method": "POST", "body": {"n": 1}})


def receivers(host: str) -> Iterator[tuple[WebhookServer, WebhookServer]]:
    try:
        with ExitStack() as stack:
            allowed = stack.enter_context(webhook_server(host))
            other = stack.enter_context(webhook_server(host))
            yield allowed, other
    except OSError as exc:
        pytest.skip(f"cannot listen on {host}: {exc}")


@pytest.fixture
def loopback_receivers() -> Iterator[tuple[WebhookServer, WebhookServer]]:
    """Two receivers on 127.0.0.1, on two ports."""
    yield from receivers("127.0.0.1")


@pytest.fixture
def ipv6_receivers() -> Iterator[tuple[WebhookServer, WebhookServer]]:
    """Two receivers on ::1, on two ports."""
    yield from receivers("::1")


@pytest.mark.parametrize("spelling", ["127.0.0.1", "localhost"])
async def test_allow_listed_port_is_reached_and_another_port_of_the_host_is_refused(
    loopback_receivers: tuple[WebhookServer, WebhookServer], settings: Any, spelling: str
) -> None:
    allowed, other = loopback_receivers
    allow_webhook_hosts(settings, f"{spelling}:{allowed.port}")

    result = await call_webhook(allowed.url().replace("127.0.0.1", spelling))
    assert result["statusCode"] == 200
    assert [call.json() for call in allowed.calls("/hook")] == [{"n": 1}]

    with pytest.raises(
        PermanentError,
        match=r"^webhook blocked: (127\.0\.0\.1|::1)( \(localhost\))? is a loopback address$",
    ):
        await call_webhook(other.url().replace("127.0.0.1", spelling))
    assert other.calls() == []


async def test_allow_listed_ipv6_port_is_reached_and_another_port_is_refused(
    ipv6_receivers: tuple[WebhookServer, WebhookServer], settings: Any
) -> None:
    allowed, other = ipv6_receivers
    allow_webhook_hosts(settings, f"[::1]:{allowed.port}")

    assert (await call_webhook(allowed.url()))["statusCode"] == 200
    assert len(allowed.calls("/hook")) == 1
    with pytest.raises(PermanentError, match=r"^webhook blocked: ::1 is a loopback address$"):
        await call_webhook(other.url())
    assert other.calls() == []


async def test_a_host_allowed_without_a_port_is_reached_on_every_port(
    loopback_receivers: tuple[WebhookServer, WebhookServer], settings: Any
) -> None:
    """The control for the tests above: both receivers are reachable once the port goes."""
    allowed, other = loopback_receivers
    allow_webhook_hosts(settings, "127.0.0.1")
    for receiver in (allowed, other):
        assert (await call_webhook(receiver.url()))["statusCode"] == 200
        assert len(receiver.calls("/hook")) == 1
