"""The webhook address policy: which addresses are blocked, and how the allow-list lifts it."""

from __future__ import annotations

import ipaddress

import pytest

from jobs.handlers.netguard import (
    AllowList,
    check_address,
    is_blocked,
    normalize_host,
    parse_allow_list,
)


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


def test_parse_allow_list_splits_hosts_ips_and_networks() -> None:
    allow = parse_allow_list(
        [" Hooks.Example.COM. ", "127.0.0.1", "10.0.0.0/8", "[::1]", "fd00::/8", "", "  "]
    )
    assert allow.hosts == frozenset({"hooks.example.com"})
    assert [str(net) for net in allow.networks] == [
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
        "fd00::/8",
    ]


def test_parse_allow_list_accepts_non_strict_cidrs() -> None:
    allow = parse_allow_list(["192.168.1.7/24"])
    assert [str(net) for net in allow.networks] == ["192.168.1.0/24"]


@pytest.mark.parametrize(
    "entry", ["http://example.com", "example.com:8080", "exa mple.com", "-bad.example", "a..b", "*"]
)
def test_parse_allow_list_refuses_malformed_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid webhook allow-list entry"):
        parse_allow_list([entry])


def test_normalize_host() -> None:
    assert normalize_host("[::1]") == "::1"
    assert normalize_host("LocalHost.") == "localhost"


def test_empty_allow_list_allows_nothing_private() -> None:
    allow = AllowList()
    assert check_address("localhost", ipaddress.ip_address("127.0.0.1"), allow) == (
        "a loopback address"
    )
    assert check_address("example.com", ipaddress.ip_address("93.184.215.14"), allow) is None


def test_allow_listed_host_name_permits_any_address_it_resolves_to() -> None:
    allow = parse_allow_list(["hooks.internal"])
    assert check_address("HOOKS.internal.", ipaddress.ip_address("10.1.2.3"), allow) is None
    # Only that exact name: neither a subdomain nor another name resolving to the same address.
    assert check_address("a.hooks.internal", ipaddress.ip_address("10.1.2.3"), allow) is not None
    assert check_address("other.internal", ipaddress.ip_address("10.1.2.3"), allow) is not None


def test_allow_listed_network_permits_its_addresses_only() -> None:
    allow = parse_allow_list(["10.0.0.0/8", "127.0.0.1"])
    assert check_address("svc", ipaddress.ip_address("10.200.0.1"), allow) is None
    assert check_address("svc", ipaddress.ip_address("192.168.0.1"), allow) == "a private address"
    assert check_address("svc", ipaddress.ip_address("127.0.0.2"), allow) == "a loopback address"
    # The IPv4-mapped spelling of an allowed address is the same destination.
    assert check_address("svc", ipaddress.ip_address("::ffff:10.0.0.5"), allow) is None


def test_allow_listed_ip_literal_host_matches_in_any_spelling_of_the_url() -> None:
    allow = parse_allow_list(["::1"])
    assert allow.allows_host("[::1]")
    assert allow.allows_host("0:0:0:0:0:0:0:1")
    assert not allow.allows_host("127.0.0.1")
