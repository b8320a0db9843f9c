"""The suite's clients of the real service: REST load with httpx and WebSocket subscribers with
`websockets`, all in one asyncio loop of the benchmark process, talking to 127.0.0.1 only.

The WebSocket figures also run against the seed tutorial's Node transcription (`seed=True`): no
API key (an empty `key`), `tenantId` in the body of `POST /jobs`, a plain `/ws` socket that is
sent `SUBSCRIBE` and never acknowledges it, and the same `JOB_UPDATE` frames."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from websockets.asyncio.client import ClientConnection, connect

T = TypeVar("T")
NOOP_JOB = {"type": "sleep", "payload": {"delayMs": 0}}
COMPLETED_MARK = '"COMPLETED"'
# The seed never acknowledges SUBSCRIBE: after subscribing, wait this long before creating jobs.
SEED_SUBSCRIBE_SETTLE_S = 0.5


@dataclass
class HttpLoad:
    """Outcome of a burst of requests: wall time, answers by status, client CPU spent, and the
    jobs the service accepted (only those count towards jobs/s)."""

    elapsed_s: float
    statuses: dict[int, int]
    client_cpu_s: float
    jobs: int
    warmup_jobs: int = 0

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.elapsed_s


def _client(base_url: str, key: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}"} if key else {},
        limits=limits,
        timeout=60,
    )


async def post_jobs(
    base_url: str,
    key: str,
    *,
    total: int,
    clients: int,
    warmup: int,
    for_s: float | None = None,
) -> HttpLoad:
    """`total` POST /jobs from `clients` concurrent keep-alive connections (after `warmup`
    untimed ones), each one a no-op sleep job; stops early after `for_s` seconds if given."""
    body = json.dumps(NOOP_JOB).encode()
    headers = {"Content-Type": "application/json"}
    statuses: dict[int, int] = {}
    async with _client(base_url, key, clients) as client:

        async def one() -> None:
            response = await client.post("/jobs", content=body, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(one() for _ in range(warmup)))
        warmup_jobs = statuses.get(201, 0)
        statuses.clear()
        remaining = total

        stop_at = None if for_s is None else time.monotonic() + for_s

        async def loop() -> None:
            nonlocal remaining
            while remaining > 0 and (stop_at is None or time.monotonic() < stop_at):
                remaining -= 1
                await one()

        cpu = time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu
    return HttpLoad(elapsed, statuses, cpu, statuses.get(201, 0), warmup_jobs)


async def post_batches(base_url: str, key: str, *, batches: int, size: int) -> HttpLoad:
    """`batches` sequential POST /jobs/batch of `size` no-op jobs each (one warm-up first)."""
    body = json.dumps({"jobs": [NOOP_JOB] * size}).encode()
    headers = {"Content-Type": "application/json"}
    statuses: dict[int, int] = {}
    async with _client(base_url, key, 1) as client:
        warm = await client.post("/jobs/batch", content=body, headers=headers)
        warmup_jobs = size if warm.status_code == 201 else 0
        cpu = time.process_time()
        began = time.perf_counter()
        for _ in range(batches):
            response = await client.post("/jobs/batch", content=body, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu
    return HttpLoad(elapsed, statuses, cpu, statuses.get(201, 0) * size, warmup_jobs)


async def create_job_ids(base_url: str, key: str, *, count: int) -> list[str]:
    """`count` no-op jobs created with POST /jobs/batch (up to 1,000 a request); their ids."""
    ids: list[str] = []
    async with _client(base_url, key, 1) as client:
        while len(ids) < count:
            size = min(1000, count - len(ids))
            response = await client.post("/jobs/batch", json={"jobs": [NOOP_JOB] * size})
            if response.status_code != 201:
                raise RuntimeError(
                    f"POST /jobs/batch answered {response.status_code}: {response.text[:200]}"
                )
            ids += response.json()["jobIds"]
    return ids


# --- WebSocket subscribers ------------------------------------------------------------------------
@dataclass
class CompletedArrivals:
    """When each subscriber saw each job's COMPLETED frame (perf_counter seconds)."""

    expected: int
    times: dict[str, list[float]] = field(default_factory=dict)
    events: dict[str, asyncio.Event] = field(default_factory=dict)

    def event(self, job_id: str) -> asyncio.Event:
        return self.events.setdefault(job_id, asyncio.Event())

    def record(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            raw = raw.decode()
        # Cheap test first: most frames (PENDING, RUNNING) are skipped without parsing.
        if COMPLETED_MARK not in raw:
            return
        now = time.perf_counter()
        message = json.loads(raw)
        if message.get("type") != "JOB_UPDATE" or message.get("status") != "COMPLETED":
            return
        job_id = message["jobId"]
        seen = self.times.setdefault(job_id, [])
        seen.append(now)
        if len(seen) >= self.expected:
            self.event(job_id).set()

    async def wait(self, job_id: str, within_s: float) -> list[float]:
        """All arrivals of `job_id`'s COMPLETED; raises TimeoutError naming how many came."""
        try:
            await asyncio.wait_for(self.event(job_id).wait(), timeout=within_s)
        except TimeoutError:
            got = len(self.times.get(job_id, []))
            raise TimeoutError(
                f"only {got} of {self.expected} subscribers got COMPLETED of {job_id} "
                f"within {within_s:g}s"
            ) from None
        return self.times[job_id]


async def subscribe(ws_url: str, key: str, tenant: str, *, seed: bool = False) -> ClientConnection:
    """One socket: connect with the key, SUBSCRIBE to the tenant, wait for SUBSCRIBED. The
    seed's socket: connect, wait for its CONNECTED greeting, SUBSCRIBE (it sends no answer)."""
    ws = await connect(
        ws_url if seed else f"{ws_url}?token={key}",
        ping_interval=None,
        open_timeout=60,
        close_timeout=5,
        max_queue=None,
    )
    try:
        if seed:
            async with asyncio.timeout(60):
                while json.loads(await ws.recv()).get("type") != "CONNECTED":
                    pass
            await ws.send(json.dumps({"type": "SUBSCRIBE", "tenantId": tenant}))
            return ws
        await ws.send(json.dumps({"type": "SUBSCRIBE", "tenantId": tenant}))
        async with asyncio.timeout(60):
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("type") == "SUBSCRIBED":
                    return ws
                if frame.get("type") == "ERROR":
                    raise RuntimeError(f"SUBSCRIBE refused: {frame}")
    except BaseException:
        ws.transport.abort()
        raise


async def open_subscribers(
    ws_url: str, key: str, tenant: str, *, count: int, parallel: int = 50, seed: bool = False
) -> list[ClientConnection]:
    """`count` subscribed sockets, opened `parallel` at a time (a handshake storm is not what
    is measured)."""
    gate = asyncio.Semaphore(parallel)

    async def one() -> ClientConnection:
        async with gate:
            return await subscribe(ws_url, key, tenant, seed=seed)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    sockets = [r for r in results if isinstance(r, ClientConnection)]
    failures = [r for r in results if not isinstance(r, ClientConnection)]
    if failures:
        await close_all(sockets)
        raise RuntimeError(f"{len(failures)} of {count} sockets failed: {failures[0]!r}")
    return sockets


async def close_all(sockets: list[ClientConnection], within_s: float = 30) -> None:
    """Close sockets politely, then drop whatever has not closed after `within_s`."""
    try:
        async with asyncio.timeout(within_s):
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    except TimeoutError:
        for ws in sockets:
            ws.transport.abort()


async def _read_into(ws: ClientConnection, arrivals: CompletedArrivals) -> None:
    async for raw in ws:
        arrivals.record(raw)


class Refused(Exception):
    """The service answered 503 (it could not reach its database): the trip is not counted."""


async def _create_job(client: httpx.AsyncClient, seed_tenant: str | None = None) -> str:
    """POST one no-op job; the seed takes its tenant in the body."""
    body = NOOP_JOB if seed_tenant is None else {"tenantId": seed_tenant, **NOOP_JOB}
    response = await client.post("/jobs", json=body)
    if response.status_code == 503:
        raise Refused(response.text[:200])
    if response.status_code != 201:
        raise RuntimeError(f"POST /jobs answered {response.status_code}: {response.text[:200]}")
    return response.json()["jobId"]


@dataclass(frozen=True)
class Trip:
    """One latency round trip: when the POST left (wall clock, to compare with the row's
    timestamps), how long until its answer and until the COMPLETED frame (ms)."""

    job_id: str
    sent_at: float
    answered_ms: float
    completed_ms: float


async def ws_latency(
    base_url: str,
    ws_url: str,
    key: str,
    tenant: str,
    *,
    trips: int,
    warmup: int,
    refused: list[str],
    seed: bool = False,
) -> list[Trip]:
    """Sequential round trips, POST /jobs to its COMPLETED frame on a subscribed socket. A
    POST refused with 503 is noted in `refused` and tried again (that trip is timed anew)."""
    ws = await subscribe(ws_url, key, tenant, seed=seed)
    if seed:
        await asyncio.sleep(SEED_SUBSCRIBE_SETTLE_S)
    seed_tenant = tenant if seed else None
    arrivals = CompletedArrivals(expected=1)
    reader = asyncio.create_task(_read_into(ws, arrivals))
    samples: list[Trip] = []
    try:
        async with _client(base_url, key, 1) as client:
            for i in range(warmup + trips):
                while True:
                    sent_at = time.time()
                    began = time.perf_counter()
                    try:
                        job_id = await _create_job(client, seed_tenant)
                        break
                    except Refused as exc:
                        refused.append(str(exc))
                        if len(refused) > trips:
                            raise RuntimeError("POST /jobs refused too often") from exc
                        await asyncio.sleep(0.05)
                answered = time.perf_counter()
                # The first warm-up trip may wait for the worker to finish starting.
                seen = await arrivals.wait(job_id, within_s=60 if i == 0 else 10)
                if i >= warmup:
                    samples.append(
                        Trip(job_id, sent_at, (answered - began) * 1000, (seen[0] - began) * 1000)
                    )
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await close_all([ws])
    return samples


async def ws_fanout(
    base_url: str,
    ws_url: str,
    key: str,
    tenant: str,
    *,
    subscribers: int,
    rounds: int,
    pause_s: float,
    refused: list[str],
    seed: bool = False,
) -> list[list[float]]:
    """`subscribers` sockets of one tenant; per round one job is created and the time from the
    POST until each socket has its COMPLETED frame is taken (ms). The first round warms up.
    A POST refused with 503 is noted in `refused` and tried again, timed from the last try."""
    sockets = await open_subscribers(ws_url, key, tenant, count=subscribers, seed=seed)
    if seed:
        await asyncio.sleep(SEED_SUBSCRIBE_SETTLE_S)
    seed_tenant = tenant if seed else None
    arrivals = CompletedArrivals(expected=subscribers)
    readers = [asyncio.create_task(_read_into(ws, arrivals)) for ws in sockets]
    results: list[list[float]] = []
    try:
        async with _client(base_url, key, 1) as client:
            for i in range(rounds + 1):
                while True:
                    began = time.perf_counter()
                    try:
                        job_id = await _create_job(client, seed_tenant)
                        break
                    except Refused as exc:
                        refused.append(str(exc))
                        if len(refused) > 10 * (rounds + 1):
                            raise RuntimeError("POST /jobs refused too often") from exc
                        await asyncio.sleep(0.05)
                seen = await arrivals.wait(job_id, within_s=60 if i == 0 else 30)
                results.append([(t - began) * 1000 for t in seen])
                await asyncio.sleep(pause_s)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await close_all(sockets)
    return results[1:]


async def with_idle_sockets(
    ws_url: str, key: str, tenant: str, *, count: int, measure: Callable[[], Awaitable[T]]
) -> T:
    """Hold `count` subscribed, silent sockets open while `measure` runs; close them after."""
    sockets = await open_subscribers(ws_url, key, tenant, count=count, parallel=100)
    try:
        return await measure()
    finally:
        await close_all(sockets, within_s=60)


def jobs_per_s(load: HttpLoad) -> dict[str, Any]:
    """The JSON record of one load sample."""
    return {
        "jobs_per_s": load.jobs_per_s,
        "elapsed_s": load.elapsed_s,
        "statuses": load.statuses,
        "client_cpu_s": load.client_cpu_s,
        "jobs": load.jobs,
        "warmup_jobs": load.warmup_jobs,
    }
