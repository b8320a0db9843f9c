"""Performance of the whole service against the seed's design, measured in the same run.

Starts the real stack (Daphne, `runworker_jobs`) as subprocesses on the benchmark database and a
Redis prefix of its own, and measures: enqueue (POST /jobs with 16 clients, POST /jobs/batch),
drain (no-op jobs already queued, 1 and 2 worker processes), latency (POST to the COMPLETED
frame on a WebSocket), fan-out (1,000 subscribers of one tenant) and memory (worker RSS while
draining, Daphne RSS with 5,000 idle sockets). Every figure is the median of `--runs` runs and is
compared with `bench/seed_baseline.py`. Prints a table and writes JSON to bench/results/.

    uv run python bench/suite.py [--runs 3] [--quick] [--only drain latency] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clients
import psycopg
import seed_baseline as seed
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

FIGURES = ("enqueue", "drain", "latency", "fanout", "memory")
TENANT = "bench-suite"


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does; `--quick` shrinks them."""

    requests: int = 3000
    clients: int = 16
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
    """One line of the table: a figure of ours, its baseline and the issue's target."""

    label: str
    unit: str
    ours: float | None
    baseline: float | None
    target: str
    met: Callable[[float, float | None], bool] | None = None

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    @property
    def verdict(self) -> str:
        if self.met is None:
            return ""
        if self.ours is None:
            return "n/a"
        return "yes" if self.met(self.ours, self.baseline) else "NO"


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

    # --- enqueue ------------------------------------------------------------------------------
    def enqueue(self, run: int) -> None:
        """POST /jobs from 16 clients and POST /jobs/batch, no worker; then the baseline."""
        s = self.sizes
        self.reset()
        warmup = 2 * s.clients
        with self.stack(f"enqueue-{run}") as stack:
            api = stack.start_api()
            single = asyncio.run(
                clients.post_jobs(
                    stack.base_url, self.key, total=s.requests, clients=s.clients, warmup=warmup
                )
            )
            # A fresh Daphne: the batches must not inherit the first one's database connections.
            stack.stop(api)
            stack.start_api()
            batch = asyncio.run(
                clients.post_batches(stack.base_url, self.key, batches=s.batches, size=s.batch_size)
            )
        self._check_statuses(f"run {run} enqueue single", single.statuses, 201)
        self._check_statuses(f"run {run} enqueue batch", batch.statuses, 201)
        # Every accepted job has its row, and no refused one has (nothing half-created).
        accepted = single.jobs + single.warmup_jobs + batch.jobs + batch.warmup_jobs
        self._check_rows(accepted, status=None, what="enqueued jobs")
        self.record("enqueue_single", clients.jobs_per_s(single))
        self.record("enqueue_batch", clients.jobs_per_s(batch))

        self.reset()
        base_single = seed.enqueue_single(
            self.seed, total=s.requests, clients=s.clients, tenant=TENANT
        )
        base_batch = seed.enqueue_batches(
            self.seed, batches=s.batches, size=s.batch_size, tenant=TENANT
        )
        self.record("baseline_enqueue_single", base_single)
        self.record("baseline_enqueue_batch", base_batch)
        self.say(
            f"run {run} enqueue: single {single.jobs_per_s:8.0f} jobs/s "
            f"(baseline {base_single:8.0f}), batch {batch.jobs_per_s:8.0f} jobs/s "
            f"(baseline {base_batch:8.0f})"
        )

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
                    raise RuntimeError(f"worker {proc.label} exited:\n{stack.tail(proc)}")
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

    def drain(self, run: int) -> None:
        """Ours and the baseline, 1 and 2 worker processes."""
        for workers in (1, 2):
            self.record(f"drain_{workers}", self.drain_ours(run, workers))
            self.record(f"baseline_drain_{workers}", self.drain_baseline(run, workers))

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
        """POST /jobs to the COMPLETED frame on a WebSocket, one worker idle; then the baseline."""
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

        self.reset()
        with self.stack(f"seed-latency-{run}") as stack:
            stack.start_script("seed-worker", seed.worker_command(self.seed))
            base = seed.latency(self.seed, trips=trips, warmup=warmup, tenant=TENANT)
        self.record("baseline_latency_ms", base)
        stages = self.samples["latency_stages_ms"][-1]
        self.say(
            f"run {run} latency stages (median ms): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in stages.items())
        )
        self.say(
            f"run {run} latency: p50 {percentile(samples, 50):6.2f} ms, "
            f"p99 {percentile(samples, 99):6.2f} ms (baseline p50 {percentile(base, 50):6.2f}, "
            f"p99 {percentile(base, 99):6.2f})"
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
        """Subscribers of one tenant, one job per round, time until all have its COMPLETED."""
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

        self.reset()
        with self.stack(f"seed-fanout-{run}") as stack:
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
        self.say(
            f"run {run} fan-out to {s.subscribers}, per round min/p50/p99/max ms: "
            f"{_spread(rounds)}; baseline {_spread(base)}"
        )

    # --- memory -------------------------------------------------------------------------------
    def memory(self, run: int) -> None:
        """Daphne's RSS before and with `idle_sockets` subscribed, silent sockets; worker RSS
        comes from the drain (a 1-worker drain runs here if drain is not selected)."""
        count = self.sizes.idle_sockets
        self.reset()
        with self.stack(f"memory-{run}") as stack:
            api = stack.start_api()
            # Warm: the first socket loads the consumer and the channel layer.
            asyncio.run(
                clients.with_idle_sockets(stack.ws_url, self.key, TENANT, count=1, measure=_noop)
            )
            before = _settled_rss(api.pid)

            async def measure() -> int:
                await asyncio.sleep(2)
                return await asyncio.to_thread(_settled_rss, api.pid)

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
            f"run {run} memory: Daphne {before / 1024:.0f} MiB idle, {during / 1024:.0f} MiB "
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
    def rows(self) -> list[Row]:
        """The table: each figure is the median over runs of the per-run figure."""
        s = self.samples

        def rate(key: str) -> float | None:
            values = s.get(key)
            if not values:
                return None
            return median([v if isinstance(v, float) else v["jobs_per_s"] for v in values])

        def pct(key: str, q: float) -> float | None:
            runs = s.get(key)
            return median([percentile(r, q) for r in runs]) if runs else None

        def fan(key: str, stat: Callable[[list[float]], float]) -> float | None:
            runs = s.get(key)
            if not runs:
                return None
            return median([median([stat(r) for r in rounds]) for rounds in runs])

        def rss(key: str) -> float | None:
            runs = s.get(key)
            return median([max(r["peak_rss_kib"]) / 1024 for r in runs]) if runs else None

        api = s.get("api_rss")
        api_mib = median([r["rss_with_sockets_kib"] / 1024 for r in api]) if api else None
        per_socket = median([r["kib_per_socket"] for r in api]) if api else None
        sz = self.sizes
        return [
            Row(
                f"enqueue POST /jobs, {sz.clients} clients",
                "jobs/s",
                rate("enqueue_single"),
                rate("baseline_enqueue_single"),
                ">= 1,500",
                lambda v, b: v >= 1500,
            ),
            Row(
                f"enqueue POST /jobs/batch of {sz.batch_size}",
                "jobs/s",
                rate("enqueue_batch"),
                rate("baseline_enqueue_batch"),
                ">= 20,000",
                lambda v, b: v >= 20_000,
            ),
            Row(
                "drain, 1 worker",
                "jobs/s",
                rate("drain_1"),
                rate("baseline_drain_1"),
                ">= 2,500",
                lambda v, b: v >= 2500,
            ),
            Row(
                "drain, 2 workers",
                "jobs/s",
                rate("drain_2"),
                rate("baseline_drain_2"),
                ">= 5,000 and >= 6x",
                lambda v, b: v >= 5000 and b is not None and v >= 6 * b,
            ),
            Row(
                "latency p50",
                "ms",
                pct("latency_ms", 50),
                pct("baseline_latency_ms", 50),
                "<= 5",
                lambda v, b: v <= 5,
            ),
            Row(
                "latency p99",
                "ms",
                pct("latency_ms", 99),
                pct("baseline_latency_ms", 99),
                "<= 15",
                lambda v, b: v <= 15,
            ),
            Row(
                f"fan-out p99, {sz.subscribers} subscribers",
                "ms",
                fan("fanout_ms", lambda r: percentile(r, 99)),
                fan("baseline_fanout_ms", lambda r: percentile(r, 99)),
                "<= 100",
                lambda v, b: v <= 100,
            ),
            Row(
                f"fan-out max, {sz.subscribers} subscribers",
                "ms",
                fan("fanout_ms", max),
                fan("baseline_fanout_ms", max),
                "",
            ),
            Row(
                f"worker peak RSS, c={sz.concurrency}, 1 worker",
                "MiB",
                rss("drain_1"),
                rss("baseline_drain_1"),
                "",
            ),
            Row(f"Daphne RSS, {sz.idle_sockets} idle sockets", "MiB", api_mib, None, ""),
            Row("Daphne RSS per idle socket", "KiB", per_socket, None, ""),
        ]

    def table(self) -> str:
        """The rows as aligned text (ratio is ours / baseline)."""
        header = ("figure", "ours", "baseline", "ratio", "target", "met")
        lines = [header]
        for row in self.rows():
            if row.ours is None and row.baseline is None:
                continue
            lines.append(
                (
                    f"{row.label} ({row.unit})",
                    _fmt(row.ours),
                    _fmt(row.baseline),
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


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
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


def _settled_rss(pid: int) -> int:
    """The highest of a few RSS readings a quarter second apart (the process is idle)."""
    readings = []
    for _ in range(8):
        readings.append(rss_kib(pid) or 0)
        time.sleep(0.25)
    return max(readings)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=None, help="samples per figure (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and one run: about 2 minutes"
    )
    parser.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES))
    parser.add_argument("--drain-jobs", type=int, help="jobs per drain (default 20,000)")
    parser.add_argument("--concurrency", type=int, help="worker --concurrency (default 50)")
    parser.add_argument("--requests", type=int, help="POST /jobs per enqueue run (3,000)")
    parser.add_argument("--batches", type=int, help="POST /jobs/batch per run (10)")
    parser.add_argument("--latency-trips", type=int, help="round trips per run (300)")
    parser.add_argument("--subscribers", type=int, help="fan-out sockets (1,000)")
    parser.add_argument("--idle-sockets", type=int, help="sockets held for Daphne RSS (5,000)")
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
    }
    return replace(sizes, **{k: v for k, v in overrides.items() if v is not None})


def main() -> int:
    args = parse_args()
    sizes = sizes_from(args)
    raise_fd_limit()
    os.environ.setdefault("JOBS_REDIS_PREFIX", f"bsuite-{uuid.uuid4().hex[:8]}")
    os.environ.setdefault("SECRET_KEY", SECRET_KEY)
    os.environ.setdefault("DEBUG", "0")
    setup_django(os.environ.get("BENCH_DATABASE", "jobqueue_bench_suite"))
    suite = Suite(args, sizes)
    print(
        f"database {suite.database_url.rsplit('/', 1)[-1]}, Redis prefix {suite.prefix}, "
        f"logs {suite.log_dir}",
        flush=True,
    )
    started = time.monotonic()
    failed = False
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
    finally:
        if not args.keep_data:
            suite.cleanup()
    suite.problems.extend(log_problems(suite.log_dir))
    table = suite.table()
    print(f"\n{table}\n(ratio = ours / baseline; figures are medians of {args.runs} runs)")
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
            "table": [
                {
                    "figure": row.label,
                    "unit": row.unit,
                    "ours": row.ours,
                    "baseline": row.baseline,
                    "ratio": row.ratio,
                    "target": row.target,
                    "met": row.verdict,
                }
                for row in suite.rows()
            ],
            "samples": suite.samples,
            "problems": suite.problems,
        },
    )
    print(f"\nresults: {path}\nelapsed: {time.monotonic() - started:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
