"""Every Redis client of the service is made here, from `REDIS_URL`, in one of two forms:

- one server: `redis://[[user]:password@]host:port/db` (or `rediss://`, or `unix://`), as
  redis-py reads it;
- a Sentinel set: `redis+sentinel://[[user]:password@]host1:26379,host2:26379/mymaster/0`, with
  an optional `?sentinel_password=...` when the sentinels themselves need a password. The hosts
  are the sentinels, `mymaster` the name they monitor, `0` the database (0 if left out); the
  user and password are the Redis servers' own.

A Sentinel client is redis-py's own (`Sentinel(...).master_for(name)`): it asks the sentinels
where the master is before each new connection, and drops a connection on a connection error or
on `READONLY` (a master demoted to a replica), so the next command goes to the new master. The
queue, the worker and the realtime hub already treat a lost connection as a Redis restart.

One addition: the pool asks the sentinels again at most every MASTER_CHECK_S when it hands out
a connection, and moves a connection that is not on the master they name. After
`SENTINEL FAILOVER` the old master keeps accepting writes for about ten seconds before the
sentinels turn it into a replica (which then discards them); without the check a client would
keep writing there until then, and PUBLISH, which a replica accepts too, for ever.

The queue may also live on a Redis Cluster, given by `REDIS_CLUSTER_URL`:
`redis://[[user]:password@]host1:6379[,host2:6379...]` (or `rediss://`), any of the cluster's
nodes (more than one in case the first is down); the client is redis-py's own `RedisCluster`,
which learns the slot map from them and follows `MOVED` and failovers. A cluster has database 0
only. Pub/sub and the keys that span slots stay on `REDIS_URL` (docs/scaling.md).

No Django here: `scripts/` make their clients here too, before any settings exist.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
REDIS_PORT = 6379
CLUSTER_SCHEMES = ("redis", "rediss")
# The sentinels must answer quickly or be skipped for the next one, whatever the client's own
# timeouts are (a worker's blocking client has none).
SENTINEL_TIMEOUT_S = 1.0
# How often a client asks the sentinels where the master is, besides at each new connection.
MASTER_CHECK_S = 1.0


class RedisUrlError(ValueError):
    """`REDIS_URL` cannot be read."""


@dataclass(frozen=True)
class SentinelTarget:
    """A Sentinel set and the master it names."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The Sentinel set `url` names, or None for a one-server URL (left to redis-py)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        if parts.scheme.endswith("+sentinel"):
            raise RedisUrlError(f"unsupported Redis URL scheme {parts.scheme!r}")
        return None
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_host_port(item) for item in hosts.split(",") if item.strip())
    if not sentinels:
        raise RedisUrlError("a redis+sentinel URL needs at least one sentinel host:port")
    path = [piece for piece in parts.path.split("/") if piece]
    if not path or len(path) > 2:
        raise RedisUrlError("a redis+sentinel URL ends with /<master name>[/<db>]")
    service = unquote(path[0])
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise RedisUrlError(
            f"the database of a redis+sentinel URL is a number, not {path[1]!r}"
        ) from None
    if db < 0:
        raise RedisUrlError("the database of a redis+sentinel URL is 0 or more")
    username: str | None = None
    password: str | None = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise RedisUrlError(f"unknown redis+sentinel URL option(s): {', '.join(sorted(unknown))}")
    sentinel_password = query.get("sentinel_password", [None])[-1]
    return SentinelTarget(
        sentinels=sentinels,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_password=sentinel_password,
    )


def _host_port(
    item: str, default_port: int = SENTINEL_PORT, what: str = "sentinel address"
) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise RedisUrlError(f"bad {what} {item!r}: the port is not a number") from None
    if not host or not 0 < number < 65536:
        raise RedisUrlError(f"bad {what} {item!r}")
    return host, number


@dataclass(frozen=True)
class ClusterTarget:
    """The nodes a Redis Cluster client starts from."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def parse_cluster_url(url: str) -> ClusterTarget:
    """The nodes and credentials of a `REDIS_CLUSTER_URL`."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise RedisUrlError("a Redis Cluster URL is redis://host:port[,host:port...] or rediss://")
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes = tuple(
        _host_port(item, REDIS_PORT, "cluster node") for item in hosts.split(",") if item.strip()
    )
    if not nodes:
        raise RedisUrlError("a Redis Cluster URL needs at least one host:port")
    if parts.path.strip("/") not in ("", "0") or parts.query:
        raise RedisUrlError("a Redis Cluster URL has no database (a cluster has 0) nor options")
    username: str | None = None
    password: str | None = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    return ClusterTarget(
        nodes=nodes, username=username, password=password, ssl=parts.scheme == "rediss"
    )


def sync_cluster(url: str, **options: Any) -> redis.RedisCluster:
    """A blocking Redis Cluster client for `url` (`parse_cluster_url`)."""
    target = parse_cluster_url(url)
    return redis.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **options,
    )


def async_cluster(url: str, **options: Any) -> aioredis.RedisCluster:
    """An asyncio Redis Cluster client for `url` (`parse_cluster_url`)."""
    target = parse_cluster_url(url)
    return aioredis.RedisCluster(
        startup_nodes=[aiocluster.ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **options,
    )


def check_redis_url(url: str) -> None:
    """Raise `RedisUrlError` if `url` is neither a Redis URL nor a Sentinel one."""
    if parse_sentinel_url(url) is None:
        try:
            redis.ConnectionPool.from_url(url)
        except ValueError as exc:
            raise RedisUrlError(str(exc)) from exc


def _sentinel_options(target: SentinelTarget) -> dict[str, Any]:
    return {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "password": target.sentinel_password,
    }


def _master_options(target: SentinelTarget, options: dict[str, Any]) -> dict[str, Any]:
    return {"db": target.db, "username": target.username, "password": target.password, **options}


def _no_master(sentinel: Any, service: str) -> redis.sentinel.MasterNotFoundError:
    """redis-py's MasterNotFoundError names each sentinel client with its connection settings,
    password included: the same error, with the sentinels' addresses only."""
    hosts = ", ".join(
        "{host}:{port}".format(**client.connection_pool.connection_kwargs)
        for client in sentinel.sentinels
    )
    return redis.sentinel.MasterNotFoundError(
        f"no sentinel of {hosts} names a master for {service!r}"
    )


class _SyncSentinel(redis.sentinel.Sentinel):
    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)
        except redis.sentinel.MasterNotFoundError:
            raise _no_master(self, service_name) from None


class _AsyncSentinel(aiosentinel.Sentinel):
    async def discover_master(self, service_name: str) -> Any:
        try:
            return await super().discover_master(service_name)
        except aiosentinel.MasterNotFoundError:
            raise _no_master(self, service_name) from None


class _SyncSentinelPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's pool, which also follows the master while its connections stay up."""

    _checked = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() - self._checked >= MASTER_CHECK_S:
            self._checked = time.monotonic()
            # On a change this drops the idle connections; if no sentinel answers, the
            # connections stay as they are.
            with contextlib.suppress(redis.ConnectionError):
                self.get_master_address()
        connection = super().get_connection(*args, **kwargs)
        master = self.master_address
        if master is not None and (connection.host, connection.port) != master:
            connection.disconnect()
            try:
                connection.connect()
            except BaseException:
                self.release(connection)
                raise
        return connection


class _AsyncSentinelPool(aiosentinel.SentinelConnectionPool):
    """redis-py's pool, which also follows the master while its connections stay up."""

    _checked = 0.0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() - self._checked >= MASTER_CHECK_S:
            self._checked = time.monotonic()
            # On a change this drops the idle connections; if no sentinel answers, the
            # connections stay as they are.
            with contextlib.suppress(redis.ConnectionError):
                await self.get_master_address()
        return await super().get_connection(*args, **kwargs)

    async def ensure_connection(self, connection: Any) -> None:
        master = self.master_address
        if (
            master is not None
            and connection.is_connected
            and (connection.host, connection.port) != master
        ):
            await connection.disconnect()
        await super().ensure_connection(connection)


class _SyncMaster(redis.Redis):
    """A Sentinel set's master; closing it closes the connections to the sentinels too."""

    def close(self) -> None:
        super().close()
        for client in self.connection_pool.sentinel_manager.sentinels:
            client.close()


class _AsyncMaster(aioredis.Redis):
    """A Sentinel set's master; closing it closes the connections to the sentinels too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.connection_pool.sentinel_manager.sentinels:
            await client.aclose()


def sync_redis(url: str, **options: Any) -> redis.Redis:
    """A blocking client (its own connection pool) for `url`; `options` are redis-py's."""
    target = parse_sentinel_url(url)
    if target is None:
        return redis.Redis.from_url(url, **options)
    sentinel = _SyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_options(target))
    return sentinel.master_for(
        target.service,
        redis_class=_SyncMaster,
        connection_pool_class=_SyncSentinelPool,
        **_master_options(target, options),
    )


def async_redis(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client (its own connection pool) for `url`; `options` are redis-py's."""
    target = parse_sentinel_url(url)
    if target is None:
        return aioredis.Redis.from_url(url, **options)
    sentinel = _AsyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_options(target))
    return sentinel.master_for(
        target.service,
        redis_class=_AsyncMaster,
        connection_pool_class=_AsyncSentinelPool,
        **_master_options(target, options),
    )


async def on_master(client: aioredis.Redis, connection: Any) -> bool:
    """Whether `client`'s `connection` (a pub/sub connection, say, which no command ever moves)
    is where the sentinels say the master is now; always True for one server, and while no
    sentinel answers."""
    pool = client.connection_pool
    if not isinstance(pool, aiosentinel.SentinelConnectionPool) or connection is None:
        return True
    try:
        master = await pool.sentinel_manager.discover_master(pool.service_name)
    except redis.ConnectionError:  # MasterNotFoundError included: nobody to ask
        return True
    return (connection.host, connection.port) == master


def describe_redis_url(url: str) -> str:
    """`url` without its passwords, for logs and messages."""
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    query = "?sentinel_password=***" if "sentinel_password" in parts.query else ""
    if "," in hosts and parts.scheme in CLUSTER_SCHEMES:  # a cluster's nodes
        query = ""
    netloc = f"{credentials}@{hosts}" if at else hosts
    return f"{parts.scheme}://{netloc}{parts.path}{query}"
