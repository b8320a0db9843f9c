"""Listen to a tenant's job updates from a sync test: a background thread subscribed to the
tenant's Redis channel collects every JOB_UPDATE the service publishes (from any process)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from django.conf import settings

from realtime.hub import updates_channel


class UpdateListener:
    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.last_at = time.monotonic()

    def statuses(self, job_id: str) -> list[str]:
        with self.lock:
            return [u["status"] for u in self.updates if u["jobId"] == str(job_id)]

    def settle(self, quiet_s: float = 0.5, timeout: float = 10) -> list[dict[str, Any]]:
        """Wait until no update arrived for `quiet_s`; every update received so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last_at < quiet_s and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.lock:
            return list(self.updates)


@contextmanager
def listen_to_tenant(tenant_id: str) -> Iterator[UpdateListener]:
    listener = UpdateListener()
    client = redis.Redis.from_url(settings.REDIS_URL)
    pubsub = client.pubsub()
    pubsub.subscribe(updates_channel(settings.JOBS["REDIS_PREFIX"], tenant_id))
    confirmed = pubsub.get_message(timeout=10)
    assert confirmed and confirmed["type"] == "subscribe", "could not subscribe"
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message is None or message["type"] != "message":
                continue
            frames = [json.loads(text) for text in message["data"].decode().split("\n")]
            with listener.lock:
                listener.updates.extend(frames)
                listener.last_at = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        stop.set()
        thread.join(10)
        pubsub.close()
        client.close()
