"""Which network addresses an outbound request (a webhook) may connect to.

Pure functions, no I/O: the webhook handler applies them to every address it resolves right before
connecting, and the API may reuse them. By default anything that is not a public unicast address
is refused: loopback, private, link-local (cloud metadata), unique-local, CGNAT, multicast,
reserved, and IPv6 forms that embed such an IPv4 address (IPv4-mapped, NAT64, 6to4).
An allow-list of hostnames, IPs and CIDRs (`JOBS_WEBHOOK_ALLOWED_HOSTS`) lifts the ban, on every
port or, written `host:port`, `ip:port` or `[ipv6]:port`, on that port only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# First match wins, so more specific ranges come before the ranges that contain them.
_IPV4_BLOCKED: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "an unspecified address"),
        ("127.0.0.0/8", "a loopback address"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("100.64.0.0/10", "a shared (CGNAT) address"),
        ("169.254.169.254/32", "a cloud metadata address"),
        ("169.254.0.0/16", "a link-local address"),
        ("192.0.0.0/24", "a reserved address"),
        ("192.0.2.0/24", "a documentation address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("192.88.99.0/24", "a reserved address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "a broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)

_IPV6_BLOCKED: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        # Includes IPv4-compatible ::a.b.c.d and local-use NAT64 64:ff9b:1::/48.
        ("::/8", "a reserved address"),
        ("100::/64", "a discard-only address"),
        ("2001::/32", "a Teredo tunnel address"),
        ("2001:db8::/32", "a documentation address"),
        ("fc00::/7", "a unique-local address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)

_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")

# Hostname entries of the allow-list: letters, digits, hyphens, underscores and dots only.
_HOSTNAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address reaches through a translation scheme, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    return None


def is_blocked(ip: IPAddress | str) -> str | None:
    """Why `ip` may not be connected to by default (e.g. "a loopback address"), or None."""
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            # The packet ends up at the IPv4 address, so that is what must be judged.
            inner, scheme = embedded
            reason = is_blocked(inner)
            return f"{reason} ({scheme} {inner})" if reason else None
        table: Iterable[tuple[IPNetwork, str]] = _IPV6_BLOCKED
    else:
        table = _IPV4_BLOCKED
    for network, reason in table:
        if address in network:
            return reason
    # Catch-all for special-purpose ranges the tables do not name.
    if not address.is_global:
        return "a non-public address"
    return None


def normalize_host(host: str) -> str:
    """A hostname or IP literal as compared against the allow-list: lower case, no brackets or
    trailing dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


# An allow-list entry's port: `name:443`, `10.0.0.1:8080`, `[fd00::1]:8443`, `10.0.0.0/8:443`.
# A bare IPv6 address has colons of its own, so it takes a port only in brackets.
_PORT_SUFFIX_RE = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*):(?P<port>[0-9]{1,5})")

# A port of None: the entry allows every port.
Port = int | None


@dataclass(frozen=True, slots=True)
class AllowList:
    """Hosts (exact, case-insensitive) and networks that may be reached even though private, each
    on every port (`None`) or on one port."""

    hosts: frozenset[tuple[str, Port]] = frozenset()
    networks: tuple[tuple[IPNetwork, Port], ...] = ()

    def allows_host(self, host: str, *, port: int) -> bool:
        """True if `host` (as written in the URL) is an allow-listed name or address on `port`."""
        name = normalize_host(host)
        if (name, None) in self.hosts or (name, port) in self.hosts:
            return True
        try:
            return self.allows_ip(ipaddress.ip_address(name), port=port)
        except ValueError:
            return False

    def allows_ip(self, ip: IPAddress, *, port: int) -> bool:
        """True if `ip` (or the IPv4 address it maps to) is in an allow-listed network on `port`."""
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            candidates.append(ipaddress.IPv6Address(str(ip).split("%", 1)[0]))
        return any(
            candidate in network
            for candidate in candidates
            for network, allowed_port in self.networks
            if candidate.version == network.version and allowed_port in (None, port)
        )


def _split_port(entry: str) -> tuple[str, Port]:
    """`host:port` into its parts; an entry without a port allows every port."""
    match = _PORT_SUFFIX_RE.fullmatch(entry)
    if match is None:
        return entry, None
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return match["host"], port


def parse_allow_list(entries: Iterable[str]) -> AllowList:
    """Parse allow-list entries (hostnames, IPs, CIDRs, each with an optional `:port`); raises
    ValueError on a malformed one."""
    hosts: set[tuple[str, Port]] = set()
    networks: list[tuple[IPNetwork, Port]] = []
    for raw in entries:
        if not raw.strip():
            continue
        invalid = f"invalid webhook allow-list entry {raw!r}: not a host, IP or CIDR"
        try:
            host, port = _split_port(raw.strip().lower())
        except ValueError as exc:
            raise ValueError(f"{invalid} ({exc})") from None
        entry = normalize_host(host)
        try:
            networks.append((ipaddress.ip_network(entry, strict=False), port))
            continue
        except ValueError:
            pass
        if not _HOSTNAME_RE.fullmatch(entry) or len(entry) > 253:
            raise ValueError(f"{invalid} (with an optional :port)")
        hosts.add((entry, port))
    return AllowList(hosts=frozenset(hosts), networks=tuple(networks))


def check_address(host: str, ip: IPAddress, allow: AllowList, *, port: int) -> str | None:
    """Why connecting to `ip` (resolved from `host`) on `port` is refused, or None if it is
    permitted."""
    if allow.allows_host(host, port=port) or allow.allows_ip(ip, port=port):
        return None
    return is_blocked(ip)
