"""Listen to a tenant's channel-layer group from a sync test: a background thread with its own
event loop collects every JOB_UPDATE the service broadcasts (from any process)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from channels.layers import get_channel_layer

from realtime.broadcast import tenant_group


class UpdateListener:
    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def statuses(self, job_id: str) -> list[str]:
        with self.lock:
            return [u["status"] for u in self.updates if u["jobId"] == str(job_id)]


@contextmanager
def listen_to_tenant(tenant_id: str) -> Iterator[UpdateListener]:
    listener = UpdateListener()
    ready = threading.Event()
    stop = threading.Event()

    async def run() -> None:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(tenant_group(tenant_id), channel)
        ready.set()
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(layer.receive(channel), timeout=0.2)
            except TimeoutError:
                continue
            with listener.lock:
                listener.updates.extend(message["updates"])
        await layer.group_discard(tenant_group(tenant_id), channel)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(10), "could not join the tenant's group"
    try:
        yield listener
    finally:
        stop.set()
        thread.join(10)
