"""The seed's design (/work/shared/seed: Express + Prisma + ioredis), transcribed in plain
psycopg + redis-py so the suite can measure it in the same run, on the same machine:

- enqueue: INSERT one row (autocommit, as Prisma's `create`), then LPUSH its id;
- worker: BRPOP one id, SELECT the row, UPDATE RUNNING (attempts + 1), PUBLISH, run the handler,
  UPDATE COMPLETED, PUBLISH; one job at a time per process;
- updates: every state change is PUBLISHed on one channel that subscribers listen to.

Its own table (`seed_job`, with the seed's two indexes) in the benchmark database and its own
Redis keys under the benchmark prefix. Run as a script it is the worker process:

    python bench/seed_baseline.py worker --database-url URL --redis-url URL --prefix P
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis

TABLE = "seed_job"
MAX_ATTEMPTS = 3
DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id uuid PRIMARY KEY,
    tenant_id text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    status text NOT NULL DEFAULT 'PENDING',
    attempts integer NOT NULL DEFAULT 0,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {TABLE}_tenant_id ON {TABLE} (tenant_id);
CREATE INDEX IF NOT EXISTS {TABLE}_status ON {TABLE} (status);
"""
INSERT = (
    f"INSERT INTO {TABLE} (id, tenant_id, type, payload, status, created_at, updated_at) "
    "VALUES (%s, %s, %s, %s, 'PENDING', now(), now()) RETURNING id"
)
NOOP_PAYLOAD = json.dumps({"delayMs": 0})


@dataclass(frozen=True)
class SeedKeys:
    """The baseline's Redis names, under the benchmark's prefix."""

    prefix: str

    @property
    def queue(self) -> str:
        return f"{self.prefix}:seed:job_queue"

    @property
    def updates(self) -> str:
        return f"{self.prefix}:seed:job_updates"


@dataclass(frozen=True)
class SeedConfig:
    """Where the baseline keeps its state."""

    database_url: str
    redis_url: str
    prefix: str

    @property
    def keys(self) -> SeedKeys:
        return SeedKeys(self.prefix)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)


# --- schema ---------------------------------------------------------------------------------------
def create_table(config: SeedConfig) -> None:
    """Create `seed_job` (and its indexes) if missing, empty."""
    with config.connect() as conn:
        conn.execute(DDL)
        conn.execute(f"TRUNCATE {TABLE}")


def truncate(config: SeedConfig) -> None:
    """Empty `seed_job` and the baseline's queue list."""
    with config.connect() as conn:
        conn.execute(f"TRUNCATE {TABLE}")
    client = config.redis()
    client.delete(config.keys.queue)
    client.close()


def drop_table(config: SeedConfig) -> None:
    """Remove `seed_job` at the end of the suite."""
    with config.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")


def count_by_status(config: SeedConfig) -> dict[str, int]:
    """Rows of `seed_job` per status."""
    with config.connect() as conn:
        rows = conn.execute(f"SELECT status, count(*) FROM {TABLE} GROUP BY status").fetchall()
    return {status: n for status, n in rows}


# --- the API side ---------------------------------------------------------------------------------
def enqueue_single(config: SeedConfig, *, total: int, clients: int, tenant: str) -> float:
    """`total` INSERT + LPUSH from `clients` threads, each with its own connection; jobs/s."""
    client = config.redis()
    per_thread = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    connections = [config.connect() for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def run(conn: psycopg.Connection[Any], count: int) -> None:
        try:
            start.wait(timeout=30)
            for _ in range(count):
                job_id = conn.execute(
                    INSERT, (uuid.uuid4(), tenant, "sleep", NOOP_PAYLOAD)
                ).fetchone()[0]
                client.lpush(config.keys.queue, str(job_id))
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [
        threading.Thread(target=run, args=(conn, n), daemon=True)
        for conn, n in zip(connections, per_thread, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        start.wait(timeout=30)
        began = time.perf_counter()
        for thread in threads:
            thread.join(timeout=600)
        elapsed = time.perf_counter() - began
    finally:
        for conn in connections:
            conn.close()
        client.close()
    if errors:
        raise RuntimeError(f"baseline enqueue failed: {errors[0]!r}")
    return total / elapsed


def enqueue_batches(config: SeedConfig, *, batches: int, size: int, tenant: str) -> float:
    """`batches` transactions of `size` INSERTs (executemany), each followed by one LPUSH of
    all the ids; jobs/s."""
    client = config.redis()
    with config.connect() as conn:
        began = time.perf_counter()
        for _ in range(batches):
            rows = [(uuid.uuid4(), tenant, "sleep", NOOP_PAYLOAD) for _ in range(size)]
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(INSERT, rows, returning=True)
            client.lpush(config.keys.queue, *(str(row[0]) for row in rows))
        elapsed = time.perf_counter() - began
    client.close()
    return batches * size / elapsed


def seed_queued(config: SeedConfig, *, count: int, tenant: str) -> None:
    """Set-up, not measured: `count` PENDING no-op rows (COPY) and their ids in the list."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with config.connect() as conn, conn.cursor() as cur:
        copy_sql = f"COPY {TABLE} (id, tenant_id, type, payload) FROM STDIN"
        with cur.copy(copy_sql) as copy:
            for job_id in ids:
                copy.write_row((job_id, tenant, "sleep", NOOP_PAYLOAD))
    client = config.redis()
    for start in range(0, count, 1000):
        client.lpush(config.keys.queue, *ids[start : start + 1000])
    client.close()


# --- the worker -----------------------------------------------------------------------------------
def process_job(job_type: str, payload: dict[str, Any]) -> None:
    """The seed's processors, as far as the benchmark uses them (sleep)."""
    if job_type == "sleep":
        # Node clamps setTimeout(0) to 1 ms; the transcription does not, to favour the seed.
        delay = float(payload.get("delayMs", 0)) / 1000
        if delay > 0:
            time.sleep(delay)
        return
    raise ValueError(f"Unknown job type: {job_type}")


@dataclass
class WorkerStats:
    """What a baseline worker process reports on exit (one JSON line on stdout)."""

    processed: int = 0
    first_pop: float | None = None
    last_done: float | None = None


def run_worker(
    config: SeedConfig, *, exit_when_idle_s: float | None, stop: threading.Event
) -> WorkerStats:
    """The seed's worker loop, one job at a time, until `stop` is set (or the queue has been
    empty for `exit_when_idle_s` after having had work)."""
    stats = WorkerStats()
    keys = config.keys
    client = config.redis()
    idle_since = time.monotonic()
    with config.connect() as conn:
        while not stop.is_set():
            popped = client.brpop([keys.queue], timeout=0.2)
            if popped is None:
                if exit_when_idle_s is not None:
                    idle_for = time.monotonic() - idle_since
                    # A process that never got a job still waits a little for its first one.
                    limit = exit_when_idle_s if stats.processed else max(exit_when_idle_s, 10)
                    if idle_for > limit:
                        break
                continue
            if stats.first_pop is None:
                stats.first_pop = time.time()
            job_id = popped[1].decode()
            _process_with_lifecycle(conn, client, keys, job_id)
            stats.processed += 1
            stats.last_done = time.time()
            idle_since = time.monotonic()
    client.close()
    return stats


def _publish(client: redis.Redis, keys: SeedKeys, **message: Any) -> None:
    client.publish(keys.updates, json.dumps(message))


def _process_with_lifecycle(
    conn: psycopg.Connection[Any], client: redis.Redis, keys: SeedKeys, job_id: str
) -> None:
    row = conn.execute(
        f"SELECT tenant_id, type, payload, status, attempts FROM {TABLE} WHERE id = %s",
        (job_id,),
    ).fetchone()
    if row is None or row[3] == "COMPLETED":
        return
    tenant, job_type, payload, _status, attempts = row
    if attempts >= MAX_ATTEMPTS:
        _mark_failed(conn, client, keys, job_id, tenant, "Max retry attempts exceeded")
        return
    conn.execute(
        f"UPDATE {TABLE} SET status = 'RUNNING', attempts = attempts + 1, updated_at = now() "
        "WHERE id = %s RETURNING id",
        (job_id,),
    )
    _publish(client, keys, tenantId=tenant, jobId=job_id, status="RUNNING")
    try:
        process_job(job_type, payload)
    except Exception as exc:
        if attempts + 1 >= MAX_ATTEMPTS:
            _mark_failed(conn, client, keys, job_id, tenant, str(exc))
        else:
            conn.execute(
                f"UPDATE {TABLE} SET status = 'PENDING', error = %s, updated_at = now() "
                "WHERE id = %s",
                (str(exc), job_id),
            )
            client.lpush(keys.queue, job_id)
        return
    conn.execute(
        f"UPDATE {TABLE} SET status = 'COMPLETED', updated_at = now() WHERE id = %s RETURNING id",
        (job_id,),
    )
    _publish(client, keys, tenantId=tenant, jobId=job_id, status="COMPLETED")


def _mark_failed(
    conn: psycopg.Connection[Any],
    client: redis.Redis,
    keys: SeedKeys,
    job_id: str,
    tenant: str,
    error: str,
) -> None:
    conn.execute(
        f"UPDATE {TABLE} SET status = 'FAILED', error = %s, updated_at = now() WHERE id = %s",
        (error, job_id),
    )
    _publish(client, keys, tenantId=tenant, jobId=job_id, status="FAILED", error=error)


def worker_command(config: SeedConfig, *, exit_when_idle_s: float | None = None) -> list[str]:
    """The command line that starts one baseline worker process."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "worker",
        "--database-url",
        config.database_url,
        "--redis-url",
        config.redis_url,
        "--prefix",
        config.prefix,
    ]
    if exit_when_idle_s is not None:
        cmd += ["--exit-when-idle", str(exit_when_idle_s)]
    return cmd


def parse_worker_stats(output: str) -> WorkerStats:
    """The stats line a baseline worker printed last."""
    for line in reversed(output.splitlines()):
        if line.startswith("{") and '"processed"' in line:
            return WorkerStats(**json.loads(line))
    raise ValueError("no stats line in the baseline worker's output")


# --- the subscriber side --------------------------------------------------------------------------
def latency(config: SeedConfig, *, trips: int, warmup: int, tenant: str) -> list[float]:
    """Sequential round trips, INSERT + LPUSH to the PUBLISHed COMPLETED, in ms (a baseline
    worker must be running)."""
    client = config.redis()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(config.keys.updates)
    pubsub.get_message(timeout=1.0)  # reads the subscribe confirmation
    samples: list[float] = []
    with config.connect() as conn:
        for i in range(warmup + trips):
            job_id = uuid.uuid4()
            wanted = str(job_id)
            began = time.perf_counter()
            conn.execute(INSERT, (job_id, tenant, "sleep", NOOP_PAYLOAD))
            client.lpush(config.keys.queue, wanted)
            deadline = time.monotonic() + 10
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"baseline: no COMPLETED for {wanted} within 10 s")
                message = pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                update = json.loads(message["data"])
                if update["jobId"] == wanted and update["status"] == "COMPLETED":
                    break
            if i >= warmup:
                samples.append((time.perf_counter() - began) * 1000)
    pubsub.close()
    client.close()
    return samples


async def fanout(
    config: SeedConfig, *, subscribers: int, rounds: int, tenant: str, pause_s: float
) -> list[list[float]]:
    """`subscribers` Redis SUBSCRIBE connections; per round one job is created and the time
    until each subscriber has its COMPLETED is taken (ms). A baseline worker must be running."""
    import redis.asyncio as aioredis

    clients = [aioredis.Redis.from_url(config.redis_url) for _ in range(subscribers)]
    pubsubs = [c.pubsub(ignore_subscribe_messages=True) for c in clients]
    arrivals: dict[str, list[float]] = {}
    done: dict[str, asyncio.Event] = {}

    def event(job_id: str) -> asyncio.Event:
        return done.setdefault(job_id, asyncio.Event())

    async def listen(pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message" or b'"COMPLETED"' not in message["data"]:
                continue
            job_id = json.loads(message["data"])["jobId"]
            got = arrivals.setdefault(job_id, [])
            got.append(time.perf_counter())
            if len(got) == subscribers:
                event(job_id).set()

    for pubsub in pubsubs:
        await pubsub.subscribe(config.keys.updates)
    listeners = [asyncio.create_task(listen(p)) for p in pubsubs]
    producer = config.redis()
    results: list[list[float]] = []
    try:
        with config.connect() as conn:
            for _ in range(rounds + 1):  # the first round warms up
                job_id = uuid.uuid4()
                began = time.perf_counter()
                await asyncio.to_thread(_insert_and_push, conn, producer, config, job_id, tenant)
                await asyncio.wait_for(event(str(job_id)).wait(), timeout=30)
                results.append([(t - began) * 1000 for t in arrivals[str(job_id)]])
                await asyncio.sleep(pause_s)
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        for pubsub, client in zip(pubsubs, clients, strict=True):
            await pubsub.aclose()
            await client.aclose()
        producer.close()
    return results[1:]


def _insert_and_push(
    conn: psycopg.Connection[Any],
    client: redis.Redis,
    config: SeedConfig,
    job_id: uuid.UUID,
    tenant: str,
) -> None:
    conn.execute(INSERT, (job_id, tenant, "sleep", NOOP_PAYLOAD))
    client.lpush(config.keys.queue, str(job_id))


# --- entry point of the worker process ------------------------------------------------------------
def _install_stop(stop: threading.Event) -> Callable[[], None]:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def main() -> int:
    parser = argparse.ArgumentParser(description="The seed's worker, transcribed.")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("--database-url", required=True)
    worker.add_argument("--redis-url", required=True)
    worker.add_argument("--prefix", required=True)
    worker.add_argument("--exit-when-idle", type=float, default=None)
    args = parser.parse_args()
    config = SeedConfig(args.database_url, args.redis_url, args.prefix)
    stop = threading.Event()
    restore = _install_stop(stop)
    try:
        stats = run_worker(config, exit_when_idle_s=args.exit_when_idle, stop=stop)
    finally:
        restore()
    print(json.dumps(stats.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
