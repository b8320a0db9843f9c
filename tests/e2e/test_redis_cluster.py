"""Redis Cluster is not supported yet (docs/scaling.md): a worker pointed at a cluster node says
so and stops at once, rather than failing on every script call or retrying for ever."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.redis_cluster import redis_cluster
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_worker_on_a_redis_cluster_node_stops_and_says_why(stack: Stack, tmp_path: Path) -> None:
    with redis_cluster(tmp_path / "cluster") as cluster:
        stack.use_redis(cluster.url)
        worker = stack.start_worker()
        code = worker.wait(timeout=30)
    assert code == 2
    log = stack.log("e2e-worker")
    assert "Redis Cluster is not supported yet" in log
    assert "start-up failed" not in log  # no retrying
