"""The worker run in this process against the real PostgreSQL and Redis, for tests that need
jobs actually run (a burst: until nothing is left to do)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from jobs.worker import Worker, WorkerOptions


def run_burst(**options: Any) -> Worker:
    """Run a worker (4 slots, 5 s grace; `options` override any WorkerOptions field) until the
    queue is empty; it must exit 0 within a minute."""
    defaults: dict[str, Any] = {
        "name": f"test-{uuid.uuid4().hex[:6]}",
        "concurrency": 4,
        "burst": True,
        "grace_s": 5,
    }
    worker = Worker(WorkerOptions(**{**defaults, **options}))
    assert asyncio.run(asyncio.wait_for(worker.run(), timeout=60)) == 0
    return worker
