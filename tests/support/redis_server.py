"""Redis that fails on purpose: a private redis-server on a free port, which a fault test may
kill, restart and flush; a Sentinel set (a primary, a replica, three sentinels) that fails over
on demand; or no Redis at all for this process's own client."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from django.test import override_settings

from jobs.queue import sync_client
from tests.support.stack import free_port


class PrivateRedis:
    def __init__(self, workdir: Path, *args: str) -> None:
        """`args`: more redis-server options (`--replicaof host port`, say)."""
        self.workdir = workdir
        self.args = args
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1)

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is needed for this test"
        self.proc = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextmanager
def private_redis(workdir: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


SENTINEL_SERVICE = "mymaster"
SENTINEL_DOWN_AFTER_MS = 1000


class SentinelSet:
    """A primary, a replica of it and three sentinels (quorum 2), each a redis-server on a free
    loopback port with its files in its own directory under `workdir`. A primary is deemed down
    after SENTINEL_DOWN_AFTER_MS without an answer."""

    def __init__(self, workdir: Path, *, sentinels: int = 3) -> None:
        self.workdir = workdir
        self.primary = PrivateRedis(self._dir("primary"))
        self.replica = PrivateRedis(
            self._dir("replica"), "--replicaof", "127.0.0.1", str(self.primary.port)
        )
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[subprocess.Popen] = []

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}/0"

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index], socket_timeout=1, decode_responses=True)

    def master_port(self, index: int = 0) -> int:
        """The master's port as sentinel `index` says."""
        _, port = self.sentinel(index).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE
        )
        return int(port)

    def server(self, port: int) -> PrivateRedis:
        return next(node for node in (self.primary, self.replica) if node.port == port)

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        server = shutil.which("redis-server")
        assert server
        for n, port in enumerate(self.sentinel_ports):
            conf = self._dir(f"sentinel{n}") / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {conf.parent}\n"
                f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {SENTINEL_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SENTINEL_SERVICE} 10000\n"
                f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [server, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.wait_settled(timeout=30)

    def settled(self) -> bool:
        """Every sentinel knows the same master, a replica with its link up, the other sentinels."""
        try:
            masters = {self.master_port(n) for n in range(len(self.sentinel_ports))}
            if len(masters) != 1:
                return False
            for n in range(len(self.sentinel_ports)):
                replicas = self._sentinel_list(n, "REPLICAS")
                others = self._sentinel_list(n, "SENTINELS")
                up = [
                    r
                    for r in replicas
                    if r["master-link-status"] == "ok" and "down" not in r["flags"]
                ]
                if not up or len(others) != len(self.sentinel_ports) - 1:
                    return False
            return True
        except redis.RedisError:
            return False

    def _sentinel_list(self, index: int, what: str) -> list[dict[str, str]]:
        # Raw: redis-py's sentinel_* helpers on a plain client do not parse these (6.4).
        rows = self.sentinel(index).execute_command("SENTINEL", what, SENTINEL_SERVICE)
        return [dict(zip(row[::2], row[1::2], strict=True)) for row in rows]

    def wait_settled(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.settled():
                return
            time.sleep(0.1)
        raise AssertionError("the Sentinel set did not settle")

    def failover(self) -> None:
        """`SENTINEL FAILOVER`: the replica promoted, the primary demoted, both running."""
        assert self.sentinel().execute_command("SENTINEL FAILOVER", SENTINEL_SERVICE)

    def old_primary_gone(self) -> bool:
        """Whether the first primary is dead or a replica now (the sentinels demote a running
        one some seconds after the failover)."""
        if self.primary.proc is None:
            return True
        try:
            return self.primary.client().execute_command("ROLE")[0] == b"slave"
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.sentinels = []
        self.replica.kill()
        self.primary.kill()


@contextmanager
def sentinel_set(workdir: Path) -> Iterator[SentinelSet]:
    """A running Sentinel set (see `SentinelSet`), all of it killed at the end."""
    servers = SentinelSet(workdir)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@contextmanager
def unreachable_redis() -> Iterator[None]:
    """REDIS_URL pointing where nothing listens, for this process's (cached) Redis client too;
    the real Redis again afterwards."""
    sync_client.cache_clear()
    try:
        with override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):
            yield
    finally:
        sync_client.cache_clear()
