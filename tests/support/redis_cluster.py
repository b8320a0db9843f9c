"""A Redis Cluster on loopback ports for tests: three masters and a replica of each, every node a
redis-server with persistence off and its files in its own directory, joined by
`redis-cli --cluster create`. Everything is killed at the end."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.crc import key_slot

from tests.support.redis_server import PrivateRedis

# Cluster nodes talk on port + 10000: keep both under 65536.
PORT_RANGE = (20000, 40000)
NODE_TIMEOUT_MS = 1000


def _cluster_ports(count: int) -> list[int]:
    """`count` ports p whose p + 10000 (the cluster bus) is free too."""
    ports: list[int] = []
    for port in range(PORT_RANGE[0], PORT_RANGE[1]):
        if len(ports) == count:
            break
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    assert len(ports) == count, "no free ports for a Redis Cluster"
    return ports


class ClusterNode(PrivateRedis):
    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(
            workdir,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(workdir / "nodes.conf"),
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
        )
        self.port = port


class RedisCluster:
    """Three masters and three replicas (`nodes[:3]` start as masters)."""

    def __init__(self, workdir: Path, *, masters: int = 3) -> None:
        ports = _cluster_ports(masters * 2)
        self.nodes = []
        for port in ports:
            path = workdir / f"node-{port}"
            path.mkdir(parents=True, exist_ok=True)
            self.nodes.append(ClusterNode(path, port))
        self.masters = masters

    @property
    def url(self) -> str:
        """One node's URL, as an operator would give it."""
        return self.nodes[0].url

    @property
    def cluster_url(self) -> str:
        """Every node, as `REDIS_CLUSTER_URL` takes them (a client starts from any live one)."""
        return "redis://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def master_of(self, key: str) -> ClusterNode:
        """The node serving `key`'s slot, as a running node sees the cluster now."""
        slot = key_slot(key.encode())
        live = next(node for node in self.nodes if node.proc is not None)
        for start, end, master, *_ in live.client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == int(master[1]))
        raise AssertionError(f"no node serves slot {slot}")

    def wait_moved(self, key: str, old: ClusterNode, *, timeout: float) -> float:
        """Seconds until a node other than `old` serves `key`'s slot and the cluster is ok."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if self.master_of(key) is not old and self.state_ok():
                    return time.monotonic() - started
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{key}'s slot did not fail over")

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=2)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is needed for this test"
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok(timeout=30)

    def state_ok(self) -> bool:
        """Every running node says the cluster is ok, with all slots served."""
        try:
            for node in self.nodes:
                if node.proc is None:
                    continue
                info = node.client().execute_command("CLUSTER", "INFO").decode()
                fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
                if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != "16384":
                    return False
            return True
        except redis.RedisError:
            return False

    def wait_ok(self, *, timeout: float) -> float:
        """Seconds until `state_ok`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.state_ok():
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError("the Redis Cluster did not reach state ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@contextmanager
def redis_cluster(workdir: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
