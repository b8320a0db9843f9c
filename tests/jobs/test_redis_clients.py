"""`REDIS_URL` read as operators write it (jobs/redis_clients.py): one server for redis-py, or
a Sentinel set; a URL that cannot be read is refused with the reason. And the Sentinel clients
follow a failover (a primary, a replica and three sentinels on loopback ports)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from jobs.redis_clients import (
    MASTER_CHECK_S,
    ClusterTarget,
    RedisUrlError,
    SentinelTarget,
    async_redis,
    check_redis_url,
    describe_redis_url,
    parse_cluster_url,
    parse_sentinel_url,
    sync_redis,
)
from tests.support.redis_server import sentinel_set
from tests.support.stack import free_port, wait_until


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://host1:26379,host2:26380/mymaster/2",
            SentinelTarget(
                sentinels=(("host1", 26379), ("host2", 26380)), service="mymaster", db=2
            ),
        ),
        (
            "redis+sentinel://s1,[::1]:5000/main",
            SentinelTarget(sentinels=(("s1", 26379), ("::1", 5000)), service="main", db=0),
        ),
        (
            "redis+sentinel://app:p%40ss@s1:26379/main/0?sentinel_password=s%3Dcret",
            SentinelTarget(
                sentinels=(("s1", 26379),),
                service="main",
                username="app",
                password="p@ss",
                sentinel_password="s=cret",
            ),
        ),
        (
            "redis+sentinel://:secret@s1/main",
            SentinelTarget(sentinels=(("s1", 26379),), service="main", password="secret"),
        ),
    ],
)
def test_sentinel_urls(url: str, expected: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == expected
    check_redis_url(url)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://:pw@redis.example.com/1", "unix:///tmp/r.sock"]
)
def test_one_server_urls_are_redis_pys(url: str) -> None:
    assert parse_sentinel_url(url) is None
    check_redis_url(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel:///mymaster/0", "at least one sentinel"),
        ("redis+sentinel://s1:26379/", "ends with /<master name>[/<db>]"),
        ("redis+sentinel://s1:26379/m/0/extra", "ends with /<master name>[/<db>]"),
        ("redis+sentinel://s1:26379/m/zero", "is a number, not 'zero'"),
        ("redis+sentinel://s1:port/m", "the port is not a number"),
        ("redis+sentinel://s1:70000/m", "bad sentinel address"),
        ("redis+sentinel://s1/m?timeout=1", "unknown redis+sentinel URL option(s): timeout"),
        ("rediss+sentinel://s1/m", "unsupported Redis URL scheme 'rediss+sentinel'"),
        ("http://127.0.0.1:6379/0", "Redis URL must specify one of the following schemes"),
    ],
)
def test_unreadable_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(RedisUrlError) as raised:
        check_redis_url(url)
    assert reason in str(raised.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        (
            "redis+sentinel://app:pw@s1,s2/m/0?sentinel_password=x",
            "redis+sentinel://app:***@s1,s2/m/0?sentinel_password=***",
        ),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_urls_are_described_without_passwords(url: str, shown: str) -> None:
    assert describe_redis_url(url) == shown


@pytest.mark.slow
def test_clients_leave_the_old_master_after_a_sentinel_failover(tmp_path: Path) -> None:
    """After `SENTINEL FAILOVER` the old primary stays a writable master for about ten seconds
    and takes PUBLISH for ever: a client that only publishes must still move to the new master
    within a second or so of the sentinels naming it (else its updates reach nobody)."""
    with sentinel_set(tmp_path) as servers:
        sync = sync_redis(servers.url, socket_timeout=2)

        async def publish(message: str) -> int:
            client = async_redis(servers.url, socket_timeout=2)
            try:
                return await client.publish("updates", message)
            finally:
                await client.aclose()

        assert sync.publish("updates", "before") == 0 == asyncio.run(publish("before"))
        servers.failover()
        wait_until(
            lambda: servers.master_port() == servers.replica.port,
            timeout=10,
            message="no failover",
        )
        switched = time.monotonic()
        # (Subscribed after the promotion, which closes the replica's client connections.)
        listener = servers.replica.client().pubsub()
        listener.subscribe("updates")
        # One subscriber, on the new master: 1 once the client publishes there.
        wait_until(
            lambda: sync.publish("updates", "after") == 1,
            timeout=MASTER_CHECK_S + 1.5,  # the old primary stays a master ~10 s
            message="the sync client still publishes on the old master",
        )
        moved_s = time.monotonic() - switched
        assert not servers.old_primary_gone(), "the old primary is still a master meanwhile"
        assert asyncio.run(publish("after")) == 1
        listener.close()
        sync.close()
    print(f"\nsync client on the new master {moved_s:.2f}s after the sentinels named it")


def test_no_password_in_the_error_when_no_sentinel_answers() -> None:
    # redis-py's own error would list each sentinel client with its settings, password included.
    url = f"redis+sentinel://:master-pw@127.0.0.1:{free_port()}/main/0?sentinel_password=s-pw"
    with pytest.raises(redis.ConnectionError) as raised:
        sync_redis(url, socket_timeout=1).ping()

    async def ping() -> None:
        client = async_redis(url, socket_timeout=1)
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(redis.ConnectionError) as araised:
        asyncio.run(ping())
    for error in (raised.value, araised.value):
        assert "names a master for 'main'" in str(error)
        assert "pw" not in str(error)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://n1:7000", ClusterTarget(nodes=(("n1", 7000),))),
        (
            "rediss://u:p%40ss@n1:7000,n2,[::1]:7002/0",
            ClusterTarget(
                nodes=(("n1", 7000), ("n2", 6379), ("::1", 7002)),
                username="u",
                password="p@ss",
                ssl=True,
            ),
        ),
    ],
)
def test_cluster_urls(url: str, expected: ClusterTarget) -> None:
    assert parse_cluster_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://s1/m", "redis://host:port"),
        ("redis://", "at least one host:port"),
        ("redis://n1:7000/3", "no database"),
        ("redis://n1:7000?cluster=1", "nor options"),
        ("redis://n1:port", "bad cluster node"),
    ],
)
def test_unreadable_cluster_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(RedisUrlError, match=reason):
        parse_cluster_url(url)


def test_cluster_urls_are_described_without_passwords() -> None:
    shown = describe_redis_url("redis://:secret@n1:7000,n2:7001")
    assert shown == "redis://:***@n1:7000,n2:7001"
