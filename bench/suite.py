"""Performance of the whole service against the seed, measured side by side in the same run.

Starts the real stack (`Stack.start_api()`, `runworker_jobs`) as subprocesses on the benchmark
database and a Redis prefix of its own, and the seed tutorial's Node transcription
(`bench/seed_node.py`) on a database and Redis db index of its own, and measures: http (POST /jobs,
16 keep-alive connections, with wrk), enqueue (POST /jobs/batch of 1,000), get (GET /jobs/{id} with
wrk), latency (POST to the COMPLETED frame on a WebSocket), fan-out (1,000 subscribers of one
tenant), load (64 and 256 connections held on POST /jobs: 5xx and socket errors), drain (no-op jobs
already queued, 1 and 2 worker processes) and memory (worker RSS while draining, the API's RSS with
5,000 idle sockets). Every figure is the median of `--runs` interleaved runs. The first table
compares it with the seed (Node); the second with `bench/seed_baseline.py`, the seed's design in
plain Python without HTTP (the drain's baseline). Prints both and writes JSON to bench/results/.

    uv run python bench/suite.py [--runs 3] [--quick] [--only http latency] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clients
import psycopg
import seed_baseline as seed
import seed_node
import wrk
from common import (
    RESULTS,
    median,
    percentile,
    raise_fd_limit,
    setup_django,
    write_results,
)
from profile_summary import summarise
from stack import (
    SECRET_KEY,
    CpuSnapshot,
    Process,
    Stack,
    clean_prefix,
    log_problems,
    rss_kib,
    running_stack,
    server_pids,
    truncate_tables,
)

FIGURES = ("http", "enqueue", "get", "latency", "fanout", "load", "drain", "memory")
TENANT = "bench-suite"
# SIGTERM to the API right after load: it must exit within this, else it is killed (and noted).
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does; `--quick` shrinks them."""

    requests: int = 3000  # POST /jobs of `--profile`'s API load (the http figure is timed)
    clients: int = 16
    http_seconds: float = 10.0
    http_warmup_s: float = 2.0
    get_ids: int = 100
    load_connections: tuple[int, ...] = (64, 256)
    load_seconds: float = 30.0
    seed_drain_jobs: int = 5000
    batch_size: int = 1000
    batches: int = 10
    drain_jobs: int = 20_000
    concurrency: int = 50
    latency_trips: int = 300
    subscribers: int = 1000
    fanout_rounds: int = 5
    fanout_pause_s: float = 1.0
    idle_sockets: int = 5000


QUICK = Sizes(
    requests=500,
    http_seconds=5.0,
    http_warmup_s=1.0,
    load_seconds=8.0,
    seed_drain_jobs=1000,
    batches=3,
    drain_jobs=3000,
    latency_trips=100,
    subscribers=300,
    fanout_rounds=3,
    idle_sockets=1000,
)


@dataclass
class Profiling:
    """py-spy processes recording one process, and what they write."""

    name: str
    pid: int
    processes: list[subprocess.Popen[bytes]]
    files: dict[str, Path]
    started: datetime
    seconds: int
    rate: int


@dataclass(frozen=True)
class Row:
    """One line of a table: a figure of ours, its baseline (the seed, or the Python design) and
    the issue's target. `met` answers True/False, or a word of its own ("n/a")."""

    label: str
    unit: str
    ours: float | None
    baseline: float | None
    target: str
    met: Callable[[float, float | None], bool | str] | None = None
    has_ratio: bool = True  # counts (5xx, errors) have none

    @property
    def ratio(self) -> float | None:
        if not self.has_ratio or self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    @property
    def verdict(self) -> str:
        if self.met is None:
            return ""
        if self.ours is None:
            return "n/a"
        met = self.met(self.ours, self.baseline)
        if isinstance(met, str):
            return met
        return "yes" if met else "NO"


def _at_most_seed_and(limit: float) -> Callable[[float, float | None], bool | str]:
    """Target `<= the seed's, and <= limit` (n/a without the seed)."""
    return lambda v, b: "n/a" if b is None else (v <= b and v <= limit)


def _seed_ratio(required: float, aim: float) -> Callable[[float, float | None], bool | str]:
    """Target `>= required x the seed` with an aim above it."""

    def met(v: float, b: float | None) -> bool | str:
        if not b:
            return "n/a"
        if v >= aim * b:
            return "yes (aim)"
        return v >= required * b

    return met


class Suite:
    """Runs the figures and keeps every raw sample; one instance per invocation."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        from django.conf import settings

        from jobs.models import Job

        self.args = args
        self.sizes = sizes
        self.database_url = os.environ["DATABASE_URL"]
        self.redis_url = settings.REDIS_URL
        self.prefix = settings.JOBS_REDIS_PREFIX
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.log_dir = RESULTS / f"logs-{self.stamp}"
        self.seed = seed.SeedConfig(self.database_url, self.redis_url, self.prefix)
        self.job_table = Job._meta.db_table
        self.database_name = self.database_url.rsplit("/", 1)[-1]
        self.service_role = f"{self.database_name}_service"
        self.service_database_url = self.database_url
        self.samples: dict[str, list[Any]] = {}
        self.problems: list[str] = []
        self.key = ""
        # The seed (Node): set up in `prepare`; None if --no-seed-node or its set-up failed.
        self.node: seed_node.SeedNode | None = None

    # --- set-up and clean-up ------------------------------------------------------------------
    def prepare(self) -> None:
        """The benchmark tenant and its API key, the baseline's table, an empty prefix."""
        from jobs.models import ApiKey, Tenant
        from jobs.services import api_key_create, tenant_create

        tenant = Tenant.objects.filter(id=TENANT).first() or tenant_create(
            tenant_id=TENANT, name="Benchmark suite"
        )
        ApiKey.objects.filter(tenant=tenant).delete()
        _, self.key = api_key_create(tenant=tenant, name="bench")
        seed.create_table(self.seed)
        self.service_database_url = self._service_role()
        self.reset()
        if not self.args.no_seed_node:
            self._prepare_seed_node()

    def _prepare_seed_node(self) -> None:
        """Copy and set up the seed (Node) once; without it the seed's columns stay empty."""
        node = seed_node.SeedNode.on_servers_of(
            self.database_url, self.redis_url, self.log_dir / "seed-node-setup"
        )
        try:
            began = time.monotonic()
            ran = node.setup()
            foreign = node.foreign_state()
        except Exception as exc:
            self.problems.append(f"seed (Node) set-up failed, its figures are left out: {exc!r}")
            print(f"seed (Node) set-up FAILED: {exc!r}", file=sys.stderr, flush=True)
            return
        blocking = [f for f in foreign if "other keys" in f]
        self.problems += foreign
        if blocking:
            self.problems.append(
                "seed (Node) left out: its Redis db index is in use (set SEED_NODE_REDIS_DB)"
            )
            return
        node.reset()
        self.node = node
        self.say(
            f"seed (Node): {node.root} ({'set up' if ran else 'up to date'} in "
            f"{time.monotonic() - began:.0f}s), {node.database_url}, {node.redis_url}"
        )

    @contextmanager
    def seed_run(self, name: str) -> Iterator[seed_node.SeedNode]:
        """The seed (Node) for one sample: empty table and queue, its processes stopped after."""
        assert self.node is not None
        node = replace(self.node, log_dir=self.log_dir / name, processes=[], port=0)
        node.reset()
        with seed_node.running(node):
            yield node

    def both(self, run: int, ours: Callable[[int], None], seeds: Callable[[int], None]) -> None:
        """Ours and the seed (Node) for one run; the order alternates run by run, so that
        neither side always goes first on a warming (or cooling) machine."""
        steps = [("ours", ours)] if self.node is None else [("ours", ours), ("seed", seeds)]
        if run % 2 == 0:
            steps.reverse()
        failures = []
        for side, step in steps:
            # One side failing does not skip the other; the figure still counts as failed.
            try:
                step(run)
            except Exception as exc:
                failures.append(f"{side}: {exc!r}")
        if failures:
            raise RuntimeError("; ".join(failures))

    def _service_role(self) -> str:
        """A login role of the benchmark's own (not a superuser) for the service's processes,
        with a connection limit: the service cannot take the shared server's last connections,
        which superusers may. Returns the service's DATABASE_URL (as is if the limit is -1)."""
        limit = int(self.args.db_connection_limit)
        if limit < 0:
            return self.database_url
        role = self.service_role
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f'ALTER ROLE "{role}" NOSUPERUSER LOGIN CONNECTION LIMIT {limit}')
            else:
                conn.execute(f'CREATE ROLE "{role}" NOSUPERUSER LOGIN CONNECTION LIMIT {limit}')
            conn.execute(f'GRANT ALL ON SCHEMA public TO "{role}"')
            conn.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
            conn.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        scheme, rest = self.database_url.split("://", 1)
        return f"{scheme}://{role}@{rest.split('@', 1)[-1]}"

    def _drop_service_role(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            if conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (self.service_role,)
            ).fetchone():
                conn.execute(f'DROP OWNED BY "{self.service_role}"')
                conn.execute(f'DROP ROLE "{self.service_role}"')

    def reset(self) -> None:
        """Between samples (no process running): no jobs, no seed jobs, no keys of the prefix."""
        truncate_tables(self.database_url, [self.job_table, seed.TABLE])
        self._clean_prefix()

    def cleanup(self) -> None:
        """At the end: the benchmark's rows, tables and Redis keys are gone."""
        from django.apps import apps

        tables = [m._meta.db_table for m in apps.get_app_config("jobs").get_models()]
        try:
            truncate_tables(self.database_url, tables)
            seed.drop_table(self.seed)
            if self.service_database_url != self.database_url:
                self._drop_service_role()
            if self.node is not None:
                # Its database and the npm install are kept for the next run; rows and queue go.
                self.node.reset()
        finally:
            self._clean_prefix()

    def _clean_prefix(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            clean_prefix(client, self.prefix)
        finally:
            client.close()

    def stack(self, name: str) -> Any:
        return running_stack(
            database_url=self.service_database_url,
            redis_url=self.redis_url,
            prefix=self.prefix,
            log_dir=self.log_dir / name,
            api_processes=self.args.api_processes,
        )

    def attempt(self, what: str, step: Callable[..., None], *args: Any) -> bool:
        """Run one figure; a failure is reported and the suite goes on. True if it failed."""
        began = time.monotonic()
        try:
            step(*args)
        except Exception as exc:
            self.problems.append(f"{what} failed: {exc!r}")
            print(f"{what} FAILED: {exc!r}", file=sys.stderr, flush=True)
            return True
        finally:
            self.samples.setdefault("step_seconds", []).append(
                {"step": what, "seconds": time.monotonic() - began}
            )
        return False

    def record(self, key: str, value: Any) -> None:
        """Keep one raw sample, and the machine's load when it was taken (the machine may be
        shared: a load above the CPU count means the sample competed for CPU)."""
        self.samples.setdefault(key, []).append(value)
        self.samples.setdefault("loadavg", []).append({"sample": key, "load": os.getloadavg()})

    def say(self, message: str) -> None:
        print(message, flush=True)

    # --- HTTP with wrk ------------------------------------------------------------------------
    def _wrk(self, url: str, where: str, name: str, **kwargs: Any) -> wrk.WrkResult:
        """One wrk run; its script and output go to the logs of `where`."""
        kwargs.setdefault("count_statuses", self.args.wrk_count_statuses)
        return wrk.run(
            url,
            log_path=self.log_dir / where / f"wrk-{name}.log",
            threads=self.args.wrk_threads,
            timeout_s=self.args.wrk_timeout,
            **kwargs,
        )

    def _warm_up(self, url: str, where: str, request: dict[str, Any]) -> wrk.WrkResult:
        """The untimed wrk run before a measured one, at the measured connection count."""
        s = self.sizes
        return self._wrk(
            url, where, "warmup", connections=s.clients, seconds=s.http_warmup_s, **request
        )

    def _post_job_request(self, *, seed_side: bool) -> dict[str, Any]:
        """wrk's request for POST /jobs: ours authenticates with the key, the seed takes the
        tenant in the body."""
        headers = {"Content-Type": "application/json"}
        if seed_side:
            body = {"tenantId": TENANT, **clients.NOOP_JOB}
        else:
            body = dict(clients.NOOP_JOB)
            headers["Authorization"] = f"Bearer {self.key}"
        return {"method": "POST", "body": json.dumps(body), "headers": headers}

    def _stop_api(self, stack: Stack, figure: str, run: int) -> dict[str, Any]:
        """SIGTERM to every process of the stack right after load, each one's exit timed; one
        still running after STOP_GRACE_S is killed and noted (a deploy's SIGTERM would hang)."""
        procs = [p for p in stack.processes if p.alive()]
        began = time.monotonic()
        for proc in procs:
            proc.popen.send_signal(signal.SIGTERM)
        exit_s: dict[str, float | None] = {}
        pending = list(procs)
        while pending and time.monotonic() - began < STOP_GRACE_S:
            for proc in list(pending):
                if proc.popen.poll() is not None:
                    exit_s[f"{proc.label}[{proc.pid}]"] = time.monotonic() - began
                    pending.remove(proc)
            time.sleep(0.02)
        for proc in pending:
            proc.popen.kill()
            proc.popen.wait(timeout=10)
            exit_s[f"{proc.label}[{proc.pid}]"] = None
        killed = [f"{p.label}[{p.pid}]" for p in pending]
        sample = {"figure": figure, "run": run, "exit_s": exit_s, "killed": killed}
        self.record("api_stop", sample)
        if killed:
            self.problems.append(
                f"run {run} {figure}: {', '.join(killed)} did not exit within "
                f"{STOP_GRACE_S:g}s of SIGTERM right after load (killed)"
            )
        return sample

    def _http_sample(
        self, what: str, timed: wrk.WrkResult, warm: wrk.WrkResult, rows: int
    ) -> dict[str, Any]:
        """The record of one POST /jobs run: jobs/s counts answers below 400 (all 201s: each
        has its row, checked against the table, where requests still in flight when wrk stopped
        may add up to one row per connection and run)."""
        accepted = warm.answered_below_400 + timed.answered_below_400
        slack = warm.connections + timed.connections
        if not accepted <= rows <= accepted + slack:
            self.problems.append(
                f"{what}: wrk counted {accepted} accepted POST /jobs, the table has {rows} rows"
            )
        if timed.errors["status"]:
            self.problems.append(f"{what}: {timed.errors['status']} answers >= 400")
        if timed.socket_errors:
            self.problems.append(f"{what}: socket errors {timed.errors}")
        created = timed.count(201, 202)
        return {
            **timed.as_dict(),
            "jobs_per_s": timed.ok_per_s if created is None else created / timed.duration_s,
            "rows": rows,
            "warmup": warm.as_dict(),
        }

    def _say_http(self, run: int, side: str, sample: dict[str, Any]) -> None:
        latency = sample["latency_ms"]
        self.say(
            f"run {run} http {side}: POST /jobs {sample['jobs_per_s']:8.0f} jobs/s, p50 "
            f"{latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms ({sample['connections']} "
            f"connections, {sample['duration_s']:.1f}s, wrk CPU {sample['client_cpu_s']:.1f}s)"
        )

    def http(self, run: int) -> None:
        """POST /jobs with wrk, 16 keep-alive connections, no worker: ours and the seed."""
        self.both(run, self._http_ours, self._http_seed)

    def _http_ours(self, run: int) -> None:
        s = self.sizes
        self.reset()
        where = f"http-{run}"
        request = self._post_job_request(seed_side=False)
        with self.stack(where) as stack:
            stack.start_api()
            url = f"{stack.base_url}/jobs"
            warm = self._warm_up(url, where, request)
            timed = self._wrk(
                url, where, "post-jobs", connections=s.clients, seconds=s.http_seconds, **request
            )
            stop = self._stop_api(stack, "http", run)
        sample = self._http_sample(f"run {run} http ours", timed, warm, self._job_rows())
        sample["stop"] = stop
        self.record("http_ours", sample)
        self._say_http(run, "ours", sample)

    def _http_seed(self, run: int) -> None:
        s = self.sizes
        where = f"seed-http-{run}"
        request = self._post_job_request(seed_side=True)
        with self.seed_run(where) as node:
            node.start_backend()
            url = f"{node.base_url}/jobs"
            warm = self._warm_up(url, where, request)
            timed = self._wrk(
                url, where, "post-jobs", connections=s.clients, seconds=s.http_seconds, **request
            )
            rows = node.row_count()
        sample = self._http_sample(f"run {run} http seed", timed, warm, rows)
        self.record("http_seed", sample)
        self._say_http(run, "seed", sample)

    def _job_rows(self) -> int:
        from jobs.models import Job

        return Job.objects.count()

    # --- enqueue ------------------------------------------------------------------------------
    def enqueue(self, run: int) -> None:
        """POST /jobs/batch of 1,000, no worker (the seed has no batch endpoint); then the
        Python baseline's executemany of 1,000 as a floor."""
        s = self.sizes
        self.reset()
        with self.stack(f"enqueue-{run}") as stack:
            stack.start_api()
            batch = asyncio.run(
                clients.post_batches(stack.base_url, self.key, batches=s.batches, size=s.batch_size)
            )
        self._check_statuses(f"run {run} enqueue batch", batch.statuses, 201)
        # Every accepted job has its row, and no refused one has (nothing half-created).
        self._check_rows(batch.jobs + batch.warmup_jobs, status=None, what="enqueued jobs")
        self.record("enqueue_batch", clients.jobs_per_s(batch))

        self.reset()
        base_batch = seed.enqueue_batches(
            self.seed, batches=s.batches, size=s.batch_size, tenant=TENANT
        )
        self.record("baseline_enqueue_batch", base_batch)
        self.say(
            f"run {run} enqueue: batch {batch.jobs_per_s:8.0f} jobs/s "
            f"(Python baseline {base_batch:8.0f})"
        )

    # --- GET /jobs/{id} -----------------------------------------------------------------------
    def get(self, run: int) -> None:
        """GET /jobs/{id} with wrk, 16 keep-alive connections, cycling through `get_ids` jobs
        made first with one batch (ours only: the seed has no such route)."""
        s = self.sizes
        self.reset()
        where = f"get-{run}"
        with self.stack(where) as stack:
            stack.start_api()
            ids = asyncio.run(clients.create_job_ids(stack.base_url, self.key, count=s.get_ids))
            request = {
                "method": "GET",
                "headers": {"Authorization": f"Bearer {self.key}"},
                "paths": [f"/jobs/{job_id}" for job_id in ids],
            }
            url = f"{stack.base_url}/jobs/{ids[0]}"
            warm = self._warm_up(url, where, request)
            timed = self._wrk(
                url, where, "get-job", connections=s.clients, seconds=s.http_seconds, **request
            )
            stop = self._stop_api(stack, "get", run)
        if timed.errors["status"] or timed.socket_errors:
            self.problems.append(
                f"run {run} get: {timed.errors['status']} answers >= 400, errors {timed.errors}"
            )
        sample = {
            **timed.as_dict(),
            "requests_per_s": timed.ok_per_s,
            "ids": len(ids),
            "warmup": warm.as_dict(),
            "stop": stop,
        }
        self.record("get_ours", sample)
        latency = timed.latency_ms
        self.say(
            f"run {run} get: GET /jobs/{{id}} {timed.ok_per_s:8.0f} requests/s, p50 "
            f"{latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms"
        )

    # --- load held ----------------------------------------------------------------------------
    def load(self, run: int) -> None:
        """POST /jobs held at 64 and 256 keep-alive connections for `load_seconds` each, no
        worker; answers counted by status (wrk's `response` hook), socket errors; then the
        API's exit on SIGTERM is timed. Ours, and the seed for contrast."""
        self.both(run, self._load_ours, self._load_seed)

    def _load_levels(self, url: str, where: str, request: dict[str, Any]) -> dict[str, Any]:
        s = self.sizes
        warm = self._warm_up(url, where, request)
        levels: dict[str, Any] = {}
        for connections in s.load_connections:
            result = self._wrk(
                url,
                where,
                f"load-{connections}",
                connections=connections,
                seconds=s.load_seconds,
                count_statuses=True,
                **request,
            )
            ok = result.count(200, 300) or 0
            levels[str(connections)] = {
                **result.as_dict(),
                "5xx": result.count(500, 600),
                "2xx": ok,
                "jobs_per_s": ok / result.duration_s if result.duration_s else 0.0,
            }
        return {"warmup": warm.as_dict(), "levels": levels}

    def _say_load(self, run: int, side: str, sample: dict[str, Any]) -> None:
        parts = []
        for connections, level in sample["levels"].items():
            parts.append(
                f"{connections} connections {level['jobs_per_s']:.0f} jobs/s, 5xx "
                f"{level['5xx']}, socket errors {level['socket_errors']}, statuses "
                f"{level['statuses']}, p99 {level['latency_ms']['p99']:.0f} ms"
            )
        self.say(f"run {run} load {side}: " + "; ".join(parts))

    def _load_ours(self, run: int) -> None:
        self.reset()
        where = f"load-{run}"
        with self.stack(where) as stack:
            stack.start_api()
            request = self._post_job_request(seed_side=False)
            sample = self._load_levels(f"{stack.base_url}/jobs", where, request)
            sample["stop"] = self._stop_api(stack, "load", run)
        self.record("load_ours", sample)
        self._say_load(run, "ours", sample)

    def _load_seed(self, run: int) -> None:
        where = f"seed-load-{run}"
        with self.seed_run(where) as node:
            node.start_backend()
            request = self._post_job_request(seed_side=True)
            sample = self._load_levels(f"{node.base_url}/jobs", where, request)
        self.record("load_seed", sample)
        self._say_load(run, "seed", sample)

    # --- drain --------------------------------------------------------------------------------
    def seed_jobs(self, count: int) -> None:
        """`count` committed no-op jobs of the benchmark tenant, indexed in Redis."""
        from django.utils import timezone

        from jobs.models import Job
        from jobs.queue import entry_for, sync_queue

        now = timezone.now()
        jobs = [
            Job(
                id=uuid.uuid4(),
                tenant_id=TENANT,
                type="sleep",
                payload={"delayMs": 0},
                run_at=now,
                created_at=now,
                updated_at=now,
            )
            for _ in range(count)
        ]
        Job.objects.bulk_create(jobs, batch_size=2000)
        queue = sync_queue()
        for start in range(0, count, 1000):
            queue.enqueue(entry_for(job) for job in jobs[start : start + 1000])

    def drain_ours(self, run: int, workers: int, *, profile: bool = False) -> dict[str, Any]:
        """Drain `drain_jobs` queued jobs with `workers` processes: jobs/s from the first claim
        to the last COMPLETED write, each worker's peak RSS, and CPU per job by process."""
        from django.db.models import Max, Min

        from jobs.models import Job, JobStatus

        n = self.sizes.drain_jobs
        self.reset()
        self.seed_jobs(n)
        label = f"drain{workers}-{run}" + ("-profile" if profile else "")
        with self.stack(label) as stack:
            spawned = time.time()
            procs = [
                stack.start_worker(name=f"{label}-w{i}", concurrency=self.sizes.concurrency)
                for i in range(workers)
            ]
            peaks = [0] * workers
            # CPU is counted from the first finished job on, so start-up is not charged to jobs.
            self._wait_rows(stack, procs, peaks, lambda done, left: done > 0)
            groups = {"workers": [p.pid for p in procs], **server_pids(self.database_name)}
            cpu_start = CpuSnapshot.take(groups)
            done_at_start = Job.objects.filter(status=JobStatus.COMPLETED).count()
            profiling = self._start_profilers(procs[0], "worker") if profile else None
            self._wait_rows(stack, procs, peaks, lambda done, left: left == 0)
            drained_at = time.time()
            cpu = CpuSnapshot.take(groups).since(cpu_start)
            if profiling is not None:
                for proc in profiling.processes:
                    proc.wait(timeout=self.args.profile_seconds + 60)
        counts = self._check_rows(n, status=JobStatus.COMPLETED, what="drained jobs")
        span = Job.objects.aggregate(first=Min("started_at"), last=Max("finished_at"))
        elapsed = (span["last"] - span["first"]).total_seconds()
        counted = n - done_at_start
        sample = {
            "jobs": n,
            "workers": workers,
            "concurrency": self.sizes.concurrency,
            "jobs_per_s": n / elapsed,
            "first_claim_to_last_finish_s": elapsed,
            "spawn_to_drained_s": drained_at - spawned,
            "jobs_per_s_incl_start": n / (drained_at - spawned),
            "peak_rss_kib": peaks,
            "statuses": counts,
            "cpu_s": cpu,
            "cpu_us_per_job": {
                name: 1e6 * used / counted for name, used in cpu.items() if name != "wall"
            },
        }
        if profiling is not None:
            sample["profile"] = self._summarise_profile(profiling, field="finished_at")
        per_job = sample["cpu_us_per_job"]
        self.say(
            f"run {run} drain {workers} worker(s): {sample['jobs_per_s']:8.0f} jobs/s "
            f"({elapsed:.2f}s; {sample['jobs_per_s_incl_start']:.0f} jobs/s incl. start-up), "
            f"peak RSS {max(peaks) / 1024:.0f} MiB, CPU/job: workers "
            f"{per_job['workers']:.0f} us, postgres {per_job['postgres']:.0f} us, redis "
            f"{per_job['redis-server']:.0f} us, machine {per_job['machine (all processes)']:.0f} us"
        )
        return sample

    def _wait_rows(
        self,
        stack: Stack,
        procs: list[Process],
        peaks: list[int],
        until: Callable[[int, int], bool],
    ) -> None:
        """Poll the jobs table (and the workers' RSS) until `until(completed, unfinished)`."""
        from django.db.models import Count, Q

        from jobs.models import Job, JobStatus

        deadline = time.monotonic() + max(120.0, self.sizes.drain_jobs / 100)
        unfinished = Q(status__in=[JobStatus.PENDING, JobStatus.RUNNING])
        tick = 0
        while True:
            for i, proc in enumerate(procs):
                if not proc.alive():
                    raise RuntimeError(f"worker {proc.label} exited:\n{proc.tail()}")
                peaks[i] = max(peaks[i], rss_kib(proc.pid) or 0)
            if tick % 3 == 0:
                counts = Job.objects.aggregate(
                    done=Count("id", filter=Q(status=JobStatus.COMPLETED)),
                    left=Count("id", filter=unfinished),
                )
                if until(counts["done"], counts["left"]):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"drain stalled: {counts}")
            tick += 1
            time.sleep(0.02 if tick < 50 else 0.1)

    def drain_baseline(self, run: int, workers: int) -> dict[str, Any]:
        """The seed's worker, `workers` processes, on `drain_jobs` queued rows."""
        n = self.sizes.drain_jobs
        self.reset()
        seed.seed_queued(self.seed, count=n, tenant=TENANT)
        with self.stack(f"seed-drain{workers}-{run}") as stack:
            cmd = seed.worker_command(self.seed, exit_when_idle_s=1.0)
            procs = [stack.start_script(f"seed-worker{i}", cmd) for i in range(workers)]
            peaks = [0] * workers
            deadline = time.monotonic() + max(120.0, n / 50)
            while any(p.alive() for p in procs):
                if time.monotonic() > deadline:
                    raise TimeoutError("baseline workers did not drain in time")
                for i, proc in enumerate(procs):
                    peaks[i] = max(peaks[i], rss_kib(proc.pid) or 0)
                time.sleep(0.1)
            stats = [seed.parse_worker_stats(p.log_path.read_text()) for p in procs]
        counts = seed.count_by_status(self.seed)
        if counts != {"COMPLETED": n}:
            raise RuntimeError(f"baseline drain left {counts}")
        first = min(s.first_pop for s in stats if s.first_pop is not None)
        last = max(s.last_done for s in stats if s.last_done is not None)
        sample = {
            "jobs": n,
            "workers": workers,
            "jobs_per_s": n / (last - first),
            "first_claim_to_last_finish_s": last - first,
            "processed": [s.processed for s in stats],
            "peak_rss_kib": peaks,
        }
        self.say(
            f"run {run} baseline drain {workers} worker(s): {sample['jobs_per_s']:8.0f} jobs/s"
        )
        return sample

    def drain_seed_node(self, run: int) -> dict[str, Any]:
        """The seed's Node worker (one process, one job at a time) on `seed_drain_jobs` jobs
        queued first by its `bench/enqueue-bulk.ts`: jobs/s between the first and the last
        COMPLETED write (the rows' `updatedAt`), so the process's start-up is not counted."""
        n = self.sizes.seed_drain_jobs
        with self.seed_run(f"seed-node-drain-{run}") as node:
            node.enqueue_bulk(TENANT, n)
            proc = node.start_worker()
            peak = 0
            deadline = time.monotonic() + max(120.0, n / 20)
            tick = 0
            while True:
                if not proc.alive():
                    raise RuntimeError(f"seed worker exited:\n{proc.tail()}")
                peak = max(peak, rss_kib(proc.pid) or 0)
                if tick % 5 == 0:
                    counts = node.counts()
                    if counts.get("COMPLETED", 0) + counts.get("FAILED", 0) >= n:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"seed (Node) drain stalled: {counts}")
                tick += 1
                time.sleep(0.05)
            completed, span = node.completed_span_s()
        if counts != {"COMPLETED": n}:
            raise RuntimeError(f"seed (Node) drain left {counts}")
        sample = {
            "jobs": n,
            "workers": 1,
            "jobs_per_s": (completed - 1) / span if span else 0.0,
            "first_to_last_completed_s": span,
            "peak_rss_kib": [peak],
        }
        self.say(
            f"run {run} seed (Node) drain 1 worker: {sample['jobs_per_s']:8.0f} jobs/s, "
            f"peak RSS {peak / 1024:.0f} MiB"
        )
        return sample

    def drain(self, run: int) -> None:
        """Ours and the Python baseline, 1 and 2 worker processes; the seed (Node), 1 worker."""
        for workers in (1, 2):
            self.record(f"drain_{workers}", self.drain_ours(run, workers))
            self.record(f"baseline_drain_{workers}", self.drain_baseline(run, workers))
        if self.node is not None:
            self.record("seed_drain_1", self.drain_seed_node(run))

    # --- profile ------------------------------------------------------------------------------
    def _start_profilers(self, target: Process, name: str) -> Profiling:
        """Three py-spy recordings of one process over the same window: a CPU flame graph
        (SVG), raw CPU stacks and raw wall stacks (`--idle`) for the text summary."""
        from django.utils import timezone

        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            raise RuntimeError("py-spy is missing: `uv pip install py-spy` (not a dependency)")
        seconds = self.args.profile_seconds
        rate = 100
        base = [py_spy, "record", "--nonblocking", "--rate", str(rate), "--duration", str(seconds)]
        base += ["--pid", str(target.pid)]
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"{name}-profile-{self.stamp}"
        files = {
            "svg": stem.with_suffix(".svg"),
            "cpu": stem.with_suffix(".cpu.raw"),
            "wall": stem.with_suffix(".wall.raw"),
            "summary": stem.with_suffix(".txt"),
        }
        commands = [
            [*base, "-o", str(files["svg"])],
            [*base, "--threads", "--format", "raw", "-o", str(files["cpu"])],
            [*base, "--threads", "--idle", "--format", "raw", "-o", str(files["wall"])],
        ]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / "py-spy.log").open("ab") as log:
            processes = [
                subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT) for c in commands
            ]
        return Profiling(name, target.pid, processes, files, timezone.now(), seconds, rate)

    def _summarise_profile(self, profiling: Profiling, *, field: str) -> dict[str, Any]:
        """Write the text summary; jobs in the window are rows whose `field` time falls in it
        (finished_at for the worker, created_at for the API)."""
        from datetime import timedelta

        from jobs.models import Job

        end = profiling.started + timedelta(seconds=profiling.seconds)
        last = Job.objects.order_by(f"-{field}").values_list(field, flat=True).first()
        if last is not None and last < end:
            end = last
        window = (end - profiling.started).total_seconds()
        jobs = Job.objects.filter(
            **{f"{field}__gte": profiling.started, f"{field}__lt": end}
        ).count()
        text = summarise(
            profiling.files["cpu"].read_text(),
            profiling.files["wall"].read_text(),
            title=f"{profiling.name} profile (pid {profiling.pid})",
            rate_hz=profiling.rate,
            jobs=jobs,
            window_s=window,
        )
        profiling.files["summary"].write_text(text)
        return {
            "files": {k: str(v) for k, v in profiling.files.items()},
            "jobs_in_window": jobs,
            "window_s": window,
        }

    def profile(self) -> None:
        """Not counted in the figures: py-spy on a worker draining (1 worker, at least 20,000
        jobs) and on Daphne under POST /jobs from `clients` clients; text summaries written."""
        sizes = self.sizes
        self.sizes = replace(sizes, drain_jobs=max(sizes.drain_jobs, 20_000))
        try:
            sample = self.drain_ours(0, 1, profile=True)
        finally:
            self.sizes = sizes
        summary = Path(sample["profile"]["files"]["summary"])
        accounting = {name: us for name, us in sample["cpu_us_per_job"].items() if name != "wall"}
        head = "CPU per job over the whole profiled drain, by process group (from /proc):\n"
        head += "".join(f"  {us:8.1f} us/job  {name}\n" for name, us in accounting.items())
        summary.write_text(head + "\n" + summary.read_text())
        self.samples["profile_worker"] = [sample]
        self.say(f"\nworker profile ({summary}):\n{summary.read_text()}")

        self.reset()
        with self.stack("api-profile") as stack:
            api = stack.start_api()
            profiling = self._start_profilers(api, "api")
            load = asyncio.run(
                clients.post_jobs(
                    stack.base_url,
                    self.key,
                    total=10**9,
                    clients=sizes.clients,
                    warmup=0,
                    for_s=profiling.seconds + 1,
                )
            )
            for proc in profiling.processes:
                proc.wait(timeout=profiling.seconds + 60)
        result = self._summarise_profile(profiling, field="created_at")
        result["load"] = clients.jobs_per_s(load)
        self.samples["profile_api"] = [result]
        text = Path(result["files"]["summary"]).read_text()
        self.say(f"\nAPI profile ({result['files']['summary']}):\n{text}")

    # --- latency ------------------------------------------------------------------------------
    def latency(self, run: int) -> None:
        """POST /jobs to the COMPLETED frame on a WebSocket, one worker idle: ours and the
        seed (Node); then the Python baseline (INSERT + LPUSH to the PUBLISH, a floor)."""
        self.both(run, self._latency_ours, self._latency_seed)
        trips, warmup = self.sizes.latency_trips, 10
        self.reset()
        with self.stack(f"baseline-latency-{run}") as stack:
            stack.start_script("seed-worker", seed.worker_command(self.seed))
            base = seed.latency(self.seed, trips=trips, warmup=warmup, tenant=TENANT)
        self.record("baseline_latency_ms", base)
        self.say(
            f"run {run} latency Python baseline: p50 {percentile(base, 50):6.2f} ms, "
            f"p99 {percentile(base, 99):6.2f} ms"
        )

    def _latency_ours(self, run: int) -> None:
        from jobs.models import JobStatus

        trips, warmup = self.sizes.latency_trips, 10
        self.reset()
        with self.stack(f"latency-{run}") as stack:
            stack.start_api()
            stack.start_worker(name=f"latency-{run}-w0", concurrency=self.sizes.concurrency)
            refused: list[str] = []
            trips_done = asyncio.run(
                clients.ws_latency(
                    stack.base_url,
                    stack.ws_url,
                    self.key,
                    TENANT,
                    trips=trips,
                    warmup=warmup,
                    refused=refused,
                )
            )
        if refused:
            self.problems.append(f"run {run} latency: POST /jobs refused (503) {len(refused)}x")
        self._check_rows(trips + warmup, status=JobStatus.COMPLETED, what="latency jobs")
        samples = [t.completed_ms for t in trips_done]
        self.record("latency_ms", samples)
        self.record("latency_stages_ms", self._latency_stages(trips_done))
        stages = self.samples["latency_stages_ms"][-1]
        self.say(
            f"run {run} latency stages (median ms): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in stages.items())
        )
        self.say(
            f"run {run} latency ours: p50 {percentile(samples, 50):6.2f} ms, "
            f"p99 {percentile(samples, 99):6.2f} ms"
        )

    def _latency_seed(self, run: int) -> None:
        trips, warmup = self.sizes.latency_trips, 10
        with self.seed_run(f"seed-latency-{run}") as node:
            node.start_backend()
            node.start_worker()
            refused: list[str] = []
            trips_done = asyncio.run(
                clients.ws_latency(
                    node.base_url,
                    node.ws_url,
                    "",
                    TENANT,
                    trips=trips,
                    warmup=warmup,
                    refused=refused,
                    seed=True,
                )
            )
            counts = node.counts()
        if counts != {"COMPLETED": trips + warmup}:
            self.problems.append(f"run {run} latency seed: rows {counts}")
        samples = [t.completed_ms for t in trips_done]
        self.record("seed_latency_ms", samples)
        self.say(
            f"run {run} latency seed: p50 {percentile(samples, 50):6.2f} ms, "
            f"p99 {percentile(samples, 99):6.2f} ms"
        )

    def _latency_stages(self, trips: list[clients.Trip]) -> dict[str, float]:
        """Median of each stage of a round trip, from the rows' timestamps (same clock):
        request to row, row to claim, claim to finish, finish to frame; and the POST's answer."""
        from jobs.models import Job

        rows = {
            str(job.id): job
            for job in Job.objects.filter(id__in=[t.job_id for t in trips]).only(
                "id", "created_at", "started_at", "finished_at"
            )
        }
        stages: dict[str, list[float]] = {
            "POST answered": [],
            "POST sent -> row created_at": [],
            "created_at -> started_at (queue)": [],
            "started_at -> finished_at (run + write)": [],
            "finished_at -> COMPLETED frame": [],
        }
        for trip in trips:
            job = rows[trip.job_id]
            created = job.created_at.timestamp()
            started = job.started_at.timestamp()
            finished = job.finished_at.timestamp()
            arrived = trip.sent_at + trip.completed_ms / 1000
            stages["POST answered"].append(trip.answered_ms)
            stages["POST sent -> row created_at"].append((created - trip.sent_at) * 1000)
            stages["created_at -> started_at (queue)"].append((started - created) * 1000)
            stages["started_at -> finished_at (run + write)"].append((finished - started) * 1000)
            stages["finished_at -> COMPLETED frame"].append((arrived - finished) * 1000)
        return {name: median(values) for name, values in stages.items()}

    # --- fan-out ------------------------------------------------------------------------------
    def fanout(self, run: int) -> None:
        """Subscribers of one tenant, one job per round, time until all have its COMPLETED:
        ours and the seed (Node); then the Python baseline (Redis subscribers, a floor)."""
        self.both(run, self._fanout_ours, self._fanout_seed)
        s = self.sizes
        self.reset()
        with self.stack(f"baseline-fanout-{run}") as stack:
            stack.start_script("seed-worker", seed.worker_command(self.seed))
            base = asyncio.run(
                seed.fanout(
                    self.seed,
                    subscribers=s.subscribers,
                    rounds=s.fanout_rounds,
                    tenant=TENANT,
                    pause_s=s.fanout_pause_s,
                )
            )
        self.record("baseline_fanout_ms", base)
        self.say(f"run {run} fan-out Python baseline: {_spread(base)}")

    def _fanout_ours(self, run: int) -> None:
        s = self.sizes
        self.reset()
        with self.stack(f"fanout-{run}") as stack:
            stack.start_api()
            stack.start_worker(name=f"fanout-{run}-w0", concurrency=s.concurrency)
            refused: list[str] = []
            rounds = asyncio.run(
                clients.ws_fanout(
                    stack.base_url,
                    stack.ws_url,
                    self.key,
                    TENANT,
                    subscribers=s.subscribers,
                    rounds=s.fanout_rounds,
                    pause_s=s.fanout_pause_s,
                    refused=refused,
                )
            )
        if refused:
            self.problems.append(f"run {run} fan-out: POST /jobs refused (503) {len(refused)}x")
        self.record("fanout_ms", rounds)
        self.say(
            f"run {run} fan-out ours to {s.subscribers}, per round min/p50/p99/max ms: "
            f"{_spread(rounds)}"
        )

    def _fanout_seed(self, run: int) -> None:
        s = self.sizes
        with self.seed_run(f"seed-fanout-{run}") as node:
            node.start_backend()
            node.start_worker()
            refused: list[str] = []
            rounds = asyncio.run(
                clients.ws_fanout(
                    node.base_url,
                    node.ws_url,
                    "",
                    TENANT,
                    subscribers=s.subscribers,
                    rounds=s.fanout_rounds,
                    pause_s=s.fanout_pause_s,
                    refused=refused,
                    seed=True,
                )
            )
        self.record("seed_fanout_ms", rounds)
        self.say(
            f"run {run} fan-out seed to {s.subscribers}, per round min/p50/p99/max ms: "
            f"{_spread(rounds)}"
        )

    # --- memory -------------------------------------------------------------------------------
    def memory(self, run: int) -> None:
        """The API's RSS (every process `start_api` started, and their children) before and
        with `idle_sockets` subscribed, silent sockets; worker RSS comes from the drain (a
        1-worker drain runs here if drain is not selected)."""
        count = self.sizes.idle_sockets
        self.reset()
        with self.stack(f"memory-{run}") as stack:
            stack.start_api()
            roots = [p.pid for p in stack.processes]
            # Warm: the first socket loads the consumer and the channel layer.
            asyncio.run(
                clients.with_idle_sockets(stack.ws_url, self.key, TENANT, count=1, measure=_noop)
            )
            before = _settled_rss(roots)

            async def measure() -> int:
                await asyncio.sleep(2)
                return await asyncio.to_thread(_settled_rss, roots)

            during = asyncio.run(
                clients.with_idle_sockets(
                    stack.ws_url, self.key, TENANT, count=count, measure=measure
                )
            )
        sample = {
            "sockets": count,
            "rss_before_kib": before,
            "rss_with_sockets_kib": during,
            "kib_per_socket": (during - before) / count,
        }
        self.record("api_rss", sample)
        self.say(
            f"run {run} memory: API {before / 1024:.0f} MiB idle, {during / 1024:.0f} MiB "
            f"with {count} sockets ({sample['kib_per_socket']:.1f} KiB each)"
        )
        if "drain" not in self.args.only:
            self.record("drain_1", self.drain_ours(run, 1))
            self.record("baseline_drain_1", self.drain_baseline(run, 1))

    # --- checks -------------------------------------------------------------------------------
    def _check_statuses(self, what: str, statuses: dict[int, int], wanted: int) -> None:
        bad = {code: n for code, n in statuses.items() if code != wanted}
        if bad:
            self.problems.append(f"{what}: unexpected HTTP answers {bad}")

    def _check_rows(self, expected: int, *, status: str | None, what: str) -> dict[str, int]:
        from django.db.models import Count

        from jobs.models import Job

        counts = {
            row["status"]: row["n"]
            for row in Job.objects.values("status").annotate(n=Count("id")).order_by()
        }
        total = sum(counts.values())
        good = total if status is None else counts.get(status, 0)
        if good != expected or total != expected:
            message = f"{what}: expected {expected} {status or 'rows'}, found {counts}"
            self.problems.append(message)
            raise RuntimeError(message)
        return counts

    # --- report -------------------------------------------------------------------------------
    def _rate(self, key: str, field_name: str = "jobs_per_s") -> float | None:
        values = self.samples.get(key)
        if not values:
            return None
        return median([v if isinstance(v, float) else v[field_name] for v in values])

    def _pct(self, key: str, q: float) -> float | None:
        runs = self.samples.get(key)
        return median([percentile(r, q) for r in runs]) if runs else None

    def _fan(self, key: str, stat: Callable[[list[float]], float]) -> float | None:
        runs = self.samples.get(key)
        if not runs:
            return None
        return median([median([stat(r) for r in rounds]) for rounds in runs])

    def _rss(self, key: str) -> float | None:
        runs = self.samples.get(key)
        return median([max(r["peak_rss_kib"]) / 1024 for r in runs]) if runs else None

    def _wrk_latency(self, key: str, q: str) -> float | None:
        runs = self.samples.get(key)
        return median([r["latency_ms"][q] for r in runs]) if runs else None

    def _load_total(self, key: str, connections: int, what: str) -> float | None:
        """A count summed over every run's level (`5xx`, `socket_errors`)."""
        runs = self.samples.get(key)
        if not runs:
            return None
        return float(sum(r["levels"][str(connections)][what] or 0 for r in runs))

    def _load_rate(self, key: str, connections: int) -> float | None:
        runs = self.samples.get(key)
        if not runs:
            return None
        return median([r["levels"][str(connections)]["jobs_per_s"] for r in runs])

    def _stops(self) -> tuple[float | None, float | None]:
        """API processes killed because SIGTERM right after load did not end them within
        STOP_GRACE_S, and the slowest exit of the others (seconds)."""
        stops = self.samples.get("api_stop")
        if not stops:
            return None, None
        exits = [s for stop in stops for s in stop["exit_s"].values()]
        clean = [s for s in exits if s is not None]
        return float(len(exits) - len(clean)), max(clean) if clean else None

    def rows(self) -> list[Row]:
        """The first table, against the seed (Node) run side by side: each figure is the median
        over runs of the per-run figure (counts of errors are summed over runs)."""
        sz = self.sizes
        runs = self.args.runs
        rows = [
            Row(
                f"POST /jobs, {sz.clients} connections",
                "jobs/s",
                self._rate("http_ours"),
                self._rate("http_seed"),
                ">= 1.0x seed (aim 1.5x)",
                _seed_ratio(1.0, 1.5),
            ),
            Row(
                "POST /jobs client p50",
                "ms",
                self._wrk_latency("http_ours", "p50"),
                self._wrk_latency("http_seed", "p50"),
                "",
            ),
            Row(
                "POST /jobs client p99",
                "ms",
                self._wrk_latency("http_ours", "p99"),
                self._wrk_latency("http_seed", "p99"),
                "",
            ),
            Row(
                f"POST /jobs/batch of {sz.batch_size}",
                "jobs/s",
                self._rate("enqueue_batch"),
                None,
                ">= 20,000",
                lambda v, b: v >= 20_000,
            ),
            Row(
                f"GET /jobs/{{id}}, {sz.clients} connections",
                "req/s",
                self._rate("get_ours", "requests_per_s"),
                None,
                ">= 3,000",
                lambda v, b: v >= 3000,
            ),
            Row(
                "POST to COMPLETED frame p50",
                "ms",
                self._pct("latency_ms", 50),
                self._pct("seed_latency_ms", 50),
                "<= seed and <= 5",
                _at_most_seed_and(5),
            ),
            Row(
                "POST to COMPLETED frame p99",
                "ms",
                self._pct("latency_ms", 99),
                self._pct("seed_latency_ms", 99),
                "<= seed and <= 15",
                _at_most_seed_and(15),
            ),
            Row(
                f"fan-out p50, {sz.subscribers} subscribers",
                "ms",
                self._fan("fanout_ms", lambda r: percentile(r, 50)),
                self._fan("seed_fanout_ms", lambda r: percentile(r, 50)),
                "",
            ),
            Row(
                f"fan-out p99, {sz.subscribers} subscribers",
                "ms",
                self._fan("fanout_ms", lambda r: percentile(r, 99)),
                self._fan("seed_fanout_ms", lambda r: percentile(r, 99)),
                "<= seed and <= 100",
                _at_most_seed_and(100),
            ),
        ]
        for connections in sz.load_connections:
            label = f"load {connections} conns {sz.load_seconds:g}s"
            rows += [
                Row(
                    f"{label}: POST /jobs",
                    "jobs/s",
                    self._load_rate("load_ours", connections),
                    self._load_rate("load_seed", connections),
                    "",
                ),
                Row(
                    f"{label}: 5xx, sum of {runs} runs",
                    "count",
                    self._load_total("load_ours", connections, "5xx"),
                    self._load_total("load_seed", connections, "5xx"),
                    "0",
                    lambda v, b: v == 0,
                    has_ratio=False,
                ),
                Row(
                    f"{label}: socket errors, sum of {runs} runs",
                    "count",
                    self._load_total("load_ours", connections, "socket_errors"),
                    self._load_total("load_seed", connections, "socket_errors"),
                    "",
                    has_ratio=False,
                ),
            ]
        killed, slowest = self._stops()
        stops = len(self.samples.get("api_stop", []))
        rows += [
            Row(
                f"SIGTERM right after load: API processes killed after {STOP_GRACE_S:g}s, "
                f"{stops} stops",
                "count",
                killed,
                None,
                "0",
                lambda v, b: v == 0,
                has_ratio=False,
            ),
            Row("SIGTERM right after load: slowest clean exit", "s", slowest, None, ""),
            Row(
                "drain, 1 worker (seed: its Node worker)",
                "jobs/s",
                self._rate("drain_1"),
                self._rate("seed_drain_1"),
                "no worse than today (A/B)",
            ),
        ]
        return rows

    def python_rows(self) -> list[Row]:
        """The second table, against `seed_baseline.py` (the seed's design in plain psycopg and
        redis-py, no HTTP or WebSocket: a floor, and the drain's like-for-like baseline)."""
        sz = self.sizes
        api = self.samples.get("api_rss")
        api_mib = median([r["rss_with_sockets_kib"] / 1024 for r in api]) if api else None
        per_socket = median([r["kib_per_socket"] for r in api]) if api else None
        return [
            Row(
                f"enqueue POST /jobs/batch of {sz.batch_size}",
                "jobs/s",
                self._rate("enqueue_batch"),
                self._rate("baseline_enqueue_batch"),
                ">= 20,000",
                lambda v, b: v >= 20_000,
            ),
            Row(
                "drain, 1 worker",
                "jobs/s",
                self._rate("drain_1"),
                self._rate("baseline_drain_1"),
                ">= 2,500",
                lambda v, b: v >= 2500,
            ),
            Row(
                "drain, 2 workers",
                "jobs/s",
                self._rate("drain_2"),
                self._rate("baseline_drain_2"),
                ">= 5,000 and >= 6x",
                lambda v, b: v >= 5000 and b is not None and v >= 6 * b,
            ),
            Row(
                "latency p50",
                "ms",
                self._pct("latency_ms", 50),
                self._pct("baseline_latency_ms", 50),
                "<= 5",
                lambda v, b: v <= 5,
            ),
            Row(
                "latency p99",
                "ms",
                self._pct("latency_ms", 99),
                self._pct("baseline_latency_ms", 99),
                "<= 15",
                lambda v, b: v <= 15,
            ),
            Row(
                f"fan-out p99, {sz.subscribers} subscribers",
                "ms",
                self._fan("fanout_ms", lambda r: percentile(r, 99)),
                self._fan("baseline_fanout_ms", lambda r: percentile(r, 99)),
                "<= 100",
                lambda v, b: v <= 100,
            ),
            Row(
                f"fan-out max, {sz.subscribers} subscribers",
                "ms",
                self._fan("fanout_ms", max),
                self._fan("baseline_fanout_ms", max),
                "",
            ),
            Row(
                f"worker peak RSS, c={sz.concurrency}, 1 worker",
                "MiB",
                self._rss("drain_1"),
                self._rss("baseline_drain_1"),
                "",
            ),
            Row(f"API RSS, {sz.idle_sockets} idle sockets", "MiB", api_mib, None, ""),
            Row("API RSS per idle socket", "KiB", per_socket, None, ""),
        ]

    @staticmethod
    def table(rows: list[Row], baseline: str, ratio: str) -> str:
        """The rows as aligned text: figure | baseline | ours | ours/baseline | target | verdict
        (figures no sample was taken for are left out)."""
        header = ("figure", baseline, "ours", ratio, "target", "verdict")
        lines = [header]
        for row in rows:
            if row.ours is None and row.baseline is None:
                continue
            lines.append(
                (
                    f"{row.label} ({row.unit})",
                    _fmt(row.baseline),
                    _fmt(row.ours),
                    f"{row.ratio:.2f}x" if row.ratio is not None else "-",
                    row.target,
                    row.verdict,
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = []
        for i, line in enumerate(lines):
            cells = [
                cell.ljust(w) if j == 0 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(line, widths, strict=True))
            ]
            out.append("  ".join(cells).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    @staticmethod
    def table_json(rows: list[Row], baseline: str) -> list[dict[str, Any]]:
        return [
            {
                "figure": row.label,
                "unit": row.unit,
                baseline: row.baseline,
                "ours": row.ours,
                "ratio": row.ratio,
                "target": row.target,
                "verdict": row.verdict,
            }
            for row in rows
        ]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) < 100:
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _spread(rounds: list[list[float]]) -> str:
    return " ".join(
        "/".join(f"{v:.0f}" for v in (min(r), percentile(r, 50), percentile(r, 99), max(r)))
        for r in rounds
    )


async def _noop() -> None:
    return None


def _process_tree(roots: list[int]) -> list[int]:
    """`roots` and every process descended from them (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _settled_rss(roots: list[int]) -> int:
    """The highest of a few readings, a quarter second apart, of the RSS summed over the
    processes of `roots` and their children (they are idle)."""
    readings = []
    for _ in range(8):
        readings.append(sum(rss_kib(pid) or 0 for pid in _process_tree(roots)))
        time.sleep(0.25)
    return max(readings)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=None, help="samples per figure (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and one run: about 3 minutes"
    )
    parser.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES))
    parser.add_argument(
        "--api-processes",
        type=int,
        help="Daphne processes of `manage.py serve` (default: its own, one per CPU)",
    )
    parser.add_argument("--drain-jobs", type=int, help="jobs per drain (default 20,000)")
    parser.add_argument("--concurrency", type=int, help="worker --concurrency (default 50)")
    parser.add_argument(
        "--requests", type=int, help="POST /jobs of --profile's API load (3,000; seconds bound it)"
    )
    parser.add_argument(
        "--http-seconds", type=float, help="wrk seconds per http and get run (10; quick 5)"
    )
    parser.add_argument(
        "--load-seconds", type=float, help="seconds at 64 and at 256 connections (30; quick 8)"
    )
    parser.add_argument(
        "--seed-drain-jobs",
        type=int,
        help="jobs the seed (Node) worker drains (5,000; quick 1,000)",
    )
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk --threads (1)")
    parser.add_argument(
        "--wrk-count-statuses",
        action="store_true",
        help="count answers by status in the http and get figures too (wrk's Lua `response` "
        "hook, which costs wrk CPU; the load figure always counts them)",
    )
    parser.add_argument(
        "--wrk-timeout",
        type=float,
        default=10,
        help="wrk --timeout, seconds (10): a request "
        "slower than this counts as a socket error (timeout)",
    )
    parser.add_argument(
        "--no-seed-node", action="store_true", help="leave the seed (Node) out: ours only"
    )
    parser.add_argument("--batches", type=int, help="POST /jobs/batch per run (10)")
    parser.add_argument("--latency-trips", type=int, help="round trips per run (300)")
    parser.add_argument("--subscribers", type=int, help="fan-out sockets (1,000)")
    parser.add_argument("--idle-sockets", type=int, help="sockets held for the API RSS (5,000)")
    parser.add_argument("--fanout-pause", type=float, help="seconds between fan-out rounds (1)")
    parser.add_argument(
        "--profile", action="store_true", help="also py-spy a worker and Daphne (not counted)"
    )
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--keep-data", action="store_true", help="leave rows and keys behind")
    parser.add_argument(
        "--db-connection-limit",
        type=int,
        default=60,
        help="connection limit of the service's own PostgreSQL role, so that it cannot take the "
        "shared server's last connections (default 60; -1: connect as DATABASE_URL's user)",
    )
    args = parser.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    overrides = {
        "drain_jobs": args.drain_jobs,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "batches": args.batches,
        "latency_trips": args.latency_trips,
        "subscribers": args.subscribers,
        "idle_sockets": args.idle_sockets,
        "fanout_pause_s": args.fanout_pause,
        "http_seconds": args.http_seconds,
        "load_seconds": args.load_seconds,
        "seed_drain_jobs": args.seed_drain_jobs,
    }
    return replace(sizes, **{k: v for k, v in overrides.items() if v is not None})


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}  # "": a Unix socket


def _local_only(url: str, what: str) -> None:
    """The suite talks to this machine only: refuse a server elsewhere."""
    host = urlsplit(url).hostname or ""
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"{what} points at {host!r}: the suite talks to 127.0.0.1 only")


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM and SIGHUP end the run like Ctrl-C: every `finally` stops its processes.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    args = parse_args()
    sizes = sizes_from(args)
    _local_only(os.environ.get("DATABASE_URL", "postgres://127.0.0.1/postgres"), "DATABASE_URL")
    _local_only(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), "REDIS_URL")
    raise_fd_limit()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    os.environ.setdefault("JOBS_REDIS_PREFIX", f"bsuite-{uuid.uuid4().hex[:8]}")
    os.environ.setdefault("SECRET_KEY", SECRET_KEY)
    os.environ.setdefault("DEBUG", "0")
    setup_django(os.environ.get("BENCH_DATABASE", "jobqueue_bench_suite"))
    suite = Suite(args, sizes)
    _local_only(suite.redis_url, "settings.REDIS_URL")
    print(
        f"database {suite.database_url.rsplit('/', 1)[-1]}, Redis prefix {suite.prefix}, "
        f"logs {suite.log_dir}",
        flush=True,
    )
    started = time.monotonic()
    failed = False
    interrupted = False
    try:
        suite.prepare()
        for run in range(1, args.runs + 1):
            # Interleaved, so drift of the shared machine hits every figure alike.
            for figure in FIGURES:
                if figure in args.only:
                    step = getattr(suite, figure)
                    failed = suite.attempt(f"run {run} {figure}", step, run) or failed
        if args.profile:
            failed = suite.attempt("profile", suite.profile) or failed
    except KeyboardInterrupt as exc:
        interrupted = True
        suite.problems.append(f"interrupted ({str(exc) or 'SIGINT'}): the figures are partial")
        print("\ninterrupted: stopping and cleaning up", file=sys.stderr, flush=True)
    finally:
        if not args.keep_data:
            suite.cleanup()
    suite.problems.extend(log_problems(suite.log_dir))
    rows, python_rows = suite.rows(), suite.python_rows()
    print(
        f"\n{suite.table(rows, 'seed (Node)', 'ours/seed')}\n(the seed tutorial in Node, "
        f"measured in the same run; figures are medians of {args.runs} interleaved runs)"
    )
    if any(row.ours is not None or row.baseline is not None for row in python_rows):
        print(
            f"\n{suite.table(python_rows, 'Python design', 'ours/base')}\n(seed_baseline.py: "
            "the seed's design in plain Python, no HTTP or WebSocket; a floor, and the drain's "
            "baseline)"
        )
    loads = [entry["load"][0] for entry in suite.samples.get("loadavg", [])]
    if loads:
        # The machine may be shared: a load above the CPU count means samples competed for CPU.
        print(
            f"\nload average (1 min) at the samples: median {median(loads):.1f}, max "
            f"{max(loads):.1f}, on {os.cpu_count()} CPUs"
        )
    if suite.problems:
        print("\nproblems:\n  " + "\n  ".join(suite.problems))
    path = write_results(
        "suite",
        {
            "args": vars(args),
            "sizes": asdict(sizes),
            "elapsed_s": time.monotonic() - started,
            "redis_prefix": suite.prefix,
            "logs": str(suite.log_dir),
            "seed_node": None
            if suite.node is None
            else {
                "root": str(suite.node.root),
                "source": str(seed_node.SOURCE),
                "database_url": suite.node.database_url,
                "redis_url": suite.node.redis_url,
            },
            "table": suite.table_json(rows, "seed_node"),
            "table_python_baseline": suite.table_json(python_rows, "python_baseline"),
            "samples": suite.samples,
            "problems": suite.problems,
        },
    )
    print(f"\nresults: {path}\nelapsed: {time.monotonic() - started:.0f}s")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
